#!/bin/bash
# Upgrade path: installs flexmore 0.1.0, walks every ALTER EXTENSION
# flexmore UPDATE step to the default version, and compares the objects
# with a fresh install of the default version in another database:
# functions (signature, volatility, strictness, parallel safety, cost,
# rows, proconfig, security, ACL), tables and sequences (columns, types,
# defaults, not-null, storage, ACL), constraints, indexes, views'
# definitions, the extension's config-dump list and the description of
# every object that depends on the extension.  Each category is one test.
set -u
. "$(dirname "$0")/common.sh"

updated=flexmore_upgrade_updated
fresh=flexmore_upgrade_fresh
for db in $updated $fresh; do
	psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
	psql -X -q -d postgres -c "CREATE DATABASE $db"
done

default=$(q postgres "SELECT default_version FROM pg_available_extensions WHERE name = 'flexmore'")
q $updated "CREATE EXTENSION flexmore VERSION '0.1.0'" >/dev/null
check "0.1.0 installed" "0.1.0" "$(q $updated "SELECT extversion FROM pg_extension WHERE extname = 'flexmore'")"

# Every step of the update path, one ALTER EXTENSION each.
path=$(q $updated "SELECT path FROM pg_extension_update_paths('flexmore') WHERE source = '0.1.0' AND target = '$default'")
check "update path to $default exists" "t" "$([ -n "$path" ] && echo t || echo f)"
read -ra steps <<<"${path//--/ }"
for v in "${steps[@]:1}"; do
	out=$(q $updated "ALTER EXTENSION flexmore UPDATE TO '$v'" 2>&1)
	check "ALTER EXTENSION flexmore UPDATE TO '$v'" "" "$out"
done
check "updated to $default" "$default" "$(q $updated "SELECT extversion FROM pg_extension WHERE extname = 'flexmore'")"
q $fresh "CREATE EXTENSION flexmore" >/dev/null

# The members of the extension, as one text line each, per category.
declare -A queries
queries[functions]="
SELECT p.oid::regprocedure::text || ' returns ' || pg_get_function_result(p.oid)
	|| ' args ' || pg_get_function_arguments(p.oid)
	|| ' lang ' || l.lanname || ' volatile ' || p.provolatile::text || ' strict ' || p.proisstrict
	|| ' parallel ' || p.proparallel::text || ' cost ' || p.procost || ' rows ' || p.prorows
	|| ' secdef ' || p.prosecdef || ' leakproof ' || p.proleakproof
	|| ' config ' || coalesce(array_to_string(p.proconfig, ';'), '')
	|| ' src ' || p.prosrc || ' acl ' || coalesce(p.proacl::text, 'default')
FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'flexmore')"
queries[relations]="
SELECT c.oid::regclass::text || ' kind ' || c.relkind::text || ' persistence ' || c.relpersistence::text
	|| ' acl ' || coalesce(c.relacl::text, 'default')
	|| ' options ' || coalesce(array_to_string(c.reloptions, ';'), '')
FROM pg_class c WHERE c.relnamespace IN ('flexmore'::regnamespace, 'public'::regnamespace)
  AND c.relkind IN ('r', 'v', 'S', 'm', 'p')"
queries[columns]="
SELECT a.attrelid::regclass::text || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
	|| ' notnull ' || a.attnotnull || ' storage ' || a.attstorage::text || ' identity ' || a.attidentity::text
	|| ' generated ' || a.attgenerated::text || ' compression ' || a.attcompression::text
	|| ' default ' || coalesce(pg_get_expr(ad.adbin, ad.adrelid), '')
	|| ' acl ' || coalesce(a.attacl::text, 'default')
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
WHERE c.relnamespace IN ('flexmore'::regnamespace, 'public'::regnamespace)
  AND c.relkind IN ('r', 'v', 'm', 'p') AND a.attnum > 0 AND NOT a.attisdropped"
queries[constraints]="
SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'flexmore'::regnamespace"
queries[indexes]="
SELECT indexrelid::regclass::text || ' ' || pg_get_indexdef(indexrelid)
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
WHERE c.relnamespace IN ('flexmore'::regnamespace, 'public'::regnamespace)"
queries[views]="
SELECT c.oid::regclass::text || ' ' || pg_get_viewdef(c.oid)
FROM pg_class c WHERE c.relkind IN ('v', 'm')
  AND c.relnamespace IN ('flexmore'::regnamespace, 'public'::regnamespace)"
queries[schema]="
SELECT nspname || ' acl ' || coalesce(nspacl::text, 'default') FROM pg_namespace WHERE nspname = 'flexmore'"
queries[config_dump]="
SELECT cfg::regclass::text || ' condition ' || coalesce(e.extcondition[i], '')
FROM pg_extension e, unnest(e.extconfig) WITH ORDINALITY AS u(cfg, i)
WHERE e.extname = 'flexmore'"
queries[members]="
SELECT pg_describe_object(d.classid, d.objid, d.objsubid)
FROM pg_depend d
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'flexmore')"
queries[triggers]="
SELECT tgrelid::regclass::text || ' ' || pg_get_triggerdef(oid)
FROM pg_trigger WHERE NOT tgisinternal
  AND tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'flexmore'::regnamespace)"

for name in functions relations columns constraints indexes views schema config_dump members triggers; do
	sql="SELECT line FROM (${queries[$name]}) AS q(line) ORDER BY 1"
	a=$(q $updated "$sql")
	b=$(q $fresh "$sql")
	if [ "$a" = "$b" ]; then
		check "$name identical ($(grep -c . <<<"$a") lines)" same same
	else
		check "$name identical" same different
		diff <(echo "$a") <(echo "$b") | sed 's/^</  updated:/; s/^>/  fresh:  /' | grep -v '^---' | head -n 40
	fi
done

# EXECUTE that a DBA took from PUBLIC and gave to one role on the 0.1.0
# generation functions stays so after the update, which recreates them.
kept=flexmore_upgrade_grants
q postgres "SET client_min_messages = warning; DROP DATABASE IF EXISTS $kept" >/dev/null
q postgres "CREATE DATABASE $kept"
q postgres "SET client_min_messages = warning; DROP ROLE IF EXISTS regress_flexmore_upgrade_writer;
	CREATE ROLE regress_flexmore_upgrade_writer" >/dev/null
q $kept "CREATE EXTENSION flexmore VERSION '0.1.0';
	REVOKE EXECUTE ON FUNCTION flexmore_generate(text, text, int, float8, float8, int, bigint, text[]) FROM PUBLIC;
	GRANT EXECUTE ON FUNCTION flexmore_generate(text, text, int, float8, float8, int, bigint, text[])
		TO regress_flexmore_upgrade_writer" >/dev/null
# The installed library serves the 0.1.0 declarations, which lack the
# last argument, until the update; generation must work with the default.
# Reading the missing argument is undefined, so without the PG_NARGS
# check this fails only when the memory past the arguments is not 1.
q $kept "SET client_min_messages = warning;
	SELECT flexmore_import('gen', '$FLEXMORE_TEST_MODELS/flex_olmo_f32')" >/dev/null
before=$(q $kept "SET client_min_messages = warning;
	SELECT flexmore_generate('gen', 'hello world', 6) || '|' || completion_tokens
	FROM flexmore_generate_detail('gen', 'hello world', 6)")
q $kept "ALTER EXTENSION flexmore UPDATE" >/dev/null
check "generation at 0.1.0 equals generation after the update" "$before" \
	"$(q $kept "SET client_min_messages = warning;
		SELECT flexmore_generate('gen', 'hello world', 6) || '|' || completion_tokens
		FROM flexmore_generate_detail('gen', 'hello world', 6)")"
new_sig="flexmore_generate(text, text, int, float8, float8, int, bigint, text[], float8)"
check "revoked EXECUTE stays revoked after the update" "f" \
	"$(q $kept "SELECT has_function_privilege('public', '$new_sig', 'EXECUTE')")"
check "granted EXECUTE stays granted after the update" "t" \
	"$(q $kept "SELECT has_function_privilege('regress_flexmore_upgrade_writer', '$new_sig', 'EXECUTE')")"
check "untouched detail function keeps the default ACL" "t" \
	"$(q $kept "SELECT proacl IS NULL FROM pg_proc
		WHERE oid = 'flexmore_generate_detail(text, text, int, float8, float8, int, bigint, text[], float8)'::regprocedure")"

for db in $updated $fresh $kept; do
	psql -X -q -d postgres -c "DROP DATABASE $db"
done
q postgres "DROP ROLE regress_flexmore_upgrade_writer" >/dev/null
finish
