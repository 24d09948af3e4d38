/*-------------------------------------------------------------------------
 *
 * audit.c
 *	  The routing audit (flexmore_route) and the usage counters per
 *	  expert and role (the flexmore_expert_usage view).
 *
 * Both read the engine's routing report (fm_session_set_route_hook): for
 * every token row and layer, the experts the router chose and their
 * weights.  A call collects the report in an fm_route_tally and, when it
 * succeeds, adds to the counters of each expert it routed to: one call,
 * and the number of token positions that the expert received in at least
 * one layer.  The text of a call is never stored.
 *
 * With flexmore in shared_preload_libraries the counters live in shared
 * memory (FM_USAGE_MAX_ENTRIES entries, one LWLock of tranche
 * "flexmore_usage"), so every backend, a hot standby and a read-only
 * transaction count into the same table.  Without preloading each backend
 * counts into a table of its own, and the view shows only that backend's
 * calls.  Counters start at zero at server start and at
 * flexmore_expert_usage_reset(); nothing is written to disk.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include "import.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(flexmore_route);
PG_FUNCTION_INFO_V1(flexmore_expert_usage_entries);
PG_FUNCTION_INFO_V1(flexmore_expert_usage_reset);

#define FM_USAGE_MAX_ENTRIES	4096
#define FM_USAGE_TRANCHE		"flexmore_usage"

/* Counters of one (database, role, model, expert). */
typedef struct fm_usage_entry
{
	Oid			dbid;
	Oid			roleid;
	char		model[NAMEDATALEN];
	char		expert[NAMEDATALEN];
	int64		calls;
	int64		tokens;
	TimestampTz since;			/* first count after server start or reset */
} fm_usage_entry;

typedef struct fm_usage_table
{
	LWLock	   *lock;			/* NULL for a backend's private table */
	int32		n_entries;
	int64		dropped;		/* counts lost because the table was full */
	fm_usage_entry entries[FM_USAGE_MAX_ENTRIES];
} fm_usage_table;

static fm_usage_table *shared_usage = NULL;
static fm_usage_table *local_usage = NULL;
static bool full_warning_sent = false;

/* ---------- shared memory ---------- */

void
fm_usage_shmem_request(void)
{
	RequestAddinShmemSpace(sizeof(fm_usage_table));
	RequestNamedLWLockTranche(FM_USAGE_TRANCHE, 1);
}

void
fm_usage_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared_usage = ShmemInitStruct("flexmore expert usage", sizeof(fm_usage_table), &found);
	if (!found)
	{
		memset(shared_usage, 0, sizeof(fm_usage_table));
		shared_usage->lock = &(GetNamedLWLockTranche(FM_USAGE_TRANCHE))->lock;
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Returns the table this backend counts into, creating a private one without preloading. */
static fm_usage_table *
fm_usage_table_get(void)
{
	if (shared_usage != NULL)
		return shared_usage;
	if (local_usage == NULL)
		local_usage = MemoryContextAllocZero(TopMemoryContext, sizeof(fm_usage_table));
	return local_usage;
}

/* ---------- the routing report of one call ---------- */

/* The engine's routing report: counts positions per expert and keeps the rows when asked. */
static void
fm_tally_route(void *arg, int32_t row, int32_t seq, int32_t position, int32_t layer,
			   int32_t n, const int32_t *experts, const float *weights)
{
	fm_route_tally *t = (fm_route_tally *) arg;

	if (row < 0 || row >= FM_PROMPT_CHUNK)
		return;
	/* layer 0 of a row comes first, so it starts a new token position */
	if (layer == 0)
		memset(t->seen[row], 0, sizeof(t->seen[row]));
	for (int32_t j = 0; j < n; j++)
	{
		int32_t		e = experts[j];

		if (e < 0 || e >= t->num_experts)
			continue;
		if (!t->seen[row][e])
		{
			t->seen[row][e] = true;
			t->tokens[e]++;
		}
	}

	if (t->record_experts != NULL && seq == 0 && position < t->record_positions &&
		layer < t->record_layers)
	{
		size_t		at = ((size_t) position * t->record_layers + layer) * t->record_k;

		t->record_counts[(size_t) position * t->record_layers + layer] = Min(n, t->record_k);
		for (int32_t j = 0; j < n && j < t->record_k; j++)
		{
			t->record_experts[at + j] = experts[j];
			t->record_weights[at + j] = weights[j];
		}
	}
}

void
fm_usage_begin(fm_route_tally *tally, const fm_cached_model *entry)
{
	memset(tally, 0, sizeof(*tally));
	tally->num_experts = entry->num_experts;
}

void
fm_usage_attach(fm_route_tally *tally, fm_session *session)
{
	fm_session_set_route_hook(session, fm_tally_route, tally);
}

void
fm_usage_restart(fm_route_tally *tally)
{
	memset(tally->tokens, 0, sizeof(tally->tokens));
	memset(tally->seen, 0, sizeof(tally->seen));
}

void
fm_usage_merge(fm_route_tally *call, fm_route_tally *part)
{
	for (int e = 0; e < FM_MAX_EXPERTS; e++)
		call->tokens[e] += part->tokens[e];
	fm_usage_restart(part);
}

/* Finds or adds the entry of one key; NULL when the table is full.  Lock held. */
static fm_usage_entry *
fm_usage_find(fm_usage_table *table, Oid roleid, const char *model, const char *expert,
			  bool create)
{
	fm_usage_entry *u;

	for (int i = 0; i < table->n_entries; i++)
	{
		u = &table->entries[i];
		if (u->dbid == MyDatabaseId && u->roleid == roleid &&
			strcmp(u->model, model) == 0 && strcmp(u->expert, expert) == 0)
			return u;
	}
	if (!create || table->n_entries >= FM_USAGE_MAX_ENTRIES)
		return NULL;
	u = &table->entries[table->n_entries++];
	memset(u, 0, sizeof(*u));
	u->dbid = MyDatabaseId;
	u->roleid = roleid;
	strlcpy(u->model, model, NAMEDATALEN);
	strlcpy(u->expert, expert, NAMEDATALEN);
	u->since = GetCurrentTimestamp();
	return u;
}

void
fm_usage_commit(const fm_route_tally *tally, const fm_cached_model *entry)
{
	fm_usage_table *table = fm_usage_table_get();
	Oid			roleid = GetUserId();
	bool		full = false;

	if (table->lock != NULL)
		LWLockAcquire(table->lock, LW_EXCLUSIVE);
	for (int e = 0; e < tally->num_experts && e < entry->num_experts; e++)
	{
		fm_usage_entry *u;

		if (tally->tokens[e] == 0)
			continue;
		u = fm_usage_find(table, roleid, entry->name, entry->expert_names[e], true);
		if (u == NULL)
		{
			table->dropped += tally->tokens[e];
			full = true;
			continue;
		}
		u->calls++;
		u->tokens += tally->tokens[e];
	}
	if (table->lock != NULL)
		LWLockRelease(table->lock);

	if (full && !full_warning_sent)
	{
		ereport(WARNING,
				(errmsg("the flexmore expert usage table is full, so usage of model \"%s\" was not counted",
						entry->name),
				 errdetail("The table holds %d entries of database, role, model and expert.",
						   FM_USAGE_MAX_ENTRIES),
				 errhint("Read the flexmore_expert_usage view, then call flexmore_expert_usage_reset().")));
		full_warning_sent = true;
	}
}

/* ---------- SQL functions ---------- */

/*
 * flexmore_expert_usage_entries() returns the counters of every database
 * (dbid, model, expert, roleid, calls, tokens, since), for the
 * flexmore_expert_usage view.
 */
Datum
flexmore_expert_usage_entries(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	fm_usage_table *table = fm_usage_table_get();
	fm_usage_entry *copy;
	int			n;

	InitMaterializedSRF(fcinfo, 0);

	/* copy under the lock, build the rows without it */
	if (table->lock != NULL)
		LWLockAcquire(table->lock, LW_SHARED);
	n = table->n_entries;
	copy = palloc(sizeof(fm_usage_entry) * Max(n, 1));
	memcpy(copy, table->entries, sizeof(fm_usage_entry) * n);
	if (table->lock != NULL)
		LWLockRelease(table->lock);

	for (int i = 0; i < n; i++)
	{
		Datum		values[7];
		bool		nulls[7] = {false, false, false, false, false, false, false};

		values[0] = ObjectIdGetDatum(copy[i].dbid);
		values[1] = CStringGetTextDatum(copy[i].model);
		values[2] = CStringGetTextDatum(copy[i].expert);
		values[3] = ObjectIdGetDatum(copy[i].roleid);
		values[4] = Int64GetDatum(copy[i].calls);
		values[5] = Int64GetDatum(copy[i].tokens);
		values[6] = TimestampTzGetDatum(copy[i].since);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* flexmore_expert_usage_reset() empties the counters of every database. */
Datum
flexmore_expert_usage_reset(PG_FUNCTION_ARGS)
{
	fm_usage_table *table = fm_usage_table_get();

	fm_check_admin("reset the expert usage counters");
	if (table->lock != NULL)
		LWLockAcquire(table->lock, LW_EXCLUSIVE);
	table->n_entries = 0;
	table->dropped = 0;
	if (table->lock != NULL)
		LWLockRelease(table->lock);
	full_warning_sent = false;
	PG_RETURN_VOID();
}

/*
 * flexmore_route(model_name text, input text, experts text[]) returns one
 * row per token position and layer of input.  A row has the position and
 * layer (both from 0), token_id, token (the id decoded alone), and the
 * experts the router chose with their routing weights, highest weight
 * first.  The experts are those the call may use, as for flexmore_logits.
 */
Datum
flexmore_route(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *model_name;
	fm_cached_model *entry;
	int32	   *ids;
	int			n;
	bool		allowed[FM_MAX_EXPERTS];
	int32		layers;
	int32		k;
	MemoryContext call_cxt;
	fm_allocator a;
	fm_session *session;
	fm_route_tally tally;
	fm_status	status;
	fm_error	err = {0};

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		return (Datum) 0;
	model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));

	entry = fm_model_get(model_name, false);
	ids = fm_encode_prompt(entry, PG_GETARG_TEXT_PP(1), "input", &n);
	if (n == 0)
		return (Datum) 0;
	fm_call_experts_mask(entry, PG_ARGISNULL(2) ? NULL : PG_GETARG_ARRAYTYPE_P(2), allowed);
	fm_model_use_weights(entry, allowed);

	layers = entry->model.config.num_hidden_layers;
	k = entry->model.config.num_experts_per_tok;
	fm_usage_begin(&tally, entry);
	tally.record_positions = n;
	tally.record_layers = layers;
	tally.record_k = k;
	tally.record_experts = palloc0(sizeof(int32) * (size_t) n * layers * k);
	tally.record_weights = palloc0(sizeof(float) * (size_t) n * layers * k);
	tally.record_counts = palloc0(sizeof(int32) * (size_t) n * layers);

	call_cxt = AllocSetContextCreate(CurrentMemoryContext, "flexmore call",
									 ALLOCSET_DEFAULT_SIZES);
	fm_allocator_init(&a, call_cxt);
	session = fm_call_create_session(entry, &a, n, allowed);
	fm_usage_attach(&tally, session);
	for (;;)
	{
		status = fm_forward(session, ids, n, NULL, fm_interrupt_pending, NULL, &err);
		if (status != FM_ECANCELED)
			break;
		CHECK_FOR_INTERRUPTS();
		fm_session_reset(session);
		fm_usage_restart(&tally);
	}
	if (status != FM_OK)
		fm_raise(&err, psprintf("model \"%s\"", model_name));
	fm_session_destroy(session);
	MemoryContextDelete(call_cxt);
	fm_model_release(entry);
	fm_usage_commit(&tally, entry);

	for (int p = 0; p < n; p++)
	{
		text	   *token = fm_decode_ids(entry, &ids[p], 1);

		for (int32 l = 0; l < layers; l++)
		{
			size_t		cell = (size_t) p * layers + l;
			int32		count = tally.record_counts[cell];
			Datum	   *names = palloc(sizeof(Datum) * Max(count, 1));
			Datum	   *weights = palloc(sizeof(Datum) * Max(count, 1));
			Datum		values[6];
			bool		nulls[6] = {false, false, false, false, false, false};

			for (int32 j = 0; j < count; j++)
			{
				names[j] = CStringGetTextDatum(entry->expert_names[tally.record_experts[cell * k + j]]);
				weights[j] = Float4GetDatum(tally.record_weights[cell * k + j]);
			}
			values[0] = Int32GetDatum(p);
			values[1] = Int32GetDatum(ids[p]);
			values[2] = PointerGetDatum(token);
			values[3] = Int32GetDatum(l);
			values[4] = PointerGetDatum(construct_array(names, count, TEXTOID, -1, false,
														TYPALIGN_INT));
			values[5] = PointerGetDatum(construct_array(weights, count, FLOAT4OID,
														sizeof(float4), true, TYPALIGN_INT));
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
			pfree(names);
			pfree(weights);
		}
	}
	return (Datum) 0;
}
