/*-------------------------------------------------------------------------
 *
 * factorize.h
 *	  Truncated SVD of a dense matrix into low-rank factors B A, for turning
 *	  a full-size expert into a FlexMoRE adapter on the public expert.
 *
 * Pure C over OpenBLAS (CBLAS and its bundled LAPACK); no PostgreSQL
 * header, so the numerics can be tested on their own.  The caller passes
 * the BLAS and LAPACK entry points, because flexmore.so loads OpenBLAS at
 * run time instead of linking it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_FACTORIZE_H
#define FLEXMORE_FACTORIZE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Entry points of OpenBLAS: cblas_dgemm and LAPACK's dgesdd, dgeqrf, dorgqr. */
typedef struct fm_lapack_api
{
	void		(*dgemm) (int order, int transa, int transb, int m, int n, int k,
						  double alpha, const double *a, int lda, const double *b,
						  int ldb, double beta, double *c, int ldc);
	void		(*dgesdd) (const char *jobz, const int *m, const int *n, double *a,
						   const int *lda, double *s, double *u, const int *ldu,
						   double *vt, const int *ldvt, double *work, const int *lwork,
						   int *iwork, int *info);
	void		(*dgeqrf) (const int *m, const int *n, double *a, const int *lda,
						   double *tau, double *work, const int *lwork, int *info);
	void		(*dorgqr) (const int *m, const int *n, const int *k, double *a,
						   const int *lda, const double *tau, double *work,
						   const int *lwork, int *info);
} fm_lapack_api;

typedef enum fm_svd_method
{
	FM_SVD_AUTO = 0,			/* exact up to FM_SVD_EXACT_MAX_DIM, else randomized */
	FM_SVD_EXACT,				/* LAPACK dgesdd on the whole matrix */
	FM_SVD_RANDOMIZED			/* randomized range finder, then a small dgesdd */
} fm_svd_method;

/*
 * AUTO uses the exact SVD while the smaller side of the matrix is at most
 * this: dgesdd's cost grows with m * n * min(m, n), which for a 4096 x 11008
 * projection is minutes, where the randomized method takes seconds.
 */
#define FM_SVD_EXACT_MAX_DIM 1024

/* Columns added to the rank in the randomized range finder. */
#define FM_SVD_OVERSAMPLE 10

/* Power iterations of the randomized range finder. */
#define FM_SVD_POWER_ITERATIONS 4

/*
 * Factorizes delta [m, n] (row-major) at rank r, 1 <= r <= min(m, n):
 * fills b [m, r] and a [r, n] (row-major) so that b a is the truncated SVD
 * U_r S_r V_r^T of delta, split as b = U_r sqrt(S_r), a = sqrt(S_r) V_r^T.
 * The randomized method draws its test matrix from a fixed seed, so a
 * call is repeatable.  Returns 0, or -1 when memory runs out or LAPACK
 * reports a failure; message (at least 128 bytes) then says which.
 */
int			fm_lowrank_factorize(const fm_lapack_api *api, const double *delta,
								 int m, int n, int r, fm_svd_method method,
								 float *b, float *a, char *message);

/*
 * Returns ||delta - b a||_F / ||delta||_F for the float factors, or 0 when
 * delta is zero.
 */
double		fm_lowrank_relative_error(const double *delta, int m, int n, int r,
									  const float *b, const float *a);

#endif							/* FLEXMORE_FACTORIZE_H */
