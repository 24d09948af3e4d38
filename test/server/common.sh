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
#
# Results are written in the Test Anything Protocol ("ok N - name" or
# "not ok N - name", and the plan "1..N" at the end), so the scripts also
# run under prove, e.g. "prove -e bash test/server/cache.sh" with the
# environment set as scripts/test.sh sets it.  finish() adds the plain
# "N passed, N failed" line that scripts/test.sh sums.
tap_count=0
check() {
	tap_count=$((tap_count + 1))
	if [ "$2" = "$3" ]; then
		passed=$((passed + 1))
		echo "ok $tap_count - $1"
	else
		failed=$((failed + 1))
		echo "not ok $tap_count - $1"
		echo "# expected [$2], got [$3]"
	fi
}

finish() {
	echo "1..$tap_count"
	echo "$passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}
