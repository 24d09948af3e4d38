/*-------------------------------------------------------------------------
 *
 * kernels_x86.c
 *	  AVX2 and AVX-512 product kernels for f32, bf16 and q8 weights.
 *
 * Every function here carries a target attribute, so the file builds
 * without -mavx flags; formats.c calls a set only after checking the
 * CPU.  The layouts are those of fm_weight_format (engine.h) and the
 * activation encoding is that of fm_mm_job (kernels.h).
 *
 * Order of sums.  Each output is accumulated in one order that depends
 * only on the kernel set, never on the range, the row count or the row
 * tile it lands in.  A vector lane contains one output row, and the row
 * tiles and panel groups below only decide which outputs are computed
 * side by side.  So a prompt chunk gives each row bitwise what decoding
 * that row alone gives, and any thread count gives the same bits.
 *
 * bf16 (AVX-512): one VDPBF16PS per panel and column pair adds 16 rows'
 * products of two columns.  The weights of three panels are read once
 * for up to 8 activation rows, whose column pairs are broadcast.
 *
 * q8 (AVX-512): VPDPBUSD multiplies unsigned bytes by signed bytes.  The
 * weights become unsigned as w + 128 (one XOR of the top bit per weight
 * vector, shared by every activation row of a tile), and each row's four
 * activation bytes are broadcast by the VPDPBUSD itself from memory.
 * That adds 128 times the block's activation sum to each row's integer
 * sum, which the activation encoding stores (kernels.h) and the kernels
 * subtract once per block, so the integer sum of each block is exact.
 *
 * q8 (AVX2): VPMADDUBSW on |x| and (w sign x) cannot overflow, because
 * |q| <= 127 makes each pair at most 2 * 127 * 127 = 32258.
 *
 *-------------------------------------------------------------------------
 */
#if defined(__x86_64__)

#include <cpuid.h>
#include <immintrin.h>
#include <string.h>

#include "engine/engine.h"
#include "engine/kernels.h"

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX512_TARGET \
	__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx2,fma")))
#define INLINE inline __attribute__((always_inline))

/*
 * Bytes ahead of the weights in use that the q8 kernels which read the
 * weights from memory (AVX-512 decoding and the first row tile of
 * larger products, every AVX2 product) prefetch into L2, one line per
 * 64 bytes.  A decoded token streams every
 * weight once, and the right distance depends on the CPU's own
 * prefetchers.  On a 2-vCPU Xeon (AVX-512, AMX) under load, a loop of
 * one-row products over 1 GB of matrices read about 77% as fast as a
 * plain read with the hardware prefetchers alone.  Distances of 4 to 16 KB
 * gave 88 to 92%.  On a 2-vCPU Zen 4 EPYC, one-thread q8 decode
 * of the bench model ran at about 20 tok/s with 8 KB, 26 with none and
 * 27 to 28 with 2 KB (medians of three interleaved runs).  4 KB and more
 * was slower than no prefetch, so AMD CPUs take 2 KB.  NOTE: the AMD
 * distance was measured with the AVX-512 kernel only; the AVX2 kernel
 * takes it untested.  Prefetching past the end of a matrix cannot fault.
 */
static int32_t q8_prefetch_bytes = 8192;

void
fm_x86_tune(void)
{
	unsigned int eax,
				ebx,
				ecx,
				edx;

	/* vendor string "AuthenticAMD" in ebx, edx, ecx */
	if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) &&
		ebx == 0x68747541u && edx == 0x69746e65u && ecx == 0x444d4163u)
		q8_prefetch_bytes = 2048;
}

/* nr is a constant at every call, so full unrolling keeps arrays in registers */
#define FULL_UNROLL _Pragma("GCC unroll 8")

/* Stores n <= 8 floats of v to dst. */
AVX2_TARGET static INLINE void
store_partial_avx2(float *dst, __m256 v, int32_t n)
{
	float		tmp[8];

	if (n >= 8)
	{
		_mm256_storeu_ps(dst, v);
		return;
	}
	_mm256_storeu_ps(tmp, v);
	memcpy(dst, tmp, sizeof(float) * n);
}

/* ---------- AVX2 ---------- */

AVX2_TARGET static float
dot_f32_avx2(const float *a, const float *b, int32_t n)
{
	__m256		acc0 = _mm256_setzero_ps();
	__m256		acc1 = _mm256_setzero_ps();
	__m256		acc2 = _mm256_setzero_ps();
	__m256		acc3 = _mm256_setzero_ps();
	__m128		lo;
	float		sum;
	int32_t		i = 0;

	for (; i + 32 <= n; i += 32)
	{
		acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
		acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
		acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
		acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
	}
	for (; i + 8 <= n; i += 8)
		acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
	acc0 = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
	lo = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
	lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
	lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
	sum = _mm_cvtss_f32(lo);
	for (; i < n; i++)
		sum += a[i] * b[i];
	return sum;
}

AVX2_TARGET void
fm_f32_rows_avx2(const fm_mm_job *job, int32_t begin, int32_t end)
{
	int32_t		in = job->w->cols;

	for (int32_t o = begin; o < end; o++)
	{
		const float *row = (const float *) job->w->data + (size_t) o * in;

		for (int32_t r = 0; r < job->rows; r++)
			job->y[(size_t) r * job->ldy + o] = dot_f32_avx2(row, job->x + (size_t) r * in, in);
	}
}

AVX2_TARGET void
fm_bf16_panels_avx2(const fm_mm_job *job, int32_t begin, int32_t end)
{
	const fm_matrix *w = job->w;
	size_t		kp = ((size_t) w->cols + 1) / 2;
	__m256i		zero = _mm256_setzero_si256();

	for (int32_t p = begin; p < end; p++)
	{
		const uint16_t *panel = (const uint16_t *) w->data + (size_t) p * kp * 32;
		int32_t		o0 = p * FM_PANEL_ROWS;
		int32_t		valid = w->rows - o0;

		for (int32_t r = 0; r < job->rows; r++)
		{
			const uint32_t *xr = (const uint32_t *) (job->xq + (size_t) r * job->xq_stride);
			__m256		a0 = _mm256_setzero_ps();
			__m256		a1 = _mm256_setzero_ps();
			__m256		a2 = _mm256_setzero_ps();
			__m256		a3 = _mm256_setzero_ps();
			float	   *y = job->y + (size_t) r * job->ldy + o0;

			for (size_t kk = 0; kk < kp; kk++)
			{
				__m256i		v0 = _mm256_loadu_si256((const __m256i *) (panel + kk * 32));
				__m256i		v1 = _mm256_loadu_si256((const __m256i *) (panel + kk * 32 + 16));
				/* [x_even, x_odd] in every 64-bit lane, as fp32 */
				__m256		xv = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero,
																		   _mm256_set1_epi32((int) xr[kk])));

				/* lanes: rows 0,1 | 4,5 (lo) and 2,3 | 6,7 (hi), both columns each */
				a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v0)), xv, a0);
				a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v0)), xv, a1);
				a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v1)), xv, a2);
				a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v1)), xv, a3);
			}
			/* adding each row's two column lanes leaves rows 0..7 and 8..15 in order */
			store_partial_avx2(y, _mm256_hadd_ps(a0, a1), valid);
			if (valid > 8)
				store_partial_avx2(y + 8, _mm256_hadd_ps(a2, a3), valid - 8);
		}
	}
}

/* Widens 8 fp16 values to fp32 (exact). */
AVX2_TARGET static INLINE __m256
widen_fp16x8(const uint16_t *h)
{
	return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) h));
}

AVX2_TARGET void
fm_q8_panels_avx2(const fm_mm_job *job, int32_t begin, int32_t end)
{
	const fm_matrix *w = job->w;
	int32_t		nb = w->cols / FM_Q8_BLOCK;
	__m256i		ones = _mm256_set1_epi16(1);
	__m256		unit = _mm256_set1_ps(w->scale_unit);

	for (int32_t p = begin; p < end; p++)
	{
		int32_t		o0 = p * FM_PANEL_ROWS;
		int32_t		valid = w->rows - o0;

		for (int32_t r = 0; r < job->rows; r++)
		{
			const uint8_t *xrow = job->xq + (size_t) r * job->xq_stride;
			const int32_t *x4 = (const int32_t *) xrow;
			const float *xs = (const float *) (xrow + w->cols);
			__m256		f0 = _mm256_setzero_ps();
			__m256		f1 = _mm256_setzero_ps();
			float	   *y = job->y + (size_t) r * job->ldy + o0;

			for (int32_t b = 0; b < nb; b++)
			{
				size_t		blk = (size_t) p * nb + b;
				const uint8_t *qb = (const uint8_t *) w->data + blk * 512;
				__m256i		i0 = _mm256_setzero_si256();
				__m256i		i1 = _mm256_setzero_si256();
				__m256		xscale = _mm256_set1_ps(xs[b]);

				for (int32_t g = 0; g < 8; g++)
					_mm_prefetch((const char *) qb + q8_prefetch_bytes + g * 64, _MM_HINT_T1);
				for (int32_t g = 0; g < 8; g++)
				{
					__m256i		xb = _mm256_set1_epi32(x4[b * 8 + g]);
					__m256i		ax = _mm256_abs_epi8(xb);
					__m256i		w0 = _mm256_loadu_si256((const __m256i *) (qb + g * 64));
					__m256i		w1 = _mm256_loadu_si256((const __m256i *) (qb + g * 64 + 32));

					i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(
															   _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xb)), ones));
					i1 = _mm256_add_epi32(i1, _mm256_madd_epi16(
															   _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xb)), ones));
				}
				f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0),
									 _mm256_mul_ps(widen_fp16x8(w->scales + blk * 16), xscale), f0);
				f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1),
									 _mm256_mul_ps(widen_fp16x8(w->scales + blk * 16 + 8), xscale), f1);
			}
			f0 = _mm256_mul_ps(f0, unit);
			f1 = _mm256_mul_ps(f1, unit);
			store_partial_avx2(y, f0, valid);
			if (valid > 8)
				store_partial_avx2(y + 8, f1, valid - 8);
		}
	}
}

/* ---------- AVX-512 ---------- */

AVX512_TARGET static float
dot_f32_avx512(const float *a, const float *b, int32_t n)
{
	__m512		acc0 = _mm512_setzero_ps();
	__m512		acc1 = _mm512_setzero_ps();
	__m512		acc2 = _mm512_setzero_ps();
	__m512		acc3 = _mm512_setzero_ps();
	int32_t		i = 0;

	for (; i + 64 <= n; i += 64)
	{
		acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
		acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
		acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), acc2);
		acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), acc3);
	}
	for (; i + 16 <= n; i += 16)
		acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
	if (i < n)
	{
		__mmask16	m = (__mmask16) ((1u << (n - i)) - 1);

		acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc1);
	}
	acc0 = _mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3));
	return _mm512_reduce_add_ps(acc0);
}

/*
 * Rows at least this long go through dot4_f32_avx512, four at a time.
 * NOTE: the limit is one measured case, not a tuned value.  On Zen 4 the
 * bench model's 4096-column rows decoded faster in groups, while the demo
 * model's 192-column rows, grouped as adjacent rows in an earlier layout,
 * ran about half as fast.
 */
#define F32_GROUP_MIN_COLS 4096

/*
 * dot_f32_avx512 of four weight rows with one x, each row summed in
 * exactly dot_f32_avx512's order, so y does not depend on how rows are
 * grouped.  Each x vector is loaded once for the four rows, which
 * matters when x is wider than L1 (the FFN down product's 11008 values).
 */
AVX512_TARGET static void
dot4_f32_avx512(float *y, const float *const *w, const float *x, int32_t n)
{
	__m512		acc[4][4];
	int32_t		i = 0;

	FULL_UNROLL
	for (int r = 0; r < 4; r++)
		FULL_UNROLL
		for (int j = 0; j < 4; j++)
			acc[r][j] = _mm512_setzero_ps();
	for (; i + 64 <= n; i += 64)
	{
		FULL_UNROLL
		for (int j = 0; j < 4; j++)
		{
			__m512		xv = _mm512_loadu_ps(x + i + 16 * j);

			FULL_UNROLL
			for (int r = 0; r < 4; r++)
				acc[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(w[r] + i + 16 * j), xv, acc[r][j]);
		}
	}
	for (; i + 16 <= n; i += 16)
	{
		__m512		xv = _mm512_loadu_ps(x + i);

		FULL_UNROLL
		for (int r = 0; r < 4; r++)
			acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(w[r] + i), xv, acc[r][0]);
	}
	if (i < n)
	{
		__mmask16	m = (__mmask16) ((1u << (n - i)) - 1);
		__m512		xv = _mm512_maskz_loadu_ps(m, x + i);

		FULL_UNROLL
		for (int r = 0; r < 4; r++)
			acc[r][1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w[r] + i), xv, acc[r][1]);
	}
	FULL_UNROLL
	for (int r = 0; r < 4; r++)
		y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
												  _mm512_add_ps(acc[r][2], acc[r][3])));
}

/*
 * Computes wide rows in groups of four, one from each quarter of the
 * range, so the weights are read as four streams far apart.  On a Zen 4
 * vCPU that raised one-thread decode of the bench model from 6.8-6.9 to
 * 7.3-7.6 tok/s (interleaved runs).  Four adjacent rows ran no faster
 * than one.  NOTE: measured on Zen 4 only.  Intel CPUs take the same path.
 */
AVX512_TARGET void
fm_f32_rows_avx512(const fm_mm_job *job, int32_t begin, int32_t end)
{
	const float *weights = (const float *) job->w->data;
	int32_t		in = job->w->cols;
	int32_t		quarter = in >= F32_GROUP_MIN_COLS ? (end - begin) / 4 : 0;

	for (int32_t k = 0; k < quarter; k++)
	{
		const float *rows[4];

		for (int g = 0; g < 4; g++)
			rows[g] = weights + (size_t) (begin + g * quarter + k) * in;
		for (int32_t r = 0; r < job->rows; r++)
		{
			float		y4[4];
			float	   *yr = job->y + (size_t) r * job->ldy;

			dot4_f32_avx512(y4, rows, job->x + (size_t) r * in, in);
			for (int g = 0; g < 4; g++)
				yr[begin + g * quarter + k] = y4[g];
		}
	}
	for (int32_t o = begin + 4 * quarter; o < end; o++)
	{
		const float *row = weights + (size_t) o * in;

		for (int32_t r = 0; r < job->rows; r++)
			job->y[(size_t) r * job->ldy + o] = dot_f32_avx512(row, job->x + (size_t) r * in, in);
	}
}

/* Mask of the rows of panel p that exist. */
static INLINE __mmask16
panel_mask(const fm_matrix *w, int32_t p)
{
	int32_t		valid = w->rows - p * FM_PANEL_ROWS;

	return valid >= FM_PANEL_ROWS ? (__mmask16) 0xffff : (__mmask16) ((1u << valid) - 1);
}

/*
 * Computes nr activation rows from r0 for np panels from p.  nr and np
 * are constants at every call, so the accumulators stay in registers:
 * 8 rows by 3 panels take 24 of the 32 vector registers.
 */
AVX512_TARGET static INLINE void
bf16_tile(const fm_mm_job *job, int32_t p, int32_t r0, const int nr, const int np)
{
	const fm_matrix *w = job->w;
	size_t		kp = ((size_t) w->cols + 1) / 2;
	const uint16_t *p0 = (const uint16_t *) w->data + (size_t) p * kp * 32;
	const uint32_t *xr[8];
	__m512		acc[3][8];

	FULL_UNROLL
	for (int r = 0; r < nr; r++)
	{
		xr[r] = (const uint32_t *) (job->xq + (size_t) (r0 + r) * job->xq_stride);
		FULL_UNROLL
		for (int j = 0; j < np; j++)
			acc[j][r] = _mm512_setzero_ps();
	}
	for (size_t kk = 0; kk < kp; kk++)
	{
		__m512bh	wv[3];

		FULL_UNROLL
		for (int j = 0; j < np; j++)
			wv[j] = (__m512bh) _mm512_loadu_si512(p0 + (size_t) j * kp * 32 + kk * 32);
		FULL_UNROLL
		for (int r = 0; r < nr; r++)
		{
			__m512bh	xb = (__m512bh) _mm512_set1_epi32((int) xr[r][kk]);

			FULL_UNROLL
			for (int j = 0; j < np; j++)
				acc[j][r] = _mm512_dpbf16_ps(acc[j][r], xb, wv[j]);
		}
	}
	FULL_UNROLL
	for (int r = 0; r < nr; r++)
	{
		float	   *y = job->y + (size_t) (r0 + r) * job->ldy + (size_t) p * FM_PANEL_ROWS;

		FULL_UNROLL
		for (int j = 0; j < np; j++)
			_mm512_mask_storeu_ps(y + j * FM_PANEL_ROWS, panel_mask(w, p + j), acc[j][r]);
	}
}

#define TILE_CASES(fn, np) \
	switch (nr) \
	{ \
		case 1: fn(job, p, r0, 1, np); break; \
		case 2: fn(job, p, r0, 2, np); break; \
		case 3: fn(job, p, r0, 3, np); break; \
		case 4: fn(job, p, r0, 4, np); break; \
		case 5: fn(job, p, r0, 5, np); break; \
		case 6: fn(job, p, r0, 6, np); break; \
		case 7: fn(job, p, r0, 7, np); break; \
		default: fn(job, p, r0, 8, np); break; \
	}

/*
 * Panels go in groups of three, each group over every row tile of up to
 * 8 rows, so a group's weights come from memory once and from cache for
 * the other tiles.
 */
AVX512_TARGET void
fm_bf16_panels_avx512(const fm_mm_job *job, int32_t begin, int32_t end)
{
	for (int32_t p = begin; p < end; p += 3)
		for (int32_t r0 = 0; r0 < job->rows; r0 += 8)
		{
			int32_t		nr = job->rows - r0;

			if (p + 2 < end)
			{
				TILE_CASES(bf16_tile, 3);
			}
			else if (p + 1 < end)
			{
				TILE_CASES(bf16_tile, 2);
			}
			else
			{
				TILE_CASES(bf16_tile, 1);
			}
		}
}

/* Widens 16 fp16 values to fp32 (exact). */
AVX512_TARGET static INLINE __m512
widen_fp16x16(const uint16_t *h)
{
	return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) h));
}

/*
 * Returns acc plus VPDPBUSD of a and the int32 at b, which the instruction
 * itself broadcasts from memory.  GCC 12 compiles _mm512_set1_epi32 to a
 * separate broadcast, one more vector instruction per call.
 */
AVX512_TARGET static INLINE __m512i
dpbusd_bcst(__m512i acc, __m512i a, const int32_t *b)
{
	__asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*b));
	return acc;
}

/*
 * Computes one activation row against the np <= 2 panels in panels[],
 * in two chains per panel for latency.
 */
AVX512_TARGET static INLINE void
q8_row_avx512(const fm_mm_job *job, const int32_t *panels, int32_t r, const int np)
{
	const fm_matrix *w = job->w;
	int32_t		nb = w->cols / FM_Q8_BLOCK;
	const uint8_t *xrow = job->xq + (size_t) r * job->xq_stride;
	const int32_t *x4 = (const int32_t *) xrow;
	const float *xs = (const float *) (xrow + w->cols);
	const int32_t *shift = (const int32_t *) (xs + nb);
	__m512i		flip = _mm512_set1_epi32((int) 0x80808080u);
	__m512		acc[2];

	FULL_UNROLL
	for (int j = 0; j < np; j++)
		acc[j] = _mm512_setzero_ps();
	for (int32_t b = 0; b < nb; b++)
	{
		__m512i		i0[2];
		__m512i		i1[2];

		FULL_UNROLL
		for (int j = 0; j < np; j++)
		{
			const uint8_t *qb = (const uint8_t *) w->data + ((size_t) panels[j] * nb + b) * 512;

			FULL_UNROLL
			for (int32_t g = 0; g < 8; g++)
				_mm_prefetch((const char *) qb + q8_prefetch_bytes + g * 64, _MM_HINT_T1);
			i0[j] = _mm512_setzero_si512();
			i1[j] = _mm512_setzero_si512();
		}
		FULL_UNROLL
		for (int32_t g = 0; g < 8; g += 2)
		{
			FULL_UNROLL
			for (int j = 0; j < np; j++)
			{
				const uint8_t *qb = (const uint8_t *) w->data + ((size_t) panels[j] * nb + b) * 512;
				__m512i		wa = _mm512_xor_si512(_mm512_loadu_si512(qb + g * 64), flip);
				__m512i		wb = _mm512_xor_si512(_mm512_loadu_si512(qb + g * 64 + 64), flip);

				i0[j] = dpbusd_bcst(i0[j], wa, &x4[b * 8 + g]);
				i1[j] = dpbusd_bcst(i1[j], wb, &x4[b * 8 + g + 1]);
			}
		}
		FULL_UNROLL
		for (int j = 0; j < np; j++)
		{
			size_t		blk = (size_t) panels[j] * nb + b;
			__m512i		isum = _mm512_sub_epi32(_mm512_add_epi32(i0[j], i1[j]),
												_mm512_set1_epi32(shift[b]));
			__m512		d = _mm512_mul_ps(widen_fp16x16(w->scales + blk * 16),
										  _mm512_set1_ps(xs[b]));

			acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, acc[j]);
		}
	}
	FULL_UNROLL
	for (int j = 0; j < np; j++)
		_mm512_mask_storeu_ps(job->y + (size_t) r * job->ldy + (size_t) panels[j] * FM_PANEL_ROWS,
							  panel_mask(w, panels[j]),
							  _mm512_mul_ps(acc[j], _mm512_set1_ps(w->scale_unit)));
}

/*
 * Computes nr activation rows from r0 against panel p.  The first tile of
 * a product of more than one tile reads the panel from memory and the
 * others from cache, so only it prefetches.  On Zen 4 that made 64-row
 * products about 8% faster.  A single tile of 4 rows gained nothing.
 */
AVX512_TARGET static INLINE void
q8_tile(const fm_mm_job *job, int32_t p, int32_t r0, const int nr, const int prefetch)
{
	const fm_matrix *w = job->w;
	int32_t		nb = w->cols / FM_Q8_BLOCK;
	const int32_t *x4[8];
	const float *xs[8];
	const int32_t *shift[8];
	__m512		acc[8];
	__m512i		flip = _mm512_set1_epi32((int) 0x80808080u);
	__m512		unit = _mm512_set1_ps(w->scale_unit);

	FULL_UNROLL
		for (int r = 0; r < nr; r++)
	{
		const uint8_t *xrow = job->xq + (size_t) (r0 + r) * job->xq_stride;

		x4[r] = (const int32_t *) xrow;
		xs[r] = (const float *) (xrow + w->cols);
		shift[r] = (const int32_t *) (xs[r] + nb);
		acc[r] = _mm512_setzero_ps();
	}
	for (int32_t b = 0; b < nb; b++)
	{
		size_t		blk = (size_t) p * nb + b;
		const uint8_t *qb = (const uint8_t *) w->data + blk * 512;
		__m512i		isum[8];
		__m512		sw = widen_fp16x16(w->scales + blk * 16);

		FULL_UNROLL
		for (int r = 0; r < nr; r++)
			isum[r] = _mm512_setzero_si512();
		if (prefetch)
			for (int32_t g = 0; g < 8; g++)
				_mm_prefetch((const char *) qb + q8_prefetch_bytes + g * 64, _MM_HINT_T1);
		for (int32_t g = 0; g < 8; g++)
		{
			__m512i		wv = _mm512_xor_si512(_mm512_loadu_si512(qb + g * 64), flip);

			FULL_UNROLL
			for (int r = 0; r < nr; r++)
				isum[r] = dpbusd_bcst(isum[r], wv, &x4[r][b * 8 + g]);
		}
		FULL_UNROLL
		for (int r = 0; r < nr; r++)
			acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(isum[r],
																		 _mm512_set1_epi32(shift[r][b]))),
									 _mm512_mul_ps(sw, _mm512_set1_ps(xs[r][b])), acc[r]);
	}
	FULL_UNROLL
		for (int r = 0; r < nr; r++)
		_mm512_mask_storeu_ps(job->y + (size_t) (r0 + r) * job->ldy + (size_t) p * FM_PANEL_ROWS,
							  panel_mask(w, p), _mm512_mul_ps(acc[r], unit));
}

/*
 * Computes a q8 product.  One activation row takes its panels in pairs
 * from the two halves of the range, so the weights are read as two
 * streams far apart.  On a Zen 4 vCPU that raised one-thread decode of
 * the bench model from 28.6-29.7 to 30.6-31.4 tok/s (interleaved runs).
 * Four streams ran slower than one.  NOTE: measured on Zen 4 only.
 */
AVX512_TARGET void
fm_q8_panels_avx512(const fm_mm_job *job, int32_t begin, int32_t end)
{
	if (job->rows == 1)
	{
		int32_t		half = (end - begin) / 2;
		int32_t		last = end - 1;

		for (int32_t k = 0; k < half; k++)
		{
			int32_t		panels[2] = {begin + k, begin + half + k};

			q8_row_avx512(job, panels, 0, 2);
		}
		if (begin + 2 * half < end)
			q8_row_avx512(job, &last, 0, 1);
		return;
	}
	for (int32_t p = begin; p < end; p++)
		for (int32_t r0 = 0; r0 < job->rows; r0 += 8)
		{
			int32_t		nr = job->rows - r0;

			TILE_CASES(q8_tile, r0 == 0 && job->rows > 8);
		}
}

#endif							/* __x86_64__ */
