/*-------------------------------------------------------------------------
 *
 * kernels.c
 *	  Reference kernels: matrix-vector product, RMSNorm, RoPE, softmax,
 *	  SiLU, and a BLAS matrix product for prompt chunks.
 *
 * Single-token decode reads each weight once per token, so the engine's
 * own kernels (formats.c) are as fast as BLAS there and keep the result
 * independent of the BLAS build.  fp32 prompt chunks reuse each weight
 * row across many tokens, which is where sgemm pays.
 *
 * sgemm is called through a pointer (fm_set_sgemm).  The PostgreSQL
 * module does not link OpenBLAS, because Debian's pthread build of
 * OpenBLAS starts its threads when the library is loaded, and the module
 * is loaded into the single-threaded postmaster.  The standalone build
 * (FM_LINK_CBLAS, set by the Makefile for build/) links it directly.
 *
 * A large matvec splits its rows over the compute threads (threads.c);
 * every row is still summed in one fixed order, so the split never
 * changes y.
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

void
fm_matvec(float *y, const float *w, const float *x, int32_t out, int32_t in)
{
	fm_f32_product(y, x, w, 1, out, in);
}

void
fm_matmul(float *y, const float *x, const float *w, int32_t rows,
		  int32_t out, int32_t in)
{
	if (rows <= 0)
		return;

	if (rows >= FM_SGEMM_MIN_ROWS && sgemm == NULL && sgemm_loader != NULL &&
		!sgemm_loader_called)
	{
		sgemm_loader_called = true;
		sgemm_loader();
	}
	if (rows < FM_SGEMM_MIN_ROWS || sgemm == NULL)
	{
		/* reads each weight row once for all rows; row r is fm_matvec's result */
		fm_f32_product(y, x, w, rows, out, in);
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

/*
 * Element d goes to partial sum d % 8, and the eight sums are added in a
 * fixed tree.  A single running sum waits for every addition to finish,
 * because the compiler may not reorder float additions.  Eight independent
 * sums overlap, and GCC 12 vectorizes them at -O2.
 */
float
fm_dot(const float *a, const float *b, int32_t n)
{
	float		acc[8] = {0};
	int32_t		d = 0;

	for (; d + 8 <= n; d += 8)
		for (int j = 0; j < 8; j++)
			acc[j] += a[d + j] * b[d + j];
	for (int j = 0; d + j < n; j++)
		acc[j] += a[d + j] * b[d + j];
	return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
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
