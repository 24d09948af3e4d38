/*-------------------------------------------------------------------------
 *
 * test_model.c
 *	  Unit tests of the forward pass, the checkpoint layout and the
 *	  generation loop, on tiny models built in memory.
 *
 * The forward pass is checked three ways: a one-layer model whose output
 * was worked out by hand, low-rank experts against the same experts
 * materialised as W0 + B A, and chunked prompts against token-by-token
 * decoding.
 *
 *-------------------------------------------------------------------------
 */
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "testutil.h"

/* ---------- weight pool and random numbers ---------- */

#define MAX_TENSORS 512

typedef struct tensor
{
	char		name[128];
	int32_t		ndim;
	int64_t		shape[FM_MAX_DIMS];
	float	   *data;
} tensor;

typedef struct store
{
	int32_t		n;
	tensor		tensors[MAX_TENSORS];
} store;

static uint64_t lcg_state = 12345;

static float
random_uniform(float scale)
{
	lcg_state = lcg_state * UINT64_C(6364136223846793005) + UINT64_C(1442695040888963407);
	return scale * ((float) ((lcg_state >> 40) & 0xffffff) / 16777216.0f - 0.5f) * 2.0f;
}

static float *
store_add(store *s, const char *name, int32_t ndim, int64_t d0, int64_t d1, int64_t d2,
		  float scale, float offset)
{
	tensor	   *t = &s->tensors[s->n++];
	int64_t		count = d0 * (ndim > 1 ? d1 : 1) * (ndim > 2 ? d2 : 1);

	snprintf(t->name, sizeof(t->name), "%s", name);
	t->ndim = ndim;
	t->shape[0] = d0;
	t->shape[1] = d1;
	t->shape[2] = d2;
	t->data = malloc(sizeof(float) * count);
	for (int64_t i = 0; i < count; i++)
		t->data[i] = offset + random_uniform(scale);
	return t->data;
}

static tensor *
store_get(store *s, const char *name)
{
	for (int32_t i = 0; i < s->n; i++)
		if (strcmp(s->tensors[i].name, name) == 0)
			return &s->tensors[i];
	return NULL;
}

static void
store_drop(store *s, const char *name)
{
	tensor	   *t = store_get(s, name);

	if (t != NULL)
		t->name[0] = '\0';
}

static void
store_free(store *s)
{
	for (int32_t i = 0; i < s->n; i++)
		free(s->tensors[i].data);
	s->n = 0;
}

static const float *
store_lookup(void *arg, const char *name, int32_t *ndim, int64_t *shape)
{
	tensor	   *t = store_get(arg, name);

	if (t == NULL || name[0] == '\0')
		return NULL;
	*ndim = t->ndim;
	memcpy(shape, t->shape, sizeof(t->shape));
	return t->data;
}

/* Fills a store with random tensors for every spec of config. */
static void
store_fill(store *s, const fm_config *c)
{
	fm_tensor_spec *specs;
	int32_t		n;
	fm_error	err;

	if (fm_layout_expected(c, &fm_malloc_allocator, &specs, &n, &err) != FM_OK)
	{
		printf("fm_layout_expected: %s\n", err.message);
		exit(1);
	}
	for (int32_t i = 0; i < n; i++)
	{
		bool		is_norm = specs[i].ndim == 1;

		store_add(s, specs[i].name, specs[i].ndim, specs[i].shape[0], specs[i].shape[1], 0,
				  is_norm ? 0.2f : 0.5f, is_norm ? 1.0f : 0.0f);
	}
	free(specs);
}

/* ---------- configs ---------- */

static fm_config
small_config(void)
{
	fm_config	c;

	memset(&c, 0, sizeof(c));
	strcpy(c.model_type, "flexmore");
	c.vocab_size = 16;
	c.hidden_size = 8;
	c.intermediate_size = 12;
	c.num_hidden_layers = 2;
	c.num_attention_heads = 2;
	c.num_key_value_heads = 1;
	c.head_dim = 4;
	c.max_position_embeddings = 128;
	c.num_experts = 4;
	c.num_experts_per_tok = 3;
	c.norm_topk_prob = false;
	c.tie_word_embeddings = false;
	c.rms_norm_eps = 1e-6;
	c.rope_theta = 10000.0;
	c.expert_ranks[1] = 2;
	c.expert_ranks[3] = 3;
	c.pad_token_id = -1;
	c.bos_token_id = -1;
	return c;
}

static bool
bind_model(fm_model *m, fm_layer_weights *layers, store *s, const fm_config *c)
{
	fm_error	err;

	m->config = *c;
	if (fm_layout_bind(m, layers, store_lookup, s, &err) != FM_OK)
	{
		printf("fm_layout_bind: %s\n", err.message);
		return false;
	}
	return true;
}

static double
max_relative_diff(const float *a, const float *b, int32_t n)
{
	double		diff = 0.0;
	double		scale = 1e-30;

	for (int32_t i = 0; i < n; i++)
	{
		if (fabs(a[i] - b[i]) > diff)
			diff = fabs(a[i] - b[i]);
		if (fabs(a[i]) > scale)
			scale = fabs(a[i]);
	}
	return diff / scale;
}

/* ---------- forward pass ---------- */

/*
 * One layer, hidden 2, one expert, id 0 at position 0, where attention
 * returns v.  Worked by hand: h = [1, 2]; a = v = h; h += a / rms(a)
 * = [1.632456, 3.264911]; g = h0, u = h1; m = [s, -s] with
 * s = silu(g) u; h += m / rms(m) = [2.632455, 2.264911]; logits =
 * h / rms(h) = [1.0720345, 0.9223566].
 */
static void
test_forward_hand_computed(void)
{
	float		embed[4] = {1, 2, 3, -1};	/* [vocab 2, hidden 2] */
	float		identity[4] = {1, 0, 0, 1};	/* [2, 2] */
	float		ones[2] = {1, 1};
	float		router[2] = {1, 0};	/* [1 expert, 2] */
	float		gate[2] = {1, 0};	/* [inter 1, hidden 2] */
	float		up[2] = {0, 1};
	float		down[2] = {1, -1};	/* [hidden 2, inter 1] */
	fm_layer_weights layer;
	fm_model	m;
	fm_session *s;
	fm_error	err;
	float		logits[2];
	int32_t		id = 0;

	memset(&m, 0, sizeof(m));
	memset(&layer, 0, sizeof(layer));
	strcpy(m.config.model_type, "flex_olmo");
	m.config.vocab_size = 2;
	m.config.hidden_size = 2;
	m.config.intermediate_size = 1;
	m.config.num_hidden_layers = 1;
	m.config.num_attention_heads = 1;
	m.config.num_key_value_heads = 1;
	m.config.head_dim = 2;
	m.config.max_position_embeddings = 4;
	m.config.num_experts = 1;
	m.config.num_experts_per_tok = 1;
	m.config.rms_norm_eps = 1e-6;
	m.config.rope_theta = 10000.0;
	layer.q_proj = layer.k_proj = layer.v_proj = layer.o_proj = fm_matrix_f32(identity, 2, 2);
	layer.q_norm = layer.k_norm = ones;
	layer.post_attention_norm = layer.post_feedforward_norm = ones;
	layer.router = router;
	layer.experts[0].gate = fm_matrix_f32(gate, 1, 2);
	layer.experts[0].up = fm_matrix_f32(up, 1, 2);
	layer.experts[0].down = fm_matrix_f32(down, 2, 1);
	m.weights.embed_tokens = fm_matrix_f32(embed, 2, 2);
	m.weights.lm_head = fm_matrix_f32(identity, 2, 2);
	m.weights.final_norm = ones;
	m.weights.layers = &layer;

	CHECK(fm_session_create(&m, &fm_malloc_allocator, 4, &s, &err) == FM_OK);
	CHECK(fm_forward(s, &id, 1, logits, NULL, NULL, &err) == FM_OK);
	CHECK_NEAR(logits[0], 1.0720345, 1e-5);
	CHECK_NEAR(logits[1], 0.9223566, 1e-5);
	fm_session_destroy(s);
}

/*
 * A FlexMoRE model against the same model with its low-rank experts
 * stored dense as W0 + B A: the adapter shortcut must change nothing but
 * rounding.
 */
static void
test_lowrank_equals_materialised(void)
{
	fm_config	c = small_config();
	fm_config	dense_c = c;
	store		lowrank = {0};
	store		dense = {0};
	fm_layer_weights lowrank_layers[2];
	fm_layer_weights dense_layers[2];
	fm_model	lowrank_m;
	fm_model	dense_m;
	fm_session *s1;
	fm_session *s2;
	fm_error	err;
	int32_t		ids[70];
	float		logits1[16];
	float		logits2[16];

	lcg_state = 1;
	store_fill(&lowrank, &c);

	/* dense copy: shared tensors verbatim, experts 1 and 3 as W0 + B A */
	strcpy(dense_c.model_type, "flex_olmo");
	memset(dense_c.expert_ranks, 0, sizeof(dense_c.expert_ranks));
	store_fill(&dense, &dense_c);
	for (int32_t i = 0; i < dense.n; i++)
	{
		tensor	   *t = &dense.tensors[i];
		tensor	   *src = store_get(&lowrank, t->name);
		int32_t		l, e;
		char		proj[16];

		if (src != NULL)
		{
			memcpy(t->data, src->data, sizeof(float) * t->shape[0] * (t->ndim > 1 ? t->shape[1] : 1));
			continue;
		}
		/* a dense expert weight that the low-rank model stores as A and B */
		if (sscanf(t->name, "model.layers.%d.mlp.experts.%d.%15[a-z_].weight", &l, &e, proj) != 3)
		{
			CHECK(false);
			continue;
		}
		{
			char		name[128];
			tensor	   *w0, *a, *b;
			int32_t		r = c.expert_ranks[e];
			int64_t		out = t->shape[0];
			int64_t		in = t->shape[1];

			snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.0.%s.weight", l, proj);
			w0 = store_get(&lowrank, name);
			snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.%s_a.weight", l, e, proj);
			a = store_get(&lowrank, name);
			snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.%s_b.weight", l, e, proj);
			b = store_get(&lowrank, name);
			CHECK(w0 != NULL);
			CHECK(a != NULL);
			CHECK(b != NULL);
			if (w0 == NULL || a == NULL || b == NULL)
				continue;
			for (int64_t o = 0; o < out; o++)
				for (int64_t j = 0; j < in; j++)
				{
					double		sum = w0->data[o * in + j];

					for (int32_t k = 0; k < r; k++)
						sum += (double) b->data[o * r + k] * a->data[k * in + j];
					t->data[o * in + j] = (float) sum;
				}
		}
	}

	CHECK(bind_model(&lowrank_m, lowrank_layers, &lowrank, &c));
	CHECK(bind_model(&dense_m, dense_layers, &dense, &dense_c));
	CHECK(lowrank_layers[0].experts[1].rank == 2);
	CHECK(lowrank_layers[0].experts[1].gate.data == NULL);
	CHECK(fm_session_create(&lowrank_m, &fm_malloc_allocator, 100, &s1, &err) == FM_OK);
	CHECK(fm_session_create(&dense_m, &fm_malloc_allocator, 100, &s2, &err) == FM_OK);

	for (int i = 0; i < 70; i++)
		ids[i] = (i * 7 + 3) % 16;

	/* prompt path (chunks of 64 + 6 rows, sgemm) */
	CHECK(fm_forward(s1, ids, 70, logits1, NULL, NULL, &err) == FM_OK);
	CHECK(fm_forward(s2, ids, 70, logits2, NULL, NULL, &err) == FM_OK);
	CHECK(max_relative_diff(logits1, logits2, 16) <= 1e-5);

	/* decode path (matvec) */
	for (int i = 0; i < 5; i++)
	{
		CHECK(fm_forward(s1, &ids[i], 1, logits1, NULL, NULL, &err) == FM_OK);
		CHECK(fm_forward(s2, &ids[i], 1, logits2, NULL, NULL, &err) == FM_OK);
		CHECK(max_relative_diff(logits1, logits2, 16) <= 1e-5);
	}

	/* restricted to low-rank experts only, the public FFN still runs */
	{
		const bool	allowed[4] = {false, true, false, true};

		fm_session_reset(s1);
		fm_session_reset(s2);
		CHECK(fm_session_set_experts(s1, allowed, &err) == FM_OK);
		CHECK(fm_session_set_experts(s2, allowed, &err) == FM_OK);
		CHECK(fm_forward(s1, ids, 20, logits1, NULL, NULL, &err) == FM_OK);
		CHECK(fm_forward(s2, ids, 20, logits2, NULL, NULL, &err) == FM_OK);
		CHECK(max_relative_diff(logits1, logits2, 16) <= 1e-5);
	}

	fm_session_destroy(s1);
	fm_session_destroy(s2);
	store_free(&lowrank);
	store_free(&dense);
}

/* A 100-id prompt in one call (chunks of 64 and 36) equals 100 decode steps. */
static void
test_chunked_prompt_equals_decode(void)
{
	fm_config	c = small_config();
	store		s = {0};
	fm_layer_weights layers[2];
	fm_model	m;
	fm_session *chunked;
	fm_session *stepped;
	fm_error	err;
	int32_t		ids[100];
	float		logits1[16];
	float		logits2[16];
	fm_status	status = FM_OK;

	lcg_state = 2;
	store_fill(&s, &c);
	CHECK(bind_model(&m, layers, &s, &c));
	CHECK(fm_session_create(&m, &fm_malloc_allocator, 128, &chunked, &err) == FM_OK);
	CHECK(fm_session_create(&m, &fm_malloc_allocator, 128, &stepped, &err) == FM_OK);

	for (int i = 0; i < 100; i++)
		ids[i] = (i * 5 + 1) % 16;
	CHECK(fm_forward(chunked, ids, 100, logits1, NULL, NULL, &err) == FM_OK);
	for (int i = 0; i < 100 && status == FM_OK; i++)
		status = fm_forward(stepped, &ids[i], 1, logits2, NULL, NULL, &err);
	CHECK(status == FM_OK);
	CHECK(fm_session_position(chunked) == 100);
	CHECK(fm_session_position(stepped) == 100);
	CHECK(max_relative_diff(logits1, logits2, 16) <= 1e-5);

	/* reset gives the same logits as a fresh session */
	fm_session_reset(chunked);
	CHECK(fm_session_position(chunked) == 0);
	CHECK(fm_forward(chunked, ids, 100, logits2, NULL, NULL, &err) == FM_OK);
	CHECK(memcmp(logits1, logits2, sizeof(logits1)) == 0);

	fm_session_destroy(chunked);
	fm_session_destroy(stepped);
	store_free(&s);
}

/* Routing reports of one forward pass: [position][layer] cells. */
typedef struct route_log
{
	int			reports;
	int			count[100][2];
	int32_t		experts[100][2][3];
	float		weights[100][2][3];
	bool		order_ok;
} route_log;

static void
log_route(void *arg, int32_t row, int32_t seq, int32_t position, int32_t layer,
		  int32_t n, const int32_t *experts, const float *weights)
{
	route_log  *log = arg;

	log->reports++;
	if (seq != 0 || position < 0 || position >= 100 || layer < 0 || layer >= 2 || n > 3 ||
		row < 0 || row >= FM_PROMPT_CHUNK)
	{
		log->order_ok = false;
		return;
	}
	log->count[position][layer] = n;
	for (int j = 0; j < n; j++)
	{
		log->experts[position][layer][j] = experts[j];
		log->weights[position][layer][j] = weights[j];
		if (j > 0 && weights[j] > weights[j - 1])
			log->order_ok = false;
	}
}

/*
 * The routing report covers every position and layer once, in weight
 * order, never names an excluded expert, and is the same for a chunked
 * prompt and for decode steps.
 */
static void
test_route_hook(void)
{
	fm_config	c = small_config();
	store		s = {0};
	fm_layer_weights layers[2];
	fm_model	m;
	fm_session *chunked;
	fm_session *stepped;
	fm_error	err;
	int32_t		ids[100];
	bool		allowed[4] = {true, false, true, true};
	static route_log chunked_log;
	static route_log stepped_log;
	fm_status	status = FM_OK;
	bool		excluded_seen = false;

	lcg_state = 3;
	store_fill(&s, &c);
	CHECK(bind_model(&m, layers, &s, &c));
	CHECK(fm_session_create(&m, &fm_malloc_allocator, 128, &chunked, &err) == FM_OK);
	CHECK(fm_session_create(&m, &fm_malloc_allocator, 128, &stepped, &err) == FM_OK);
	CHECK(fm_session_set_experts(chunked, allowed, &err) == FM_OK);
	CHECK(fm_session_set_experts(stepped, allowed, &err) == FM_OK);
	memset(&chunked_log, 0, sizeof(chunked_log));
	memset(&stepped_log, 0, sizeof(stepped_log));
	chunked_log.order_ok = stepped_log.order_ok = true;
	fm_session_set_route_hook(chunked, log_route, &chunked_log);
	fm_session_set_route_hook(stepped, log_route, &stepped_log);

	for (int i = 0; i < 100; i++)
		ids[i] = (i * 7 + 3) % 16;
	CHECK(fm_forward(chunked, ids, 100, NULL, NULL, NULL, &err) == FM_OK);
	for (int i = 0; i < 100 && status == FM_OK; i++)
		status = fm_forward(stepped, &ids[i], 1, NULL, NULL, NULL, &err);
	CHECK(status == FM_OK);

	CHECK(chunked_log.reports == 200);
	CHECK(chunked_log.order_ok);
	CHECK(stepped_log.order_ok);
	for (int p = 0; p < 100; p++)
		for (int l = 0; l < 2; l++)
		{
			CHECK(chunked_log.count[p][l] == 3);
			for (int j = 0; j < chunked_log.count[p][l]; j++)
				if (chunked_log.experts[p][l][j] == 1)
					excluded_seen = true;
		}
	CHECK(!excluded_seen);
	CHECK(memcmp(chunked_log.count, stepped_log.count, sizeof(chunked_log.count)) == 0);
	CHECK(memcmp(chunked_log.experts, stepped_log.experts, sizeof(chunked_log.experts)) == 0);

	/* without a hook nothing is reported */
	fm_session_set_route_hook(chunked, NULL, NULL);
	fm_session_reset(chunked);
	chunked_log.reports = 0;
	CHECK(fm_forward(chunked, ids, 10, NULL, NULL, NULL, &err) == FM_OK);
	CHECK(chunked_log.reports == 0);

	fm_session_destroy(chunked);
	fm_session_destroy(stepped);
	store_free(&s);
}

static int	interrupt_calls;

static bool
interrupt_at_second_call(void *arg)
{
	return ++interrupt_calls > 1;
}

static void
test_forward_errors(void)
{
	fm_config	c = small_config();
	store		s = {0};
	fm_layer_weights layers[2];
	fm_model	m;
	fm_session *session;
	fm_error	err;
	int32_t		ids[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
	int32_t		bad[2] = {1, 16};
	float		logits[16];
	bool		none[4] = {false, false, false, false};
	fm_session *too_long = NULL;

	lcg_state = 3;
	store_fill(&s, &c);
	CHECK(bind_model(&m, layers, &s, &c));
	CHECK(fm_session_create(&m, &fm_malloc_allocator, 10, &session, &err) == FM_OK);

	CHECK(fm_forward(session, bad, 2, logits, NULL, NULL, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "token id 16") != NULL);
	bad[1] = -1;
	CHECK(fm_forward(session, bad, 2, logits, NULL, NULL, &err) == FM_EINVAL);
	CHECK(fm_session_position(session) == 0);

	CHECK(fm_forward(session, ids, 11, logits, NULL, NULL, &err) == FM_ELIMIT);
	CHECK(strcmp(err.message, "position 0 + 11 ids exceeds the context of 10 positions") == 0);
	CHECK(fm_forward(session, ids, 8, logits, NULL, NULL, &err) == FM_OK);
	CHECK(fm_forward(session, ids, 3, logits, NULL, NULL, &err) == FM_ELIMIT);
	CHECK(strstr(err.message, "position 8 + 3 ids") != NULL);
	CHECK(fm_forward(session, ids, 2, logits, NULL, NULL, &err) == FM_OK);
	CHECK(fm_session_position(session) == 10);

	/* cancellation between layers leaves the position unchanged */
	fm_session_reset(session);
	interrupt_calls = 0;
	CHECK(fm_forward(session, ids, 4, logits, interrupt_at_second_call, NULL, &err) == FM_ECANCELED);
	CHECK(fm_session_position(session) == 0);

	CHECK(fm_session_set_experts(session, none, &err) == FM_EINVAL);
	CHECK(fm_session_create(&m, &fm_malloc_allocator, 129, &too_long, &err) == FM_EINVAL);
	CHECK(too_long == NULL);

	fm_session_destroy(session);
	store_free(&s);
}

/* ---------- memory accounting ---------- */

typedef struct counting
{
	size_t		allocated;
	int32_t		live;
} counting;

static void *
counting_alloc(void *context, size_t size)
{
	counting   *c = context;

	c->allocated += size;
	c->live++;
	return malloc(size);
}

static void
counting_free(void *context, void *ptr)
{
	counting   *c = context;

	c->live--;
	free(ptr);
}

static void
test_session_bytes_cover_every_allocation(void)
{
	fm_config	c = small_config();
	store		s = {0};
	fm_layer_weights layers[2];
	fm_model	m;
	fm_session *session;
	fm_error	err;
	counting	count = {0};
	fm_allocator a = {counting_alloc, counting_free, &count};
	fm_sampler_params params = {.temperature = 0.7, .top_p = 0.9, .repetition_penalty = 1.0, .top_k = 5, .seed = 3};
	int32_t		prompt[3] = {1, 2, 3};
	int32_t		out[8];
	int32_t		n_out;
	fm_finish	finish;

	lcg_state = 4;
	store_fill(&s, &c);
	CHECK(bind_model(&m, layers, &s, &c));
	CHECK(fm_session_create(&m, &a, 50, &session, &err) == FM_OK);
	CHECK(count.allocated == fm_session_bytes(&c, 50));
	CHECK(fm_generate(session, prompt, 3, 8, &params, NULL, out, &n_out, &finish,
					  NULL, NULL, &err) == FM_OK);
	CHECK(count.allocated == fm_session_bytes(&c, 50));
	fm_session_destroy(session);
	CHECK(count.live == 0);
	store_free(&s);
}

/* ---------- layout ---------- */

static void
test_layout_names_and_tied_embeddings(void)
{
	fm_config	c = small_config();
	store		s = {0};
	fm_layer_weights layers[2];
	fm_model	m;
	fm_tensor_spec *specs;
	int32_t		n;
	fm_error	err;
	bool		found_a = false;

	CHECK(fm_layout_expected(&c, &fm_malloc_allocator, &specs, &n, &err) == FM_OK);
	/* 3 global + 2 layers x (9 shared + 3 + 6 + 3 + 6 expert tensors) */
	CHECK(n == 3 + 2 * (9 + 18));
	for (int32_t i = 0; i < n; i++)
		if (strcmp(specs[i].name, "model.layers.1.mlp.experts.3.down_proj_a.weight") == 0)
			found_a = specs[i].ndim == 2 && specs[i].shape[0] == 3 &&
				specs[i].shape[1] == 12 && specs[i].expert == 3;
	CHECK(found_a);
	CHECK(strcmp(specs[2].name, "lm_head.weight") == 0);
	CHECK(!specs[2].optional);
	free(specs);

	lcg_state = 5;
	store_fill(&s, &c);

	/* untied without lm_head: an error naming the tensor */
	store_drop(&s, "lm_head.weight");
	m.config = c;
	CHECK(fm_layout_bind(&m, layers, store_lookup, &s, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "lm_head.weight") != NULL);
	CHECK(m.weights.lm_head.data == NULL);

	/* tied without lm_head: the embedding serves as the output matrix */
	c.tie_word_embeddings = true;
	CHECK(bind_model(&m, layers, &s, &c));
	CHECK(m.weights.lm_head.data == m.weights.embed_tokens.data);
	CHECK(fm_model_validate(&m, &err) == FM_OK);

	/* a wrong shape names the tensor and both shapes */
	{
		tensor	   *q = store_get(&s, "model.layers.1.self_attn.q_proj.weight");

		q->shape[1] = 4;
		CHECK(fm_layout_bind(&m, layers, store_lookup, &s, &err) == FM_EINVAL);
		CHECK(strcmp(err.message,
					 "tensor model.layers.1.self_attn.q_proj.weight has shape [8, 4], expected [8, 8]") == 0);
		q->shape[1] = 8;
	}

	/* a missing adapter is named */
	store_drop(&s, "model.layers.0.mlp.experts.1.up_proj_b.weight");
	CHECK(fm_layout_bind(&m, layers, store_lookup, &s, &err) == FM_EINVAL);
	CHECK(strcmp(err.message, "missing tensor model.layers.0.mlp.experts.1.up_proj_b.weight") == 0);

	store_free(&s);
}

static void
test_layout_fused_experts(void)
{
	fm_config	c = small_config();
	store		s = {0};
	fm_layer_weights layers[2];
	fm_model	m;
	fm_error	err;
	float	   *gate_up[2];
	float	   *down[2];
	int64_t		e_n = 4, inter = 12, hidden = 8;

	strcpy(c.model_type, "flex_olmo");
	memset(c.expert_ranks, 0, sizeof(c.expert_ranks));
	lcg_state = 6;
	store_fill(&s, &c);
	for (int l = 0; l < 2; l++)
	{
		char		name[128];

		for (int e = 0; e < 4; e++)
		{
			const char *projs[3] = {"gate_proj", "up_proj", "down_proj"};

			for (int p = 0; p < 3; p++)
			{
				snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.%s.weight",
						 l, e, projs[p]);
				store_drop(&s, name);
			}
		}
		snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.gate_up_proj", l);
		gate_up[l] = store_add(&s, name, 3, e_n, 2 * inter, hidden, 0.5f, 0.0f);
		snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.down_proj", l);
		down[l] = store_add(&s, name, 3, e_n, hidden, inter, 0.5f, 0.0f);
	}

	CHECK(bind_model(&m, layers, &s, &c));
	CHECK(layers[1].experts[2].gate.data == gate_up[1] + 2 * 2 * inter * hidden);
	CHECK(layers[1].experts[2].up.data == gate_up[1] + 2 * 2 * inter * hidden + inter * hidden);
	CHECK(layers[1].experts[2].down.data == down[1] + 2 * hidden * inter);
	CHECK(layers[0].experts[0].gate.data == gate_up[0]);
	CHECK(fm_model_validate(&m, &err) == FM_OK);

	/* a fused tensor of the wrong shape is rejected by name */
	store_get(&s, "model.layers.0.mlp.experts.gate_up_proj")->shape[1] = inter;
	CHECK(fm_layout_bind(&m, layers, store_lookup, &s, &err) == FM_EINVAL);
	CHECK(strcmp(err.message,
				 "tensor model.layers.0.mlp.experts.gate_up_proj has shape [4, 12, 8], expected [4, 24, 8]") == 0);
	store_free(&s);
}

/* ---------- generation ---------- */

typedef struct gen_fixture
{
	store		s;
	fm_layer_weights layers[2];
	fm_model	m;
} gen_fixture;

static void
gen_setup(gen_fixture *f)
{
	fm_config	c = small_config();

	memset(f, 0, sizeof(*f));
	lcg_state = 7;
	store_fill(&f->s, &c);
	bind_model(&f->m, f->layers, &f->s, &c);
}

static fm_status
run_generate(fm_model *m, int32_t context, const int32_t *prompt, int32_t n_prompt,
			 int32_t max_tokens, const fm_sampler_params *params, const bool *sampleable,
			 int32_t *out, int32_t *n_out, fm_finish *finish, int32_t *position,
			 fm_error *err)
{
	fm_session *session;
	fm_status	status;

	status = fm_session_create(m, &fm_malloc_allocator, context, &session, err);
	if (status != FM_OK)
		return status;
	status = fm_generate(session, prompt, n_prompt, max_tokens, params, sampleable,
						 out, n_out, finish, NULL, NULL, err);
	*position = fm_session_position(session);
	fm_session_destroy(session);
	return status;
}

static void
test_generate_greedy_and_seeds(void)
{
	gen_fixture f;
	fm_sampler_params greedy1 = {.temperature = 0.0, .top_p = 1.0, .repetition_penalty = 1.0, .seed = 1};
	fm_sampler_params greedy2 = {.temperature = 0.0, .top_p = 1.0, .repetition_penalty = 1.0, .seed = 999};
	fm_sampler_params hot = {.temperature = 1.5, .top_p = 1.0, .repetition_penalty = 1.0, .seed = 42};
	int32_t		prompt[3] = {1, 2, 3};
	int32_t		a[20], b[20];
	int32_t		na, nb, pos;
	fm_finish	fa, fb;
	fm_error	err;

	gen_setup(&f);
	CHECK(run_generate(&f.m, 64, prompt, 3, 20, &greedy1, NULL, a, &na, &fa, &pos, &err) == FM_OK);
	CHECK(run_generate(&f.m, 64, prompt, 3, 20, &greedy2, NULL, b, &nb, &fb, &pos, &err) == FM_OK);
	CHECK(na == 20);
	CHECK(nb == 20);
	CHECK(fa == FM_FINISH_MAX_TOKENS);
	CHECK(memcmp(a, b, sizeof(a)) == 0);

	CHECK(run_generate(&f.m, 64, prompt, 3, 20, &hot, NULL, a, &na, &fa, &pos, &err) == FM_OK);
	CHECK(run_generate(&f.m, 64, prompt, 3, 20, &hot, NULL, b, &nb, &fb, &pos, &err) == FM_OK);
	CHECK(na == 20);
	CHECK(nb == 20);
	CHECK(memcmp(a, b, sizeof(a)) == 0);

	/* the first greedy id, made the eos id, ends generation unstored */
	CHECK(run_generate(&f.m, 64, prompt, 3, 20, &greedy1, NULL, a, &na, &fa, &pos, &err) == FM_OK);
	f.m.config.num_eos = 2;
	f.m.config.eos_token_ids[0] = 15;
	f.m.config.eos_token_ids[1] = a[0];
	CHECK(run_generate(&f.m, 64, prompt, 3, 20, &greedy1, NULL, b, &nb, &fb, &pos, &err) == FM_OK);
	CHECK(nb == 0);
	CHECK(fb == FM_FINISH_EOS);
	f.m.config.num_eos = 0;

	/* only sampleable ids come out, greedy or sampled */
	{
		bool		sampleable[16] = {false};
		bool		only = true;

		sampleable[3] = sampleable[5] = true;
		CHECK(run_generate(&f.m, 64, prompt, 3, 20, &hot, sampleable, a, &na, &fa, &pos, &err) == FM_OK);
		for (int i = 0; i < na; i++)
			only = only && (a[i] == 3 || a[i] == 5);
		CHECK(na == 20);
		CHECK(only);
		CHECK(run_generate(&f.m, 64, prompt, 3, 20, &greedy1, sampleable, a, &na, &fa, &pos, &err) == FM_OK);
		only = true;
		for (int i = 0; i < na; i++)
			only = only && (a[i] == 3 || a[i] == 5);
		CHECK(na == 20);
		CHECK(only);
	}
	store_free(&f.s);
}

/*
 * Greedy generation with a repetition penalty against a loop written
 * here: forward, penalise by hand (a linear search for earlier
 * occurrences), take the arg max, feed it back.
 */
static void
test_generate_repetition_penalty(void)
{
	gen_fixture f;
	fm_sampler_params params = {.temperature = 0.0, .top_p = 1.0, .repetition_penalty = 1.8};
	int32_t		prompt[3] = {1, 2, 3};
	int32_t		out[12], plain[12], ctx[15];
	int32_t		n_out, n_plain, pos;
	fm_finish	finish;
	fm_session *s;
	fm_error	err;
	float		logits[16];
	bool		differs = false;

	gen_setup(&f);
	CHECK(run_generate(&f.m, 64, prompt, 3, 12, &params, NULL, out, &n_out, &finish, &pos, &err) == FM_OK);
	CHECK(n_out == 12);

	CHECK(fm_session_create(&f.m, &fm_malloc_allocator, 64, &s, &err) == FM_OK);
	memcpy(ctx, prompt, sizeof(prompt));
	CHECK(fm_forward(s, prompt, 3, logits, NULL, NULL, &err) == FM_OK);
	for (int t = 0; t < 12; t++)
	{
		int			n_ctx = 3 + t;
		int32_t		best = 0;

		for (int32_t id = 0; id < 16; id++)
		{
			bool		earlier = false;

			for (int j = 0; j < n_ctx; j++)
				earlier = earlier || ctx[j] == id;
			if (earlier)
				logits[id] = logits[id] > 0 ? logits[id] / 1.8f : logits[id] * 1.8f;
		}
		for (int32_t id = 1; id < 16; id++)
			if (logits[id] > logits[best])
				best = id;
		CHECK(out[t] == best);
		ctx[n_ctx] = best;
		CHECK(fm_forward(s, &best, 1, logits, NULL, NULL, &err) == FM_OK);
	}
	fm_session_destroy(s);

	/* the penalty changes this fixture's greedy output */
	params.repetition_penalty = 1.0;
	CHECK(run_generate(&f.m, 64, prompt, 3, 12, &params, NULL, plain, &n_plain, &finish, &pos, &err) == FM_OK);
	for (int t = 0; t < 12; t++)
		differs = differs || plain[t] != out[t];
	CHECK(differs);

	params.repetition_penalty = 0.0;
	CHECK(run_generate(&f.m, 64, prompt, 3, 5, &params, NULL, out, &n_out, &finish, &pos, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "repetition_penalty 0") != NULL);
	params.repetition_penalty = INFINITY;
	CHECK(run_generate(&f.m, 64, prompt, 3, 5, &params, NULL, out, &n_out, &finish, &pos, &err) == FM_EINVAL);
	store_free(&f.s);
}

static void
test_generate_limits(void)
{
	gen_fixture f;
	fm_sampler_params greedy = {.temperature = 0.0, .top_p = 1.0, .repetition_penalty = 1.0};
	fm_sampler_params bad = greedy;
	int32_t		prompt[11] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
	int32_t		out[32];
	int32_t		n_out, pos;
	fm_finish	finish;
	fm_error	err;

	gen_setup(&f);

	/* max_tokens 0: nothing sampled, the prompt is still in the cache */
	n_out = -1;
	CHECK(run_generate(&f.m, 10, prompt, 4, 0, &greedy, NULL, out, &n_out, &finish, &pos, &err) == FM_OK);
	CHECK(n_out == 0);
	CHECK(finish == FM_FINISH_MAX_TOKENS);
	CHECK(pos == 4);

	CHECK(run_generate(&f.m, 10, prompt, 4, 1, &greedy, NULL, out, &n_out, &finish, &pos, &err) == FM_OK);
	CHECK(n_out == 1);
	CHECK(finish == FM_FINISH_MAX_TOKENS);

	/* prompt 4 + max_tokens 20 in a context of 10: six ids, then length */
	CHECK(run_generate(&f.m, 10, prompt, 4, 20, &greedy, NULL, out, &n_out, &finish, &pos, &err) == FM_OK);
	CHECK(n_out == 6);
	CHECK(finish == FM_FINISH_LENGTH);
	CHECK(pos <= 10);

	/* the prompt fills the context: no room for an id */
	CHECK(run_generate(&f.m, 10, prompt, 10, 5, &greedy, NULL, out, &n_out, &finish, &pos, &err) == FM_OK);
	CHECK(n_out == 0);
	CHECK(finish == FM_FINISH_LENGTH);

	/* a prompt longer than the context is an error */
	CHECK(run_generate(&f.m, 10, prompt, 11, 5, &greedy, NULL, out, &n_out, &finish, &pos, &err) == FM_ELIMIT);

	CHECK(run_generate(&f.m, 10, prompt, 4, -1, &greedy, NULL, out, &n_out, &finish, &pos, &err) == FM_EINVAL);
	bad.temperature = -0.5;
	CHECK(run_generate(&f.m, 10, prompt, 4, 5, &bad, NULL, out, &n_out, &finish, &pos, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "temperature -0.5") != NULL);
	bad.temperature = NAN;
	CHECK(run_generate(&f.m, 10, prompt, 4, 5, &bad, NULL, out, &n_out, &finish, &pos, &err) == FM_EINVAL);
	bad = greedy;
	bad.top_p = 0.0;
	CHECK(run_generate(&f.m, 10, prompt, 4, 5, &bad, NULL, out, &n_out, &finish, &pos, &err) == FM_EINVAL);
	CHECK(run_generate(&f.m, 10, prompt, 0, 5, &greedy, NULL, out, &n_out, &finish, &pos, &err) == FM_EINVAL);

	store_free(&f.s);
}

int
main(void)
{
	test_forward_hand_computed();
	test_lowrank_equals_materialised();
	test_chunked_prompt_equals_decode();
	test_route_hook();
	test_forward_errors();
	test_session_bytes_cover_every_allocation();
	test_layout_names_and_tied_embeddings();
	test_layout_fused_experts();
	test_generate_greedy_and_seeds();
	test_generate_limits();
	test_generate_repetition_penalty();
	return TEST_SUMMARY();
}
