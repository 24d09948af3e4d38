#!/bin/bash
# Builds the libFuzzer targets (clang -fsanitize=fuzzer,address) against
# the frontend build of src/reader and src/engine, seeds each corpus from
# the generated checkpoints, and runs each target for FUZZ_SECONDS
# (default 30).  A crash, leak or sanitizer report fails the target and
# leaves the input in $work/crash-*.  Prints "N passed, N failed".
#
#   test/fuzz/run.sh [MODELS_DIR]    (default $FLEXMORE_TEST_MODELS)
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
models=${1:-${FLEXMORE_TEST_MODELS:?give the generated checkpoint directory}}
seconds=${FUZZ_SECONDS:-30}
work=${FUZZ_WORK:-/tmp/flexmore-fuzz}
passed=0
failed=0

if ! command -v clang >/dev/null; then
	echo "clang is missing: install the Debian packages clang and libclang-rt-14-dev"
	echo "0 passed, 1 failed"
	exit 1
fi

pg_config=${PG_CONFIG:-pg_config}
server_inc=$($pg_config --includedir-server)
libdir=$($pg_config --libdir)
pkglibdir=$($pg_config --pkglibdir)
deps_cflags=$(pkg-config --cflags openblas libzstd libpcre2-8)
deps_libs=$(pkg-config --libs openblas libzstd libpcre2-8)
mkdir -p "$work/obj"

# The reader and engine sources the targets need, instrumented.
cflags="-w -g -O1 -fsanitize=fuzzer-no-link,address -std=gnu11 -DFRONTEND -DFM_LINK_CBLAS -I$root/src -I$server_inc $deps_cflags"
objs=()
for src in "$root"/src/reader/*.c "$root"/src/engine/*.c; do
	obj="$work/obj/$(basename "$(dirname "$src")")_$(basename "$src" .c).o"
	clang $cflags -c -o "$obj" "$src" || { echo "could not compile $src"; echo "0 passed, 1 failed"; exit 1; }
	objs+=("$obj")
done

build_target() {
	clang -g -O1 -fsanitize=fuzzer,address -std=gnu11 -DFRONTEND -I"$root/src" -I"$server_inc" \
		-o "$work/$1" "$root/test/fuzz/$1.c" "${objs[@]}" \
		-L"$libdir" -L"$pkglibdir" -lpgcommon -lpgport $deps_libs -lm -lpthread
}

# Seeds: every generated safetensors file (the headers and some data)
# and every tokenizer.json, hostile variants included.
seed() {
	local name=$1 pattern=$2 limit=$3
	rm -rf "$work/corpus-$name"
	mkdir -p "$work/corpus-$name"
	find "$models" -name "$pattern" -size -"$limit" | while read -r f; do
		cp "$f" "$work/corpus-$name/$(echo "$f" | md5sum | cut -c1-16)"
	done
}

run_target() {
	local target=$1 corpus=$2 max_len=$3
	if ! build_target "$target"; then
		echo "FAILED: $target does not build"
		failed=$((failed + 1))
		return
	fi
	echo "== $target: $(ls "$work/corpus-$corpus" | wc -l) seeds, ${seconds}s"
	# NOTE: leak detection is off.  PostgreSQL's JSON parser (jsonapi.c)
	# pstrdup's each object field name for the field callbacks, and when
	# the parse fails inside a field nothing frees it.  In the server that
	# memory belongs to a memory context that is reset, so only the
	# frontend build leaks, a few bytes per rejected file.
	if (cd "$work" && ASAN_OPTIONS=detect_leaks=0 ./"$target" -max_total_time="$seconds" -max_len="$max_len" -rss_limit_mb=2048 \
		-detect_leaks=0 \
		-print_final_stats=1 "corpus-$corpus" >"$work/$target.log" 2>&1); then
		tail -n 3 "$work/$target.log" | sed 's/^/  /'
		echo "ok: $target"
		passed=$((passed + 1))
	else
		tail -n 30 "$work/$target.log"
		echo "FAILED: $target (log: $work/$target.log)"
		failed=$((failed + 1))
	fi
}

seed safetensors '*.safetensors' 2048k
seed tokenizer 'tokenizer.json' 2048k
run_target fuzz_safetensors safetensors 1048576
run_target fuzz_tokenizer tokenizer 1048576

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
