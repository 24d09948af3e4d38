#!/bin/bash
# The client command flexmore-import: imports through large objects in one
# transaction with the usual libpq connection options, gives the same
# model as a server-file import, rolls back completely on a hostile
# checkpoint, and adds an expert package.
set -u
. "$(dirname "$0")/common.sh"

client=$(pg_config --bindir)/flexmore-import
db=flexmore_client
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
psql -X -q -d postgres -c "CREATE DATABASE $db"
q $db "CREATE EXTENSION flexmore" >/dev/null

check "installed in pg_config --bindir" "t" "$([ -x "$client" ] && echo t || echo f)"

# -h -p -U -d, and a conninfo string in -d; no progress bar without a terminal.
out=$("$client" -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d $db c_sharded "$MODELS/sharded_gqa_bf16" 2>&1)
check "import with -h -p -U -d" "imported model \"c_sharded\"" "$(grep -o 'imported model "c_sharded"' <<<"$out")"
check "no progress bar off a terminal" "0" "$(grep -c '%' <<<"$out")"
out=$("$client" -d "dbname=$db application_name=flexmore_test" c_ranks "$MODELS/flexmore_ranks_f32" 2>&1)
check "import with a conninfo string" "imported model \"c_ranks\"" "$(grep -o 'imported model "c_ranks"' <<<"$out")"

q $db "SELECT flexmore_import('s_sharded', '$MODELS/sharded_gqa_bf16')" >/dev/null
q $db "SELECT flexmore_import('s_ranks', '$MODELS/flexmore_ranks_f32')" >/dev/null
for m in sharded ranks; do
	check "same logits as a server-file import ($m)" "t" \
		"$(q $db "SELECT flexmore_logits('c_$m', ARRAY[1, 2, 3]) = flexmore_logits('s_$m', ARRAY[1, 2, 3])")"
done
check "no large objects left" "0" "$(q $db "SELECT count(*) FROM pg_largeobject_metadata")"

# A hostile checkpoint: the server's message, exit status 1, nothing left.
out=$(PGDATABASE=$db "$client" c_bad "$MODELS/hostile/nan-weight" 2>&1)
status=$?
check "hostile checkpoint fails" "1" "$status"
check "hostile checkpoint message" \
	'flexmore-import: ERROR:  file "model.safetensors": tensor "model.layers.1.mlp.experts.2.down_proj.weight" has a non-finite value (NaN or infinity) at element 151 [3, 7]' \
	"$(head -n 1 <<<"$out")"
check "nothing half-imported" "0" "$(q $db "SELECT count(*) FROM flexmore_models WHERE name = 'c_bad'")"
check "no large objects after a failure" "0" "$(q $db "SELECT count(*) FROM pg_largeobject_metadata")"

# An existing name needs --replace.
out=$(PGDATABASE=$db "$client" c_ranks "$MODELS/flexmore_ranks_f32" 2>&1)
check "existing name rejected" 'flexmore-import: ERROR:  model "c_ranks" already exists' "$(head -n 1 <<<"$out")"
PGDATABASE=$db "$client" -r c_ranks "$MODELS/flexmore_ranks_f32" >/dev/null 2>&1
check "replace bumps the generation" "2" "$(q $db "SELECT generation FROM flexmore_models WHERE name = 'c_ranks'")"

# An expert package.
q $db "SELECT flexmore_import('c_base', '$MODELS/packages/base_full')" >/dev/null
q $db "SELECT flexmore_import('c_combined', '$MODELS/packages/combined_full')" >/dev/null
PGDATABASE=$db "$client" --add-expert c_base "$MODELS/packages/pkg_full" >/dev/null 2>&1
check "added expert gives the combined model" "t" \
	"$(q $db "SELECT flexmore_logits('c_base', ARRAY[5, 6]) = flexmore_logits('c_combined', ARRAY[5, 6])")"

# Usage errors.
"$client" >/dev/null 2>&1
check "missing arguments exit 1" "1" "$?"
out=$("$client" -d $db x /nonexistent 2>&1)
check "missing directory" 'flexmore-import: could not open directory "/nonexistent": No such file or directory' "$out"

psql -X -q -d postgres -c "DROP DATABASE $db"
finish
