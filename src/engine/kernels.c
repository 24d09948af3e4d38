/*-------------------------------------------------------------------------
 *
 * kernels.c
 *	  Reference kernels: matrix-vector product, RMSNorm, RoPE, softmax,
 *	  SiLU, and a BLAS matrix product for prompt chunks.
 *
 * Single-token decode reads each weight once per token, so a plain loop
 * that the compiler vectorises is as fast as BLAS there and keeps the
 * result independent of the BLAS build.  Prompt chunks reuse each weight
 * row across many tokens, which is where sgemm pays.
 *
 * sgemm is called through a pointer (fm_set_sgemm).  The PostgreSQL
 * module does not link OpenBLAS, because Debian's pthread build of
 * OpenBLAS starts its threads when the library is loaded, and the module
 * is loaded into the single-threaded postmaster.  The standalone build
 * (FM_LINK_CBLAS, set by the Makefile for build/) links it directly.
 *
 * A large matvec splits its rows over the compute threads (threads.c);
 * every row is still one sequential sum, so the split never changes y.
 *
 *-------------------------------------------------------------------------
 */
#include <math.h>
#include <stdbool.h>
#include <stddef.h>

#include "engine/engine.h"
#include "engine/kernels.h"

#ifdef FM_LINK_CBLAS
#include <cblas.h>

/* Adapts OpenBLAS's cblas_sgemm, whose enum arguments are ints, to fm_sgemm_fn. */
static void
linked_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
			 const float *a, int lda, const float *b, int ldb, float beta,
			 float *c, int ldc)
{
	cblas_sgemm((enum CBLAS_ORDER) order, (enum CBLAS_TRANSPOSE) trans_a,
				(enum CBLAS_TRANSPOSE) trans_b, m, n, k, alpha, a, lda, b, ldb,
				beta, c, ldc);
}

static fm_sgemm_fn sgemm = linked_sgemm;
#else
static fm_sgemm_fn sgemm = NULL;
#endif

/* cblas enum values, fixed by the CBLAS standard */
#define FM_CBLAS_ROW_MAJOR	101
#define FM_CBLAS_NO_TRANS	111
#define FM_CBLAS_TRANS		112

/*
 * Rows per thread below which a matvec stays on one thread: waking a
 * thread costs microseconds, about what 64 rows of 1024 floats take.
 */
#define FM_MATVEC_MIN_ROWS	64
#define FM_MATVEC_MIN_WORK	((int64_t) 1 << 18)

/* Called once, the first time a product is big enough for sgemm. */
static fm_sgemm_loader_fn sgemm_loader = NULL;
static bool sgemm_loader_called = false;

void
fm_set_sgemm(fm_sgemm_fn fn)
{
	sgemm = fn;
}

void
fm_set_sgemm_loader(fm_sgemm_loader_fn loader)
{
	sgemm_loader = loader;
	sgemm_loader_called = false;
}

typedef struct matvec_job
{
	float	   *y;
	const float *w;
	const float *x;
	int32_t		in;
} matvec_job;

/* Computes rows [begin, end) of a matvec; the sum order never changes. */
static void
matvec_rows(void *arg, int32_t begin, int32_t end)
{
	const matvec_job *job = (const matvec_job *) arg;
	int32_t		in = job->in;

	for (int32_t o = begin; o < end; o++)
	{
		const float *row = job->w + (size_t) o * in;
		float		sum = 0.0f;

		for (int32_t i = 0; i < in; i++)
			sum += row[i] * job->x[i];
		job->y[o] = sum;
	}
}

void
fm_matvec(float *y, const float *w, const float *x, int32_t out, int32_t in)
{
	matvec_job	job = {y, w, x, in};

	if ((int64_t) out * in < FM_MATVEC_MIN_WORK)
		matvec_rows(&job, 0, out);
	else
		fm_parallel_for(out, FM_MATVEC_MIN_ROWS, matvec_rows, &job);
}

typedef struct matmul_job
{
	float	   *y;
	const float *x;
	const float *w;
	int32_t		rows;
	int32_t		out;
	int32_t		in;
} matmul_job;

/*
 * Computes output columns [begin, end) of a small matmul: each weight row
 * is read once and applied to every input row while it is in cache, and
 * each sum runs in the same order as matvec_rows, so every row of Y is
 * bitwise what fm_matvec would give.
 */
static void
matmul_rows(void *arg, int32_t begin, int32_t end)
{
	const matmul_job *job = (const matmul_job *) arg;
	int32_t		in = job->in;

	for (int32_t o = begin; o < end; o++)
	{
		const float *row = job->w + (size_t) o * in;

		for (int32_t r = 0; r < job->rows; r++)
		{
			const float *xr = job->x + (size_t) r * in;
			float		sum = 0.0f;

			for (int32_t i = 0; i < in; i++)
				sum += row[i] * xr[i];
			job->y[(size_t) r * job->out + o] = sum;
		}
	}
}

void
fm_matmul(float *y, const float *x, const float *w, int32_t rows,
		  int32_t out, int32_t in)
{
	matmul_job	job = {y, x, w, rows, out, in};

	if (rows <= 0)
		return;
	if (rows == 1)
	{
		fm_matvec(y, w, x, out, in);
		return;
	}

	if (rows >= FM_SGEMM_MIN_ROWS && sgemm == NULL && sgemm_loader != NULL &&
		!sgemm_loader_called)
	{
		sgemm_loader_called = true;
		sgemm_loader();
	}
	if (rows < FM_SGEMM_MIN_ROWS || sgemm == NULL)
	{
		if ((int64_t) out * in * rows < FM_MATVEC_MIN_WORK)
			matmul_rows(&job, 0, out);
		else
			fm_parallel_for(out, FM_MATVEC_MIN_ROWS, matmul_rows, &job);
		return;
	}
	sgemm(FM_CBLAS_ROW_MAJOR, FM_CBLAS_NO_TRANS, FM_CBLAS_TRANS,
		  rows, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
}

void
fm_rmsnorm(float *y, const float *x, const float *w, int32_t n, double eps)
{
	double		sum = 0.0;
	float		scale;

	for (int32_t i = 0; i < n; i++)
		sum += (double) x[i] * x[i];
	scale = (float) (1.0 / sqrt(sum / n + eps));
	for (int32_t i = 0; i < n; i++)
		y[i] = w[i] * (x[i] * scale);
}

void
fm_rope(float *x, int32_t n_heads, int32_t head_dim, int32_t pos, double theta)
{
	int32_t		half = head_dim / 2;

	for (int32_t i = 0; i < half; i++)
	{
		double		angle = pos * pow(theta, -2.0 * i / head_dim);
		float		c = (float) cos(angle);
		float		s = (float) sin(angle);

		for (int32_t h = 0; h < n_heads; h++)
		{
			float	   *v = x + (size_t) h * head_dim;
			float		x1 = v[i];
			float		x2 = v[i + half];

			v[i] = x1 * c - x2 * s;
			v[i + half] = x2 * c + x1 * s;
		}
	}
}

void
fm_softmax(float *x, int32_t n)
{
	float		max = -INFINITY;
	double		sum = 0.0;

	for (int32_t i = 0; i < n; i++)
		if (x[i] > max)
			max = x[i];
	if (max == -INFINITY)
	{
		/* nothing is possible; callers keep at least one finite entry */
		for (int32_t i = 0; i < n; i++)
			x[i] = 0.0f;
		return;
	}
	for (int32_t i = 0; i < n; i++)
	{
		x[i] = expf(x[i] - max);
		sum += x[i];
	}
	for (int32_t i = 0; i < n; i++)
		x[i] = (float) (x[i] / sum);
}

float
fm_silu(float u)
{
	return u / (1.0f + expf(-u));
}

int32_t
fm_route(const float *logits, const bool *allowed, int32_t n_experts,
		 int32_t k, bool norm_topk_prob, float *probs,
		 int32_t *experts, float *weights)
{
	int32_t		kept = 0;
	float		sum = 0.0f;

	for (int32_t e = 0; e < n_experts; e++)
		probs[e] = (allowed == NULL || allowed[e]) ? logits[e] : -INFINITY;
	fm_softmax(probs, n_experts);

	/*
	 * Selection by repeated scans: k and n_experts are small, and a strict
	 * comparison makes the lowest index win every tie.
	 */
	while (kept < k)
	{
		int32_t		best = -1;

		for (int32_t e = 0; e < n_experts; e++)
		{
			bool		taken = false;

			if (allowed != NULL && !allowed[e])
				continue;
			for (int32_t j = 0; j < kept; j++)
				if (experts[j] == e)
					taken = true;
			if (taken)
				continue;
			if (best < 0 || probs[e] > probs[best])
				best = e;
		}
		if (best < 0)
			break;
		experts[kept] = best;
		weights[kept] = probs[best];
		sum += probs[best];
		kept++;
	}

	if (norm_topk_prob && sum > 0.0f)
		for (int32_t j = 0; j < kept; j++)
			weights[j] /= sum;
	return kept;
}
