#!/bin/bash
# Classification and scoring over tables.  Serial, parallel workers, the
# batched functions and reversed row order give the same scores within
# 1e-5 relative, and the same labels unless the two best scores lie within
# that tolerance.  statement_timeout stops a long classification and a
# long batch with 57014 within about a second.  Classifying 20,000 rows
# leaves the backend's peak memory within a few MB of its peak after 2,000
# rows.  The numeric comparison with the float64 reference is
# test/model/classify_reference.py, which this script also runs.
set -u
. "$(dirname "$0")/common.sh"

db=flexmore_classify
here=$(cd "$(dirname "$0")" && pwd)
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
psql -X -q -d postgres -c "CREATE DATABASE $db"
q $db "CREATE EXTENSION flexmore" >/dev/null
q $db "SELECT flexmore_import('big', '$MODELS/default')" >/dev/null
q $db "SELECT flexmore_import('tiny', '$MODELS/flex_olmo_f32')" >/dev/null

# ---------- against the float64 reference ----------

ref_out=$(PGDATABASE=$db /usr/bin/python3 "$here/../model/classify_reference.py" "$MODELS" 2>&1)
ref_status=$?
echo "$ref_out" | grep -v '^ok '
ref_line=$(echo "$ref_out" | tail -n 1)
ref_passed=$(sed -E 's/^([0-9]+) passed.*/\1/' <<<"$ref_line")
ref_failed=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$ref_line")
if [[ "$ref_passed" =~ ^[0-9]+$ && "$ref_failed" =~ ^[0-9]+$ ]]; then
	passed=$((passed + ref_passed))
	failed=$((failed + ref_failed))
	echo "classify_reference.py: $ref_line"
else
	failed=$((failed + 1))
	echo "FAILED: classify_reference.py printed no count"
fi
[ $ref_status -eq 0 ] || [ "$ref_failed" != 0 ] || { failed=$((failed + 1)); echo "FAILED: classify_reference.py exited with $ref_status"; }

# ---------- serial, parallel, batched and reversed paths agree ----------

q $db "CREATE TABLE texts (id bigint PRIMARY KEY, body text NOT NULL)" >/dev/null
q $db "INSERT INTO texts
	SELECT i, s.body || ' (' || i || ')'
	FROM generate_series(1, 36) AS i,
	     LATERAL (SELECT (ARRAY['Alle mennesker er født frie og lige i værdighed og rettigheder.',
	                            'Rødgrød med fløde er en dansk dessert.',
	                            'Kan ikke åbne filen: adgang nægtet',
	                            'All human beings are born free and equal in dignity and rights.',
	                            'This program comes with ABSOLUTELY NO WARRANTY.',
	                            'Permission denied while opening the file'])[1 + i % 6] AS body) AS s" >/dev/null
labels="ARRAY['positiv', 'negativ', 'fejlmeddelelse', 'license text']"

# path_results MODEL MODE: a table results_MODEL_MODE (id, scores, label, score)
path_results() {
	local model=$1 mode=$2 settings=""
	case $mode in
		parallel)
			settings="SET force_parallel_mode = on; SET parallel_setup_cost = 0;
				SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
				SET max_parallel_workers_per_gather = 2;" ;;
		*)
			settings="SET max_parallel_workers_per_gather = 0;" ;;
	esac
	case $mode in
		serial|parallel)
			psql -X -q -d $db -v ON_ERROR_STOP=1 >/dev/null <<-SQL
				$settings
				CREATE TABLE results_${model}_$mode AS
				SELECT id, flexmore_classify_scores('$model', body, $labels) AS scores,
				       flexmore_classify('$model', body, $labels) AS label,
				       flexmore_score('$model', body) AS score
				FROM texts;
			SQL
			;;
		batch|reversed)
			local order="id"
			[ $mode = batch ] || order="id DESC"
			psql -X -q -d $db -v ON_ERROR_STOP=1 >/dev/null <<-SQL
				$settings
				CREATE TABLE results_${model}_$mode AS
				SELECT c.id, c.scores, c.label, s.score
				FROM flexmore_classify_batch('$model',
				         (SELECT array_agg(id ORDER BY $order) FROM texts),
				         (SELECT array_agg(body ORDER BY $order) FROM texts), $labels) AS c
				JOIN flexmore_score_batch('$model',
				         (SELECT array_agg(id ORDER BY $order) FROM texts),
				         (SELECT array_agg(body ORDER BY $order) FROM texts)) AS s USING (id);
			SQL
			;;
	esac
}

# agreement MODEL MODE: rows whose scores, label or score disagree with serial
agreement() {
	q $db "SELECT count(*) FROM results_$1_serial a JOIN results_$1_$2 b USING (id)
	WHERE abs(a.score - b.score) > 1e-5 * abs(a.score)
	   OR EXISTS (SELECT 1 FROM jsonb_object_keys(a.scores) AS k
	              WHERE abs((a.scores -> k ->> 'logprob')::float8 - (b.scores -> k ->> 'logprob')::float8)
	                    > 1e-5 * abs((a.scores -> k ->> 'logprob')::float8))
	   OR (a.label <> b.label AND
	       (SELECT abs(x[1] - x[2]) > 1e-5 * abs(x[1])
	        FROM (SELECT array_agg((a.scores -> k ->> 'logprob')::float8
	                               ORDER BY (a.scores -> k ->> 'logprob')::float8 DESC) AS x
	              FROM jsonb_object_keys(a.scores) AS k) AS top))"
}

plan=$(psql -X -q -t -A -d $db <<SQL
SET force_parallel_mode = on; SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0; SET max_parallel_workers_per_gather = 2;
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
SELECT flexmore_classify('tiny', body, $labels) FROM texts;
SQL
)
check "parallel plan launches workers" "t" \
	"$(echo "$plan" | grep -Eq 'Workers Launched: [12]' && echo t || echo f)"
check "classify is parallel safe" "s" \
	"$(q $db "SELECT proparallel FROM pg_proc WHERE proname = 'flexmore_classify'")"

for model in tiny big; do
	for mode in serial parallel batch reversed; do
		path_results $model $mode
	done
	check "$model: serial rows" "36" "$(q $db "SELECT count(*) FROM results_${model}_serial")"
	for mode in parallel batch reversed; do
		check "$model: $mode rows" "36" "$(q $db "SELECT count(*) FROM results_${model}_$mode")"
		check "$model: $mode agrees with serial" "0" "$(agreement $model $mode)"
	done
	check "$model: classify equals the best of classify_scores" "0" \
		"$(q $db "SELECT count(*) FROM results_${model}_serial
		WHERE label <> (SELECT k FROM jsonb_object_keys(scores) AS k
		                ORDER BY (scores -> k ->> 'logprob')::float8 DESC LIMIT 1)")"
	check "$model: probabilities add up to 1" "0" \
		"$(q $db "SELECT count(*) FROM results_${model}_serial
		WHERE abs((SELECT sum((scores -> k ->> 'probability')::float8)
		           FROM jsonb_object_keys(scores) AS k) - 1) > 1e-9")"
done

# ---------- cancel mid-classification and mid-batch ----------

now_ms() { date +%s%3N; }
q $db "CREATE TABLE many AS SELECT i AS id, 'Rødgrød med fløde nummer ' || i AS body
	FROM generate_series(1, 5000) AS i" >/dev/null
for query in \
	"SELECT count(flexmore_classify('big', body, $labels)) FROM many" \
	"SELECT count(*) FROM flexmore_classify_batch('big', (SELECT array_agg(id) FROM many), (SELECT array_agg(body) FROM many), $labels)"; do
	kind=$([[ $query == *batch* ]] && echo batch || echo per-row)
	start=$(now_ms)
	out=$(psql -X -q -t -A -d $db -v VERBOSITY=verbose 2>&1 <<-SQL
		SET max_parallel_workers_per_gather = 0;
		SET statement_timeout = '100ms';
		$query;
		SELECT 'alive';
	SQL
	)
	elapsed=$(( $(now_ms) - start ))
	check "$kind: statement_timeout gives 57014" "57014" "$(echo "$out" | grep -o '57014' | head -1)"
	check "$kind: timeout within a second" "t" "$([ $elapsed -lt 1000 ] && echo t || echo f)"
	check "$kind: session alive after timeout" "alive" "$(echo "$out" | grep -x alive)"
	echo "$kind: canceled after $elapsed ms"
done

# ---------- memory does not grow per row ----------

# VmHWM is the backend's peak resident memory, read by the backend itself.
peak="SELECT 'VmHWM ' || substring(pg_read_file('/proc/self/status') FROM 'VmHWM:\\s+(\\d+)')"
mem=$(psql -X -q -t -A -d $db 2>&1 <<SQL
SET max_parallel_workers_per_gather = 0;
SELECT count(flexmore_classify('tiny', 'Rødgrød nummer ' || i, $labels)) FROM generate_series(1, 2000) AS i;
$peak;
SELECT count(flexmore_classify('tiny', 'Rødgrød nummer ' || i, $labels)) FROM generate_series(1, 20000) AS i;
$peak;
SELECT count(s) FROM flexmore_score_batch('tiny', (SELECT array_agg(i::bigint) FROM generate_series(1, 2000) AS i), (SELECT array_agg('Rødgrød nummer ' || i) FROM generate_series(1, 2000) AS i)) AS s;
$peak;
SQL
)
echo "$mem"
hwm=($(echo "$mem" | awk '/^VmHWM/ {print $2}'))
if [ ${#hwm[@]} -eq 3 ]; then
	echo "peak RSS after 2,000 rows: ${hwm[0]} kB; after 20,000 rows: ${hwm[1]} kB; after a 2,000-row batch: ${hwm[2]} kB"
	check "peak memory grows less than 4 MB from 2,000 to 20,000 rows" "t" \
		"$([ $((hwm[1] - hwm[0])) -lt 4096 ] && echo t || echo f)"
else
	check "memory figures read" "3" "${#hwm[@]}"
fi

psql -X -q -d postgres -c "DROP DATABASE $db"
finish
