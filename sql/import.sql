-- flexmore_import, flexmore_models and flexmore_drop_model.  Checkpoints
-- come from test/model/gen_checkpoint.py in $FLEXMORE_TEST_MODELS; error
-- messages print that directory as $MODELS.

\getenv models FLEXMORE_TEST_MODELS
SELECT set_config('flexmore_test.models', :'models', false) IS NOT NULL AS models_set;

-- Imports a checkpoint and returns 'ok' or the error, with the models
-- directory replaced so the output does not depend on it.
CREATE FUNCTION try_import(model text, dir text, replace boolean DEFAULT false)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	root text := current_setting('flexmore_test.models');
BEGIN
	PERFORM flexmore_import(model, root || '/' || dir, replace);
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || replace(SQLERRM, root, '$MODELS');
END $$;

-- Every preset layout imports.
SELECT try_import('imp_f32', 'flex_olmo_f32');
SELECT try_import('imp_fused', 'flex_olmo_fused_bf16');
SELECT try_import('imp_ranks', 'flexmore_ranks_f32');
SELECT try_import('imp_f16', 'flexmore_f16_tied');
SELECT try_import('imp_sharded', 'sharded_gqa_bf16');
SELECT try_import('imp_padded', 'padded_vocab');

SELECT name, architecture, hidden_size, layers, vocab_size, experts, top_k,
	   generation, parameters > 0 AS has_parameters, bytes_stored > 0 AS has_bytes
FROM flexmore_models WHERE name LIKE 'imp\_%' ORDER BY name;

-- Expert names and ranks come from config.json.
SELECT e.expert_index, e.name, e.rank
FROM flexmore.experts e JOIN flexmore.models m ON m.id = e.model_id
WHERE m.name = 'imp_ranks' ORDER BY e.expert_index;

-- Tensors keep the file dtype; fused and shared tensors have no expert index.
SELECT m.name, t.dtype, count(*) AS tensors, count(t.expert_index) AS expert_tensors
FROM flexmore.tensors t JOIN flexmore.models m ON m.id = t.model_id
WHERE m.name IN ('imp_f32', 'imp_fused', 'imp_f16', 'imp_sharded')
GROUP BY m.name, t.dtype ORDER BY m.name;

SELECT t.name, t.shape
FROM flexmore.tensors t JOIN flexmore.models m ON m.id = t.model_id
WHERE m.name = 'imp_fused' AND t.name LIKE 'model.layers.0.mlp.experts.%' ORDER BY t.name;

-- Raw byte counts match the shapes, and every chunk starts with the chunk magic.
SELECT bool_and(t.raw_bytes = (SELECT round(exp(sum(ln(d::numeric)))) FROM unnest(t.shape) d) *
				CASE t.dtype WHEN 'F32' THEN 4 ELSE 2 END) AS raw_bytes_match_shapes
FROM flexmore.tensors t JOIN flexmore.models m ON m.id = t.model_id
WHERE m.name LIKE 'imp\_%';
SELECT bool_and(substr(c.data, 1, 4) = '\x4d46434b'::bytea) AS chunk_magic,
	   bool_and(length(t.checksum) = 32) AS checksums
FROM flexmore.tensor_chunks c JOIN flexmore.tensors t ON t.id = c.tensor_id;

-- An existing name needs replace; replacing bumps the generation.
SELECT try_import('imp_f32', 'flex_olmo_f32');
SELECT try_import('imp_f32', 'flex_olmo_f32', true);
SELECT generation FROM flexmore_models WHERE name = 'imp_f32';
SELECT count(*) AS tensors_after_replace
FROM flexmore.tensors t JOIN flexmore.models m ON m.id = t.model_id
WHERE m.name = 'imp_f32';

-- Argument checks.
SELECT flexmore_import('imp_rel', 'relative/dir');
SELECT flexmore_import('', '/nonexistent');
SELECT try_import('imp_missing', 'no-such-preset');
SELECT flexmore_import(NULL, '/x') IS NULL AS strict;

-- Hostile checkpoints: each fails, naming the file and tensor, and
-- leaves nothing behind.
SELECT kind, try_import('imp_bad', 'corrupt/' || kind) AS error
FROM unnest(ARRAY['missing-tensor', 'wrong-shape', 'fused-wrong-shape',
				  'adapter-rank-mismatch', 'dtype-i64', 'dtype-f64',
				  'header-length-beyond-file', 'truncated-file',
				  'overlapping-offsets', 'byte-count-mismatch',
				  'config-hidden-mismatch', 'rope-scaling-unsupported',
				  'rope-theta-missing', 'untied-without-lm-head',
				  'expert-ranks-length', 'public-expert-low-rank',
				  'tokenizer-wordpiece', 'tokenizer-nfc',
				  'index-missing-shard', 'index-wrong-shard']) AS kind;
SELECT count(*) AS leftover_models FROM flexmore.models WHERE name = 'imp_bad';

-- A failed re-import leaves the earlier model intact.
SELECT try_import('imp_f32', 'corrupt/missing-tensor', true);
SELECT generation FROM flexmore_models WHERE name = 'imp_f32';

-- flexmore_drop_model removes the model and everything under it.
SELECT flexmore_drop_model('imp_sharded');
SELECT count(*) AS sharded_left FROM flexmore_models WHERE name = 'imp_sharded';
SELECT count(*) AS orphan_tensors FROM flexmore.tensors t
WHERE NOT EXISTS (SELECT 1 FROM flexmore.models m WHERE m.id = t.model_id);
SELECT count(*) AS orphan_chunks FROM flexmore.tensor_chunks c
WHERE NOT EXISTS (SELECT 1 FROM flexmore.tensors t WHERE t.id = c.tensor_id);
SELECT flexmore_drop_model('imp_sharded');
SELECT flexmore_drop_model('no such model');

-- Import and drop write, so a read-only transaction rejects them.
BEGIN READ ONLY;
SELECT flexmore_import('imp_read_only', :'models' || '/flex_olmo_f32');
ROLLBACK;
BEGIN READ ONLY;
SELECT flexmore_drop_model('imp_read_only');
ROLLBACK;

-- The storage is registered for pg_dump.
SELECT c.relname
FROM pg_extension e, unnest(e.extconfig) AS cfg(oid) JOIN pg_class c ON c.oid = cfg.oid
WHERE e.extname = 'flexmore' ORDER BY c.relname;

SELECT flexmore_drop_model(name) FROM flexmore_models WHERE name LIKE 'imp\_%' ORDER BY name;
DROP FUNCTION try_import(text, text, boolean);
