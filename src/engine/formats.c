/*-------------------------------------------------------------------------
 *
 * formats.c
 *	  Weight formats (f32, bf16, q8): packing, dequantising, the plain C
 *	  product kernels, and the choice of kernel set at run time.
 *
 * The layouts are described at fm_weight_format in engine.h.  Products
 * run over ranges of output rows (f32) or panels of FM_PANEL_ROWS rows
 * (bf16, q8) split by fm_parallel_for.  A panel's outputs depend only on
 * the panel and the activations, never on where a range starts, so the
 * results do not change with the thread count.
 *
 * The kernel set is chosen once, on first use, from the CPU (GCC's
 * __builtin_cpu_supports, which also checks that the OS saves the vector
 * registers).  The amx set also needs Linux's permission to use the tile
 * registers, which fm_amx_request requests then.  The x86 kernels
 * (kernels_x86.c, kernels_amx.c) are compiled with target attributes, so
 * the build needs no -mavx flags and a CPU without those instructions
 * never runs them.
 *
 *-------------------------------------------------------------------------
 */
#include <math.h>
#include <string.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "engine/engine.h"
#include "engine/kernels.h"

/*
 * Output rows per thread below which a product stays on one thread:
 * waking a thread costs microseconds, about what 64 rows of 1024 floats
 * take.  Products of fewer than FM_MATVEC_MIN_WORK multiply-adds never
 * wake one.
 */
#define FM_MATVEC_MIN_ROWS	64
#define FM_MATVEC_MIN_WORK	((int64_t) 1 << 18)

/* ---------- names ---------- */

bool
fm_weight_format_parse(const char *name, fm_weight_format *out)
{
	if (strcmp(name, "f32") == 0)
		*out = FM_WEIGHTS_F32;
	else if (strcmp(name, "bf16") == 0)
		*out = FM_WEIGHTS_BF16;
	else if (strcmp(name, "q8") == 0)
		*out = FM_WEIGHTS_Q8;
	else
		return false;
	return true;
}

const char *
fm_weight_format_name(fm_weight_format format)
{
	switch (format)
	{
		case FM_WEIGHTS_F32:
			return "f32";
		case FM_WEIGHTS_BF16:
			return "bf16";
		case FM_WEIGHTS_Q8:
			return "q8";
	}
	return "unknown";
}

/* ---------- sizes and packing ---------- */

fm_weight_format
fm_matrix_format_for(fm_weight_format format, int64_t cols)
{
	if (format == FM_WEIGHTS_Q8 && cols % FM_Q8_BLOCK != 0)
		return FM_WEIGHTS_BF16;
	return format;
}

static size_t
panels_of(int64_t rows)
{
	return (size_t) ((rows + FM_PANEL_ROWS - 1) / FM_PANEL_ROWS);
}

/* Bytes of the int8 section of a q8 matrix; the scales follow it. */
static size_t
q8_data_bytes(int64_t rows, int64_t cols)
{
	return panels_of(rows) * (size_t) (cols / FM_Q8_BLOCK) * FM_Q8_BLOCK * FM_PANEL_ROWS;
}

static size_t
q8_scale_bytes(int64_t rows, int64_t cols)
{
	return panels_of(rows) * (size_t) (cols / FM_Q8_BLOCK) * FM_PANEL_ROWS * sizeof(uint16_t);
}

size_t
fm_matrix_bytes(fm_weight_format format, int64_t rows, int64_t cols)
{
	size_t		bytes;

	if (rows < 1 || cols < 1 || rows > INT32_MAX || cols > INT32_MAX)
		return SIZE_MAX;
	switch (format)
	{
		case FM_WEIGHTS_F32:
			if (__builtin_mul_overflow((size_t) rows, (size_t) cols, &bytes) ||
				__builtin_mul_overflow(bytes, sizeof(float), &bytes))
				return SIZE_MAX;
			break;
		case FM_WEIGHTS_BF16:
			/* one 64-byte vector per panel and column pair */
			if (__builtin_mul_overflow(panels_of(rows), (size_t) (cols + 1) / 2, &bytes) ||
				__builtin_mul_overflow(bytes, (size_t) 64, &bytes))
				return SIZE_MAX;
			break;
		case FM_WEIGHTS_Q8:
			if (cols % FM_Q8_BLOCK != 0)
				return SIZE_MAX;
			/* 512 bytes of q and 32 of scales per panel and block, then the unit */
			if (__builtin_mul_overflow(panels_of(rows), (size_t) (cols / FM_Q8_BLOCK), &bytes) ||
				__builtin_mul_overflow(bytes, (size_t) 544, &bytes) ||
				__builtin_add_overflow(bytes, sizeof(float), &bytes))
				return SIZE_MAX;
			break;
		default:
			return SIZE_MAX;
	}
	if (bytes > SIZE_MAX - 63)
		return SIZE_MAX;
	return (bytes + 63) & ~(size_t) 63;
}

/* Rounds an fp32 to the nearest bfloat16, ties to even (finite inputs). */
static inline uint16_t
bf16_round(float f)
{
	uint32_t	u;

	memcpy(&u, &f, sizeof(u));
	u += 0x7fffu + ((u >> 16) & 1u);
	return (uint16_t) (u >> 16);
}

static inline float
bf16_widen(uint16_t h)
{
	uint32_t	u = (uint32_t) h << 16;
	float		f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

/*
 * Rounds a finite f in [0, 65520) to the nearest IEEE binary16, ties to
 * even.  Below 2^-14 the result is subnormal, in steps of 2^-24.
 */
static uint16_t
fp16_round(float f)
{
	uint32_t	u;

	memcpy(&u, &f, sizeof(u));
	if (u < (113u << 23))
		/* f * 2^24 is exact and at most 1024, whose bits are those of 2^-14, the smallest normal */
		return (uint16_t) lrintf(f * 0x1p24f);
	u += 0xfffu + ((u >> 13) & 1u);
	/* rebias the exponent from 127 to 15; a mantissa carry moves into it */
	return (uint16_t) ((u >> 13) - (112u << 10));
}

static inline float
fp16_widen(uint16_t h)
{
	uint32_t	u;
	float		f;

	if ((h & 0x7c00u) == 0)
		return (float) (h & 0x3ffu) * 0x1p-24f;
	u = ((uint32_t) (h & 0x7fffu) << 13) + (112u << 23);
	memcpy(&f, &u, sizeof(f));
	return f;
}

static float
block_amax(const float *v, size_t n)
{
	float		amax = 0.0f;

	for (size_t i = 0; i < n; i++)
		if (fabsf(v[i]) > amax)
			amax = fabsf(v[i]);
	return amax;
}

/*
 * Quantises n <= 32 weights to q = round(v / scale), ties to even as
 * lrintf rounds by default, clamped to [-127, 127].  scale is 0 for an
 * all-zero block.
 */
static void
quantize_with_scale(const float *v, int32_t n, float scale, int8_t *q)
{
	if (scale == 0.0f)
	{
		memset(q, 0, n);
		return;
	}
	for (int32_t i = 0; i < n; i++)
	{
		long		r = lrintf(v[i] / scale);

		/* a normal fp16 scale keeps max|v| / scale below 127.07; a subnormal one may not */
		if (r > 127)
			r = 127;
		if (r < -127)
			r = -127;
		q[i] = (int8_t) r;
	}
}

/*
 * Quantises n <= 32 activations symmetrically: q = round(v * (127 /
 * max|v|)), ties to even.  Returns the scale max|v| / 127, 0 for an
 * all-zero block.
 */
static float
quantize_block(const float *v, int32_t n, int8_t *q)
{
	float		amax = block_amax(v, n);
	float		inv;

	if (amax == 0.0f)
	{
		memset(q, 0, n);
		return 0.0f;
	}
	inv = 127.0f / amax;
	for (int32_t i = 0; i < n; i++)
	{
		/*
		 * Below max|v| = 127 / FLT_MAX (about 3.7e-37) the float factor
		 * is infinite.  lrintf of an infinity or NaN is unspecified (it
		 * gave -127 after clamping here), so such blocks scale in double.
		 */
		long		r = isinf(inv) ? lrint(v[i] * (127.0 / amax)) : lrintf(v[i] * inv);

		/* rounding can only reach 127 in magnitude, but never let it wrap */
		if (r > 127)
			r = 127;
		if (r < -127)
			r = -127;
		q[i] = (int8_t) r;
	}
	return amax / 127.0f;
}

/*
 * Returns the unit 2^-e of a q8 matrix whose largest block scale is
 * max_scale: max_scale * 2^e lies in [2^14, 2^15), well inside fp16's
 * normal range, and e stays within [-126, 126] so the unit is a normal
 * fp32.  An all-zero matrix gets 1.
 */
static float
q8_unit(float max_scale)
{
	int			exponent;
	int			e;

	if (max_scale == 0.0f)
		return 1.0f;
	(void) frexpf(max_scale, &exponent);
	e = 15 - exponent;
	if (e > 126)
		e = 126;
	if (e < -126)
		e = -126;
	return ldexpf(1.0f, -e);
}

void
fm_matrix_pack(fm_weight_format format, const float *src, int32_t rows, int32_t cols,
			   void *dst)
{
	if (format == FM_WEIGHTS_F32)
	{
		memcpy(dst, src, (size_t) rows * cols * sizeof(float));
		return;
	}
	if (format == FM_WEIGHTS_BF16)
	{
		uint16_t   *out = dst;
		size_t		kp = ((size_t) cols + 1) / 2;

		memset(dst, 0, fm_matrix_bytes(format, rows, cols));
		for (int32_t o = 0; o < rows; o++)
		{
			const float *row = src + (size_t) o * cols;
			uint16_t   *panel = out + (size_t) (o / FM_PANEL_ROWS) * kp * 32 +
				(size_t) (o % FM_PANEL_ROWS) * 2;

			for (int32_t k = 0; k < cols; k++)
				panel[(size_t) (k / 2) * 32 + (k & 1)] = bf16_round(row[k]);
		}
		return;
	}

	/* q8 */
	{
		size_t		nb = (size_t) cols / FM_Q8_BLOCK;
		int8_t	   *q = dst;
		uint16_t   *scales = (uint16_t *) ((char *) dst + q8_data_bytes(rows, cols));
		float		unit = q8_unit(block_amax(src, (size_t) rows * cols) / 127.0f);
		float		to_stored = 1.0f / unit;

		memset(dst, 0, fm_matrix_bytes(format, rows, cols));
		memcpy((char *) scales + q8_scale_bytes(rows, cols), &unit, sizeof(unit));
		for (int32_t o = 0; o < rows; o++)
		{
			size_t		p = (size_t) o / FM_PANEL_ROWS;
			int32_t		j = o % FM_PANEL_ROWS;

			for (size_t b = 0; b < nb; b++)
			{
				const float *wb = src + (size_t) o * cols + b * FM_Q8_BLOCK;
				int8_t		block[FM_Q8_BLOCK];
				int8_t	   *qb = q + (p * nb + b) * 512;
				uint16_t	d = fp16_round(block_amax(wb, FM_Q8_BLOCK) / 127.0f * to_stored);

				scales[(p * nb + b) * FM_PANEL_ROWS + j] = d;
				quantize_with_scale(wb, FM_Q8_BLOCK, fp16_widen(d) * unit, block);
				for (int32_t k = 0; k < FM_Q8_BLOCK; k++)
					qb[(k / 4) * 64 + j * 4 + (k % 4)] = block[k];
			}
		}
	}
}

fm_matrix
fm_matrix_view(fm_weight_format format, const void *data, int32_t rows, int32_t cols)
{
	fm_matrix	m;

	memset(&m, 0, sizeof(m));
	m.format = format;
	m.rows = rows;
	m.cols = cols;
	m.data = data;
	if (format == FM_WEIGHTS_Q8 && data != NULL)
	{
		m.scales = (const uint16_t *) ((const char *) data + q8_data_bytes(rows, cols));
		memcpy(&m.scale_unit, (const char *) m.scales + q8_scale_bytes(rows, cols),
			   sizeof(m.scale_unit));
	}
	return m;
}

fm_matrix
fm_matrix_f32(const float *data, int32_t rows, int32_t cols)
{
	return fm_matrix_view(FM_WEIGHTS_F32, data, rows, cols);
}

void
fm_matrix_row(const fm_matrix *m, int32_t row, float *out)
{
	int32_t		cols = m->cols;
	size_t		p = (size_t) row / FM_PANEL_ROWS;
	int32_t		j = row % FM_PANEL_ROWS;

	switch (m->format)
	{
		case FM_WEIGHTS_F32:
			memcpy(out, (const float *) m->data + (size_t) row * cols, sizeof(float) * cols);
			break;
		case FM_WEIGHTS_BF16:
			{
				size_t		kp = ((size_t) cols + 1) / 2;
				const uint16_t *panel = (const uint16_t *) m->data + p * kp * 32 + j * 2;

				for (int32_t k = 0; k < cols; k++)
					out[k] = bf16_widen(panel[(size_t) (k / 2) * 32 + (k & 1)]);
			}
			break;
		case FM_WEIGHTS_Q8:
			{
				size_t		nb = (size_t) cols / FM_Q8_BLOCK;

				for (size_t b = 0; b < nb; b++)
				{
					const int8_t *qb = (const int8_t *) m->data + (p * nb + b) * 512;
					float		scale = fp16_widen(m->scales[(p * nb + b) * FM_PANEL_ROWS + j]) *
						m->scale_unit;

					for (int32_t k = 0; k < FM_Q8_BLOCK; k++)
						out[b * FM_Q8_BLOCK + k] = scale * qb[(k / 4) * 64 + j * 4 + (k % 4)];
				}
			}
			break;
	}
}

/* ---------- activations ---------- */

size_t
fm_matmul_scratch_bytes(int32_t rows, int32_t cols)
{
	size_t		bf16 = ((size_t) cols + 1) / 2 * sizeof(uint32_t);
	size_t		q8 = (size_t) cols + ((size_t) cols + FM_Q8_BLOCK - 1) / FM_Q8_BLOCK *
		(sizeof(float) + sizeof(int32_t));
	size_t		row = bf16 > q8 ? bf16 : q8;

	row = (row + 63) & ~(size_t) 63;
	return row * (size_t) (rows > 0 ? rows : 1);
}

/* Row stride of the encoded activations in the scratch. */
static size_t
scratch_stride(int32_t cols)
{
	return fm_matmul_scratch_bytes(1, cols);
}

/* Encodes rows of activations for a bf16 or q8 product (see fm_mm_job). */
static void
encode_activations(fm_weight_format format, const float *x, int32_t rows, int32_t cols,
				   uint8_t *xq, size_t stride)
{
	for (int32_t r = 0; r < rows; r++)
	{
		const float *xr = x + (size_t) r * cols;
		uint8_t    *out = xq + (size_t) r * stride;

		if (format == FM_WEIGHTS_BF16)
		{
			uint16_t   *pairs = (uint16_t *) out;

			for (int32_t k = 0; k < cols; k++)
				pairs[k] = bf16_round(xr[k]);
			if (cols % 2 != 0)
				pairs[cols] = 0;
		}
		else
		{
			int32_t		nb = cols / FM_Q8_BLOCK;
			int8_t	   *q = (int8_t *) out;
			float	   *scales = (float *) (out + cols);
			int32_t    *shifts = (int32_t *) (scales + nb);

			for (int32_t b = 0; b < nb; b++)
			{
				int32_t		sum = 0;

				scales[b] = quantize_block(xr + b * FM_Q8_BLOCK, FM_Q8_BLOCK,
										   q + b * FM_Q8_BLOCK);
				for (int32_t k = 0; k < FM_Q8_BLOCK; k++)
					sum += q[b * FM_Q8_BLOCK + k];
				shifts[b] = 128 * sum;
			}
		}
	}
}

/* ---------- plain C kernels ---------- */

static void
f32_rows_c(const fm_mm_job *job, int32_t begin, int32_t end)
{
	int32_t		in = job->w->cols;

	for (int32_t o = begin; o < end; o++)
	{
		const float *row = (const float *) job->w->data + (size_t) o * in;

		for (int32_t r = 0; r < job->rows; r++)
		{
			const float *xr = job->x + (size_t) r * in;
			float		sum = 0.0f;

			for (int32_t i = 0; i < in; i++)
				sum += row[i] * xr[i];
			job->y[(size_t) r * job->ldy + o] = sum;
		}
	}
}

/*
 * Each product of two bfloat16 values is exact in fp32, so each step
 * rounds only the sum: the odd column of a pair first, as the AVX-512
 * instruction does.  The 16 rows of a panel are summed side by side,
 * which compilers vectorise without changing any row's order.
 */
static void
bf16_panels_c(const fm_mm_job *job, int32_t begin, int32_t end)
{
	const fm_matrix *w = job->w;
	size_t		kp = ((size_t) w->cols + 1) / 2;

	for (int32_t p = begin; p < end; p++)
	{
		const uint16_t *panel = (const uint16_t *) w->data + (size_t) p * kp * 32;
		int32_t		valid = w->rows - p * FM_PANEL_ROWS;

		if (valid > FM_PANEL_ROWS)
			valid = FM_PANEL_ROWS;
		for (int32_t r = 0; r < job->rows; r++)
		{
			const uint16_t *xr = (const uint16_t *) (job->xq + (size_t) r * job->xq_stride);
			float		acc[FM_PANEL_ROWS] = {0};

			for (size_t kk = 0; kk < kp; kk++)
			{
				const uint16_t *wp = panel + kk * 32;
				float		x_even = bf16_widen(xr[2 * kk]);
				float		x_odd = bf16_widen(xr[2 * kk + 1]);

				for (int32_t j = 0; j < FM_PANEL_ROWS; j++)
				{
					acc[j] += bf16_widen(wp[2 * j + 1]) * x_odd;
					acc[j] += bf16_widen(wp[2 * j]) * x_even;
				}
			}
			memcpy(job->y + (size_t) r * job->ldy + (size_t) p * FM_PANEL_ROWS, acc,
				   sizeof(float) * valid);
		}
	}
}

/*
 * Each block's integer sum is exact, then sum += isum * (scale_w *
 * scale_x) per block in order, with scale_w the stored fp16 scale, and
 * the sum is multiplied by the matrix's unit at the end.  The 16 rows of
 * a panel are summed side by side, as for bf16.
 */
static void
q8_panels_c(const fm_mm_job *job, int32_t begin, int32_t end)
{
	const fm_matrix *w = job->w;
	int32_t		nb = w->cols / FM_Q8_BLOCK;

	for (int32_t p = begin; p < end; p++)
	{
		int32_t		valid = w->rows - p * FM_PANEL_ROWS;

		if (valid > FM_PANEL_ROWS)
			valid = FM_PANEL_ROWS;
		for (int32_t r = 0; r < job->rows; r++)
		{
			const int8_t *xr = (const int8_t *) (job->xq + (size_t) r * job->xq_stride);
			const float *xs = (const float *) (job->xq + (size_t) r * job->xq_stride + w->cols);
			float		acc[FM_PANEL_ROWS] = {0};

			for (int32_t b = 0; b < nb; b++)
			{
				size_t		blk = (size_t) p * nb + b;
				const int8_t *qb = (const int8_t *) w->data + blk * 512;
				const int8_t *xb = xr + b * FM_Q8_BLOCK;
				int32_t		isum[FM_PANEL_ROWS] = {0};

				for (int32_t g = 0; g < 8; g++)
					for (int32_t j = 0; j < FM_PANEL_ROWS; j++)
						for (int32_t t = 0; t < 4; t++)
							isum[j] += qb[g * 64 + j * 4 + t] * xb[g * 4 + t];
				for (int32_t j = 0; j < FM_PANEL_ROWS; j++)
					acc[j] += (float) isum[j] * (fp16_widen(w->scales[blk * FM_PANEL_ROWS + j]) *
												 xs[b]);
			}
			for (int32_t j = 0; j < FM_PANEL_ROWS; j++)
				acc[j] *= w->scale_unit;
			memcpy(job->y + (size_t) r * job->ldy + (size_t) p * FM_PANEL_ROWS, acc,
				   sizeof(float) * valid);
		}
	}
}

/* ---------- kernel set ---------- */

static int	detected_isa = -1;
const char *
fm_openblas_coretype(void)
{
#if defined(__x86_64__)
	__builtin_cpu_init();
	if (__builtin_cpu_is("amd") && __builtin_cpu_supports("avx2") &&
		__builtin_cpu_supports("fma"))
		return "Zen";
	if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
		__builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
		__builtin_cpu_supports("avx512cd"))
		return "SkylakeX";
	if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
		return "Haswell";
#endif
	return NULL;
}

static int	current_isa = -1;

static fm_isa
detect_isa(void)
{
#if defined(__x86_64__)
	unsigned int eax,
				ebx,
				ecx = 0,
				edx;

	/* F16C widens q8 scales in the AVX2 kernels; clang 14's __builtin_cpu_supports lacks it */
	if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx))
		ecx = 0;
	__builtin_cpu_init();
	if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
		__builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
		__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma"))
		return fm_amx_request() ? FM_ISA_AMX : FM_ISA_AVX512BF16;
	if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && (ecx & bit_F16C) != 0)
		return FM_ISA_AVX2;
#endif
	return FM_ISA_C;
}

fm_isa
fm_isa_current(void)
{
	if (current_isa < 0)
	{
#if defined(__x86_64__)
		fm_x86_tune();
#endif
		detected_isa = detect_isa();
		current_isa = detected_isa;
	}
	return (fm_isa) current_isa;
}

static const char *const isa_names[] = {"c", "avx2", "avx512bf16", "amx"};

const char *
fm_kernel_isa(void)
{
	return isa_names[fm_isa_current()];
}

bool
fm_force_isa(const char *name)
{
	(void) fm_isa_current();
	for (int i = 0; i <= (int) FM_ISA_AMX; i++)
		if (strcmp(name, isa_names[i]) == 0)
		{
			if (i > detected_isa)
				return false;
			current_isa = i;
			return true;
		}
	return false;
}

/* Returns the range kernel of format for the current kernel set. */
static fm_mm_range_fn
range_kernel(fm_weight_format format)
{
	fm_isa		isa = fm_isa_current();

#if defined(__x86_64__)
	if (isa == FM_ISA_AMX && format == FM_WEIGHTS_BF16)
		return fm_bf16_panels_amx;
	if (isa >= FM_ISA_AVX512BF16)
		return format == FM_WEIGHTS_F32 ? fm_f32_rows_avx512 :
			format == FM_WEIGHTS_BF16 ? fm_bf16_panels_avx512 : fm_q8_panels_avx512;
	if (isa == FM_ISA_AVX2)
		return format == FM_WEIGHTS_F32 ? fm_f32_rows_avx2 :
			format == FM_WEIGHTS_BF16 ? fm_bf16_panels_avx2 : fm_q8_panels_avx2;
#endif
	(void) isa;
	return format == FM_WEIGHTS_F32 ? f32_rows_c :
		format == FM_WEIGHTS_BF16 ? bf16_panels_c : q8_panels_c;
}

/* ---------- products ---------- */

typedef struct range_job
{
	fm_mm_job	job;
	fm_mm_range_fn fn;
} range_job;

static void
run_range(void *arg, int32_t begin, int32_t end)
{
	const range_job *rj = (const range_job *) arg;

	rj->fn(&rj->job, begin, end);
}

/*
 * Runs a product over items (output rows or panels), threaded when the
 * work is large enough to pay for waking threads.
 */
static void
run_product(const fm_mm_job *job, int32_t items, int32_t rows_per_item)
{
	range_job	rj;
	int64_t		work = (int64_t) job->w->rows * job->w->cols * job->rows;

	rj.job = *job;
	rj.fn = range_kernel(job->w->format);
	if (work < FM_MATVEC_MIN_WORK)
		rj.fn(&rj.job, 0, items);
	else
		fm_parallel_for(items, (FM_MATVEC_MIN_ROWS + rows_per_item - 1) / rows_per_item,
						run_range, &rj);
}

/* fp32 products of fewer rows than sgemm takes (see fm_matmul). */
void
fm_f32_product(float *y, const float *x, const float *w, int32_t rows, int32_t out,
			   int32_t in)
{
	fm_matrix	m = fm_matrix_f32(w, out, in);
	fm_mm_job	job = {y, out, rows, x, NULL, 0, &m};

	run_product(&job, out, 1);
}

void
fm_matmul_w(float *y, const float *x, const fm_matrix *w, int32_t rows, void *scratch)
{
	fm_mm_job	job;
	size_t		stride = scratch_stride(w->cols);

	if (rows <= 0)
		return;
	if (w->format == FM_WEIGHTS_F32)
	{
		fm_matmul(y, x, (const float *) w->data, rows, w->rows, w->cols);
		return;
	}

	encode_activations(w->format, x, rows, w->cols, scratch, stride);
	job.y = y;
	job.ldy = w->rows;
	job.rows = rows;
	job.x = x;
	job.xq = scratch;
	job.xq_stride = stride;
	job.w = w;
	run_product(&job, (int32_t) panels_of(w->rows), FM_PANEL_ROWS);
}
