#!/bin/bash
# A LATIN1 database: Danish text crosses the SQL boundary in LATIN1, and
# the tokenizer receives UTF-8.  Needs the flex_olmo_f32 checkpoint.
set -u
. "$(dirname "$0")/common.sh"

db=flexmore_latin1
udb=flexmore_latin1_ref
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $udb" >/dev/null
psql -X -q -d postgres -c "CREATE DATABASE $udb TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
q $udb "CREATE EXTENSION flexmore" >/dev/null
q $udb "SELECT flexmore_import('m', '$MODELS/flex_olmo_f32')" >/dev/null
psql -X -q -d postgres -c "CREATE DATABASE $db TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
export PGCLIENTENCODING=UTF8

q $db "CREATE EXTENSION flexmore" >/dev/null
check "import" "t" "$(q $db "SELECT flexmore_import('m', '$MODELS/flex_olmo_f32') > 0")"
check "database encoding" "LATIN1" "$(q $db "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = current_database()")"

danish='rødgrød med fløde på æblerne, Ærø og Åbenrå'
check "danish round trip" "$danish" \
	"$(q $db "SELECT flexmore_detokenize('m', flexmore_tokenize('m', '$danish'))")"

# Same ids as in a UTF-8 database: the tokenizer receives the same UTF-8 bytes.
ids_latin1=$(q $db "SELECT flexmore_tokenize('m', '$danish')")
check "same ids as UTF-8" "$(q $udb "SELECT flexmore_tokenize('m', '$danish')")" "$ids_latin1"
check "ids for æ are two bytes" "2" "$(q $db "SELECT array_length(flexmore_tokenize('m', 'æ'), 1)")"

check "generate from a danish prompt" "t" \
	"$(q $db "SELECT flexmore_generate('m', 'Hvad er rødgrød?', 16) IS NOT NULL")"
check "sampled generation stays valid LATIN1" "t" \
	"$(q $db "SELECT bool_and(flexmore_generate('m', 'æøå', 24, temperature => 1.5, seed => s) IS NOT NULL) FROM generate_series(1, 20) s")"
# A character LATIN1 cannot hold becomes '?'.
ids_cjk=$(q $udb "SELECT flexmore_tokenize('m', 'a日b')")
check "unrepresentable character" "a?b" "$(q $db "SELECT flexmore_detokenize('m', '$ids_cjk')")"

q $db "SELECT flexmore_drop_model('m')" >/dev/null
psql -X -q -d postgres -c "DROP DATABASE $db"
psql -X -q -d postgres -c "DROP DATABASE $udb"
finish
