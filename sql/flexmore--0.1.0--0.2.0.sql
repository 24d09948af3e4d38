-- flexmore 0.1.0 to 0.2.0.  Every object added or changed here must also
-- be in flexmore--0.2.0.sql; test/server/upgrade.sh checks that an updated
-- installation and a fresh one hold the same objects.

\echo Use "ALTER EXTENSION flexmore UPDATE TO '0.2.0'" to load this file. \quit

-- ---------- import from large objects, expert packages, factorizing ----------
-- Administration, like flexmore_import: EXECUTE is revoked from PUBLIC,
-- and when flexmore.admin_role names a role, callers also need the
-- privileges of that role.  Large objects are read with the caller's
-- privileges; the caller unlinks them afterwards.

CREATE FUNCTION flexmore_import_lo(model_name text, files jsonb,
								   replace boolean DEFAULT false)
RETURNS bigint
AS 'MODULE_PATHNAME', 'flexmore_import_lo'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE COST 1000000
SET search_path = pg_catalog, pg_temp;

-- expert_name NULL takes the package's own name for its expert 1.
CREATE FUNCTION flexmore_add_expert(model_name text, source_dir text,
									expert_name text DEFAULT NULL)
RETURNS int
AS 'MODULE_PATHNAME', 'flexmore_add_expert'
LANGUAGE C VOLATILE PARALLEL UNSAFE COST 1000000
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION flexmore_add_expert_lo(model_name text, files jsonb,
									   expert_name text DEFAULT NULL)
RETURNS int
AS 'MODULE_PATHNAME', 'flexmore_add_expert_lo'
LANGUAGE C VOLATILE PARALLEL UNSAFE COST 1000000
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION flexmore_remove_expert(model_name text, expert_name text)
RETURNS void
AS 'MODULE_PATHNAME', 'flexmore_remove_expert'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE COST 100000
SET search_path = pg_catalog, pg_temp;

-- method is 'auto', 'exact' or 'randomized'.  relative_error is
-- ||W_e - (W_0 + B A)||_F / ||W_e - W_0||_F for each replaced matrix.
CREATE FUNCTION flexmore_factorize_expert(model_name text, expert_name text,
										  rank int, method text DEFAULT 'auto')
RETURNS TABLE (layer int, matrix text, relative_error float8)
AS 'MODULE_PATHNAME', 'flexmore_factorize_expert'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE COST 10000000 ROWS 96
SET search_path = pg_catalog, pg_temp;

REVOKE EXECUTE ON FUNCTION flexmore_import_lo(text, jsonb, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION flexmore_add_expert(text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION flexmore_add_expert_lo(text, jsonb, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION flexmore_remove_expert(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION flexmore_factorize_expert(text, text, int, text) FROM PUBLIC;

-- Scoring and classification (src/classify.c, docs/classify.md).  Each
-- sequence starts with the model's first eos id as a document boundary,
-- conditioned on and not scored.  A label is scored as the text
-- ' ' || label tokenized on its own after the prompt's ids.  NULL
-- template and experts mean the default template and every expert; a
-- NULL in any other argument gives NULL (or no rows).  STABLE and
-- PARALLEL SAFE, so a query over a table can use parallel workers; the
-- costs (100000 per row, about a millisecond or more of work) let the
-- planner choose them.

CREATE FUNCTION flexmore_classify(model_name text, input text, labels text[],
								  template text DEFAULT NULL,
								  experts text[] DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'flexmore_classify'
LANGUAGE C STABLE PARALLEL SAFE COST 100000
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION flexmore_classify_scores(model_name text, input text, labels text[],
										 template text DEFAULT NULL,
										 experts text[] DEFAULT NULL)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'flexmore_classify_scores'
LANGUAGE C STABLE PARALLEL SAFE COST 100000
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION flexmore_score(model_name text, input text,
							   experts text[] DEFAULT NULL)
RETURNS float8
AS 'MODULE_PATHNAME', 'flexmore_score'
LANGUAGE C STABLE PARALLEL SAFE COST 100000
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION flexmore_perplexity(model_name text, input text,
									experts text[] DEFAULT NULL)
RETURNS float8
AS 'MODULE_PATHNAME', 'flexmore_perplexity'
LANGUAGE C STABLE PARALLEL SAFE COST 100000
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION flexmore_embed(model_name text, input text,
							   experts text[] DEFAULT NULL)
RETURNS real[]
AS 'MODULE_PATHNAME', 'flexmore_embed'
LANGUAGE C STABLE PARALLEL SAFE COST 100000
SET search_path = pg_catalog, pg_temp;

-- Batched forms: one call over arrays runs up to 64 rows through each
-- matrix product.  One row per element of inputs, in array order; a NULL
-- element gives NULL result columns.
CREATE FUNCTION flexmore_classify_batch(model_name text, ids bigint[], inputs text[],
										labels text[], template text DEFAULT NULL,
										experts text[] DEFAULT NULL)
RETURNS TABLE (id bigint, label text, scores jsonb)
AS 'MODULE_PATHNAME', 'flexmore_classify_batch'
LANGUAGE C STABLE PARALLEL SAFE COST 10000000 ROWS 1000
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION flexmore_score_batch(model_name text, ids bigint[], inputs text[],
									 experts text[] DEFAULT NULL)
RETURNS TABLE (id bigint, score float8, tokens int)
AS 'MODULE_PATHNAME', 'flexmore_score_batch'
LANGUAGE C STABLE PARALLEL SAFE COST 10000000 ROWS 1000
SET search_path = pg_catalog, pg_temp;

-- ---------- shared weight cache ----------
-- With flexmore in shared_preload_libraries, model weights live once in
-- shared memory for every connection (docs/cache.md).  The view lists
-- the items of the cache in every database, so it is readable by
-- pg_read_all_stats rather than PUBLIC; loading and evicting are granted
-- by a DBA.

CREATE FUNCTION flexmore_cache_entries(
	OUT dbid oid, OUT model text, OUT expert text, OUT bytes bigint,
	OUT generation bigint, OUT state text, OUT users int, OUT hits bigint,
	OUT last_used timestamptz, OUT kind text, OUT format text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'flexmore_cache_entries'
LANGUAGE C VOLATILE PARALLEL SAFE ROWS 100
SET search_path = pg_catalog, pg_temp;

-- One row per cached item: the shared part of a model (expert NULL) or one
-- expert, both of kind 'weights', or the model's parsed tokenizer (kind
-- 'tokenizer', expert NULL).  users counts the pins of running calls; hits
-- counts the pins that found the item already loaded.  format is the
-- weight format of a weights item (flexmore.weight_format when it was
-- loaded), NULL for the tokenizer.
CREATE VIEW flexmore_cache AS
SELECT d.datname AS database,
	   c.model,
	   c.expert,
	   c.bytes,
	   c.generation,
	   c.state,
	   c.users,
	   c.hits,
	   c.last_used,
	   c.kind,
	   c.format
FROM flexmore_cache_entries() c
LEFT JOIN pg_catalog.pg_database d ON d.oid = c.dbid;

-- Loads the shared part and the named experts (NULL: all) of a model into
-- the cache; returns their size in bytes.
CREATE FUNCTION flexmore_cache_load(model_name text, experts text[] DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'flexmore_cache_load'
LANGUAGE C VOLATILE PARALLEL RESTRICTED COST 1000000
SET search_path = pg_catalog, pg_temp;

-- Frees a model's cached items in this database; returns how many were
-- freed at once (items in use are freed when their calls end).
CREATE FUNCTION flexmore_cache_evict(model_name text)
RETURNS int
AS 'MODULE_PATHNAME', 'flexmore_cache_evict'
LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED COST 1000
SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON FUNCTION flexmore_cache_entries() FROM PUBLIC;
REVOKE ALL ON flexmore_cache FROM PUBLIC;
GRANT SELECT ON flexmore_cache TO pg_read_all_stats;
-- A view's functions are checked against the querying role, so the view's
-- readers need EXECUTE on the function behind it too.
GRANT EXECUTE ON FUNCTION flexmore_cache_entries() TO pg_read_all_stats;
REVOKE EXECUTE ON FUNCTION flexmore_cache_load(text, text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION flexmore_cache_evict(text) FROM PUBLIC;

-- ---------- expert governance (docs/governance.md) ----------
-- Metadata and state of each expert.  An expert is routed to only while
-- enabled is true and consent is 'granted', and only for roles it is
-- granted to (flexmore.expert_grants).  Empty metadata is NULL.

ALTER TABLE flexmore.experts
	ADD COLUMN owner text,
	ADD COLUMN domain text,
	ADD COLUMN description text,
	ADD COLUMN licence text,
	ADD COLUMN consent text NOT NULL DEFAULT 'granted'
		CONSTRAINT experts_consent_check CHECK (consent IN ('granted', 'withdrawn')),
	ADD COLUMN enabled boolean NOT NULL DEFAULT true,
	ADD COLUMN created timestamptz NOT NULL DEFAULT now(),
	ADD COLUMN updated timestamptz NOT NULL DEFAULT now();

-- Which roles may use an expert.  grantee 0 (shown as '-') is PUBLIC.  A
-- grant follows a rename of its expert and goes with the expert when it
-- is removed.  regrole dumps and restores as the role's name.
CREATE TABLE flexmore.expert_grants (
	model_id bigint NOT NULL,
	expert_name text NOT NULL,
	grantee regrole NOT NULL,
	granted timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (model_id, expert_name, grantee),
	FOREIGN KEY (model_id, expert_name) REFERENCES flexmore.experts (model_id, name)
		ON UPDATE CASCADE ON DELETE CASCADE
);
SELECT pg_catalog.pg_extension_config_dump('flexmore.expert_grants', '');
REVOKE ALL ON flexmore.expert_grants FROM PUBLIC;

-- Administration, like flexmore_remove_expert: EXECUTE is revoked from
-- PUBLIC, and flexmore.admin_role applies.  In flexmore_expert_set a NULL
-- argument leaves its field unchanged and an empty string clears it.

CREATE FUNCTION flexmore_expert_set(model_name text, expert_name text,
									owner text DEFAULT NULL,
									domain text DEFAULT NULL,
									description text DEFAULT NULL,
									licence text DEFAULT NULL,
									consent text DEFAULT NULL)
RETURNS void
AS 'MODULE_PATHNAME', 'flexmore_expert_set'
LANGUAGE C VOLATILE PARALLEL UNSAFE COST 1000
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION flexmore_enable_expert(model_name text, expert_name text)
RETURNS void
AS 'MODULE_PATHNAME', 'flexmore_enable_expert'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE COST 1000
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION flexmore_disable_expert(model_name text, expert_name text)
RETURNS void
AS 'MODULE_PATHNAME', 'flexmore_disable_expert'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE COST 1000
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION flexmore_rename_expert(model_name text, expert_name text, new_name text)
RETURNS void
AS 'MODULE_PATHNAME', 'flexmore_rename_expert'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE COST 1000
SET search_path = pg_catalog, pg_temp;

-- role_name is a role's name or 'PUBLIC'.
CREATE FUNCTION flexmore_grant_expert(model_name text, expert_name text, role_name text)
RETURNS void
AS 'MODULE_PATHNAME', 'flexmore_grant_expert'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE COST 1000
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION flexmore_revoke_expert(model_name text, expert_name text, role_name text)
RETURNS void
AS 'MODULE_PATHNAME', 'flexmore_revoke_expert'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE COST 1000
SET search_path = pg_catalog, pg_temp;

REVOKE EXECUTE ON FUNCTION flexmore_expert_set(text, text, text, text, text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION flexmore_enable_expert(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION flexmore_disable_expert(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION flexmore_rename_expert(text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION flexmore_grant_expert(text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION flexmore_revoke_expert(text, text, text) FROM PUBLIC;

-- Every expert of every model with its metadata, state and grantees.
-- Like pg_class.relacl, the grantees are visible to every role.
CREATE VIEW flexmore_experts AS
SELECT m.name AS model,
	   e.expert_index,
	   e.name AS expert,
	   e.rank,
	   e.owner,
	   e.domain,
	   e.description,
	   e.licence,
	   e.consent,
	   e.enabled,
	   ARRAY(SELECT CASE WHEN g.grantee::oid = 0 THEN 'PUBLIC' ELSE g.grantee::text END
			 FROM flexmore.expert_grants g
			 WHERE g.model_id = e.model_id AND g.expert_name = e.name
			 ORDER BY 1) AS grantees,
	   e.created,
	   e.updated
FROM flexmore.experts e
JOIN flexmore.models m ON m.id = e.model_id;

GRANT SELECT ON flexmore_experts TO PUBLIC;

-- Routing audit: one row per token position and layer (both from 0),
-- with the experts the router chose, highest weight first, and their
-- weights.  It uses the experts the caller may use, as flexmore_logits
-- does.  A NULL model_name or input gives no rows.
CREATE FUNCTION flexmore_route(model_name text, input text, experts text[] DEFAULT NULL)
RETURNS TABLE ("position" int, token_id int, token text, layer int,
			   experts text[], weights real[])
AS 'MODULE_PATHNAME', 'flexmore_route'
LANGUAGE C STABLE PARALLEL SAFE COST 100000 ROWS 100
SET search_path = pg_catalog, pg_temp;

-- Usage counters per database, model, expert and role: calls that routed
-- at least one token to the expert, and the token positions routed to it
-- in at least one layer.  Shared by every connection when flexmore is in
-- shared_preload_libraries, else per connection.  Readable by
-- pg_read_all_stats, like flexmore_cache.
CREATE FUNCTION flexmore_expert_usage_entries(
	OUT dbid oid, OUT model text, OUT expert text, OUT roleid oid,
	OUT calls bigint, OUT tokens bigint, OUT since timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'flexmore_expert_usage_entries'
LANGUAGE C VOLATILE PARALLEL RESTRICTED ROWS 100
SET search_path = pg_catalog, pg_temp;

CREATE VIEW flexmore_expert_usage AS
SELECT d.datname AS database,
	   u.model,
	   u.expert,
	   CASE WHEN a.rolname IS NULL THEN u.roleid::text ELSE a.rolname::text END AS role,
	   u.calls,
	   u.tokens,
	   u.since
FROM flexmore_expert_usage_entries() u
LEFT JOIN pg_catalog.pg_database d ON d.oid = u.dbid
LEFT JOIN pg_catalog.pg_roles a ON a.oid = u.roleid;

CREATE FUNCTION flexmore_expert_usage_reset()
RETURNS void
AS 'MODULE_PATHNAME', 'flexmore_expert_usage_reset'
LANGUAGE C VOLATILE PARALLEL RESTRICTED COST 1000
SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON FUNCTION flexmore_expert_usage_entries() FROM PUBLIC;
REVOKE ALL ON flexmore_expert_usage FROM PUBLIC;
GRANT SELECT ON flexmore_expert_usage TO pg_read_all_stats;
GRANT EXECUTE ON FUNCTION flexmore_expert_usage_entries() TO pg_read_all_stats;
REVOKE EXECUTE ON FUNCTION flexmore_expert_usage_reset() FROM PUBLIC;

-- Experts imported before 0.2.0 keep their behaviour: every role may use
-- them, as a newly imported expert is granted to PUBLIC.
INSERT INTO flexmore.expert_grants (model_id, expert_name, grantee)
SELECT model_id, name, 0::oid::regrole FROM flexmore.experts;

-- ---------- generation: repetition_penalty ----------
-- A new last argument changes the functions' signatures.  The new
-- functions are created beside the 0.1.0 ones, take over the EXECUTE
-- grants and revokes a DBA made on them, and then the old ones are
-- dropped.  Calls by position and by name keep working.

-- seed and experts may be NULL (a random seed, every expert).  A NULL in
-- any other argument gives NULL, as a STRICT function would.  VOLATILE
-- because a NULL seed draws a random one.  repetition_penalty divides the
-- positive logits of tokens already in the prompt or the completion by
-- itself and multiplies the negative ones (1 = off), as Hugging Face's
-- generate does; it is last so that calls by position keep working.
CREATE FUNCTION flexmore_generate(model_name text, prompt text,
								  max_tokens int DEFAULT 64,
								  temperature float8 DEFAULT 0,
								  top_p float8 DEFAULT 1,
								  top_k int DEFAULT 0,
								  seed bigint DEFAULT NULL,
								  experts text[] DEFAULT NULL,
								  repetition_penalty float8 DEFAULT 1)
RETURNS text
AS 'MODULE_PATHNAME', 'flexmore_generate'
LANGUAGE C VOLATILE PARALLEL SAFE COST 100000
SET search_path = pg_catalog, pg_temp;

-- Same as flexmore_generate, with why generation stopped ('eos',
-- 'max_tokens' or 'length' when the context is full) and token counts.
-- A NULL argument other than seed and experts gives no row.
CREATE FUNCTION flexmore_generate_detail(model_name text, prompt text,
										 max_tokens int DEFAULT 64,
										 temperature float8 DEFAULT 0,
										 top_p float8 DEFAULT 1,
										 top_k int DEFAULT 0,
										 seed bigint DEFAULT NULL,
										 experts text[] DEFAULT NULL,
										 repetition_penalty float8 DEFAULT 1)
RETURNS TABLE (completion text, finish_reason text,
			   prompt_tokens int, completion_tokens int)
AS 'MODULE_PATHNAME', 'flexmore_generate_detail'
LANGUAGE C VOLATILE PARALLEL SAFE COST 100000 ROWS 1
SET search_path = pg_catalog, pg_temp;

-- A NULL ACL is the default (EXECUTE for PUBLIC), which the new functions
-- already have.
DO $$
DECLARE
	fn record;
	item record;
BEGIN
	FOR fn IN SELECT p.proname, p.proacl FROM pg_catalog.pg_proc p
			  WHERE p.oid IN ('flexmore_generate(text, text, int, float8, float8, int, bigint, text[])'::regprocedure,
							  'flexmore_generate_detail(text, text, int, float8, float8, int, bigint, text[])'::regprocedure)
				AND p.proacl IS NOT NULL
	LOOP
		EXECUTE format('REVOKE ALL ON FUNCTION %I(text, text, int, float8, float8, int, bigint, text[], float8) FROM PUBLIC',
					   fn.proname);
		FOR item IN SELECT * FROM aclexplode(fn.proacl) LOOP
			EXECUTE format('GRANT EXECUTE ON FUNCTION %I(text, text, int, float8, float8, int, bigint, text[], float8) TO %s%s',
						   fn.proname,
						   CASE WHEN item.grantee = 0 THEN 'PUBLIC'
								ELSE quote_ident(pg_get_userbyid(item.grantee)) END,
						   CASE WHEN item.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
		END LOOP;
	END LOOP;
END
$$;

DROP FUNCTION flexmore_generate(text, text, int, float8, float8, int, bigint, text[]);
DROP FUNCTION flexmore_generate_detail(text, text, int, float8, float8, int, bigint, text[]);
