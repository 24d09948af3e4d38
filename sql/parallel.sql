-- Inference in parallel workers: each worker loads the model itself
-- (SPI as the extension owner) and returns what a serial run returns.

\getenv models FLEXMORE_TEST_MODELS
SELECT flexmore_import('par', :'models' || '/flex_olmo_f32') > 0 AS imported;

CREATE TABLE par_prompts (id int PRIMARY KEY, prompt text NOT NULL)
	WITH (parallel_workers = 2);
INSERT INTO par_prompts VALUES
	(1, 'rødgrød med fløde'),
	(2, 'Ærø og Åbenrå'),
	(3, 'blåbær på øen, æbler i haven'),
	(4, 'hello world'),
	(5, 'the quick brown fox'),
	(6, 'Once upon a time');
ANALYZE par_prompts;

-- Returns the "Workers Launched" lines of EXPLAIN ANALYZE for a query.
CREATE FUNCTION par_workers_launched(query text) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
	line text;
BEGIN
	FOR line IN EXECUTE 'EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) ' || query LOOP
		IF line ~ 'Workers Launched' THEN
			RETURN NEXT btrim(line);
		END IF;
	END LOOP;
END $$;

-- The same query runs serially and in parallel below.
CREATE VIEW par_results AS
SELECT id,
	   flexmore_tokenize('par', prompt) AS ids,
	   flexmore_detokenize('par', flexmore_tokenize('par', prompt)) AS round_trip,
	   flexmore_logits('par', flexmore_tokenize('par', prompt)) AS logits,
	   flexmore_generate('par', prompt, 8) AS greedy,
	   flexmore_generate('par', prompt, 8, temperature => 1, seed => id) AS sampled
FROM par_prompts;

-- Serial run, stored for the comparison.
SET max_parallel_workers_per_gather = 0;
CREATE TABLE par_serial AS SELECT * FROM par_results;
SELECT count(*) AS round_trips FROM par_serial p JOIN par_prompts USING (id)
WHERE p.round_trip = par_prompts.prompt;

-- Every row below runs in a worker: the leader takes no part.
SET force_parallel_mode = regress;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
SET parallel_leader_participation = off;

-- The calls sit in the Parallel Seq Scan's output list, so workers run them.
EXPLAIN (COSTS OFF, VERBOSE)
SELECT id, flexmore_generate('par', prompt, 8) FROM par_prompts;
SELECT * FROM par_workers_launched('SELECT * FROM par_results');

-- Parallel results equal the serial ones, row by row.
CREATE TABLE par_parallel AS SELECT * FROM par_results;
SELECT count(*) AS rows FROM par_parallel;
SELECT count(*) AS differing_rows
FROM par_serial s FULL JOIN par_parallel p USING (id)
WHERE s.ids IS DISTINCT FROM p.ids
   OR s.round_trip IS DISTINCT FROM p.round_trip
   OR s.logits IS DISTINCT FROM p.logits
   OR s.greedy IS DISTINCT FROM p.greedy
   OR s.sampled IS DISTINCT FROM p.sampled;

-- A plain role runs the parallel query too: workers switch to the
-- extension owner to read the tables.
CREATE ROLE regress_flexmore_parallel;
GRANT SELECT ON par_prompts, par_serial TO regress_flexmore_parallel;
SET ROLE regress_flexmore_parallel;
SELECT * FROM par_workers_launched(
	'SELECT flexmore_generate(''par'', prompt, 8, temperature => 1, seed => id) FROM par_prompts');
SELECT count(*) AS differing_rows
FROM par_serial s
	 JOIN (SELECT id,
				  flexmore_logits('par', flexmore_tokenize('par', prompt)) AS logits,
				  flexmore_generate('par', prompt, 8, temperature => 1, seed => id) AS sampled
		   FROM par_prompts) p USING (id)
WHERE s.logits IS DISTINCT FROM p.logits OR s.sampled IS DISTINCT FROM p.sampled;
RESET ROLE;

-- Settings reach the workers: a context limit set in the leader makes
-- the worker raise the leader's error.
SET flexmore.max_context = 4;
SELECT id, flexmore_generate('par', prompt, 8) FROM par_prompts WHERE id = 4;
RESET flexmore.max_context;

RESET parallel_leader_participation;
RESET max_parallel_workers_per_gather;
RESET min_parallel_table_scan_size;
RESET parallel_tuple_cost;
RESET parallel_setup_cost;
RESET force_parallel_mode;

DROP OWNED BY regress_flexmore_parallel;
DROP ROLE regress_flexmore_parallel;
DROP VIEW par_results;
DROP TABLE par_serial, par_parallel, par_prompts;
DROP FUNCTION par_workers_launched(text);
SELECT flexmore_drop_model('par');
