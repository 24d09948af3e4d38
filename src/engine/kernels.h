/*-------------------------------------------------------------------------
 *
 * kernels.h
 *	  Numeric kernels of the forward pass, internal to the engine.
 *
 * Products of weight matrices have a plain C reference and AVX2 and
 * AVX-512 versions chosen at run time (fm_kernel_isa), and bf16 ones an
 * AMX version too; fp32 prompt chunks go to the sgemm set by
 * fm_set_sgemm (OpenBLAS).  Matrices are [out, in]; fp32 ones are
 * row-major.  The other kernels are plain C.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_KERNELS_H
#define FLEXMORE_KERNELS_H

#include <stdbool.h>
#include <stdint.h>

/*
 * y[out] = W[out, in] x[in] for a row-major fp32 W, accumulating in fp32.
 * Large products split their rows over the compute threads; each row is
 * summed in the same order whatever the thread count, so y is bitwise
 * the same.
 */
void		fm_matvec(float *y, const float *w, const float *x, int32_t out, int32_t in);

/*
 * Y[rows, out] = X[rows, in] W[out, in]^T for a row-major fp32 W with the
 * engine's own kernels, never sgemm: each output row is bitwise
 * fm_matvec's result for that row.
 */
void		fm_f32_product(float *y, const float *x, const float *w, int32_t rows,
						   int32_t out, int32_t in);

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

/*
 * Bytes of the scratch fm_matmul_w needs for rows rows of cols
 * activations in any format (a multiple of 64).
 */
size_t		fm_matmul_scratch_bytes(int32_t rows, int32_t cols);

/*
 * Y[rows, w->rows] = X[rows, w->cols] W^T for a matrix in any format.
 * f32 goes through fm_matmul.  bf16 and q8 first encode X into scratch
 * (fm_matmul_scratch_bytes long) as their format describes, then split
 * W's panels over the compute threads.  Every output is summed in one
 * fixed order, so Y is bitwise the same for every thread count and every
 * row count.  Only the kernel set (fm_kernel_isa) changes the order.
 */
void		fm_matmul_w(float *y, const float *x, const fm_matrix *w, int32_t rows,
						void *scratch);

/* ---------- kernel sets (formats.c, kernels_x86.c) ---------- */

typedef enum fm_isa
{
	FM_ISA_C = 0,
	FM_ISA_AVX2,
	FM_ISA_AVX512BF16,
	FM_ISA_AMX					/* avx512bf16, but bf16 products on AMX tiles */
} fm_isa;

/* The kernel set in use: the CPU's best unless fm_force_isa lowered it. */
fm_isa		fm_isa_current(void);

/*
 * One product for the range kernels: y[r * ldy + o] for rows r of the
 * activations.  These are fp32 rows of cols in x for f32 matrices, else
 * encoded rows xq_stride bytes apart in xq.  A bf16 row is uint32 pairs
 * of bfloat16 values, a q8 row is int8 q[cols], then float
 * scale[cols / 32], then int32 shift[cols / 32]: 128 times the sum of
 * each block's q, which the AVX-512 kernels subtract (kernels_x86.c).
 */
typedef struct fm_mm_job
{
	float	   *y;
	int32_t		ldy;
	int32_t		rows;
	const float *x;
	const uint8_t *xq;
	size_t		xq_stride;
	const fm_matrix *w;
} fm_mm_job;

/* Computes output rows [begin, end) of an f32 product, or panels of a bf16 or q8 one. */
typedef void (*fm_mm_range_fn) (const fm_mm_job *job, int32_t begin, int32_t end);

#if defined(__x86_64__)
void		fm_f32_rows_avx2(const fm_mm_job *job, int32_t begin, int32_t end);
void		fm_bf16_panels_avx2(const fm_mm_job *job, int32_t begin, int32_t end);
void		fm_q8_panels_avx2(const fm_mm_job *job, int32_t begin, int32_t end);
void		fm_f32_rows_avx512(const fm_mm_job *job, int32_t begin, int32_t end);
void		fm_bf16_panels_avx512(const fm_mm_job *job, int32_t begin, int32_t end);
void		fm_q8_panels_avx512(const fm_mm_job *job, int32_t begin, int32_t end);
/* Sets CPU-specific kernel parameters.  fm_isa_current calls it once. */
void		fm_x86_tune(void);
void		fm_bf16_panels_amx(const fm_mm_job *job, int32_t begin, int32_t end);

/*
 * Requests Linux's permission for the tile registers on the first call,
 * and returns whether the CPU has AMX-BF16 and this process may use it
 * (kernels_amx.c).  Not safe to call from a signal handler.
 */
bool		fm_amx_request(void);
#endif

/* y[n] = w[n] * x[n] / sqrt(mean(x^2) + eps); y may alias x. */
void		fm_rmsnorm(float *y, const float *x, const float *w, int32_t n, double eps);

/*
 * Rotates each of n_heads vectors of head_dim in x by RoPE at position
 * pos, rotate-half (NeoX) pairing: element i pairs with i + head_dim/2,
 * angle pos * theta^(-2i/head_dim).  head_dim must be even.
 */
void		fm_rope(float *x, int32_t n_heads, int32_t head_dim, int32_t pos,
					double theta);

/*
 * Returns the dot product of a[n] and b[n], summed in an order that depends
 * only on n (see kernels.c).
 */
float		fm_dot(const float *a, const float *b, int32_t n);

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
 * Runs fn over items [0, n) split into contiguous ranges of at least
 * min_items items.  The threads of the pool (fm_set_threads), the caller's
 * included, take ranges in turn, so which thread runs a range varies from
 * call to call.  Returns when every range is done.  Ranges never
 * overlap, so fn may write its items' outputs without locking.  Only the
 * process's main thread may call it.
 */
void		fm_parallel_for(int32_t n, int32_t min_items, fm_range_fn fn, void *arg);

#endif							/* FLEXMORE_KERNELS_H */
