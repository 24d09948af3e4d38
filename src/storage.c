/*-------------------------------------------------------------------------
 *
 * storage.c
 *	  Reads and writes the tables in schema flexmore through SPI.
 *
 * Every function here expects an open SPI connection and runs its queries
 * as whatever user is current; the callers switch to the extension owner
 * first (fm_switch_to_owner), because the tables grant nothing to PUBLIC.
 * Reads run read-only, so the inference paths work in read-only
 * transactions and on hot standbys.
 *
 * Tensor data is split into chunks of at most FM_CHUNK_RAW_MAX raw bytes.
 * Each stored chunk is an fm_chunk_header followed by the payload, which
 * is zstd-compressed when that saves at least a tenth of the raw size.
 * The header fields are little-endian and checked on every read.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include <zstd.h>

#include "catalog/pg_type.h"
#include "common/cryptohash.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

/* zstd level 3 (its default) compresses at hundreds of MB/s per core. */
#define FM_ZSTD_LEVEL 3

/* Runs a query with parameters and checks that it returned expected_rc. */
static void
fm_spi_run(const char *sql, int nargs, Oid *types, Datum *values,
		   const char *nulls, bool read_only, int expected_rc)
{
	int			rc;

	rc = SPI_execute_with_args(sql, nargs, types, values, nulls, read_only, 0);
	if (rc != expected_rc)
		elog(ERROR, "SPI_execute_with_args failed (%s): %s",
			 SPI_result_code_string(rc), sql);
}

/* Returns column col of the first result row as int64; the column is NOT NULL. */
static int64
fm_spi_int64(int row, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc,
								  col, &isnull);

	if (isnull)
		elog(ERROR, "unexpected null in column %d of a flexmore table", col);
	return DatumGetInt64(d);
}

/*
 * Fills *row from columns 1-4 (id, generation, created, config) of the
 * first row of the last SPI result.
 */
static void
fm_spi_model_row(fm_model_row *row)
{
	bool		isnull;

	row->id = fm_spi_int64(0, 1);
	row->generation = fm_spi_int64(0, 2);
	row->created = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
													 SPI_tuptable->tupdesc, 3, &isnull));
	row->config_json = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4);
}

bool
fm_storage_find_model(const char *name, fm_model_row *row)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};

	fm_spi_run("SELECT id, generation, created, config::text"
			   " FROM flexmore.models WHERE name = $1",
			   1, types, values, NULL, true, SPI_OK_SELECT);
	if (SPI_processed == 0)
		return false;
	fm_spi_model_row(row);
	return true;
}

int64
fm_storage_insert_model(const char *name, const char *architecture,
						const char *config_json, int64 generation)
{
	Oid			types[4] = {TEXTOID, TEXTOID, TEXTOID, INT8OID};
	Datum		values[4];

	values[0] = CStringGetTextDatum(name);
	values[1] = CStringGetTextDatum(architecture);
	values[2] = CStringGetTextDatum(config_json);
	values[3] = Int64GetDatum(generation);
	fm_spi_run("INSERT INTO flexmore.models"
			   " (name, architecture, config, generation, parameters, raw_bytes, stored_bytes)"
			   " VALUES ($1, $2, $3::jsonb, $4, 0, 0, 0) RETURNING id",
			   4, types, values, NULL, false, SPI_OK_INSERT_RETURNING);
	return fm_spi_int64(0, 1);
}

void
fm_storage_finish_model(int64 model_id, int64 parameters, int64 raw_bytes,
						int64 stored_bytes)
{
	Oid			types[4] = {INT8OID, INT8OID, INT8OID, INT8OID};
	Datum		values[4];

	values[0] = Int64GetDatum(model_id);
	values[1] = Int64GetDatum(parameters);
	values[2] = Int64GetDatum(raw_bytes);
	values[3] = Int64GetDatum(stored_bytes);
	fm_spi_run("UPDATE flexmore.models"
			   " SET parameters = $2, raw_bytes = $3, stored_bytes = $4 WHERE id = $1",
			   4, types, values, NULL, false, SPI_OK_UPDATE);
}

/*
 * Deletes the named model with everything that references it (ON DELETE
 * CASCADE).  Returns false when there is no such model; otherwise sets
 * *generation to the deleted row's generation.
 */
bool
fm_storage_delete_model(const char *name, int64 *generation)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};

	fm_spi_run("DELETE FROM flexmore.models WHERE name = $1 RETURNING generation",
			   1, types, values, NULL, false, SPI_OK_DELETE_RETURNING);
	if (SPI_processed == 0)
		return false;
	*generation = fm_spi_int64(0, 1);
	return true;
}

void
fm_storage_insert_expert(int64 model_id, int expert_index, const char *name, int rank)
{
	Oid			types[4] = {INT8OID, INT4OID, TEXTOID, INT4OID};
	Datum		values[4];

	values[0] = Int64GetDatum(model_id);
	values[1] = Int32GetDatum(expert_index);
	values[2] = CStringGetTextDatum(name);
	values[3] = Int32GetDatum(rank);
	fm_spi_run("INSERT INTO flexmore.experts (model_id, expert_index, name, rank)"
			   " VALUES ($1, $2, $3, $4)",
			   4, types, values, NULL, false, SPI_OK_INSERT);

	/* A new expert is granted to PUBLIC (docs/governance.md). */
	if (fm_governance_installed())
		fm_spi_run("INSERT INTO flexmore.expert_grants (model_id, expert_name, grantee)"
				   " VALUES ($1, $3, 0)",
				   4, types, values, NULL, false, SPI_OK_INSERT);
}

char	  **
fm_storage_read_experts(int64 model_id, int *n)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(model_id)};
	char	  **names;

	fm_spi_run("SELECT name FROM flexmore.experts WHERE model_id = $1"
			   " ORDER BY expert_index",
			   1, types, values, NULL, true, SPI_OK_SELECT);
	*n = (int) SPI_processed;
	names = SPI_palloc(sizeof(char *) * Max(*n, 1));
	for (int i = 0; i < *n; i++)
	{
		char	   *s = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);

		names[i] = SPI_palloc(strlen(s) + 1);
		strcpy(names[i], s);
	}
	return names;
}

void
fm_storage_insert_tokenizer(int64 model_id, const char *json)
{
	Oid			types[2] = {INT8OID, BYTEAOID};
	Datum		values[2];
	size_t		len = strlen(json);
	bytea	   *b = palloc(VARHDRSZ + len);

	SET_VARSIZE(b, VARHDRSZ + len);
	memcpy(VARDATA(b), json, len);
	values[0] = Int64GetDatum(model_id);
	values[1] = PointerGetDatum(b);
	fm_spi_run("INSERT INTO flexmore.tokenizers (model_id, tokenizer_json) VALUES ($1, $2)",
			   2, types, values, NULL, false, SPI_OK_INSERT);
}

/*
 * Returns the stored tokenizer.json (UTF-8, NUL-terminated), allocated in
 * the context that was current before SPI_connect.
 */
char *
fm_storage_read_tokenizer(int64 model_id, const char *model_name)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(model_id)};
	bool		isnull;
	Datum		d;
	bytea	   *t;
	char	   *out;
	int			len;

	fm_spi_run("SELECT tokenizer_json FROM flexmore.tokenizers WHERE model_id = $1",
			   1, types, values, NULL, true, SPI_OK_SELECT);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("model \"%s\" has no stored tokenizer", model_name),
				 errhint("Import the model again with flexmore_import(..., replace => true).")));

	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	t = DatumGetByteaPP(d);
	len = VARSIZE_ANY_EXHDR(t);
	out = SPI_palloc(len + 1);
	memcpy(out, VARDATA_ANY(t), len);
	out[len] = '\0';
	return out;
}

int64
fm_storage_insert_tensor(int64 model_id, const char *name, int expert_index,
						 fm_dtype dtype, int ndim, const int64 *shape, int64 raw_bytes)
{
	Oid			types[6] = {INT8OID, TEXTOID, INT4OID, TEXTOID, INT8ARRAYOID, INT8OID};
	Datum		values[6];
	char		nulls[6] = "      ";
	Datum		dims[FM_MAX_DIMS];
	ArrayType  *shape_array;

	for (int i = 0; i < ndim; i++)
		dims[i] = Int64GetDatum(shape[i]);
	if (ndim == 0)
		shape_array = construct_empty_array(INT8OID);
	else
		shape_array = construct_array(dims, ndim, INT8OID, 8, FLOAT8PASSBYVAL,
									  TYPALIGN_DOUBLE);

	values[0] = Int64GetDatum(model_id);
	values[1] = CStringGetTextDatum(name);
	values[2] = Int32GetDatum(expert_index);
	if (expert_index < 0)
		nulls[2] = 'n';
	values[3] = CStringGetTextDatum(fm_dtype_name(dtype));
	values[4] = PointerGetDatum(shape_array);
	values[5] = Int64GetDatum(raw_bytes);

	/* The checksum is set once all chunks are written. */
	fm_spi_run("INSERT INTO flexmore.tensors"
			   " (model_id, name, expert_index, dtype, shape, raw_bytes, checksum)"
			   " VALUES ($1, $2, $3, $4, $5, $6, decode(repeat('00', 32), 'hex'))"
			   " RETURNING id",
			   6, types, values, nulls, false, SPI_OK_INSERT_RETURNING);
	return fm_spi_int64(0, 1);
}

void
fm_storage_set_checksum(int64 tensor_id, const uint8 *sha256)
{
	Oid			types[2] = {INT8OID, BYTEAOID};
	Datum		values[2];
	bytea	   *b = palloc(VARHDRSZ + PG_SHA256_DIGEST_LENGTH);

	SET_VARSIZE(b, VARHDRSZ + PG_SHA256_DIGEST_LENGTH);
	memcpy(VARDATA(b), sha256, PG_SHA256_DIGEST_LENGTH);
	values[0] = Int64GetDatum(tensor_id);
	values[1] = PointerGetDatum(b);
	fm_spi_run("UPDATE flexmore.tensors SET checksum = $2 WHERE id = $1",
			   2, types, values, NULL, false, SPI_OK_UPDATE);
	pfree(b);
}

static void
fm_put_u16(unsigned char *p, uint16 v)
{
	p[0] = v & 0xff;
	p[1] = (v >> 8) & 0xff;
}

static void
fm_put_u32(unsigned char *p, uint32 v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (v >> (8 * i)) & 0xff;
}

static uint32
fm_get_u32(const unsigned char *p)
{
	return (uint32) p[0] | ((uint32) p[1] << 8) | ((uint32) p[2] << 16) |
		((uint32) p[3] << 24);
}

#define FM_CHUNK_HEADER_SIZE 16

/*
 * Stores one chunk of a tensor and returns the stored size of its data
 * column in bytes.  Compression is kept only when it saves at least a
 * tenth of the raw bytes: below that, decompression time outweighs the
 * space saved.
 */
int64
fm_storage_insert_chunk(int64 tensor_id, int seq, const char *raw, size_t raw_len)
{
	Oid			types[4] = {INT8OID, INT4OID, BOOLOID, BYTEAOID};
	Datum		values[4];
	size_t		bound = ZSTD_compressBound(raw_len);
	size_t		cap = Max(bound, raw_len);
	bytea	   *data;
	unsigned char *header;
	size_t		stored_len;
	bool		compressed = false;

	Assert(raw_len <= FM_CHUNK_RAW_MAX);
	data = palloc(VARHDRSZ + FM_CHUNK_HEADER_SIZE + cap);
	header = (unsigned char *) VARDATA(data);

	stored_len = ZSTD_compress(header + FM_CHUNK_HEADER_SIZE, bound, raw, raw_len,
							   FM_ZSTD_LEVEL);
	if (ZSTD_isError(stored_len))
		elog(ERROR, "zstd compression of a %zu-byte chunk failed: %s",
			 raw_len, ZSTD_getErrorName(stored_len));
	if (stored_len < raw_len - raw_len / 10)
		compressed = true;
	else
	{
		memcpy(header + FM_CHUNK_HEADER_SIZE, raw, raw_len);
		stored_len = raw_len;
	}

	fm_put_u32(header, FM_CHUNK_MAGIC);
	fm_put_u16(header + 4, FM_CHUNK_VERSION);
	fm_put_u16(header + 6, compressed ? FM_CHUNK_COMPRESSED : 0);
	fm_put_u32(header + 8, (uint32) raw_len);
	fm_put_u32(header + 12, (uint32) stored_len);
	SET_VARSIZE(data, VARHDRSZ + FM_CHUNK_HEADER_SIZE + stored_len);

	values[0] = Int64GetDatum(tensor_id);
	values[1] = Int32GetDatum(seq);
	values[2] = BoolGetDatum(compressed);
	values[3] = PointerGetDatum(data);
	fm_spi_run("INSERT INTO flexmore.tensor_chunks (tensor_id, seq, compressed, data)"
			   " VALUES ($1, $2, $3, $4)",
			   4, types, values, NULL, false, SPI_OK_INSERT);
	pfree(data);
	return (int64) (FM_CHUNK_HEADER_SIZE + stored_len);
}

fm_stored_tensor *
fm_storage_list_tensors(int64 model_id, int *n)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(model_id)};
	fm_stored_tensor *out;

	fm_spi_run("SELECT id, name, dtype, shape, raw_bytes, checksum"
			   " FROM flexmore.tensors WHERE model_id = $1 ORDER BY name",
			   1, types, values, NULL, true, SPI_OK_SELECT);
	*n = (int) SPI_processed;
	out = SPI_palloc(sizeof(fm_stored_tensor) * Max(*n, 1));

	for (int i = 0; i < *n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		fm_stored_tensor *t = &out[i];
		char	   *name = SPI_getvalue(tup, desc, 2);
		char	   *dtype = SPI_getvalue(tup, desc, 3);
		bool		isnull;
		ArrayType  *shape;
		Datum	   *elems;
		int			nelems;
		bytea	   *checksum;

		t->id = fm_spi_int64(i, 1);
		t->name = SPI_palloc(strlen(name) + 1);
		strcpy(t->name, name);
		if (!fm_dtype_parse(dtype, &t->dtype))
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("stored tensor \"%s\" has unknown dtype \"%s\"", name, dtype)));

		shape = DatumGetArrayTypeP(SPI_getbinval(tup, desc, 4, &isnull));
		deconstruct_array(shape, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
						  &elems, NULL, &nelems);
		if (nelems > FM_MAX_DIMS)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("stored tensor \"%s\" has %d dimensions, more than %d",
							name, nelems, FM_MAX_DIMS)));
		t->ndim = nelems;
		for (int d = 0; d < nelems; d++)
			t->shape[d] = DatumGetInt64(elems[d]);

		t->raw_bytes = fm_spi_int64(i, 5);
		checksum = DatumGetByteaPP(SPI_getbinval(tup, desc, 6, &isnull));
		if (VARSIZE_ANY_EXHDR(checksum) != PG_SHA256_DIGEST_LENGTH)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("stored tensor \"%s\" has a checksum of %d bytes, not %d",
							name, (int) VARSIZE_ANY_EXHDR(checksum),
							PG_SHA256_DIGEST_LENGTH)));
		memcpy(t->checksum, VARDATA_ANY(checksum), PG_SHA256_DIGEST_LENGTH);
	}
	return out;
}

/* Raises a data-corrupted error about a chunk of a stored tensor. */
static void
fm_chunk_corrupted(const char *model_name, const char *tensor, int seq,
				   const char *problem)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATA_CORRUPTED),
			 errmsg("chunk %d of tensor \"%s\" of model \"%s\" is corrupted: %s",
					seq, tensor, model_name, problem),
			 errhint("Import the model again with flexmore_import(..., replace => true).")));
}

/*
 * Reads a tensor into dst widened to fp32, or when raw_dst is not NULL,
 * into raw_dst as its stored bytes.
 */
static void
fm_storage_read_tensor_into(const fm_stored_tensor *t, const char *model_name, float *dst,
							char *raw_dst)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(t->id)};
	size_t		esize = fm_dtype_size(t->dtype);
	size_t		done = 0;
	MemoryContext chunk_cxt;
	MemoryContext old;
	pg_cryptohash_ctx *sha;
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	char	   *raw = NULL;

	/* Toasted data values stay pointers in the result until detoasted below. */
	fm_spi_run("SELECT seq, compressed, data FROM flexmore.tensor_chunks"
			   " WHERE tensor_id = $1 ORDER BY seq",
			   1, types, values, NULL, true, SPI_OK_SELECT);

	chunk_cxt = AllocSetContextCreate(CurrentMemoryContext, "flexmore chunk",
									  ALLOCSET_DEFAULT_SIZES);
	sha = pg_cryptohash_create(PG_SHA256);
	if (pg_cryptohash_init(sha) < 0)
		elog(ERROR, "could not initialize SHA-256: %s", pg_cryptohash_error(sha));

	for (uint64 row = 0; row < SPI_processed; row++)
	{
		HeapTuple	tup = SPI_tuptable->vals[row];
		bool		isnull;
		int			seq = DatumGetInt32(SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull));
		bool		compressed = DatumGetBool(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull));
		bytea	   *data;
		const unsigned char *p;
		size_t		len;
		uint32		raw_len;
		uint32		stored_len;
		uint16		flags;

		CHECK_FOR_INTERRUPTS();
		old = MemoryContextSwitchTo(chunk_cxt);

		if (seq != (int) row)
			fm_chunk_corrupted(model_name, t->name, (int) row, "a chunk is missing");
		data = DatumGetByteaPP(SPI_getbinval(tup, SPI_tuptable->tupdesc, 3, &isnull));
		p = (const unsigned char *) VARDATA_ANY(data);
		len = VARSIZE_ANY_EXHDR(data);

		if (len < FM_CHUNK_HEADER_SIZE || fm_get_u32(p) != FM_CHUNK_MAGIC)
			fm_chunk_corrupted(model_name, t->name, seq, "bad magic number");
		if ((p[4] | (p[5] << 8)) != FM_CHUNK_VERSION)
			fm_chunk_corrupted(model_name, t->name, seq, "unknown format version");
		flags = p[6] | (p[7] << 8);
		raw_len = fm_get_u32(p + 8);
		stored_len = fm_get_u32(p + 12);
		if (stored_len != len - FM_CHUNK_HEADER_SIZE ||
			((flags & FM_CHUNK_COMPRESSED) != 0) != compressed ||
			raw_len > FM_CHUNK_RAW_MAX || raw_len % esize != 0 ||
			raw_len > (uint64) t->raw_bytes - done)
			fm_chunk_corrupted(model_name, t->name, seq, "header does not match the data");

		if (compressed)
		{
			size_t		got;

			raw = palloc(raw_len);
			got = ZSTD_decompress(raw, raw_len, p + FM_CHUNK_HEADER_SIZE, stored_len);
			if (ZSTD_isError(got) || got != raw_len)
				fm_chunk_corrupted(model_name, t->name, seq, "zstd decompression failed");
		}
		else
		{
			if (stored_len != raw_len)
				fm_chunk_corrupted(model_name, t->name, seq, "header does not match the data");
			raw = (char *) p + FM_CHUNK_HEADER_SIZE;
		}

		if (pg_cryptohash_update(sha, (const uint8 *) raw, raw_len) < 0)
			elog(ERROR, "could not update SHA-256: %s", pg_cryptohash_error(sha));
		if (raw_dst != NULL)
			memcpy(raw_dst + done, raw, raw_len);
		else
			fm_convert_to_f32(t->dtype, raw, dst + done / esize, raw_len / esize);
		done += raw_len;

		MemoryContextSwitchTo(old);
		MemoryContextReset(chunk_cxt);
	}

	if (done != (size_t) t->raw_bytes)
		fm_chunk_corrupted(model_name, t->name, (int) SPI_processed,
						   "the chunks hold fewer bytes than the tensor");
	if (pg_cryptohash_final(sha, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not finalize SHA-256: %s", pg_cryptohash_error(sha));
	pg_cryptohash_free(sha);
	if (memcmp(digest, t->checksum, sizeof(digest)) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("tensor \"%s\" of model \"%s\" does not match its SHA-256 checksum",
						t->name, model_name),
				 errhint("Import the model again with flexmore_import(..., replace => true).")));
	MemoryContextDelete(chunk_cxt);
}

void
fm_storage_read_tensor(const fm_stored_tensor *t, const char *model_name, float *dst)
{
	fm_storage_read_tensor_into(t, model_name, dst, NULL);
}

/*
 * Reads a tensor's stored bytes (in its dtype, little-endian) into dst,
 * which has room for t->raw_bytes bytes, with the same checks as
 * fm_storage_read_tensor.
 */
void
fm_storage_read_tensor_bytes(const fm_stored_tensor *t, const char *model_name, char *dst)
{
	fm_storage_read_tensor_into(t, model_name, NULL, dst);
}

/* ---------- changing a stored model (experts.c) ---------- */

/*
 * Locks the named model's row against concurrent changes (FOR UPDATE) and
 * fills *row.  Returns false when there is no such model.
 */
bool
fm_storage_lock_model(const char *name, fm_model_row *row, char **architecture)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};

	fm_spi_run("SELECT id, generation, created, config::text, architecture"
			   " FROM flexmore.models WHERE name = $1 FOR UPDATE",
			   1, types, values, NULL, false, SPI_OK_SELECT);
	if (SPI_processed == 0)
		return false;

	fm_spi_model_row(row);
	*architecture = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 5);
	return true;
}

/* Reads the experts of a model in index order: names and ranks. */
void
fm_storage_read_expert_ranks(int64 model_id, int *n, char ***names, int **ranks)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(model_id)};

	fm_spi_run("SELECT name, rank FROM flexmore.experts WHERE model_id = $1"
			   " ORDER BY expert_index",
			   1, types, values, NULL, true, SPI_OK_SELECT);
	*n = (int) SPI_processed;
	*names = SPI_palloc(sizeof(char *) * Max(*n, 1));
	*ranks = SPI_palloc(sizeof(int) * Max(*n, 1));
	for (int i = 0; i < *n; i++)
	{
		char	   *s = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		bool		isnull;

		(*names)[i] = SPI_palloc(strlen(s) + 1);
		strcpy((*names)[i], s);
		(*ranks)[i] = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i],
												  SPI_tuptable->tupdesc, 2, &isnull));
	}
}

/*
 * Replaces the expert rows of a model with names[0..n) and ranks[0..n).
 * A row whose name stays keeps its metadata and grants and only moves to
 * its new index.  Rows of names that go are deleted with their grants, and
 * new names get new rows.  The indexes first move out of the way by
 * FM_MAX_EXPERTS, because the primary key (model_id, expert_index) is
 * checked row by row.
 */
void
fm_storage_replace_experts(int64 model_id, int n, char **names, const int *ranks)
{
	Oid			types[4] = {INT8OID, INT4OID, TEXTOID, INT4OID};
	Datum		values[4];
	bool		governance = fm_governance_installed();

	values[0] = Int64GetDatum(model_id);
	values[1] = Int32GetDatum(FM_MAX_EXPERTS);
	fm_spi_run("UPDATE flexmore.experts SET expert_index = expert_index + $2"
			   " WHERE model_id = $1",
			   2, types, values, NULL, false, SPI_OK_UPDATE);
	for (int e = 0; e < n; e++)
	{
		values[1] = Int32GetDatum(e);
		values[2] = CStringGetTextDatum(names[e]);
		values[3] = Int32GetDatum(ranks[e]);
		fm_spi_run(governance ?
				   "UPDATE flexmore.experts SET expert_index = $2, rank = $4,"
				   " updated = CASE WHEN rank = $4 THEN updated ELSE now() END"
				   " WHERE model_id = $1 AND name = $3" :
				   "UPDATE flexmore.experts SET expert_index = $2, rank = $4"
				   " WHERE model_id = $1 AND name = $3",
				   4, types, values, NULL, false, SPI_OK_UPDATE);
		if (SPI_processed == 0)
			fm_storage_insert_expert(model_id, e, names[e], ranks[e]);
	}
	values[1] = Int32GetDatum(FM_MAX_EXPERTS);
	fm_spi_run("DELETE FROM flexmore.experts WHERE model_id = $1 AND expert_index >= $2",
			   2, types, values, NULL, false, SPI_OK_DELETE);
}

/* Deletes one tensor and its chunks. */
void
fm_storage_delete_tensor(int64 tensor_id)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(tensor_id)};

	fm_spi_run("DELETE FROM flexmore.tensors WHERE id = $1",
			   1, types, values, NULL, false, SPI_OK_DELETE);
}

/* Deletes every tensor of one expert of a model, with their chunks. */
void
fm_storage_delete_expert_tensors(int64 model_id, int expert_index)
{
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		values[2] = {Int64GetDatum(model_id), Int32GetDatum(expert_index)};

	fm_spi_run("DELETE FROM flexmore.tensors WHERE model_id = $1 AND expert_index = $2",
			   2, types, values, NULL, false, SPI_OK_DELETE);
}

/*
 * Renumbers the tensors of experts above removed down by one, in their
 * expert_index and in their names (model.layers.N.mlp.experts.E.*).  The
 * names go through a temporary prefix first, because renaming E to E - 1
 * in place would meet the unique (model_id, name) constraint row by row.
 */
void
fm_storage_shift_expert_tensors(int64 model_id, int removed)
{
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		values[2] = {Int64GetDatum(model_id), Int32GetDatum(removed)};

	fm_spi_run("UPDATE flexmore.tensors SET name = '#' || name"
			   " WHERE model_id = $1 AND expert_index > $2",
			   2, types, values, NULL, false, SPI_OK_UPDATE);
	fm_spi_run("UPDATE flexmore.tensors"
			   " SET expert_index = expert_index - 1,"
			   "     name = regexp_replace(substr(name, 2),"
			   "                           '^(model\\.layers\\.[0-9]+\\.mlp\\.experts\\.)[0-9]+\\.',"
			   "                           '\\1' || (expert_index - 1) || '.')"
			   " WHERE model_id = $1 AND expert_index > $2",
			   2, types, values, NULL, false, SPI_OK_UPDATE);
}

/*
 * Writes a changed model's config and architecture, bumps its generation
 * so that every backend reloads it, and recomputes its size columns from
 * the tensors.
 */
void
fm_storage_update_model(int64 model_id, const char *config_json, const char *architecture)
{
	Oid			types[3] = {INT8OID, TEXTOID, TEXTOID};
	Datum		values[3];

	values[0] = Int64GetDatum(model_id);
	values[1] = CStringGetTextDatum(config_json);
	values[2] = CStringGetTextDatum(architecture);
	fm_spi_run("UPDATE flexmore.models m"
			   " SET config = $2::jsonb, architecture = $3,"
			   "     generation = generation + 1,"
			   "     parameters = (SELECT coalesce(sum(t.raw_bytes / CASE t.dtype WHEN 'F32' THEN 4 ELSE 2 END), 0)"
			   "                   FROM flexmore.tensors t WHERE t.model_id = m.id),"
			   "     raw_bytes = (SELECT coalesce(sum(t.raw_bytes), 0)"
			   "                  FROM flexmore.tensors t WHERE t.model_id = m.id),"
			   "     stored_bytes = (SELECT coalesce(sum(octet_length(c.data)), 0)"
			   "                     FROM flexmore.tensors t JOIN flexmore.tensor_chunks c ON c.tensor_id = t.id"
			   "                     WHERE t.model_id = m.id)"
			   " WHERE id = $1",
			   3, types, values, NULL, false, SPI_OK_UPDATE);
}
