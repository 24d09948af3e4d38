/*-------------------------------------------------------------------------
 *
 * cache.c
 *	  The shared-memory weight cache: every backend of the server reads
 *	  the same copy of a model's weights, in each weight format in use.
 *
 * Design.  The cache lives in the main shared memory segment, reserved at
 * server start (flexmore.cache_size; a change needs a restart).  The main
 * segment is an anonymous mapping, so it works with huge pages and in
 * containers whose /dev/shm is small, where POSIX DSM segments of
 * gigabytes would fail.  docs/cache.md weighs the alternatives.
 *
 * The segment contains a control structure (a fixed table of
 * FM_CACHE_MAX_ITEMS items and the free list of the arena) and the arena,
 * where item contents live.  An item is one part of one import of a
 * model: the weights of the shared part or of one expert, or the
 * tokenizer's image (fm_cache_key).  Its contents are
 * written once by the backend that loads it and never change while it is
 * in the cache.  Items are addressed by their offset in the arena; the
 * segment is mapped at the same address in every backend, but nothing
 * stored in shared memory relies on that.
 *
 * Item states: FREE -> LOADING -> READY -> FREE.  A backend that needs an
 * absent item reserves arena space, marks it LOADING with itself as the
 * loader, and fills it without holding the lock.  Others that need the
 * same item wait on the condition variable.  The loader marks it READY
 * and wakes them.  If the loader fails (an error, a cancel, or the
 * backend exits), the item goes back to FREE and the waiters retry, one
 * of them becoming the new loader; no half-written item is ever READY.  A
 * backend killed with SIGKILL makes the postmaster reinitialise shared
 * memory, which empties the cache.
 *
 * Pins.  A backend pins the items a call uses; an item with pins is never
 * freed.  Each backend records its pins with the resource owner that was
 * current when it took them, so the pins go away when the owner is
 * released (end of statement, end of transaction, or error) and at
 * backend exit, even if the caller never unpins.
 *
 * Eviction.  When a new item does not fit, READY items without pins are
 * freed, least recently used first, until it fits.  An item larger than
 * the whole arena, or one that does not fit because the rest is pinned,
 * raises 53200 (out_of_memory).  An item marked stale (an older import of
 * a model that was re-imported, or one that was dropped or evicted while
 * pinned) is freed as soon as its last pin goes.
 *
 * Locking.  One LWLock (tranche "flexmore_cache") protects every field of
 * the control structure and every item header: lookups, pins, hit counts
 * and last-used times take it exclusively, for a few microseconds.  Item
 * contents are written by the loader without the lock while the item is
 * LOADING, and only read afterwards.  Nothing here writes to the
 * database, so the cache works on hot standbys and in read-only
 * transactions.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "cache.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/condition_variable.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/resowner.h"
#include "utils/tuplestore.h"
#include "utils/wait_event.h"

PG_FUNCTION_INFO_V1(flexmore_cache_entries);
PG_FUNCTION_INFO_V1(flexmore_cache_evict);

#define FM_CACHE_MAX_ITEMS	4096
#define FM_CACHE_ALIGN		64
#define FM_CACHE_TRANCHE	"flexmore_cache"

typedef enum fm_item_state
{
	FM_ITEM_FREE = 0,
	FM_ITEM_LOADING,
	FM_ITEM_READY
} fm_item_state;

typedef struct fm_cache_item
{
	fm_cache_key key;
	fm_item_state state;
	bool		stale;			/* free when the last pin goes */
	int			loader_pid;		/* while LOADING */
	Size		offset;			/* in the arena */
	Size		bytes;
	int32		pins;
	int64		hits;			/* pins that found the item in the cache */
	TimestampTz last_used;
	uint64		last_tick;		/* LRU order: larger is more recent */
	char		model_name[NAMEDATALEN];
	char		expert_name[NAMEDATALEN];	/* empty for the shared part */
} fm_cache_item;

/* A free range of the arena. */
typedef struct fm_cache_extent
{
	Size		offset;
	Size		bytes;
} fm_cache_extent;

typedef struct fm_cache_control
{
	LWLock	   *lock;
	ConditionVariable cv;		/* broadcast when an item leaves LOADING */
	Size		arena_bytes;
	uint64		tick;
	int32		high_water;		/* items[high_water..] are all FREE */
	int32		n_free;			/* entries of free_list, sorted by offset */
	fm_cache_extent free_list[FM_CACHE_MAX_ITEMS + 1];
	fm_cache_item items[FM_CACHE_MAX_ITEMS];
} fm_cache_control;

/* Pins this backend holds: item slot, owner, count. */
typedef struct fm_local_pin
{
	int			slot;
	ResourceOwner owner;
	int			count;
} fm_local_pin;

static fm_cache_control *cache = NULL;
static char *arena = NULL;

static fm_local_pin *local_pins = NULL;
static int	n_local_pins = 0;
static int	max_local_pins = 0;
static int	loading_slot = -1;	/* the item this backend is filling */
static bool callbacks_registered = false;

/* Model names whose items are invalidated when this transaction commits. */
static List *pending_invalidations = NIL;

static Size
fm_cache_arena_bytes(void)
{
	return (Size) flexmore_cache_size * 1024 * 1024;
}

void
fm_cache_shmem_request(void)
{
	if (flexmore_cache_size <= 0)
		return;
	RequestAddinShmemSpace(add_size(sizeof(fm_cache_control), fm_cache_arena_bytes()));
	RequestNamedLWLockTranche(FM_CACHE_TRANCHE, 1);
}

/*
 * Called in the postmaster at start and after every crash restart, so a
 * restart always begins with an empty cache.
 */
void
fm_cache_shmem_startup(void)
{
	bool		found;

	cache = NULL;
	arena = NULL;
	if (flexmore_cache_size <= 0)
		return;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	cache = ShmemInitStruct("flexmore cache", sizeof(fm_cache_control), &found);
	if (!found)
	{
		memset(cache, 0, sizeof(fm_cache_control));
		cache->lock = &(GetNamedLWLockTranche(FM_CACHE_TRANCHE))->lock;
		ConditionVariableInit(&cache->cv);
		cache->arena_bytes = fm_cache_arena_bytes();
		cache->n_free = 1;
		cache->free_list[0].offset = 0;
		cache->free_list[0].bytes = cache->arena_bytes;
	}
	arena = ShmemInitStruct("flexmore cache arena", fm_cache_arena_bytes(), &found);
	LWLockRelease(AddinShmemInitLock);
}

bool
fm_cache_enabled(void)
{
	return cache != NULL;
}

/* ---------- arena space (cache lock held exclusively) ---------- */

/* Takes bytes from the smallest free range that can contain them; false if none. */
static bool
extent_alloc(Size bytes, Size *offset)
{
	int			best = -1;

	for (int i = 0; i < cache->n_free; i++)
		if (cache->free_list[i].bytes >= bytes &&
			(best < 0 || cache->free_list[i].bytes < cache->free_list[best].bytes))
			best = i;
	if (best < 0)
		return false;

	*offset = cache->free_list[best].offset;
	cache->free_list[best].offset += bytes;
	cache->free_list[best].bytes -= bytes;
	if (cache->free_list[best].bytes == 0)
	{
		memmove(&cache->free_list[best], &cache->free_list[best + 1],
				sizeof(fm_cache_extent) * (cache->n_free - best - 1));
		cache->n_free--;
	}
	return true;
}

/* Returns a range to the free list, merging it with its neighbours. */
static void
extent_free(Size offset, Size bytes)
{
	int			i = 0;
	bool		merged_prev = false;

	while (i < cache->n_free && cache->free_list[i].offset < offset)
		i++;

	if (i > 0 && cache->free_list[i - 1].offset + cache->free_list[i - 1].bytes == offset)
	{
		cache->free_list[i - 1].bytes += bytes;
		merged_prev = true;
	}
	if (i < cache->n_free && offset + bytes == cache->free_list[i].offset)
	{
		if (merged_prev)
		{
			cache->free_list[i - 1].bytes += cache->free_list[i].bytes;
			memmove(&cache->free_list[i], &cache->free_list[i + 1],
					sizeof(fm_cache_extent) * (cache->n_free - i - 1));
			cache->n_free--;
		}
		else
		{
			cache->free_list[i].offset = offset;
			cache->free_list[i].bytes += bytes;
		}
		return;
	}
	if (merged_prev)
		return;

	/*
	 * Every free range lies between two items or at an end, so there are at
	 * most FM_CACHE_MAX_ITEMS + 1 of them and this never overflows.
	 */
	memmove(&cache->free_list[i + 1], &cache->free_list[i],
			sizeof(fm_cache_extent) * (cache->n_free - i));
	cache->free_list[i].offset = offset;
	cache->free_list[i].bytes = bytes;
	cache->n_free++;
}

/* Frees an item's space and its slot.  Cache lock held exclusively. */
static void
item_free(int slot)
{
	fm_cache_item *item = &cache->items[slot];

	extent_free(item->offset, item->bytes);
	memset(item, 0, sizeof(fm_cache_item));
	item->state = FM_ITEM_FREE;
	while (cache->high_water > 0 &&
		   cache->items[cache->high_water - 1].state == FM_ITEM_FREE)
		cache->high_water--;
}

/* Frees the least recently used READY item without pins; false if none. */
static bool
evict_one(void)
{
	int			victim = -1;

	for (int i = 0; i < cache->high_water; i++)
	{
		fm_cache_item *item = &cache->items[i];

		if (item->state == FM_ITEM_READY && item->pins == 0 &&
			(victim < 0 || item->last_tick < cache->items[victim].last_tick))
			victim = i;
	}
	if (victim < 0)
		return false;
	elog(DEBUG1, "flexmore: evicting %zu bytes of model \"%s\" from the cache",
		 cache->items[victim].bytes, cache->items[victim].model_name);
	item_free(victim);
	return true;
}

/*
 * Finds a free slot and bytes of arena space, evicting as needed.  Returns
 * the slot, or -1 when even evicting every unpinned item is not enough.
 */
static int
reserve(Size bytes, Size *offset)
{
	int			slot = -1;

	for (;;)
	{
		for (int i = 0; i < FM_CACHE_MAX_ITEMS && slot < 0; i++)
			if (cache->items[i].state == FM_ITEM_FREE)
				slot = i;
		if (slot >= 0)
			break;
		if (!evict_one())
			return -1;
	}
	while (!extent_alloc(bytes, offset))
		if (!evict_one())
			return -1;
	return slot;
}

static bool
key_equal(const fm_cache_key *a, const fm_cache_key *b)
{
	return a->dbid == b->dbid && a->model_id == b->model_id &&
		a->generation == b->generation && a->created == b->created &&
		a->expert == b->expert && a->kind == b->kind && a->format == b->format;
}

/* Not inlined: fm_cache_pin calls it inside PG_TRY, where gcc would warn. */
pg_noinline static int
find_item(const fm_cache_key *key)
{
	for (int i = 0; i < cache->high_water; i++)
		if (cache->items[i].state != FM_ITEM_FREE && key_equal(&cache->items[i].key, key))
			return i;
	return -1;
}

/* ---------- pins of this backend ---------- */

static void fm_cache_release_callback(ResourceReleasePhase phase, bool isCommit,
									  bool isTopLevel, void *arg);
static void fm_cache_exit(int code, Datum arg);
static void fm_cache_xact_callback(XactEvent event, void *arg);

static void
register_callbacks(void)
{
	if (callbacks_registered)
		return;
	RegisterResourceReleaseCallback(fm_cache_release_callback, NULL);
	RegisterXactCallback(fm_cache_xact_callback, NULL);
	before_shmem_exit(fm_cache_exit, (Datum) 0);
	callbacks_registered = true;
}

/* Records one pin of slot under the current resource owner. */
static void
local_pin_add(int slot)
{
	for (int i = 0; i < n_local_pins; i++)
		if (local_pins[i].slot == slot && local_pins[i].owner == CurrentResourceOwner)
		{
			local_pins[i].count++;
			return;
		}
	if (n_local_pins == max_local_pins)
	{
		int			new_max = Max(16, max_local_pins * 2);

		if (local_pins == NULL)
			local_pins = MemoryContextAlloc(TopMemoryContext, sizeof(fm_local_pin) * new_max);
		else
			local_pins = repalloc(local_pins, sizeof(fm_local_pin) * new_max);
		max_local_pins = new_max;
	}
	local_pins[n_local_pins].slot = slot;
	local_pins[n_local_pins].owner = CurrentResourceOwner;
	local_pins[n_local_pins].count = 1;
	n_local_pins++;
}

/* Drops count pins of an item.  Cache lock held exclusively. */
static void
item_unpin(int slot, int count)
{
	fm_cache_item *item = &cache->items[slot];

	Assert(item->pins >= count);
	item->pins -= count;
	if (item->pins == 0 && item->stale && item->state == FM_ITEM_READY)
		item_free(slot);
}

/*
 * Releases this backend's pins held by owner, or every pin when owner is
 * NULL.  Takes the cache lock; cannot fail.
 */
static void
release_local_pins(ResourceOwner owner, bool all)
{
	int			kept = 0;

	if (n_local_pins == 0)
		return;
	LWLockAcquire(cache->lock, LW_EXCLUSIVE);
	for (int i = 0; i < n_local_pins; i++)
	{
		if (all || local_pins[i].owner == owner)
			item_unpin(local_pins[i].slot, local_pins[i].count);
		else
			local_pins[kept++] = local_pins[i];
	}
	n_local_pins = kept;
	LWLockRelease(cache->lock);
}

/*
 * Releases the pins of a resource owner when it is released: at the end
 * of a statement or transaction, after an error too.  PostgreSQL makes
 * the owner being released the current one while it calls this.
 */
static void
fm_cache_release_callback(ResourceReleasePhase phase, bool isCommit,
						  bool isTopLevel, void *arg)
{
	if (phase != RESOURCE_RELEASE_AFTER_LOCKS || cache == NULL)
		return;
	release_local_pins(CurrentResourceOwner, false);
}

/* Frees the item this backend was filling and wakes its waiters. */
static void
abandon_loading(void)
{
	int			slot = loading_slot;

	if (slot < 0)
		return;
	loading_slot = -1;
	LWLockAcquire(cache->lock, LW_EXCLUSIVE);
	if (cache->items[slot].state == FM_ITEM_LOADING &&
		cache->items[slot].loader_pid == MyProcPid)
		item_free(slot);
	LWLockRelease(cache->lock);

	/* the loader's own pin went with the item */
	for (int i = 0; i < n_local_pins; i++)
		if (local_pins[i].slot == slot)
		{
			local_pins[i] = local_pins[--n_local_pins];
			break;
		}
	ConditionVariableBroadcast(&cache->cv);
}

/*
 * At backend exit (pg_terminate_backend, a FATAL error or a normal exit):
 * frees a half-loaded item and releases every pin.  It runs before the
 * transaction is aborted, but this backend never holds the cache lock
 * where an interrupt can be served, so taking it here cannot deadlock.
 */
static void
fm_cache_exit(int code, Datum arg)
{
	if (cache == NULL)
		return;
	if (LWLockHeldByMe(cache->lock))
		LWLockRelease(cache->lock);
	abandon_loading();
	release_local_pins(NULL, true);
}

/* ---------- pinning and loading ---------- */

static void
copy_name(char *dst, const char *src)
{
	strlcpy(dst, src != NULL ? src : "", NAMEDATALEN);
}

int
fm_cache_pin(const fm_cache_key *key, const char *model_name,
			 const char *expert_name, Size bytes, fm_cache_fill_fn fill,
			 void *arg, char **data)
{
	Size		need = TYPEALIGN(FM_CACHE_ALIGN, Max(bytes, 1));
	volatile Size offset = 0;	/* volatile: set before PG_TRY, read inside */
	volatile int slot;
	fm_cache_item *item;

	Assert(cache != NULL);
	if (CurrentResourceOwner == NULL)
		elog(ERROR, "flexmore cache pin without a resource owner");
	register_callbacks();

	for (;;)
	{
		LWLockAcquire(cache->lock, LW_EXCLUSIVE);
		slot = find_item(key);
		if (slot < 0 || cache->items[slot].state != FM_ITEM_LOADING)
			break;
		LWLockRelease(cache->lock);
		/* Returns at once the first time, then when a load ends; checks interrupts. */
		ConditionVariableSleep(&cache->cv, PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();

	if (slot >= 0)
	{
		item = &cache->items[slot];
		item->pins++;
		item->hits++;
		item->last_used = GetCurrentTimestamp();
		item->last_tick = ++cache->tick;
		*data = arena + item->offset;
		LWLockRelease(cache->lock);
		local_pin_add(slot);
		return slot;
	}
	if (fill == NULL)
	{
		LWLockRelease(cache->lock);
		return -1;
	}

	if (need > cache->arena_bytes)
	{
		Size		arena_bytes = cache->arena_bytes;

		LWLockRelease(cache->lock);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("%s of model \"%s\" needs %zu MB, more than the whole weight cache of %zu MB",
						key->kind == FM_CACHE_TOKENIZER ? "the tokenizer" :
						key->expert < 0 ? "the shared part" : psprintf("expert \"%s\"", expert_name),
						model_name, need >> 20, arena_bytes >> 20),
				 errhint("Raise flexmore.cache_size and restart the server.")));
	}

	{
		Size		reserved = 0;

		slot = reserve(need, &reserved);
		offset = reserved;
	}
	if (slot < 0)
	{
		Size		pinned = 0;
		int			users = 0;

		for (int i = 0; i < cache->high_water; i++)
			if (cache->items[i].state != FM_ITEM_FREE && cache->items[i].pins > 0)
			{
				pinned += cache->items[i].bytes;
				users += cache->items[i].pins;
			}
		LWLockRelease(cache->lock);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("no room in the weight cache for %zu MB of model \"%s\"",
						need >> 20, model_name),
				 errdetail("%zu MB of the cache's %zu MB hold items that running calls use (%d pins).",
						   pinned >> 20, cache->arena_bytes >> 20, users),
				 errhint("Raise flexmore.cache_size and restart the server, or retry when fewer calls run.")));
	}

	item = &cache->items[slot];
	memset(item, 0, sizeof(fm_cache_item));
	item->key = *key;
	item->state = FM_ITEM_LOADING;
	item->loader_pid = MyProcPid;
	item->offset = offset;
	item->bytes = need;
	item->pins = 1;
	item->last_used = GetCurrentTimestamp();
	item->last_tick = ++cache->tick;
	copy_name(item->model_name, model_name);
	copy_name(item->expert_name, expert_name);
	if (slot >= cache->high_water)
		cache->high_water = slot + 1;
	LWLockRelease(cache->lock);

	loading_slot = slot;
	local_pin_add(slot);
	PG_TRY();
	{
		fill(arg, arena + offset, need);
	}
	PG_CATCH();
	{
		abandon_loading();
		PG_RE_THROW();
	}
	PG_END_TRY();

	LWLockAcquire(cache->lock, LW_EXCLUSIVE);
	cache->items[slot].state = FM_ITEM_READY;
	cache->items[slot].loader_pid = 0;
	LWLockRelease(cache->lock);
	loading_slot = -1;
	ConditionVariableBroadcast(&cache->cv);

	*data = arena + offset;
	return slot;
}

Size
fm_cache_item_bytes(int slot)
{
	Size		bytes;

	/* a pinned item is never freed, so its size cannot change meanwhile */
	LWLockAcquire(cache->lock, LW_SHARED);
	bytes = cache->items[slot].bytes;
	LWLockRelease(cache->lock);
	return bytes;
}

bool
fm_cache_unpin_if_held(int slot, ResourceOwner owner)
{
	for (int i = 0; i < n_local_pins; i++)
		if (local_pins[i].slot == slot && local_pins[i].owner == owner)
		{
			LWLockAcquire(cache->lock, LW_EXCLUSIVE);
			item_unpin(slot, 1);
			LWLockRelease(cache->lock);
			if (--local_pins[i].count == 0)
				local_pins[i] = local_pins[--n_local_pins];
			return true;
		}
	return false;
}

void
fm_cache_unpin(int slot)
{
	int			found = -1;

	for (int i = 0; i < n_local_pins && found < 0; i++)
		if (local_pins[i].slot == slot && local_pins[i].owner == CurrentResourceOwner)
			found = i;
	for (int i = 0; i < n_local_pins && found < 0; i++)
		if (local_pins[i].slot == slot)
			found = i;
	if (found < 0)
		elog(ERROR, "flexmore cache item %d is not pinned by this backend", slot);

	LWLockAcquire(cache->lock, LW_EXCLUSIVE);
	item_unpin(slot, 1);
	LWLockRelease(cache->lock);
	if (--local_pins[found].count == 0)
		local_pins[found] = local_pins[--n_local_pins];
}

/* ---------- invalidation ---------- */

/* True when key a belongs to an older import than (id, generation, created). */
static bool
key_older(const fm_cache_key *a, int64 id, int64 generation, TimestampTz created)
{
	if (a->model_id != id)
		return a->model_id < id;
	if (a->generation != generation)
		return a->generation < generation;
	return a->created < created;
}

int
fm_cache_invalidate(const char *model_name, int64 keep_model_id,
					int64 keep_generation, TimestampTz keep_created)
{
	int			freed = 0;

	if (cache == NULL)
		return 0;
	LWLockAcquire(cache->lock, LW_EXCLUSIVE);
	for (int i = 0; i < cache->high_water; i++)
	{
		fm_cache_item *item = &cache->items[i];

		if (item->state == FM_ITEM_FREE || item->key.dbid != MyDatabaseId ||
			strncmp(item->model_name, model_name, NAMEDATALEN) != 0)
			continue;
		if (keep_model_id != 0 &&
			!key_older(&item->key, keep_model_id, keep_generation, keep_created))
			continue;
		if (item->state == FM_ITEM_READY && item->pins == 0)
		{
			item_free(i);
			freed++;
		}
		else
			item->stale = true;
	}
	LWLockRelease(cache->lock);
	return freed;
}

/*
 * Remembers that this transaction dropped or replaced the named model:
 * its cached items are invalidated at commit, and kept after a rollback.
 */
void
fm_cache_invalidate_at_commit(const char *model_name)
{
	MemoryContext old;

	if (cache == NULL)
		return;
	register_callbacks();
	old = MemoryContextSwitchTo(TopTransactionContext);
	pending_invalidations = lappend(pending_invalidations, pstrdup(model_name));
	MemoryContextSwitchTo(old);
}

static void
fm_cache_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;

	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			foreach(lc, pending_invalidations)
				fm_cache_invalidate((const char *) lfirst(lc), 0, 0, 0);
			pending_invalidations = NIL;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			pending_invalidations = NIL;
			break;
		default:
			break;
	}
}

/* ---------- SQL functions ---------- */

/*
 * flexmore_cache_entries() returns one row per item: database oid, model,
 * expert (NULL for the shared part and the tokenizer), bytes, generation,
 * state, users (pins), hits, last_used, kind ("weights" or "tokenizer"),
 * format (of weights items; NULL for the tokenizer).  The flexmore_cache view joins the database
 * name.  Returns no rows without the shared cache.
 */
Datum
flexmore_cache_entries(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	fm_cache_item *copy;
	int			n = 0;

	InitMaterializedSRF(fcinfo, 0);
	if (cache == NULL)
		return (Datum) 0;

	copy = palloc(sizeof(fm_cache_item) * FM_CACHE_MAX_ITEMS);
	LWLockAcquire(cache->lock, LW_SHARED);
	for (int i = 0; i < cache->high_water; i++)
		if (cache->items[i].state != FM_ITEM_FREE)
			copy[n++] = cache->items[i];
	LWLockRelease(cache->lock);

	for (int i = 0; i < n; i++)
	{
		Datum		values[11];
		bool		nulls[11] = {0};

		values[0] = ObjectIdGetDatum(copy[i].key.dbid);
		values[1] = CStringGetTextDatum(copy[i].model_name);
		if (copy[i].key.expert < 0)
			nulls[2] = true;
		else
			values[2] = CStringGetTextDatum(copy[i].expert_name);
		values[3] = Int64GetDatum((int64) copy[i].bytes);
		values[4] = Int64GetDatum(copy[i].key.generation);
		values[5] = CStringGetTextDatum(copy[i].state == FM_ITEM_LOADING ? "loading" :
										copy[i].stale ? "stale" : "ready");
		values[6] = Int32GetDatum(copy[i].pins);
		values[7] = Int64GetDatum(copy[i].hits);
		values[8] = TimestampTzGetDatum(copy[i].last_used);
		values[9] = CStringGetTextDatum(copy[i].key.kind == FM_CACHE_TOKENIZER ?
										"tokenizer" : "weights");
		if (copy[i].key.kind == FM_CACHE_TOKENIZER)
			nulls[10] = true;
		else
			values[10] = CStringGetTextDatum(fm_weight_format_name((fm_weight_format) copy[i].key.format));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	pfree(copy);
	return (Datum) 0;
}

/*
 * flexmore_cache_evict(model_name text) frees the cached items of the
 * model in this database, every generation, and returns how many were
 * freed.  Items that running calls pin are freed when those calls end.
 * Without the shared cache it drops this backend's private copy.
 */
Datum
flexmore_cache_evict(PG_FUNCTION_ARGS)
{
	char	   *model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));

	if (cache == NULL)
		PG_RETURN_INT32(fm_model_forget_private(model_name) ? 1 : 0);
	PG_RETURN_INT32(fm_cache_invalidate(model_name, 0, 0, 0));
}
