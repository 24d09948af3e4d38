# Shared helpers for the flexmore SQL scripts that pg_regress cannot run.
# Connection settings come from PGHOST, PGPORT and PGUSER; the checkpoints
# from FLEXMORE_TEST_MODELS (the directory gen_checkpoint.py wrote).

: "${FLEXMORE_TEST_MODELS:?set FLEXMORE_TEST_MODELS to the generated checkpoint directory}"
MODELS=$FLEXMORE_TEST_MODELS
passed=0
failed=0

# Run SQL in database $1 and print the unaligned, tuples-only result.
q() {
	psql -X -q -t -A -v ON_ERROR_STOP=1 -d "$1" -c "$2"
}

# check NAME EXPECTED ACTUAL
check() {
	if [ "$2" = "$3" ]; then
		passed=$((passed + 1))
		echo "ok: $1"
	else
		failed=$((failed + 1))
		echo "FAILED: $1: expected [$2], got [$3]"
	fi
}

finish() {
	echo "$passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}
