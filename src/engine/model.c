/*-------------------------------------------------------------------------
 *
 * model.c
 *	  Forward pass of FlexOlmo / FlexMoRE with a KV cache.
 *
 * Each layer reads the raw residual stream h (OLMo-2 blocks have no
 * pre-norm):
 *
 *	  a = Attention(h);  h += RMSNorm_post_attention(a)
 *	  m = MoE(h);        h += RMSNorm_post_feedforward(m)
 *
 * Ids run in chunks of up to FM_PROMPT_CHUNK rows.  A chunk of one row
 * (decode) goes through the matvec kernel, a longer chunk through sgemm;
 * both use the same code below, so they differ only in summation order.
 *
 * MoE, per chunk: the router picks experts per row, then rows are grouped
 * by expert and each expert multiplies its gathered rows at once.  A
 * low-rank expert e has W_P,e = W_P,0 + B_P,e A_P,e, which is never
 * materialised.  Rows that select expert 0 or any low-rank expert compute
 * g0 = W_gate,0 x and u0 = W_up,0 x once; a low-rank expert then adds its
 * adapter products (g_e = g0 + B_g A_g x).  W_down,0 is linear, so the
 * p-weighted hidden activations of expert 0 and of every low-rank expert
 * are summed first and go through W_down,0 once.  Each low-rank expert
 * then adds only p_e B_d A_d h_e.  Full-size experts other than 0 use
 * their own matrices.
 *
 * A session is one allocation: the struct, the KV cache and every
 * activation buffer, laid out by session_layout so that fm_session_bytes
 * and fm_session_create cannot disagree.
 *
 *-------------------------------------------------------------------------
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "engine/engine.h"
#include "engine/kernels.h"
#include "engine/session.h"

#define SESSION_ALIGN 64

static bool
add_size(size_t *total, size_t count, size_t elem)
{
	size_t		bytes;

	if (__builtin_mul_overflow(count, elem, &bytes))
		return false;
	bytes = (bytes + SESSION_ALIGN - 1) & ~(size_t) (SESSION_ALIGN - 1);
	return !__builtin_add_overflow(*total, bytes, total);
}

static int32_t
config_max_rank(const fm_config *c)
{
	int32_t		max_rank = 0;

	for (int32_t e = 0; e < c->num_experts && e < FM_MAX_EXPERTS; e++)
		if (c->expert_ranks[e] > max_rank)
			max_rank = c->expert_ranks[e];
	return max_rank;
}

/* Maximum input columns of any weight product, which sizes the scratch of fm_matmul_w. */
static int32_t
config_max_cols(const fm_config *c)
{
	int32_t		cols = c->hidden_size;

	if (c->intermediate_size > cols)
		cols = c->intermediate_size;
	if (c->num_attention_heads * c->head_dim > cols)
		cols = c->num_attention_heads * c->head_dim;
	if (config_max_rank(c) > cols)
		cols = config_max_rank(c);
	return cols;
}

/*
 * Lays out a session of n_seq sequences of context_len positions each:
 * returns its size in bytes, or SIZE_MAX on overflow.  When s is not
 * NULL, also points each buffer into the block at s.
 */
static size_t
session_layout(const fm_config *c, int32_t n_seq, int32_t context_len, fm_session *s)
{
	size_t		total = 0;
	size_t		rows = FM_PROMPT_CHUNK;
	size_t		q_dim = (size_t) c->num_attention_heads * c->head_dim;
	size_t		kv_dim = (size_t) c->num_key_value_heads * c->head_dim;
	size_t		kv_elems;
	bool		ok = true;

#define CARVE(field, type, count) \
	do { \
		if (s != NULL) \
			s->field = (type *) ((char *) s + total); \
		ok = ok && add_size(&total, (count), sizeof(type)); \
	} while (0)

	ok = add_size(&total, 1, sizeof(fm_session));
	if (__builtin_mul_overflow((size_t) c->num_hidden_layers, (size_t) context_len,
							   &kv_elems) ||
		__builtin_mul_overflow(kv_elems, (size_t) n_seq, &kv_elems) ||
		__builtin_mul_overflow(kv_elems, kv_dim, &kv_elems))
		return SIZE_MAX;

	CARVE(k_cache, float, kv_elems);
	CARVE(v_cache, float, kv_elems);
	CARVE(x, float, rows * c->hidden_size);
	CARVE(q, float, rows * q_dim);
	CARVE(k, float, rows * kv_dim);
	CARVE(v, float, rows * kv_dim);
	CARVE(att, float, rows * q_dim);
	CARVE(proj, float, rows * c->hidden_size);
	CARVE(scores, float, (size_t) c->num_attention_heads * context_len);
	CARVE(router, float, rows * c->num_experts);
	CARVE(probs, float, (size_t) c->num_experts);
	CARVE(top_expert, int32_t, rows * c->num_experts_per_tok);
	CARVE(top_weight, float, rows * c->num_experts_per_tok);
	CARVE(n_top, int32_t, rows);
	CARVE(shared_rows, int32_t, rows);
	CARVE(expert_rows, int32_t, rows);
	CARVE(expert_p, float, rows);
	CARVE(xs, float, rows * c->hidden_size);
	CARVE(xe, float, rows * c->hidden_size);
	CARVE(gate0, float, rows * c->intermediate_size);
	CARVE(up0, float, rows * c->intermediate_size);
	CARVE(hsum, float, rows * c->intermediate_size);
	CARVE(gate, float, rows * c->intermediate_size);
	CARVE(up, float, rows * c->intermediate_size);
	CARVE(lowrank, float, rows * (size_t) config_max_rank(c));
	CARVE(down, float, rows * c->hidden_size);
	CARVE(moe, float, rows * c->hidden_size);
	CARVE(last, float, (size_t) c->hidden_size);
	CARVE(logits, float, (size_t) c->vocab_size);
	CARVE(sample_f, float, (size_t) c->vocab_size);
	CARVE(sample_i, int32_t, (size_t) c->vocab_size);
	CARVE(seen, uint8_t, (size_t) c->vocab_size);
	CARVE(seq_position, int32_t, (size_t) n_seq);
	CARVE(row_base, int32_t, rows);
	CARVE(row_pos, int32_t, rows);
	CARVE(mm_scratch, uint8_t, fm_matmul_scratch_bytes((int32_t) rows, config_max_cols(c)));
#undef CARVE

	return ok ? total : SIZE_MAX;
}

size_t
fm_session_bytes(const fm_config *config, int32_t context_len)
{
	if (context_len <= 0)
		return 0;
	return session_layout(config, 1, context_len, NULL);
}

/* Checks the hyperparameters the forward pass relies on. */
static fm_status
validate_config(const fm_config *c, fm_error *err)
{
	if (c->vocab_size <= 0 || c->hidden_size <= 0 || c->intermediate_size <= 0 ||
		c->num_hidden_layers <= 0 || c->num_attention_heads <= 0 ||
		c->num_key_value_heads <= 0 || c->head_dim <= 0 ||
		c->max_position_embeddings <= 0)
		return fm_set_error(err, FM_EINVAL,
							"model sizes must be positive: vocab_size %d, hidden_size %d, intermediate_size %d, num_hidden_layers %d, num_attention_heads %d, num_key_value_heads %d, head_dim %d, max_position_embeddings %d",
							c->vocab_size, c->hidden_size, c->intermediate_size,
							c->num_hidden_layers, c->num_attention_heads,
							c->num_key_value_heads, c->head_dim,
							c->max_position_embeddings);
	if (c->num_attention_heads % c->num_key_value_heads != 0)
		return fm_set_error(err, FM_EINVAL,
							"num_attention_heads %d is not a multiple of num_key_value_heads %d",
							c->num_attention_heads, c->num_key_value_heads);
	if (c->head_dim % 2 != 0)
		return fm_set_error(err, FM_EINVAL,
							"head_dim %d must be even for rotary embeddings",
							c->head_dim);
	if (c->num_experts < 1 || c->num_experts > FM_MAX_EXPERTS)
		return fm_set_error(err, FM_EINVAL,
							"num_experts %d is outside [1, %d]",
							c->num_experts, FM_MAX_EXPERTS);
	if (c->num_experts_per_tok < 1 || c->num_experts_per_tok > c->num_experts)
		return fm_set_error(err, FM_EINVAL,
							"num_experts_per_tok %d is outside [1, num_experts %d]",
							c->num_experts_per_tok, c->num_experts);
	if (c->expert_ranks[0] != 0)
		return fm_set_error(err, FM_EINVAL,
							"expert 0 must be full size, but its rank is %d",
							c->expert_ranks[0]);
	for (int32_t e = 1; e < c->num_experts; e++)
		if (c->expert_ranks[e] < 0)
			return fm_set_error(err, FM_EINVAL, "expert %d has negative rank %d",
								e, c->expert_ranks[e]);
	if (!(c->rms_norm_eps >= 0.0) || !isfinite(c->rms_norm_eps))
		return fm_set_error(err, FM_EINVAL, "rms_norm_eps %g is invalid",
							c->rms_norm_eps);
	if (!(c->rope_theta > 0.0) || !isfinite(c->rope_theta))
		return fm_set_error(err, FM_EINVAL, "rope_theta %g is invalid",
							c->rope_theta);
	return FM_OK;
}

#define REQUIRE_WEIGHT(ptr, ...) \
	do { \
		if ((ptr) == NULL) \
			return fm_set_error(err, FM_EINVAL, __VA_ARGS__); \
	} while (0)

/*
 * Checks that a weight matrix is set, has the shape the config implies
 * and a format that shape allows.  layer is -1 for shared matrices.
 */
static fm_status
check_matrix(const fm_matrix *m, const char *what, int32_t layer, int32_t rows,
			 int32_t cols, fm_error *err)
{
	char		where[48] = "";

	if (layer >= 0)
		snprintf(where, sizeof(where), "layer %d: ", layer);
	if (m->data == NULL)
		return fm_set_error(err, FM_EINVAL, "%sweight %s is not set", where, what);
	if (m->rows != rows || m->cols != cols)
		return fm_set_error(err, FM_EINVAL, "%sweight %s is [%d, %d], expected [%d, %d]",
							where, what, m->rows, m->cols, rows, cols);
	if (fm_matrix_bytes(m->format, rows, cols) == SIZE_MAX)
		return fm_set_error(err, FM_EINVAL, "%sweight %s [%d, %d] cannot be in format %s",
							where, what, rows, cols, fm_weight_format_name(m->format));
	return FM_OK;
}

/* Checks the matrices of one expert against its rank. */
static fm_status
check_expert(const fm_config *c, const fm_ffn_weights *f, int32_t l, int32_t e,
			 fm_error *err)
{
	int32_t		h = c->hidden_size;
	int32_t		i = c->intermediate_size;
	int32_t		r = f->rank;
	char		what[64];
	fm_status	status = FM_OK;

#define EXPERT_MATRIX(field, name, rows, cols) \
	do { \
		snprintf(what, sizeof(what), "expert %d %s", e, name); \
		if (status == FM_OK) \
			status = check_matrix(&f->field, what, l, rows, cols, err); \
	} while (0)

	if (r == 0)
	{
		EXPERT_MATRIX(gate, "gate_proj", i, h);
		EXPERT_MATRIX(up, "up_proj", i, h);
		EXPERT_MATRIX(down, "down_proj", h, i);
	}
	else
	{
		EXPERT_MATRIX(gate_a, "gate_proj_a", r, h);
		EXPERT_MATRIX(gate_b, "gate_proj_b", i, r);
		EXPERT_MATRIX(up_a, "up_proj_a", r, h);
		EXPERT_MATRIX(up_b, "up_proj_b", i, r);
		EXPERT_MATRIX(down_a, "down_proj_a", r, i);
		EXPERT_MATRIX(down_b, "down_proj_b", h, r);
	}
#undef EXPERT_MATRIX
	return status;
}

fm_status
fm_model_validate(const fm_model *model, fm_error *err)
{
	const fm_config *c = &model->config;
	const fm_weights *w = &model->weights;
	int32_t		q_dim;
	int32_t		kv_dim;
	fm_status	status;

	if ((status = validate_config(c, err)) != FM_OK)
		return status;

	if ((status = check_matrix(&w->embed_tokens, "embed_tokens", -1, c->vocab_size,
							   c->hidden_size, err)) != FM_OK ||
		(status = check_matrix(&w->lm_head, "lm_head", -1, c->vocab_size,
							   c->hidden_size, err)) != FM_OK)
		return status;
	q_dim = c->num_attention_heads * c->head_dim;
	kv_dim = c->num_key_value_heads * c->head_dim;
	REQUIRE_WEIGHT(w->final_norm, "weight final norm is not set");
	REQUIRE_WEIGHT(w->layers, "layer weights are not set");

	for (int32_t l = 0; l < c->num_hidden_layers; l++)
	{
		const fm_layer_weights *lw = &w->layers[l];

		if ((status = check_matrix(&lw->q_proj, "q_proj", l, q_dim, c->hidden_size, err)) != FM_OK ||
			(status = check_matrix(&lw->k_proj, "k_proj", l, kv_dim, c->hidden_size, err)) != FM_OK ||
			(status = check_matrix(&lw->v_proj, "v_proj", l, kv_dim, c->hidden_size, err)) != FM_OK ||
			(status = check_matrix(&lw->o_proj, "o_proj", l, c->hidden_size, q_dim, err)) != FM_OK)
			return status;
		REQUIRE_WEIGHT(lw->q_norm, "layer %d: q_norm is not set", l);
		REQUIRE_WEIGHT(lw->k_norm, "layer %d: k_norm is not set", l);
		REQUIRE_WEIGHT(lw->post_attention_norm,
					   "layer %d: post_attention_layernorm is not set", l);
		REQUIRE_WEIGHT(lw->post_feedforward_norm,
					   "layer %d: post_feedforward_layernorm is not set", l);
		REQUIRE_WEIGHT(lw->router, "layer %d: router is not set", l);

		for (int32_t e = 0; e < c->num_experts; e++)
		{
			const fm_ffn_weights *f = &lw->experts[e];

			if (f->rank != c->expert_ranks[e])
				return fm_set_error(err, FM_EINVAL,
									"layer %d expert %d: weights have rank %d but the config says %d",
									l, e, f->rank, c->expert_ranks[e]);
			if ((status = check_expert(c, f, l, e, err)) != FM_OK)
				return status;
		}
	}
	return FM_OK;
}

/* ---------- session lifecycle ---------- */

/* Creates a session of n_seq sequences; see fm_session_create_multi. */
static fm_status
session_create(const fm_model *model, const fm_allocator *a, int32_t n_seq,
			   int32_t context_len, fm_session **out, fm_error *err)
{
	const fm_config *c = &model->config;
	fm_session *s;
	size_t		bytes;
	fm_status	status;

	*out = NULL;
	if ((status = fm_model_validate(model, err)) != FM_OK)
		return status;
	if (context_len < 1 || context_len > c->max_position_embeddings)
		return fm_set_error(err, FM_EINVAL,
							"context length %d is outside [1, max_position_embeddings %d]",
							context_len, c->max_position_embeddings);
	if (n_seq < 1 || n_seq > INT32_MAX / context_len)
		return fm_set_error(err, FM_EINVAL,
							"%d sequences of %d positions are out of range",
							n_seq, context_len);

	bytes = session_layout(c, n_seq, context_len, NULL);
	if (bytes == SIZE_MAX)
		return fm_set_error(err, FM_ELIMIT,
							"a session of %d x %d positions does not fit in memory",
							n_seq, context_len);
	s = fm_alloc(a, bytes);
	if (s == NULL)
		return fm_set_error(err, FM_ENOMEM,
							"could not allocate %zu bytes for a session of %d positions",
							bytes, context_len);

	memset(s, 0, sizeof(*s));
	session_layout(c, n_seq, context_len, s);
	s->model = model;
	s->allocator = *a;
	s->context_len = context_len;
	s->position = 0;
	s->max_rank = config_max_rank(c);
	s->n_seq = n_seq;
	s->cache_slots = n_seq * context_len;
	memset(s->seq_position, 0, sizeof(int32_t) * n_seq);
	memset(s->seen, 0, (size_t) c->vocab_size);
	for (int32_t e = 0; e < c->num_experts; e++)
		s->allowed[e] = true;
	*out = s;
	return FM_OK;
}

fm_status
fm_session_create(const fm_model *model, const fm_allocator *a,
				  int32_t context_len, fm_session **out, fm_error *err)
{
	return session_create(model, a, 1, context_len, out, err);
}

void
fm_session_destroy(fm_session *session)
{
	fm_allocator a;

	if (session == NULL)
		return;
	a = session->allocator;
	fm_free(&a, session);
}

fm_status
fm_session_set_experts(fm_session *session, const bool *allowed, fm_error *err)
{
	int32_t		n_experts = session->model->config.num_experts;
	int32_t		count = 0;

	for (int32_t e = 0; e < n_experts; e++)
		if (allowed == NULL || allowed[e])
			count++;
	if (count == 0)
		return fm_set_error(err, FM_EINVAL,
							"no expert is allowed out of %d", n_experts);
	for (int32_t e = 0; e < n_experts; e++)
		session->allowed[e] = (allowed == NULL || allowed[e]);
	return FM_OK;
}

void
fm_session_set_route_hook(fm_session *session, fm_route_fn fn, void *arg)
{
	session->route_hook = fn;
	session->route_arg = arg;
}

int32_t
fm_session_position(const fm_session *session)
{
	return session->position;
}

void
fm_session_reset(fm_session *session)
{
	session->position = 0;
	memset(session->seq_position, 0, sizeof(int32_t) * session->n_seq);
}

/* ---------- attention ---------- */

/*
 * Adds a * x[n] to y[n].  The fixed groups of 8 let GCC 12 vectorize at -O2,
 * which it does not for a loop of unknown length whose pointers may
 * alias.  Each y[d] is still summed in the callers' order.
 */
static void
add_scaled(float *restrict y, const float *restrict x, float a, int32_t n)
{
	int32_t		d = 0;

	for (; d + 8 <= n; d += 8)
		for (int j = 0; j < 8; j++)
			y[d + j] += a * x[d + j];
	for (; d < n; d++)
		y[d] += a * x[d];
}

/*
 * Runs attention for rows [0, n), row i at position row_pos[i] of the
 * sequence whose cache starts at slot row_base[i], and adds
 * RMSNorm_post_attention of its output to the residual stream.  Every row
 * writes its k and v before any row attends, so a row sees the rows of
 * its own sequence that precede it in the chunk.
 */
static void
attention_block(fm_session *s, int32_t layer, int32_t n)
{
	const fm_config *c = &s->model->config;
	const fm_layer_weights *lw = &s->model->weights.layers[layer];
	int32_t		hidden = c->hidden_size;
	int32_t		hd = c->head_dim;
	int32_t		q_dim = c->num_attention_heads * hd;
	int32_t		kv_dim = c->num_key_value_heads * hd;
	int32_t		group = c->num_attention_heads / c->num_key_value_heads;
	size_t		layer_off = (size_t) layer * s->cache_slots * kv_dim;
	float		scale = 1.0f / sqrtf((float) hd);

	fm_matmul_w(s->q, s->x, &lw->q_proj, n, s->mm_scratch);
	fm_matmul_w(s->k, s->x, &lw->k_proj, n, s->mm_scratch);
	fm_matmul_w(s->v, s->x, &lw->v_proj, n, s->mm_scratch);

	/* QK-norm over the whole projection, then RoPE, then into the cache */
	for (int32_t i = 0; i < n; i++)
	{
		float	   *q = s->q + (size_t) i * q_dim;
		float	   *k = s->k + (size_t) i * kv_dim;
		int32_t		pos = s->row_pos[i];
		size_t		slot = layer_off + (size_t) (s->row_base[i] + pos) * kv_dim;

		fm_rmsnorm(q, q, lw->q_norm, q_dim, c->rms_norm_eps);
		fm_rmsnorm(k, k, lw->k_norm, kv_dim, c->rms_norm_eps);
		fm_rope(q, c->num_attention_heads, hd, pos, c->rope_theta);
		fm_rope(k, c->num_key_value_heads, hd, pos, c->rope_theta);
		memcpy(s->k_cache + slot, k, sizeof(float) * kv_dim);
		memcpy(s->v_cache + slot, s->v + (size_t) i * kv_dim, sizeof(float) * kv_dim);
	}

	/*
	 * Causal attention: row i attends to positions 0 .. row_pos[i].  The
	 * cache keeps a position's keys of every head side by side, so the
	 * loops take positions outside and heads inside, reading the cache in
	 * order.  Per head and position the sums are those of a loop over one
	 * head at a time.  One-thread q8 decoding of the bench model after a
	 * 128-token prompt spent 14% of its time here with heads outside, one
	 * running sum per score and a scalar update loop, and 5% now (perf).
	 */
	for (int32_t i = 0; i < n; i++)
	{
		int32_t		len = s->row_pos[i] + 1;
		size_t		row_off = layer_off + (size_t) s->row_base[i] * kv_dim;
		const float *q = s->q + (size_t) i * q_dim;
		float	   *out = s->att + (size_t) i * q_dim;

		for (int32_t t = 0; t < len; t++)
		{
			const float *k = s->k_cache + row_off + (size_t) t * kv_dim;

			for (int32_t h = 0; h < c->num_attention_heads; h++)
				s->scores[(size_t) h * len + t] =
					fm_dot(q + (size_t) h * hd, k + (size_t) (h / group) * hd, hd) * scale;
		}
		for (int32_t h = 0; h < c->num_attention_heads; h++)
			fm_softmax(s->scores + (size_t) h * len, len);

		memset(out, 0, sizeof(float) * q_dim);
		for (int32_t t = 0; t < len; t++)
		{
			const float *v = s->v_cache + row_off + (size_t) t * kv_dim;

			for (int32_t h = 0; h < c->num_attention_heads; h++)
				add_scaled(out + (size_t) h * hd, v + (size_t) (h / group) * hd,
						   s->scores[(size_t) h * len + t], hd);
		}
	}

	fm_matmul_w(s->proj, s->att, &lw->o_proj, n, s->mm_scratch);
	for (int32_t i = 0; i < n; i++)
	{
		float	   *a = s->proj + (size_t) i * hidden;
		float	   *x = s->x + (size_t) i * hidden;

		fm_rmsnorm(a, a, lw->post_attention_norm, hidden, c->rms_norm_eps);
		for (int32_t d = 0; d < hidden; d++)
			x[d] += a[d];
	}
}

/* ---------- mixture of experts ---------- */

/* Weight with which row i selected expert e, or 0 when it did not. */
static float
row_weight(const fm_session *s, int32_t i, int32_t e)
{
	int32_t		k = s->model->config.num_experts_per_tok;

	for (int32_t j = 0; j < s->n_top[i]; j++)
		if (s->top_expert[(size_t) i * k + j] == e)
			return s->top_weight[(size_t) i * k + j];
	return 0.0f;
}

static bool
row_selects(const fm_session *s, int32_t i, int32_t e)
{
	int32_t		k = s->model->config.num_experts_per_tok;

	for (int32_t j = 0; j < s->n_top[i]; j++)
		if (s->top_expert[(size_t) i * k + j] == e)
			return true;
	return false;
}

/* h[rows, inter] = SiLU(gate) * up, written into gate. */
static void
swiglu(float *gate, const float *up, size_t count)
{
	for (size_t j = 0; j < count; j++)
		gate[j] = fm_silu(gate[j]) * up[j];
}

/*
 * Computes expert 0 and every low-rank expert for the rows that selected
 * any of them, adding p_e FFN_e(x) into s->moe.  See the file header for
 * why W_down,0 runs once.
 */
static void
public_and_lowrank_experts(fm_session *s, const fm_layer_weights *lw, int32_t n)
{
	const fm_config *c = &s->model->config;
	int32_t		hidden = c->hidden_size;
	int32_t		inter = c->intermediate_size;
	const fm_ffn_weights *f0 = &lw->experts[0];
	int32_t		ns = 0;

	for (int32_t i = 0; i < n; i++)
	{
		bool		needs = row_selects(s, i, 0);

		for (int32_t e = 1; e < c->num_experts && !needs; e++)
			if (c->expert_ranks[e] > 0 && row_selects(s, i, e))
				needs = true;
		if (needs)
		{
			memcpy(s->xs + (size_t) ns * hidden, s->x + (size_t) i * hidden,
				   sizeof(float) * hidden);
			s->shared_rows[ns++] = i;
		}
	}
	if (ns == 0)
		return;

	fm_matmul_w(s->gate0, s->xs, &f0->gate, ns, s->mm_scratch);
	fm_matmul_w(s->up0, s->xs, &f0->up, ns, s->mm_scratch);

	/* hsum starts as p_0 h_0 (zero for rows that skipped expert 0) */
	for (int32_t j = 0; j < ns; j++)
	{
		float		p = row_weight(s, s->shared_rows[j], 0);
		float	   *hs = s->hsum + (size_t) j * inter;
		const float *g = s->gate0 + (size_t) j * inter;
		const float *u = s->up0 + (size_t) j * inter;

		for (int32_t d = 0; d < inter; d++)
			hs[d] = p != 0.0f ? p * (fm_silu(g[d]) * u[d]) : 0.0f;
	}

	for (int32_t e = 1; e < c->num_experts; e++)
	{
		const fm_ffn_weights *f = &lw->experts[e];
		int32_t		r = c->expert_ranks[e];
		int32_t		ne = 0;

		if (r == 0 || !s->allowed[e])
			continue;

		/* expert_rows indexes the shared set here, not the chunk */
		for (int32_t j = 0; j < ns; j++)
		{
			if (!row_selects(s, s->shared_rows[j], e))
				continue;
			memcpy(s->xe + (size_t) ne * hidden, s->xs + (size_t) j * hidden,
				   sizeof(float) * hidden);
			s->expert_rows[ne] = j;
			s->expert_p[ne] = row_weight(s, s->shared_rows[j], e);
			ne++;
		}
		if (ne == 0)
			continue;

		/* g_e = g0 + B_g (A_g x), u_e = u0 + B_u (A_u x) */
		fm_matmul_w(s->lowrank, s->xe, &f->gate_a, ne, s->mm_scratch);
		fm_matmul_w(s->gate, s->lowrank, &f->gate_b, ne, s->mm_scratch);
		fm_matmul_w(s->lowrank, s->xe, &f->up_a, ne, s->mm_scratch);
		fm_matmul_w(s->up, s->lowrank, &f->up_b, ne, s->mm_scratch);
		for (int32_t m = 0; m < ne; m++)
		{
			int32_t		j = s->expert_rows[m];
			float	   *g = s->gate + (size_t) m * inter;
			float	   *u = s->up + (size_t) m * inter;
			const float *g0 = s->gate0 + (size_t) j * inter;
			const float *u0 = s->up0 + (size_t) j * inter;

			for (int32_t d = 0; d < inter; d++)
			{
				g[d] += g0[d];
				u[d] += u0[d];
			}
		}
		swiglu(s->gate, s->up, (size_t) ne * inter);

		/* h_e joins the W_down,0 input; B_d (A_d h_e) goes straight out */
		fm_matmul_w(s->lowrank, s->gate, &f->down_a, ne, s->mm_scratch);
		fm_matmul_w(s->down, s->lowrank, &f->down_b, ne, s->mm_scratch);
		for (int32_t m = 0; m < ne; m++)
		{
			int32_t		j = s->expert_rows[m];
			float		p = s->expert_p[m];
			float	   *hs = s->hsum + (size_t) j * inter;
			const float *h = s->gate + (size_t) m * inter;
			float	   *out = s->moe + (size_t) s->shared_rows[j] * hidden;
			const float *d_out = s->down + (size_t) m * hidden;

			add_scaled(hs, h, p, inter);
			add_scaled(out, d_out, p, hidden);
		}
	}

	fm_matmul_w(s->down, s->hsum, &f0->down, ns, s->mm_scratch);
	for (int32_t j = 0; j < ns; j++)
	{
		float	   *out = s->moe + (size_t) s->shared_rows[j] * hidden;
		const float *d_out = s->down + (size_t) j * hidden;

		for (int32_t d = 0; d < hidden; d++)
			out[d] += d_out[d];
	}
}

/* Computes full-size experts other than 0, adding p_e FFN_e(x) to s->moe. */
static void
full_experts(fm_session *s, const fm_layer_weights *lw, int32_t n)
{
	const fm_config *c = &s->model->config;
	int32_t		hidden = c->hidden_size;
	int32_t		inter = c->intermediate_size;

	for (int32_t e = 1; e < c->num_experts; e++)
	{
		const fm_ffn_weights *f = &lw->experts[e];
		int32_t		ne = 0;

		if (c->expert_ranks[e] != 0 || !s->allowed[e])
			continue;
		for (int32_t i = 0; i < n; i++)
		{
			if (!row_selects(s, i, e))
				continue;
			memcpy(s->xe + (size_t) ne * hidden, s->x + (size_t) i * hidden,
				   sizeof(float) * hidden);
			s->expert_rows[ne] = i;
			s->expert_p[ne] = row_weight(s, i, e);
			ne++;
		}
		if (ne == 0)
			continue;

		fm_matmul_w(s->gate, s->xe, &f->gate, ne, s->mm_scratch);
		fm_matmul_w(s->up, s->xe, &f->up, ne, s->mm_scratch);
		swiglu(s->gate, s->up, (size_t) ne * inter);
		fm_matmul_w(s->down, s->gate, &f->down, ne, s->mm_scratch);
		for (int32_t m = 0; m < ne; m++)
		{
			float	   *out = s->moe + (size_t) s->expert_rows[m] * hidden;
			const float *d_out = s->down + (size_t) m * hidden;

			add_scaled(out, d_out, s->expert_p[m], hidden);
		}
	}
}

/*
 * Routes rows [0, n), runs the selected experts grouped by expert, and
 * adds RMSNorm_post_feedforward of the mixture to the residual stream.
 */
static void
moe_block(fm_session *s, int32_t layer, int32_t n)
{
	const fm_config *c = &s->model->config;
	const fm_layer_weights *lw = &s->model->weights.layers[layer];
	int32_t		hidden = c->hidden_size;
	int32_t		k = c->num_experts_per_tok;

	/*
	 * The engine's own product, not sgemm: a row's router logits must not
	 * depend on how many experts the model has, so removing an expert
	 * leaves every other expert set's output bitwise unchanged.  sgemm's
	 * kernels for a narrow output change with its width.
	 */
	fm_f32_product(s->router, s->x, lw->router, n, c->num_experts, hidden);
	for (int32_t i = 0; i < n; i++)
		s->n_top[i] = fm_route(s->router + (size_t) i * c->num_experts,
							   s->allowed, c->num_experts, k, c->norm_topk_prob,
							   s->probs, s->top_expert + (size_t) i * k,
							   s->top_weight + (size_t) i * k);
	if (s->route_hook != NULL)
		for (int32_t i = 0; i < n; i++)
			s->route_hook(s->route_arg, i, s->row_base[i] / s->context_len, s->row_pos[i],
						  layer, s->n_top[i], s->top_expert + (size_t) i * k,
						  s->top_weight + (size_t) i * k);

	memset(s->moe, 0, sizeof(float) * (size_t) n * hidden);
	public_and_lowrank_experts(s, lw, n);
	full_experts(s, lw, n);

	for (int32_t i = 0; i < n; i++)
	{
		float	   *m = s->moe + (size_t) i * hidden;
		float	   *x = s->x + (size_t) i * hidden;

		fm_rmsnorm(m, m, lw->post_feedforward_norm, hidden, c->rms_norm_eps);
		for (int32_t d = 0; d < hidden; d++)
			x[d] += m[d];
	}
}

/* ---------- forward ---------- */

/*
 * Runs one chunk of n <= FM_PROMPT_CHUNK ids, placed by row_base and
 * row_pos, through every layer, writing their k and v into the cache.
 * When hidden is not NULL it receives the final-normed hidden state of
 * each row, [n, hidden_size].  The caller moves the positions.
 */
static fm_status
forward_rows(fm_session *s, const int32_t *ids, int32_t n, float *hidden_out,
			 fm_interrupt_fn interrupt, void *arg, fm_error *err)
{
	const fm_config *c = &s->model->config;
	int32_t		hidden = c->hidden_size;

	for (int32_t i = 0; i < n; i++)
		fm_matrix_row(&s->model->weights.embed_tokens, ids[i], s->x + (size_t) i * hidden);

	for (int32_t l = 0; l < c->num_hidden_layers; l++)
	{
		if (interrupt != NULL && interrupt(arg))
			return fm_set_error(err, FM_ECANCELED, "forward pass canceled at layer %d", l);
		attention_block(s, l, n);
		moe_block(s, l, n);
	}

	if (hidden_out != NULL)
		for (int32_t i = 0; i < n; i++)
			fm_rmsnorm(hidden_out + (size_t) i * hidden, s->x + (size_t) i * hidden,
					   s->model->weights.final_norm, hidden, c->rms_norm_eps);
	return FM_OK;
}

/*
 * Runs one chunk of n <= FM_PROMPT_CHUNK ids of a one-sequence session and
 * commits it to the KV cache.  On cancellation the position stays where
 * it was, so the cache rows this chunk wrote are simply overwritten later.
 */
static fm_status
forward_chunk(fm_session *s, const int32_t *ids, int32_t n, float *hidden_out,
			  fm_interrupt_fn interrupt, void *arg, fm_error *err)
{
	fm_status	status;

	for (int32_t i = 0; i < n; i++)
	{
		s->row_base[i] = 0;
		s->row_pos[i] = s->position + i;
	}
	status = forward_rows(s, ids, n, hidden_out, interrupt, arg, err);
	if (status == FM_OK)
		s->position += n;
	return status;
}

fm_status
fm_forward(fm_session *session, const int32_t *ids, int32_t n,
		   float *logits, fm_interrupt_fn interrupt, void *arg,
		   fm_error *err)
{
	const fm_config *c = &session->model->config;
	int32_t		last_rows = 0;
	fm_status	status;

	if (n < 0 || (n == 0 && logits != NULL))
		return fm_set_error(err, FM_EINVAL,
							"forward pass needs at least one id, got %d", n);
	if (session->n_seq != 1)
		return fm_set_error(err, FM_EINVAL,
							"fm_forward needs a one-sequence session, not one of %d sequences",
							session->n_seq);
	for (int32_t i = 0; i < n; i++)
		if (ids[i] < 0 || ids[i] >= c->vocab_size)
			return fm_set_error(err, FM_EINVAL,
								"token id %d at index %d is outside [0, %d)",
								ids[i], i, c->vocab_size);
	if (n > session->context_len - session->position)
		return fm_set_error(err, FM_ELIMIT,
							"position %d + %d ids exceeds the context of %d positions",
							session->position, n, session->context_len);

	for (int32_t start = 0; start < n; start += FM_PROMPT_CHUNK)
	{
		int32_t		rows = n - start < FM_PROMPT_CHUNK ? n - start : FM_PROMPT_CHUNK;

		status = forward_chunk(session, ids + start, rows, NULL, interrupt, arg, err);
		if (status != FM_OK)
			return status;
		last_rows = rows;
	}

	if (logits != NULL)
	{
		const float *x = session->x + (size_t) (last_rows - 1) * c->hidden_size;

		fm_rmsnorm(session->last, x, session->model->weights.final_norm,
				   c->hidden_size, c->rms_norm_eps);
		fm_matmul_w(logits, session->last, &session->model->weights.lm_head, 1,
					session->mm_scratch);
	}
	return FM_OK;
}

/* ---------- scoring: hidden states, several sequences, log-probabilities ---------- */

/* Returns the position counter of sequence seq. */
static int32_t *
seq_position_ref(fm_session *s, int32_t seq)
{
	return s->n_seq == 1 ? &s->position : &s->seq_position[seq];
}

size_t
fm_session_multi_bytes(const fm_config *config, int32_t n_seq, int32_t context_len)
{
	if (context_len <= 0 || n_seq <= 0)
		return 0;
	return session_layout(config, n_seq, context_len, NULL);
}

fm_status
fm_session_create_multi(const fm_model *model, const fm_allocator *a, int32_t n_seq,
						int32_t context_len, fm_session **out, fm_error *err)
{
	return session_create(model, a, n_seq, context_len, out, err);
}

int32_t
fm_session_seq_count(const fm_session *session)
{
	return session->n_seq;
}

int32_t
fm_session_seq_position(const fm_session *session, int32_t seq)
{
	if (seq < 0 || seq >= session->n_seq)
		return -1;
	return seq_position_ref((fm_session *) session, seq)[0];
}

fm_status
fm_session_seq_truncate(fm_session *session, int32_t seq, int32_t position,
						fm_error *err)
{
	int32_t    *pos;

	if (seq < 0 || seq >= session->n_seq)
		return fm_set_error(err, FM_EINVAL, "sequence %d is outside [0, %d)",
							seq, session->n_seq);
	pos = seq_position_ref(session, seq);
	if (position < 0 || position > *pos)
		return fm_set_error(err, FM_EINVAL,
							"cannot truncate sequence %d to position %d: it holds positions [0, %d)",
							seq, position, *pos);
	*pos = position;
	return FM_OK;
}

fm_status
fm_session_truncate(fm_session *session, int32_t position, fm_error *err)
{
	return fm_session_seq_truncate(session, 0, position, err);
}

fm_status
fm_forward_multi(fm_session *session, const int32_t *ids, const int32_t *seqs,
				 int32_t n, float *hidden, fm_interrupt_fn interrupt, void *arg,
				 fm_error *err)
{
	const fm_config *c = &session->model->config;
	int32_t		hidden_size = c->hidden_size;

	if (n < 0)
		return fm_set_error(err, FM_EINVAL, "row count %d is negative", n);

	/*
	 * Check every row before running any, using seq_position as a counter
	 * and restoring it afterwards, so a bad row changes nothing.
	 */
	for (int32_t i = 0; i < n; i++)
	{
		int32_t		seq = seqs == NULL ? 0 : seqs[i];

		if (ids[i] < 0 || ids[i] >= c->vocab_size)
			return fm_set_error(err, FM_EINVAL,
								"token id %d at index %d is outside [0, %d)",
								ids[i], i, c->vocab_size);
		if (seq < 0 || seq >= session->n_seq)
			return fm_set_error(err, FM_EINVAL,
								"sequence %d at index %d is outside [0, %d)",
								seq, i, session->n_seq);
	}
	for (int32_t i = 0; i < n; i++)
		(*seq_position_ref(session, seqs == NULL ? 0 : seqs[i]))++;
	for (int32_t seq = 0; seq < session->n_seq; seq++)
	{
		int32_t		pos = *seq_position_ref(session, seq);

		if (pos > session->context_len)
		{
			for (int32_t i = 0; i < n; i++)
				(*seq_position_ref(session, seqs == NULL ? 0 : seqs[i]))--;
			return fm_set_error(err, FM_ELIMIT,
								"sequence %d would reach position %d, past the context of %d positions",
								seq, pos, session->context_len);
		}
	}
	for (int32_t i = 0; i < n; i++)
		(*seq_position_ref(session, seqs == NULL ? 0 : seqs[i]))--;

	for (int32_t start = 0; start < n; start += FM_PROMPT_CHUNK)
	{
		int32_t		rows = n - start < FM_PROMPT_CHUNK ? n - start : FM_PROMPT_CHUNK;
		fm_status	status;

		for (int32_t i = 0; i < rows; i++)
		{
			int32_t		seq = seqs == NULL ? 0 : seqs[start + i];
			int32_t    *pos = seq_position_ref(session, seq);

			session->row_base[i] = seq * session->context_len;
			session->row_pos[i] = (*pos)++;
		}
		status = forward_rows(session, ids + start, rows,
							  hidden == NULL ? NULL : hidden + (size_t) start * hidden_size,
							  interrupt, arg, err);
		if (status != FM_OK)
		{
			/* uncommit this chunk; earlier chunks stay in the cache */
			for (int32_t i = 0; i < rows; i++)
				(*seq_position_ref(session, seqs == NULL ? 0 : seqs[start + i]))--;
			return status;
		}
	}
	return FM_OK;
}

fm_status
fm_forward_hidden(fm_session *session, const int32_t *ids, int32_t n, float *hidden,
				  fm_interrupt_fn interrupt, void *arg, fm_error *err)
{
	if (session->n_seq != 1)
		return fm_set_error(err, FM_EINVAL,
							"fm_forward_hidden needs a one-sequence session, not one of %d sequences",
							session->n_seq);
	return fm_forward_multi(session, ids, NULL, n, hidden, interrupt, arg, err);
}

fm_status
fm_token_logprobs(const fm_model *model, const bool *sampleable, const float *hidden,
				  int32_t n, const int32_t *targets, int32_t k, double *out,
				  float *scratch, fm_error *err)
{
	const fm_config *c = &model->config;
	int32_t		vocab = c->vocab_size;
	int32_t		hidden_size = c->hidden_size;
	int32_t		step = FM_LOGPROB_ROWS;
	/* on the stack of the thread that runs the engine: a backend's or a tool's main thread */
	uint8_t		encoded[64 * 1024] __attribute__((aligned(64)));

	if (n < 0 || k < 1)
		return fm_set_error(err, FM_EINVAL, "invalid row count %d or targets per row %d", n, k);
	for (int32_t i = 0; i < n * k; i++)
		if (targets[i] >= vocab)
			return fm_set_error(err, FM_EINVAL, "target id %d at index %d is outside [0, %d)",
								targets[i], i, vocab);

	/*
	 * A bf16 or q8 lm_head needs the rows' activations encoded: they go to
	 * a stack buffer, so as many rows as fit there share one pass over
	 * lm_head.
	 */
	if (model->weights.lm_head.format != FM_WEIGHTS_F32)
	{
		size_t		row_bytes = fm_matmul_scratch_bytes(1, hidden_size);

		if (row_bytes > sizeof(encoded))
			return fm_set_error(err, FM_EUNSUPPORTED,
								"hidden_size %d is too large for a %s lm_head in scoring; use flexmore.weight_format f32",
								hidden_size, fm_weight_format_name(model->weights.lm_head.format));
		step = (int32_t) (sizeof(encoded) / row_bytes);
		if (step > FM_LOGPROB_ROWS)
			step = FM_LOGPROB_ROWS;
	}

	for (int32_t start = 0; start < n; start += step)
	{
		int32_t		rows = n - start < step ? n - start : step;

		/* logits [rows, vocab] = hidden rows . lm_head^T */
		fm_matmul_w(scratch, hidden + (size_t) start * hidden_size, &model->weights.lm_head,
					rows, encoded);

		for (int32_t r = 0; r < rows; r++)
		{
			const float *logits = scratch + (size_t) r * vocab;
			float		max = -INFINITY;
			double		sum = 0.0;
			double		lse;

			for (int32_t v = 0; v < vocab; v++)
				if ((sampleable == NULL || sampleable[v]) && logits[v] > max)
					max = logits[v];
			/*
			 * expf in fp32 is several times faster than exp here, where a
			 * 100k vocabulary makes this loop the cost of scoring; its
			 * relative error of about 1e-7 stays far below the tolerance
			 * of the scores.  The sum accumulates in double.
			 */
			for (int32_t v = 0; v < vocab; v++)
				if (sampleable == NULL || sampleable[v])
					sum += expf(logits[v] - max);
			lse = (double) max + log(sum);

			for (int32_t j = 0; j < k; j++)
			{
				size_t		at = (size_t) (start + r) * k + j;
				int32_t		t = targets[at];

				if (t < 0)
					out[at] = NAN;
				else if (sampleable != NULL && !sampleable[t])
					out[at] = -INFINITY;
				else
					out[at] = (double) logits[t] - lse;
			}
		}
	}
	return FM_OK;
}
