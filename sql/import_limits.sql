-- Limits on the arguments of the import, expert and inference functions:
-- the length of model and expert names, arrays with more than one
-- dimension, and prompts longer than the context.  Checkpoints come from
-- test/model/gen_checkpoint.py and gen_import_cases.py in
-- $FLEXMORE_TEST_MODELS; messages print that directory as $MODELS.

\getenv models FLEXMORE_TEST_MODELS
SET client_min_messages = warning;
SELECT set_config('flexmore_test.models', :'models', false) IS NOT NULL AS models_set;

-- Runs a statement and returns 'ok' or the SQLSTATE and error message.
CREATE FUNCTION try_sql(statement text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	root text := current_setting('flexmore_test.models');
BEGIN
	EXECUTE statement;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || replace(SQLERRM, root, '$MODELS');
END $$;

-- Every file of a directory as a large object, with config.json replaced
-- by the given text.
CREATE FUNCTION lo_files_with_config(dir text, config text) RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_object_agg(f, CASE WHEN f = 'config.json'
									THEN lo_from_bytea(0, convert_to(config, 'UTF8'))
									ELSE lo_import(dir || '/' || f) END)
	FROM pg_ls_dir(dir) AS f
$$;

-- ---------- name lengths: at most 63 bytes ----------

-- 63 bytes is accepted, 64 is not, with the import functions.
SELECT try_sql(format('SELECT flexmore_import(%L, %L)', repeat('m', 63),
					  current_setting('flexmore_test.models') || '/flex_olmo_f32'));
SELECT length(name) AS stored_name_length FROM flexmore_models WHERE name LIKE 'mmm%';
SELECT flexmore_import(repeat('m', 64), current_setting('flexmore_test.models') || '/flex_olmo_f32');
SELECT try_sql(format('SELECT flexmore_import(%L, %L)', repeat('m', 12000),
					  current_setting('flexmore_test.models') || '/flex_olmo_f32'));
SELECT try_sql(format('SELECT flexmore_import_lo(%L, %L)', repeat('m', 64), '{}'));

-- The limit counts bytes: 32 characters of two bytes each are 64 bytes.
SELECT try_sql(format('SELECT flexmore_import(%L, %L)', repeat('æ', 32),
					  current_setting('flexmore_test.models') || '/flex_olmo_f32'));
SELECT name FROM flexmore_models WHERE length(name) > 60 OR name LIKE 'æ%';
SELECT flexmore_drop_model(repeat('m', 63));

-- Lookups of an over-long name fail as "does not exist", and the message
-- shows only the first 63 bytes of the name followed by "...".
SELECT try_sql(format('SELECT flexmore_tokenize(%L, %L)', repeat('m', 12000), 'a'));
SELECT try_sql(format('SELECT flexmore_drop_model(%L)', repeat('m', 12000)));
SELECT try_sql(format('SELECT flexmore_remove_expert(%L, %L)', repeat('m', 12000), 'x'));
SELECT try_sql(format('SELECT flexmore_tokenize(%L, %L)', repeat('æ', 40), 'a'));
SELECT try_sql(format('SELECT flexmore_logits(%L, ARRAY[1])', repeat('m', 12000)));

-- Expert names: the expert_name argument of flexmore_add_expert, and
-- expert_names in config.json.
SELECT flexmore_import('lim_base', current_setting('flexmore_test.models') || '/packages/base_full') > 0
	AS imported;
SELECT try_sql(format('SELECT flexmore_add_expert(%L, %L, %L)', 'lim_base',
					  current_setting('flexmore_test.models') || '/packages/pkg_full',
					  repeat('e', 64)));
SELECT try_sql(format('SELECT flexmore_add_expert(%L, %L, %L)', 'lim_base',
					  current_setting('flexmore_test.models') || '/packages/pkg_full', ''));
SELECT count(*) AS experts_after_rejected_names
FROM flexmore.experts e JOIN flexmore.models m ON m.id = e.model_id WHERE m.name = 'lim_base';

CREATE FUNCTION try_import_expert_names(model text, names jsonb) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	dir text := current_setting('flexmore_test.models') || '/flex_olmo_f32';
	config jsonb := pg_read_file(dir || '/config.json')::jsonb;
	files jsonb;
BEGIN
	files := lo_files_with_config(dir, jsonb_set(config, '{expert_names}', names)::text);
	PERFORM flexmore_import_lo(model, files);
	PERFORM lo_unlink(value::oid) FROM jsonb_each_text(files);
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
SELECT try_import_expert_names('lim_names',
	jsonb_build_array('public', repeat('x', 63), 'third', 'fourth'));
SELECT try_import_expert_names('lim_long_names',
	jsonb_build_array('public', 'second', repeat('x', 64), 'fourth'));
SELECT name FROM flexmore_models WHERE name LIKE 'lim\_%' ORDER BY name;

-- ---------- arrays with more than one dimension ----------

SELECT flexmore_import('lim_m', current_setting('flexmore_test.models') || '/flex_olmo_f32') > 0
	AS imported;
SELECT flexmore_detokenize('lim_m', ARRAY[[1, 2], [3, 4]]);
SELECT try_sql('SELECT flexmore_logits(''lim_m'', ARRAY[[1, 2], [3, 4]])');
SELECT try_sql('SELECT flexmore_logits(''lim_m'', ARRAY[[[1]]])');
SELECT try_sql('SELECT flexmore_logits(''lim_m'', ARRAY[1, 2], ARRAY[[''public'', ''expert_1'']])');
SELECT try_sql('SELECT flexmore_generate(''lim_m'', ''ab'', 2, experts => ARRAY[[''public''], [''expert_1'']])');
-- One dimension with any lower bound is fine, and so is an empty array.
SELECT flexmore_detokenize('lim_m', '[0:1]={104,105}'::int[]) = flexmore_detokenize('lim_m', ARRAY[104, 105])
	AS lower_bound_ignored;
SELECT flexmore_detokenize('lim_m', '{}'::int[]) AS empty_ids;

-- ---------- prompts longer than the context ----------

-- Tokenizing stops once the prompt has more tokens than the context.
SET flexmore.max_context = 12;
SELECT flexmore_generate('lim_m', repeat('a b ', 100), 2);
SELECT try_sql('SELECT * FROM flexmore_generate_detail(''lim_m'', repeat(''a b '', 100000), 2)');
-- Twelve tokens fill the context exactly.
SELECT array_length(flexmore_tokenize('lim_m', 'a b a b a b a b'), 1) AS prompt_tokens;
SELECT finish_reason, prompt_tokens
FROM flexmore_generate_detail('lim_m', 'a b a b a b a b', 2);
SELECT try_sql('SELECT flexmore_generate(''lim_m'', ''a b a b a b a b a'', 2)');
-- ids of flexmore_logits are counted exactly.
SELECT try_sql('SELECT flexmore_logits(''lim_m'', array_fill(1, ARRAY[13]))');
RESET flexmore.max_context;

SELECT flexmore_drop_model(name) FROM flexmore_models WHERE name LIKE 'lim\_%';
SELECT count(*) AS large_objects_left FROM pg_largeobject_metadata;
