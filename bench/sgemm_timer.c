/*
 * sgemm_timer: measures OpenBLAS cblas_sgemm in GFLOP/s (2 M N K flops per
 * call) for the shapes given as M,N,K arguments.  A benchmark compares its
 * own rate with these, measured on the same machine in the same run.  Each shape runs for at least 0.5 s after one warm-up
 * call.  Prints "sgemm M N K GFLOPS" per shape.
 *
 *	  sgemm_timer 512,512,512 64,128,64
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <cblas.h>

static double
now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int
main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++)
	{
		int			m, n, k;
		float	   *a, *b, *c;
		long		calls = 0;
		double		start, elapsed;

		if (sscanf(argv[i], "%d,%d,%d", &m, &n, &k) != 3 || m <= 0 || n <= 0 || k <= 0)
		{
			fprintf(stderr, "sgemm_timer: invalid shape \"%s\", expected M,N,K\n", argv[i]);
			return 2;
		}
		a = malloc(sizeof(float) * (size_t) m * k);
		b = malloc(sizeof(float) * (size_t) n * k);
		c = malloc(sizeof(float) * (size_t) m * n);
		if (a == NULL || b == NULL || c == NULL)
		{
			fprintf(stderr, "sgemm_timer: out of memory for shape %s\n", argv[i]);
			return 1;
		}
		for (size_t j = 0; j < (size_t) m * k; j++)
			a[j] = (float) (j % 7) * 0.1f;
		for (size_t j = 0; j < (size_t) n * k; j++)
			b[j] = (float) (j % 5) * 0.1f;

		/* the engine's product: C[m, n] = A[m, k] B[n, k]^T, row-major */
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a, k, b, k,
					0.0f, c, n);
		start = now_seconds();
		do
		{
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a, k, b, k,
						0.0f, c, n);
			calls++;
			elapsed = now_seconds() - start;
		} while (elapsed < 0.5);
		printf("sgemm %d %d %d %.2f\n", m, n, k, 2.0 * m * n * k * calls / elapsed / 1e9);
		free(a);
		free(b);
		free(c);
	}
	return 0;
}
