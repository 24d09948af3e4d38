#!/bin/bash
# pg_dump / pg_restore keeps imported models: the restored model gives
# identical logits and generations, and later imports get fresh ids.
set -u
. "$(dirname "$0")/common.sh"

src=flexmore_dump_src
dst=flexmore_dump_dst
dump=$(mktemp /tmp/flexmore-dump.XXXXXX)
for db in $src $dst; do
	psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
	psql -X -q -d postgres -c "CREATE DATABASE $db"
done

q $src "CREATE EXTENSION flexmore" >/dev/null
q $src "SELECT flexmore_import('a', '$MODELS/flexmore_ranks_f32')" >/dev/null
q $src "SELECT flexmore_import('b', '$MODELS/sharded_gqa_bf16')" >/dev/null
# A model changed after its import: base_full plus an added expert.
q $src "SELECT flexmore_import('e', '$MODELS/packages/base_full')" >/dev/null
q $src "SELECT flexmore_add_expert('e', '$MODELS/packages/pkg_full', 'added')" >/dev/null
logits="SELECT md5(flexmore_logits('a', ARRAY[5, 6, 7, 8])::text) || md5(flexmore_logits('b', ARRAY[1, 2])::text)
	|| md5(flexmore_logits('e', ARRAY[5, 6, 7, 8])::text)"
gen="SELECT flexmore_generate('a', 'hello world', 20, temperature => 1, seed => 3)"
before_logits=$(q $src "$logits")
before_gen=$(q $src "$gen")

pg_dump -Fc -f "$dump" $src
pg_restore -d $dst "$dump"

check "models restored" "a b e" "$(q $dst "SELECT string_agg(name, ' ' ORDER BY name) FROM flexmore_models")"
check "identical logits" "$before_logits" "$(q $dst "$logits")"
check "identical generation" "$before_gen" "$(q $dst "$gen")"
check "added expert restored" "4 2 added" \
	"$(q $dst "SELECT experts || ' ' || generation || ' ' || (SELECT config -> 'expert_names' ->> 3 FROM flexmore.models WHERE name = 'e') FROM flexmore_models WHERE name = 'e'")"
check "chunks restored" "$(q $src "SELECT count(*) FROM flexmore.tensor_chunks")" \
	"$(q $dst "SELECT count(*) FROM flexmore.tensor_chunks")"
check "import after restore gets a new id" "t" \
	"$(q $dst "SELECT flexmore_import('c', '$MODELS/flex_olmo_f32') > (SELECT max(id) FROM flexmore.models WHERE name <> 'c')")"

rm -f "$dump"
for db in $src $dst; do
	psql -X -q -d postgres -c "DROP DATABASE $db"
done
finish
