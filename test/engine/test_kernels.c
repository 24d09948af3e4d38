/*-------------------------------------------------------------------------
 *
 * test_kernels.c
 *	  Unit tests of the engine kernels, routing, dtype conversion and the
 *	  sampler, against values worked out by hand or in float64.
 *
 *-------------------------------------------------------------------------
 */
#include <string.h>

#include "engine/engine.h"
#include "engine/kernels.h"
#include "testutil.h"

static void
test_rmsnorm_eps_from_argument(void)
{
	static float x[2048];
	static float w[2048];
	static float y[2048];

	for (int i = 0; i < 2048; i++)
	{
		x[i] = 0.001f;
		w[i] = 1.0f;
	}
	/* 0.001 / sqrt(1e-6 + 1e-6) = 0.70711; eps 1e-5 would give 0.30151 */
	fm_rmsnorm(y, x, w, 2048, 1e-6);
	CHECK_NEAR(y[0], 0.70711, 1e-5);
	CHECK_NEAR(y[2047], 0.70711, 1e-5);
	fm_rmsnorm(y, x, w, 2048, 1e-5);
	CHECK_NEAR(y[0], 0.30151, 1e-5);

	/* the weight multiplies after normalising */
	w[0] = 2.0f;
	fm_rmsnorm(y, x, w, 2048, 1e-6);
	CHECK_NEAR(y[0], 1.41421, 1e-5);
}

static void
test_rope_rotate_half(void)
{
	float		q[4] = {1, 0, 0, 0};
	float		two_heads[8] = {1, 0, 0, 0, 0, 0, 1, 0};

	/* rotate-half pairs element 0 with 2: [cos 1, 0, sin 1, 0] */
	fm_rope(q, 1, 4, 1, 10000.0);
	CHECK_NEAR(q[0], 0.5403023, 1e-6);
	CHECK_NEAR(q[1], 0.0, 1e-7);
	CHECK_NEAR(q[2], 0.8414710, 1e-6);
	CHECK_NEAR(q[3], 0.0, 1e-7);

	/* position 0 is the identity; each head rotates on its own */
	fm_rope(two_heads, 2, 4, 0, 10000.0);
	CHECK(two_heads[0] == 1.0f);
	CHECK(two_heads[6] == 1.0f);
	fm_rope(two_heads, 2, 4, 1, 10000.0);
	CHECK_NEAR(two_heads[4], -0.8414710, 1e-6);
	CHECK_NEAR(two_heads[6], 0.5403023, 1e-6);

	/* second frequency: angle 1 * 10000^(-2/4) = 0.01 */
	{
		float		v[4] = {0, 1, 0, 0};

		fm_rope(v, 1, 4, 1, 10000.0);
		CHECK_NEAR(v[1], cos(0.01), 1e-6);
		CHECK_NEAR(v[3], sin(0.01), 1e-6);
	}
}

static void
test_softmax_and_silu(void)
{
	float		x[3] = {1, 2, 3};
	float		masked[3] = {1, -INFINITY, 3};

	fm_softmax(x, 3);
	CHECK_NEAR(x[0], 0.0900306, 1e-6);
	CHECK_NEAR(x[1], 0.2447285, 1e-6);
	CHECK_NEAR(x[2], 0.6652410, 1e-6);

	fm_softmax(masked, 3);
	CHECK(masked[1] == 0.0f);
	CHECK_NEAR(masked[0] + masked[2], 1.0, 1e-6);

	CHECK_NEAR(fm_silu(1.0f), 0.7310586, 1e-6);
	CHECK_NEAR(fm_silu(-2.0f), -0.2384058, 1e-6);
	CHECK(fm_silu(0.0f) == 0.0f);
}

static void
test_matvec_and_matmul(void)
{
	const float w[6] = {1, 2, 3, 4, 5, 6};	/* [2, 3] */
	const float x[9] = {1, 0, -1, 0, 1, 0, 2, 2, 2};	/* [3, 3] */
	float		y[6];

	fm_matvec(y, w, x, 2, 3);
	CHECK(y[0] == -2.0f);
	CHECK(y[1] == -2.0f);

	/* three rows, fewer than FM_SGEMM_MIN_ROWS, go through the C loop */
	memset(y, 0, sizeof(y));
	fm_matmul(y, x, w, 3, 2, 3);
	CHECK(y[0] == -2.0f);
	CHECK(y[1] == -2.0f);
	CHECK(y[2] == 2.0f);
	CHECK(y[3] == 5.0f);
	CHECK(y[4] == 12.0f);
	CHECK(y[5] == 30.0f);
}

static int	sgemm_calls;
static int	loader_calls;

/* A naive sgemm for the loader test: Y = X W^T, row-major. */
static void
counting_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
			   const float *a, int lda, const float *b, int ldb, float beta,
			   float *c, int ldc)
{
	sgemm_calls++;
	for (int r = 0; r < m; r++)
		for (int o = 0; o < n; o++)
		{
			double		sum = 0.0;

			for (int i = 0; i < k; i++)
				sum += (double) a[r * lda + i] * b[o * ldb + i];
			c[r * ldc + o] = (float) sum;
		}
}

static void
counting_loader(void)
{
	loader_calls++;
	fm_set_sgemm(counting_sgemm);
}

static void
test_matmul_paths(void)
{
	enum
	{
		ROWS = FM_SGEMM_MIN_ROWS, OUT = 37, IN = 129
	};
	static float w[OUT * IN];
	static float x[ROWS * IN];
	static float y[ROWS * OUT];
	static float row[OUT];
	bool		same = true;
	bool		close = true;

	for (int i = 0; i < OUT * IN; i++)
		w[i] = (float) ((i * 7919) % 113) / 113.0f - 0.5f;
	for (int i = 0; i < ROWS * IN; i++)
		x[i] = (float) ((i * 104729) % 97) / 97.0f - 0.5f;

	/* Below the sgemm threshold each row is bitwise fm_matvec's result. */
	fm_set_sgemm(NULL);
	fm_set_sgemm_loader(counting_loader);
	fm_matmul(y, x, w, ROWS - 1, OUT, IN);
	for (int r = 0; r < ROWS - 1; r++)
	{
		fm_matvec(row, w, x + r * IN, OUT, IN);
		same = same && memcmp(row, y + r * OUT, sizeof(row)) == 0;
	}
	CHECK(same);
	CHECK(loader_calls == 0);
	CHECK(sgemm_calls == 0);

	/* At the threshold the loader runs once and its sgemm is used. */
	fm_matmul(y, x, w, ROWS, OUT, IN);
	fm_matmul(y, x, w, ROWS, OUT, IN);
	CHECK(loader_calls == 1);
	CHECK(sgemm_calls == 2);
	for (int r = 0; r < ROWS; r++)
	{
		fm_matvec(row, w, x + r * IN, OUT, IN);
		for (int o = 0; o < OUT; o++)
			close = close && fabsf(row[o] - y[r * OUT + o]) <= 1e-5f;
	}
	CHECK(close);

	/* The tests below need no sgemm, so none is set again. */
	fm_set_sgemm_loader(NULL);
	fm_set_sgemm(NULL);
}

static void
test_router_topk(void)
{
	const float logits[4] = {2, 1, 0, -1};
	const float ties[4] = {1, 1, 1, 0};
	float		probs[4];
	int32_t		experts[4];
	float		weights[4];
	int32_t		kept;

	kept = fm_route(logits, NULL, 4, 2, false, probs, experts, weights);
	CHECK(kept == 2);
	CHECK(experts[0] == 0);
	CHECK(experts[1] == 1);
	CHECK_NEAR(weights[0], 0.6439, 1e-4);
	CHECK_NEAR(weights[1], 0.2369, 1e-4);

	kept = fm_route(logits, NULL, 4, 2, true, probs, experts, weights);
	CHECK(kept == 2);
	CHECK_NEAR(weights[0], 0.7311, 1e-4);
	CHECK_NEAR(weights[1], 0.2689, 1e-4);

	/* ties go to the lowest index, on every run */
	{
		bool		stable = true;

		for (int run = 0; run < 100; run++)
		{
			kept = fm_route(ties, NULL, 4, 2, false, probs, experts, weights);
			stable = stable && kept == 2 && experts[0] == 0 && experts[1] == 1;
		}
		CHECK(stable);
	}

	/* an excluded expert: softmax over [1, 0, -1] of experts 1..3 */
	{
		const bool	allowed[4] = {false, true, true, true};

		kept = fm_route(logits, allowed, 4, 2, false, probs, experts, weights);
		CHECK(kept == 2);
		CHECK(experts[0] == 1);
		CHECK(experts[1] == 2);
		CHECK_NEAR(weights[0], 0.6652410, 1e-6);
		CHECK_NEAR(weights[1], 0.2447285, 1e-6);
	}

	/* k shrinks to the allowed count */
	{
		const bool	allowed[4] = {false, false, true, false};

		kept = fm_route(logits, allowed, 4, 2, false, probs, experts, weights);
		CHECK(kept == 1);
		CHECK(experts[0] == 2);
		CHECK_NEAR(weights[0], 1.0, 1e-7);
	}
}

static float
convert_bf16(uint16_t bits)
{
	unsigned char b[2] = {bits & 0xff, bits >> 8};
	float		f;

	fm_convert_to_f32(FM_DTYPE_BF16, b, &f, 1);
	return f;
}

static float
convert_f16(uint16_t bits)
{
	unsigned char b[2] = {bits & 0xff, bits >> 8};
	float		f;

	fm_convert_to_f32(FM_DTYPE_F16, b, &f, 1);
	return f;
}

static void
test_dtype_conversion(void)
{
	const unsigned char f32_bytes[4] = {0x00, 0x00, 0xc0, 0x3f};	/* 1.5 */
	float		f;
	fm_dtype	dtype;

	fm_convert_to_f32(FM_DTYPE_F32, f32_bytes, &f, 1);
	CHECK(f == 1.5f);

	CHECK(convert_bf16(0x3f80) == 1.0f);
	CHECK(convert_bf16(0xc000) == -2.0f);
	CHECK(convert_bf16(0x4049) == 3.140625f);
	CHECK(convert_bf16(0x0001) == 9.18354961579912e-41f);	/* 2^-133 */
	CHECK(isinf(convert_bf16(0x7f80)));
	CHECK(convert_bf16(0x7f80) > 0);
	CHECK(isinf(convert_bf16(0xff80)));
	CHECK(convert_bf16(0xff80) < 0);
	CHECK(isnan(convert_bf16(0x7fc0)));

	CHECK(convert_f16(0x3c00) == 1.0f);
	CHECK(convert_f16(0xc000) == -2.0f);
	CHECK(convert_f16(0x3555) == 0.333251953125f);
	CHECK(convert_f16(0x7bff) == 65504.0f);
	CHECK(convert_f16(0x0400) == 6.103515625e-05f);	/* smallest normal, 2^-14 */
	CHECK(convert_f16(0x0001) == 5.9604644775390625e-08f);	/* 2^-24 */
	CHECK(convert_f16(0x8001) == -5.9604644775390625e-08f);
	CHECK(convert_f16(0x03ff) == 6.097555160522461e-05f);	/* 1023 x 2^-24 */
	CHECK(convert_f16(0x0200) == 3.0517578125e-05f);	/* 2^-15 */
	CHECK(convert_f16(0x0000) == 0.0f);
	CHECK(!signbit(convert_f16(0x0000)));
	CHECK(convert_f16(0x8000) == 0.0f);
	CHECK(signbit(convert_f16(0x8000)));
	CHECK(isinf(convert_f16(0x7c00)));
	CHECK(convert_f16(0x7c00) > 0);
	CHECK(isinf(convert_f16(0xfc00)));
	CHECK(convert_f16(0xfc00) < 0);
	CHECK(isnan(convert_f16(0x7e00)));
	CHECK(isnan(convert_f16(0x7c01)));

	CHECK(fm_dtype_parse("BF16", &dtype));
	CHECK(dtype == FM_DTYPE_BF16);
	CHECK(fm_dtype_parse("F16", &dtype));
	CHECK(dtype == FM_DTYPE_F16);
	CHECK(fm_dtype_parse("F32", &dtype));
	CHECK(dtype == FM_DTYPE_F32);
	CHECK(!fm_dtype_parse("I64", &dtype));
	CHECK(fm_dtype_size(FM_DTYPE_BF16) == 2);
	CHECK(fm_dtype_size(FM_DTYPE_F32) == 4);
	CHECK(strcmp(fm_dtype_name(FM_DTYPE_F16), "F16") == 0);
}

static void
test_rng(void)
{
	fm_rng		a;
	fm_rng		b;
	bool		same = true;

	/* splitmix64's published first output for seed 0 */
	fm_rng_seed(&a, 0);
	CHECK(fm_rng_next(&a) == UINT64_C(0xe220a8397b1dcdaf));

	fm_rng_seed(&a, 42);
	fm_rng_seed(&b, 42);
	for (int i = 0; i < 100; i++)
		same = same && fm_rng_next(&a) == fm_rng_next(&b);
	CHECK(same);
}

static void
test_sampler_padded_vocab(void)
{
	/* ids 6 and 7 are padding past the tokenizer; 7 has the max logit */
	const float logits[8] = {0.5f, 2.0f, 2.0f, -1.0f, 0.0f, 1.0f, 5.0f, 9.0f};
	const bool	sampleable[8] = {true, true, true, true, true, true, false, false};
	fm_sampler_params greedy = {.temperature = 0.0, .top_p = 1.0, .repetition_penalty = 1.0};
	fm_sampler_params hot = {.temperature = 5.0, .top_p = 1.0, .repetition_penalty = 1.0};
	float		scratch_f[8];
	int32_t		scratch_i[8];
	fm_rng		rng;
	bool		only_real = true;
	bool		saw_low = false;

	fm_rng_seed(&rng, 1);
	/* greedy: the tie between 1 and 2 goes to 1 */
	CHECK(fm_sample(logits, sampleable, 8, &greedy, &rng, scratch_f, scratch_i) == 1);

	/* a subnormal temperature, whose inverse overflows, is greedy too */
	greedy.temperature = 5e-324;
	CHECK(fm_sample(logits, sampleable, 8, &greedy, &rng, scratch_f, scratch_i) == 1);
	greedy.temperature = 1e-310;
	CHECK(fm_sample(logits, sampleable, 8, &greedy, &rng, scratch_f, scratch_i) == 1);
	greedy.temperature = 0.0;

	for (int i = 0; i < 2000; i++)
	{
		int32_t		id = fm_sample(logits, sampleable, 8, &hot, &rng, scratch_f, scratch_i);

		only_real = only_real && id >= 0 && id < 6;
		saw_low = saw_low || id == 3;
	}
	CHECK(only_real);
	CHECK(saw_low);

	hot.top_k = 3;
	only_real = true;
	for (int i = 0; i < 2000; i++)
	{
		int32_t		id = fm_sample(logits, sampleable, 8, &hot, &rng, scratch_f, scratch_i);

		/* top-3 of the sampleable ids: 1, 2, 5 */
		only_real = only_real && (id == 1 || id == 2 || id == 5);
	}
	CHECK(only_real);
}

static void
test_sampler_top_p_and_frequencies(void)
{
	/* probabilities 0.5, 0.3, 0.2 at temperature 1 */
	const float logits[3] = {logf(0.5f), logf(0.3f), logf(0.2f)};
	fm_sampler_params params = {.temperature = 1.0, .top_p = 0.5, .repetition_penalty = 1.0};
	float		scratch_f[3];
	int32_t		scratch_i[3];
	int			counts[3] = {0, 0, 0};
	fm_rng		rng;

	fm_rng_seed(&rng, 7);
	for (int i = 0; i < 1000; i++)
		counts[fm_sample(logits, NULL, 3, &params, &rng, scratch_f, scratch_i)]++;
	CHECK(counts[0] == 1000);

	/* top_p 0.7 keeps ids 0 and 1 at 0.5 : 0.3 */
	memset(counts, 0, sizeof(counts));
	params.top_p = 0.7;
	for (int i = 0; i < 20000; i++)
		counts[fm_sample(logits, NULL, 3, &params, &rng, scratch_f, scratch_i)]++;
	CHECK(counts[2] == 0);
	CHECK_NEAR(counts[0] / 20000.0, 0.625, 0.02);

	/* no filtering: frequencies follow the softmax */
	memset(counts, 0, sizeof(counts));
	params.top_p = 1.0;
	for (int i = 0; i < 20000; i++)
		counts[fm_sample(logits, NULL, 3, &params, &rng, scratch_f, scratch_i)]++;
	CHECK_NEAR(counts[0] / 20000.0, 0.5, 0.02);
	CHECK_NEAR(counts[1] / 20000.0, 0.3, 0.02);
	CHECK_NEAR(counts[2] / 20000.0, 0.2, 0.02);
}

static void
test_repetition_penalty(void)
{
	float		logits[6] = {2.0f, -1.0f, 0.5f, 3.0f, 0.0f, 4.0f};
	/* 0 twice, ids outside the vocabulary, 1 in both lists */
	const int32_t ids[5] = {0, 1, 0, 7, -1};
	const int32_t more[2] = {1, 3};
	uint8_t		seen[6] = {0};
	bool		clear = true;

	fm_repetition_penalty(logits, 6, 2.0, ids, 5, more, 2, seen);
	/* each id once: positive halved, negative doubled, 0 stays 0 */
	CHECK(logits[0] == 1.0f);
	CHECK(logits[1] == -2.0f);
	CHECK(logits[2] == 0.5f);
	CHECK(logits[3] == 1.5f);
	CHECK(logits[4] == 0.0f);
	CHECK(logits[5] == 4.0f);
	for (int i = 0; i < 6; i++)
		clear = clear && seen[i] == 0;
	CHECK(clear);

	/* below 1 favours repeats: 1.0 / 0.5 = 2, -2 * 0.5 = -1 */
	fm_repetition_penalty(logits, 6, 0.5, ids, 2, NULL, 0, seen);
	CHECK(logits[0] == 2.0f);
	CHECK(logits[1] == -1.0f);
	CHECK(logits[3] == 1.5f);
}

int
main(void)
{
	test_rmsnorm_eps_from_argument();
	test_rope_rotate_half();
	test_softmax_and_silu();
	test_matvec_and_matmul();
	test_matmul_paths();
	test_router_topk();
	test_dtype_conversion();
	test_rng();
	test_sampler_padded_vocab();
	test_sampler_top_p_and_frequencies();
	test_repetition_penalty();
	return TEST_SUMMARY();
}
