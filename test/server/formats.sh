#!/bin/bash
# Weight formats through the shared cache, and the server-wide thread cap,
# on a cluster of its own with flexmore in shared_preload_libraries.  It
# checks that items of one import in different formats (the cache key)
# are separate and show their format in flexmore_cache, that q8 items are
# smaller, that flexmore.max_total_threads limits two concurrent calls
# together, and, when models/default/heldout-sample.jsonl exists in the
# repository, that q8 perplexity stays within 1% of f32 on that held-out
# text.  FLEXMORE_FORMATS_TEST_PORT and FLEXMORE_FORMATS_TEST_DIR set the
# cluster's port (default 55505) and directory (default
# /tmp/flexmore-formats-test).  Runs as root (the server runs as postgres).
set -u
. "$(dirname "$0")/common.sh"
root=$(cd "$(dirname "$0")/../.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

base=${FLEXMORE_FORMATS_TEST_DIR:-/tmp/flexmore-formats-test}
port=${FLEXMORE_FORMATS_TEST_PORT:-55505}
export PGHOST=$base PGPORT=$port PGUSER=postgres
db=postgres

server() {
	su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$base/data' -w -l '$base/server.log' $*" >/dev/null
}

cleanup() { server -m immediate stop 2>/dev/null || true; }
trap cleanup EXIT

cleanup
rm -rf "$base"
mkdir -p "$base"
chown postgres:postgres "$base"
su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$base/data' -A trust -U postgres" >/dev/null
cat >>"$base/data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$base'
port = $port
shared_preload_libraries = 'flexmore'
flexmore.cache_size = '256MB'
flexmore.max_total_threads = 2
CONF
server start

q $db "CREATE EXTENSION flexmore" >/dev/null
q $db "SELECT flexmore_import('r', '$MODELS/flexmore_ranks_f32')" >/dev/null

# ---------- formats are separate cache items ----------

logits="flexmore_logits('r', ARRAY[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])"
f32=$(q $db "SELECT $logits")
q8=$(q $db "SET flexmore.weight_format = 'q8'; SELECT $logits")
f32_again=$(q $db "SELECT $logits")
check "q8 logits differ from f32" "t" "$(q $db "SELECT '$q8'::real[] <> '$f32'::real[]")"
check "q8 logits within 5% of the largest f32 logit" "t" \
	"$(q $db "SELECT max(abs(a - b)) < 0.05 * max(abs(b)) FROM unnest('$q8'::real[], '$f32'::real[]) AS t(a, b)")"
check "f32 logits unchanged by a q8 call" "$f32" "$f32_again"
check "flexmore_cache shows both formats" "f32,q8" \
	"$(q $db "SELECT string_agg(DISTINCT format, ',' ORDER BY format) FROM flexmore_cache WHERE model = 'r' AND kind = 'weights'")"
check "tokenizer item has no format" "t" \
	"$(q $db "SELECT bool_and(format IS NULL) FROM flexmore_cache WHERE model = 'r' AND kind = 'tokenizer'")"
check "one shared part per format" "2" \
	"$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'r' AND kind = 'weights' AND expert IS NULL")"
check "q8 shared part is smaller than f32" "t" \
	"$(q $db "SELECT (SELECT bytes FROM flexmore_cache WHERE model = 'r' AND expert IS NULL AND format = 'q8') < (SELECT bytes FROM flexmore_cache WHERE model = 'r' AND expert IS NULL AND format = 'f32')")"
before=$(q $db "SELECT hits FROM flexmore_cache WHERE model = 'r' AND expert IS NULL AND format = 'q8'")
check "q8 logits again from the cached q8 items" "$q8" \
	"$(q $db "SET flexmore.weight_format = 'q8'; SELECT $logits")"
check "second q8 call hits the q8 item" "1" \
	"$(($(q $db "SELECT hits FROM flexmore_cache WHERE model = 'r' AND expert IS NULL AND format = 'q8'") - before))"
bf16=$(q $db "SET flexmore.weight_format = 'bf16'; SELECT $logits")
check "bf16 adds its own items" "bf16,f32,q8" \
	"$(q $db "SELECT string_agg(DISTINCT format, ',' ORDER BY format) FROM flexmore_cache WHERE model = 'r' AND kind = 'weights'")"
q $db "SELECT flexmore_cache_evict('r')" >/dev/null
check "evict frees every format" "0" \
	"$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'r' AND kind = 'weights'")"

# One backend binds f32 items, they are evicted, and q8 items load, likely
# at the same addresses: the backend must rebind them as q8.
same_backend=$(psql -X -q -t -A -d $db <<SQL | tail -n 1
SELECT $logits IS NOT NULL;
SELECT flexmore_cache_evict('r') >= 0;
SET flexmore.weight_format = 'q8';
SELECT $logits;
SQL
)
check "f32 then q8 in one backend after evict" "$q8" "$same_backend"

# ---------- the thread cap ----------

# threads_granted: runs one call with flexmore.threads = 4 and prints the
# DEBUG1 line the cap writes, or "all" when the call got every thread.
threads_granted() {
	local out
	out=$(psql -X -q -t -A -d $db -c "SET flexmore.threads = 4" -c "SET client_min_messages = debug1" \
		-c "SELECT $logits IS NOT NULL" 2>&1 | grep -o 'leaves this call [0-9]* of [0-9]* threads' || true)
	echo "${out:-all}"
}

check "cap 2 leaves one call 2 of 4 threads" "leaves this call 2 of 4 threads" "$(threads_granted)"

# A statement that keeps 2 threads while it sleeps leaves the other call 1.
psql -X -q -t -A -d $db -c "SET flexmore.threads = 2" \
	-c "SELECT $logits IS NOT NULL, pg_sleep(4)" >/dev/null 2>&1 &
holder=$!
sleep 1.5
check "a concurrent call gets 1 thread" "leaves this call 1 of 4 threads" "$(threads_granted)"
wait $holder
check "threads return when the statement ends" "leaves this call 2 of 4 threads" "$(threads_granted)"

q $db "ALTER SYSTEM SET flexmore.max_total_threads = 0" >/dev/null
q $db "SELECT pg_reload_conf()" >/dev/null
sleep 0.5
check "cap 0 after reload: no limit" "all" "$(threads_granted)"
check "threads still give the f32 logits" "$f32" \
	"$(psql -X -q -t -A -d $db -c "SET flexmore.threads = 3" -c "SELECT $logits")"

# ---------- q8 perplexity on held-out text ----------

heldout=$root/models/default/heldout-sample.jsonl
if [ -f "$heldout" ]; then
	# NOTE: each line is expected to be a JSON object with a "text" field.
	# CSV with control characters as delimiter and quote reads each line
	# whole, without COPY's text-format backslash escapes.
	q $db "CREATE TABLE heldout (n serial, doc jsonb)" >/dev/null
	psql -X -q -v ON_ERROR_STOP=1 -d $db \
		-c "\\copy heldout (doc) FROM '$heldout' WITH (FORMAT csv, DELIMITER E'\\x01', QUOTE E'\\x02')" >/dev/null
	q $db "SELECT flexmore_import('trained', '$root/models/default')" >/dev/null
	ppl() {
		q $db "SET flexmore.weight_format = '$1';
			SELECT exp(-sum(s.score) / sum(s.tokens))
			FROM (SELECT array_agg(n::bigint ORDER BY n) AS ids,
						 array_agg(doc->>'text' ORDER BY n) AS texts FROM heldout) AS a,
				 flexmore_score_batch('trained', a.ids, a.texts) AS s"
	}
	p32=$(ppl f32)
	p8=$(ppl q8)
	echo "# held-out perplexity: f32 $p32, q8 $p8"
	check "q8 perplexity within 1% of f32" "t" "$(q $db "SELECT abs($p8 - $p32) <= 0.01 * $p32")"
else
	echo "# skipped the held-out perplexity check: $heldout does not exist"
fi

finish
