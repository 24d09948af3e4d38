/*
 * membw: measures memory read bandwidth, the bound of single-token decode,
 * which reads every weight once per token.
 *
 *	  membw THREADS [MIB] [PASSES]
 *
 * Fills a buffer of MIB mebibytes (default 2048, far beyond the last-level
 * cache), in transparent huge pages where Linux grants them.  Then THREADS
 * threads sum disjoint equal slices of it as 64-bit integers, in a loop
 * the compiler turns into vector loads.  Each thread reads its slice as
 * 1, 2, 3 and 4 interleaved streams (its slice cut into that many parts,
 * 256 bytes from each part in turn), PASSES times each (default 7).  The
 * stream count matters because a decode kernel may read several weight
 * panels at once.  On a Zen 4 vCPU in 4 KB pages, three streams read
 * about 10% faster than one, and two and four streams slower.  A pass is
 * timed from a barrier before the first thread starts to the end of the
 * slowest one.  The bound is the fastest pattern, so read_gb_s is the
 * largest of the per-pattern medians and read_gb_s_max the fastest pass.
 * by_streams lists each pattern's median.  Prints one JSON line, in GB/s
 * (10^9 bytes):
 *
 *	  {"threads": 2, "mib": 2048, "read_gb_s": 11.9, "read_gb_s_max": 12.3,
 *	   "by_streams": [11.2, 10.1, 11.9, 10.4], ...}
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define MAX_THREADS 64
#define MAX_PASSES 100
#define MAX_STREAMS 4
#define STEP_WORDS 32			/* 256 bytes from one stream at a time */

typedef struct worker
{
	const uint64_t *begin;
	size_t		count;
	uint64_t	sum;
	pthread_t	thread;
} worker;

static pthread_barrier_t start_barrier;
static pthread_barrier_t end_barrier;
static int	passes = 7;
static int	streams = 1;		/* set by the main thread between patterns */

static double
now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/*
 * Sums n words from p as `streams` interleaved streams: the slice is cut
 * into that many parts and STEP_WORDS words are read from each in turn.
 */
static uint64_t
sum_slice(const uint64_t *p, size_t n)
{
	uint64_t	sum = 0;
	size_t		part = n / streams / STEP_WORDS * STEP_WORDS;

	for (size_t off = 0; off < part; off += STEP_WORDS)
		for (int s = 0; s < streams; s++)
		{
			const uint64_t *q = p + (size_t) s * part + off;

			for (int i = 0; i < STEP_WORDS; i++)
				sum += q[i];
		}
	/* the words the parts left over */
	for (size_t i = part * streams; i < n; i++)
		sum += p[i];
	return sum;
}

static void *
run_worker(void *arg)
{
	worker	   *w = arg;

	for (int pass = 0; pass < passes * MAX_STREAMS; pass++)
	{
		pthread_barrier_wait(&start_barrier);
		w->sum += sum_slice(w->begin, w->count);
		pthread_barrier_wait(&end_barrier);
	}
	return NULL;
}

static int
compare_doubles(const void *a, const void *b)
{
	double		x = *(const double *) a;
	double		y = *(const double *) b;

	return (x > y) - (x < y);
}

int
main(int argc, char **argv)
{
	int			threads;
	size_t		mib = 2048;
	size_t		words;
	uint64_t   *buffer;
	worker		workers[MAX_THREADS];
	double		rates[MAX_PASSES];
	double		medians[MAX_STREAMS];
	double		best = 0;
	double		fastest = 0;
	uint64_t	total = 0;

	if (argc < 2 || argc > 4)
	{
		fprintf(stderr, "usage: membw THREADS [MIB] [PASSES]\n");
		return 2;
	}
	threads = atoi(argv[1]);
	if (argc > 2)
		mib = (size_t) atol(argv[2]);
	if (argc > 3)
		passes = atoi(argv[3]);
	if (threads < 1 || threads > MAX_THREADS || mib < 1 || passes < 1 || passes > MAX_PASSES)
	{
		fprintf(stderr, "membw: THREADS must be 1 to %d, MIB at least 1, PASSES 1 to %d\n",
				MAX_THREADS, MAX_PASSES);
		return 2;
	}

	words = mib * (1 << 20) / sizeof(uint64_t);
	buffer = aligned_alloc(1 << 21, words * sizeof(uint64_t));
	if (buffer == NULL)
	{
		fprintf(stderr, "membw: out of memory for %zu MiB\n", mib);
		return 1;
	}
	/* as the engine's own allocator does for weights (src/engine/util.c) */
	(void) madvise(buffer, words * sizeof(uint64_t), MADV_HUGEPAGE);
	for (size_t i = 0; i < words; i++)
		buffer[i] = i;

	pthread_barrier_init(&start_barrier, NULL, (unsigned) threads);
	pthread_barrier_init(&end_barrier, NULL, (unsigned) threads);
	for (int t = 0; t < threads; t++)
	{
		workers[t].begin = buffer + words / threads * t;
		workers[t].count = (t == threads - 1) ? words - words / threads * t : words / threads;
		workers[t].sum = 0;
		if (t > 0)
			pthread_create(&workers[t].thread, NULL, run_worker, &workers[t]);
	}

	/*
	 * The main thread is worker 0 and times each pass between the
	 * barriers.  It changes `streams` only while the other workers wait
	 * at the start barrier, which orders the write before their reads.
	 */
	for (int pattern = 0; pattern < MAX_STREAMS; pattern++)
	{
		streams = pattern + 1;
		for (int pass = 0; pass < passes; pass++)
		{
			double		start;
			double		rate;

			pthread_barrier_wait(&start_barrier);
			start = now_seconds();
			workers[0].sum += sum_slice(workers[0].begin, workers[0].count);
			pthread_barrier_wait(&end_barrier);
			rate = words * sizeof(uint64_t) / (now_seconds() - start) / 1e9;
			rates[pass] = rate;
			if (rate > fastest)
				fastest = rate;
		}
		qsort(rates, passes, sizeof(double), compare_doubles);
		medians[pattern] = rates[passes / 2];
		if (medians[pattern] > best)
			best = medians[pattern];
	}
	for (int t = 1; t < threads; t++)
		pthread_join(workers[t].thread, NULL);
	for (int t = 0; t < threads; t++)
		total += workers[t].sum;

	printf("{\"threads\": %d, \"mib\": %zu, \"read_gb_s\": %.2f, \"read_gb_s_max\": %.2f, "
		   "\"by_streams\": [%.2f, %.2f, %.2f, %.2f], \"checksum\": %llu}\n",
		   threads, mib, best, fastest, medians[0], medians[1], medians[2], medians[3],
		   (unsigned long long) (total & 0xffff));
	return 0;
}
