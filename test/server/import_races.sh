#!/bin/bash
# Cases of the import and tokenizer that need the shell:
# - checkpoint files that are FIFOs, sockets, devices or directories,
#   rejected before open() could block;
# - two sessions importing or changing one model name at the same time,
#   serialised by an advisory lock;
# - cancelling the tokenization of a huge text with statement_timeout.
set -u
. "$(dirname "$0")/common.sh"

client=$(pg_config --bindir)/flexmore-import
db=flexmore_races
work=$(mktemp -d /tmp/flexmore-races.XXXXXX)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
psql -X -q -d postgres -c "CREATE DATABASE $db"
q $db "CREATE EXTENSION flexmore" >/dev/null

# sqlstate_of DB SQL: runs SQL and prints "SQLSTATE: message" of its error.
sqlstate_of() {
	psql -X -q -t -A -d "$1" -v VERBOSITY=sqlstate -c "$2" 2>&1 | sed 's/^ERROR:  //'
}
error_of() {
	psql -X -q -t -A -d "$1" -c "$2" 2>&1 | sed -n 's/^ERROR:  //p'
}

# ---------- checkpoint files that are not regular files ----------

# A copy of a checkpoint whose file $2 is replaced by something of kind $3.
make_checkpoint() {
	local dir=$work/$1 file=$2 kind=$3
	mkdir -p "$dir"
	cp "$MODELS/flex_olmo_f32"/* "$dir/"
	rm -f "$dir/$file"
	case $kind in
	fifo) mkfifo "$dir/$file" ;;
	directory) mkdir "$dir/$file" ;;
	device) ln -s /dev/zero "$dir/$file" ;;
	socket) /usr/bin/python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$dir/$file" ;;
	esac
	chmod -R a+rX "$dir"
}

for file in config.json tokenizer.json model.safetensors; do
	make_checkpoint "fifo-$file" "$file" fifo
	start=$(date +%s)
	out=$(timeout 20 psql -X -q -t -A -d $db \
		-c "SELECT flexmore_import('fifo', '$work/fifo-$file')" 2>&1)
	elapsed=$(($(date +%s) - start))
	check "FIFO $file rejected" \
		"ERROR:  file \"$work/fifo-$file/$file\" is not a regular file" "$(head -n 1 <<<"$out")"
	check "FIFO $file detail" "DETAIL:  It is a FIFO." "$(sed -n 2p <<<"$out")"
	check "FIFO $file rejected at once" "t" "$([ $elapsed -lt 5 ] && echo t || echo f)"
done
check "FIFO SQLSTATE" "42809" \
	"$(sqlstate_of $db "SELECT flexmore_import('fifo', '$work/fifo-config.json')" | cut -d: -f1)"

for kind in directory device socket; do
	make_checkpoint "$kind" model.safetensors "$kind"
	check "$kind rejected" "file \"$work/$kind/model.safetensors\" is not a regular file" \
		"$(error_of $db "SELECT flexmore_import('odd', '$work/$kind')")"
done

# A symbolic link to a regular file is a regular file, as in Hugging
# Face's cache, whose snapshot folders link to blobs.
mkdir -p "$work/linked"
for f in "$MODELS/flex_olmo_f32"/*; do ln -s "$f" "$work/linked/$(basename "$f")"; done
check "symbolic links to files import" "t" \
	"$(q $db "SELECT flexmore_import('linked', '$work/linked') > 0")"
check "nothing left of rejected files" "linked" "$(q $db "SELECT string_agg(name, ',') FROM flexmore_models")"

# The client command rejects the FIFO itself, before it connects.
out=$(timeout 20 "$client" -d $db fifo "$work/fifo-model.safetensors" 2>&1)
status=$?
check "client rejects FIFO" \
	"flexmore-import: file \"$work/fifo-model.safetensors/model.safetensors\" is not a regular file: it is a FIFO" \
	"$out"
check "client exits 1 on FIFO" "1" "$status"

# flexmore_add_expert reads files through the same code.
q $db "SELECT flexmore_import('base', '$MODELS/packages/base_full')" >/dev/null
mkdir "$work/pkg-fifo"
cp "$MODELS/packages/pkg_full"/* "$work/pkg-fifo/"
rm "$work/pkg-fifo/config.json"
mkfifo "$work/pkg-fifo/config.json"
chmod -R a+rX "$work/pkg-fifo"
check "add_expert rejects FIFO" "file \"$work/pkg-fifo/config.json\" is not a regular file" \
	"$(timeout 20 psql -X -q -t -A -d $db -c "SELECT flexmore_add_expert('base', '$work/pkg-fifo')" 2>&1 | sed -n 's/^ERROR:  //p')"

# ---------- two sessions on one model name ----------

# concurrent A_SQL B_SQL: session A takes the lock and holds its
# transaction open; B starts and must wait; then A commits.  Prints B's
# output.  A holds for 3 s, far longer than B needs to reach the lock.
concurrent() {
	local a_sql=$1 b_sql=$2 b_out=$work/b.out
	psql -X -q -t -A -d $db -c "BEGIN" -c "$a_sql" -c "SELECT pg_sleep(3)" -c "COMMIT" \
		>"$work/a.out" 2>&1 &
	local a_pid=$!
	sleep 1
	psql -X -q -t -A -d $db -c "$b_sql" >"$b_out" 2>&1
	wait $a_pid
	cat "$b_out"
}

import_sql() {
	echo "SELECT flexmore_import('race', '$MODELS/flex_olmo_f32', replace => $1) > 0"
}

q $db "SELECT flexmore_drop_model('race')" >/dev/null 2>&1
out=$(concurrent "$(import_sql false)" "$(import_sql false)")
check "loser of two imports gets 42710" 'ERROR:  model "race" already exists' "$(head -n 1 <<<"$out")"
check "winner of two imports succeeded" "t" "$(head -n 1 "$work/a.out")"
check "one model after two imports" "1|1" "$(q $db "SELECT count(*), max(generation) FROM flexmore_models WHERE name = 'race'")"

out=$(concurrent "$(import_sql true)" "$(import_sql true)")
check "concurrent replace succeeds" "t" "$out"
check "two replaces bump the generation twice" "3" \
	"$(q $db "SELECT generation FROM flexmore_models WHERE name = 'race'")"

out=$(concurrent "SELECT flexmore_drop_model('race')" "$(import_sql false)")
check "import after a concurrent drop" "t" "$out"
check "model imported anew after the drop" "1" \
	"$(q $db "SELECT generation FROM flexmore_models WHERE name = 'race'")"

out=$(concurrent "$(import_sql true)" "SELECT flexmore_drop_model('race')")
check "drop after a concurrent replace" "" "$out"
check "no model after the drop" "0" "$(q $db "SELECT count(*) FROM flexmore_models WHERE name = 'race'")"

# An expert change waits for a replace of its model, then changes the new model.
q $db "SELECT flexmore_import('race_base', '$MODELS/packages/base_full')" >/dev/null
out=$(concurrent "SELECT flexmore_import('race_base', '$MODELS/packages/base_full', replace => true) > 0" \
	"SELECT flexmore_add_expert('race_base', '$MODELS/packages/pkg_full')")
check "add_expert after a concurrent replace" "3" "$out"
check "expert added to the replacing model" "3|4" \
	"$(q $db "SELECT generation, experts FROM flexmore_models WHERE name = 'race_base'")"

# In REPEATABLE READ the waiter's snapshot predates the winner's commit:
# a serialization failure, not a unique violation.
out=$(concurrent "$(import_sql false)" \
	"BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1; $(import_sql false); COMMIT")
check "REPEATABLE READ loser gets 40001" \
	'ERROR:  could not import model "race": another transaction imported it concurrently' \
	"$(grep '^ERROR' <<<"$out")"
q $db "SELECT flexmore_drop_model('race')" >/dev/null

# ---------- cancelling the tokenization of a huge text ----------

# 100 MB of text, 50 million tokens: statement_timeout stops it promptly.
q $db "SELECT flexmore_import('tok', '$MODELS/flex_olmo_f32')" >/dev/null
start=$(date +%s%N)
out=$(psql -X -q -t -A -d $db -v VERBOSITY=sqlstate \
	-c "SET statement_timeout = '1s'" \
	-c "SELECT array_length(flexmore_tokenize('tok', repeat(' a', 50000000)), 1)" 2>&1)
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
echo "  tokenize of 100 MB canceled after $elapsed_ms ms"
check "huge tokenize canceled with 57014" "ERROR:  57014" "$out"
check "huge tokenize canceled within 3 s" "t" "$([ $elapsed_ms -lt 3000 ] && echo t || echo f)"

# A generation prompt longer than the context fails with the context
# error.  The tokenizer stops at the first id past the context, but only
# after its pre-tokenizer has split the whole text, so a 100 MB prompt
# takes seconds: statement_timeout bounds it, and a 1 MB one is quick.
start=$(date +%s%N)
out=$(error_of $db "SELECT flexmore_generate('tok', repeat(' a', 500000), 1)")
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
echo "  1 MB prompt rejected after $elapsed_ms ms"
check "long prompt rejected" "prompt has more tokens than the context of 128 tokens" "$out"
check "long prompt rejected within 1 s" "t" "$([ $elapsed_ms -lt 1000 ] && echo t || echo f)"
start=$(date +%s%N)
out=$(psql -X -q -t -A -d $db -v VERBOSITY=sqlstate \
	-c "SET statement_timeout = '1s'" \
	-c "SELECT flexmore_generate('tok', repeat(' a', 50000000), 1)" 2>&1)
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
echo "  100 MB prompt canceled after $elapsed_ms ms"
check "huge prompt canceled with 57014" "ERROR:  57014" "$out"
check "huge prompt canceled within 3 s" "t" "$([ $elapsed_ms -lt 3000 ] && echo t || echo f)"
check "session usable after the cancel" "{64}" "$(q $db "SELECT flexmore_tokenize('tok', 'a')")"

psql -X -q -d postgres -c "DROP DATABASE $db"
finish
