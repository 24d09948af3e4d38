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
 * pool in the constructor.
 *
 * State is per backend and touched only by the backend's main thread.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>

#include "cache.h"

/* NB: the soname, not libopenblas.so, which only the -dev package installs. */
#define FM_OPENBLAS_SONAME "libopenblas.so.0"

typedef void (*fm_set_num_threads_fn) (int);

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

	if (blas_tried)
		return;
	blas_tried = true;

	snprintf(threads, sizeof(threads), "%d", flexmore_threads);
	setenv("OPENBLAS_NUM_THREADS", threads, 1);

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
	elog(DEBUG1, "flexmore: loaded %s with %d threads", FM_OPENBLAS_SONAME,
		 flexmore_threads);
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
