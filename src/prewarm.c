/*-------------------------------------------------------------------------
 *
 * prewarm.c
 *	  Background workers that load the models of flexmore.prewarm into the
 *	  shared weight cache at server start.
 *
 * flexmore.prewarm lists database.model entries, split at the first dot,
 * so a database name must not contain one.  A background worker connects
 * to one database for its whole life, so _PG_init registers one worker
 * per distinct database (each takes a max_worker_processes slot until it
 * exits).  Each worker loads its models one by one, each in its own
 * transaction, as the bootstrap superuser; a model that fails to load
 * (missing, or no room in the cache) is logged and skipped.  The workers
 * start once the server accepts read-only connections, so prewarming also
 * works on a hot standby, and are never restarted.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include "access/xact.h"
#include "cache.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "tcop/tcopprot.h"
#include "utils/snapmgr.h"

PGDLLEXPORT void fm_prewarm_main(Datum arg);

/*
 * Calls fn for every database.model entry of flexmore.prewarm, with both
 * parts NUL-terminated in a palloc'd copy.  Entries without a dot are
 * logged and skipped.
 */
static void
fm_prewarm_each(void (*fn) (const char *db, const char *model, void *arg), void *arg)
{
	char	   *list;
	char	   *save = NULL;

	if (flexmore_prewarm == NULL || flexmore_prewarm[0] == '\0')
		return;
	list = pstrdup(flexmore_prewarm);
	for (char *tok = strtok_r(list, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save))
	{
		char	   *end;
		char	   *dot;

		while (*tok == ' ' || *tok == '\t')
			tok++;
		end = tok + strlen(tok);
		while (end > tok && (end[-1] == ' ' || end[-1] == '\t'))
			*--end = '\0';
		if (*tok == '\0')
			continue;
		dot = strchr(tok, '.');
		if (dot == NULL || dot == tok || dot[1] == '\0')
		{
			ereport(LOG,
					(errmsg("flexmore.prewarm entry \"%s\" is not of the form database.model, so it is skipped",
							tok)));
			continue;
		}
		*dot = '\0';
		fn(tok, dot + 1, arg);
	}
	pfree(list);
}

typedef struct fm_prewarm_dbs
{
	List	   *names;
} fm_prewarm_dbs;

/* Registers a worker for db unless one is registered already. */
static void
fm_prewarm_register_db(const char *db, const char *model, void *arg)
{
	fm_prewarm_dbs *dbs = (fm_prewarm_dbs *) arg;
	BackgroundWorker worker;
	ListCell   *lc;

	foreach(lc, dbs->names)
		if (strcmp((const char *) lfirst(lc), db) == 0)
			return;
	if (strlen(db) >= BGW_EXTRALEN)
	{
		ereport(LOG,
				(errmsg("flexmore.prewarm database name \"%s\" is longer than %d bytes, so it is skipped",
						db, BGW_EXTRALEN - 1)));
		return;
	}
	dbs->names = lappend(dbs->names, pstrdup(db));

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_ConsistentState;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "flexmore", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "fm_prewarm_main", BGW_MAXLEN);
	snprintf(worker.bgw_name, BGW_MAXLEN, "flexmore prewarm %s", db);
	strlcpy(worker.bgw_type, "flexmore prewarm", BGW_MAXLEN);
	strlcpy(worker.bgw_extra, db, BGW_EXTRALEN);
	RegisterBackgroundWorker(&worker);
}

void
fm_prewarm_register(void)
{
	fm_prewarm_dbs dbs = {NIL};

	if (flexmore_cache_size <= 0)
		return;
	fm_prewarm_each(fm_prewarm_register_db, &dbs);
}

/* Loads one model in its own transaction, logging instead of raising errors. */
static void
fm_prewarm_model(const char *db, const char *model, void *arg)
{
	const char *my_db = (const char *) arg;
	MemoryContext cxt = CurrentMemoryContext;

	if (strcmp(db, my_db) != 0)
		return;

	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	PG_TRY();
	{
		fm_cached_model *entry;

		pgstat_report_activity(STATE_RUNNING, model);
		entry = fm_model_get(model, false);
		fm_model_use_weights(entry, NULL);
		fm_model_release(entry);
		ereport(LOG,
				(errmsg("flexmore prewarm loaded model \"%s\" of database \"%s\"", model, db)));
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		EmitErrorReport();
		FlushErrorState();
		AbortCurrentTransaction();
		ereport(LOG,
				(errmsg("flexmore prewarm skipped model \"%s\" of database \"%s\" after the error above",
						model, db)));
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* Entry point of a prewarm worker; bgw_extra contains its database name. */
void
fm_prewarm_main(Datum arg)
{
	char		db[BGW_EXTRALEN];

	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	strlcpy(db, MyBgworkerEntry->bgw_extra, sizeof(db));
	BackgroundWorkerInitializeConnection(db, NULL, 0);
	fm_prewarm_each(fm_prewarm_model, db);
	proc_exit(0);
}
