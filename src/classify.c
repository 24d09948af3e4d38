/*-------------------------------------------------------------------------
 *
 * classify.c
 *	  SQL functions that score text instead of generating it:
 *	  flexmore_classify, flexmore_classify_scores, flexmore_score,
 *	  flexmore_perplexity, flexmore_embed, and the batched
 *	  flexmore_classify_batch and flexmore_score_batch.
 *
 * Sequences.  Scoring and classification start every sequence with a
 * document boundary id, which is conditioned on and never scored: the
 * model's first eos_token_id, else its bos_token_id.  A model with
 * neither starts with the text itself, and its first token is then not
 * scored.  flexmore_embed adds no boundary.
 *
 * Labels.  A classification prompt is the template with every "{input}"
 * replaced by the row's text.  Label j continues it with the text
 * ' ' || label, tokenized on its own, so its ids are the same for every
 * row, and its score is the sum of the log-probabilities of those ids
 * after the prompt's ids.  Tokenizing prompt || ' ' || label as one
 * string can give other ids where a pre-token spans the boundary (a
 * template that ends in a space, say); docs/classify.md shows a case.
 * Log-probabilities are normalised over the ids the tokenizer defines,
 * which are the ids that generation can sample.
 *
 * One code path.  The per-row functions and the batched ones both run
 * groups of sequences through one engine session (a group of one for the
 * per-row functions): the prompts go through the model together, then
 * each label's ids (all but the last) run after every prompt, and each
 * sequence is rolled back to the end of its prompt before the next label.
 * Results therefore differ between paths only by the summation order of
 * the matrix products.
 *
 * Memory.  A per-row function keeps its session and lm_head scratch for
 * the whole query in fn_extra, and resets a scratch context at every
 * row, so memory does not grow with the number of rows.  A batched call
 * resets its scratch context at every group of rows.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/float.h"
#include "utils/json.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(flexmore_classify);
PG_FUNCTION_INFO_V1(flexmore_classify_scores);
PG_FUNCTION_INFO_V1(flexmore_score);
PG_FUNCTION_INFO_V1(flexmore_perplexity);
PG_FUNCTION_INFO_V1(flexmore_embed);
PG_FUNCTION_INFO_V1(flexmore_classify_batch);
PG_FUNCTION_INFO_V1(flexmore_score_batch);

#define FM_DEFAULT_TEMPLATE "Text: {input}\nLabel:"
#define FM_INPUT_MARK "{input}"

/* Maximum number of sequences that a batched call runs through one session. */
#define FM_BATCH_SEQUENCES 64

/* The labels of a classification, tokenized once per call. */
typedef struct fm_labels
{
	int			n;
	text	  **names;			/* [n] as given, for the results */
	int32	  **ids;			/* [n] ids of ' ' || label */
	int		   *len;			/* [n] at least 1 */
	int			max_len;
} fm_labels;

/* Per-query state of a per-row function, kept in fn_extra. */
typedef struct fm_row_state
{
	MemoryContext query_cxt;	/* the session and scratch, for the query */
	MemoryContext row_cxt;		/* reset at every row */
	fm_allocator allocator;		/* over query_cxt */
	const fm_cached_model *entry;	/* the model the session was built for */
	int64		entry_id;
	int64		entry_generation;
	fm_session *session;
	int32		capacity;		/* positions of the session */
	float	   *scratch;		/* [FM_LOGPROB_ROWS, scratch_vocab] */
	int32		scratch_vocab;
} fm_row_state;

/* ---------- small helpers ---------- */

/*
 * Returns true when status is FM_OK.  After FM_ECANCELED it serves the
 * interrupt, which raises the cancel error, and returns false when the
 * interrupt raised nothing, so the caller starts its work over.  Any
 * other status is raised.
 */
static bool
fm_engine_ok(fm_status status, const fm_error *err, const fm_cached_model *entry)
{
	if (status == FM_OK)
		return true;
	if (status == FM_ECANCELED)
	{
		CHECK_FOR_INTERRUPTS();
		return false;
	}
	fm_raise(err, psprintf("model \"%s\"", entry->name));
}

/* The id that starts every scored sequence, or -1 when the model has none. */
static int32
fm_boundary_id(const fm_cached_model *entry)
{
	const fm_config *c = &entry->model.config;

	if (c->num_eos > 0)
		return c->eos_token_ids[0];
	return c->bos_token_id;
}

/* Encodes text with the boundary id first (when the model has one). */
static int32 *
fm_encode_scored(fm_cached_model *entry, text *input, int *n)
{
	int32		boundary = fm_boundary_id(entry);
	int			n_text;
	int32	   *text_ids = fm_encode_text(entry, input, false, &n_text);
	int32	   *ids;

	if (boundary < 0)
	{
		*n = n_text;
		return text_ids;
	}
	ids = palloc(sizeof(int32) * (n_text + 1));
	ids[0] = boundary;
	memcpy(ids + 1, text_ids, sizeof(int32) * n_text);
	*n = n_text + 1;
	return ids;
}

/* Checks a template and returns it as a C string in the database encoding. */
static char *
fm_template_string(text *template)
{
	char	   *s;

	if (template == NULL)
		return pstrdup(FM_DEFAULT_TEMPLATE);
	s = text_to_cstring(template);
	if (strstr(s, FM_INPUT_MARK) == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("template \"%s\" does not contain {input}", s),
				 errdetail("{input} marks where each row's text goes in the prompt."),
				 errhint("Pass NULL for the default template, '%s'.",
						 "Text: {input}\\nLabel:")));
	return s;
}

/* Returns the template with every {input} replaced by input. */
static text *
fm_fill_template(const char *template, text *input)
{
	StringInfoData buf;
	const char *at = template;
	const char *mark;
	size_t		mark_len = strlen(FM_INPUT_MARK);

	initStringInfo(&buf);
	while ((mark = strstr(at, FM_INPUT_MARK)) != NULL)
	{
		appendBinaryStringInfo(&buf, at, mark - at);
		appendBinaryStringInfo(&buf, VARDATA_ANY(input), VARSIZE_ANY_EXHDR(input));
		at = mark + mark_len;
	}
	appendStringInfoString(&buf, at);
	return cstring_to_text_with_len(buf.data, buf.len);
}

/* Checks the labels argument and tokenizes ' ' || label for each. */
static fm_labels *
fm_labels_read(fm_cached_model *entry, ArrayType *array)
{
	fm_labels  *labels = palloc0(sizeof(fm_labels));
	Datum	   *elems;
	bool	   *nulls;

	if (ARR_NDIM(array) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("labels must be a one-dimensional array, not %d-dimensional",
						ARR_NDIM(array))));
	deconstruct_array(array, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &labels->n);
	if (labels->n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("labels must not be empty"),
				 errhint("Pass at least one label, such as ARRAY['positive', 'negative'].")));

	labels->names = palloc(sizeof(text *) * labels->n);
	labels->ids = palloc(sizeof(int32 *) * labels->n);
	labels->len = palloc(sizeof(int) * labels->n);
	for (int j = 0; j < labels->n; j++)
	{
		text	   *continuation;
		char	   *name;

		if (nulls[j])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("labels must not contain nulls"),
					 errdetail("Element %d is null.", j + 1)));
		labels->names[j] = DatumGetTextPP(elems[j]);
		name = text_to_cstring(labels->names[j]);
		for (int i = 0; i < j; i++)
			if (strcmp(name, text_to_cstring(labels->names[i])) == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("label \"%s\" appears more than once in labels", name),
						 errdetail("Elements %d and %d are equal.", i + 1, j + 1)));
		continuation = cstring_to_text(psprintf(" %s", name));
		labels->ids[j] = fm_encode_text(entry, continuation, false, &labels->len[j]);
		labels->max_len = Max(labels->max_len, labels->len[j]);
	}
	return labels;
}

/* Raises 54000 when a session of n_seq x context_len exceeds flexmore.max_call_memory. */
static void
fm_check_session_memory(const fm_cached_model *entry, int32 n_seq, int32 context_len)
{
	size_t		need = fm_session_multi_bytes(&entry->model.config, n_seq, context_len);
	size_t		limit = (size_t) flexmore_max_call_memory * 1024;

	if (need <= limit)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
			 errmsg_plural("scoring %d sequence of up to %d tokens needs %zu kB, more than flexmore.max_call_memory (%d kB)",
						   "scoring %d sequences of up to %d tokens needs %zu kB, more than flexmore.max_call_memory (%d kB)",
						   n_seq,
						   n_seq, context_len, (need + 1023) / 1024, flexmore_max_call_memory),
			 errdetail("The KV cache and activations of model \"%s\" grow with the context.",
					   entry->name),
			 errhint("Raise flexmore.max_call_memory, or shorten the inputs or the template.")));
}

/* ---------- the engine work, shared by every path ---------- */

/*
 * Scores labels after g prompts in session (g sequences): out[i * L + j]
 * receives the summed log-probability of label j after prompt i.
 * Returns false when an interrupt that raised nothing stopped the work;
 * the caller then starts over.  Allocates in the current context.
 */
static bool
fm_classify_group(fm_session *s, fm_cached_model *entry, int32 *const *prompts,
				  const int *np, int g, const fm_labels *labels, float *scratch,
				  double *out)
{
	const fm_model *model = &entry->model;
	int32		hidden_size = model->config.hidden_size;
	int			n_labels = labels->n;
	int			total = 0;
	int32	   *ids;
	int32	   *seqs;
	float	   *hidden;
	float	   *last;
	int32	   *targets;
	fm_error	err = {0};

	fm_session_reset(s);
	for (int i = 0; i < g; i++)
		total += np[i];
	ids = palloc(sizeof(int32) * total);
	seqs = palloc(sizeof(int32) * total);
	for (int i = 0, r = 0; i < g; i++)
		for (int t = 0; t < np[i]; t++, r++)
		{
			ids[r] = prompts[i][t];
			seqs[r] = i;
		}

	/* every prompt, then the first id of every label from its last row */
	hidden = palloc(sizeof(float) * (size_t) total * hidden_size);
	if (!fm_engine_ok(fm_forward_multi(s, ids, seqs, total, hidden,
									   fm_interrupt_pending, NULL, &err), &err, entry))
		return false;
	last = palloc(sizeof(float) * (size_t) g * hidden_size);
	targets = palloc(sizeof(int32) * g * n_labels);
	for (int i = 0, end = 0; i < g; i++)
	{
		end += np[i];
		memcpy(last + (size_t) i * hidden_size, hidden + (size_t) (end - 1) * hidden_size,
			   sizeof(float) * hidden_size);
		for (int j = 0; j < n_labels; j++)
			targets[i * n_labels + j] = labels->ids[j][0];
	}
	if (!fm_engine_ok(fm_token_logprobs(model, entry->sampleable, last, g, targets,
										n_labels, out, scratch, &err), &err, entry))
		return false;

	/* the rest of each label: run all ids but the last after every prompt */
	for (int j = 0; j < n_labels; j++)
	{
		int			m1 = labels->len[j] - 1;
		int			rows = g * m1;
		double	   *lp;

		if (m1 == 0)
			continue;
		ids = palloc(sizeof(int32) * rows);
		seqs = palloc(sizeof(int32) * rows);
		targets = palloc(sizeof(int32) * rows);
		for (int i = 0; i < g; i++)
			for (int t = 0; t < m1; t++)
			{
				ids[i * m1 + t] = labels->ids[j][t];
				seqs[i * m1 + t] = i;
				targets[i * m1 + t] = labels->ids[j][t + 1];
			}
		hidden = palloc(sizeof(float) * (size_t) rows * hidden_size);
		lp = palloc(sizeof(double) * rows);
		if (!fm_engine_ok(fm_forward_multi(s, ids, seqs, rows, hidden,
										   fm_interrupt_pending, NULL, &err), &err, entry) ||
			!fm_engine_ok(fm_token_logprobs(model, entry->sampleable, hidden, rows, targets, 1,
											lp, scratch, &err), &err, entry))
			return false;
		for (int i = 0; i < g; i++)
		{
			for (int t = 0; t < m1; t++)
				out[i * n_labels + j] += lp[i * m1 + t];
			if (fm_session_seq_truncate(s, i, np[i], &err) != FM_OK)
				fm_raise(&err, NULL);
		}
	}
	return true;
}

/*
 * Scores g sequences in session: out[i] receives the sum of the
 * log-probabilities of ids[i][1 .. n[i]), each given the ids before it.
 * Returns false as fm_classify_group does.
 */
static bool
fm_score_group(fm_session *s, fm_cached_model *entry, int32 *const *seq_ids,
			   const int *n, int g, float *scratch, double *out)
{
	const fm_model *model = &entry->model;
	int32		hidden_size = model->config.hidden_size;
	int			total = 0;
	int32	   *ids;
	int32	   *seqs;
	int32	   *targets;
	float	   *hidden;
	double	   *lp;
	fm_error	err = {0};

	fm_session_reset(s);
	for (int i = 0; i < g; i++)
	{
		total += n[i];
		out[i] = 0.0;
	}
	if (total == 0)
		return true;

	ids = palloc(sizeof(int32) * total);
	seqs = palloc(sizeof(int32) * total);
	targets = palloc(sizeof(int32) * total);
	for (int i = 0, r = 0; i < g; i++)
		for (int t = 0; t < n[i]; t++, r++)
		{
			ids[r] = seq_ids[i][t];
			seqs[r] = i;
			targets[r] = t + 1 < n[i] ? seq_ids[i][t + 1] : -1;
		}

	hidden = palloc(sizeof(float) * (size_t) total * hidden_size);
	lp = palloc(sizeof(double) * total);
	if (!fm_engine_ok(fm_forward_multi(s, ids, seqs, total, hidden,
									   fm_interrupt_pending, NULL, &err), &err, entry) ||
		!fm_engine_ok(fm_token_logprobs(model, entry->sampleable, hidden, total, targets, 1,
										lp, scratch, &err), &err, entry))
		return false;
	for (int r = 0; r < total; r++)
		if (targets[r] >= 0)
			out[seqs[r]] += lp[r];
	return true;
}

/* ---------- results ---------- */

/* Index of the largest log-probability; ties go to the first label. */
static int
fm_best_label(const double *logprob, int n)
{
	int			best = 0;

	for (int j = 1; j < n; j++)
		if (logprob[j] > logprob[best])
			best = j;
	return best;
}

/*
 * Builds {"label": {"logprob": x, "probability": p, "tokens": m}, ...},
 * where p is the softmax of the log-probabilities over the labels.
 */
static Datum
fm_scores_jsonb(const fm_labels *labels, const double *logprob)
{
	StringInfoData buf;
	double		max = logprob[fm_best_label(logprob, labels->n)];
	double		sum = 0.0;

	for (int j = 0; j < labels->n; j++)
		sum += exp(logprob[j] - max);

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	for (int j = 0; j < labels->n; j++)
	{
		if (j > 0)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, text_to_cstring(labels->names[j]));
		appendStringInfoString(&buf, ": {\"logprob\": ");
		if (isfinite(logprob[j]))
			appendStringInfoString(&buf, float8out_internal(logprob[j]));
		else
			appendStringInfoString(&buf, "null");
		appendStringInfo(&buf, ", \"probability\": %s, \"tokens\": %d}",
						 float8out_internal(exp(logprob[j] - max) / sum), labels->len[j]);
	}
	appendStringInfoChar(&buf, '}');
	return DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data));
}

/* ---------- per-row functions ---------- */

/* Returns the per-query state of a per-row function, creating it on the first row. */
static fm_row_state *
fm_row_state_get(FunctionCallInfo fcinfo)
{
	fm_row_state *st = fcinfo->flinfo->fn_extra;

	if (st == NULL)
	{
		MemoryContext query_cxt = AllocSetContextCreate(fcinfo->flinfo->fn_mcxt,
														"flexmore scoring",
														ALLOCSET_DEFAULT_SIZES);

		st = MemoryContextAllocZero(query_cxt, sizeof(fm_row_state));
		st->query_cxt = query_cxt;
		st->row_cxt = AllocSetContextCreate(query_cxt, "flexmore scoring row",
											ALLOCSET_DEFAULT_SIZES);
		fm_allocator_init(&st->allocator, query_cxt);
		fcinfo->flinfo->fn_extra = st;
	}
	MemoryContextReset(st->row_cxt);
	return st;
}

/*
 * Returns a one-sequence session of at least need positions for entry,
 * reusing the query's session when it fits and was built for the same
 * model version.  The session is restricted to the allowed experts.
 */
static fm_session *
fm_row_session(fm_row_state *st, fm_cached_model *entry, int32 need, const bool *allowed)
{
	fm_error	err = {0};

	if (st->session != NULL &&
		(st->entry != entry || st->entry_id != entry->id ||
		 st->entry_generation != entry->generation || st->capacity < need))
	{
		fm_session_destroy(st->session);
		st->session = NULL;
	}
	if (st->session == NULL)
	{
		/* round up so that a table of similar rows builds one session */
		int32		capacity = Min(Max(need, ((need + 63) / 64) * 64),
								   fm_call_context_limit(entry));

		fm_check_session_memory(entry, 1, capacity);
		if (fm_session_create_multi(&entry->model, &st->allocator, 1, capacity,
									&st->session, &err) != FM_OK)
			fm_raise(&err, psprintf("model \"%s\"", entry->name));
		st->capacity = capacity;
		st->entry = entry;
		st->entry_id = entry->id;
		st->entry_generation = entry->generation;
	}
	if (st->scratch_vocab != entry->model.config.vocab_size)
	{
		if (st->scratch != NULL)
			pfree(st->scratch);
		st->scratch = NULL;
		st->scratch = MemoryContextAllocExtended(st->query_cxt,
												 sizeof(float) * FM_LOGPROB_ROWS *
												 (size_t) entry->model.config.vocab_size,
												 MCXT_ALLOC_HUGE);
		st->scratch_vocab = entry->model.config.vocab_size;
	}
	if (fm_session_set_experts(st->session, allowed, &err) != FM_OK)
		fm_raise(&err, psprintf("model \"%s\"", entry->name));
	return st->session;
}

/* The arguments of flexmore_classify and flexmore_classify_scores. */
typedef struct fm_classify_args
{
	char	   *model_name;
	text	   *input;
	ArrayType  *labels;
	text	   *template;		/* NULL: the default */
	ArrayType  *experts;		/* NULL: every expert */
} fm_classify_args;

/* Reads the arguments; false when model_name, input or labels is NULL. */
static bool
fm_classify_args_read(FunctionCallInfo fcinfo, fm_classify_args *args)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		return false;
	args->model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	args->input = PG_GETARG_TEXT_PP(1);
	args->labels = PG_GETARG_ARRAYTYPE_P(2);
	args->template = PG_ARGISNULL(3) ? NULL : PG_GETARG_TEXT_PP(3);
	args->experts = PG_ARGISNULL(4) ? NULL : PG_GETARG_ARRAYTYPE_P(4);
	return true;
}

/*
 * Classifies one row: fills *labels_out and logprob (allocated in the
 * row context, which is current on return).
 */
static void
fm_classify_row(FunctionCallInfo fcinfo, const fm_classify_args *args,
				fm_labels **labels_out, double **logprob_out)
{
	fm_row_state *st = fm_row_state_get(fcinfo);
	MemoryContext caller_cxt = MemoryContextSwitchTo(st->row_cxt);
	fm_cached_model *entry;
	char	   *template;
	fm_labels  *labels;
	int32	   *prompt;
	int			np;
	bool		allowed[FM_MAX_EXPERTS];
	fm_session *session;
	double	   *logprob;
	fm_route_tally tally;

	template = fm_template_string(args->template);
	entry = fm_model_get(args->model_name, true);
	labels = fm_labels_read(entry, args->labels);
	prompt = fm_encode_scored(entry, fm_fill_template(template, args->input), &np);
	if (np == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("prompt must not be empty"),
				 errdetail("Model \"%s\" has no eos or bos id to start the prompt with, and the filled template has no tokens.",
						   entry->name)));
	fm_call_check_length(entry, np + labels->max_len - 1, "prompt with its longest label");
	fm_call_experts_mask(entry, args->experts, allowed);

	session = fm_row_session(st, entry, np + labels->max_len - 1, allowed);
	logprob = palloc(sizeof(double) * labels->n);
	fm_usage_begin(&tally, entry);
	fm_usage_attach(&tally, session);
	while (!fm_classify_group(session, entry, &prompt, &np, 1, labels, st->scratch, logprob))
		fm_usage_restart(&tally);
	fm_session_set_route_hook(session, NULL, NULL);
	fm_usage_commit(&tally, entry);
	*labels_out = labels;
	*logprob_out = logprob;
	MemoryContextSwitchTo(caller_cxt);
}

/*
 * flexmore_classify(model_name, input, labels, template, experts) returns
 * the label with the highest log-probability after the prompt.
 */
Datum
flexmore_classify(PG_FUNCTION_ARGS)
{
	fm_classify_args args;
	fm_labels  *labels;
	double	   *logprob;
	int			best;

	if (!fm_classify_args_read(fcinfo, &args))
		PG_RETURN_NULL();
	fm_classify_row(fcinfo, &args, &labels, &logprob);
	best = fm_best_label(logprob, labels->n);
	PG_RETURN_TEXT_P(DatumGetTextPCopy(PointerGetDatum(labels->names[best])));
}

/*
 * flexmore_classify_scores(same arguments) returns every label's
 * log-probability, probability over the labels, and token count as jsonb.
 */
Datum
flexmore_classify_scores(PG_FUNCTION_ARGS)
{
	fm_classify_args args;
	fm_labels  *labels;
	double	   *logprob;

	if (!fm_classify_args_read(fcinfo, &args))
		PG_RETURN_NULL();
	fm_classify_row(fcinfo, &args, &labels, &logprob);
	PG_RETURN_DATUM(fm_scores_jsonb(labels, logprob));
}

/*
 * Scores one input: returns its total log-likelihood and sets *tokens to
 * the number of scored tokens.
 */
static double
fm_score_row(FunctionCallInfo fcinfo, int *tokens)
{
	fm_row_state *st = fm_row_state_get(fcinfo);
	MemoryContext caller_cxt = MemoryContextSwitchTo(st->row_cxt);
	char	   *model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	fm_cached_model *entry;
	int32	   *ids;
	int			n;
	bool		allowed[FM_MAX_EXPERTS];
	double		score = 0.0;

	entry = fm_model_get(model_name, true);
	ids = fm_encode_scored(entry, PG_GETARG_TEXT_PP(1), &n);
	fm_call_check_length(entry, n, "input");
	fm_call_experts_mask(entry, PG_ARGISNULL(2) ? NULL : PG_GETARG_ARRAYTYPE_P(2), allowed);
	*tokens = Max(n - 1, 0);
	if (n > 1)
	{
		fm_session *session = fm_row_session(st, entry, n, allowed);
		fm_route_tally tally;

		fm_usage_begin(&tally, entry);
		fm_usage_attach(&tally, session);
		while (!fm_score_group(session, entry, &ids, &n, 1, st->scratch, &score))
			fm_usage_restart(&tally);
		fm_session_set_route_hook(session, NULL, NULL);
		fm_usage_commit(&tally, entry);
	}
	MemoryContextSwitchTo(caller_cxt);
	return score;
}

/*
 * flexmore_score(model_name, input, experts) returns the sum of the
 * log-probabilities of the input's tokens, each given the boundary id
 * and the tokens before it.  0 for an input without tokens.
 */
Datum
flexmore_score(PG_FUNCTION_ARGS)
{
	int			tokens;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	PG_RETURN_FLOAT8(fm_score_row(fcinfo, &tokens));
}

/*
 * flexmore_perplexity(model_name, input, experts) returns
 * exp(-score / scored tokens), or NULL when no token is scored.
 */
Datum
flexmore_perplexity(PG_FUNCTION_ARGS)
{
	int			tokens;
	double		score;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	score = fm_score_row(fcinfo, &tokens);
	if (tokens == 0)
		PG_RETURN_NULL();
	PG_RETURN_FLOAT8(exp(-score / tokens));
}

/*
 * flexmore_embed(model_name, input, experts) returns the mean over the
 * input's positions of the hidden state after the final norm.  No
 * boundary id is added.
 */
Datum
flexmore_embed(PG_FUNCTION_ARGS)
{
	fm_row_state *st;
	MemoryContext caller_cxt;
	fm_cached_model *entry;
	int32	   *ids;
	int			n;
	bool		allowed[FM_MAX_EXPERTS];
	fm_session *session;
	int32		hidden_size;
	float	   *hidden;
	double	   *mean;
	Datum	   *elems;
	fm_error	err = {0};
	fm_route_tally tally;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	st = fm_row_state_get(fcinfo);
	caller_cxt = MemoryContextSwitchTo(st->row_cxt);

	entry = fm_model_get(text_to_cstring(PG_GETARG_TEXT_PP(0)), true);
	ids = fm_encode_text(entry, PG_GETARG_TEXT_PP(1), false, &n);
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("input must not be empty"),
				 errdetail("An embedding is the mean over the input's tokens, and it has none.")));
	fm_call_check_length(entry, n, "input");
	fm_call_experts_mask(entry, PG_ARGISNULL(2) ? NULL : PG_GETARG_ARRAYTYPE_P(2), allowed);
	session = fm_row_session(st, entry, n, allowed);

	hidden_size = entry->model.config.hidden_size;
	hidden = palloc(sizeof(float) * (size_t) n * hidden_size);
	fm_usage_begin(&tally, entry);
	fm_usage_attach(&tally, session);
	do
	{
		fm_session_reset(session);
		fm_usage_restart(&tally);
	} while (!fm_engine_ok(fm_forward_hidden(session, ids, n, hidden, fm_interrupt_pending,
											 NULL, &err), &err, entry));
	fm_session_set_route_hook(session, NULL, NULL);
	fm_usage_commit(&tally, entry);

	mean = palloc0(sizeof(double) * hidden_size);
	for (int t = 0; t < n; t++)
		for (int d = 0; d < hidden_size; d++)
			mean[d] += hidden[(size_t) t * hidden_size + d];

	MemoryContextSwitchTo(caller_cxt);
	elems = palloc(sizeof(Datum) * hidden_size);
	for (int d = 0; d < hidden_size; d++)
		elems[d] = Float4GetDatum((float4) (mean[d] / n));
	PG_RETURN_ARRAYTYPE_P(construct_array(elems, hidden_size, FLOAT4OID, sizeof(float4),
										  true, TYPALIGN_INT));
}

/* ---------- batched functions ---------- */

/* The ids and inputs arrays of a batched call, deconstructed. */
typedef struct fm_batch_rows
{
	int			n;
	Datum	   *ids;
	bool	   *id_nulls;
	Datum	   *inputs;
	bool	   *input_nulls;
} fm_batch_rows;

static void
fm_batch_rows_read(ArrayType *ids, ArrayType *inputs, fm_batch_rows *rows)
{
	int			n_ids;

	if (ARR_NDIM(ids) > 1 || ARR_NDIM(inputs) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("ids and inputs must be one-dimensional arrays")));
	deconstruct_array(ids, INT8OID, sizeof(int64), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
					  &rows->ids, &rows->id_nulls, &n_ids);
	deconstruct_array(inputs, TEXTOID, -1, false, TYPALIGN_INT,
					  &rows->inputs, &rows->input_nulls, &rows->n);
	if (n_ids != rows->n)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("ids has %d elements but inputs has %d", n_ids, rows->n),
				 errhint("Build both arrays in one query, such as array_agg(id ORDER BY id) and array_agg(body ORDER BY id).")));
}

/*
 * Picks how many sequences of up to context_len positions one session
 * may hold: at most FM_BATCH_SEQUENCES and at most rows, halved until the
 * session fits flexmore.max_call_memory (one sequence must fit).
 */
static int
fm_batch_group_size(const fm_cached_model *entry, int rows, int32 context_len)
{
	int			g = Min(rows, FM_BATCH_SEQUENCES);
	size_t		limit = (size_t) flexmore_max_call_memory * 1024;

	while (g > 1 && fm_session_multi_bytes(&entry->model.config, g, context_len) > limit)
		g /= 2;
	fm_check_session_memory(entry, Max(g, 1), context_len);
	return Max(g, 1);
}

/* Creates a session of g sequences in the current context. */
static fm_session *
fm_batch_session(fm_cached_model *entry, int g, int32 context_len, const bool *allowed,
				 fm_allocator *a)
{
	fm_session *s;
	fm_error	err = {0};

	fm_allocator_init(a, CurrentMemoryContext);
	if (fm_session_create_multi(&entry->model, a, g, context_len, &s, &err) != FM_OK ||
		fm_session_set_experts(s, allowed, &err) != FM_OK)
		fm_raise(&err, psprintf("model \"%s\"", entry->name));
	return s;
}

/*
 * flexmore_classify_batch(model_name, ids, inputs, labels, template,
 * experts) returns (id, label, scores) for every element of inputs, in
 * array order, computing up to FM_BATCH_SEQUENCES rows per session.
 */
Datum
flexmore_classify_batch(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	fm_cached_model *entry;
	char	   *template;
	fm_labels  *labels;
	fm_batch_rows rows;
	bool		allowed[FM_MAX_EXPERTS];
	int32	  **prompts;
	int		   *np;
	float	   *scratch;
	MemoryContext group_cxt;
	MemoryContext caller_cxt;
	fm_route_tally call_tally;
	fm_route_tally part_tally;

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i <= 3; i++)
		if (PG_ARGISNULL(i))
			return (Datum) 0;

	template = fm_template_string(PG_ARGISNULL(4) ? NULL : PG_GETARG_TEXT_PP(4));
	entry = fm_model_get(text_to_cstring(PG_GETARG_TEXT_PP(0)), true);
	labels = fm_labels_read(entry, PG_GETARG_ARRAYTYPE_P(3));
	fm_batch_rows_read(PG_GETARG_ARRAYTYPE_P(1), PG_GETARG_ARRAYTYPE_P(2), &rows);
	fm_call_experts_mask(entry, PG_ARGISNULL(5) ? NULL : PG_GETARG_ARRAYTYPE_P(5), allowed);
	fm_usage_begin(&call_tally, entry);
	fm_usage_begin(&part_tally, entry);

	scratch = MemoryContextAllocExtended(CurrentMemoryContext,
										 sizeof(float) * FM_LOGPROB_ROWS *
										 (size_t) entry->model.config.vocab_size,
										 MCXT_ALLOC_HUGE);
	prompts = palloc(sizeof(int32 *) * FM_BATCH_SEQUENCES);
	np = palloc(sizeof(int) * FM_BATCH_SEQUENCES);
	group_cxt = AllocSetContextCreate(CurrentMemoryContext, "flexmore batch group",
									  ALLOCSET_DEFAULT_SIZES);

	for (int start = 0; start < rows.n;)
	{
		int			g = 0;
		int			max_np = 0;
		int			row_of[FM_BATCH_SEQUENCES];
		int			end;
		fm_allocator a;
		fm_session *session;
		double	   *logprob = NULL;

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(group_cxt);
		caller_cxt = MemoryContextSwitchTo(group_cxt);

		/* tokenize the group's prompts; a null input gives a row of nulls */
		for (end = start; end < rows.n && g < FM_BATCH_SEQUENCES; end++)
		{
			if (rows.input_nulls[end])
				continue;
			prompts[g] = fm_encode_scored(entry,
										  fm_fill_template(template,
														   DatumGetTextPP(rows.inputs[end])),
										  &np[g]);
			if (np[g] == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("prompt of element %d must not be empty", end + 1),
						 errdetail("Model \"%s\" has no eos or bos id to start the prompt with, and the filled template has no tokens.",
								   entry->name)));
			fm_call_check_length(entry, np[g] + labels->max_len - 1,
								 "prompt with its longest label");
			max_np = Max(max_np, np[g]);
			row_of[g++] = end;
		}

		if (g > 0)
		{
			int32		context_len = max_np + labels->max_len - 1;
			int			done = 0;

			logprob = palloc(sizeof(double) * g * labels->n);
			while (done < g)
			{
				int			part = fm_batch_group_size(entry, g - done, context_len);

				session = fm_batch_session(entry, part, context_len, allowed, &a);
				fm_usage_attach(&part_tally, session);
				while (!fm_classify_group(session, entry, prompts + done, np + done, part,
										  labels, scratch, logprob + done * labels->n))
					fm_usage_restart(&part_tally);
				fm_usage_merge(&call_tally, &part_tally);
				fm_session_destroy(session);
				done += part;
			}
		}

		MemoryContextSwitchTo(caller_cxt);
		for (int r = start, i = 0; r < end; r++)
		{
			Datum		values[3];
			bool		nulls[3] = {rows.id_nulls[r], true, true};

			values[0] = rows.id_nulls[r] ? (Datum) 0 : rows.ids[r];
			if (i < g && row_of[i] == r)
			{
				double	   *lp = logprob + i * labels->n;

				values[1] = PointerGetDatum(labels->names[fm_best_label(lp, labels->n)]);
				values[2] = fm_scores_jsonb(labels, lp);
				nulls[1] = nulls[2] = false;
				i++;
			}
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
		start = end;
	}
	MemoryContextDelete(group_cxt);
	fm_usage_commit(&call_tally, entry);
	return (Datum) 0;
}

/*
 * flexmore_score_batch(model_name, ids, inputs, experts) returns (id,
 * score, tokens) for every element of inputs, in array order.
 */
Datum
flexmore_score_batch(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	fm_cached_model *entry;
	fm_batch_rows rows;
	bool		allowed[FM_MAX_EXPERTS];
	int32	  **seq_ids;
	int		   *n;
	float	   *scratch;
	MemoryContext group_cxt;
	MemoryContext caller_cxt;
	fm_route_tally call_tally;
	fm_route_tally part_tally;

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i <= 2; i++)
		if (PG_ARGISNULL(i))
			return (Datum) 0;

	entry = fm_model_get(text_to_cstring(PG_GETARG_TEXT_PP(0)), true);
	fm_batch_rows_read(PG_GETARG_ARRAYTYPE_P(1), PG_GETARG_ARRAYTYPE_P(2), &rows);
	fm_call_experts_mask(entry, PG_ARGISNULL(3) ? NULL : PG_GETARG_ARRAYTYPE_P(3), allowed);
	fm_usage_begin(&call_tally, entry);
	fm_usage_begin(&part_tally, entry);

	scratch = MemoryContextAllocExtended(CurrentMemoryContext,
										 sizeof(float) * FM_LOGPROB_ROWS *
										 (size_t) entry->model.config.vocab_size,
										 MCXT_ALLOC_HUGE);
	seq_ids = palloc(sizeof(int32 *) * FM_BATCH_SEQUENCES);
	n = palloc(sizeof(int) * FM_BATCH_SEQUENCES);
	group_cxt = AllocSetContextCreate(CurrentMemoryContext, "flexmore batch group",
									  ALLOCSET_DEFAULT_SIZES);

	for (int start = 0; start < rows.n;)
	{
		int			g = 0;
		int			max_n = 1;
		int			row_of[FM_BATCH_SEQUENCES];
		double		score[FM_BATCH_SEQUENCES];
		int			end;

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(group_cxt);
		caller_cxt = MemoryContextSwitchTo(group_cxt);

		for (end = start; end < rows.n && g < FM_BATCH_SEQUENCES; end++)
		{
			if (rows.input_nulls[end])
				continue;
			seq_ids[g] = fm_encode_scored(entry, DatumGetTextPP(rows.inputs[end]), &n[g]);
			fm_call_check_length(entry, n[g], "input");
			max_n = Max(max_n, n[g]);
			row_of[g++] = end;
		}

		for (int done = 0; done < g;)
		{
			int			part = fm_batch_group_size(entry, g - done, max_n);
			fm_allocator a;
			fm_session *session = fm_batch_session(entry, part, max_n, allowed, &a);

			fm_usage_attach(&part_tally, session);
			while (!fm_score_group(session, entry, seq_ids + done, n + done, part, scratch,
								   score + done))
				fm_usage_restart(&part_tally);
			fm_usage_merge(&call_tally, &part_tally);
			fm_session_destroy(session);
			done += part;
		}

		MemoryContextSwitchTo(caller_cxt);
		for (int r = start, i = 0; r < end; r++)
		{
			Datum		values[3];
			bool		nulls[3] = {rows.id_nulls[r], true, true};

			values[0] = rows.id_nulls[r] ? (Datum) 0 : rows.ids[r];
			if (i < g && row_of[i] == r)
			{
				values[1] = Float8GetDatum(score[i]);
				values[2] = Int32GetDatum(Max(n[i] - 1, 0));
				nulls[1] = nulls[2] = false;
				i++;
			}
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
		start = end;
	}
	MemoryContextDelete(group_cxt);
	fm_usage_commit(&call_tally, entry);
	return (Datum) 0;
}
