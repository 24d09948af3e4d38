/*-------------------------------------------------------------------------
 *
 * flexmore.c
 *	  Module initialisation, settings and the helpers every flexmore SQL
 *	  function uses: raising engine errors, memory-context allocation for
 *	  the engine, interrupts, running as the extension owner, and text
 *	  encoding at the SQL boundary.
 *
 * The engine reports failure as an fm_error and never longjmps, so every
 * engine call here is followed by a status check that raises the error
 * through fm_raise.  The tokenizer works in UTF-8; text enters and leaves
 * SQL in the database encoding.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include "cache.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/namespace.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/fmgroids.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "storage/ipc.h"

PG_MODULE_MAGIC;

int			flexmore_max_context = 4096;
int			flexmore_max_call_memory = 1024 * 1024;	/* kB, so 1 GB */
int			flexmore_cache_size = 1024; /* MB */
char	   *flexmore_prewarm = NULL;
int			flexmore_threads = 1;
int			flexmore_weight_format = FM_WEIGHTS_F32;
int			flexmore_max_total_threads = 0;

static const struct config_enum_entry weight_format_options[] = {
	{"f32", FM_WEIGHTS_F32, false},
	{"bf16", FM_WEIGHTS_BF16, false},
	{"q8", FM_WEIGHTS_Q8, false},
	{NULL, 0, false}
};

void		_PG_init(void);

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void
fm_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	fm_cache_shmem_request();
	fm_usage_shmem_request();
	fm_threads_shmem_request();
}

static void
fm_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	fm_cache_shmem_startup();
	fm_usage_shmem_startup();
	fm_threads_shmem_startup();
}

static void
fm_assign_threads(int newval, void *extra)
{
	fm_blas_set_threads(newval);
}

/*
 * Defines the settings.  Loaded through shared_preload_libraries, it also
 * reserves the shared weight cache and registers the prewarm workers.
 * Nothing here starts a thread: this runs in the postmaster, which forks
 * every backend and must stay single-threaded (see src/blas.c).
 */
void
_PG_init(void)
{
	DefineCustomIntVariable("flexmore.max_context",
							"Maximum number of context tokens (prompt plus completion) per call.",
							"The model's max_position_embeddings also caps the context.",
							&flexmore_max_context,
							4096, 1, 1024 * 1024,
							PGC_USERSET, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("flexmore.max_call_memory",
							"Maximum memory one call may use for its KV cache and activations.",
							"Weights are not counted: each backend holds them once per model.",
							&flexmore_max_call_memory,
							1024 * 1024, 64, INT_MAX,
							PGC_SUSET, GUC_UNIT_KB,
							NULL, NULL, NULL);

	/* flexmore.admin_role, defined with the import code */
	fm_import_define_settings();

	/* flexmore.expert_access, defined with the governance code */
	fm_governance_define_settings();

	DefineCustomIntVariable("flexmore.threads",
							"Compute threads per backend for the forward pass.",
							"Every connection running a model uses up to this many cores.",
							&flexmore_threads,
							1, 1, FM_MAX_THREADS,
							PGC_SUSET, 0,
							NULL, fm_assign_threads, NULL);

	DefineCustomEnumVariable("flexmore.weight_format",
							 "Format of the weight matrices a call computes with: f32, bf16 or q8.",
							 "Weights are converted from the stored tensors when loaded; each format is cached separately. bf16 needs 2 and q8 about 1.06 bytes per weight against 4 for f32, at a small loss of accuracy.",
							 &flexmore_weight_format,
							 FM_WEIGHTS_F32, weight_format_options,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("flexmore.max_total_threads",
							"Maximum compute threads of all running flexmore calls together; 0 means no limit.",
							"Needs flexmore in shared_preload_libraries. A call always gets at least its own backend's thread.",
							&flexmore_max_total_threads,
							0, 0, 1024 * 1024,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	/*
	 * NB: PostgreSQL raises FATAL when a PGC_POSTMASTER setting is defined
	 * after start-up, so the cache settings exist only with preloading.
	 */
	if (!process_shared_preload_libraries_in_progress)
	{
		MarkGUCPrefixReserved("flexmore");
		return;
	}

	DefineCustomIntVariable("flexmore.cache_size",
							"Size of the shared-memory weight cache.",
							"Reserved at server start when flexmore is in shared_preload_libraries; 0 turns the shared cache off.",
							&flexmore_cache_size,
							1024, 0, INT_MAX / 2,
							PGC_POSTMASTER, GUC_UNIT_MB,
							NULL, NULL, NULL);

	DefineCustomStringVariable("flexmore.prewarm",
							   "Models loaded into the shared weight cache at server start.",
							   "A comma-separated list of database.model entries.",
							   &flexmore_prewarm,
							   "",
							   PGC_POSTMASTER, 0,
							   NULL, NULL, NULL);

	MarkGUCPrefixReserved("flexmore");

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = fm_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = fm_shmem_startup;
	fm_prewarm_register();
}

/* Maps an engine status to the SQLSTATE raised to the client. */
static int
fm_status_errcode(fm_status status)
{
	switch (status)
	{
		case FM_EINVAL:
			return ERRCODE_INVALID_PARAMETER_VALUE;
		case FM_EUNSUPPORTED:
			return ERRCODE_FEATURE_NOT_SUPPORTED;
		case FM_ELIMIT:
			return ERRCODE_PROGRAM_LIMIT_EXCEEDED;
		case FM_ENOMEM:
			return ERRCODE_OUT_OF_MEMORY;
		case FM_ECANCELED:
			return ERRCODE_QUERY_CANCELED;
		case FM_OK:
		case FM_EINTERNAL:
			break;
	}
	return ERRCODE_INTERNAL_ERROR;
}

void
fm_raise(const fm_error *err, const char *what)
{
	if (err->status == FM_OK || err->status == FM_EINTERNAL)
		elog(ERROR, "flexmore internal error (status %d): %s",
			 (int) err->status, err->message);

	if (what != NULL)
		ereport(ERROR,
				(errcode(fm_status_errcode(err->status)),
				 errmsg("%s: %s", what, err->message)));
	ereport(ERROR,
			(errcode(fm_status_errcode(err->status)),
			 errmsg("%s", err->message)));
}

/* ---------- allocation ---------- */

static void *
fm_context_alloc(void *context, size_t size)
{
	return MemoryContextAllocExtended((MemoryContext) context, size,
									  MCXT_ALLOC_HUGE | MCXT_ALLOC_NO_OOM);
}

static void
fm_context_free(void *context, void *ptr)
{
	if (ptr != NULL)
		pfree(ptr);
}

void
fm_allocator_init(fm_allocator *a, MemoryContext cxt)
{
	a->alloc = fm_context_alloc;
	a->free = fm_context_free;
	a->context = cxt;
}

/* ---------- interrupts ---------- */

bool
fm_interrupt_pending(void *arg)
{
	return InterruptPending;
}

/* ---------- running as the extension owner ---------- */

/* Looks up the role that owns the flexmore extension. */
static Oid
fm_extension_owner(void)
{
	Oid			extoid = get_extension_oid("flexmore", false);
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	Oid			owner;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(extoid));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "could not find extension flexmore (oid %u)", extoid);
	owner = ((Form_pg_extension) GETSTRUCT(tuple))->extowner;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return owner;
}

/*
 * The switch is a local user change inside a security-restricted
 * operation, as for the owner of a maintenance command: the caller's role
 * stays the session user, and nothing that runs meanwhile can change
 * settings that outlive the call.
 */
void
fm_switch_to_owner(fm_user_switch *sw)
{
	Oid			owner = fm_extension_owner();

	GetUserIdAndSecContext(&sw->saved_user, &sw->saved_sec_context);
	SetUserIdAndSecContext(owner,
						   sw->saved_sec_context |
						   SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
}

void
fm_restore_user(const fm_user_switch *sw)
{
	SetUserIdAndSecContext(sw->saved_user, sw->saved_sec_context);
}

/* ---------- text encoding ---------- */

char *
fm_text_to_utf8(const char *s, int len, int *out_len)
{
	char	   *utf8;

	utf8 = pg_server_to_any(s, len, PG_UTF8);
	if (utf8 == s)
	{
		/* No conversion happened: SQL_ASCII or UTF8 database. */
		utf8 = palloc(len + 1);
		memcpy(utf8, s, len);
		utf8[len] = '\0';
	}
	else
		len = strlen(utf8);

	if (!pg_verify_mbstr(PG_UTF8, utf8, len, true))
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("input text is not valid UTF-8"),
				 errdetail("A SQL_ASCII database passes bytes through unchanged, and the tokenizer needs UTF-8.")));
	*out_len = len;
	return utf8;
}

/*
 * Returns the length of the valid UTF-8 character at s (at most avail
 * bytes), or 0 when the bytes there are not one; *truncated is set when
 * they are a valid start cut short by the end of the buffer.
 */
static int
fm_utf8_char_len(const unsigned char *s, size_t avail, bool *truncated)
{
	int			n = pg_utf_mblen(s);

	*truncated = false;
	if (s[0] == 0 || (s[0] & 0xc0) == 0x80 || s[0] >= 0xf8)
		return 0;
	if ((size_t) n > avail)
	{
		unsigned char buf[4];

		/* Pad with a continuation byte to test whether the start is legal. */
		memset(buf, 0x80, sizeof(buf));
		memcpy(buf, s, avail);
		*truncated = pg_utf8_islegal(buf, n);
		return 0;
	}
	return pg_utf8_islegal(s, n) ? n : 0;
}

/*
 * Appends UTF-8 to buf in the database encoding.  A character with no
 * equivalent there becomes '?', so generated text never raises an
 * encoding error.
 */
static void
fm_append_converted(StringInfo buf, const char *s, int len)
{
	int			dbenc = GetDatabaseEncoding();
	Oid			proc;
	unsigned char *dst;

	if (dbenc == PG_UTF8 || dbenc == PG_SQL_ASCII)
	{
		appendBinaryStringInfo(buf, s, len);
		return;
	}

	proc = FindDefaultConversionProc(PG_UTF8, dbenc);
	if (!OidIsValid(proc))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("default conversion function for encoding \"%s\" to \"%s\" does not exist",
						"UTF8", GetDatabaseEncodingName())));

	dst = palloc((Size) len * MAX_CONVERSION_GROWTH + 1);
	while (len > 0)
	{
		int			done;
		bool		truncated;
		int			skip;

		done = pg_do_encoding_conversion_buf(proc, PG_UTF8, dbenc,
											 (unsigned char *) s, len,
											 dst, len * MAX_CONVERSION_GROWTH + 1,
											 true);
		appendStringInfoString(buf, (char *) dst);
		s += done;
		len -= done;
		if (len == 0)
			break;

		/* The input is valid UTF-8, so what stopped conversion is one character. */
		skip = fm_utf8_char_len((const unsigned char *) s, len, &truncated);
		if (skip == 0)
			skip = 1;
		appendStringInfoChar(buf, '?');
		s += skip;
		len -= skip;
	}
	pfree(dst);
}

text *
fm_utf8_to_text(const char *s, size_t len)
{
	StringInfoData clean;
	StringInfoData out;
	const unsigned char *p = (const unsigned char *) s;
	size_t		i = 0;
	text	   *result;

	/* First make the bytes valid UTF-8 without NULs. */
	initStringInfo(&clean);
	while (i < len)
	{
		bool		truncated;
		int			n = fm_utf8_char_len(p + i, len - i, &truncated);

		if (n > 0)
		{
			appendBinaryStringInfo(&clean, s + i, n);
			i += n;
		}
		else if (truncated)
			break;				/* a character cut at the end: drop it */
		else
		{
			appendStringInfoString(&clean, "\xef\xbf\xbd");	/* U+FFFD */
			i++;
		}
	}

	initStringInfo(&out);
	fm_append_converted(&out, clean.data, clean.len);
	result = cstring_to_text_with_len(out.data, out.len);
	pfree(clean.data);
	pfree(out.data);
	return result;
}

const char *
fm_quote_name(const char *name)
{
	int			len = strlen(name);
	int			keep;

	if (len < NAMEDATALEN)
		return name;
	keep = pg_mbcliplen(name, len, NAMEDATALEN - 1);
	return psprintf("%.*s...", keep, name);
}
