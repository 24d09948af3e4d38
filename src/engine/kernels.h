/*-------------------------------------------------------------------------
 *
 * kernels.h
 *	  Numeric kernels of the forward pass, internal to the engine.
 *
 * Each kernel is a plain C reference except fm_matmul, which hands
 * batches of rows to the sgemm set by fm_set_sgemm (OpenBLAS).  Matrices
 * are row-major, [out, in].
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_KERNELS_H
#define FLEXMORE_KERNELS_H

#include <stdbool.h>
#include <stdint.h>

/*
 * y[out] = W[out, in] x[in], accumulating in fp32.  Large products split
 * their rows over the compute threads; each row is summed in the same
 * order whatever the thread count, so y is bitwise the same.
 */
void		fm_matvec(float *y, const float *w, const float *x, int32_t out, int32_t in);

/*
 * Y[rows, out] = X[rows, in] W[out, in]^T.  One row goes through
 * fm_matvec (decode).  Fewer than FM_SGEMM_MIN_ROWS rows, or any rows
 * when no sgemm is set, go through a C loop that reads each weight row
 * once for all rows and gives each row bitwise fm_matvec's result; more
 * rows go through the sgemm of fm_set_sgemm (prompt chunks), loading it
 * first through the fm_set_sgemm_loader callback when one is set.
 */
void		fm_matmul(float *y, const float *x, const float *w, int32_t rows,
					  int32_t out, int32_t in);

/* y[n] = w[n] * x[n] / sqrt(mean(x^2) + eps); y may alias x. */
void		fm_rmsnorm(float *y, const float *x, const float *w, int32_t n, double eps);

/*
 * Rotates each of n_heads vectors of head_dim in x by RoPE at position
 * pos, rotate-half (NeoX) pairing: element i pairs with i + head_dim/2,
 * angle pos * theta^(-2i/head_dim).  head_dim must be even.
 */
void		fm_rope(float *x, int32_t n_heads, int32_t head_dim, int32_t pos,
					double theta);

/* In-place softmax over x[n]; -inf entries get probability 0. */
void		fm_softmax(float *x, int32_t n);

/* SiLU(u) = u * sigmoid(u). */
float		fm_silu(float u);

/*
 * Routes one token: softmax of logits[n_experts] over the allowed experts
 * (allowed NULL: all), then the k largest probabilities, ties to the
 * lowest expert index, divided by their sum when norm_topk_prob.  probs is
 * scratch of n_experts floats.  Fills experts[] and weights[] in
 * descending order of weight and returns how many were kept, which is
 * min(k, allowed experts).
 */
int32_t		fm_route(const float *logits, const bool *allowed, int32_t n_experts,
					 int32_t k, bool norm_topk_prob, float *probs,
					 int32_t *experts, float *weights);

/* ---------- compute threads (threads.c) ---------- */

/* Computes items [begin, end) of a loop split by fm_parallel_for. */
typedef void (*fm_range_fn) (void *arg, int32_t begin, int32_t end);

/*
 * Runs fn over items [0, n) split into contiguous ranges, one per thread
 * of the pool (fm_set_threads), with at least min_items items per range;
 * the caller's thread runs the first range.  Returns when every range is
 * done.  Ranges never overlap, so fn may write its items' outputs without
 * locking.  Only the process's main thread may call it.
 */
void		fm_parallel_for(int32_t n, int32_t min_items, fm_range_fn fn, void *arg);

#endif							/* FLEXMORE_KERNELS_H */
