/*-------------------------------------------------------------------------
 *
 * layout.c
 *	  Tensor names and shapes of a FlexOlmo / FlexMoRE checkpoint, binding
 *	  of tensors to the model's weights, and conversion of a bound model
 *	  to another weight format.
 *
 * Experts come in two spellings.  The per-expert one stores
 * model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight; the fused one
 * stores model.layers.N.mlp.experts.gate_up_proj [E, 2*inter, hidden]
 * (gate rows first, then up) and model.layers.N.mlp.experts.down_proj
 * [E, hidden, inter].  Binding prefers the per-expert tensor and falls
 * back to a view into the fused one, so no weight is copied; a fused
 * tensor must therefore be fp32.  Low-rank experts (rank r > 0) store
 * *_proj_a [r, in] and *_proj_b [out, r].
 *
 *-------------------------------------------------------------------------
 */
#include <stdio.h>
#include <string.h>

#include "engine/engine.h"

static void
set_spec(fm_tensor_spec *spec, const char *name, int32_t expert, bool optional,
		 int32_t ndim, int64_t d0, int64_t d1)
{
	memset(spec, 0, sizeof(*spec));
	snprintf(spec->name, sizeof(spec->name), "%s", name);
	spec->ndim = ndim;
	spec->shape[0] = d0;
	spec->shape[1] = d1;
	spec->expert = expert;
	spec->optional = optional;
}

/* Tensors per layer, excluding experts. */
#define LAYER_SHARED_TENSORS 9

fm_status
fm_layout_expected(const fm_config *config, const fm_allocator *a,
				   fm_tensor_spec **out, int32_t *n, fm_error *err)
{
	const fm_config *c = config;
	int64_t		hidden = c->hidden_size;
	int64_t		inter = c->intermediate_size;
	int64_t		q_dim = (int64_t) c->num_attention_heads * c->head_dim;
	int64_t		kv_dim = (int64_t) c->num_key_value_heads * c->head_dim;
	int64_t		count = 3;
	fm_tensor_spec *specs;
	int32_t		i = 0;
	char		name[128];

	*out = NULL;
	*n = 0;
	if (c->num_experts < 1 || c->num_experts > FM_MAX_EXPERTS)
		return fm_set_error(err, FM_EINVAL, "num_experts %d is outside [1, %d]",
							c->num_experts, FM_MAX_EXPERTS);
	for (int32_t e = 0; e < c->num_experts; e++)
		count += (int64_t) c->num_hidden_layers * (c->expert_ranks[e] > 0 ? 6 : 3);
	count += (int64_t) c->num_hidden_layers * LAYER_SHARED_TENSORS;
	if (count > INT32_MAX)
		return fm_set_error(err, FM_ELIMIT, "checkpoint layout of %lld tensors is too large",
							(long long) count);

	specs = fm_alloc(a, sizeof(fm_tensor_spec) * (size_t) count);
	if (specs == NULL)
		return fm_set_error(err, FM_ENOMEM, "could not allocate %lld tensor specs",
							(long long) count);

	set_spec(&specs[i++], "model.embed_tokens.weight", -1, false, 2, c->vocab_size, hidden);
	set_spec(&specs[i++], "model.norm.weight", -1, false, 1, hidden, 0);
	set_spec(&specs[i++], "lm_head.weight", -1, c->tie_word_embeddings, 2,
			 c->vocab_size, hidden);

	for (int32_t l = 0; l < c->num_hidden_layers; l++)
	{
#define LAYER_SPEC(suffix, nd, d0, d1) \
		do { \
			snprintf(name, sizeof(name), "model.layers.%d.%s", l, suffix); \
			set_spec(&specs[i++], name, -1, false, nd, d0, d1); \
		} while (0)

		LAYER_SPEC("self_attn.q_proj.weight", 2, q_dim, hidden);
		LAYER_SPEC("self_attn.k_proj.weight", 2, kv_dim, hidden);
		LAYER_SPEC("self_attn.v_proj.weight", 2, kv_dim, hidden);
		LAYER_SPEC("self_attn.o_proj.weight", 2, hidden, q_dim);
		LAYER_SPEC("self_attn.q_norm.weight", 1, q_dim, 0);
		LAYER_SPEC("self_attn.k_norm.weight", 1, kv_dim, 0);
		LAYER_SPEC("post_attention_layernorm.weight", 1, hidden, 0);
		LAYER_SPEC("post_feedforward_layernorm.weight", 1, hidden, 0);
		LAYER_SPEC("mlp.gate.weight", 2, c->num_experts, hidden);
#undef LAYER_SPEC

		for (int32_t e = 0; e < c->num_experts; e++)
		{
			int64_t		r = c->expert_ranks[e];

#define EXPERT_SPEC(proj, d0, d1) \
			do { \
				snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.%s.weight", \
						 l, e, proj); \
				set_spec(&specs[i++], name, e, false, 2, d0, d1); \
			} while (0)

			if (r == 0)
			{
				EXPERT_SPEC("gate_proj", inter, hidden);
				EXPERT_SPEC("up_proj", inter, hidden);
				EXPERT_SPEC("down_proj", hidden, inter);
			}
			else
			{
				EXPERT_SPEC("gate_proj_a", r, hidden);
				EXPERT_SPEC("gate_proj_b", inter, r);
				EXPERT_SPEC("up_proj_a", r, hidden);
				EXPERT_SPEC("up_proj_b", inter, r);
				EXPERT_SPEC("down_proj_a", r, inter);
				EXPERT_SPEC("down_proj_b", hidden, r);
			}
#undef EXPERT_SPEC
		}
	}

	*out = specs;
	*n = i;
	return FM_OK;
}

/* ---------- binding ---------- */

typedef struct bind_context
{
	fm_matrix_lookup_fn lookup;
	void	   *arg;
	fm_error   *err;
} bind_context;

static void
format_shape(char *buf, size_t size, int32_t ndim, const int64_t *shape)
{
	size_t		len = 0;

	len += snprintf(buf + len, size - len, "[");
	for (int32_t d = 0; d < ndim && len < size; d++)
		len += snprintf(buf + len, size - len, "%s%lld", d > 0 ? ", " : "",
						(long long) shape[d]);
	if (len < size)
		snprintf(buf + len, size - len, "]");
}

/*
 * Looks up name and checks its shape against expected[ndim].  Returns
 * FM_OK with *data NULL when the tensor is absent.  *format receives the
 * tensor's format; format NULL requires fp32.
 */
static fm_status
find_tensor_format(bind_context *ctx, const char *name, int32_t ndim,
				   const int64_t *expected, const void **data, fm_weight_format *format)
{
	int32_t		got_ndim = 0;
	int64_t		got[FM_MAX_DIMS] = {0};
	fm_weight_format got_format = FM_WEIGHTS_F32;
	bool		same;

	*data = ctx->lookup(ctx->arg, name, &got_ndim, got, &got_format);
	if (*data == NULL)
		return FM_OK;

	same = (got_ndim == ndim);
	for (int32_t d = 0; same && d < ndim; d++)
		same = (got[d] == expected[d]);
	if (!same)
	{
		char		want_s[96];
		char		got_s[96];

		format_shape(want_s, sizeof(want_s), ndim, expected);
		format_shape(got_s, sizeof(got_s), got_ndim > FM_MAX_DIMS ? FM_MAX_DIMS : got_ndim, got);
		*data = NULL;
		return fm_set_error(ctx->err, FM_EINVAL,
							"tensor %s has shape %s, expected %s", name, got_s, want_s);
	}
	if (format == NULL && got_format != FM_WEIGHTS_F32)
	{
		*data = NULL;
		return fm_set_error(ctx->err, FM_EINVAL, "tensor %s must be f32, not %s",
							name, fm_weight_format_name(got_format));
	}
	if (format != NULL)
		*format = got_format;
	return FM_OK;
}

/* find_tensor_format for an fp32 tensor. */
static fm_status
find_tensor(bind_context *ctx, const char *name, int32_t ndim,
			const int64_t *expected, const float **data)
{
	const void *found;
	fm_status	status = find_tensor_format(ctx, name, ndim, expected, &found, NULL);

	*data = found;
	return status;
}

/* Like find_tensor, but a missing tensor is an error naming it. */
static fm_status
require_tensor(bind_context *ctx, const char *name, int32_t ndim,
			   int64_t d0, int64_t d1, const float **data)
{
	int64_t		shape[FM_MAX_DIMS] = {d0, d1};
	fm_status	status = find_tensor(ctx, name, ndim, shape, data);

	if (status == FM_OK && *data == NULL)
		return fm_set_error(ctx->err, FM_EINVAL, "missing tensor %s", name);
	return status;
}

/*
 * Looks up a matrix [d0, d1] in any format into *m; m->data stays NULL
 * when it is absent.
 */
static fm_status
find_matrix(bind_context *ctx, const char *name, int64_t d0, int64_t d1, fm_matrix *m)
{
	int64_t		shape[FM_MAX_DIMS] = {d0, d1};
	const void *data;
	fm_weight_format format = FM_WEIGHTS_F32;
	fm_status	status = find_tensor_format(ctx, name, 2, shape, &data, &format);

	memset(m, 0, sizeof(*m));
	if (status != FM_OK || data == NULL)
		return status;
	if (fm_matrix_bytes(format, d0, d1) == SIZE_MAX)
		return fm_set_error(ctx->err, FM_EINVAL, "tensor %s [%lld, %lld] cannot be in format %s",
							name, (long long) d0, (long long) d1, fm_weight_format_name(format));
	*m = fm_matrix_view(format, data, (int32_t) d0, (int32_t) d1);
	return FM_OK;
}

/* Like find_matrix, but a missing tensor is an error naming it. */
static fm_status
require_matrix(bind_context *ctx, const char *name, int64_t d0, int64_t d1, fm_matrix *m)
{
	fm_status	status = find_matrix(ctx, name, d0, d1, m);

	if (status == FM_OK && m->data == NULL)
		return fm_set_error(ctx->err, FM_EINVAL, "missing tensor %s", name);
	return status;
}

/*
 * Looks up a fused expert tensor, spelled with or without ".weight".
 * *name receives the spelling found, or the plain one when neither is.
 */
static fm_status
find_fused(bind_context *ctx, int32_t layer, const char *what,
		   const int64_t *shape, const float **data, char *name, size_t size)
{
	fm_status	status;

	snprintf(name, size, "model.layers.%d.mlp.experts.%s.weight", layer, what);
	status = find_tensor(ctx, name, 3, shape, data);
	if (status != FM_OK || *data != NULL)
		return status;
	snprintf(name, size, "model.layers.%d.mlp.experts.%s", layer, what);
	return find_tensor(ctx, name, 3, shape, data);
}

static fm_status
bind_expert(bind_context *ctx, const fm_config *c, int32_t l, int32_t e,
			fm_ffn_weights *f, const float *fused_gate_up, const float *fused_down,
			const char *fused_name)
{
	int64_t		hidden = c->hidden_size;
	int64_t		inter = c->intermediate_size;
	int64_t		r = c->expert_ranks[e];
	char		name[160];
	fm_status	status;

	memset(f, 0, sizeof(*f));
	f->rank = (int32_t) r;

#define EXPERT_NAME(proj) \
	snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.%s.weight", l, e, proj)

	if (r > 0)
	{
		const char *const projs[6] = {"gate_proj_a", "gate_proj_b", "up_proj_a",
		"up_proj_b", "down_proj_a", "down_proj_b"};
		const int64_t dims[6][2] = {{r, hidden}, {inter, r}, {r, hidden},
		{inter, r}, {r, inter}, {hidden, r}};
		fm_matrix  *slots[6] = {&f->gate_a, &f->gate_b, &f->up_a, &f->up_b,
		&f->down_a, &f->down_b};

		for (int32_t j = 0; j < 6; j++)
		{
			EXPERT_NAME(projs[j]);
			status = require_matrix(ctx, name, dims[j][0], dims[j][1], slots[j]);
			if (status != FM_OK)
				return status;
		}
		return FM_OK;
	}

	/* gate and up: per-expert, else rows of the fused gate_up_proj */
	EXPERT_NAME("gate_proj");
	if ((status = find_matrix(ctx, name, inter, hidden, &f->gate)) != FM_OK)
		return status;
	if (f->gate.data == NULL && fused_gate_up != NULL)
		f->gate = fm_matrix_f32(fused_gate_up + (size_t) e * 2 * inter * hidden,
								(int32_t) inter, (int32_t) hidden);
	if (f->gate.data == NULL)
		return fm_set_error(ctx->err, FM_EINVAL,
							"missing tensor %s (and no fused %s)", name, fused_name);

	EXPERT_NAME("up_proj");
	if ((status = find_matrix(ctx, name, inter, hidden, &f->up)) != FM_OK)
		return status;
	if (f->up.data == NULL && fused_gate_up != NULL)
		f->up = fm_matrix_f32(fused_gate_up + (size_t) e * 2 * inter * hidden +
							  (size_t) inter * hidden, (int32_t) inter, (int32_t) hidden);
	if (f->up.data == NULL)
		return fm_set_error(ctx->err, FM_EINVAL,
							"missing tensor %s (and no fused %s)", name, fused_name);

	EXPERT_NAME("down_proj");
	if ((status = find_matrix(ctx, name, hidden, inter, &f->down)) != FM_OK)
		return status;
	if (f->down.data == NULL && fused_down != NULL)
		f->down = fm_matrix_f32(fused_down + (size_t) e * hidden * inter,
								(int32_t) hidden, (int32_t) inter);
	if (f->down.data == NULL)
		return fm_set_error(ctx->err, FM_EINVAL,
							"missing tensor %s (and no fused down_proj)", name);
#undef EXPERT_NAME
	return FM_OK;
}

static fm_status
bind_layer(bind_context *ctx, const fm_config *c, int32_t l, fm_layer_weights *lw)
{
	int64_t		hidden = c->hidden_size;
	int64_t		inter = c->intermediate_size;
	int64_t		q_dim = (int64_t) c->num_attention_heads * c->head_dim;
	int64_t		kv_dim = (int64_t) c->num_key_value_heads * c->head_dim;
	const float *fused_gate_up = NULL;
	const float *fused_down = NULL;
	int64_t		gate_up_shape[FM_MAX_DIMS] = {c->num_experts, 2 * inter, hidden};
	int64_t		down_shape[FM_MAX_DIMS] = {c->num_experts, hidden, inter};
	char		name[160];
	char		fused_name[160];
	fm_status	status;

	memset(lw, 0, sizeof(*lw));

#define LAYER_TENSOR(suffix, nd, d0, d1, slot) \
	do { \
		snprintf(name, sizeof(name), "model.layers.%d.%s", l, suffix); \
		if ((status = require_tensor(ctx, name, nd, d0, d1, slot)) != FM_OK) \
			return status; \
	} while (0)
#define LAYER_MATRIX(suffix, d0, d1, slot) \
	do { \
		snprintf(name, sizeof(name), "model.layers.%d.%s", l, suffix); \
		if ((status = require_matrix(ctx, name, d0, d1, slot)) != FM_OK) \
			return status; \
	} while (0)

	LAYER_MATRIX("self_attn.q_proj.weight", q_dim, hidden, &lw->q_proj);
	LAYER_MATRIX("self_attn.k_proj.weight", kv_dim, hidden, &lw->k_proj);
	LAYER_MATRIX("self_attn.v_proj.weight", kv_dim, hidden, &lw->v_proj);
	LAYER_MATRIX("self_attn.o_proj.weight", hidden, q_dim, &lw->o_proj);
	LAYER_TENSOR("self_attn.q_norm.weight", 1, q_dim, 0, &lw->q_norm);
	LAYER_TENSOR("self_attn.k_norm.weight", 1, kv_dim, 0, &lw->k_norm);
	LAYER_TENSOR("post_attention_layernorm.weight", 1, hidden, 0,
				 &lw->post_attention_norm);
	LAYER_TENSOR("post_feedforward_layernorm.weight", 1, hidden, 0,
				 &lw->post_feedforward_norm);
	LAYER_TENSOR("mlp.gate.weight", 2, c->num_experts, hidden, &lw->router);
#undef LAYER_TENSOR
#undef LAYER_MATRIX

	status = find_fused(ctx, l, "down_proj", down_shape, &fused_down,
						name, sizeof(name));
	if (status != FM_OK)
		return status;
	status = find_fused(ctx, l, "gate_up_proj", gate_up_shape, &fused_gate_up,
						fused_name, sizeof(fused_name));
	if (status != FM_OK)
		return status;

	for (int32_t e = 0; e < c->num_experts; e++)
	{
		status = bind_expert(ctx, c, l, e, &lw->experts[e], fused_gate_up,
							 fused_down, fused_name);
		if (status != FM_OK)
			return status;
	}
	return FM_OK;
}

fm_status
fm_layout_bind_formats(fm_model *model, fm_layer_weights *layers,
					   fm_matrix_lookup_fn lookup, void *arg, fm_error *err)
{
	const fm_config *c = &model->config;
	fm_weights *w = &model->weights;
	bind_context ctx = {lookup, arg, err};
	fm_status	status;

	memset(w, 0, sizeof(*w));
	if (c->num_experts < 1 || c->num_experts > FM_MAX_EXPERTS)
		return fm_set_error(err, FM_EINVAL, "num_experts %d is outside [1, %d]",
							c->num_experts, FM_MAX_EXPERTS);

	status = require_matrix(&ctx, "model.embed_tokens.weight",
							c->vocab_size, c->hidden_size, &w->embed_tokens);
	if (status != FM_OK)
		return status;
	status = require_tensor(&ctx, "model.norm.weight", 1, c->hidden_size, 0,
							&w->final_norm);
	if (status != FM_OK)
		return status;

	/* tied: the embedding is the output matrix, as transformers does */
	if (c->tie_word_embeddings)
		w->lm_head = w->embed_tokens;
	else
	{
		status = find_matrix(&ctx, "lm_head.weight", c->vocab_size, c->hidden_size,
							 &w->lm_head);
		if (status != FM_OK)
			return status;
		if (w->lm_head.data == NULL)
			return fm_set_error(err, FM_EINVAL,
								"missing tensor lm_head.weight, required because tie_word_embeddings is false");
	}

	for (int32_t l = 0; l < c->num_hidden_layers; l++)
	{
		status = bind_layer(&ctx, c, l, &layers[l]);
		if (status != FM_OK)
		{
			memset(w, 0, sizeof(*w));
			return status;
		}
	}
	w->layers = layers;
	return FM_OK;
}

/* Adapts an fp32 fm_tensor_lookup_fn to fm_matrix_lookup_fn. */
typedef struct f32_lookup
{
	fm_tensor_lookup_fn lookup;
	void	   *arg;
} f32_lookup;

static const void *
lookup_f32(void *arg, const char *name, int32_t *ndim, int64_t *shape,
		   fm_weight_format *format)
{
	const f32_lookup *l = (const f32_lookup *) arg;

	*format = FM_WEIGHTS_F32;
	return l->lookup(l->arg, name, ndim, shape);
}

fm_status
fm_layout_bind(fm_model *model, fm_layer_weights *layers,
			   fm_tensor_lookup_fn lookup, void *arg, fm_error *err)
{
	f32_lookup	l = {lookup, arg};

	return fm_layout_bind_formats(model, layers, lookup_f32, &l, err);
}

fm_weight_format
fm_layout_tensor_format(const char *name, int32_t ndim, const int64_t *shape,
						fm_weight_format format)
{
	size_t		len = strlen(name);
	const char *router = ".mlp.gate.weight";

	if (ndim != 2)
		return FM_WEIGHTS_F32;
	if (len >= strlen(router) && strcmp(name + len - strlen(router), router) == 0)
		return FM_WEIGHTS_F32;
	return fm_matrix_format_for(format, shape[1]);
}

/* ---------- conversion of a bound model ---------- */

/* Callback of visit_matrices for one matrix: src in the source model, dst in the copy. */
typedef bool (*matrix_visit_fn) (void *arg, const char *name, const fm_matrix *src,
								 fm_matrix *dst);

/* Calls fn on every weight matrix of src with its checkpoint name; false when fn fails. */
static bool
visit_matrices(const fm_model *src, fm_model *dst, matrix_visit_fn fn, void *arg)
{
	const fm_config *c = &src->config;
	char		name[160];

	if (!fn(arg, "model.embed_tokens.weight", &src->weights.embed_tokens,
			&dst->weights.embed_tokens))
		return false;
	if (c->tie_word_embeddings)
		dst->weights.lm_head = dst->weights.embed_tokens;
	else if (!fn(arg, "lm_head.weight", &src->weights.lm_head, &dst->weights.lm_head))
		return false;

	for (int32_t l = 0; l < c->num_hidden_layers; l++)
	{
		const fm_layer_weights *sl = &src->weights.layers[l];
		fm_layer_weights *dl = &dst->weights.layers[l];

#define VISIT(field, suffix) \
		do { \
			snprintf(name, sizeof(name), "model.layers.%d.%s", l, suffix); \
			if (!fn(arg, name, &sl->field, &dl->field)) \
				return false; \
		} while (0)

		VISIT(q_proj, "self_attn.q_proj.weight");
		VISIT(k_proj, "self_attn.k_proj.weight");
		VISIT(v_proj, "self_attn.v_proj.weight");
		VISIT(o_proj, "self_attn.o_proj.weight");
		for (int32_t e = 0; e < c->num_experts; e++)
		{
			char		proj[96];

#define VISIT_EXPERT(field, projname) \
			do { \
				snprintf(proj, sizeof(proj), "mlp.experts.%d.%s.weight", e, projname); \
				VISIT(experts[e].field, proj); \
			} while (0)

			if (sl->experts[e].rank == 0)
			{
				VISIT_EXPERT(gate, "gate_proj");
				VISIT_EXPERT(up, "up_proj");
				VISIT_EXPERT(down, "down_proj");
			}
			else
			{
				VISIT_EXPERT(gate_a, "gate_proj_a");
				VISIT_EXPERT(gate_b, "gate_proj_b");
				VISIT_EXPERT(up_a, "up_proj_a");
				VISIT_EXPERT(up_b, "up_proj_b");
				VISIT_EXPERT(down_a, "down_proj_a");
				VISIT_EXPERT(down_b, "down_proj_b");
			}
#undef VISIT_EXPERT
		}
#undef VISIT
	}
	return true;
}

typedef struct convert_state
{
	fm_weight_format format;
	size_t		total;			/* bytes laid out so far */
	char	   *base;			/* NULL while sizing */
} convert_state;

/* Sizes (base NULL) or writes (base set) one converted matrix. */
static bool
convert_one(void *arg, const char *name, const fm_matrix *src, fm_matrix *dst)
{
	convert_state *st = (convert_state *) arg;
	int64_t		shape[2] = {src->rows, src->cols};
	fm_weight_format f = fm_layout_tensor_format(name, 2, shape, st->format);
	size_t		bytes = fm_matrix_bytes(f, src->rows, src->cols);

	if (src->format != FM_WEIGHTS_F32 || bytes == SIZE_MAX ||
		__builtin_add_overflow(st->total, bytes, &st->total))
		return false;
	if (st->base != NULL)
	{
		void	   *out = st->base + st->total - bytes;

		fm_matrix_pack(f, (const float *) src->data, src->rows, src->cols, out);
		*dst = fm_matrix_view(f, out, src->rows, src->cols);
	}
	return true;
}

fm_status
fm_model_convert(const fm_model *src, fm_weight_format format, const fm_allocator *a,
				 fm_model *dst, fm_layer_weights *layers, void **storage, fm_error *err)
{
	const fm_config *c = &src->config;
	convert_state st = {format, 64, NULL};
	char	   *block;

	*storage = NULL;
	*dst = *src;
	memcpy(layers, src->weights.layers, sizeof(fm_layer_weights) * c->num_hidden_layers);
	dst->weights.layers = layers;
	if (!visit_matrices(src, dst, convert_one, &st))
		return fm_set_error(err, FM_EINVAL,
							"cannot convert the model to %s: a matrix is not f32 or too large",
							fm_weight_format_name(format));
	block = fm_alloc(a, st.total);
	if (block == NULL)
		return fm_set_error(err, FM_ENOMEM, "could not allocate %zu bytes of %s weights",
							st.total, fm_weight_format_name(format));
	/* every matrix size is a multiple of 64, so aligning the base aligns all */
	st.base = (char *) (((uintptr_t) block + 63) & ~(uintptr_t) 63);
	st.total = 0;
	visit_matrices(src, dst, convert_one, &st);
	*storage = block;
	return FM_OK;
}

/* Adds a matrix's bytes to *(size_t *) arg. */
static bool
count_bytes(void *arg, const char *name, const fm_matrix *src, fm_matrix *dst)
{
	*(size_t *) arg += fm_matrix_bytes(src->format, src->rows, src->cols);
	return true;
}

size_t
fm_model_weight_bytes(const fm_model *model)
{
	const fm_config *c = &model->config;
	size_t		total = 0;
	fm_model	unused = *model;

	/* count_bytes never writes dst; only the tied lm_head goes to unused */
	visit_matrices(model, &unused, count_bytes, &total);
	total += sizeof(float) * (size_t) c->hidden_size;	/* final norm */
	for (int32_t l = 0; l < c->num_hidden_layers; l++)
		total += sizeof(float) * ((size_t) c->num_experts * c->hidden_size +
								  (size_t) 2 * c->hidden_size +
								  (size_t) (c->num_attention_heads + c->num_key_value_heads) *
								  c->head_dim);
	return total;
}
