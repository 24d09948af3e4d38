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
 *-------------------------------------------------------------------------
 */
#include <math.h>
#include <stddef.h>

#include <cblas.h>

#include "engine/kernels.h"

void
fm_matvec(float *y, const float *w, const float *x, int32_t out, int32_t in)
{
	for (int32_t o = 0; o < out; o++)
	{
		const float *row = w + (size_t) o * in;
		float		sum = 0.0f;

		for (int32_t i = 0; i < in; i++)
			sum += row[i] * x[i];
		y[o] = sum;
	}
}

void
fm_matmul(float *y, const float *x, const float *w, int32_t rows,
		  int32_t out, int32_t in)
{
	if (rows <= 0)
		return;
	if (rows == 1)
	{
		fm_matvec(y, w, x, out, in);
		return;
	}
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans,
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
