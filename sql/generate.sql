-- flexmore_logits, flexmore_generate and flexmore_generate_detail.
-- Results computed by the model are compared only with each other; the
-- numeric comparison with the Python reference is test/model/compare.py.

\getenv models FLEXMORE_TEST_MODELS
SELECT flexmore_import('gen', :'models' || '/flex_olmo_f32') > 0 AS imported;
SELECT flexmore_import('gen_ranks', :'models' || '/flexmore_ranks_f32') > 0 AS imported;
SELECT flexmore_import('gen_padded', :'models' || '/padded_vocab') > 0 AS imported;

-- Logits: one per vocabulary row, every model layout.
SELECT m, array_length(flexmore_logits(m, flexmore_tokenize(m, 'hello world')), 1) AS logits
FROM unnest(ARRAY['gen', 'gen_ranks', 'gen_padded']) AS m;

-- Greedy generation of one token equals the argmax of the logits.
CREATE FUNCTION argmax(a real[]) RETURNS int LANGUAGE sql IMMUTABLE AS $$
	SELECT i - 1 FROM unnest(a) WITH ORDINALITY AS t(v, i) ORDER BY v DESC, i LIMIT 1
$$;
SELECT flexmore_generate('gen', 'hello world', 1) =
	   flexmore_detokenize('gen', ARRAY[argmax(flexmore_logits('gen', flexmore_tokenize('gen', 'hello world')))])
	AS greedy_is_argmax;

-- The same checkpoint imported twice gives identical logits.
SELECT flexmore_import('gen_copy', :'models' || '/flex_olmo_f32') > 0 AS imported;
SELECT flexmore_logits('gen', ARRAY[1, 2, 3]) = flexmore_logits('gen_copy', ARRAY[1, 2, 3])
	AS same_logits;

-- experts: every name equals NULL; a subset changes routing; errors.
SELECT flexmore_logits('gen', ARRAY[1, 2, 3], ARRAY['public', 'expert_1', 'expert_2', 'expert_3']) =
	   flexmore_logits('gen', ARRAY[1, 2, 3]) AS all_experts_same;
SELECT flexmore_logits('gen', ARRAY[1, 2, 3], ARRAY['public']) <>
	   flexmore_logits('gen', ARRAY[1, 2, 3]) AS subset_differs;
SELECT flexmore_logits('gen', ARRAY[1, 2, 3], ARRAY['public', 'nobody']);
SELECT flexmore_logits('gen', ARRAY[1, 2, 3], '{}');
SELECT flexmore_logits('gen', ARRAY[1, 2, 3], ARRAY[NULL]::text[]);
SELECT flexmore_generate('gen', 'hello', 4, experts => '{}');
SELECT flexmore_generate('gen', 'hello', 4, experts => ARRAY['public']) IS NOT NULL AS public_only;

-- Logits argument errors.
SELECT flexmore_logits('gen', '{}');
SELECT flexmore_logits('gen', ARRAY[300]);
SELECT flexmore_logits('gen', ARRAY[-1]);
SELECT flexmore_logits('gen', NULL) IS NULL AS null_ids;
SELECT flexmore_logits('no such model', ARRAY[1]);

-- temperature 0 is greedy whatever the seed; a seed repeats a sample.
SELECT flexmore_generate('gen', 'hello', 8, seed => 1) =
	   flexmore_generate('gen', 'hello', 8, seed => 2) AS greedy_ignores_seed;
SELECT flexmore_generate('gen', 'hello', 8, temperature => 1, seed => 42) =
	   flexmore_generate('gen', 'hello', 8, temperature => 1, seed => 42) AS same_seed_same_text;
SELECT flexmore_generate('gen', 'hello', 8, temperature => 0.8, top_p => 0.9, top_k => 20)
	IS NOT NULL AS random_seed;
SELECT flexmore_generate('gen', 'hello', 4, temperature => -1);
SELECT flexmore_generate('gen', 'hello', 4, temperature => 'NaN');
SELECT flexmore_generate('gen', 'hello', 4, temperature => 'Infinity');
SELECT flexmore_generate('gen', 'hello', 4, top_p => 0);
SELECT flexmore_generate('gen', 'hello', 4, top_p => 1.5);
SELECT flexmore_generate('gen', 'hello', 4, top_k => -1);

-- repetition_penalty 1 is off.  With a penalty, the first token is the
-- arg max of the logits after penalised() has applied it to the prompt's
-- ids here in SQL.  The prompt ends in the plain arg max, so the penalty
-- changes the choice.
CREATE FUNCTION penalised(a real[], ids int[], p float8) RETURNS real[]
LANGUAGE sql IMMUTABLE AS $$
	SELECT array_agg(CASE WHEN i - 1 = ANY (ids)
						  THEN CASE WHEN v > 0 THEN v / p ELSE v * p END
						  ELSE v END ORDER BY i)::real[]
	FROM unnest(a) WITH ORDINALITY AS t(v, i)
$$;
SELECT flexmore_generate('gen', 'hello world', 8, repetition_penalty => 1) =
	   flexmore_generate('gen', 'hello world', 8) AS penalty_one_is_off;
\set penalty_prompt 'hello world!'
WITH p AS (SELECT flexmore_tokenize('gen', :'penalty_prompt') AS ids)
SELECT flexmore_generate('gen', :'penalty_prompt', 1, repetition_penalty => 4) =
	   flexmore_detokenize('gen', ARRAY[argmax(penalised(flexmore_logits('gen', ids), ids, 4))])
	   AS penalty_first_token,
	   argmax(penalised(flexmore_logits('gen', ids), ids, 4)) <>
	   argmax(flexmore_logits('gen', ids)) AS penalty_changes_it
FROM p;
SELECT flexmore_generate('gen', 'hello', 4, repetition_penalty => 0);
SELECT flexmore_generate('gen', 'hello', 4, repetition_penalty => -1.5);
SELECT flexmore_generate('gen', 'hello', 4, repetition_penalty => 'NaN');
SELECT flexmore_generate('gen', 'hello', 4, repetition_penalty => NULL) IS NULL AS null_penalty;

-- max_tokens 0 gives '' without sampling; negative is an error; 1
-- gives exactly one token unless it is an end-of-sequence id.
SELECT flexmore_generate('gen', 'hello', 0) AS zero_tokens;
SELECT * FROM flexmore_generate_detail('gen', 'hello', 0);
SELECT flexmore_generate('gen', 'hello', -1);
SELECT completion_tokens = 1 OR finish_reason = 'eos' AS one_token
FROM flexmore_generate_detail('gen', 'hello', 1);

-- Detail: counts match flexmore_tokenize and the completion matches
-- flexmore_generate.
SELECT d.prompt_tokens = array_length(flexmore_tokenize('gen', 'hello world'), 1) AS prompt_count,
	   d.completion = flexmore_generate('gen', 'hello world', 12) AS same_completion,
	   d.finish_reason IN ('eos', 'max_tokens') AS finish_known,
	   (d.finish_reason = 'max_tokens') = (d.completion_tokens = 12) AS count_matches_reason
FROM flexmore_generate_detail('gen', 'hello world', 12) d;

-- a prompt longer than the context is an error and the session
-- still works; prompt plus max_tokens past the context stops there.
SET flexmore.max_context = 16;
SELECT array_length(flexmore_tokenize('gen', repeat('a b ', 20)), 1) > 16 AS long_prompt;
SELECT flexmore_generate('gen', repeat('a b ', 20), 4);
SELECT flexmore_logits('gen', array_fill(72, ARRAY[17]));
SELECT 1 AS still_alive;
SELECT finish_reason, prompt_tokens, prompt_tokens + completion_tokens AS context_used
FROM flexmore_generate_detail('gen', 'a b a b a', 100, experts => ARRAY['public']);
RESET flexmore.max_context;

-- The model's max_position_embeddings (128) caps flexmore.max_context.
SELECT flexmore_logits('gen', array_fill(72, ARRAY[129]));

-- A call whose KV cache and activations exceed flexmore.max_call_memory.
SET flexmore.max_call_memory = '64kB';
DO $$
BEGIN
	PERFORM flexmore_generate('gen', 'hello', 100);
EXCEPTION WHEN program_limit_exceeded THEN
	RAISE NOTICE '%', regexp_replace(SQLERRM, '\d+ kB, more', 'N kB, more');
END $$;
RESET flexmore.max_call_memory;

-- the padded rows have the largest logits, yet generation only
-- returns ids the tokenizer knows.
SELECT argmax(flexmore_logits('gen_padded', flexmore_tokenize('gen_padded', 'hello'))) >= 300
	AS padding_wins_argmax;
SELECT completion_tokens > 0 AS generated
FROM flexmore_generate_detail('gen_padded', 'hello', 8);
SELECT flexmore_generate('gen_padded', 'hello', 8, temperature => 1, seed => 7) IS NOT NULL
	AS sampled;

-- Inference writes nothing, so it runs in a read-only transaction.
BEGIN READ ONLY;
SELECT flexmore_generate('gen', 'hello', 4) = flexmore_generate('gen_copy', 'hello', 4)
	AS read_only_generate;
SELECT array_length(flexmore_logits('gen', ARRAY[1]), 1) AS read_only_logits;
COMMIT;

-- NULL arguments other than seed and experts give NULL or no row.
SELECT flexmore_generate(NULL, 'hello') IS NULL AS null_model;
SELECT flexmore_generate('gen', NULL) IS NULL AS null_prompt;
SELECT count(*) AS detail_rows FROM flexmore_generate_detail('gen', 'hello', NULL);
SELECT flexmore_generate('gen', '', 4);
SELECT flexmore_generate('no such model', 'hello');

-- A re-import is noticed by the next call in the same backend.
SELECT flexmore_import('gen_copy', :'models' || '/flexmore_ranks_f32', true) > 0 AS reimported;
SELECT array_length(flexmore_logits('gen_copy', ARRAY[1]), 1) AS logits_after_reimport;
SELECT flexmore_logits('gen_copy', ARRAY[1]) = flexmore_logits('gen_ranks', ARRAY[1])
	AS new_weights;

DROP FUNCTION argmax(real[]);
SELECT flexmore_drop_model(m) FROM unnest(ARRAY['gen', 'gen_ranks', 'gen_padded', 'gen_copy']) m;
