/*-------------------------------------------------------------------------
 *
 * import_lo.c
 *	  flexmore_import_lo: imports a checkpoint whose files are large
 *	  objects, and the large-object source that the client command
 *	  flexmore-import and flexmore_add_expert_lo use.
 *
 * The caller names each file of the checkpoint by its large object, as a
 * jsonb object {"config.json": oid, "model.safetensors": oid, ...}.  Keys
 * are the file names a checkpoint directory would have; keys the import
 * does not need (generation_config.json, say) are ignored.  The large
 * objects are read with the caller's privileges, so a role can import
 * only large objects it may read, and they are left in place: the caller
 * unlinks them, normally in the same transaction.
 *
 *-------------------------------------------------------------------------
 */
#include "import.h"

#include "catalog/pg_largeobject.h"
#include "fmgr.h"
#include "libpq/be-fsstubs.h"
#include "libpq/libpq-fs.h"
#include "miscadmin.h"
#include "storage/large_object.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/snapmgr.h"

PG_FUNCTION_INFO_V1(flexmore_import_lo);

/* The checkpoint's file names and their large objects. */
typedef struct fm_lo_files
{
	Oid			user;			/* whose privileges apply to the large objects */
	int			n;
	char	  **names;
	Oid		   *oids;
} fm_lo_files;

static Oid
fm_lo_lookup(fm_import_source *src, const char *name)
{
	fm_lo_files *files = src->arg;

	for (int i = 0; i < files->n; i++)
		if (strcmp(files->names[i], name) == 0)
			return files->oids[i];
	return InvalidOid;
}

static bool
fm_lo_exists(fm_import_source *src, const char *name)
{
	return OidIsValid(fm_lo_lookup(src, name));
}

static char *
fm_lo_label(fm_import_source *src, const char *name)
{
	return pstrdup(name);
}

/* An open large object: a descriptor of the backend's large-object table. */
typedef struct fm_lo_handle
{
	Oid			oid;
	int			fd;
} fm_lo_handle;

/*
 * Opens the large object of a file through the lo_open interface, which
 * also closes it, and its catalog relations, at the end of the
 * transaction if an error comes first.
 */
static void *
fm_lo_open(fm_import_source *src, const char *name, uint64 *size)
{
	Oid			oid = fm_lo_lookup(src, name);
	fm_lo_handle *h = palloc(sizeof(fm_lo_handle));

	if (!OidIsValid(oid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FILE),
				 errmsg("could not open file \"%s\": the files argument names no large object for it",
						name)));
	if (!LargeObjectExists(oid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("large object %u for file \"%s\" does not exist", oid, name)));
	if (!lo_compat_privileges &&
		pg_largeobject_aclcheck_snapshot(oid, ((fm_lo_files *) src->arg)->user, ACL_SELECT, NULL) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for large object %u (file \"%s\")", oid, name)));

	/*
	 * inv_open reads through the active snapshot.  A copy with the current
	 * command id also shows large objects that this same statement wrote,
	 * as in SELECT flexmore_import_lo(..., jsonb_build_object(..., lo_import(...))).
	 */
	PushCopiedSnapshot(GetActiveSnapshot());
	UpdateActiveSnapshotCommandId();
	h->oid = oid;
	h->fd = DatumGetInt32(DirectFunctionCall2(be_lo_open, ObjectIdGetDatum(oid),
											  Int32GetDatum(INV_READ)));
	PopActiveSnapshot();
	*size = (uint64) DatumGetInt64(DirectFunctionCall3(be_lo_lseek64, Int32GetDatum(h->fd),
													   Int64GetDatum(0),
													   Int32GetDatum(SEEK_END)));
	return h;
}

/* Reads exactly len bytes at offset, raising an error on a short read. */
static void
fm_lo_read(void *handle, const char *label, char *buf, size_t len, uint64 offset)
{
	fm_lo_handle *h = handle;
	size_t		done = 0;

	DirectFunctionCall3(be_lo_lseek64, Int32GetDatum(h->fd), Int64GetDatum((int64) offset),
						Int32GetDatum(SEEK_SET));
	while (done < len)
	{
		int			want = (int) Min(len - done, (size_t) 1 << 30);
		int			got = lo_read(h->fd, buf + done, want);

		if (got <= 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("could not read file \"%s\": read %zu of %zu bytes at offset " UINT64_FORMAT " of large object %u",
							label, done, len, offset, h->oid)));
		done += got;
	}
}

static void
fm_lo_close(void *handle)
{
	fm_lo_handle *h = handle;

	DirectFunctionCall1(be_lo_close, Int32GetDatum(h->fd));
	pfree(h);
}

/* Parses one jsonb value as a large object OID: a number or a string of digits. */
static Oid
fm_lo_parse_oid(const char *key, const JsonbValue *v)
{
	char	   *text;
	char	   *end;
	unsigned long value;

	if (v->type == jbvNumeric)
		text = DatumGetCString(DirectFunctionCall1(numeric_out,
												   NumericGetDatum(v->val.numeric)));
	else if (v->type == jbvString)
		text = pnstrdup(v->val.string.val, v->val.string.len);
	else
		text = NULL;

	if (text != NULL && text[0] >= '0' && text[0] <= '9')
	{
		errno = 0;
		value = strtoul(text, &end, 10);
		if (errno == 0 && *end == '\0' && value > 0 && value <= PG_UINT32_MAX)
			return (Oid) value;
	}
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("files entry \"%s\" is not a large object OID", key),
			 errhint("Pass {\"file name\": oid, ...}, with the OIDs that lo_import or lo_create returned.")));
	return InvalidOid;			/* keep compiler quiet */
}

void
fm_import_source_lo(fm_import_source *src, Jsonb *files_arg)
{
	fm_lo_files *files = palloc0(sizeof(fm_lo_files));
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken r;
	int			cap;

	if (!JB_ROOT_IS_OBJECT(files_arg) || JB_ROOT_IS_SCALAR(files_arg))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("files must be a jsonb object mapping file names to large object OIDs")));

	/*
	 * Remember the caller: the store phase runs as the extension owner,
	 * but reads only what the caller may read.
	 */
	files->user = GetUserId();
	cap = Max(JB_ROOT_COUNT(files_arg), 1);
	files->names = palloc(sizeof(char *) * cap);
	files->oids = palloc(sizeof(Oid) * cap);
	it = JsonbIteratorInit(&files_arg->root);
	while ((r = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		char	   *key;

		if (r != WJB_KEY)
			continue;
		key = pnstrdup(v.val.string.val, v.val.string.len);
		r = JsonbIteratorNext(&it, &v, true);
		Assert(r == WJB_VALUE);
		files->names[files->n] = key;
		files->oids[files->n] = fm_lo_parse_oid(key, &v);
		files->n++;
	}

	memset(src, 0, sizeof(*src));
	src->exists = fm_lo_exists;
	src->open = fm_lo_open;
	src->read = fm_lo_read;
	src->close = fm_lo_close;
	src->label = fm_lo_label;
	src->description = "checkpoint in large objects";
	src->arg = files;
}

/*
 * flexmore_import_lo(model_name text, files jsonb, replace boolean)
 * returns the new model's id.
 */
Datum
flexmore_import_lo(PG_FUNCTION_ARGS)
{
	char	   *model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	Jsonb	   *files = PG_GETARG_JSONB_P(1);
	bool		replace = PG_GETARG_BOOL(2);
	fm_import_source src;
	fm_import_state state;

	PreventCommandIfReadOnly("flexmore_import_lo()");
	fm_check_admin("import a model");
	fm_check_model_name(model_name);
	fm_import_source_lo(&src, files);

	memset(&state, 0, sizeof(state));
	state.model_name = model_name;
	state.src = &src;
	fm_import_validate(&state, true);
	PG_RETURN_INT64(fm_import_store_as_owner(&state, replace));
}
