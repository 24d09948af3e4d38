/*-------------------------------------------------------------------------
 *
 * blas.c
 *	  Loading OpenBLAS into a backend at run time, and the compute-thread
 *	  setting.
 *
 * flexmore.so does not link OpenBLAS.  Debian's OpenBLAS (the pthread
 * build) starts its worker threads in the library's constructor, and
 * shared_preload_libraries loads flexmore.so into the postmaster, which
 * must stay single-threaded because it forks every backend.  So each
 * backend dlopens the library the first time a matrix product has
 * FM_SGEMM_MIN_ROWS rows or more (the engine calls fm_blas_ensure through
 * fm_set_sgemm_loader); shorter products never need it.
 * Every signal is blocked around dlopen, so OpenBLAS's threads start with
 * all signals blocked and PostgreSQL's signal handlers only ever run on
 * the backend's own thread.  OPENBLAS_NUM_THREADS is set from
 * flexmore.threads before the library loads, because OpenBLAS sizes its
 * pool in the constructor, and OPENBLAS_CORETYPE from the CPU unless the
 * server's environment sets it, because the constructor also picks the
 * kernels and an OpenBLAS older than the CPU picks slow generic ones.
 *
 * State is per backend and touched only by the backend's main thread.
 *
 * The server-wide cap (flexmore.max_total_threads) is one atomic counter
 * in shared memory of the compute threads that running calls hold.  A
 * call takes min(flexmore.threads, cap - held) threads, at least one,
 * because its own backend computes anyway, and returns them when the
 * resource owner current at the start ends (end of statement or
 * transaction, error included) or the backend exits.  So the total stays
 * within the cap except when more calls run at once than the cap allows
 * threads: then each runs on its own backend's thread alone.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>

#include "cache.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/resowner.h"

/* NB: the soname, not libopenblas.so, which only the -dev package installs. */
#define FM_OPENBLAS_SONAME "libopenblas.so.0"

typedef void (*fm_set_num_threads_fn) (int);
typedef char *(*fm_corename_fn) (void);

static bool blas_tried = false;
static void *blas_handle = NULL;
static fm_set_num_threads_fn blas_set_num_threads = NULL;

void
fm_blas_ensure(void)
{
	sigset_t	all;
	sigset_t	saved;
	char		threads[16];
	void	   *sgemm;
	fm_corename_fn corename;
	const char *coretype;

	if (blas_tried)
		return;
	blas_tried = true;

	snprintf(threads, sizeof(threads), "%d", flexmore_threads);
	setenv("OPENBLAS_NUM_THREADS", threads, 1);
	/* A value in the server's environment wins (the 0 of setenv). */
	coretype = fm_openblas_coretype();
	if (coretype != NULL)
		setenv("OPENBLAS_CORETYPE", coretype, 0);

	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, &saved);
	blas_handle = dlopen(FM_OPENBLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
	sigprocmask(SIG_SETMASK, &saved, NULL);

	if (blas_handle == NULL)
	{
		ereport(WARNING,
				(errcode(ERRCODE_UNDEFINED_FILE),
				 errmsg("could not load %s: %s", FM_OPENBLAS_SONAME, dlerror()),
				 errdetail("Prompts are multiplied with the plain C loop, which is slower."),
				 errhint("Install the Debian package libopenblas0.")));
		return;
	}

	sgemm = dlsym(blas_handle, "cblas_sgemm");
	blas_set_num_threads = (fm_set_num_threads_fn) dlsym(blas_handle,
														 "openblas_set_num_threads");
	if (sgemm == NULL)
	{
		ereport(WARNING,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("%s has no cblas_sgemm", FM_OPENBLAS_SONAME),
				 errdetail("Prompts are multiplied with the plain C loop, which is slower.")));
		return;
	}
	fm_set_sgemm((fm_sgemm_fn) sgemm);
	corename = (fm_corename_fn) dlsym(blas_handle, "openblas_get_corename");
	elog(DEBUG1, "flexmore: loaded %s with %d threads and %s kernels", FM_OPENBLAS_SONAME,
		 flexmore_threads, corename != NULL ? corename() : "unknown");
}

void
fm_blas_set_threads(int n)
{
	/* The setting's bounds are the engine's, so this cannot fail. */
	(void) fm_set_threads(n, NULL);
	if (blas_set_num_threads != NULL)
	{
		sigset_t	all;
		sigset_t	saved;

		/* raising the count may start OpenBLAS threads, which inherit this mask */
		sigfillset(&all);
		sigprocmask(SIG_BLOCK, &all, &saved);
		blas_set_num_threads(n);
		sigprocmask(SIG_SETMASK, &saved, NULL);
	}
}

/* ---------- server-wide thread cap ---------- */

typedef struct fm_thread_counter
{
	pg_atomic_uint32 in_use;	/* threads that running calls hold */
} fm_thread_counter;

static fm_thread_counter *thread_counter = NULL;

/* Threads this backend counts in thread_counter, and the resource owner that releases them. */
static uint32 held_threads = 0;
static ResourceOwner held_owner = NULL;
static bool thread_callbacks_registered = false;

void
fm_threads_shmem_request(void)
{
	RequestAddinShmemSpace(sizeof(fm_thread_counter));
}

void
fm_threads_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	thread_counter = ShmemInitStruct("flexmore threads", sizeof(fm_thread_counter), &found);
	if (!found)
		pg_atomic_init_u32(&thread_counter->in_use, 0);
	LWLockRelease(AddinShmemInitLock);
}

static void
release_threads(void)
{
	if (held_threads > 0 && thread_counter != NULL)
		pg_atomic_fetch_sub_u32(&thread_counter->in_use, held_threads);
	held_threads = 0;
	held_owner = NULL;
}

static void
fm_threads_release_callback(ResourceReleasePhase phase, bool isCommit, bool isTopLevel,
							void *arg)
{
	if (phase == RESOURCE_RELEASE_AFTER_LOCKS && held_threads > 0 &&
		CurrentResourceOwner == held_owner)
		release_threads();
}

static void
fm_threads_exit(int code, Datum arg)
{
	release_threads();
}

/*
 * Applies n threads to the engine and OpenBLAS, whose counts are always
 * set together, when the engine's count differs.
 */
static void
apply_threads(int n)
{
	if (fm_get_threads() != n)
		fm_blas_set_threads(n);
}

void
fm_threads_begin_call(void)
{
	uint32		want = (uint32) Max(flexmore_threads, 1);
	uint32		cap = (uint32) flexmore_max_total_threads;
	uint32		grant;

	if (thread_counter == NULL || cap == 0)
	{
		apply_threads((int) want);
		return;
	}
	if (held_threads > 0)
		return;
	if (CurrentResourceOwner == NULL)
	{
		/* nothing would release the threads, so take none from the counter */
		apply_threads(1);
		return;
	}
	if (!thread_callbacks_registered)
	{
		RegisterResourceReleaseCallback(fm_threads_release_callback, NULL);
		before_shmem_exit(fm_threads_exit, (Datum) 0);
		thread_callbacks_registered = true;
	}

	for (;;)
	{
		uint32		in_use = pg_atomic_read_u32(&thread_counter->in_use);

		grant = in_use >= cap ? 1 : Min(want, cap - in_use);
		if (pg_atomic_compare_exchange_u32(&thread_counter->in_use, &in_use, in_use + grant))
			break;
	}
	held_threads = grant;
	held_owner = CurrentResourceOwner;
	apply_threads((int) grant);
	if (grant < want)
		elog(DEBUG1, "flexmore: flexmore.max_total_threads %u leaves this call %u of %u threads",
			 cap, grant, want);
}
