/*-------------------------------------------------------------------------
 *
 * threads.c
 *	  A small pool of compute threads for the engine's kernels.
 *
 * The pool splits one loop (fm_parallel_for) into contiguous chunks,
 * several per thread.  The calling thread and the workers take chunks in
 * turn from a shared counter until none is left, and then the caller
 * waits for the others.  A decoded token waits for its last chunk, so
 * chunks keep both cores busy when one runs slower (a virtual CPU that
 * shares its core, or another process), where one fixed range per thread
 * would leave the faster one idle.  Threads are created lazily, on the
 * first loop that has enough work while more than one thread is
 * configured, so a process that never computes (the PostgreSQL
 * postmaster that loads flexmore.so) never starts one.  Each thread starts with every signal blocked, so signals
 * keep going to the process's main thread, and it only runs the kernel it
 * is handed: it never calls back into the caller's code.
 *
 * Waiting spins before it sleeps.  A worker that finishes a job polls
 * job_number, and the caller polls pending, for up to FM_SPIN_NS before
 * blocking on the condition variable.  Two-thread decoding posts about
 * thirty products per token, and on a virtual machine each one would
 * otherwise wake a vCPU that went idle.
 *
 * Shared state: every field of fm_pool is read and written under
 * fm_pool.mutex, except the job description, which the main thread writes
 * under the mutex before bumping job_number and workers read after seeing
 * the new number under the same mutex.  job_number and pending are also
 * read without the mutex while spinning, so every access to them is
 * atomic.  A spinning thread takes the mutex before it acts on what it
 * saw.  Only one thread (the process's
 * main thread) may call fm_parallel_for or fm_set_threads.
 *
 * A range is computed exactly as the single-threaded loop computes it, so
 * results do not depend on the thread count.
 *
 *-------------------------------------------------------------------------
 */
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "engine/engine.h"
#include "engine/kernels.h"

typedef struct fm_pool
{
	pthread_mutex_t mutex;
	pthread_cond_t work;		/* signalled when job_number changes */
	pthread_cond_t done;		/* signalled when pending reaches 0 */
	int32_t		wanted;			/* threads the caller asked for, main included */
	int32_t		started;		/* worker threads running, main excluded */
	pthread_t	workers[FM_MAX_THREADS];
	uint64_t	first_job[FM_MAX_THREADS];	/* job_number when each was created */
	uint64_t	job_number;
	int32_t		pending;		/* workers that have not finished the job */

	/* the current job */
	fm_range_fn fn;
	void	   *arg;
	int32_t		n;
	int32_t		parts;			/* threads that take part, main included */
	int32_t		chunks;
	int32_t		next_chunk;		/* taken with atomic adds, outside the mutex */
} fm_pool;

/*
 * Chunks per taking thread: enough to even out speeds, few enough that
 * each chunk streams a long run of weights.
 */
#define FM_CHUNKS_PER_THREAD 8

/*
 * Nanoseconds a waiting thread polls before it sleeps.  It is meant to
 * outlast most gaps between the products of a decoded token (norms,
 * attention, sampling), and is short enough that the threads of an idle
 * backend soon sleep.
 */
#define FM_SPIN_NS 200000

static fm_pool pool = {
	.mutex = PTHREAD_MUTEX_INITIALIZER,
	.work = PTHREAD_COND_INITIALIZER,
	.done = PTHREAD_COND_INITIALIZER,
	.wanted = 1,
};

/* Range [begin, end) of part p when n items are split into parts. */
static void
part_range(int32_t n, int32_t parts, int32_t p, int32_t *begin, int32_t *end)
{
	*begin = (int32_t) ((int64_t) n * p / parts);
	*end = (int32_t) ((int64_t) n * (p + 1) / parts);
}

static int64_t
monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static bool
job_unchanged(uint64_t seen)
{
	return __atomic_load_n(&pool.job_number, __ATOMIC_ACQUIRE) == seen;
}

static bool
workers_pending(uint64_t unused)
{
	return __atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0;
}

/*
 * Polls while waiting(arg) holds, for at most FM_SPIN_NS.  The clock is
 * read every 64 polls, because reading it costs more than a pause.
 */
static void
spin_while(bool (*waiting) (uint64_t), uint64_t arg)
{
	int64_t		deadline = monotonic_ns() + FM_SPIN_NS;

	for (int32_t polls = 1; waiting(arg); polls++)
	{
#if defined(__x86_64__)
		_mm_pause();
#endif
		if (polls % 64 == 0 && monotonic_ns() >= deadline)
			break;
	}
}

/* Runs chunks of the current job until none is left. */
static void
take_chunks(fm_range_fn fn, void *fn_arg, int32_t n, int32_t chunks)
{
	for (;;)
	{
		int32_t		c = __atomic_fetch_add(&pool.next_chunk, 1, __ATOMIC_RELAXED);
		int32_t		begin;
		int32_t		end;

		if (c >= chunks)
			return;
		part_range(n, chunks, c, &begin, &end);
		if (begin < end)
			fn(fn_arg, begin, end);
	}
}

static void *
worker_main(void *arg)
{
	int32_t		index = (int32_t) (intptr_t) arg;	/* 1-based part number */
	uint64_t	seen;

	/*
	 * NB: the job number is the one at creation, not the current one: the
	 * creator may post a job before this thread first takes the mutex.
	 */
	pthread_mutex_lock(&pool.mutex);
	seen = pool.first_job[index];
	for (;;)
	{
		fm_range_fn fn;
		void	   *fn_arg;
		int32_t		n;
		int32_t		parts;
		int32_t		chunks;

		while (__atomic_load_n(&pool.job_number, __ATOMIC_RELAXED) == seen)
			pthread_cond_wait(&pool.work, &pool.mutex);
		seen = __atomic_load_n(&pool.job_number, __ATOMIC_RELAXED);
		fn = pool.fn;
		fn_arg = pool.arg;
		n = pool.n;
		parts = pool.parts;
		chunks = pool.chunks;
		pthread_mutex_unlock(&pool.mutex);

		if (index < parts)
			take_chunks(fn, fn_arg, n, chunks);

		pthread_mutex_lock(&pool.mutex);
		if (__atomic_sub_fetch(&pool.pending, 1, __ATOMIC_RELEASE) == 0)
			pthread_cond_signal(&pool.done);
		if (__atomic_load_n(&pool.job_number, __ATOMIC_RELAXED) == seen)
		{
			pthread_mutex_unlock(&pool.mutex);
			spin_while(job_unchanged, seen);
			pthread_mutex_lock(&pool.mutex);
		}
	}
	return NULL;
}

/*
 * Starts workers until wanted - 1 run.  Called with the mutex held.  A
 * thread that cannot be created leaves the pool smaller, which only costs
 * speed.
 */
static void
start_workers(void)
{
	sigset_t	all;
	sigset_t	saved;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &saved);
	while (pool.started < pool.wanted - 1)
	{
		int32_t		index = pool.started + 1;

		pool.first_job[index] = __atomic_load_n(&pool.job_number, __ATOMIC_RELAXED);
		if (pthread_create(&pool.workers[pool.started], NULL, worker_main,
						   (void *) (intptr_t) index) != 0)
			break;
		pool.started++;
	}
	pthread_sigmask(SIG_SETMASK, &saved, NULL);
}

fm_status
fm_set_threads(int32_t n, fm_error *err)
{
	if (n < 1 || n > FM_MAX_THREADS)
		return fm_set_error(err, FM_EINVAL, "thread count %d is outside [1, %d]",
							n, FM_MAX_THREADS);
	pthread_mutex_lock(&pool.mutex);
	pool.wanted = n;
	pthread_mutex_unlock(&pool.mutex);
	return FM_OK;
}

int32_t
fm_get_threads(void)
{
	int32_t		n;

	pthread_mutex_lock(&pool.mutex);
	n = pool.wanted;
	pthread_mutex_unlock(&pool.mutex);
	return n;
}

void
fm_parallel_for(int32_t n, int32_t min_items, fm_range_fn fn, void *arg)
{
	int32_t		parts;
	int32_t		chunks;

	if (n <= 0)
		return;
	pthread_mutex_lock(&pool.mutex);
	parts = pool.wanted;
	if (min_items > 0 && n / min_items < parts)
		parts = n / min_items;
	if (parts > 1 && pool.started < parts - 1)
		start_workers();
	if (parts > pool.started + 1)
		parts = pool.started + 1;
	if (parts <= 1)
	{
		pthread_mutex_unlock(&pool.mutex);
		fn(arg, 0, n);
		return;
	}

	/* every chunk keeps at least min_items items */
	chunks = parts * FM_CHUNKS_PER_THREAD;
	if (min_items > 0 && n / min_items < chunks)
		chunks = n / min_items;
	pool.fn = fn;
	pool.arg = arg;
	pool.n = n;
	pool.parts = parts;
	pool.chunks = chunks;
	pool.next_chunk = 0;
	__atomic_store_n(&pool.pending, pool.started, __ATOMIC_RELAXED);
	__atomic_add_fetch(&pool.job_number, 1, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&pool.work);
	pthread_mutex_unlock(&pool.mutex);

	take_chunks(fn, arg, n, chunks);

	spin_while(workers_pending, 0);
	pthread_mutex_lock(&pool.mutex);
	while (__atomic_load_n(&pool.pending, __ATOMIC_RELAXED) > 0)
		pthread_cond_wait(&pool.done, &pool.mutex);
	pthread_mutex_unlock(&pool.mutex);
}
