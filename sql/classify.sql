-- flexmore_classify, flexmore_classify_scores, flexmore_score,
-- flexmore_perplexity, flexmore_embed and the batched forms: result
-- shapes, the rules that relate them, and every user error.  Scores are
-- checked against log-softmax sums computed here in SQL from
-- flexmore_logits; the float64 reference comparison is
-- test/model/classify_reference.py.

-- The first weights load in a connection may raise a NOTICE about
-- shared_preload_libraries, which depends on the server's settings.
SET client_min_messages = warning;
\getenv models FLEXMORE_TEST_MODELS
SELECT flexmore_import('cls', :'models' || '/flex_olmo_f32') > 0 AS imported;

-- Log-probability of token next_id after ids, from flexmore_logits, over
-- every id (this model's 300 ids are all tokenizer ids).
CREATE FUNCTION logprob_after(ids int[], next_id int) RETURNS float8 LANGUAGE sql AS $$
	WITH l AS (SELECT v::float8 AS v, i - 1 AS id
	           FROM unnest(flexmore_logits('cls', ids)) WITH ORDINALITY AS t(v, i))
	SELECT (SELECT v FROM l WHERE id = next_id)
	       - (SELECT max(v) + ln(sum(exp(v - (SELECT max(v) FROM l)))) FROM l)
$$;

-- flexmore_score: the boundary id 299 (eos) is prepended and not scored.
SELECT abs(flexmore_score('cls', 'hello world') -
	(SELECT sum(logprob_after(299 || ids[1:k - 1], ids[k]))
	 FROM (SELECT flexmore_tokenize('cls', 'hello world') AS ids) AS t,
	      generate_series(1, array_length(ids, 1)) AS k)) < 1e-4 AS score_matches_logits;
SELECT flexmore_score('cls', '') AS empty_score;
SELECT abs(flexmore_perplexity('cls', 'hello world') -
	exp(-flexmore_score('cls', 'hello world') /
		array_length(flexmore_tokenize('cls', 'hello world'), 1))) < 1e-9 AS perplexity_formula;
SELECT flexmore_perplexity('cls', '') IS NULL AS empty_perplexity_is_null;

-- flexmore_classify_scores: one entry per label; a label's tokens are
-- ' ' || label tokenized on its own; the probabilities add up to 1.
SELECT jsonb_object_keys(flexmore_classify_scores('cls', 'the license', ARRAY['yes', 'no', 'maybe not']))
	AS label ORDER BY 1;
SELECT key,
	   (value ->> 'tokens')::int = array_length(flexmore_tokenize('cls', ' ' || key), 1) AS tokens_match,
	   (value ->> 'logprob')::float8 < 0 AS negative,
	   (value ->> 'probability')::float8 BETWEEN 0 AND 1 AS probability_in_range
FROM jsonb_each(flexmore_classify_scores('cls', 'the license', ARRAY['yes', 'no', 'maybe not']))
ORDER BY key;
SELECT abs(sum((value ->> 'probability')::float8) - 1) < 1e-12 AS probabilities_add_up
FROM jsonb_each(flexmore_classify_scores('cls', 'the license', ARRAY['yes', 'no', 'maybe not']));

-- A label's log-probability with the default template, from the logits:
-- prompt ids (boundary first), then the label's ids one by one.
SELECT abs((flexmore_classify_scores('cls', 'the license', ARRAY['maybe not']) -> 'maybe not' ->> 'logprob')::float8 -
	(SELECT sum(logprob_after(p || l[1:k - 1], l[k]))
	 FROM (SELECT 299 || flexmore_tokenize('cls', E'Text: the license\nLabel:') AS p,
	              flexmore_tokenize('cls', ' maybe not') AS l) AS t,
	      generate_series(1, array_length(l, 1)) AS k)) < 1e-4 AS label_matches_logits;

-- flexmore_classify returns the label of the highest log-probability.
SELECT flexmore_classify('cls', 'the license', ARRAY['yes', 'no', 'maybe not']) =
	(SELECT key FROM jsonb_each(flexmore_classify_scores('cls', 'the license', ARRAY['yes', 'no', 'maybe not']))
	 ORDER BY (value ->> 'logprob')::float8 DESC LIMIT 1) AS classify_is_best;
-- One label always wins with probability 1.
SELECT flexmore_classify('cls', 'x', ARRAY['only']) AS one_label,
	   flexmore_classify_scores('cls', 'x', ARRAY['only']) -> 'only' ->> 'probability' AS probability;

-- Templates: {input} may appear several times; a custom template changes the prompt.
SELECT flexmore_classify_scores('cls', 'a', ARRAY['b'], '{input} and {input}:') <>
	   flexmore_classify_scores('cls', 'a', ARRAY['b']) AS template_used;
SELECT abs((flexmore_classify_scores('cls', 'a', ARRAY['b'], '{input}{input}') -> 'b' ->> 'logprob')::float8 -
	(flexmore_classify_scores('cls', 'aa', ARRAY['b'], '{input}') -> 'b' ->> 'logprob')::float8) < 1e-9
	AS input_repeated;

-- experts restrict routing as in flexmore_logits.
SELECT flexmore_score('cls', 'hello', ARRAY['public', 'expert_1', 'expert_2', 'expert_3']) =
	   flexmore_score('cls', 'hello') AS all_experts_same,
	   flexmore_score('cls', 'hello', ARRAY['public']) <> flexmore_score('cls', 'hello') AS subset_differs;

-- flexmore_embed: hidden_size values.
SELECT array_length(flexmore_embed('cls', 'hello world'), 1) AS embedding_length;

-- NULL arguments give NULL; NULL template and experts take the defaults.
SELECT flexmore_classify(NULL, 'x', ARRAY['a']) IS NULL AS null_model,
	   flexmore_classify('cls', NULL, ARRAY['a']) IS NULL AS null_input,
	   flexmore_classify('cls', 'x', NULL) IS NULL AS null_labels,
	   flexmore_classify('cls', 'x', ARRAY['a', 'b'], NULL, NULL) =
	   flexmore_classify('cls', 'x', ARRAY['a', 'b']) AS null_defaults,
	   flexmore_score('cls', NULL) IS NULL AS null_score,
	   flexmore_embed('cls', NULL) IS NULL AS null_embed;

-- Batched forms: one row per element, in array order, equal to the per-row functions.
SELECT id, label IS NULL AS null_label, scores IS NULL AS null_scores
FROM flexmore_classify_batch('cls', ARRAY[3, 1, NULL, 2]::bigint[],
							 ARRAY['hello', 'world', 'again', NULL], ARRAY['yes', 'no']);
SELECT bool_and(b.label = flexmore_classify('cls', t.body, ARRAY['yes', 'no', 'maybe not'])) AS same_labels,
	   bool_and(abs((b.scores -> 'maybe not' ->> 'logprob')::float8 -
					(flexmore_classify_scores('cls', t.body, ARRAY['yes', 'no', 'maybe not']) -> 'maybe not' ->> 'logprob')::float8)
				<= 1e-5 * abs((b.scores -> 'maybe not' ->> 'logprob')::float8)) AS same_scores
FROM (VALUES (1, 'hello'), (2, 'Rødgrød med fløde'), (3, 'the license')) AS t(id, body)
JOIN flexmore_classify_batch('cls', ARRAY[1, 2, 3]::bigint[],
							 ARRAY['hello', 'Rødgrød med fløde', 'the license'],
							 ARRAY['yes', 'no', 'maybe not']) AS b ON b.id = t.id;
SELECT id, abs(score - flexmore_score('cls', body)) <= 1e-5 * abs(score) AS same_score,
	   tokens = coalesce(array_length(flexmore_tokenize('cls', body), 1), 0) AS token_count
FROM (VALUES (1, 'hello'), (2, ''), (3, 'Rødgrød med fløde')) AS t(id, body)
JOIN flexmore_score_batch('cls', ARRAY[1, 2, 3]::bigint[], ARRAY['hello', '', 'Rødgrød med fløde'])
	USING (id) ORDER BY id;
SELECT count(*) AS no_rows FROM flexmore_score_batch('cls', NULL, ARRAY['a']);
SELECT count(*) AS empty FROM flexmore_score_batch('cls', '{}'::bigint[], '{}'::text[]);

-- Read-only transactions work.
BEGIN READ ONLY;
SELECT flexmore_classify('cls', 'x', ARRAY['a', 'b']) IN ('a', 'b') AS read_only_ok;
COMMIT;

-- Errors.
SELECT flexmore_classify('cls', 'x', ARRAY['a'], 'no mark here');
SELECT flexmore_classify('cls', 'x', ARRAY[]::text[]);
SELECT flexmore_classify('cls', 'x', ARRAY['a', NULL]);
SELECT flexmore_classify('cls', 'x', ARRAY['a', 'b', 'a']);
SELECT flexmore_classify('cls', 'x', ARRAY[['a'], ['b']]);
SELECT flexmore_classify('nope', 'x', ARRAY['a']);
SELECT flexmore_score('cls', 'x', ARRAY['nobody']);
SELECT flexmore_score('cls', 'x', ARRAY[]::text[]);
SELECT flexmore_embed('cls', '');
SELECT * FROM flexmore_score_batch('cls', ARRAY[1, 2]::bigint[], ARRAY['a']);
SELECT * FROM flexmore_classify_batch('cls', ARRAY[1]::bigint[], ARRAY['a'], ARRAY['a'], 'plain');
SET flexmore.max_context = 4;
SELECT flexmore_score('cls', 'hello world, hello again');
SELECT flexmore_classify('cls', 'a longer input', ARRAY['a'], '{input}');
RESET flexmore.max_context;

DROP FUNCTION logprob_after(int[], int);
SELECT flexmore_drop_model('cls');
