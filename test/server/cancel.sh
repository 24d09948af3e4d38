#!/bin/bash
# Cancel during generation: statement_timeout and pg_cancel_backend stop a
# long generation with SQLSTATE 57014 within about a second, and the
# session still works.  Needs the "default" checkpoint (cl100k vocabulary,
# slow enough per token), generated with --tokenizer.
set -u
. "$(dirname "$0")/common.sh"

db=flexmore_cancel
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
psql -X -q -d postgres -c "CREATE DATABASE $db"
q $db "CREATE EXTENSION flexmore" >/dev/null
q $db "SELECT flexmore_import('m', '$MODELS/default')" >/dev/null

# Load the model first, so the timings below measure generation only.
q $db "SELECT flexmore_generate('m', 'hi', 1)" >/dev/null

# Milliseconds since the epoch.
now_ms() { date +%s%3N; }

start=$(now_ms)
out=$(psql -X -q -t -A -d $db -v VERBOSITY=verbose 2>&1 <<'SQL'
SET statement_timeout = '100ms';
SELECT flexmore_generate('m', 'Once upon a time', 500);
SELECT 'alive';
SQL
)
elapsed=$(( $(now_ms) - start ))
check "statement_timeout gives 57014" "57014" "$(echo "$out" | grep -o '57014' | head -1)"
check "statement_timeout within a second" "t" "$([ $elapsed -lt 1000 ] && echo t || echo f)"
check "session alive after timeout" "alive" "$(echo "$out" | grep -x alive)"

# pg_cancel_backend from another session.
tmp=$(mktemp /tmp/flexmore-cancel.XXXXXX)
psql -X -q -t -A -d $db -v VERBOSITY=verbose \
	-c "SET application_name = 'flexmore_cancel_target'" \
	-c "SELECT flexmore_generate('m', 'Once upon a time', 2000)" \
	-c "SELECT 'alive'" >"$tmp" 2>&1 &
target=$!
sleep 0.5
start=$(now_ms)
q $db "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'flexmore_cancel_target' AND state = 'active'" >/dev/null
wait $target
elapsed=$(( $(now_ms) - start ))
check "pg_cancel_backend gives 57014" "57014" "$(grep -o '57014' "$tmp" | head -1)"
check "pg_cancel_backend within a second" "t" "$([ $elapsed -lt 1000 ] && echo t || echo f)"
check "session alive after cancel" "alive" "$(grep -x alive "$tmp")"
rm -f "$tmp"

psql -X -q -d postgres -c "DROP DATABASE $db"
finish
