-- Expert governance: metadata, enabling and disabling, renaming, grants
-- per role, flexmore.expert_access, the routing audit and the usage
-- counters, with every error they raise.  The numeric comparison with
-- the float64 reference is test/server/governance.sh.

\getenv models FLEXMORE_TEST_MODELS
-- The first weight load in a connection may print a NOTICE about
-- shared_preload_libraries, which depends on the server's settings.
SET client_min_messages = warning;
SELECT flexmore_import('gov', :'models' || '/flex_olmo_f32') > 0 AS imported;

-- A new model grants every expert to PUBLIC.
SELECT model, expert_index, expert, rank, owner, consent, enabled, grantees,
	   created = updated AS unchanged
FROM flexmore_experts WHERE model = 'gov' ORDER BY expert_index;
SELECT count(*) AS public_grants FROM flexmore.expert_grants WHERE grantee = 0::oid::regrole;

-- Metadata: NULL leaves a field, an empty string clears it.
SELECT flexmore_expert_set('gov', 'expert_1', owner => 'Hospital A', domain => 'medicine',
						   description => 'Clinical notes 2019-2023', licence => 'CC-BY-NC-4.0');
SELECT flexmore_expert_set('gov', 'expert_1', domain => '');
SELECT expert, owner, domain, description, licence, consent, updated > created AS updated
FROM flexmore_experts WHERE model = 'gov' AND expert = 'expert_1';
SELECT flexmore_expert_set('gov', 'expert_1', consent => 'revoked');
SELECT flexmore_expert_set('gov', NULL, owner => 'x');
SELECT flexmore_expert_set('nope', 'expert_1', owner => 'x');
SELECT flexmore_expert_set('gov', 'nope', owner => 'x');

-- Roles.  regress_gov_reader reaches expert_2 through regress_gov_team.
CREATE ROLE regress_gov_team;
CREATE ROLE regress_gov_reader IN ROLE regress_gov_team;
SELECT flexmore_revoke_expert('gov', 'expert_2', 'PUBLIC');
SELECT flexmore_revoke_expert('gov', 'expert_3', 'public');
SELECT flexmore_grant_expert('gov', 'expert_2', 'regress_gov_team');
SELECT flexmore_grant_expert('gov', 'expert_2', 'regress_gov_team');
SELECT flexmore_revoke_expert('gov', 'expert_3', 'regress_gov_team');
SELECT flexmore_grant_expert('gov', 'expert_2', 'regress_no_such_role');
SELECT expert, grantees FROM flexmore_experts WHERE model = 'gov' ORDER BY expert_index;

-- The reader's calls use public, expert_1 and expert_2, exactly.
CREATE TABLE reader_logits (experts text, logits real[]);
GRANT INSERT ON reader_logits TO regress_gov_reader;
SET ROLE regress_gov_reader;
INSERT INTO reader_logits SELECT 'null', flexmore_logits('gov', ARRAY[5, 17, 42, 99]);
INSERT INTO reader_logits
	SELECT 'named', flexmore_logits('gov', ARRAY[5, 17, 42, 99], ARRAY['public', 'expert_3']);
SELECT flexmore_logits('gov', ARRAY[5, 17, 42, 99], ARRAY['expert_3']);
SELECT count(*) AS rows_with_expert_3
FROM flexmore_route('gov', 'Hej verden') WHERE 'expert_3' = ANY (experts);
SET flexmore.expert_access = 'error';
SELECT flexmore_logits('gov', ARRAY[5, 17, 42, 99]);
SELECT flexmore_logits('gov', ARRAY[5, 17, 42, 99], ARRAY['public', 'expert_3']);
SELECT flexmore_logits('gov', ARRAY[5, 17, 42, 99], ARRAY['public', 'expert_2']) IS NOT NULL
	AS error_mode_named_ok;
RESET flexmore.expert_access;
SET flexmore.expert_access = 'deny';
RESET ROLE;
SELECT logits = flexmore_logits('gov', ARRAY[5, 17, 42, 99], ARRAY['public', 'expert_1', 'expert_2'])
	AS same_as_superuser_with_reader_experts
FROM reader_logits WHERE experts = 'null';
SELECT logits = flexmore_logits('gov', ARRAY[5, 17, 42, 99], ARRAY['public'])
	AS experts_argument_only_narrows
FROM reader_logits WHERE experts = 'named';

-- Disabled and withdrawn experts are left out for every role.
SELECT flexmore_disable_expert('gov', 'expert_1');
SELECT flexmore_expert_set('gov', 'expert_2', consent => 'withdrawn');
SELECT expert, consent, enabled FROM flexmore_experts WHERE model = 'gov' ORDER BY expert_index;
SELECT count(*) AS rows_with_off_experts
FROM flexmore_route('gov', 'Hej verden') WHERE experts && ARRAY['expert_1', 'expert_2'];
SET ROLE regress_gov_reader;
SELECT DISTINCT experts FROM flexmore_route('gov', 'Hej verden');
SET flexmore.expert_access = 'error';
SELECT flexmore_logits('gov', ARRAY[5, 17, 42, 99], ARRAY['expert_1']);
SELECT flexmore_logits('gov', ARRAY[5, 17, 42, 99], ARRAY['expert_2']);
RESET flexmore.expert_access;
SELECT flexmore_logits('gov', ARRAY[5, 17, 42, 99], ARRAY['expert_1', 'expert_2']);
RESET ROLE;
-- An expert the role was never granted reports the missing grant (42501),
-- even when its consent is also withdrawn.
SELECT flexmore_expert_set('gov', 'expert_3', consent => 'withdrawn');
SET ROLE regress_gov_reader;
SELECT flexmore_logits('gov', ARRAY[5, 17, 42, 99], ARRAY['expert_3']);
RESET ROLE;
SELECT flexmore_expert_set('gov', 'expert_3', consent => 'granted');
SELECT flexmore_revoke_expert('gov', 'public', 'PUBLIC');
SET ROLE regress_gov_reader;
SELECT flexmore_logits('gov', ARRAY[5, 17, 42, 99]);
RESET ROLE;
SELECT flexmore_disable_expert('gov', 'public');
SELECT flexmore_disable_expert('gov', 'expert_3');
SELECT flexmore_logits('gov', ARRAY[5, 17, 42, 99]);
SELECT flexmore_enable_expert('gov', e) FROM unnest(ARRAY['public', 'expert_1', 'expert_3']) e;
SELECT flexmore_expert_set('gov', 'expert_2', consent => 'granted');
SELECT flexmore_grant_expert('gov', 'public', 'PUBLIC');

-- The routing audit: one row per position and layer, k experts each,
-- weights highest first.
SELECT position, token_id, token, layer, cardinality(experts) AS k,
	   weights[1] >= weights[2] AS ordered, experts[1] <> experts[2] AS distinct_experts
FROM flexmore_route('gov', 'Hej') ORDER BY position, layer;
SELECT (SELECT count(*) FROM flexmore_route('gov', 'Hej verden'))
	 = 2 * array_length(flexmore_tokenize('gov', 'Hej verden'), 1) AS row_per_position_and_layer;
SELECT DISTINCT experts FROM flexmore_route('gov', 'Hej verden', ARRAY['expert_1', 'expert_3'])
ORDER BY 1;
SELECT count(*) AS empty_input FROM flexmore_route('gov', '');
SELECT count(*) AS null_input FROM flexmore_route('gov', NULL);
SELECT * FROM flexmore_route('gov', 'Hej', ARRAY[]::text[]);
SELECT * FROM flexmore_route('gov', 'Hej', ARRAY['nope']);

-- Renaming moves the grants and raises the generation.
SELECT generation AS generation_before FROM flexmore_models WHERE name = 'gov' \gset
SELECT flexmore_rename_expert('gov', 'expert_2', 'medical');
SELECT generation - :generation_before AS generation_raised FROM flexmore_models WHERE name = 'gov';
SELECT expert, grantees FROM flexmore_experts WHERE model = 'gov' AND expert_index = 2;
SELECT config -> 'expert_names' AS config_names FROM flexmore.models WHERE name = 'gov';
SELECT DISTINCT experts FROM flexmore_route('gov', 'Hej verden', ARRAY['public', 'medical'])
ORDER BY 1;
SELECT flexmore_rename_expert('gov', 'medical', 'expert_1');
SELECT flexmore_rename_expert('gov', 'medical', repeat('x', 64));
SELECT flexmore_rename_expert('gov', 'nope', 'other');

-- Removing an expert deletes its weights and its grants.
SELECT flexmore_remove_expert('gov', 'medical');
SELECT count(*) AS grants_left FROM flexmore.expert_grants WHERE expert_name = 'medical';
SELECT expert_index, expert, grantees FROM flexmore_experts WHERE model = 'gov' ORDER BY 1;

-- Usage counters: without preloading they are this connection's.  A
-- superuser passes every grant check, so expert_3 without grants runs.
SELECT flexmore_expert_usage_reset();
SELECT flexmore_logits('gov', flexmore_tokenize('gov', 'Hej verden'), ARRAY['public', 'expert_3'])
	IS NOT NULL AS ran;
SELECT model, expert, role = current_user AS mine, calls,
	   tokens = array_length(flexmore_tokenize('gov', 'Hej verden'), 1) AS tokens_match,
	   since IS NOT NULL AS has_since
FROM flexmore_expert_usage WHERE database = current_database() AND model = 'gov' ORDER BY expert;
SELECT flexmore_expert_usage_reset();
SELECT count(*) AS after_reset FROM flexmore_expert_usage WHERE database = current_database();

-- Privileges: the administration functions and the usage view.
SELECT p.proname, has_function_privilege('regress_gov_reader', p.oid, 'EXECUTE') AS reader_can_execute
FROM pg_proc p
WHERE p.proname IN ('flexmore_expert_set', 'flexmore_enable_expert', 'flexmore_disable_expert',
					'flexmore_rename_expert', 'flexmore_grant_expert', 'flexmore_revoke_expert',
					'flexmore_expert_usage_reset', 'flexmore_route', 'flexmore_expert_usage_entries')
ORDER BY 1;
SELECT has_table_privilege('regress_gov_reader', 'flexmore_experts', 'SELECT') AS reader_sees_experts,
	   has_table_privilege('regress_gov_reader', 'flexmore_expert_usage', 'SELECT') AS reader_sees_usage,
	   has_table_privilege('pg_read_all_stats', 'flexmore_expert_usage', 'SELECT') AS stats_sees_usage,
	   has_table_privilege('regress_gov_reader', 'flexmore.expert_grants', 'SELECT') AS reader_reads_grants;
SET ROLE regress_gov_reader;
SELECT flexmore_disable_expert('gov', 'expert_1');
SELECT count(*) FROM flexmore_expert_usage;
SELECT flexmore_expert_usage_reset();
RESET ROLE;

-- Members of pg_read_all_stats read the usage and cache views, which call
-- functions whose EXECUTE is checked against the querying role.
CREATE ROLE regress_gov_stats IN ROLE pg_read_all_stats;
SET ROLE regress_gov_stats;
SELECT count(*) >= 0 AS stats_reads_usage FROM flexmore_expert_usage;
SELECT count(*) >= 0 AS stats_reads_cache FROM flexmore_cache;
RESET ROLE;
DROP ROLE regress_gov_stats;

-- flexmore.admin_role applies as to the other administration functions.
CREATE ROLE regress_gov_admins;
GRANT EXECUTE ON FUNCTION flexmore_disable_expert(text, text) TO regress_gov_reader;
SET flexmore.admin_role = 'regress_gov_admins';
SET ROLE regress_gov_reader;
SELECT flexmore_disable_expert('gov', 'expert_1');
RESET ROLE;
GRANT regress_gov_admins TO regress_gov_reader;
SET ROLE regress_gov_reader;
SELECT flexmore_disable_expert('gov', 'expert_1');
RESET ROLE;
RESET flexmore.admin_role;
SELECT expert, enabled FROM flexmore_experts WHERE model = 'gov' AND expert = 'expert_1';

-- Changes need a read-write transaction.
BEGIN READ ONLY;
SELECT flexmore_enable_expert('gov', 'expert_1');
ROLLBACK;
BEGIN READ ONLY;
SELECT flexmore_grant_expert('gov', 'expert_1', 'PUBLIC');
ROLLBACK;

-- Dropping the model drops its experts' grants.
SELECT flexmore_drop_model('gov');
SELECT count(*) AS grants_left FROM flexmore.expert_grants;
DROP TABLE reader_logits;
REVOKE EXECUTE ON FUNCTION flexmore_disable_expert(text, text) FROM regress_gov_reader;
DROP ROLE regress_gov_reader;
DROP ROLE regress_gov_team;
DROP ROLE regress_gov_admins;
