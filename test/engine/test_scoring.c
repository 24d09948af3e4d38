/*-------------------------------------------------------------------------
 *
 * test_scoring.c
 *	  Unit tests of the scoring calls: final hidden states, rolling a
 *	  session back, several sequences in one session, and next-token
 *	  log-probabilities.
 *
 * Each batched or rolled-back result is compared with the same sequence
 * run alone in a fresh session, and the log-probabilities with a
 * log-softmax computed here in double precision from fm_forward's
 * logits, or with values worked out by hand.
 *
 *-------------------------------------------------------------------------
 */
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "testutil.h"

#define HIDDEN 8
#define VOCAB 16

/* ---------- a small random model ---------- */

#define MAX_TENSORS 256

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

static uint64_t lcg_state = 7;

static float
random_uniform(float scale)
{
	lcg_state = lcg_state * UINT64_C(6364136223846793005) + UINT64_C(1442695040888963407);
	return scale * ((float) ((lcg_state >> 40) & 0xffffff) / 16777216.0f - 0.5f) * 2.0f;
}

static const float *
store_lookup(void *arg, const char *name, int32_t *ndim, int64_t *shape)
{
	store	   *s = arg;

	for (int32_t i = 0; i < s->n; i++)
		if (strcmp(s->tensors[i].name, name) == 0)
		{
			*ndim = s->tensors[i].ndim;
			memcpy(shape, s->tensors[i].shape, sizeof(s->tensors[i].shape));
			return s->tensors[i].data;
		}
	return NULL;
}

static void
store_free(store *s)
{
	for (int32_t i = 0; i < s->n; i++)
		free(s->tensors[i].data);
	s->n = 0;
}

/* A FlexMoRE config with two low-rank experts, top-3 routing and GQA. */
static fm_config
small_config(void)
{
	fm_config	c;

	memset(&c, 0, sizeof(c));
	strcpy(c.model_type, "flexmore");
	c.vocab_size = VOCAB;
	c.hidden_size = HIDDEN;
	c.intermediate_size = 12;
	c.num_hidden_layers = 2;
	c.num_attention_heads = 2;
	c.num_key_value_heads = 1;
	c.head_dim = 4;
	c.max_position_embeddings = 200;
	c.num_experts = 4;
	c.num_experts_per_tok = 3;
	c.rms_norm_eps = 1e-6;
	c.rope_theta = 10000.0;
	c.expert_ranks[1] = 2;
	c.expert_ranks[3] = 3;
	c.pad_token_id = -1;
	c.bos_token_id = -1;
	return c;
}

/* Fills s with random tensors for config c and binds them to m. */
static void
build_model(fm_model *m, fm_layer_weights *layers, store *s, const fm_config *c)
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
		tensor	   *t = &s->tensors[s->n++];
		bool		is_norm = specs[i].ndim == 1;
		int64_t		count = specs[i].shape[0] * (specs[i].ndim > 1 ? specs[i].shape[1] : 1);

		snprintf(t->name, sizeof(t->name), "%s", specs[i].name);
		t->ndim = specs[i].ndim;
		memcpy(t->shape, specs[i].shape, sizeof(t->shape));
		t->data = malloc(sizeof(float) * count);
		for (int64_t j = 0; j < count; j++)
			t->data[j] = (is_norm ? 1.0f : 0.0f) + random_uniform(is_norm ? 0.2f : 0.5f);
	}
	free(specs);

	m->config = *c;
	if (fm_layout_bind(m, layers, store_lookup, s, &err) != FM_OK)
	{
		printf("fm_layout_bind: %s\n", err.message);
		exit(1);
	}
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
		if (fabs(b[i]) > scale)
			scale = fabs(b[i]);
	}
	return diff / scale;
}

/* Final hidden states of ids run alone in a fresh session, into out. */
static void
hidden_alone(const fm_model *m, const int32_t *ids, int32_t n, float *out)
{
	fm_session *s;
	fm_error	err;

	CHECK(fm_session_create(m, &fm_malloc_allocator, n, &s, &err) == FM_OK);
	CHECK(fm_forward_hidden(s, ids, n, out, NULL, NULL, &err) == FM_OK);
	fm_session_destroy(s);
}

/* ---------- tests ---------- */

/*
 * The last hidden row of fm_forward_hidden, through fm_token_logprobs,
 * gives the log-softmax of fm_forward's logits.
 */
static void
test_logprobs_match_forward_logits(void)
{
	fm_config	c = small_config();
	store		st = {0};
	fm_layer_weights layers[2];
	fm_model	m;
	fm_session *s;
	fm_error	err;
	int32_t		ids[5] = {3, 1, 4, 1, 5};
	float		hidden[5 * HIDDEN];
	float		logits[VOCAB];
	float	   *scratch = malloc(sizeof(float) * FM_LOGPROB_ROWS * VOCAB);
	int32_t		targets[VOCAB];
	double		got[VOCAB];
	double		lse = 0.0;
	double		max = -INFINITY;

	build_model(&m, layers, &st, &c);
	CHECK(fm_session_create(&m, &fm_malloc_allocator, 5, &s, &err) == FM_OK);
	CHECK(fm_forward(s, ids, 5, logits, NULL, NULL, &err) == FM_OK);
	fm_session_destroy(s);
	hidden_alone(&m, ids, 5, hidden);

	for (int32_t v = 0; v < VOCAB; v++)
	{
		targets[v] = v;
		if (logits[v] > max)
			max = logits[v];
	}
	for (int32_t v = 0; v < VOCAB; v++)
		lse += exp(logits[v] - max);
	lse = max + log(lse);

	CHECK(fm_token_logprobs(&m, NULL, hidden + 4 * HIDDEN, 1, targets, VOCAB, got,
							scratch, &err) == FM_OK);
	for (int32_t v = 0; v < VOCAB; v++)
		CHECK_NEAR(got[v], logits[v] - lse, 1e-5);

	/* a negative target is skipped as NaN; an id past the vocabulary fails */
	targets[0] = -1;
	CHECK(fm_token_logprobs(&m, NULL, hidden, 1, targets, 1, got, scratch, &err) == FM_OK);
	CHECK(isnan(got[0]));
	targets[0] = VOCAB;
	CHECK(fm_token_logprobs(&m, NULL, hidden, 1, targets, 1, got, scratch, &err) == FM_EINVAL);

	free(scratch);
	store_free(&st);
}

/*
 * Two ids with lm_head = identity over hidden states h = [1.0720345,
 * 0.9223566]: log-softmax = [-0.62110605, -0.77078395] worked out in
 * float64; with only id 0 sampleable, [0, -inf].
 */
static void
test_logprobs_hand_computed(void)
{
	float		identity[4] = {1, 0, 0, 1};
	float		hidden[2] = {1.0720345f, 0.9223566f};
	float		scratch[FM_LOGPROB_ROWS * 2];
	int32_t		targets[2] = {0, 1};
	bool		only_first[2] = {true, false};
	double		out[2];
	fm_model	m;
	fm_error	err;

	memset(&m, 0, sizeof(m));
	m.config.vocab_size = 2;
	m.config.hidden_size = 2;
	m.weights.lm_head = fm_matrix_f32(identity, 2, 2);

	CHECK(fm_token_logprobs(&m, NULL, hidden, 1, targets, 2, out, scratch, &err) == FM_OK);
	CHECK_NEAR(out[0], -0.62110605, 1e-6);
	CHECK_NEAR(out[1], -0.77078395, 1e-6);
	CHECK(fm_token_logprobs(&m, only_first, hidden, 1, targets, 2, out, scratch, &err) == FM_OK);
	CHECK_NEAR(out[0], 0.0, 1e-12);
	CHECK(isinf(out[1]) && out[1] < 0);
}

/*
 * A prompt, then two continuations from it with fm_session_truncate in
 * between: each continuation's hidden states equal prompt + continuation
 * run alone.  The prompt is longer than one chunk.
 */
static void
test_truncate_reuses_prefix(void)
{
	fm_config	c = small_config();
	store		st = {0};
	fm_layer_weights layers[2];
	fm_model	m;
	fm_session *s;
	fm_error	err;
	int32_t		seq[80];
	float		got[80 * HIDDEN];
	float		want[80 * HIDDEN];
	const int32_t prompt_n = 70;
	int32_t		cont_a[3] = {9, 2, 6};
	int32_t		cont_b[6] = {5, 3, 5, 8, 9, 7};

	build_model(&m, layers, &st, &c);
	for (int32_t i = 0; i < prompt_n; i++)
		seq[i] = (i * 7 + 3) % VOCAB;

	CHECK(fm_session_create(&m, &fm_malloc_allocator, 80, &s, &err) == FM_OK);
	CHECK(fm_forward_hidden(s, seq, prompt_n, got, NULL, NULL, &err) == FM_OK);
	CHECK(fm_session_position(s) == prompt_n);

	CHECK(fm_forward_hidden(s, cont_a, 3, got, NULL, NULL, &err) == FM_OK);
	memcpy(seq + prompt_n, cont_a, sizeof(cont_a));
	hidden_alone(&m, seq, prompt_n + 3, want);
	CHECK(max_relative_diff(got, want + prompt_n * HIDDEN, 3 * HIDDEN) < 1e-5);

	CHECK(fm_session_truncate(s, prompt_n, &err) == FM_OK);
	CHECK(fm_session_position(s) == prompt_n);
	CHECK(fm_forward_hidden(s, cont_b, 6, got, NULL, NULL, &err) == FM_OK);
	memcpy(seq + prompt_n, cont_b, sizeof(cont_b));
	hidden_alone(&m, seq, prompt_n + 6, want);
	CHECK(max_relative_diff(got, want + prompt_n * HIDDEN, 6 * HIDDEN) < 1e-5);

	/* truncating forward is an error that changes nothing */
	CHECK(fm_session_truncate(s, prompt_n + 7, &err) == FM_EINVAL);
	CHECK(fm_session_truncate(s, -1, &err) == FM_EINVAL);
	CHECK(fm_session_position(s) == prompt_n + 6);

	fm_session_destroy(s);
	store_free(&st);
}

/*
 * Three sequences of different lengths, their rows interleaved and
 * spanning several chunks, equal each sequence run alone; then each is
 * rolled back and continued.
 */
static void
test_multi_equals_alone(void)
{
	fm_config	c = small_config();
	store		st = {0};
	fm_layer_weights layers[2];
	fm_model	m;
	fm_session *s;
	fm_error	err;
	const int32_t lens[3] = {50, 7, 90};
	int32_t		seqs_ids[3][100];
	int32_t		ids[147];
	int32_t		seqs[147];
	int32_t		row_of[3][100];
	float	   *got = malloc(sizeof(float) * 147 * HIDDEN);
	float		want[100 * HIDDEN];
	int32_t		next[3] = {0, 0, 0};
	int32_t		n = 0;

	build_model(&m, layers, &st, &c);
	for (int32_t j = 0; j < 3; j++)
		for (int32_t i = 0; i < lens[j]; i++)
			seqs_ids[j][i] = (i * (j + 3) + j) % VOCAB;

	/* round-robin interleaving, keeping each sequence's rows in order */
	while (n < 147)
		for (int32_t j = 0; j < 3; j++)
			if (next[j] < lens[j])
			{
				row_of[j][next[j]] = n;
				ids[n] = seqs_ids[j][next[j]++];
				seqs[n++] = j;
			}

	CHECK(fm_session_create_multi(&m, &fm_malloc_allocator, 3, 100, &s, &err) == FM_OK);
	CHECK(fm_session_seq_count(s) == 3);
	CHECK(fm_forward_multi(s, ids, seqs, 147, got, NULL, NULL, &err) == FM_OK);
	for (int32_t j = 0; j < 3; j++)
	{
		double		worst = 0.0;

		CHECK(fm_session_seq_position(s, j) == lens[j]);
		hidden_alone(&m, seqs_ids[j], lens[j], want);
		for (int32_t i = 0; i < lens[j]; i++)
		{
			double		d = max_relative_diff(got + (size_t) row_of[j][i] * HIDDEN,
											  want + (size_t) i * HIDDEN, HIDDEN);

			if (d > worst)
				worst = d;
		}
		CHECK(worst < 1e-5);
	}

	/* roll sequence 2 back to 40 and continue it with sequence 1's ids */
	CHECK(fm_session_seq_truncate(s, 2, 40, &err) == FM_OK);
	for (int32_t i = 0; i < 7; i++)
	{
		ids[i] = seqs_ids[1][i];
		seqs[i] = 2;
		seqs_ids[2][40 + i] = seqs_ids[1][i];
	}
	CHECK(fm_forward_multi(s, ids, seqs, 7, got, NULL, NULL, &err) == FM_OK);
	hidden_alone(&m, seqs_ids[2], 47, want);
	CHECK(max_relative_diff(got, want + 40 * HIDDEN, 7 * HIDDEN) < 1e-5);

	/* errors: nothing runs and no position moves */
	seqs[0] = 3;
	CHECK(fm_forward_multi(s, ids, seqs, 1, NULL, NULL, NULL, &err) == FM_EINVAL);
	for (int32_t i = 0; i < 94; i++)
		seqs[i] = 1;
	CHECK(fm_forward_multi(s, ids, seqs, 94, NULL, NULL, NULL, &err) == FM_ELIMIT);
	CHECK(fm_session_seq_position(s, 1) == 7);
	CHECK(fm_session_seq_position(s, 3) == -1);
	CHECK(fm_session_seq_truncate(s, 3, 0, &err) == FM_EINVAL);
	CHECK(fm_forward(s, ids, 1, NULL, NULL, NULL, &err) == FM_EINVAL);

	fm_session_reset(s);
	for (int32_t j = 0; j < 3; j++)
		CHECK(fm_session_seq_position(s, j) == 0);

	CHECK(fm_session_multi_bytes(&c, 3, 100) > fm_session_bytes(&c, 100));
	CHECK(fm_session_multi_bytes(&c, 1, 100) == fm_session_bytes(&c, 100));

	fm_session_destroy(s);
	free(got);
	store_free(&st);
}

int
main(void)
{
	test_logprobs_hand_computed();
	test_logprobs_match_forward_logits();
	test_truncate_reuses_prefix();
	test_multi_equals_alone();
	return TEST_SUMMARY();
}
