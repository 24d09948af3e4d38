#!/bin/bash
# Expert governance against the float64 reference.  Roles with different
# expert grants get exactly the logits of a superuser call restricted to
# their permitted experts, and those equal test/model/reference.py with
# that mask within 1e-4 of max |ref|.  Revoking and granting again take
# effect at once, also in a session that stays open.  A disabled or
# withdrawn expert never appears in flexmore_route, whose choices match
# the reference's routing.  Grants follow a rename, go with a removed
# expert, and survive a re-import, pg_dump and the update from 0.1.0.  The usage counters equal token counts
# from flexmore_tokenize and from flexmore_route, per connection on the
# main cluster, and shared between connections and in read-only
# transactions on a second cluster with flexmore in
# shared_preload_libraries (FLEXMORE_GOVERNANCE_TEST_PORT, default 55535,
# and FLEXMORE_GOVERNANCE_TEST_DIR, default /tmp/flexmore-governance-test).
# Runs as root (the second server runs as postgres).
set -u
. "$(dirname "$0")/common.sh"
root=$(cd "$(dirname "$0")/../.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ckpt=$MODELS/flex_olmo_f32
db=flexmore_governance
ids="5,17,42,99,123,7,250,3"

psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
psql -X -q -d postgres -c "CREATE DATABASE $db"
for r in regress_gov_a regress_gov_b regress_gov_team; do
	psql -X -q -d postgres -c "DROP ROLE IF EXISTS $r" >/dev/null 2>&1
done
q $db "CREATE ROLE regress_gov_team; CREATE ROLE regress_gov_a IN ROLE regress_gov_team; CREATE ROLE regress_gov_b" >/dev/null
q $db "CREATE EXTENSION flexmore" >/dev/null
q $db "SELECT flexmore_import('gov', '$ckpt')" >/dev/null

# A: public and expert_1 through regress_gov_team, expert_2 directly.  B: expert_3.
q $db "SELECT flexmore_revoke_expert('gov', e, 'PUBLIC') FROM unnest(ARRAY['public','expert_1','expert_2','expert_3']) e" >/dev/null
q $db "SELECT flexmore_grant_expert('gov', 'public', 'regress_gov_team'),
              flexmore_grant_expert('gov', 'expert_1', 'regress_gov_team'),
              flexmore_grant_expert('gov', 'expert_2', 'regress_gov_a'),
              flexmore_grant_expert('gov', 'expert_3', 'regress_gov_b')" >/dev/null

# as_role ROLE SQL: runs SQL in $db after SET ROLE ROLE.
as_role() {
	psql -X -q -t -A -v ON_ERROR_STOP=1 -d $db -c "SET client_min_messages = warning" \
		-c "SET ROLE $1" -c "$2" 2>&1
}

logits_sql() {
	local experts=${1:-NULL}
	echo "SELECT array_to_json(flexmore_logits('gov', ARRAY[$ids], $experts))"
}

# reference_close EXPERTS JSON: "close" when JSON is within 1e-4 of max |ref|
# of the reference's logits with exactly EXPERTS (comma-separated) allowed.
reference_close() {
	local ref
	ref=$(/usr/bin/python3 "$root/test/model/reference.py" "$ckpt" --ids "$ids" --experts "$1") || {
		echo "reference failed"
		return
	}
	/usr/bin/python3 -c '
import json, sys
ref = json.loads(sys.argv[1]); got = json.loads(sys.argv[2])
scale = max(abs(x) for x in ref)
err = max(abs(a - b) for a, b in zip(ref, got)) if len(ref) == len(got) else float("inf")
print("close" if err <= 1e-4 * scale else "error %.3g of max |ref| %.3g" % (err, scale))' "$ref" "$2"
}

sqlstate_of() {
	psql -X -q -t -A -d $db -v VERBOSITY=sqlstate -c "SET client_min_messages = warning" \
		-c "SET ROLE $1" -c "$2" 2>&1 | sed -nE 's/^ERROR: +([0-9A-Z]{5})$/\1/p' | tail -n 1
}

# ---------- logits per role against the superuser and the reference ----------

a_logits=$(as_role regress_gov_a "$(logits_sql)")
a_super=$(q $db "$(logits_sql "ARRAY['public','expert_1','expert_2']")")
check "role A logits equal superuser with A's experts" "$a_super" "$a_logits"
check "A's experts match the reference" close "$(reference_close public,expert_1,expert_2 "$a_super")"

b_logits=$(as_role regress_gov_b "$(logits_sql)")
b_super=$(q $db "$(logits_sql "ARRAY['expert_3']")")
check "role B logits equal superuser with B's expert" "$b_super" "$b_logits"
check "B's expert matches the reference" close "$(reference_close expert_3 "$b_super")"

all_super=$(q $db "$(logits_sql)")
check "superuser uses every expert" close "$(reference_close public,expert_1,expert_2,expert_3 "$all_super")"

# The experts argument narrows A's set and never widens it.
a_narrow=$(as_role regress_gov_a "$(logits_sql "ARRAY['public','expert_3']")")
a_public=$(q $db "$(logits_sql "ARRAY['public']")")
check "experts argument cannot widen A's set" "$a_public" "$a_narrow"
check "A asking only for B's expert" 42501 "$(sqlstate_of regress_gov_a "$(logits_sql "ARRAY['expert_3']")")"
check "A in error mode with experts NULL" 42501 \
	"$(sqlstate_of regress_gov_a "SET flexmore.expert_access = 'error'; $(logits_sql)")"
a_error_ok=$(as_role regress_gov_a "SET flexmore.expert_access = 'error'; $(logits_sql "ARRAY['public','expert_1','expert_2']")")
check "A in error mode naming only its experts" "$a_super" "$a_error_ok"

# ---------- revoking and granting again, in a session that stays open ----------

coproc SESSION { psql -X -q -t -A -d $db 2>&1; }
session_pid=$SESSION_PID
# in_session SQL: runs SQL (one statement or a psql command) in the open
# session and prints its output.
in_session() {
	local line out=""
	printf '%s;\n\\echo __done__\n' "$1" >&"${SESSION[1]}"
	while IFS= read -r line <&"${SESSION[0]}"; do
		[ "$line" = __done__ ] && break
		out+="$line"
	done
	echo "$out"
}
in_session "SET client_min_messages = warning; SET ROLE regress_gov_a;" >/dev/null
check "open session as A before revoke" "$a_super" "$(in_session "$(logits_sql)")"
q $db "SELECT flexmore_revoke_expert('gov', 'expert_2', 'regress_gov_a')" >/dev/null
a_revoked=$(q $db "$(logits_sql "ARRAY['public','expert_1']")")
check "open session sees the revoke at once" "$a_revoked" "$(in_session "$(logits_sql)")"
check "revoked set matches the reference" close "$(reference_close public,expert_1 "$a_revoked")"
q $db "SELECT flexmore_grant_expert('gov', 'expert_2', 'regress_gov_a')" >/dev/null
check "open session sees the grant at once" "$a_super" "$(in_session "$(logits_sql)")"
# Revoking from the team removes what A has through membership.
q $db "SELECT flexmore_revoke_expert('gov', 'expert_1', 'regress_gov_team')" >/dev/null
check "revoke from a role A is member of" "$(q $db "$(logits_sql "ARRAY['public','expert_2']")")" \
	"$(in_session "$(logits_sql)")"
q $db "SELECT flexmore_grant_expert('gov', 'expert_1', 'regress_gov_team')" >/dev/null

# ---------- disabled and withdrawn experts are never routed to ----------

text="Alle mennesker er født frie og lige i værdighed og rettigheder."
route_count() {
	q $db "SELECT count(*) FROM flexmore_route('gov', '$text') WHERE '$1' = ANY (experts)"
}
check "expert_3 is routed to while enabled" t "$([ "$(route_count expert_3)" -gt 0 ] && echo t || echo f)"
q $db "SELECT flexmore_disable_expert('gov', 'expert_3')" >/dev/null
check "open session: disabled expert is absent" 0 \
	"$(in_session "RESET ROLE; SELECT count(*) FROM flexmore_route('gov', '$text') WHERE 'expert_3' = ANY (experts)")"
check "disabled expert is never routed to" 0 "$(route_count expert_3)"
check "B has no expert left while expert_3 is disabled" 42501 "$(sqlstate_of regress_gov_b "$(logits_sql)")"
check "disabled logits equal the other three" "$(q $db "$(logits_sql "ARRAY['public','expert_1','expert_2']")")" \
	"$(q $db "$(logits_sql)")"
q $db "SELECT flexmore_enable_expert('gov', 'expert_3')" >/dev/null
q $db "SELECT flexmore_expert_set('gov', 'expert_1', consent => 'withdrawn')" >/dev/null
check "withdrawn expert is never routed to" 0 "$(route_count expert_1)"
q $db "SELECT flexmore_expert_set('gov', 'expert_1', consent => 'granted')" >/dev/null
echo '\q' >&"${SESSION[1]}"
wait "$session_pid" 2>/dev/null

# The routing audit against the reference's routing with expert_2 excluded.
route_ids=$(q $db "SELECT array_to_string(flexmore_tokenize('gov', '$text'), ',')")
route_got=$(q $db "SELECT json_agg(json_build_array(position, layer, experts, weights) ORDER BY position, layer)
	FROM flexmore_route('gov', '$text', ARRAY['public','expert_1','expert_3'])")
route_ref=$(/usr/bin/python3 "$root/test/model/reference.py" "$ckpt" --ids "$route_ids" --route \
	--experts public,expert_1,expert_3)
route_cmp=$(/usr/bin/python3 -c '
import json, sys
got = json.loads(sys.argv[1]); ref = json.loads(sys.argv[2])
if len(got) != len(ref):
    print("rows %d, reference %d" % (len(got), len(ref))); sys.exit()
for g, r in zip(got, ref):
    if g[0] != r[0] or g[1] != r[1] or g[2] != r[2]:
        print("position %d layer %d: %s, reference %s" % (r[0], r[1], g[2], r[2])); sys.exit()
    if max(abs(a - b) for a, b in zip(g[3], r[3])) > 1e-4:
        print("position %d layer %d: weights %s, reference %s" % (r[0], r[1], g[3], r[3])); sys.exit()
print("same")' "$route_got" "$route_ref")
check "flexmore_route matches the reference routing" same "$route_cmp"
check "flexmore_route has a row per position and layer" \
	"$(( $(tr ',' '\n' <<<"$route_ids" | grep -c .) * 2 ))" \
	"$(q $db "SELECT count(*) FROM flexmore_route('gov', '$text')")"

# ---------- usage counters, per connection without preloading ----------

usage_text="Hej verden, dette er en test."
n_tokens=$(q $db "SELECT array_length(flexmore_tokenize('gov', '$usage_text'), 1)")
# Exactly num_experts_per_tok (2) experts: every token goes to both in every layer.
usage=$(as_role regress_gov_a "RESET ROLE; SELECT flexmore_expert_usage_reset(); SET ROLE regress_gov_a;
	SELECT flexmore_logits('gov', flexmore_tokenize('gov', '$usage_text'), ARRAY['public','expert_2']) IS NOT NULL;
	SELECT flexmore_logits('gov', flexmore_tokenize('gov', '$usage_text'), ARRAY['public','expert_2']) IS NOT NULL;
	RESET ROLE;
	SELECT string_agg(expert || ':' || calls || ':' || tokens, ' ' ORDER BY expert)
	FROM flexmore_expert_usage WHERE role = 'regress_gov_a' AND model = 'gov'" | tail -n 1)
check "usage counts tokens from flexmore_tokenize" "expert_2:2:$((2 * n_tokens)) public:2:$((2 * n_tokens))" "$usage"

# flexmore_route's own rows give each expert's token positions.
usage_route=$(as_role regress_gov_a "RESET ROLE; SELECT flexmore_expert_usage_reset(); SET ROLE regress_gov_a;
	CREATE TEMP TABLE r AS SELECT * FROM flexmore_route('gov', '$text');
	SELECT string_agg(e || ':1:' || n, ' ' ORDER BY e)
	FROM (SELECT e, count(DISTINCT position) AS n FROM r, unnest(experts) e GROUP BY e) s;
	RESET ROLE;
	SELECT string_agg(expert || ':' || calls || ':' || tokens, ' ' ORDER BY expert)
	FROM flexmore_expert_usage WHERE role = 'regress_gov_a' AND model = 'gov'" | tail -n 2)
check "usage equals the positions flexmore_route shows" "$(head -n 1 <<<"$usage_route")" \
	"$(tail -n 1 <<<"$usage_route")"

# Generation feeds the prompt and every completion token but the last.
usage_gen=$(as_role regress_gov_a "RESET ROLE; SELECT flexmore_expert_usage_reset(); SET ROLE regress_gov_a;
	SELECT finish_reason || ' ' || (prompt_tokens + completion_tokens - 1)
	FROM flexmore_generate_detail('gov', '$usage_text', max_tokens => 5,
								  experts => ARRAY['public','expert_1']);
	RESET ROLE;
	SELECT 'max_tokens ' || tokens FROM flexmore_expert_usage
	WHERE role = 'regress_gov_a' AND expert = 'public'" | tail -n 2)
check "usage of a generation" "$(head -n 1 <<<"$usage_gen")" "$(tail -n 1 <<<"$usage_gen")"
# The scoring functions count the rows they run: flexmore_embed the
# input's tokens, flexmore_score a boundary id before them, and a batch
# counts as one call.
usage_scoring=$(as_role regress_gov_a "RESET ROLE; SELECT flexmore_expert_usage_reset(); SET ROLE regress_gov_a;
	SELECT flexmore_embed('gov', '$usage_text', ARRAY['public','expert_2']) IS NOT NULL;
	RESET ROLE;
	SELECT calls || ':' || tokens FROM flexmore_expert_usage WHERE role = 'regress_gov_a' AND expert = 'public';
	SELECT flexmore_expert_usage_reset(); SET ROLE regress_gov_a;
	SELECT flexmore_score('gov', '$usage_text', ARRAY['public','expert_2']) IS NOT NULL;
	RESET ROLE;
	SELECT calls || ':' || tokens FROM flexmore_expert_usage WHERE role = 'regress_gov_a' AND expert = 'public';
	SELECT flexmore_expert_usage_reset(); SET ROLE regress_gov_a;
	SELECT count(*) FROM flexmore_score_batch('gov', ARRAY[1, 2, 3], ARRAY['$usage_text', '$usage_text', '$usage_text'],
											  ARRAY['public','expert_2']);
	RESET ROLE;
	SELECT calls || ':' || tokens FROM flexmore_expert_usage WHERE role = 'regress_gov_a' AND expert = 'public'" |
	grep -E '^[0-9]+:[0-9]+$')
check "usage of flexmore_embed" "1:$n_tokens" "$(sed -n 1p <<<"$usage_scoring")"
check "usage of flexmore_score" "1:$((n_tokens + 1))" "$(sed -n 2p <<<"$usage_scoring")"
check "usage of flexmore_score_batch" "1:$((3 * (n_tokens + 1)))" "$(sed -n 3p <<<"$usage_scoring")"

check "a plain role cannot read the usage view" 42501 \
	"$(sqlstate_of regress_gov_b "SELECT count(*) FROM flexmore_expert_usage")"

# ---------- rename, remove, re-import ----------

q $db "SELECT flexmore_rename_expert('gov', 'expert_2', 'medical')" >/dev/null
check "grant follows a rename" "$a_super" "$(as_role regress_gov_a "$(logits_sql)")"
check "renamed expert in the view" "medical|{regress_gov_a}" \
	"$(q $db "SELECT expert, grantees FROM flexmore_experts WHERE model = 'gov' AND expert_index = 2")"
check "renamed expert in flexmore_route" t \
	"$(q $db "SELECT bool_or('medical' = ANY (experts)) FROM flexmore_route('gov', '$text')")"
q $db "SELECT flexmore_rename_expert('gov', 'medical', 'expert_2')" >/dev/null

q $db "SELECT flexmore_expert_set('gov', 'expert_2', owner => 'Hospital A', licence => 'CC-BY-4.0')" >/dev/null
q $db "SELECT flexmore_import('gov', '$ckpt', replace => true)" >/dev/null
check "re-import keeps grants and metadata" "expert_2|{regress_gov_a}|Hospital A|CC-BY-4.0" \
	"$(q $db "SELECT expert, grantees, owner, licence FROM flexmore_experts WHERE model = 'gov' AND expert_index = 2")"
check "re-import keeps A's logits" "$a_super" "$(as_role regress_gov_a "$(logits_sql)")"

q $db "SELECT flexmore_remove_expert('gov', 'expert_3')" >/dev/null
check "removed expert's grants are gone" 0 \
	"$(q $db "SELECT count(*) FROM flexmore.expert_grants WHERE expert_name = 'expert_3'")"
check "B has no expert left after the removal" 42501 "$(sqlstate_of regress_gov_b "$(logits_sql)")"
check "A keeps its experts after the removal" "$a_super" "$(as_role regress_gov_a "$(logits_sql)")"

# ---------- pg_dump carries grants and metadata ----------

restored=${db}_restored
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $restored" >/dev/null 2>&1
psql -X -q -d postgres -c "CREATE DATABASE $restored"
pg_dump -Fc -d $db -f "/tmp/$db.dump"
pg_restore -d $restored "/tmp/$db.dump" 2>&1 | grep -v '^$'
rm -f "/tmp/$db.dump"
experts_sql="SELECT string_agg(expert || ' ' || grantees::text || ' ' || coalesce(owner, '-') || ' '
	|| enabled || ' ' || consent, '; ' ORDER BY expert_index) FROM flexmore_experts"
check "pg_dump and pg_restore keep governance" "$(q $db "$experts_sql")" "$(q $restored "$experts_sql")"
psql -X -q -d postgres -c "DROP DATABASE $restored"

# ---------- update from 0.1.0 ----------

old_db=${db}_from_010
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $old_db" >/dev/null 2>&1
psql -X -q -d postgres -c "CREATE DATABASE $old_db"
q $old_db "CREATE EXTENSION flexmore VERSION '0.1.0'" >/dev/null
q $old_db "SELECT flexmore_import('gov', '$ckpt')" >/dev/null
check "0.1.0 schema: every expert usable" "$all_super" "$(q $old_db "$(logits_sql)")"
q $old_db "ALTER EXTENSION flexmore UPDATE TO '0.2.0'" >/dev/null
check "update grants existing experts to PUBLIC" 	"public {PUBLIC}; expert_1 {PUBLIC}; expert_2 {PUBLIC}; expert_3 {PUBLIC}" 	"$(q $old_db "SELECT string_agg(expert || ' ' || grantees::text, '; ' ORDER BY expert_index) FROM flexmore_experts")"
check "updated model gives the same logits to a plain role" "$all_super" 	"$(psql -X -q -t -A -d $old_db -c "SET client_min_messages = warning" -c "SET ROLE regress_gov_b" -c "$(logits_sql)")"
psql -X -q -d postgres -c "DROP DATABASE $old_db"

# ---------- shared counters on a cluster with flexmore preloaded ----------

base=${FLEXMORE_GOVERNANCE_TEST_DIR:-/tmp/flexmore-governance-test}
port=${FLEXMORE_GOVERNANCE_TEST_PORT:-55535}
main_host=$PGHOST
main_port=$PGPORT
stop_preloaded() {
	[ -f "$base/data/postmaster.pid" ] &&
		su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$base/data' -m fast -w stop" >/dev/null
}
stop_preloaded
rm -rf "$base"
mkdir -p "$base"
chown postgres:postgres "$base"
su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$base/data' -E UTF8 --locale=C.UTF-8 -A trust -U postgres" >"$base/initdb.log" 2>&1
su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$base/data' -w -l '$base/server.log' \
	-o \"-p $port -k '$base' -c listen_addresses='' -c shared_preload_libraries=flexmore -c flexmore.cache_size=64MB\" start" >/dev/null
export PGHOST=$base PGPORT=$port
trap stop_preloaded EXIT

psql -X -q -d postgres -c "CREATE DATABASE $db"
q $db "CREATE ROLE regress_gov_a" >/dev/null
q $db "CREATE EXTENSION flexmore" >/dev/null
q $db "SELECT flexmore_import('gov', '$ckpt')" >/dev/null
q $db "SELECT flexmore_expert_usage_reset()" >/dev/null
# Three connections, one of them in a read-only transaction.
for tx in "" "" "BEGIN READ ONLY;"; do
	as_role regress_gov_a "$tx SELECT flexmore_logits('gov', flexmore_tokenize('gov', '$usage_text'), ARRAY['expert_1','expert_3']) IS NOT NULL" >/dev/null
done
check "shared usage over three connections" "expert_1:3:$((3 * n_tokens)) expert_3:3:$((3 * n_tokens))" \
	"$(q $db "SELECT string_agg(expert || ':' || calls || ':' || tokens, ' ' ORDER BY expert)
	FROM flexmore_expert_usage WHERE role = 'regress_gov_a'")"
q $db "SELECT flexmore_expert_usage_reset()" >/dev/null
check "reset empties the shared counters" 0 "$(q $db "SELECT count(*) FROM flexmore_expert_usage")"

stop_preloaded
trap - EXIT
export PGHOST=$main_host PGPORT=$main_port
psql -X -q -d postgres -c "DROP DATABASE $db"
for r in regress_gov_a regress_gov_b regress_gov_team; do
	psql -X -q -d postgres -c "DROP ROLE IF EXISTS $r" >/dev/null 2>&1
done
finish
