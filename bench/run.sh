#!/bin/bash
# Speed benchmark of the engine against the machine's bounds and llama.cpp,
# run by `make bench` after it builds build/bench/*.  Prints tables of
# figures (bench/report.py), never a pass or fail.
#
# Steps (the first three reuse the files an earlier run left):
#   1. bench/gen_synthetic.py writes two random-weight checkpoints with
#      FlexOlmo's layer shapes into $BENCH_DIR/model: FlexMoRE (public
#      expert plus adapters of ranks 1024 to 1) and its dense public expert.
#   2. npm installs node-llama-cpp into build/llama (no install scripts);
#      the llama.cpp source it ships (a git bundle) is built with cmake:
#      llama-bench, plus bench/llama_logits.c linked to the library.
#   3. bench/gguf_export.py writes the dense model as OLMo-2 GGUF files in
#      F32, BF16 and Q8_0; flexmore's and llama.cpp's next-token logits for
#      one id list are compared.
#   4. Per thread count and format: memory read bandwidth (bench/membw.c,
#      over as many bytes as a decode step reads) just before and just
#      after, the engine's decode and prompt speed,
#      llama-bench on the same format; OpenBLAS sgemm at the model's
#      shapes once per thread count.
#   5. Decode speed of the FlexMoRE model with 0, 1, 2 and 5 low-rank
#      experts allowed, and the engine on the demo model, if present.
#
# Settings (environment): LAYERS (4), DECODE steps (8), PROMPT ids (128),
# RUNS per figure (3, median), THREADS ("1 2"), FORMATS ("f32 bf16 q8"),
# MOE_THREADS ("1"), MOE_FORMATS ("f32"), DEMO_MODEL
# (models/default), DEMO_FORMATS ("f32"), BENCH_DIR (build/bench)
# and RESULTS ($BENCH_DIR/results.jsonl).  ENGINE_BENCH is the measurement program: anything with
# engine-bench's command line and JSON output.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build"
work="${BENCH_DIR:-$build/bench}"
python=/usr/bin/python3

# The engine measurement program (bench/engine_bench.c).
ENGINE_BENCH="${ENGINE_BENCH:-$build/engine-bench}"

LAYERS="${LAYERS:-4}"
DECODE="${DECODE:-8}"
PROMPT="${PROMPT:-128}"
RUNS="${RUNS:-3}"
THREADS="${THREADS-1 2}"
FORMATS="${FORMATS-f32 bf16 q8}"
MOE_THREADS="${MOE_THREADS-1}"
MOE_FORMATS="${MOE_FORMATS-f32}"
DEMO_MODEL="${DEMO_MODEL:-$root/models/default}"
DEMO_FORMATS="${DEMO_FORMATS-f32}"
CHECK_IDS="17,4242,99,31000,5,777,12345,2024"

llama_root="$build/llama"
llama_src="$llama_root/llama.cpp"
llama_build="$llama_src/build"
llama_bench="$llama_build/bin/llama-bench"
llama_logits="$build/bench/llama_logits"
model="$work/model"
gguf="$work/gguf"
results="${RESULTS:-$work/results.jsonl}"
start_time=$(date +%s)

# OpenBLAS picks its kernels when it loads, and one older than the CPU
# falls back to SSE kernels.  Use the kernels the extension requests
# (fm_openblas_coretype), unless the environment names others.
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
	cpu_flags=" $(grep -m 1 '^flags' /proc/cpuinfo | cut -d: -f2) "
	has() { for f in "$@"; do [[ $cpu_flags == *" $f "* ]] || return 1; done; }
	if grep -q -m 1 '^vendor_id.*AuthenticAMD' /proc/cpuinfo && has avx2 fma; then
		export OPENBLAS_CORETYPE=Zen
	elif has avx512f avx512bw avx512vl avx512dq avx512cd; then
		export OPENBLAS_CORETYPE=SkylakeX
	elif has avx2 fma; then
		export OPENBLAS_CORETYPE=Haswell
	fi
fi

log() {
	echo "bench: $*" >&2
}

# Appends one JSON object to the results: record KIND JSON-FIELDS...
record() {
	local kind=$1
	shift
	echo "{\"kind\": \"$kind\", $*}" >>"$results"
}

mkdir -p "$work" "$gguf"

# ---------- 1. synthetic checkpoints

log "synthetic checkpoints ($LAYERS layers) in $model"
"$python" "$root/bench/gen_synthetic.py" "$model" --layers "$LAYERS" >&2

# ---------- 2. llama.cpp from node-llama-cpp

if [ ! -d "$llama_root/node_modules/node-llama-cpp" ]; then
	log "npm install node-llama-cpp into $llama_root"
	mkdir -p "$llama_root"
	(cd "$llama_root" && { [ -f package.json ] || npm init -y >/dev/null; } &&
		npm install --ignore-scripts --no-audit --no-fund node-llama-cpp >&2)
fi
if [ ! -d "$llama_src" ]; then
	git clone -q "$llama_root/node_modules/node-llama-cpp/llama/gitRelease.bundle" "$llama_src" 2>/dev/null
fi
if [ ! -x "$llama_bench" ]; then
	log "building llama-bench from $llama_src (several minutes)"
	cmake -S "$llama_src" -B "$llama_build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
		-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
	cmake --build "$llama_build" -j 2 --target llama-bench >&2
fi
if [ ! -x "$llama_logits" ] || [ "$root/bench/llama_logits.c" -nt "$llama_logits" ]; then
	gcc -O2 -c -o "$work/llama_logits.o" "$root/bench/llama_logits.c" \
		-I"$llama_src/include" -I"$llama_src/ggml/include"
	g++ -o "$llama_logits" "$work/llama_logits.o" "$llama_build/src/libllama.a" \
		"$llama_build/ggml/src/libggml.a" "$llama_build/ggml/src/libggml-cpu.a" \
		"$llama_build/ggml/src/libggml-base.a" -fopenmp -lpthread -lm
fi
llama_commit=$(git -C "$llama_src" log -1 --format=%h)
llama_version=$(sed -n 's/.*"version": "\(.*\)".*/\1/p' \
	"$llama_root/node_modules/node-llama-cpp/package.json" | head -n 1)

# ---------- 3. GGUF exports and the logits check

declare -A gguf_type=([f32]=f32 [bf16]=bf16 [q8]=q8_0)
: >"$results"
record machine "\"cpu\": \"$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)\"," \
	"\"cores\": $(nproc), \"mem_gb\": $(free -g | awk '/^Mem:/ {print $2}')," \
	"\"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\", \"layers\": $LAYERS," \
	"\"decode\": $DECODE, \"prompt\": $PROMPT, \"runs\": $RUNS," \
	"\"engine_bench\": \"$(basename "$ENGINE_BENCH")\"," \
	"\"openblas_coretype\": \"${OPENBLAS_CORETYPE:-}\"," \
	"\"llama\": \"node-llama-cpp $llama_version, llama.cpp $llama_commit\""

"$build/tools/flexmore-run" logits "$model/dense" --ids "$CHECK_IDS" >"$work/logits-flexmore.json"
for format in $FORMATS; do
	file="$gguf/dense-${gguf_type[$format]}.gguf"
	if [ ! -f "$file" ] || [ "$model/generated.json" -nt "$file" ]; then
		"$python" "$root/bench/gguf_export.py" "$model/dense" "$file" \
			--type "${gguf_type[$format]}" >&2
	fi
	status=0
	"$llama_logits" "$file" "$CHECK_IDS" 2 >"$work/logits-llama-$format.json" \
		2>"$work/llama.err" || status=$?
	if [ "$status" -ne 0 ]; then
		log "llama_logits on $(basename "$file") failed with status $status"
		record check "\"format\": \"$format\", \"error\": \"llama_logits exited with status $status\""
		continue
	fi
	record check "\"format\": \"$format\", $("$python" - "$work/logits-flexmore.json" \
		"$work/logits-llama-$format.json" <<'EOF'
import json, sys
import numpy as np
ref = np.array(json.load(open(sys.argv[1])), dtype=np.float64)
got = np.array(json.load(open(sys.argv[2])), dtype=np.float64)
top_ref = set(np.argsort(-ref)[:5])
top_got = set(np.argsort(-got)[:5])
print(f'"argmax_flexmore": {int(ref.argmax())}, "argmax_llama": {int(got.argmax())}, '
      f'"max_abs_diff": {np.abs(ref - got).max():.6g}, "max_abs_logit": {np.abs(ref).max():.6g}, '
      f'"top5_shared": {len(top_ref & top_got)}')
EOF
)"
done

# ---------- 4. speed per thread count and format

# engine_runs MODEL_DIR FORMAT THREADS [EXPERTS]: RUNS engine results, one JSON line each.
engine_runs() {
	local dir=$1 format=$2 threads=$3 experts=${4:-}
	local args=(--model "$dir" --format "$format" --threads "$threads"
		--decode "$DECODE" --prompt "$PROMPT")
	[ -n "$experts" ] && args+=(--experts "$experts")
	for _ in $(seq "$RUNS"); do
		if ! "$ENGINE_BENCH" "${args[@]}" 2>"$work/engine.err"; then
			log "$(basename "$ENGINE_BENCH") $format: $(head -c 300 "$work/engine.err")"
			return 0
		fi
	done
}

# llama_runs GGUF THREADS: llama-bench jsonl rows, decode and prompt in
# separate processes, so a crash in one test leaves the other's figures.
llama_runs() {
	local status
	for test in "-p 0 -n $DECODE" "-p $PROMPT -n 0"; do
		status=0
		# shellcheck disable=SC2086
		"$llama_bench" -m "$1" -t "$2" $test -r "$RUNS" -lm none -o jsonl \
			2>"$work/llama.err" || status=$?
		[ "$status" -eq 0 ] || log "llama-bench $test on $(basename "$1") failed with status $status"
	done
}

# bandwidth THREADS FORMAT: read bandwidth over a buffer as large as the
# weights one decode step of the dense model reads in FORMAT, so the
# measurement and the decode see the same share of the caches.
bandwidth() {
	local mib
	mib=$("$python" -c "import json, sys; sys.path.insert(0, '$root/bench'); import report
print(int(report.dense_decode_bytes(json.load(open('$model/dense/config.json')), '$2') / 2**20))")
	"$build/bench/membw" "$1" "$mib" 5
}

for threads in $THREADS; do
	log "sgemm at the model's shapes, $threads threads"
	sgemm=$(OPENBLAS_NUM_THREADS=$threads "$build/bench/sgemm_timer" \
		64,4096,4096 64,11008,4096 64,4096,11008 | awk '{printf "%s[%s,%s,%s,%s]", (NR > 1 ? "," : ""), $2, $3, $4, $5}')
	record sgemm "\"threads\": $threads, \"shapes\": [$sgemm]"

	for format in $FORMATS; do
		log "$format, $threads threads: bandwidth, engine, llama.cpp, bandwidth"
		before=$(bandwidth "$threads" "$format")
		engine=$(engine_runs "$model/dense" "$format" "$threads" | paste -sd, -)
		llama=$(llama_runs "$gguf/dense-${gguf_type[$format]}.gguf" "$threads" | paste -sd, -)
		after=$(bandwidth "$threads" "$format")
		record cell "\"format\": \"$format\", \"threads\": $threads," \
			"\"bandwidth_before\": $before, \"bandwidth_after\": $after," \
			"\"engine\": [$engine], \"llama\": [$llama]"
	done
done

# ---------- 5. MoE cost and the demo model

# Sets of allowed experts: the public one alone, then 1, 2 and 5 adapters.
moe_sets="public public,r1024 public,r1024,r256 public,r1024,r256,r64,r16,r4"
for moe_format in $MOE_FORMATS; do
	for threads in $MOE_THREADS; do
		log "MoE decode cost, $moe_format, $threads threads"
		before=$(bandwidth "$threads" "$moe_format")
		declare -A moe=()
		# runs interleave the expert sets, so a slow spell of the machine hits all
		for run in $(seq "$RUNS"); do
			for set in $moe_sets; do
				out=$(RUNS=1 PROMPT=8 engine_runs "$model/flexmore" "$moe_format" "$threads" "$set")
				[ -n "$out" ] && moe[$set]="${moe[$set]:+${moe[$set]},}$out"
			done
		done
		after=$(bandwidth "$threads" "$moe_format")
		for set in $moe_sets; do
			record moe "\"format\": \"$moe_format\", \"threads\": $threads, \"experts\": \"$set\"," \
				"\"bandwidth_before\": $before, \"bandwidth_after\": $after," \
				"\"engine\": [${moe[$set]:-}]"
		done
		unset moe
	done
done

if [ -f "$DEMO_MODEL/config.json" ]; then
	for demo_format in $DEMO_FORMATS; do
		for threads in $THREADS; do
			log "demo model $DEMO_MODEL, $demo_format, $threads threads"
			engine=$(engine_runs "$DEMO_MODEL" "$demo_format" "$threads" | paste -sd, -)
			record demo "\"model\": \"$DEMO_MODEL\", \"format\": \"$demo_format\"," \
				"\"threads\": $threads, \"engine\": [$engine]," \
				"\"config\": $(tr -d '\n' <"$DEMO_MODEL/config.json")"
		done
	done
else
	log "no demo model at $DEMO_MODEL; skipped"
fi

record end "\"seconds\": $(($(date +%s) - start_time))," \
	"\"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\""
"$python" "$root/bench/report.py" "$results" "$model"
