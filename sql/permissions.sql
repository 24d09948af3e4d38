-- Privileges: who may import, and inference without table privileges.

\getenv models FLEXMORE_TEST_MODELS
SELECT flexmore_import('perm', :'models' || '/flex_olmo_f32') > 0 AS imported;

CREATE ROLE regress_flexmore_user;
CREATE ROLE regress_flexmore_loader;
GRANT EXECUTE ON FUNCTION flexmore_import(text, text, boolean) TO regress_flexmore_loader;

-- Admin functions have no EXECUTE for PUBLIC.
SELECT has_function_privilege('regress_flexmore_user', 'flexmore_import(text, text, boolean)', 'EXECUTE')
	AS user_can_import,
	   has_function_privilege('regress_flexmore_user', 'flexmore_drop_model(text)', 'EXECUTE')
	AS user_can_drop,
	   has_function_privilege('regress_flexmore_user', 'flexmore_generate(text, text, int, float8, float8, int, bigint, text[], float8)', 'EXECUTE')
	AS user_can_generate,
	   has_table_privilege('regress_flexmore_user', 'flexmore.tensors', 'SELECT') AS user_can_read_tensors;

SET ROLE regress_flexmore_user;
-- A plain role generates without any privilege on the tables.
SELECT flexmore_generate('perm', 'hello', 4) IS NOT NULL AS generated;
SELECT array_length(flexmore_tokenize('perm', 'hello'), 1) > 0 AS tokenized;
SELECT name FROM flexmore_models WHERE name = 'perm';
-- The calling role stays visible during inference.
SELECT current_user, flexmore_detokenize('perm', flexmore_tokenize('perm', 'x')) AS x;
SELECT count(*) FROM flexmore.tensors;
SELECT flexmore_import('perm2', '/nonexistent');
SELECT flexmore_drop_model('perm');
RESET ROLE;

-- EXECUTE alone is not enough to read server files.
SET ROLE regress_flexmore_loader;
SELECT flexmore_import('perm2', '/nonexistent');
RESET ROLE;
GRANT pg_read_server_files TO regress_flexmore_loader;
SET ROLE regress_flexmore_loader;
SELECT flexmore_import('perm2', :'models' || '/flex_olmo_f32') > 0 AS loader_imported;
RESET ROLE;

SELECT flexmore_drop_model('perm');
SELECT flexmore_drop_model('perm2');
REVOKE pg_read_server_files FROM regress_flexmore_loader;
REVOKE EXECUTE ON FUNCTION flexmore_import(text, text, boolean) FROM regress_flexmore_loader;
DROP ROLE regress_flexmore_user;
DROP ROLE regress_flexmore_loader;
