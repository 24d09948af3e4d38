-- flexmore_import_lo: the same checkpoints as import.sql, from large
-- objects, and the hostile checkpoints through both paths.  Checkpoints
-- come from test/model/gen_checkpoint.py and gen_import_cases.py in
-- $FLEXMORE_TEST_MODELS; messages print that directory as $MODELS.

\getenv models FLEXMORE_TEST_MODELS
-- The first weight load in a connection may print a NOTICE about
-- shared_preload_libraries, which depends on the server's settings.
SET client_min_messages = warning;
SELECT set_config('flexmore_test.models', :'models', false) IS NOT NULL AS models_set;

-- Every file of a directory as a large object: {"name": oid, ...}.
CREATE FUNCTION lo_files(dir text) RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_object_agg(f, lo_import(dir || '/' || f))
	FROM pg_ls_dir(dir) AS f
$$;

-- Imports through files or large objects; returns 'ok' or the error.
-- The large objects are created inside the block, so an error removes
-- them with the rest of the block's work.
CREATE FUNCTION try_import_lo(model text, dir text, replace boolean DEFAULT false)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	root text := current_setting('flexmore_test.models');
	files jsonb;
BEGIN
	files := lo_files(root || '/' || dir);
	PERFORM flexmore_import_lo(model, files, replace);
	PERFORM lo_unlink(value::oid) FROM jsonb_each_text(files);
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || replace(SQLERRM, root, '$MODELS');
END $$;

CREATE FUNCTION try_import_dir(model text, dir text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	root text := current_setting('flexmore_test.models');
BEGIN
	PERFORM flexmore_import(model, root || '/' || dir);
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || replace(SQLERRM, root, '$MODELS');
END $$;

-- Every preset imports from large objects and gives the logits of the
-- server-file import.
SELECT preset, try_import_lo('lo_' || preset, preset) AS lo,
	   try_import_dir('dir_' || preset, preset) AS dir
FROM unnest(ARRAY['flex_olmo_f32', 'flex_olmo_fused_bf16', 'flexmore_ranks_f32',
				  'flexmore_f16_tied', 'sharded_gqa_bf16', 'padded_vocab']) AS preset;
SELECT preset,
	   flexmore_logits('lo_' || preset, ARRAY[1, 2, 3]) = flexmore_logits('dir_' || preset, ARRAY[1, 2, 3])
	   AS same_logits,
	   (SELECT array_agg(encode(checksum, 'hex') ORDER BY t.name) FROM flexmore.tensors t
		JOIN flexmore.models m ON m.id = t.model_id WHERE m.name = 'lo_' || preset) =
	   (SELECT array_agg(encode(checksum, 'hex') ORDER BY t.name) FROM flexmore.tensors t
		JOIN flexmore.models m ON m.id = t.model_id WHERE m.name = 'dir_' || preset) AS same_checksums
FROM unnest(ARRAY['flex_olmo_f32', 'flex_olmo_fused_bf16', 'flexmore_ranks_f32',
				  'flexmore_f16_tied', 'sharded_gqa_bf16', 'padded_vocab']) AS preset;
SELECT count(*) AS large_objects_left FROM pg_largeobject_metadata;

-- replace works as for flexmore_import.
SELECT try_import_lo('lo_flex_olmo_f32', 'flex_olmo_f32');
SELECT try_import_lo('lo_flex_olmo_f32', 'flex_olmo_f32', true);
SELECT generation FROM flexmore_models WHERE name = 'lo_flex_olmo_f32';

-- Argument checks.
SELECT flexmore_import_lo('lo_bad', '[1, 2]');
SELECT flexmore_import_lo('lo_bad', '{"config.json": "x"}');
SELECT flexmore_import_lo('lo_bad', '{"config.json": 1.5}');
SELECT flexmore_import_lo('lo_bad', '{"config.json": 4000000000}');
SELECT flexmore_import_lo('lo_bad', '{}');
SELECT flexmore_import_lo('', '{}');
SELECT flexmore_import_lo(NULL, '{}') IS NULL AS strict;

-- Hostile checkpoints: the generator's kinds and the ones only the server
-- rejects (non-finite weights and others).  Both paths name the file and
-- the tensor, and leave nothing behind.
-- The large-object path names files without their directory; where its
-- message is otherwise the same, the output says so.
CREATE FUNCTION compare_paths(dir text) RETURNS TABLE (server_files text, large_objects text)
LANGUAGE plpgsql AS $$
BEGIN
	server_files := try_import_dir('imp_bad', dir);
	large_objects := try_import_lo('imp_bad', dir);
	IF replace(replace(server_files, '$MODELS/' || dir || '/', ''),
			   'checkpoint "$MODELS/' || dir || '"', 'checkpoint in large objects') = large_objects THEN
		large_objects := 'same';
	END IF;
	RETURN NEXT;
END $$;

SELECT kind, c.*
FROM unnest(ARRAY['missing-tensor', 'wrong-shape', 'fused-wrong-shape',
				  'adapter-rank-mismatch', 'dtype-i64', 'dtype-f64',
				  'header-length-beyond-file', 'truncated-file',
				  'overlapping-offsets', 'byte-count-mismatch',
				  'config-hidden-mismatch', 'rope-scaling-unsupported',
				  'rope-theta-missing', 'untied-without-lm-head',
				  'expert-ranks-length', 'public-expert-low-rank',
				  'tokenizer-wordpiece', 'tokenizer-nfc',
				  'index-missing-shard', 'index-wrong-shard']) AS kind,
	 compare_paths('corrupt/' || kind) AS c;
SELECT kind, c.*
FROM unnest(ARRAY['nan-weight', 'inf-weight-bf16', 'inf-weight-f16',
				  'dtype-undefined', 'offsets-beyond-data',
				  'offsets-end-before-begin', 'header-not-json',
				  'tokenizer-unigram', 'eos-outside-vocab']) AS kind,
	 compare_paths('hostile/' || kind) AS c;
SELECT count(*) AS leftover_models FROM flexmore.models WHERE name = 'imp_bad';
SELECT count(*) AS large_objects_left FROM pg_largeobject_metadata;

-- A failed re-import through large objects keeps the earlier model.
SELECT try_import_lo('lo_flex_olmo_f32', 'hostile/nan-weight', true);
SELECT generation FROM flexmore_models WHERE name = 'lo_flex_olmo_f32';

-- A large object that does not exist.
SELECT flexmore_import_lo('lo_bad', '{"config.json": 4000000}');

SELECT flexmore_drop_model(name) FROM flexmore_models
WHERE name LIKE 'lo\_%' OR name LIKE 'dir\_%' ORDER BY name;
DROP FUNCTION compare_paths(text);
DROP FUNCTION try_import_lo(text, text, boolean);
DROP FUNCTION try_import_dir(text, text);
DROP FUNCTION lo_files(text);
