/*-------------------------------------------------------------------------
 *
 * factorize.c
 *	  Truncated SVD of an expert's delta on the public expert.
 *
 * LAPACK is column-major and the tensors are row-major, so the code keeps
 * every LAPACK operand column-major and reads the row-major delta through
 * CBLAS transposes.  The randomized method is the range finder of Halko,
 * Martinsson and Tropp, "Finding structure with randomness" (SIAM Review,
 * 2011), algorithm 4.4: Y = (D D^T)^q D Omega with re-orthonormalization
 * after each product, Q = orth(Y), then the exact SVD of the small
 * matrix Q^T D.
 *
 *-------------------------------------------------------------------------
 */
#include "factorize.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


/* CBLAS enum values (cblas.h), passed to the dgemm entry point as ints. */
#define COL_MAJOR	102
#define NO_TRANS	111
#define TRANS		112

/*
 * SVD of the column-major m x n matrix x (destroyed): u [m, k], s [k],
 * vt [k, n] with k = min(m, n), all column-major.
 */
static int
svd_colmajor(const fm_lapack_api *api, double *x, int m, int n, double *u, double *s, double *vt, char *message)
{
	int			k = m < n ? m : n;
	int			lwork = -1;
	int			info = 0;
	double		query;
	double	   *work;
	int		   *iwork = malloc(sizeof(int) * 8 * (size_t) k);

	if (iwork == NULL)
		goto nomem;
	api->dgesdd("S", &m, &n, x, &m, s, u, &m, vt, &k, &query, &lwork, iwork, &info);
	lwork = (int) query + 1;
	work = malloc(sizeof(double) * (size_t) lwork);
	if (work == NULL)
	{
		free(iwork);
		goto nomem;
	}
	api->dgesdd("S", &m, &n, x, &m, s, u, &m, vt, &k, work, &lwork, iwork, &info);
	free(work);
	free(iwork);
	if (info != 0)
	{
		snprintf(message, 128, "LAPACK dgesdd failed on a %d x %d matrix (info %d)",
				 m, n, info);
		return -1;
	}
	return 0;

nomem:
	snprintf(message, 128, "out of memory for the SVD of a %d x %d matrix", m, n);
	return -1;
}

/* Replaces the column-major m x l matrix y (m >= l) by an orthonormal basis of its range. */
static int
orthonormalize(const fm_lapack_api *api, double *y, int m, int l, char *message)
{
	int			lwork = -1;
	int			info = 0;
	double		query;
	double	   *work;
	double	   *tau = malloc(sizeof(double) * (size_t) l);

	if (tau == NULL)
		goto nomem;
	api->dgeqrf(&m, &l, y, &m, tau, &query, &lwork, &info);
	lwork = (int) query + 1;
	work = malloc(sizeof(double) * (size_t) lwork);
	if (work == NULL)
	{
		free(tau);
		goto nomem;
	}
	api->dgeqrf(&m, &l, y, &m, tau, work, &lwork, &info);
	if (info == 0)
		api->dorgqr(&m, &l, &l, y, &m, tau, work, &lwork, &info);
	free(work);
	free(tau);
	if (info != 0)
	{
		snprintf(message, 128, "LAPACK QR failed on a %d x %d matrix (info %d)", m, l, info);
		return -1;
	}
	return 0;

nomem:
	snprintf(message, 128, "out of memory for the QR of a %d x %d matrix", m, l);
	return -1;
}

/* Standard normal values from splitmix64 and Box-Muller, for the test matrix. */
static void
fill_gaussian(double *x, size_t n, uint64_t seed)
{
	uint64_t	state = seed;

	for (size_t i = 0; i < n; i += 2)
	{
		double		u[2];

		for (int j = 0; j < 2; j++)
		{
			uint64_t	z = (state += 0x9e3779b97f4a7c15ULL);

			z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
			z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
			z ^= z >> 31;
			u[j] = ((double) (z >> 11) + 0.5) / 9007199254740992.0;	/* (0, 1) */
		}
		x[i] = sqrt(-2.0 * log(u[0])) * cos(2.0 * M_PI * u[1]);
		if (i + 1 < n)
			x[i + 1] = sqrt(-2.0 * log(u[0])) * sin(2.0 * M_PI * u[1]);
	}
}

/* Splits U_r S_r V_r^T into b = U_r sqrt(S_r) and a = sqrt(S_r) V_r^T (row-major). */
static void
split_factors(const double *u, int ldu, const double *s, const double *vt, int ldvt,
			  int m, int n, int r, float *b, float *a)
{
	for (int i = 0; i < r; i++)
	{
		double		root = sqrt(s[i]);

		for (int p = 0; p < m; p++)
			b[(size_t) p * r + i] = (float) (u[p + (size_t) i * ldu] * root);
		for (int q = 0; q < n; q++)
			a[(size_t) i * n + q] = (float) (root * vt[i + (size_t) q * ldvt]);
	}
}

static int
factorize_exact(const fm_lapack_api *api, const double *delta, int m, int n, int r, float *b, float *a, char *message)
{
	int			k = m < n ? m : n;
	double	   *x = malloc(sizeof(double) * (size_t) m * n);
	double	   *u = malloc(sizeof(double) * (size_t) m * k);
	double	   *s = malloc(sizeof(double) * (size_t) k);
	double	   *vt = malloc(sizeof(double) * (size_t) k * n);
	int			rc = -1;

	if (x == NULL || u == NULL || s == NULL || vt == NULL)
	{
		snprintf(message, 128, "out of memory for the SVD of a %d x %d matrix", m, n);
		goto done;
	}
	/* row-major delta to column-major x */
	for (int p = 0; p < m; p++)
		for (int q = 0; q < n; q++)
			x[p + (size_t) q * m] = delta[(size_t) p * n + q];
	rc = svd_colmajor(api, x, m, n, u, s, vt, message);
	if (rc == 0)
		split_factors(u, m, s, vt, k, m, n, r, b, a);

done:
	free(x);
	free(u);
	free(s);
	free(vt);
	return rc;
}

static int
factorize_randomized(const fm_lapack_api *api, const double *delta, int m, int n, int r, float *b, float *a,
					 char *message)
{
	int			k = m < n ? m : n;
	int			l = r + FM_SVD_OVERSAMPLE < k ? r + FM_SVD_OVERSAMPLE : k;
	double	   *omega = malloc(sizeof(double) * (size_t) n * l);	/* [n, l] */
	double	   *y = malloc(sizeof(double) * (size_t) m * l);	/* [m, l] */
	double	   *small = malloc(sizeof(double) * (size_t) l * n);	/* [l, n] */
	double	   *us = malloc(sizeof(double) * (size_t) l * l);
	double	   *s = malloc(sizeof(double) * (size_t) l);
	double	   *vt = malloc(sizeof(double) * (size_t) l * n);
	double	   *u = malloc(sizeof(double) * (size_t) m * l);
	int			rc = -1;

	if (omega == NULL || y == NULL || small == NULL || us == NULL || s == NULL ||
		vt == NULL || u == NULL)
	{
		snprintf(message, 128, "out of memory for the SVD of a %d x %d matrix", m, n);
		goto done;
	}

	/*
	 * delta is row-major [m, n], which CBLAS in column-major order sees as
	 * delta^T [n, m] with leading dimension n.
	 */
	fill_gaussian(omega, (size_t) n * l, 0x666c65786d6f7265ULL);
	/* y = delta omega */
	api->dgemm(COL_MAJOR, TRANS, NO_TRANS, m, l, n,
				1.0, delta, n, omega, n, 0.0, y, m);
	for (int it = 0; it < FM_SVD_POWER_ITERATIONS; it++)
	{
		if (orthonormalize(api, y, m, l, message) != 0)
			goto done;
		/* omega = delta^T y */
		api->dgemm(COL_MAJOR, NO_TRANS, NO_TRANS, n, l, m,
					1.0, delta, n, y, m, 0.0, omega, n);
		if (orthonormalize(api, omega, n, l, message) != 0)
			goto done;
		/* y = delta omega */
		api->dgemm(COL_MAJOR, TRANS, NO_TRANS, m, l, n,
					1.0, delta, n, omega, n, 0.0, y, m);
	}
	if (orthonormalize(api, y, m, l, message) != 0)
		goto done;

	/* small = y^T delta, [l, n] */
	api->dgemm(COL_MAJOR, TRANS, TRANS, l, n, m,
				1.0, y, m, delta, n, 0.0, small, l);
	if (svd_colmajor(api, small, l, n, us, s, vt, message) != 0)
		goto done;
	/* u = y us, [m, l] */
	api->dgemm(COL_MAJOR, NO_TRANS, NO_TRANS, m, l, l,
				1.0, y, m, us, l, 0.0, u, m);
	split_factors(u, m, s, vt, l, m, n, r, b, a);
	rc = 0;

done:
	free(omega);
	free(y);
	free(small);
	free(us);
	free(s);
	free(vt);
	free(u);
	return rc;
}

int
fm_lowrank_factorize(const fm_lapack_api *api, const double *delta, int m, int n, int r,
					 fm_svd_method method, float *b, float *a, char *message)
{
	int			k = m < n ? m : n;

	if (r < 1 || r > k)
	{
		snprintf(message, 128, "rank %d is outside [1, %d] for a %d x %d matrix", r, k, m, n);
		return -1;
	}
	if (method == FM_SVD_AUTO)
		method = k <= FM_SVD_EXACT_MAX_DIM ? FM_SVD_EXACT : FM_SVD_RANDOMIZED;
	if (method == FM_SVD_EXACT)
		return factorize_exact(api, delta, m, n, r, b, a, message);
	return factorize_randomized(api, delta, m, n, r, b, a, message);
}

double
fm_lowrank_relative_error(const double *delta, int m, int n, int r,
						  const float *b, const float *a)
{
	double		residual = 0.0;
	double		total = 0.0;

	/* One row at a time, so the check needs no second m x n matrix. */
	for (int p = 0; p < m; p++)
	{
		const float *brow = b + (size_t) p * r;

		for (int q = 0; q < n; q++)
		{
			double		approx = 0.0;
			double		d = delta[(size_t) p * n + q];

			for (int i = 0; i < r; i++)
				approx += (double) brow[i] * (double) a[(size_t) i * n + q];
			residual += (d - approx) * (d - approx);
			total += d * d;
		}
	}
	return total > 0.0 ? sqrt(residual / total) : 0.0;
}
