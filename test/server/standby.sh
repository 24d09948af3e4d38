#!/bin/bash
# Inference on a hot standby: a primary of its own streams to a standby
# made with pg_basebackup -R.  The standby has flexmore in
# shared_preload_libraries and the primary does not, so the standby
# computes through the shared cache (weights and tokenizer) and the
# primary through private copies.  On the standby, flexmore_logits,
# flexmore_generate and flexmore_tokenize return what the primary returns,
# the flexmore_cache view counts hits, and the functions that write raise
# SQLSTATE 25006.  On the primary, generation also works with
# default_transaction_read_only on.  Needs the flex_olmo_f32 and
# sharded_gqa_bf16 checkpoints; must run as root, since the servers run
# as the postgres user.  FLEXMORE_STANDBY_PORT and FLEXMORE_STANDBY_DIR
# set the primary's port (default 55487; the standby uses the next one)
# and the directory (default /tmp/flexmore-standby).
set -u
. "$(dirname "$0")/common.sh"
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

base=${FLEXMORE_STANDBY_DIR:-/tmp/flexmore-standby}
primary_port=${FLEXMORE_STANDBY_PORT:-55487}
standby_port=$((primary_port + 1))
primary=(-h "$base/primary" -p $primary_port -U postgres -d postgres)
standby=(-h "$base/standby" -p $standby_port -U postgres -d postgres)

# Runs a command as the postgres user.
as_postgres() {
	su postgres -s /bin/sh -c "$1"
}

stop_server() {
	[ -f "$1/data/postmaster.pid" ] || return 0
	as_postgres "$PG_BIN/pg_ctl -D '$1/data' -m fast -w stop" >/dev/null
}

stop_servers() {
	stop_server "$base/standby"
	stop_server "$base/primary"
}

# on primary|standby SQL: runs SQL there and prints the unaligned,
# tuples-only result.
on() {
	local -n target=$1
	psql -X -q -t -A -v ON_ERROR_STOP=1 "${target[@]}" -c "$2"
}

# sqlstate_on primary|standby SQL: the SQLSTATE that SQL raises there,
# or "none".
sqlstate_on() {
	local -n target=$1
	local out
	out=$(psql -X -q -t -A -v VERBOSITY=sqlstate "${target[@]}" -c "$2" 2>&1)
	grep -oE '^ERROR: +[0-9A-Z]{5}' <<<"$out" | grep -oE '[0-9A-Z]{5}$' || echo none
}

# check_same NAME SQL: SQL gives the same non-empty result on both servers.
check_same() {
	local expected actual
	expected=$(on primary "$2")
	actual=$(on standby "$2")
	if [ -z "$expected" ]; then
		check "$1: a result on the primary" "non-empty" ""
		return
	fi
	check "$1" "$expected" "$actual"
}

stop_servers
trap stop_servers EXIT
rm -rf "$base"
mkdir -p "$base/primary" "$base/standby"
chown postgres:postgres "$base" "$base/primary" "$base/standby"
chmod 755 "$base" "$base/primary" "$base/standby"

# The primary: wal_level replica and wal senders are the PostgreSQL 15
# defaults, and initdb -A trust lets local replication connections in.
as_postgres "$PG_BIN/initdb -D '$base/primary/data' -E UTF8 --locale=C.UTF-8 -A trust -U postgres" \
	>"$base/primary/initdb.log" 2>&1 || { cat "$base/primary/initdb.log"; exit 1; }
as_postgres "$PG_BIN/pg_ctl -D '$base/primary/data' -w -l '$base/primary/server.log' \
	-o \"-p $primary_port -k '$base/primary' -c listen_addresses='' -c wal_level=replica\" start" \
	>/dev/null || { cat "$base/primary/server.log"; exit 1; }

check "primary wal_level" "replica" "$(on primary "SHOW wal_level")"
on primary "CREATE EXTENSION flexmore" >/dev/null
check "import before the base backup" "t" \
	"$(on primary "SELECT flexmore_import('before', '$MODELS/flex_olmo_f32') > 0")"

# The standby: a base backup with standby.signal and primary_conninfo.
as_postgres "$PG_BIN/pg_basebackup -D '$base/standby/data' -R -X stream -c fast \
	-h '$base/primary' -p $primary_port -U postgres" >"$base/standby/basebackup.log" 2>&1 ||
	{ cat "$base/standby/basebackup.log"; exit 1; }
as_postgres "$PG_BIN/pg_ctl -D '$base/standby/data' -w -l '$base/standby/server.log' \
	-o \"-p $standby_port -k '$base/standby' -c listen_addresses='' -c hot_standby=on \
	-c shared_preload_libraries=flexmore -c flexmore.cache_size=256MB\" start" \
	>/dev/null || { cat "$base/standby/server.log"; exit 1; }
check "standby in recovery" "t" "$(on standby "SELECT pg_is_in_recovery()")"

# A second model reaches the standby only through streamed WAL.
check "import after the base backup" "t" \
	"$(on primary "SELECT flexmore_import('after', '$MODELS/sharded_gqa_bf16') > 0")"
target_lsn=$(on primary "SELECT pg_current_wal_lsn()")
replayed=f
for _ in $(seq 1 300); do
	replayed=$(on standby "SELECT pg_last_wal_replay_lsn() >= '$target_lsn'::pg_lsn")
	[ "$replayed" = t ] && break
	sleep 0.1
done
check "standby replayed the import" "t" "$replayed"
check "models on the standby" "after before" \
	"$(on standby "SELECT string_agg(name, ' ' ORDER BY name) FROM flexmore_models")"

# Same arguments, same results on both servers.
danish='rødgrød med fløde på æblerne, Ærø og Åbenrå'
for model in before after; do
	check_same "$model: logits match" \
		"SELECT md5(flexmore_logits('$model', ARRAY[5, 6, 7, 8])::text)"
	check_same "$model: expert logits match" \
		"SELECT md5(flexmore_logits('$model', ARRAY[5, 6, 7], ARRAY['public'])::text)"
	check_same "$model: greedy generation matches" \
		"SELECT flexmore_generate('$model', 'hello world', 16)"
	check_same "$model: seeded sample matches" \
		"SELECT flexmore_generate('$model', '$danish', 16, temperature => 1, top_p => 0.9, seed => 7)"
	check_same "$model: tokens match" "SELECT flexmore_tokenize('$model', '$danish')"
	check "$model: standby round trip" "$danish" \
		"$(on standby "SELECT flexmore_detokenize('$model', flexmore_tokenize('$model', '$danish'))")"
done

# The standby served those calls from its shared cache.  Hits and
# last-used times live in shared memory, so counting them writes nothing.
check "standby cache holds both models' tokenizers" "after before" \
	"$(on standby "SELECT string_agg(model, ' ' ORDER BY model) FROM flexmore_cache WHERE kind = 'tokenizer' AND state = 'ready'")"
check "standby cache holds both models' shared parts" "after before" \
	"$(on standby "SELECT string_agg(model, ' ' ORDER BY model) FROM flexmore_cache WHERE kind = 'weights' AND expert IS NULL AND state = 'ready'")"
check "primary has no shared cache" "0" "$(on primary "SELECT count(*) FROM flexmore_cache")"
hits_sql="SELECT kind || ':' || hits FROM flexmore_cache WHERE model = 'before' AND expert IS NULL ORDER BY kind"
hits_before=$(on standby "$hits_sql")
used_before=$(on standby "SELECT max(last_used) FROM flexmore_cache WHERE model = 'before'")
for _ in 1 2 3; do
	check_same "before: greedy generation in a new connection matches" \
		"SELECT flexmore_generate('before', 'hello world', 8)"
done
hits_after=$(on standby "$hits_sql")
# each new connection pins the tokenizer and the shared part once
check "standby hits grow by 3 per item" \
	"$(awk -F: '{printf "%s:%d\n", $1, $2 + 3}' <<<"$hits_before")" "$hits_after"
check "standby last_used advances" "t" \
	"$(on standby "SELECT max(last_used) > '$used_before' FROM flexmore_cache WHERE model = 'before'")"
check "cache load on the standby" "t" "$(on standby "SELECT flexmore_cache_load('after') > 0")"
check "cache evict on the standby" "t" "$(on standby "SELECT flexmore_cache_evict('after') > 0")"
check_same "after: generation after an evict on the standby matches" \
	"SELECT flexmore_generate('after', 'hello world', 16)"
# Usage counters live in shared memory, so calls on a standby are counted
# there: the tokens counted equal the (position, expert) pairs that
# flexmore_route reports for the same call.
on standby "SELECT flexmore_expert_usage_reset()" >/dev/null
routed=$(on standby "SELECT count(DISTINCT (r.\"position\", e)) FROM flexmore_route('before', 'Alle mennesker er født frie') r, unnest(r.experts) e")
check "standby counts routed tokens" "$routed" \
	"$(on standby "SELECT sum(tokens) FROM flexmore_expert_usage WHERE model = 'before'")"
check "standby counts one call per expert used" "t" \
	"$(on standby "SELECT bool_and(calls = 1) FROM flexmore_expert_usage WHERE model = 'before'")"
check "standby still in recovery" "t" "$(on standby "SELECT pg_is_in_recovery()")"

# The standby runs no writes.
check "import on the standby" "25006" \
	"$(sqlstate_on standby "SELECT flexmore_import('third', '$MODELS/flex_olmo_f32')")"
check "drop on the standby" "25006" "$(sqlstate_on standby "SELECT flexmore_drop_model('before')")"
check "standby models unchanged" "after before" \
	"$(on standby "SELECT string_agg(name, ' ' ORDER BY name) FROM flexmore_models")"

# A read-only session on the primary: a fresh backend loads the model
# and generates, and an import is rejected.  Each -c runs in its own
# transaction, so the SET applies to the statement after it.
greedy="SELECT flexmore_generate('before', 'hello world', 16)"
serial_greedy=$(on primary "$greedy")
check "generation on the primary" "t" "$([ -n "$serial_greedy" ] && echo t || echo f)"
check "read-only generation on the primary" "$serial_greedy" \
	"$(psql -X -q -t -A -v ON_ERROR_STOP=1 "${primary[@]}" \
		-c "SET default_transaction_read_only = on" -c "$greedy")"
read_only_import=$(psql -X -q -t -A -v VERBOSITY=sqlstate "${primary[@]}" \
	-c "SET default_transaction_read_only = on" \
	-c "SELECT flexmore_import('third', '$MODELS/flex_olmo_f32')" 2>&1)
check "read-only import on the primary" "ERROR:  25006" "$read_only_import"
check "primary models unchanged" "after before" \
	"$(on primary "SELECT string_agg(name, ' ' ORDER BY name) FROM flexmore_models")"

stop_servers
trap - EXIT
check "servers stopped" "none" \
	"$(ls "$base/primary/data/postmaster.pid" "$base/standby/data/postmaster.pid" 2>/dev/null || echo none)"
finish
