/*-------------------------------------------------------------------------
 *
 * test_threads.c
 *	  Unit tests of the compute thread pool: every item of a split loop
 *	  runs exactly once, and a threaded matvec is bitwise equal to the
 *	  single-threaded one.
 *
 *-------------------------------------------------------------------------
 */
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "engine/kernels.h"
#include "testutil.h"

static int	visits[10007];

static void
count_visits(void *arg, int32_t begin, int32_t end)
{
	for (int32_t i = begin; i < end; i++)
		visits[i]++;
}

static void
test_parallel_for_visits_each_item_once(void)
{
	const int32_t sizes[] = {1, 2, 3, 63, 64, 65, 1000, 10007};
	const int32_t threads[] = {1, 2, 3, 4, 7};

	for (size_t t = 0; t < sizeof(threads) / sizeof(threads[0]); t++)
	{
		CHECK(fm_set_threads(threads[t], NULL) == FM_OK);
		for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++)
		{
			int			wrong = 0;

			memset(visits, 0, sizeof(visits));
			fm_parallel_for(sizes[s], 1, count_visits, NULL);
			for (int32_t i = 0; i < sizes[s]; i++)
				if (visits[i] != 1)
					wrong++;
			for (int32_t i = sizes[s]; i < 10007; i++)
				if (visits[i] != 0)
					wrong++;
			CHECK(wrong == 0);
		}
	}
	CHECK(fm_set_threads(1, NULL) == FM_OK);
}

static void
test_set_threads_range(void)
{
	fm_error	err = {0};

	CHECK(fm_set_threads(0, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "outside [1, 64]") != NULL);
	CHECK(fm_set_threads(FM_MAX_THREADS + 1, &err) == FM_EINVAL);
	CHECK(fm_set_threads(3, &err) == FM_OK);
	CHECK(fm_get_threads() == 3);
	CHECK(fm_set_threads(1, &err) == FM_OK);
}

/* Fills n floats with values in [-1, 1) from a fixed linear congruence. */
static void
fill(float *v, size_t n, uint32_t seed)
{
	for (size_t i = 0; i < n; i++)
	{
		seed = seed * 1664525u + 1013904223u;
		v[i] = (float) ((seed >> 8) / 8388608.0 - 1.0);
	}
}

static void
test_matvec_same_bits_for_any_thread_count(void)
{
	const int32_t out = 1531;
	const int32_t in = 777;
	float	   *w = malloc(sizeof(float) * out * in);
	float	   *x = malloc(sizeof(float) * in);
	float	   *y1 = malloc(sizeof(float) * out);
	float	   *yn = malloc(sizeof(float) * out);
	double		max_err = 0.0;

	fill(w, (size_t) out * in, 7);
	fill(x, in, 11);
	CHECK(fm_set_threads(1, NULL) == FM_OK);
	fm_matvec(y1, w, x, out, in);

	/* the single-threaded result against a float64 sum */
	for (int32_t o = 0; o < out; o++)
	{
		double		sum = 0.0;
		double		e;

		for (int32_t i = 0; i < in; i++)
			sum += (double) w[(size_t) o * in + i] * x[i];
		e = fabs(sum - y1[o]);
		if (e > max_err)
			max_err = e;
	}
	CHECK(max_err < 1e-3);

	for (int32_t t = 2; t <= 4; t++)
	{
		CHECK(fm_set_threads(t, NULL) == FM_OK);
		memset(yn, 0, sizeof(float) * out);
		fm_matvec(yn, w, x, out, in);
		CHECK(memcmp(y1, yn, sizeof(float) * out) == 0);
	}
	CHECK(fm_set_threads(1, NULL) == FM_OK);
	free(w);
	free(x);
	free(y1);
	free(yn);
}

static void
test_matmul_without_sgemm(void)
{
	const int32_t rows = 5;
	const int32_t out = 300;
	const int32_t in = 200;
	float	   *w = malloc(sizeof(float) * out * in);
	float	   *x = malloc(sizeof(float) * rows * in);
	float	   *y_blas = malloc(sizeof(float) * rows * out);
	float	   *y_plain = malloc(sizeof(float) * rows * out);
	double		max_rel = 0.0;

	fill(w, (size_t) out * in, 3);
	fill(x, (size_t) rows * in, 5);
	fm_matmul(y_blas, x, w, rows, out, in);
	fm_set_sgemm(NULL);
	fm_matmul(y_plain, x, w, rows, out, in);
	for (int32_t i = 0; i < rows * out; i++)
	{
		double		rel = fabs(y_blas[i] - y_plain[i]) / (fabs(y_plain[i]) + 1.0);

		if (rel > max_rel)
			max_rel = rel;
	}
	/* sums of 200 products in [-1, 1): fp32 rounding stays near 1e-6 */
	CHECK(max_rel < 1e-5);

	/* row 0 of the plain path is exactly fm_matvec */
	fm_matvec(y_blas, w, x, out, in);
	CHECK(memcmp(y_blas, y_plain, sizeof(float) * out) == 0);
	free(w);
	free(x);
	free(y_blas);
	free(y_plain);
}

int
main(void)
{
	test_set_threads_range();
	test_parallel_for_visits_each_item_once();
	test_matvec_same_bits_for_any_thread_count();
	test_matmul_without_sgemm();
	return TEST_SUMMARY();
}
