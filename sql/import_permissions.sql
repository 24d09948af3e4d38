-- Who may import from large objects, drop models and change experts:
-- EXECUTE grants, plus membership in flexmore.admin_role when it is set.
-- Running a model needs neither.

\getenv models FLEXMORE_TEST_MODELS
-- The first weight load in a connection may print a NOTICE about
-- shared_preload_libraries, which depends on the server's settings.
SET client_min_messages = warning;
SELECT flexmore_import('adm', :'models' || '/packages/base_full') > 0 AS imported;

CREATE ROLE regress_flexmore_admins;
CREATE ROLE regress_flexmore_dba;
CREATE ROLE regress_flexmore_other;
CREATE ROLE regress_flexmore_reader;
GRANT regress_flexmore_admins TO regress_flexmore_dba;
GRANT EXECUTE ON FUNCTION flexmore_import_lo(text, jsonb, boolean),
	flexmore_add_expert(text, text, text),
	flexmore_drop_model(text), flexmore_remove_expert(text, text),
	flexmore_add_expert_lo(text, jsonb, text),
	flexmore_factorize_expert(text, text, int, text)
	TO regress_flexmore_dba, regress_flexmore_other;

-- The administration functions have no EXECUTE for PUBLIC.
SELECT p.proname, has_function_privilege('regress_flexmore_reader', p.oid, 'EXECUTE') AS reader_can_execute
FROM pg_proc p
WHERE p.proname IN ('flexmore_import_lo', 'flexmore_add_expert', 'flexmore_add_expert_lo',
					'flexmore_remove_expert', 'flexmore_factorize_expert')
ORDER BY p.proname;

-- Large objects of the superuser, which the other roles may not read yet.
CREATE TABLE lo_ids (who text, files jsonb);
INSERT INTO lo_ids SELECT 'postgres', jsonb_object_agg(f, lo_import(:'models' || '/flex_olmo_f32/' || f))
FROM pg_ls_dir(:'models' || '/flex_olmo_f32') AS f;
GRANT SELECT ON lo_ids TO regress_flexmore_dba, regress_flexmore_other;

-- Without admin_role, EXECUTE decides; large objects of another owner
-- need SELECT on them.
-- The message names the large object, whose OID varies, so it is masked.
SET ROLE regress_flexmore_other;
DO $$
BEGIN
	PERFORM flexmore_import_lo('adm_other', (SELECT files FROM lo_ids));
EXCEPTION WHEN insufficient_privilege THEN
	RAISE WARNING '%', regexp_replace(SQLERRM, 'object [0-9]+', 'object N');
END $$;
RESET ROLE;
DO $$
DECLARE
	lo text;
BEGIN
	FOR lo IN SELECT value FROM lo_ids, jsonb_each_text(files) LOOP
		EXECUTE format('GRANT SELECT ON LARGE OBJECT %s TO regress_flexmore_other, regress_flexmore_dba', lo);
	END LOOP;
END $$;
SET ROLE regress_flexmore_other;
SELECT flexmore_import_lo('adm_other', (SELECT files FROM lo_ids)) > 0 AS other_imported;
SELECT flexmore_drop_model('adm_other');
RESET ROLE;

-- With admin_role, only its members (and superusers) pass.
SET flexmore.admin_role = 'regress_flexmore_admins';
SET ROLE regress_flexmore_other;
SELECT flexmore_import_lo('adm_other', (SELECT files FROM lo_ids));
SELECT flexmore_drop_model('adm');
SELECT flexmore_remove_expert('adm', 'expert_2');
SELECT * FROM flexmore_factorize_expert('adm', 'expert_2', 4);
-- Settings are superuser-only.
SET flexmore.admin_role = '';
RESET ROLE;

SET ROLE regress_flexmore_dba;
SELECT flexmore_import_lo('adm_dba', (SELECT files FROM lo_ids)) > 0 AS dba_imported;
SELECT flexmore_remove_expert('adm', 'expert_2');
SELECT experts FROM flexmore_models WHERE name = 'adm';
SELECT flexmore_drop_model('adm_dba');
-- The server-file paths still need pg_read_server_files.
SELECT flexmore_add_expert('adm', :'models' || '/packages/pkg_full');
RESET ROLE;

-- A plain role still runs the changed model without any table privilege.
SET ROLE regress_flexmore_reader;
SELECT array_length(flexmore_logits('adm', ARRAY[1, 2]), 1) AS logits;
SELECT count(*) FROM flexmore.tensors;
RESET ROLE;

-- A role named by the setting that does not exist.
SET flexmore.admin_role = 'regress_flexmore_missing';
SET ROLE regress_flexmore_dba;
SELECT flexmore_drop_model('adm');
RESET ROLE;
RESET flexmore.admin_role;

SELECT lo_unlink(value::oid) FROM lo_ids, jsonb_each_text(files) ORDER BY 1;
DROP TABLE lo_ids;
SELECT flexmore_drop_model('adm');
REVOKE ALL ON FUNCTION flexmore_import_lo(text, jsonb, boolean),
	flexmore_add_expert(text, text, text),
	flexmore_drop_model(text), flexmore_remove_expert(text, text),
	flexmore_add_expert_lo(text, jsonb, text),
	flexmore_factorize_expert(text, text, int, text)
	FROM regress_flexmore_dba, regress_flexmore_other;
DROP ROLE regress_flexmore_admins;
DROP ROLE regress_flexmore_dba;
DROP ROLE regress_flexmore_other;
DROP ROLE regress_flexmore_reader;
