/*-------------------------------------------------------------------------
 *
 * cache.h
 *	  The shared-memory weight cache: one fp32 copy of each model part for
 *	  every backend of the server (src/cache.c), and its prewarm worker
 *	  (src/prewarm.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_CACHE_H
#define FLEXMORE_CACHE_H

#include "postgres.h"

#include "utils/resowner.h"
#include "utils/timestamp.h"

/* ---------- settings (defined in flexmore.c) ---------- */

extern int	flexmore_cache_size;	/* MB of weights; 0 turns the cache off */
extern char *flexmore_prewarm;	/* "db.model, db.model" or empty */
extern int	flexmore_threads;
extern int	flexmore_weight_format;	/* fm_weight_format */
extern int	flexmore_max_total_threads;	/* 0: no limit */

/* What a cached item contains. */
typedef enum fm_cache_kind
{
	FM_CACHE_WEIGHTS = 0,		/* fp32 weights of the shared part or an expert */
	FM_CACHE_TOKENIZER			/* the tokenizer image (fm_tokenizer_attach) */
} fm_cache_kind;

/*
 * Identity of one cached item.  A weights item is the shared part of a
 * model (expert -1: embeddings, attention, norms, routers, lm_head) or one
 * expert's FFN or adapter.  Each import also has one tokenizer item, with
 * expert -1.  generation and created together name one import: a re-import raises the
 * generation, and created (the importing transaction's start time) tells
 * apart two imports that an aborted transaction left with the same id and
 * generation.  Weights items of one import in different formats
 * (flexmore.weight_format) are different items.
 */
typedef struct fm_cache_key
{
	Oid			dbid;
	int64		model_id;
	int64		generation;
	TimestampTz created;
	int32		expert;			/* -1 for the shared part and the tokenizer */
	int32		kind;			/* fm_cache_kind */
	int32		format;			/* fm_weight_format of weights items; 0 for the tokenizer */
} fm_cache_key;

#define FM_CACHE_SHARED_PART	(-1)

/*
 * Fills a new item's memory (bytes long, 64-byte aligned) with its
 * contents.  It runs in the loading backend without the cache lock and
 * may raise an error; the cache then frees the item.
 */
typedef void (*fm_cache_fill_fn) (void *arg, char *dst, Size bytes);

/* Reserves the cache's shared memory; called from shmem_request_hook. */
extern void fm_cache_shmem_request(void);

/* Creates or attaches the control structure; called from shmem_startup_hook. */
extern void fm_cache_shmem_startup(void);

/* True when this process has a shared cache to use. */
extern bool fm_cache_enabled(void);

/*
 * Returns the item of key, pinned for the current resource owner, and its
 * memory in *data.  When the item is absent this backend loads it through
 * fill (bytes long), or returns -1 without pinning when fill is NULL; when
 * another backend is loading it, this one waits, and the wait can be
 * cancelled.  Raises 53200 when the item does not fit
 * even after evicting every unpinned item.  The pin lasts until
 * fm_cache_unpin, or until the resource owner is released (end of the
 * statement or transaction, error included) or the process exits.
 */
extern int	fm_cache_pin(const fm_cache_key *key, const char *model_name,
						 const char *expert_name, Size bytes,
						 fm_cache_fill_fn fill, void *arg, char **data);

/* Size in bytes of an item this backend has pinned (slot from fm_cache_pin). */
extern Size fm_cache_item_bytes(int slot);

/* Drops one pin that fm_cache_pin returned under the current owner. */
extern void fm_cache_unpin(int slot);

/*
 * Marks every item of the named model in this database except those of
 * keep_model_id/keep_generation/keep_created (keep_model_id 0 keeps none)
 * as stale: each is freed as soon as no backend pins it.  Returns how
 * many items were freed at once.
 */
extern int	fm_cache_invalidate(const char *model_name, int64 keep_model_id,
								int64 keep_generation, TimestampTz keep_created);

/*
 * Invalidates the named model's items (as fm_cache_invalidate with no
 * import kept) when the current transaction commits; a rollback keeps
 * them.  Called when this transaction drops or replaces the model.
 */
extern void fm_cache_invalidate_at_commit(const char *model_name);

/*
 * Drops one pin of slot held under owner; false, doing nothing, when
 * there is none (the owner was released meanwhile, say).
 */
extern bool fm_cache_unpin_if_held(int slot, ResourceOwner owner);

/* Registers the prewarm background workers; called from _PG_init. */
extern void fm_prewarm_register(void);

/* ---------- BLAS loading in backends (blas.c) ---------- */

/*
 * Loads OpenBLAS into this backend on first use, with every signal
 * blocked so that its threads never receive one, and hands its sgemm to
 * the engine.  When the library cannot be loaded the engine multiplies
 * prompt chunks with its plain C loop, and a WARNING reports it once.
 */
extern void fm_blas_ensure(void);

/* Applies flexmore.threads to the engine pool and to OpenBLAS if loaded. */
extern void fm_blas_set_threads(int n);

/* ---------- server-wide thread cap (blas.c) ---------- */

/* Reserves and attaches the shared thread counter; from the shmem hooks. */
extern void fm_threads_shmem_request(void);
extern void fm_threads_shmem_startup(void);

/*
 * Takes this call's compute threads: flexmore.threads, fewer when
 * flexmore.max_total_threads would be exceeded, but at least one.  The
 * threads count against the cap until the current resource owner is
 * released or the backend exits.  Does nothing while this backend already
 * has threads counted.
 */
extern void fm_threads_begin_call(void);

#endif							/* FLEXMORE_CACHE_H */
