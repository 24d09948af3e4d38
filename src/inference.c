/*-------------------------------------------------------------------------
 *
 * inference.c
 *	  SQL functions that run the forward pass: flexmore_logits,
 *	  flexmore_generate and flexmore_generate_detail.
 *
 * Each call builds an engine session (KV cache plus activations) in a
 * memory context of its own, sized for this call's context and checked
 * against flexmore.max_call_memory first.  The weights come from the
 * backend's model cache and are only read.  Nothing here writes to the
 * database, so these functions run in read-only transactions, on hot
 * standbys and in parallel workers.
 *
 * Cancellation: the engine polls fm_interrupt_pending between layers and
 * tokens and returns FM_ECANCELED when an interrupt is pending.  The call
 * then runs CHECK_FOR_INTERRUPTS(), which raises the cancel (57014) or
 * terminate error.  An interrupt that raises nothing (a catch-up or
 * barrier signal, say) has been served by then, and the call starts over
 * with the same seed, which gives the same result.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(flexmore_logits);
PG_FUNCTION_INFO_V1(flexmore_generate);
PG_FUNCTION_INFO_V1(flexmore_generate_detail);

/*
 * Returns the context limit of a call: flexmore.max_context, capped by the
 * model's max_position_embeddings.
 */
static int32
fm_context_limit(const fm_cached_model *entry)
{
	return Min(flexmore_max_context, entry->model.config.max_position_embeddings);
}

/* Raises an error when n prompt tokens do not fit in the context. */
static void
fm_check_prompt_length(const fm_cached_model *entry, int n, const char *what)
{
	int32		limit = fm_context_limit(entry);

	if (n <= limit)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
			 errmsg("%s has %d tokens, more than the context of %d tokens", what, n, limit),
			 errdetail("The context is the smaller of flexmore.max_context (%d) and the max_position_embeddings of model \"%s\" (%d).",
					   flexmore_max_context, entry->name,
					   entry->model.config.max_position_embeddings),
			 errhint("Shorten the input, or raise flexmore.max_context if the model allows it.")));
}

/* Raises an error when a session of context_len tokens needs too much memory. */
static void
fm_check_call_memory(const fm_cached_model *entry, int32 context_len)
{
	size_t		need = fm_session_bytes(&entry->model.config, context_len);
	size_t		limit = (size_t) flexmore_max_call_memory * 1024;

	if (need <= limit)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
			 errmsg("a call with a context of %d tokens needs %zu kB, more than flexmore.max_call_memory (%d kB)",
					context_len, (need + 1023) / 1024, flexmore_max_call_memory),
			 errdetail("The KV cache and activations of model \"%s\" grow with the context.",
					   entry->name),
			 errhint("Raise flexmore.max_call_memory, or use fewer tokens (max_tokens, flexmore.max_context).")));
}

/*
 * Fills allowed[num_experts] with the experts a call may route to: those
 * named in the experts argument (NULL: every expert) that the calling
 * role may use now (fm_governance_apply).  The argument can narrow the
 * set, never widen it.  Raises an error for a null or unknown name, for
 * an empty array and when no expert is left.
 */
static void
fm_experts_mask(const fm_cached_model *entry, ArrayType *experts, bool *allowed)
{
	bool		named[FM_MAX_EXPERTS];
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	if (experts == NULL)
	{
		fm_governance_apply(entry, NULL, allowed);
		return;
	}

	memset(named, 0, sizeof(bool) * entry->num_experts);
	fm_check_array_1d(experts, "experts");
	deconstruct_array(experts, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("no expert left for model \"%s\"", entry->name),
				 errdetail("The experts argument is an empty array."),
				 errhint("Pass NULL to use every expert.")));

	for (int i = 0; i < n; i++)
	{
		char	   *name;
		int			e;

		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("experts must not contain nulls"),
					 errdetail("Element %d is null.", i + 1)));
		name = TextDatumGetCString(elems[i]);
		for (e = 0; e < entry->num_experts; e++)
			if (strcmp(entry->expert_names[e], name) == 0)
				break;
		if (e == entry->num_experts)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("expert \"%s\" does not exist in model \"%s\"", fm_quote_name(name), entry->name),
					 errhint("The expert names are in the expert_names list of the model's config.json, or \"public\" and \"expert_<n>\" when it has none.")));
		named[e] = true;
	}
	fm_governance_apply(entry, named, allowed);
}

/* Creates a session for context_len tokens restricted to the allowed experts. */
static fm_session *
fm_call_session(const fm_cached_model *entry, const fm_allocator *a, int32 context_len,
				const bool *allowed)
{
	fm_session *session;
	fm_error	err = {0};

	fm_check_call_memory(entry, context_len);
	if (fm_session_create(&entry->model, a, context_len, &session, &err) != FM_OK)
		fm_raise(&err, psprintf("model \"%s\"", entry->name));
	if (fm_session_set_experts(session, allowed, &err) != FM_OK)
		fm_raise(&err, psprintf("model \"%s\"", entry->name));
	return session;
}

/*
 * flexmore_logits(model_name text, ids int[], experts text[]) returns the
 * vocab_size next-token logits after ids.
 */
Datum
flexmore_logits(PG_FUNCTION_ARGS)
{
	char	   *model_name;
	fm_cached_model *entry;
	int			n;
	int32	   *ids;
	bool		allowed[FM_MAX_EXPERTS];
	MemoryContext call_cxt;
	fm_allocator a;
	fm_session *session;
	float	   *logits;
	int32		vocab;
	fm_status	status;
	fm_error	err = {0};
	Datum	   *elems;
	ArrayType  *result;
	fm_route_tally tally;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	ids = fm_array_to_ids(PG_GETARG_ARRAYTYPE_P(1), "ids", &n);
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("ids must not be empty")));

	/* weights are pinned below, for the allowed experts only (shared cache) */
	entry = fm_model_get(model_name, false);
	vocab = entry->model.config.vocab_size;
	for (int i = 0; i < n; i++)
		if (ids[i] < 0 || ids[i] >= vocab)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("token id %d is outside the vocabulary of model \"%s\"",
							ids[i], model_name),
					 errdetail("Ids must be from 0 to %d.", vocab - 1)));
	fm_check_prompt_length(entry, n, "ids");
	fm_experts_mask(entry, PG_ARGISNULL(2) ? NULL : PG_GETARG_ARRAYTYPE_P(2), allowed);
	fm_model_use_weights(entry, allowed);

	call_cxt = AllocSetContextCreate(CurrentMemoryContext, "flexmore call",
									 ALLOCSET_DEFAULT_SIZES);
	fm_allocator_init(&a, call_cxt);
	session = fm_call_session(entry, &a, n, allowed);
	fm_usage_begin(&tally, entry);
	fm_usage_attach(&tally, session);
	logits = palloc(sizeof(float) * vocab);

	for (;;)
	{
		status = fm_forward(session, ids, n, logits, fm_interrupt_pending, NULL, &err);
		if (status != FM_ECANCELED)
			break;
		CHECK_FOR_INTERRUPTS();
		fm_session_reset(session);
		fm_usage_restart(&tally);
	}
	if (status != FM_OK)
		fm_raise(&err, psprintf("model \"%s\"", model_name));
	fm_session_destroy(session);
	MemoryContextDelete(call_cxt);
	fm_model_release(entry);
	fm_usage_commit(&tally, entry);

	elems = palloc(sizeof(Datum) * vocab);
	for (int32 i = 0; i < vocab; i++)
		elems[i] = Float4GetDatum(logits[i]);
	result = construct_array(elems, vocab, FLOAT4OID, sizeof(float4), true, TYPALIGN_INT);
	PG_RETURN_ARRAYTYPE_P(result);
}

/* The arguments and outcome of one generation. */
typedef struct fm_generation
{
	char	   *model_name;
	text	   *prompt;
	int32		max_tokens;
	fm_sampler_params params;
	ArrayType  *experts;		/* NULL: every expert */

	text	   *completion;
	fm_finish	finish;
	int			prompt_tokens;
	int			completion_tokens;
} fm_generation;

/*
 * Reads and checks the arguments shared by flexmore_generate and
 * flexmore_generate_detail.  Returns false when an argument that must not
 * be NULL is NULL.
 */
static bool
fm_generation_args(FunctionCallInfo fcinfo, fm_generation *g)
{
	double		temperature;
	double		top_p;
	int32		top_k;
	double		repetition_penalty;

	/*
	 * A database whose extension is still at 0.1.0 calls this library
	 * through the 8-argument declaration, which has no repetition_penalty.
	 */
	bool		has_penalty = PG_NARGS() > 8;

	for (int i = 0; i <= 5; i++)
		if (PG_ARGISNULL(i))
			return false;
	if (has_penalty && PG_ARGISNULL(8))
		return false;

	g->model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	g->prompt = PG_GETARG_TEXT_PP(1);
	g->max_tokens = PG_GETARG_INT32(2);
	temperature = PG_GETARG_FLOAT8(3);
	top_p = PG_GETARG_FLOAT8(4);
	top_k = PG_GETARG_INT32(5);
	repetition_penalty = has_penalty ? PG_GETARG_FLOAT8(8) : 1.0;

	if (g->max_tokens < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_tokens must be 0 or more, not %d", g->max_tokens)));
	if (isnan(temperature) || isinf(temperature) || temperature < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("temperature must be a finite number of 0 or more, not %g", temperature),
				 errdetail("Temperature 0 picks the most likely token at every step.")));
	if (isnan(top_p) || top_p <= 0 || top_p > 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("top_p must be greater than 0 and at most 1, not %g", top_p),
				 errdetail("top_p 1 turns nucleus sampling off.")));
	if (top_k < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("top_k must be 0 or more, not %d", top_k),
				 errdetail("top_k 0 turns top-k sampling off.")));
	if (isnan(repetition_penalty) || isinf(repetition_penalty) || repetition_penalty <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("repetition_penalty must be a finite number greater than 0, not %g",
						repetition_penalty),
				 errdetail("repetition_penalty 1 turns the penalty off; values above 1 make repeated tokens less likely.")));

	g->params.temperature = temperature;
	g->params.top_p = top_p;
	g->params.top_k = top_k;
	g->params.repetition_penalty = repetition_penalty;
	if (PG_ARGISNULL(6))
		g->params.seed = pg_prng_uint64(&pg_global_prng_state);
	else
		g->params.seed = (uint64) PG_GETARG_INT64(6);
	g->experts = PG_ARGISNULL(7) ? NULL : PG_GETARG_ARRAYTYPE_P(7);
	return true;
}

/* Runs one generation and fills the outcome fields of g. */
static void
fm_generation_run(fm_generation *g)
{
	fm_cached_model *entry;
	int32	   *prompt;
	bool		allowed[FM_MAX_EXPERTS];
	int32		limit;
	int32		context_len;
	MemoryContext call_cxt;
	fm_allocator a;
	fm_session *session;
	int32	   *out;
	int32_t		n_out = 0;
	fm_status	status;
	fm_error	err = {0};
	fm_route_tally tally;

	/* weights are pinned below, for the allowed experts only (shared cache) */
	entry = fm_model_get(g->model_name, false);
	prompt = fm_encode_prompt(entry, g->prompt, "prompt", &g->prompt_tokens);
	if (g->prompt_tokens == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("prompt must not be empty"),
				 errdetail("Generation continues from the prompt's last token, and the prompt has none.")));
	fm_check_prompt_length(entry, g->prompt_tokens, "prompt");
	fm_experts_mask(entry, g->experts, allowed);

	g->completion_tokens = 0;
	g->finish = FM_FINISH_MAX_TOKENS;
	if (g->max_tokens == 0)
	{
		g->completion = cstring_to_text("");
		return;
	}

	fm_model_use_weights(entry, allowed);
	limit = fm_context_limit(entry);
	context_len = (int32) Min((int64) g->prompt_tokens + g->max_tokens, (int64) limit);

	call_cxt = AllocSetContextCreate(CurrentMemoryContext, "flexmore call",
									 ALLOCSET_DEFAULT_SIZES);
	fm_allocator_init(&a, call_cxt);
	session = fm_call_session(entry, &a, context_len, allowed);
	fm_usage_begin(&tally, entry);
	fm_usage_attach(&tally, session);

	/* The engine stops at a full context, so it never returns more ids than this. */
	out = palloc(sizeof(int32) * ((size_t) Min(g->max_tokens, context_len) + 1));

	for (;;)
	{
		status = fm_generate(session, prompt, g->prompt_tokens, g->max_tokens,
							 &g->params, entry->sampleable, out, &n_out, &g->finish,
							 fm_interrupt_pending, NULL, &err);
		if (status != FM_ECANCELED)
			break;
		CHECK_FOR_INTERRUPTS();
		fm_session_reset(session);
		fm_usage_restart(&tally);
	}
	if (status != FM_OK)
		fm_raise(&err, psprintf("model \"%s\"", g->model_name));
	fm_session_destroy(session);
	MemoryContextDelete(call_cxt);
	fm_model_release(entry);
	fm_usage_commit(&tally, entry);

	g->completion_tokens = n_out;
	g->completion = fm_decode_ids(entry, out, n_out);
}

/*
 * flexmore_generate(model_name, prompt, max_tokens, temperature, top_p,
 * top_k, seed, experts, repetition_penalty) returns the completion without
 * the prompt.
 */
Datum
flexmore_generate(PG_FUNCTION_ARGS)
{
	fm_generation g;

	if (!fm_generation_args(fcinfo, &g))
		PG_RETURN_NULL();
	fm_generation_run(&g);
	PG_RETURN_TEXT_P(g.completion);
}

/*
 * flexmore_generate_detail(same arguments) returns one row: completion,
 * finish_reason, prompt_tokens, completion_tokens.
 */
Datum
flexmore_generate_detail(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	fm_generation g;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};

	InitMaterializedSRF(fcinfo, 0);
	if (!fm_generation_args(fcinfo, &g))
		return (Datum) 0;
	fm_generation_run(&g);

	values[0] = PointerGetDatum(g.completion);
	values[1] = CStringGetTextDatum(fm_finish_name(g.finish));
	values[2] = Int32GetDatum(g.prompt_tokens);
	values[3] = Int32GetDatum(g.completion_tokens);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	return (Datum) 0;
}

/* ---------- checks shared with the scoring functions (classify.c) ---------- */

int32
fm_call_context_limit(const fm_cached_model *entry)
{
	return fm_context_limit(entry);
}

void
fm_call_check_length(const fm_cached_model *entry, int n, const char *what)
{
	fm_check_prompt_length(entry, n, what);
}

void
fm_call_experts_mask(const fm_cached_model *entry, ArrayType *experts, bool *allowed)
{
	fm_experts_mask(entry, experts, allowed);
}

fm_session *
fm_call_create_session(const fm_cached_model *entry, const fm_allocator *a,
					   int32 context_len, const bool *allowed)
{
	return fm_call_session(entry, a, context_len, allowed);
}
