/*-------------------------------------------------------------------------
 *
 * sampler.c
 *	  Token sampling (greedy, temperature, top-k, top-p, repetition
 *	  penalty) and the generation loop.
 *
 * Only ids marked sampleable can come out: the embedding is padded past
 * the tokenizer's last id, and those rows can hold the largest logit.
 * Greedy decoding never touches the random generator, so it gives the
 * same ids for every seed.  Candidates are ordered by logit, ties by the
 * lower id, so sampling is deterministic for a given seed.
 *
 * The generator is splitmix64: one 64-bit state, a fixed sequence per
 * seed on every platform.
 *
 *-------------------------------------------------------------------------
 */
#include <math.h>
#include <string.h>

#include "engine/engine.h"
#include "engine/session.h"

void
fm_rng_seed(fm_rng *rng, uint64_t seed)
{
	rng->state = seed;
}

uint64_t
fm_rng_next(fm_rng *rng)
{
	uint64_t	z = (rng->state += UINT64_C(0x9e3779b97f4a7c15));

	z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
	return z ^ (z >> 31);
}

/* Uniform double in [0, 1) from the top 53 bits. */
static double
rng_uniform(fm_rng *rng)
{
	return (double) (fm_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0);
}

static bool
is_sampleable(const bool *sampleable, int32_t id)
{
	return sampleable == NULL || sampleable[id];
}

/* True when candidate a ranks before b: higher logit, then lower id. */
static inline bool
ranks_before(const float *logits, int32_t a, int32_t b)
{
	float		la = isnan(logits[a]) ? -INFINITY : logits[a];
	float		lb = isnan(logits[b]) ? -INFINITY : logits[b];

	return la > lb || (la == lb && a < b);
}

/*
 * Max-heap of candidate ids, best on top.  Popping moves the best
 * remaining id to the end of the heap area, so after m pops the ranked
 * candidates are ids[n-1], ids[n-2], ..., ids[n-m].  Sampling pops only
 * as many as top-k and top-p need instead of sorting the vocabulary.
 */
static void
sift_down(const float *logits, int32_t *ids, int32_t root, int32_t n)
{
	for (;;)
	{
		int32_t		best = root;
		int32_t		left = 2 * root + 1;
		int32_t		right = left + 1;
		int32_t		tmp;

		if (left < n && ranks_before(logits, ids[left], ids[best]))
			best = left;
		if (right < n && ranks_before(logits, ids[right], ids[best]))
			best = right;
		if (best == root)
			return;
		tmp = ids[root];
		ids[root] = ids[best];
		ids[best] = tmp;
		root = best;
	}
}

/* Pops the best id of heap ids[0..heap_n) to ids[heap_n - 1]. */
static void
heap_pop(const float *logits, int32_t *ids, int32_t heap_n)
{
	int32_t		tmp = ids[0];

	ids[0] = ids[heap_n - 1];
	ids[heap_n - 1] = tmp;
	sift_down(logits, ids, 0, heap_n - 1);
}

/* Highest logit among sampleable ids, ties to the lowest id; -1 if none. */
static int32_t
sample_greedy(const float *logits, const bool *sampleable, int32_t vocab_size)
{
	int32_t		best = -1;

	for (int32_t id = 0; id < vocab_size; id++)
	{
		if (!is_sampleable(sampleable, id))
			continue;
		if (best < 0 || ranks_before(logits, id, best))
			best = id;
	}
	return best;
}

int32_t
fm_sample(const float *logits, const bool *sampleable, int32_t vocab_size,
		  const fm_sampler_params *params, fm_rng *rng,
		  float *scratch_f, int32_t *scratch_i)
{
	int32_t    *ids = scratch_i;
	int32_t		n = 0;
	int32_t		limit;
	int32_t		popped = 0;
	int32_t		kept;
	float		max = -INFINITY;
	double		inv_temp;
	double		total = 0.0;
	double		mass = 0.0;
	double		u;

	/*
	 * A temperature so small that its inverse overflows (a subnormal
	 * double) is the greedy limit; scaling by infinity would give NaN.
	 */
	if (params->temperature <= 0.0 || isinf(1.0 / params->temperature))
		return sample_greedy(logits, sampleable, vocab_size);

	for (int32_t id = 0; id < vocab_size; id++)
	{
		if (!is_sampleable(sampleable, id) || isnan(logits[id]) ||
			logits[id] == -INFINITY)
			continue;
		ids[n++] = id;
		if (logits[id] > max)
			max = logits[id];
	}
	/* no finite candidate (or +inf): the distribution degenerates to argmax */
	if (n == 0 || isinf(max))
		return sample_greedy(logits, sampleable, vocab_size);

	inv_temp = 1.0 / params->temperature;
	limit = (params->top_k > 0 && params->top_k < n) ? params->top_k : n;

	for (int32_t i = n / 2 - 1; i >= 0; i--)
		sift_down(logits, ids, i, n);

	/* the softmax normaliser covers the top-k set, or every candidate */
	if (limit < n)
	{
		for (; popped < limit; popped++)
		{
			heap_pop(logits, ids, n - popped);
			total += exp((logits[ids[n - 1 - popped]] - max) * inv_temp);
		}
	}
	else
	{
		for (int32_t i = 0; i < n; i++)
			total += exp((logits[ids[i]] - max) * inv_temp);
	}

	/* top-p: the shortest ranked prefix whose probability reaches top_p */
	if (params->top_p < 1.0)
	{
		kept = 0;
		while (kept < limit)
		{
			if (kept == popped)
				heap_pop(logits, ids, n - popped++);
			mass += exp((logits[ids[n - 1 - kept]] - max) * inv_temp) / total;
			kept++;
			if (mass >= params->top_p)
				break;
		}

		u = rng_uniform(rng) * mass;
		for (int32_t j = 0; j < kept; j++)
		{
			int32_t		id = ids[n - 1 - j];

			u -= exp((logits[id] - max) * inv_temp) / total;
			if (u < 0.0)
				return id;
		}
		return ids[n - kept];
	}

	/* no top-p: sample among the top-k (popped) or all candidates */
	u = rng_uniform(rng) * total;
	if (limit < n)
	{
		for (int32_t j = 0; j < limit; j++)
		{
			int32_t		id = ids[n - 1 - j];

			u -= exp((logits[id] - max) * inv_temp);
			if (u < 0.0)
				return id;
		}
		return ids[n - limit];
	}
	for (int32_t i = 0; i < n; i++)
	{
		u -= exp((logits[ids[i]] - max) * inv_temp);
		if (u < 0.0)
			return ids[i];
	}
	return ids[n - 1];
}

static void
penalise(float *logits, int32_t vocab_size, double penalty,
		 const int32_t *ids, int32_t n, uint8_t *seen)
{
	for (int32_t i = 0; i < n; i++)
	{
		int32_t		id = ids[i];

		if (id < 0 || id >= vocab_size || seen[id])
			continue;
		seen[id] = 1;
		if (logits[id] > 0.0f)
			logits[id] = (float) (logits[id] / penalty);
		else
			logits[id] = (float) (logits[id] * penalty);
	}
}

static void
unmark(int32_t vocab_size, const int32_t *ids, int32_t n, uint8_t *seen)
{
	for (int32_t i = 0; i < n; i++)
		if (ids[i] >= 0 && ids[i] < vocab_size)
			seen[ids[i]] = 0;
}

void
fm_repetition_penalty(float *logits, int32_t vocab_size, double penalty,
					  const int32_t *ids, int32_t n,
					  const int32_t *more, int32_t n_more, uint8_t *seen)
{
	penalise(logits, vocab_size, penalty, ids, n, seen);
	penalise(logits, vocab_size, penalty, more, n_more, seen);
	unmark(vocab_size, ids, n, seen);
	unmark(vocab_size, more, n_more, seen);
}

static bool
is_eos(const fm_config *c, int32_t id)
{
	for (int32_t i = 0; i < c->num_eos; i++)
		if (c->eos_token_ids[i] == id)
			return true;
	return false;
}

static fm_status
check_params(const fm_sampler_params *params, int32_t max_tokens, fm_error *err)
{
	if (!(params->temperature >= 0.0) || !isfinite(params->temperature))
		return fm_set_error(err, FM_EINVAL,
							"temperature %g is invalid: it must be finite and >= 0",
							params->temperature);
	if (!(params->top_p > 0.0 && params->top_p <= 1.0))
		return fm_set_error(err, FM_EINVAL,
							"top_p %g is outside (0, 1]", params->top_p);
	if (params->top_k < 0)
		return fm_set_error(err, FM_EINVAL,
							"top_k %d is negative", params->top_k);
	if (!(params->repetition_penalty > 0.0) || !isfinite(params->repetition_penalty))
		return fm_set_error(err, FM_EINVAL,
							"repetition_penalty %g is invalid: it must be finite and > 0",
							params->repetition_penalty);
	if (max_tokens < 0)
		return fm_set_error(err, FM_EINVAL,
							"max_tokens %d is negative", max_tokens);
	return FM_OK;
}

/*
 * Generated ids and the prompt together never exceed the context: before
 * each sample the next id's position must be inside it.  The last id
 * sampled is not run through the model, since nothing would read its
 * logits, so the session ends one position short of the output.
 */
fm_status
fm_generate(fm_session *session, const int32_t *prompt, int32_t n_prompt,
			int32_t max_tokens, const fm_sampler_params *params,
			const bool *sampleable, int32_t *out, int32_t *n_out,
			fm_finish *finish, fm_interrupt_fn interrupt, void *arg,
			fm_error *err)
{
	const fm_config *c = &session->model->config;
	int32_t		context_len = session->context_len;
	float	   *logits = session->logits;
	int32_t		start;
	fm_rng		rng;
	fm_status	status;

	*n_out = 0;
	*finish = FM_FINISH_MAX_TOKENS;
	if ((status = check_params(params, max_tokens, err)) != FM_OK)
		return status;
	if (n_prompt < 1)
		return fm_set_error(err, FM_EINVAL,
							"prompt is empty: generation needs at least one id");

	if (max_tokens == 0)
		return fm_forward(session, prompt, n_prompt, NULL, interrupt, arg, err);

	status = fm_forward(session, prompt, n_prompt, logits, interrupt, arg, err);
	if (status != FM_OK)
		return status;
	start = fm_session_position(session);
	fm_rng_seed(&rng, params->seed);

	for (;;)
	{
		int32_t		id;

		if (*n_out == max_tokens)
		{
			*finish = FM_FINISH_MAX_TOKENS;
			break;
		}
		if (start + *n_out >= context_len)
		{
			*finish = FM_FINISH_LENGTH;
			break;
		}

		if (params->repetition_penalty != 1.0)
			fm_repetition_penalty(logits, c->vocab_size, params->repetition_penalty,
								  prompt, n_prompt, out, *n_out, session->seen);
		id = fm_sample(logits, sampleable, c->vocab_size, params, &rng,
					   session->sample_f, session->sample_i);
		if (id < 0)
			return fm_set_error(err, FM_EINVAL,
								"no sampleable id among %d logits", c->vocab_size);
		if (is_eos(c, id))
		{
			*finish = FM_FINISH_EOS;
			break;
		}
		out[(*n_out)++] = id;

		if (*n_out < max_tokens && start + *n_out < context_len)
		{
			status = fm_forward(session, &id, 1, logits, interrupt, arg, err);
			if (status != FM_OK)
				return status;
		}
	}
	return FM_OK;
}
