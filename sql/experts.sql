-- Adding, removing and factorizing experts, and integrity checks of the
-- stored chunks.  Expert packages come from test/model/gen_import_cases.py
-- in $FLEXMORE_TEST_MODELS/packages: base_full plus pkg_full must equal
-- combined_full, and combined_full without expert_2 must equal without_2.

\getenv models FLEXMORE_TEST_MODELS
-- The first weight load in a connection may print a NOTICE about
-- shared_preload_libraries, which depends on the server's settings.
SET client_min_messages = warning;
SELECT set_config('flexmore_test.models', :'models', false) IS NOT NULL AS models_set;

CREATE FUNCTION try_sql(query text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	root text := current_setting('flexmore_test.models');
BEGIN
	EXECUTE query;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || replace(SQLERRM, root, '$MODELS');
END $$;

SELECT flexmore_import('ex_base', :'models' || '/packages/base_full') > 0 AS imported;
SELECT flexmore_import('ex_combined', :'models' || '/packages/combined_full') > 0 AS imported;
SELECT flexmore_import('ex_without_2', :'models' || '/packages/without_2') > 0 AS imported;

-- Adding the package's expert gives the combined checkpoint exactly.
SELECT flexmore_add_expert('ex_base', :'models' || '/packages/pkg_full') AS new_index;
SELECT flexmore_logits('ex_base', ARRAY[5, 6, 7, 8]) = flexmore_logits('ex_combined', ARRAY[5, 6, 7, 8])
	AS same_as_combined;
SELECT name, experts, top_k, generation, parameters = (SELECT parameters FROM flexmore_models
													   WHERE name = 'ex_combined') AS same_parameters
FROM flexmore_models WHERE name = 'ex_base';
SELECT config -> 'num_experts' AS num_experts, config -> 'expert_names' AS expert_names
FROM flexmore.models WHERE name = 'ex_base';
SELECT e.expert_index, e.name, e.rank
FROM flexmore.experts e JOIN flexmore.models m ON m.id = e.model_id
WHERE m.name = 'ex_base' ORDER BY e.expert_index;
SELECT t.name, t.shape FROM flexmore.tensors t JOIN flexmore.models m ON m.id = t.model_id
WHERE m.name = 'ex_base' AND t.name LIKE 'model.layers.0.mlp.gate%';
-- Every stored tensor has the checksum of the combined checkpoint's.
SELECT count(*) AS differing_tensors
FROM flexmore.tensors a JOIN flexmore.models ma ON ma.id = a.model_id AND ma.name = 'ex_base'
FULL JOIN (SELECT t.* FROM flexmore.tensors t JOIN flexmore.models m ON m.id = t.model_id
		   WHERE m.name = 'ex_combined') b ON b.name = a.name
WHERE a.checksum IS DISTINCT FROM b.checksum OR a.expert_index IS DISTINCT FROM b.expert_index;

-- Package errors: a changed shared tensor, a name in use, a model that
-- does not match, a full model instead of a package, fused models.
SELECT try_sql(format('SELECT flexmore_add_expert(%L, %L, %L)', 'ex_base',
					  :'models' || '/packages/pkg_mismatch', 'other')) AS mismatch;
SELECT try_sql(format('SELECT flexmore_add_expert(%L, %L)', 'ex_base',
					  :'models' || '/packages/pkg_full')) AS name_in_use;
SELECT try_sql(format('SELECT flexmore_add_expert(%L, %L, %L)', 'ex_base',
					  :'models' || '/packages/pkg_adapter', 'adapter')) AS other_shape;
SELECT try_sql(format('SELECT flexmore_add_expert(%L, %L, %L)', 'ex_base',
					  :'models' || '/flex_olmo_f32', 'four')) AS not_a_package;
SELECT try_sql(format('SELECT flexmore_add_expert(%L, %L, %L)', 'no such model',
					  :'models' || '/packages/pkg_full', 'x')) AS unknown_model;
SELECT flexmore_import('ex_fused', :'models' || '/flex_olmo_fused_bf16') > 0 AS imported;
SELECT try_sql('SELECT flexmore_remove_expert(''ex_fused'', ''expert_1'')') AS fused;
SELECT flexmore_drop_model('ex_fused');
SELECT generation FROM flexmore_models WHERE name = 'ex_base';

-- Removing an expert: its tensors and router row go, later experts move down.
SELECT flexmore_remove_expert('ex_base', 'expert_2');
SELECT flexmore_logits('ex_base', ARRAY[5, 6, 7, 8]) = flexmore_logits('ex_without_2', ARRAY[5, 6, 7, 8])
	AS same_as_without_2;
SELECT count(*) AS differing_tensors
FROM flexmore.tensors a JOIN flexmore.models ma ON ma.id = a.model_id AND ma.name = 'ex_base'
FULL JOIN (SELECT t.* FROM flexmore.tensors t JOIN flexmore.models m ON m.id = t.model_id
		   WHERE m.name = 'ex_without_2') b ON b.name = a.name
WHERE a.checksum IS DISTINCT FROM b.checksum OR a.expert_index IS DISTINCT FROM b.expert_index;
SELECT experts, generation FROM flexmore_models WHERE name = 'ex_base';
SELECT config -> 'expert_names' AS expert_names FROM flexmore.models WHERE name = 'ex_base';
SELECT try_sql('SELECT flexmore_remove_expert(''ex_base'', ''public'')') AS public_expert;
SELECT try_sql('SELECT flexmore_remove_expert(''ex_base'', ''expert_2'')') AS gone;
SELECT try_sql('SELECT flexmore_remove_expert(''no such model'', ''x'')') AS unknown_model;
-- Down to one expert: num_experts_per_tok follows, with a NOTICE.
RESET client_min_messages;
SELECT flexmore_remove_expert('ex_base', 'expert_3');
SELECT flexmore_remove_expert('ex_base', 'expert_1');
SET client_min_messages = warning;
SELECT experts, top_k FROM flexmore_models WHERE name = 'ex_base';
SELECT array_length(flexmore_logits('ex_base', ARRAY[1, 2]), 1) AS logits;

-- A FlexMoRE adapter package.
SELECT flexmore_import('ex_ranks', :'models' || '/packages/base_ranks') > 0 AS imported;
SELECT flexmore_import('ex_ranks_combined', :'models' || '/packages/combined_ranks') > 0 AS imported;
SELECT flexmore_add_expert('ex_ranks', :'models' || '/packages/pkg_adapter') AS new_index;
SELECT flexmore_logits('ex_ranks', ARRAY[5, 6, 7, 8]) = flexmore_logits('ex_ranks_combined', ARRAY[5, 6, 7, 8])
	AS same_as_combined;
SELECT config -> 'expert_ranks' AS expert_ranks FROM flexmore.models WHERE name = 'ex_ranks';

-- The same through large objects.
SELECT flexmore_import('ex_lo', :'models' || '/packages/base_full') > 0 AS imported;
SELECT flexmore_add_expert_lo('ex_lo', jsonb_build_object(
	'config.json', lo_import(:'models' || '/packages/pkg_full/config.json'),
	'model.safetensors', lo_import(:'models' || '/packages/pkg_full/model.safetensors')),
	'late') AS new_index;
SELECT flexmore_logits('ex_lo', ARRAY[5, 6, 7, 8]) = flexmore_logits('ex_combined', ARRAY[5, 6, 7, 8])
	AS same_as_combined;
SELECT lo_unlink(oid) FROM pg_largeobject_metadata ORDER BY oid;

-- Factorizing: expert_2 of lowrank is W_0 plus an exact rank-4 delta, so
-- rank 4 reproduces it; expert_1 is random, so the error is the optimum
-- of the truncated SVD that numpy computed (expected_errors.json).
SELECT flexmore_import('ex_lowrank', :'models' || '/lowrank') > 0 AS imported;
CREATE TEMP TABLE expected_errors AS
SELECT e ->> 'expert' AS expert, (e ->> 'rank')::int AS rank, (e ->> 'layer')::int AS layer,
	   e ->> 'matrix' AS matrix, (e ->> 'error')::float8 AS error
FROM jsonb_array_elements(pg_read_file(:'models' || '/lowrank/expected_errors.json')::jsonb) AS e;
CREATE TEMP TABLE before AS SELECT flexmore_logits('ex_lowrank', ARRAY[5, 6, 7, 8]) AS logits;

SELECT layer, matrix, relative_error < 1e-5 AS exact
FROM flexmore_factorize_expert('ex_lowrank', 'expert_2', 4) ORDER BY layer, matrix;
SELECT max(abs(a - b)) < 1e-4 AS logits_unchanged
FROM before, unnest(before.logits, flexmore_logits('ex_lowrank', ARRAY[5, 6, 7, 8])) AS u(a, b);

-- Exact and randomized SVD against numpy's optimum: the exact SVD within
-- 1e-6, the randomized range finder within 1% of it.
CREATE TABLE factorized AS
SELECT 'exact' AS method, f.* FROM flexmore_factorize_expert('ex_lowrank', 'expert_1', 8, 'exact') f;
SELECT count(*) AS matrices, bool_and(abs(f.relative_error - x.error) < 1e-6) AS at_optimum
FROM factorized f JOIN expected_errors x
  ON x.expert = 'expert_1' AND x.rank = 8 AND x.layer = f.layer AND x.matrix = f.matrix;
SELECT flexmore_import('ex_lowrank', :'models' || '/lowrank', true) > 0 AS reimported;
SELECT count(*) AS matrices, bool_and(f.relative_error >= x.error - 1e-6) AS not_below_optimum,
	   bool_and(f.relative_error <= x.error * 1.01) AS within_one_percent
FROM flexmore_factorize_expert('ex_lowrank', 'expert_1', 4, 'randomized') f
JOIN expected_errors x ON x.expert = 'expert_1' AND x.rank = 4 AND x.layer = f.layer AND x.matrix = f.matrix;
DROP TABLE factorized;
SELECT config -> 'expert_ranks' AS expert_ranks, architecture FROM flexmore.models WHERE name = 'ex_lowrank';
SELECT t.name, t.dtype, t.shape FROM flexmore.tensors t JOIN flexmore.models m ON m.id = t.model_id
WHERE m.name = 'ex_lowrank' AND t.name LIKE 'model.layers.0.mlp.experts.1.%' ORDER BY t.name;
SELECT try_sql('SELECT * FROM flexmore_factorize_expert(''ex_lowrank'', ''expert_1'', 4)') AS already_low_rank;
SELECT try_sql('SELECT * FROM flexmore_factorize_expert(''ex_lowrank'', ''public'', 4)') AS public_expert;
SELECT try_sql('SELECT * FROM flexmore_factorize_expert(''ex_lowrank'', ''expert_3'', 33)') AS rank_too_big;
SELECT try_sql('SELECT * FROM flexmore_factorize_expert(''ex_lowrank'', ''expert_3'', 4, ''qr'')') AS bad_method;

-- Integrity: a changed byte in a stored chunk fails the load with the
-- tensor's name.  The test edits the table as superuser, in a model that
-- no backend has loaded yet.
SELECT flexmore_import('ex_corrupt', :'models' || '/flex_olmo_f32') > 0 AS imported;
UPDATE flexmore.tensor_chunks c SET data = overlay(data placing '\x00ff'::bytea from 40)
FROM flexmore.tensors t, flexmore.models m
WHERE c.tensor_id = t.id AND t.model_id = m.id AND m.name = 'ex_corrupt'
  AND t.name = 'model.layers.1.self_attn.v_proj.weight' AND c.seq = 0;
SELECT try_sql('SELECT flexmore_logits(''ex_corrupt'', ARRAY[1])') AS corrupted_payload;
SELECT flexmore_import('ex_corrupt_header', :'models' || '/flex_olmo_f32') > 0 AS imported;
UPDATE flexmore.tensor_chunks c SET data = overlay(data placing '\x00'::bytea from 1)
FROM flexmore.tensors t, flexmore.models m
WHERE c.tensor_id = t.id AND t.model_id = m.id AND m.name = 'ex_corrupt_header'
  AND t.name = 'model.embed_tokens.weight' AND c.seq = 0;
SELECT try_sql('SELECT flexmore_logits(''ex_corrupt_header'', ARRAY[1])') AS corrupted_header;

SELECT flexmore_drop_model(name) FROM flexmore_models WHERE name LIKE 'ex\_%' ORDER BY name;
DROP FUNCTION try_sql(text);
