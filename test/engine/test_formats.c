/*-------------------------------------------------------------------------
 *
 * test_formats.c
 *	  Unit tests of the weight formats (f32, bf16, q8) and of every kernel
 *	  set the CPU has: packing round trips, products against float64 sums,
 *	  format error bounds, fallbacks, and bitwise identity across thread
 *	  and row counts.
 *
 * The references are computed here in float64 from the dequantised
 * weights (fm_matrix_row) and from activations encoded by the rules
 * engine.h documents, re-implemented below, so a kernel that sums the
 * wrong elements or scales a block wrongly cannot agree with them.
 *
 *-------------------------------------------------------------------------
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/kernels.h"
#include "testutil.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

/* Uniform in [-scale, scale), from a fixed splitmix64 sequence. */
static float
random_uniform(float scale)
{
	uint64_t	z = (rng_state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	z ^= z >> 31;
	return (float) (((double) (z >> 11) / 9007199254740992.0) * 2.0 - 1.0) * scale;
}

static void
fill(float *v, size_t n, float scale)
{
	for (size_t i = 0; i < n; i++)
		v[i] = random_uniform(scale);
}

static void *
aligned_block(size_t bytes)
{
	void	   *p = NULL;

	if (posix_memalign(&p, 64, bytes == 0 ? 64 : bytes) != 0)
	{
		printf("out of memory\n");
		exit(1);
	}
	return p;
}

/* Nearest bfloat16 of f, ties to even, by comparing both neighbours in float64. */
static float
bf16_nearest(float f)
{
	uint32_t	u;
	float		lo;
	float		hi;
	uint32_t	lo_bits;
	uint32_t	hi_bits;
	double		dlo;
	double		dhi;

	memcpy(&u, &f, sizeof(u));
	lo_bits = u & 0xffff0000u;
	hi_bits = lo_bits + 0x10000u;
	memcpy(&lo, &lo_bits, sizeof(lo));
	memcpy(&hi, &hi_bits, sizeof(hi));
	dlo = fabs((double) f - lo);
	dhi = fabs((double) f - hi);
	if (dlo < dhi)
		return lo;
	if (dhi < dlo)
		return hi;
	return ((lo_bits >> 16) & 1u) == 0 ? lo : hi;
}

/*
 * Dequantised q8 activations: per block of 32, scale = max|x| / 127 and
 * q = round-half-even(x * (127 / max|x|)) in fp32, as engine.h states.
 */
static void
q8_activation(const float *x, int32_t cols, double *out)
{
	for (int32_t b = 0; b < cols / FM_Q8_BLOCK; b++)
	{
		float		amax = 0.0f;

		for (int32_t k = 0; k < FM_Q8_BLOCK; k++)
			if (fabsf(x[b * FM_Q8_BLOCK + k]) > amax)
				amax = fabsf(x[b * FM_Q8_BLOCK + k]);
		for (int32_t k = 0; k < FM_Q8_BLOCK; k++)
		{
			float		scaled;
			double		q;

			if (amax == 0.0f)
			{
				out[b * FM_Q8_BLOCK + k] = 0.0;
				continue;
			}
			scaled = x[b * FM_Q8_BLOCK + k] * (127.0f / amax);
			q = nearbyint((double) scaled);
			out[b * FM_Q8_BLOCK + k] = q * (double) (amax / 127.0f);
		}
	}
}

/* ---------- names, sizes, packing ---------- */

static void
test_format_names(void)
{
	fm_weight_format f = FM_WEIGHTS_Q8;

	CHECK(fm_weight_format_parse("f32", &f));
	CHECK(f == FM_WEIGHTS_F32);
	CHECK(fm_weight_format_parse("bf16", &f));
	CHECK(f == FM_WEIGHTS_BF16);
	CHECK(fm_weight_format_parse("q8", &f));
	CHECK(f == FM_WEIGHTS_Q8);
	CHECK(!fm_weight_format_parse("Q8", &f));
	CHECK(!fm_weight_format_parse("int8", &f));
	CHECK(!fm_weight_format_parse("", &f));
	CHECK(strcmp(fm_weight_format_name(FM_WEIGHTS_F32), "f32") == 0);
	CHECK(strcmp(fm_weight_format_name(FM_WEIGHTS_BF16), "bf16") == 0);
	CHECK(strcmp(fm_weight_format_name(FM_WEIGHTS_Q8), "q8") == 0);
}

static void
test_matrix_bytes(void)
{
	/* f32: 4 bytes each, rounded up to 64 */
	CHECK(fm_matrix_bytes(FM_WEIGHTS_F32, 3, 5) == 64);
	CHECK(fm_matrix_bytes(FM_WEIGHTS_F32, 16, 16) == 1024);
	/* bf16: one 64-byte vector per 16-row panel and column pair */
	CHECK(fm_matrix_bytes(FM_WEIGHTS_BF16, 16, 2) == 64);
	CHECK(fm_matrix_bytes(FM_WEIGHTS_BF16, 17, 3) == 2 * 2 * 64);
	/* q8: 544 bytes per panel and block of 32 columns, then the 4-byte unit, rounded up to 64 */
	CHECK(fm_matrix_bytes(FM_WEIGHTS_Q8, 16, 32) == 576);
	CHECK(fm_matrix_bytes(FM_WEIGHTS_Q8, 100, 64) == 7680);
	CHECK(fm_matrix_bytes(FM_WEIGHTS_Q8, 16, 4096) == 128 * 544 + 64);
	CHECK(fm_matrix_bytes(FM_WEIGHTS_Q8, 16, 33) == SIZE_MAX);
	CHECK(fm_matrix_bytes(FM_WEIGHTS_F32, 0, 4) == SIZE_MAX);
	CHECK(fm_matrix_bytes(FM_WEIGHTS_F32, (int64_t) 1 << 40, 4) == SIZE_MAX);
	CHECK(fm_matrix_format_for(FM_WEIGHTS_Q8, 64) == FM_WEIGHTS_Q8);
	CHECK(fm_matrix_format_for(FM_WEIGHTS_Q8, 16) == FM_WEIGHTS_BF16);
	CHECK(fm_matrix_format_for(FM_WEIGHTS_BF16, 7) == FM_WEIGHTS_BF16);

	{
		int64_t		shape[2] = {8, 64};

		CHECK(fm_layout_tensor_format("model.layers.0.mlp.gate.weight", 2, shape,
									  FM_WEIGHTS_Q8) == FM_WEIGHTS_F32);
		CHECK(fm_layout_tensor_format("model.norm.weight", 1, shape,
									  FM_WEIGHTS_Q8) == FM_WEIGHTS_F32);
		CHECK(fm_layout_tensor_format("model.layers.0.self_attn.q_proj.weight", 2, shape,
									  FM_WEIGHTS_Q8) == FM_WEIGHTS_Q8);
		shape[1] = 4;
		CHECK(fm_layout_tensor_format("model.layers.0.mlp.experts.1.up_proj_b.weight", 2,
									  shape, FM_WEIGHTS_Q8) == FM_WEIGHTS_BF16);
	}
}

static void
test_bf16_round_trip(void)
{
	const int32_t rows = 37;
	const int32_t cols = 45;
	float	   *w = malloc(sizeof(float) * rows * cols);
	float	   *row = malloc(sizeof(float) * cols);
	void	   *packed = aligned_block(fm_matrix_bytes(FM_WEIGHTS_BF16, rows, cols));
	fm_matrix	m;
	int			wrong = 0;

	fill(w, (size_t) rows * cols, 3.0f);
	w[0] = 1.0f + 1.0f / 256.0f;	/* a tie: rounds to even, 1.0 */
	w[1] = 1.0f + 3.0f / 256.0f;	/* a tie: rounds to even, 1 + 1/64 */
	fm_matrix_pack(FM_WEIGHTS_BF16, w, rows, cols, packed);
	m = fm_matrix_view(FM_WEIGHTS_BF16, packed, rows, cols);
	for (int32_t o = 0; o < rows; o++)
	{
		fm_matrix_row(&m, o, row);
		for (int32_t k = 0; k < cols; k++)
			if (row[k] != bf16_nearest(w[(size_t) o * cols + k]))
				wrong++;
	}
	CHECK(wrong == 0);
	fm_matrix_row(&m, 0, row);
	CHECK(row[0] == 1.0f);
	CHECK(row[1] == 1.0f + 1.0f / 64.0f);
	free(w);
	free(row);
	free(packed);
}

/* Value of IEEE binary16 bits h, decoded here independently of the engine. */
static double
fp16_value(uint16_t h)
{
	int			e = (h >> 10) & 0x1f;
	int			m = h & 0x3ff;

	if (e == 0)
		return ldexp(m, -24);
	return ldexp(1024 + m, e - 25);
}

/* Element (o, k) of a packed q8 matrix, at the place engine.h documents. */
static int8_t
q8_stored_weight(const void *packed, int32_t cols, int32_t o, int32_t k)
{
	size_t		nb = (size_t) cols / FM_Q8_BLOCK;
	size_t		blk = (size_t) (o / FM_PANEL_ROWS) * nb + k / FM_Q8_BLOCK;
	int32_t		c = k % FM_Q8_BLOCK;

	return ((const int8_t *) packed)[blk * 512 + (c / 4) * 64 + (o % FM_PANEL_ROWS) * 4 + c % 4];
}

/* fp16 bits of the scale of row o, block b, at the place engine.h documents. */
static uint16_t
q8_stored_scale(const void *packed, int32_t rows, int32_t cols, int32_t o, int32_t b)
{
	size_t		nb = (size_t) cols / FM_Q8_BLOCK;
	size_t		np = ((size_t) rows + FM_PANEL_ROWS - 1) / FM_PANEL_ROWS;
	const uint16_t *scales = (const uint16_t *) ((const char *) packed + np * nb * 512);

	return scales[((size_t) (o / FM_PANEL_ROWS) * nb + b) * FM_PANEL_ROWS + o % FM_PANEL_ROWS];
}

static float
q8_stored_unit(const void *packed, int32_t rows, int32_t cols)
{
	size_t		nb = (size_t) cols / FM_Q8_BLOCK;
	size_t		np = ((size_t) rows + FM_PANEL_ROWS - 1) / FM_PANEL_ROWS;
	float		unit;

	memcpy(&unit, (const char *) packed + np * nb * 544, sizeof(unit));
	return unit;
}

/*
 * Packs random weights of the given magnitude, with an all-zero block
 * and a block with one value 50 times the others, and checks every
 * element, scale and the unit against engine.h's rules.
 */
static void
check_q8_round_trip(float magnitude)
{
	const int32_t rows = 35;
	const int32_t cols = 96;
	float	   *w = malloc(sizeof(float) * rows * cols);
	float	   *row = malloc(sizeof(float) * cols);
	void	   *packed = aligned_block(fm_matrix_bytes(FM_WEIGHTS_Q8, rows, cols));
	fm_matrix	m;
	float		unit;
	int			unit_exponent;
	double		max_stored_scale = 0.0;
	int			over_bound = 0;
	int			dequantised_wrong = 0;
	int			extremes_not_127 = 0;
	int			scales_off = 0;
	int			blocks = 0;

	fill(w, (size_t) rows * cols, magnitude);
	memset(w + 3 * cols, 0, sizeof(float) * FM_Q8_BLOCK);
	w[4 * cols + 5] = 50.0f * magnitude;
	fm_matrix_pack(FM_WEIGHTS_Q8, w, rows, cols, packed);
	m = fm_matrix_view(FM_WEIGHTS_Q8, packed, rows, cols);
	unit = q8_stored_unit(packed, rows, cols);
	CHECK(m.scale_unit == unit);
	/* the unit is a power of two */
	CHECK(unit > 0.0f);
	CHECK(frexpf(unit, &unit_exponent) == 0.5f);

	for (int32_t o = 0; o < rows; o++)
	{
		fm_matrix_row(&m, o, row);
		for (int32_t b = 0; b < cols / FM_Q8_BLOCK; b++)
		{
			const float *wb = w + (size_t) o * cols + b * FM_Q8_BLOCK;
			double		amax = 0.0;
			double		stored = fp16_value(q8_stored_scale(packed, rows, cols, o, b));
			double		d = stored * unit;

			max_stored_scale = fmax(max_stored_scale, stored);
			for (int32_t k = 0; k < FM_Q8_BLOCK; k++)
				amax = fmax(amax, fabs(wb[k]));

			/*
			 * d is amax / 127 rounded to fp32 (2^-24 relative) and then to
			 * a normal fp16 (2^-11 relative).
			 */
			if (fabs(d - amax / 127.0) > amax / 127.0 * (ldexp(1.0, -11) + ldexp(1.0, -23)))
				scales_off++;
			blocks += amax > 0.0;
			for (int32_t k = 0; k < FM_Q8_BLOCK; k++)
			{
				double		e = fabs((double) row[b * FM_Q8_BLOCK + k] - wb[k]);
				int8_t		q = q8_stored_weight(packed, cols, o, b * FM_Q8_BLOCK + k);

				/*
				 * Half a step of d, plus the fp32 rounding of w / d before
				 * rounding to an integer and of the dequantised value: each
				 * under amax * 2^-23.
				 */
				if (e > amax / 254.0 * (1.0 + ldexp(1.0, -11)) + amax * ldexp(1.0, -21))
					over_bound++;
				/* a scale rounded down can only reach 127.07, which rounds to 127 */
				if (fabs(wb[k]) == amax && amax > 0.0 && abs(q) != 127)
					extremes_not_127++;
				/* q * d has at most 18 significant bits, so fp32 represents it exactly */
				if (row[b * FM_Q8_BLOCK + k] != (float) (q * d))
					dequantised_wrong++;
			}
		}
	}
	printf("  q8 round trip, weights of magnitude %g: unit %g, largest stored scale %g\n",
		   magnitude, unit, max_stored_scale);
	CHECK(over_bound == 0);
	CHECK(dequantised_wrong == 0);
	CHECK(scales_off == 0);
	CHECK(extremes_not_127 == 0);
	CHECK(blocks == rows * cols / FM_Q8_BLOCK - 1);
	/* the largest scale fills fp16's top binade below 2^15 (rounding may reach it) */
	CHECK(max_stored_scale >= 16384.0);
	CHECK(max_stored_scale <= 32768.0);
	fm_matrix_row(&m, 3, row);
	CHECK(row[0] == 0.0f);
	CHECK(row[FM_Q8_BLOCK - 1] == 0.0f);
	CHECK(q8_stored_scale(packed, rows, cols, 3, 0) == 0);
	fm_matrix_row(&m, 4, row);
	CHECK_NEAR(row[5] / magnitude, 50.0, 50.0 * ldexp(1.0, -10));
	free(w);
	free(row);
	free(packed);
}

/*
 * Magnitudes inside fp16's range and far outside it on both sides: 3e9
 * gives scales above fp16's largest value 65504, 1e-12 gives scales
 * below its smallest subnormal 2^-24.
 */
static void
test_q8_round_trip(void)
{
	check_q8_round_trip(2.0f);
	check_q8_round_trip(3e9f);
	check_q8_round_trip(1e-12f);
}

/* ---------- products ---------- */

typedef struct product_case
{
	fm_weight_format format;
	int32_t		out;
	int32_t		cols;
	int32_t		rows;
} product_case;

/*
 * Checks one product against float64: tightly against the dequantised
 * weights and encoded activations, loosely against the fp32 originals.
 * Returns the product for further checks (caller frees).
 */
static float *
check_product(const product_case *pc, const char *isa)
{
	size_t		wn = (size_t) pc->out * pc->cols;
	float	   *w = malloc(sizeof(float) * wn);
	float	   *x = malloc(sizeof(float) * (size_t) pc->rows * pc->cols);
	float	   *y = malloc(sizeof(float) * (size_t) pc->rows * pc->out);
	float	   *deq = malloc(sizeof(float) * pc->cols);
	double	   *xe = malloc(sizeof(double) * pc->cols);
	void	   *packed = aligned_block(fm_matrix_bytes(pc->format, pc->out, pc->cols));
	void	   *scratch = aligned_block(fm_matmul_scratch_bytes(pc->rows, pc->cols));
	fm_matrix	m;
	int			tight_fail = 0;
	int			format_fail = 0;

	fill(w, wn, 1.0f);
	fill(x, (size_t) pc->rows * pc->cols, 2.0f);
	fm_matrix_pack(pc->format, w, pc->out, pc->cols, packed);
	m = fm_matrix_view(pc->format, packed, pc->out, pc->cols);
	fm_matmul_w(y, x, &m, pc->rows, scratch);

	for (int32_t r = 0; r < pc->rows; r++)
	{
		const float *xr = x + (size_t) r * pc->cols;

		for (int32_t k = 0; k < pc->cols; k++)
			xe[k] = pc->format == FM_WEIGHTS_BF16 ? bf16_nearest(xr[k]) : xr[k];
		if (pc->format == FM_WEIGHTS_Q8)
			q8_activation(xr, pc->cols, xe);

		for (int32_t o = 0; o < pc->out; o++)
		{
			const float *wo = w + (size_t) o * pc->cols;
			double		ref = 0.0;
			double		mag = 0.0;
			double		exact = 0.0;
			double		format_bound = 0.0;
			double		got = y[(size_t) r * pc->out + o];

			fm_matrix_row(&m, o, deq);
			for (int32_t k = 0; k < pc->cols; k++)
			{
				ref += (double) deq[k] * xe[k];
				mag += fabs((double) deq[k] * xe[k]);
				exact += (double) wo[k] * xr[k];
			}

			/*
			 * fp32 accumulation of cols terms (cols / 32 blocks for q8), in
			 * any order, so it also bounds the amx set's tile sums
			 */
			if (fabs(got - ref) > (pc->cols + 4) * ldexp(1.0, -24) * mag + 1e-30)
				tight_fail++;

			/* error of the weights and activations against the fp32 originals */
			if (pc->format == FM_WEIGHTS_BF16)
				format_bound = ldexp(1.0, -7) * mag * 1.01;
			else if (pc->format == FM_WEIGHTS_Q8)
			{
				for (int32_t b = 0; b < pc->cols / FM_Q8_BLOCK; b++)
				{
					double		wmax = 0.0;
					double		xmax = 0.0;
					double		wabs = 0.0;
					double		xabs = 0.0;

					for (int32_t k = b * FM_Q8_BLOCK; k < (b + 1) * FM_Q8_BLOCK; k++)
					{
						wmax = fmax(wmax, fabs(wo[k]));
						xmax = fmax(xmax, fabs(xr[k]));
						wabs += fabs(wo[k]);
						xabs += fabs(xr[k]);
					}
					/*
					 * Each weight is off by at most half its block's step, which
					 * the fp16 scale makes up to 2^-11 larger than max|w| / 254,
					 * and each activation by half of max|x| / 127.  The factor
					 * 1.01 covers these and the fp32 roundings of the scales.
					 */
					format_bound += (wmax / 254.0 * xabs + xmax / 254.0 * wabs +
									 wmax * xmax / (254.0 * 254.0) * FM_Q8_BLOCK) * 1.01;
				}
			}
			format_bound += (pc->cols + 4) * ldexp(1.0, -24) * mag;
			if (fabs(got - exact) > format_bound + 1e-30)
				format_fail++;
		}
	}
	if (tight_fail != 0 || format_fail != 0)
		printf("  %s %s out %d cols %d rows %d: %d over the tight bound, %d over the format bound\n",
			   isa, fm_weight_format_name(pc->format), pc->out, pc->cols, pc->rows,
			   tight_fail, format_fail);
	CHECK(tight_fail == 0);
	CHECK(format_fail == 0);

	free(w);
	free(x);
	free(deq);
	free(xe);
	free(packed);
	free(scratch);
	return y;
}

/* The kernel sets to test: every one at or below the CPU's. */
static int
available_isas(const char **names)
{
	static const char *const all[] = {"c", "avx2", "avx512bf16", "amx"};
	const char *best = fm_kernel_isa();
	int			n = 0;

	for (int i = 0; i < 4; i++)
	{
		names[n++] = all[i];
		if (strcmp(all[i], best) == 0)
			break;
	}
	return n;
}

static void
test_products_every_isa(void)
{
	const char *isas[4];
	int			n_isas = available_isas(isas);
	const char *best = fm_kernel_isa();
	static const product_case cases[] = {
		{FM_WEIGHTS_F32, 1, 7, 1}, {FM_WEIGHTS_F32, 33, 100, 3}, {FM_WEIGHTS_F32, 70, 1000, 1},
		/* rows long enough for the four-row f32 kernel, with 16-wide and masked tails */
		{FM_WEIGHTS_F32, 9, 6200, 1}, {FM_WEIGHTS_F32, 6, 11008, 3},
		{FM_WEIGHTS_BF16, 1, 2, 1}, {FM_WEIGHTS_BF16, 15, 37, 1}, {FM_WEIGHTS_BF16, 17, 64, 9},
		{FM_WEIGHTS_BF16, 100, 200, 20}, {FM_WEIGHTS_BF16, 48, 1024, 3}, {FM_WEIGHTS_BF16, 33, 1, 2},
		/* several 16-row tiles, a short last K block, a partial last panel */
		{FM_WEIGHTS_BF16, 40, 100, 37}, {FM_WEIGHTS_BF16, 50, 4096, 64}, {FM_WEIGHTS_BF16, 17, 31, 33},
		/* a K long enough for the amx kernel to split it into chunks */
		{FM_WEIGHTS_BF16, 20, 11000, 40},
		{FM_WEIGHTS_Q8, 1, 32, 1}, {FM_WEIGHTS_Q8, 15, 64, 1}, {FM_WEIGHTS_Q8, 17, 96, 9},
		{FM_WEIGHTS_Q8, 100, 256, 20}, {FM_WEIGHTS_Q8, 48, 1024, 3}, {FM_WEIGHTS_Q8, 31, 32, 64},
	};

	CHECK(n_isas >= 1);
	for (int i = 0; i < n_isas; i++)
	{
		CHECK(fm_force_isa(isas[i]));
		CHECK(strcmp(fm_kernel_isa(), isas[i]) == 0);
		for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++)
			free(check_product(&cases[c], isas[i]));
	}
	CHECK(fm_force_isa(best));
	printf("  kernel sets tested: %d, best %s\n", n_isas, best);
}

/*
 * Wide f32 rows are computed four at a time, from four parts of the
 * output range.  Each output must equal its row computed alone, bit for
 * bit, for one and for three activation rows and any remainder.
 */
static void
test_f32_row_groups_same_bits(void)
{
	const char *isas[4];
	int			n_isas = available_isas(isas);
	const char *best = fm_kernel_isa();
	const int32_t out = 13;
	const int32_t widths[2] = {4096, 6200};
	const int32_t max_rows = 3;

	for (int wi = 0; wi < 2; wi++)
	{
		int32_t		cols = widths[wi];
		float	   *w = malloc(sizeof(float) * out * cols);
		float	   *x = malloc(sizeof(float) * max_rows * cols);
		float		y[3 * 13];

		fill(w, (size_t) out * cols, 1.0f);
		fill(x, (size_t) max_rows * cols, 2.0f);
		for (int i = 0; i < n_isas; i++)
			for (int32_t rows = 1; rows <= max_rows; rows += 2)
			{
				int			mismatches = 0;

				CHECK(fm_force_isa(isas[i]));
				fm_f32_product(y, x, w, rows, out, cols);
				for (int32_t r = 0; r < rows; r++)
					for (int32_t o = 0; o < out; o++)
					{
						float		alone;

						fm_f32_product(&alone, x + (size_t) r * cols, w + (size_t) o * cols, 1, 1,
									   cols);
						if (memcmp(&alone, &y[r * out + o], sizeof(float)) != 0)
							mismatches++;
					}
				if (mismatches != 0)
					printf("  %s, %d columns, %d rows: %d of %d grouped f32 outputs differ "
						   "from the row alone\n",
						   isas[i], cols, rows, mismatches, rows * out);
				CHECK(mismatches == 0);
			}
		free(w);
		free(x);
	}
	CHECK(fm_force_isa(best));
}

static void
test_force_isa(void)
{
	const char *best = fm_kernel_isa();

	CHECK(!fm_force_isa("avx1024"));
	CHECK(!fm_force_isa(""));
	CHECK(strcmp(fm_kernel_isa(), best) == 0);
	CHECK(fm_force_isa("c"));
	CHECK(strcmp(fm_kernel_isa(), "c") == 0);
	/* lowering is undone by naming the best set again */
	CHECK(fm_force_isa(best));
	CHECK(strcmp(fm_kernel_isa(), best) == 0);
	/* a set above the CPU's is rejected */
	if (strcmp(best, "amx") != 0)
		CHECK(!fm_force_isa("amx"));
	if (strcmp(best, "amx") != 0 && strcmp(best, "avx512bf16") != 0)
		CHECK(!fm_force_isa("avx512bf16"));
}

/*
 * Every format and kernel set: results are bitwise the same for 1 to 4
 * threads, and each row of a multi-row product is bitwise the product of
 * that row alone.
 */
static void
test_same_bits_threads_and_rows(void)
{
	const char *isas[4];
	int			n_isas = available_isas(isas);
	const char *best = fm_kernel_isa();
	const int32_t out = 1000;
	const int32_t cols = 512;
	const int32_t rows = 11;
	float	   *w = malloc(sizeof(float) * out * cols);
	float	   *x = malloc(sizeof(float) * rows * cols);
	float	   *y1 = malloc(sizeof(float) * rows * out);
	float	   *yn = malloc(sizeof(float) * rows * out);
	void	   *scratch = aligned_block(fm_matmul_scratch_bytes(rows, cols));

	fill(w, (size_t) out * cols, 1.0f);
	fill(x, (size_t) rows * cols, 1.0f);
	for (int i = 0; i < n_isas; i++)
	{
		CHECK(fm_force_isa(isas[i]));
		for (int f = FM_WEIGHTS_BF16; f <= FM_WEIGHTS_Q8; f++)
		{
			void	   *packed = aligned_block(fm_matrix_bytes(f, out, cols));
			fm_matrix	m;
			int			rows_differ = 0;

			fm_matrix_pack(f, w, out, cols, packed);
			m = fm_matrix_view(f, packed, out, cols);
			CHECK(fm_set_threads(1, NULL) == FM_OK);
			fm_matmul_w(y1, x, &m, rows, scratch);
			for (int32_t t = 2; t <= 4; t++)
			{
				CHECK(fm_set_threads(t, NULL) == FM_OK);
				memset(yn, 0, sizeof(float) * rows * out);
				fm_matmul_w(yn, x, &m, rows, scratch);
				CHECK(memcmp(y1, yn, sizeof(float) * rows * out) == 0);
			}
			for (int32_t r = 0; r < rows; r++)
			{
				fm_matmul_w(yn, x + (size_t) r * cols, &m, 1, scratch);
				if (memcmp(yn, y1 + (size_t) r * out, sizeof(float) * out) != 0)
					rows_differ++;
			}
			CHECK(rows_differ == 0);
			free(packed);
		}
	}
	CHECK(fm_set_threads(1, NULL) == FM_OK);
	CHECK(fm_force_isa(best));
	free(w);
	free(x);
	free(y1);
	free(yn);
	free(scratch);
}

/*
 * Every kernel set: each row of an n-row product is bitwise the product
 * of that row alone, with 1 and 3 threads, for n from 1 to 40 (for the
 * long case, n at the edges of 16-row tiles).  The shapes give a short
 * last K block (bf16: 69 columns are 35 pairs, 2 blocks of 16 and 3), a
 * partial last panel (1000 rows) and row counts that fill 16-row tiles
 * partly.  The long case (16390 columns) makes the amx kernel split K
 * into chunks for some row counts and not for others.  The scratch is
 * filled with NaN bytes before every product, so a kernel that reads
 * encoded activations past a row's columns gives non-finite outputs.
 */
static void
test_same_bits_every_row_count(void)
{
	static const struct
	{
		fm_weight_format format;
		int32_t		out;
		int32_t		cols;
		bool		sparse;			/* only n = 1, 2, 16, 17, 33 and 40 */
	}			cases[] = {
		{FM_WEIGHTS_BF16, 1000, 69, false}, {FM_WEIGHTS_Q8, 1000, 96, false},
		{FM_WEIGHTS_BF16, 40, 16390, true},
	};
	const char *isas[4];
	int			n_isas = available_isas(isas);
	const char *best = fm_kernel_isa();
	const int32_t max_rows = 40;

	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++)
	{
		fm_weight_format f = cases[c].format;
		int32_t		out = cases[c].out;
		int32_t		cols = cases[c].cols;
		float	   *w = malloc(sizeof(float) * out * cols);
		float	   *x = malloc(sizeof(float) * max_rows * cols);
		float	   *single = malloc(sizeof(float) * max_rows * out);
		float	   *y = malloc(sizeof(float) * max_rows * out);
		size_t		scratch_bytes = fm_matmul_scratch_bytes(max_rows, cols);
		void	   *scratch = aligned_block(scratch_bytes);
		void	   *packed = aligned_block(fm_matrix_bytes(f, out, cols));
		fm_matrix	m;

		fill(w, (size_t) out * cols, 1.0f);
		fill(x, (size_t) max_rows * cols, 1.0f);
		fm_matrix_pack(f, w, out, cols, packed);
		m = fm_matrix_view(f, packed, out, cols);
		for (int i = 0; i < n_isas; i++)
		{
			int			rows_differ = 0;
			int			not_finite = 0;

			CHECK(fm_force_isa(isas[i]));
			CHECK(fm_set_threads(1, NULL) == FM_OK);
			for (int32_t r = 0; r < max_rows; r++)
			{
				memset(scratch, 0xff, scratch_bytes);
				fm_matmul_w(single + (size_t) r * out, x + (size_t) r * cols, &m, 1, scratch);
			}
			for (size_t k = 0; k < (size_t) max_rows * out; k++)
				if (!isfinite(single[k]))
					not_finite++;
			for (int32_t threads = 1; threads <= 3; threads += 2)
			{
				CHECK(fm_set_threads(threads, NULL) == FM_OK);
				for (int32_t n = 1; n <= max_rows; n++)
				{
					if (cases[c].sparse && n != 1 && n != 2 && n != 16 && n != 17 && n != 33 &&
						n != max_rows)
						continue;
					memset(scratch, 0xff, scratch_bytes);
					fm_matmul_w(y, x, &m, n, scratch);
					for (int32_t r = 0; r < n; r++)
						if (memcmp(y + (size_t) r * out, single + (size_t) r * out,
								   sizeof(float) * out) != 0)
							rows_differ++;
				}
			}
			if (rows_differ != 0 || not_finite != 0)
				printf("  %s %s cols %d: %d rows differ from the row alone, %d outputs not finite\n",
					   isas[i], fm_weight_format_name(f), cols, rows_differ, not_finite);
			CHECK(rows_differ == 0);
			CHECK(not_finite == 0);
		}
		free(w);
		free(x);
		free(single);
		free(y);
		free(scratch);
		free(packed);
	}
	CHECK(fm_set_threads(1, NULL) == FM_OK);
	CHECK(fm_force_isa(best));
}

/* ---------- kernel set when Linux rejects AMX ---------- */

/* The argument that makes this program run run_rejected_amx_child. */
#define REJECTED_AMX_CHILD "--rejected-amx-child"

/*
 * Runs in a child process of test_amx_rejected_falls_back.  It installs
 * an 8 KiB sigaltstack, too small for a signal frame with the 8 KiB of
 * AMX tile data, so Linux rejects the tile permission that the first
 * product requests.  Prints the kernel set chosen, then checks a bf16
 * product.  Returns 3 if the system rejects the sigaltstack itself.
 */
static int
run_rejected_amx_child(void)
{
	static const product_case pc = {FM_WEIGHTS_BF16, 40, 100, 37};
	stack_t		ss;

	ss.ss_sp = malloc(8192);
	ss.ss_size = 8192;
	ss.ss_flags = 0;
	if (sigaltstack(&ss, NULL) != 0)
		return 3;
	printf("kernel set: %s\n", fm_kernel_isa());
	free(check_product(&pc, fm_kernel_isa()));
	return TEST_SUMMARY();
}

/*
 * When Linux rejects the AMX permission, the engine picks a set without
 * AMX (avx512bf16 on a CPU that has AMX) and its products stay correct.
 * The kernel set is chosen once per process, so the check runs in a new
 * one.  The child's set is not compared with this process's: under
 * valgrind this process detects an emulated CPU while the child runs on the
 * real one.
 */
static void
test_amx_rejected_falls_back(void)
{
	char		self[4096];
	char		command[4200];
	char		line[256];
	char		isa[64] = "";
	ssize_t		len = readlink("/proc/self/exe", self, sizeof(self) - 1);
	FILE	   *child;
	int			status;

	CHECK(len > 0);
	if (len <= 0)
		return;
	self[len] = '\0';
	snprintf(command, sizeof(command), "'%s' %s", self, REJECTED_AMX_CHILD);
	child = popen(command, "r");
	CHECK(child != NULL);
	if (child == NULL)
		return;
	while (fgets(line, sizeof(line), child) != NULL)
	{
		if (strncmp(line, "FAIL", 4) == 0)
			printf("  child: %s", line);
		sscanf(line, "kernel set: %63s", isa);
	}
	status = pclose(child);
	if (WIFEXITED(status) && WEXITSTATUS(status) == 3)
	{
		printf("  an 8 KiB sigaltstack was rejected: AMX fallback not tested\n");
		return;
	}
	CHECK(WIFEXITED(status));
	CHECK(WEXITSTATUS(status) == 0);
	CHECK(isa[0] != '\0');
	CHECK(strcmp(isa, "amx") != 0);
	printf("  kernel set with AMX rejected: %s\n", isa);
}

/*
 * A q8 activation block whose largest value is below 127 / FLT_MAX, where
 * the float factor 127 / max|x| is infinite, keeps its values' signs and
 * sizes.  Checked in every kernel set, for one row and for several.
 */
static void
test_q8_tiny_activation_block(void)
{
	const char *isas[4];
	int			n_isas = available_isas(isas);
	const char *best = fm_kernel_isa();
	const int32_t out = 16;
	const int32_t cols = 64;
	const int32_t rows = 9;
	float	   *w = malloc(sizeof(float) * out * cols);
	float	   *x = calloc((size_t) rows * cols, sizeof(float));
	float	   *y = malloc(sizeof(float) * rows * out);
	void	   *packed = aligned_block(fm_matrix_bytes(FM_WEIGHTS_Q8, out, cols));
	void	   *scratch = aligned_block(fm_matmul_scratch_bytes(rows, cols));
	fm_matrix	m;

	for (size_t i = 0; i < (size_t) out * cols; i++)
		w[i] = 1.0f;
	fm_matrix_pack(FM_WEIGHTS_Q8, w, out, cols, packed);
	m = fm_matrix_view(FM_WEIGHTS_Q8, packed, out, cols);
	/* block 0: one tiny positive value among zeros; block 1: tiny of both signs */
	for (int32_t r = 0; r < rows; r++)
	{
		x[(size_t) r * cols + 3] = 2e-37f;
		x[(size_t) r * cols + 40] = 1e-37f;
		x[(size_t) r * cols + 41] = -3e-37f;
	}
	for (int i = 0; i < n_isas; i++)
	{
		CHECK(fm_force_isa(isas[i]));
		for (int32_t n = 1; n <= rows; n += rows - 1)
		{
			int			wrong = 0;

			fm_matmul_w(y, x, &m, n, scratch);
			/* expected 2e-37 + 1e-37 - 3e-37 = 0, within the blocks' rounding */
			for (size_t k = 0; k < (size_t) n * out; k++)
				if (!(fabsf(y[k]) <= 2e-39f))
					wrong++;
			if (wrong != 0)
				printf("  %s, %d rows: %d outputs of tiny blocks wrong, first %g\n",
					   isas[i], n, wrong, y[0]);
			CHECK(wrong == 0);
		}
		/* the positive block alone */
		for (int32_t r = 0; r < rows; r++)
			x[(size_t) r * cols + 40] = x[(size_t) r * cols + 41] = 0.0f;
		fm_matmul_w(y, x, &m, 1, scratch);
		CHECK(fabsf(y[0] - 2e-37f) <= 2e-39f);
		for (int32_t r = 0; r < rows; r++)
		{
			x[(size_t) r * cols + 40] = 1e-37f;
			x[(size_t) r * cols + 41] = -3e-37f;
		}
	}
	CHECK(fm_force_isa(best));
	free(w);
	free(x);
	free(y);
	free(packed);
	free(scratch);
}

/*
 * Every kernel set: q8 weights times 2^40 or 2^-40 store the same q and
 * fp16 scales with another unit, so the products are the unscaled ones
 * times the same power of two, bitwise.  Without the unit such weights
 * would overflow fp16 scales or round them to zero.
 */
static void
test_q8_power_of_two_weights(void)
{
	const char *isas[4];
	int			n_isas = available_isas(isas);
	const char *best = fm_kernel_isa();
	const int32_t out = 40;
	const int32_t cols = 256;
	const int32_t rows = 9;
	const int	shifts[] = {40, -40};
	float	   *w = malloc(sizeof(float) * out * cols);
	float	   *ws = malloc(sizeof(float) * out * cols);
	float	   *x = malloc(sizeof(float) * rows * cols);
	float	   *y = malloc(sizeof(float) * rows * out);
	float	   *ys = malloc(sizeof(float) * rows * out);
	void	   *packed = aligned_block(fm_matrix_bytes(FM_WEIGHTS_Q8, out, cols));
	void	   *packed_s = aligned_block(fm_matrix_bytes(FM_WEIGHTS_Q8, out, cols));
	void	   *scratch = aligned_block(fm_matmul_scratch_bytes(rows, cols));
	fm_matrix	m;
	fm_matrix	ms;

	fill(w, (size_t) out * cols, 1.0f);
	fill(x, (size_t) rows * cols, 1.0f);
	fm_matrix_pack(FM_WEIGHTS_Q8, w, out, cols, packed);
	m = fm_matrix_view(FM_WEIGHTS_Q8, packed, out, cols);
	for (size_t s = 0; s < sizeof(shifts) / sizeof(shifts[0]); s++)
	{
		for (size_t i = 0; i < (size_t) out * cols; i++)
			ws[i] = ldexpf(w[i], shifts[s]);
		fm_matrix_pack(FM_WEIGHTS_Q8, ws, out, cols, packed_s);
		ms = fm_matrix_view(FM_WEIGHTS_Q8, packed_s, out, cols);
		CHECK(memcmp(packed, packed_s, (size_t) ((out + 15) / 16) * (cols / 32) * 544) == 0);
		CHECK(ms.scale_unit == ldexpf(m.scale_unit, shifts[s]));
		for (int i = 0; i < n_isas; i++)
		{
			int			differ = 0;

			CHECK(fm_force_isa(isas[i]));
			/* one row (decode) and several (the prompt kernels) */
			for (int32_t n = 1; n <= rows; n += rows - 1)
			{
				fm_matmul_w(y, x, &m, n, scratch);
				fm_matmul_w(ys, x, &ms, n, scratch);
				for (size_t k = 0; k < (size_t) n * out; k++)
					if (ys[k] != ldexpf(y[k], shifts[s]))
						differ++;
			}
			if (differ != 0)
				printf("  %s q8 weights times 2^%d: %d outputs differ\n", isas[i], shifts[s],
					   differ);
			CHECK(differ == 0);
		}
	}
	CHECK(fm_force_isa(best));
	free(w);
	free(ws);
	free(x);
	free(y);
	free(ys);
	free(packed);
	free(packed_s);
	free(scratch);
}

/* ---------- a converted model ---------- */

typedef struct tensor_store
{
	int32_t		n;
	fm_tensor_spec *specs;
	float	  **data;
} tensor_store;

static const float *
store_lookup(void *arg, const char *name, int32_t *ndim, int64_t *shape)
{
	tensor_store *s = arg;

	for (int32_t i = 0; i < s->n; i++)
		if (strcmp(s->specs[i].name, name) == 0)
		{
			*ndim = s->specs[i].ndim;
			memcpy(shape, s->specs[i].shape, sizeof(s->specs[i].shape));
			return s->data[i];
		}
	return NULL;
}

static fm_config
model_config(void)
{
	fm_config	c;

	memset(&c, 0, sizeof(c));
	strcpy(c.model_type, "flexmore");
	c.vocab_size = 300;
	c.hidden_size = 64;
	c.intermediate_size = 96;
	c.num_hidden_layers = 2;
	c.num_attention_heads = 4;
	c.num_key_value_heads = 2;
	c.head_dim = 16;
	c.max_position_embeddings = 64;
	c.num_experts = 4;
	c.num_experts_per_tok = 2;
	c.rms_norm_eps = 1e-6;
	c.rope_theta = 10000.0;
	c.expert_ranks[1] = 4;
	c.expert_ranks[3] = 32;
	c.pad_token_id = -1;
	c.bos_token_id = -1;
	return c;
}

/* Runs ids through a new session of m and returns the last logits. */
static bool
run_logits(const fm_model *m, const int32_t *ids, int32_t n, float *logits)
{
	fm_session *s;
	fm_error	err;
	bool		ok;

	if (fm_session_create(m, &fm_malloc_allocator, 64, &s, &err) != FM_OK)
	{
		printf("fm_session_create: %s\n", err.message);
		return false;
	}
	ok = fm_forward(s, ids, n, logits, NULL, NULL, &err) == FM_OK;
	if (!ok)
		printf("fm_forward: %s\n", err.message);
	fm_session_destroy(s);
	return ok;
}

static void
test_converted_model(void)
{
	fm_config	c = model_config();
	tensor_store st;
	fm_model	f32;
	fm_layer_weights layers[2];
	fm_error	err;
	int32_t		ids[20];
	float		ref[300];
	float		got[300];
	float		again[300];
	double		max_ref = 0.0;

	CHECK(fm_layout_expected(&c, &fm_malloc_allocator, &st.specs, &st.n, &err) == FM_OK);
	st.data = malloc(sizeof(float *) * st.n);
	for (int32_t i = 0; i < st.n; i++)
	{
		size_t		count = (size_t) st.specs[i].shape[0] *
			(st.specs[i].ndim == 2 ? (size_t) st.specs[i].shape[1] : 1);

		st.data[i] = malloc(sizeof(float) * count);
		fill(st.data[i], count, st.specs[i].ndim == 1 ? 0.2f : 0.3f);
		if (st.specs[i].ndim == 1)
			for (size_t k = 0; k < count; k++)
				st.data[i][k] += 1.0f;
	}
	memset(&f32, 0, sizeof(f32));
	f32.config = c;
	CHECK(fm_layout_bind(&f32, layers, store_lookup, &st, &err) == FM_OK);
	for (int32_t i = 0; i < 20; i++)
		ids[i] = (i * 37 + 5) % c.vocab_size;
	CHECK(run_logits(&f32, ids, 20, ref));
	for (int32_t v = 0; v < c.vocab_size; v++)
		max_ref = fmax(max_ref, fabs(ref[v]));

	for (int f = FM_WEIGHTS_BF16; f <= FM_WEIGHTS_Q8; f++)
	{
		fm_model	conv;
		fm_layer_weights conv_layers[2];
		void	   *storage;
		double		max_diff = 0.0;

		CHECK(fm_model_convert(&f32, f, &fm_malloc_allocator, &conv, conv_layers, &storage,
							   &err) == FM_OK);
		CHECK(conv.weights.embed_tokens.format == (fm_weight_format) f);
		CHECK(conv_layers[0].router == layers[0].router);
		/* rank 4 adapters cannot be q8 (4 columns): they fall back to bf16 */
		CHECK(conv_layers[1].experts[1].gate_b.format == FM_WEIGHTS_BF16);
		CHECK(conv_layers[1].experts[3].gate_b.format == (fm_weight_format) f);
		CHECK(fm_model_weight_bytes(&conv) < fm_model_weight_bytes(&f32));
		CHECK(fm_model_validate(&conv, &err) == FM_OK);

		CHECK(run_logits(&conv, ids, 20, got));
		for (int32_t v = 0; v < c.vocab_size; v++)
			max_diff = fmax(max_diff, fabs((double) got[v] - ref[v]));
		printf("  %s model: max |logit - f32 logit| %.4g of max |logit| %.4g\n",
			   fm_weight_format_name(f), max_diff, max_ref);
		/* estimates of the format error through two layers, not derived bounds */
		CHECK(max_diff <= (f == FM_WEIGHTS_BF16 ? 0.03 : 0.08) * max_ref);

		/*
		 * Scoring with this lm_head: the last row's log-probability of
		 * every id equals the log-softmax of fm_forward's logits, because
		 * a row's product does not depend on how many rows share it.
		 */
		{
			fm_session *s;
			float	   *hidden = malloc(sizeof(float) * 20 * c.hidden_size);
			float	   *scratch = malloc(sizeof(float) * FM_LOGPROB_ROWS * c.vocab_size);
			int32_t    *targets = malloc(sizeof(int32_t) * 20 * c.vocab_size);
			double	   *logprobs = malloc(sizeof(double) * 20 * c.vocab_size);
			double		max_logit = -INFINITY;
			double		sum = 0.0;
			double		worst = 0.0;

			CHECK(fm_session_create(&conv, &fm_malloc_allocator, 64, &s, &err) == FM_OK);
			CHECK(fm_forward_hidden(s, ids, 20, hidden, NULL, NULL, &err) == FM_OK);
			for (int32_t r = 0; r < 20; r++)
				for (int32_t v = 0; v < c.vocab_size; v++)
					targets[r * c.vocab_size + v] = v;
			CHECK(fm_token_logprobs(&conv, NULL, hidden, 20, targets, c.vocab_size, logprobs,
									scratch, &err) == FM_OK);
			for (int32_t v = 0; v < c.vocab_size; v++)
				max_logit = fmax(max_logit, got[v]);
			for (int32_t v = 0; v < c.vocab_size; v++)
				sum += exp(got[v] - max_logit);
			for (int32_t v = 0; v < c.vocab_size; v++)
				worst = fmax(worst, fabs(logprobs[19 * c.vocab_size + v] -
										 (got[v] - max_logit - log(sum))));
			/* fm_token_logprobs sums expf in double: about 1e-7 relative per term */
			CHECK(worst < 1e-5);
			fm_session_destroy(s);
			free(hidden);
			free(scratch);
			free(targets);
			free(logprobs);
		}

		/* a whole forward pass is bitwise the same with 3 threads */
		CHECK(fm_set_threads(3, NULL) == FM_OK);
		CHECK(run_logits(&conv, ids, 20, again));
		CHECK(memcmp(got, again, sizeof(got)) == 0);
		CHECK(fm_set_threads(1, NULL) == FM_OK);
		free(storage);
	}

	/* q8 needs whole blocks: a q8 matrix of 33 columns is rejected */
	{
		fm_model	bad = f32;
		fm_layer_weights bad_layers[2];
		static float w[96 * 64];

		memcpy(bad_layers, layers, sizeof(layers));
		bad.weights.layers = bad_layers;
		bad_layers[0].q_proj = fm_matrix_view(FM_WEIGHTS_Q8, w, 64, 33);
		CHECK(fm_model_validate(&bad, &err) == FM_EINVAL);
		CHECK(strstr(err.message, "q_proj") != NULL);
	}

	for (int32_t i = 0; i < st.n; i++)
		free(st.data[i]);
	free(st.data);
	free(st.specs);
}

int
main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], REJECTED_AMX_CHILD) == 0)
		return run_rejected_amx_child();
	printf("kernel set: %s\n", fm_kernel_isa());
	test_format_names();
	test_matrix_bytes();
	test_bf16_round_trip();
	test_q8_round_trip();
	test_force_isa();
	test_products_every_isa();
	test_same_bits_threads_and_rows();
	test_f32_row_groups_same_bits();
	test_same_bits_every_row_count();
	test_amx_rejected_falls_back();
	test_q8_power_of_two_weights();
	test_q8_tiny_activation_block();
	test_converted_model();
	return TEST_SUMMARY();
}
