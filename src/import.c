/*-------------------------------------------------------------------------
 *
 * import.c
 *	  flexmore_import: copies a checkpoint directory on the server into the
 *	  flexmore tables.
 *
 * A checkpoint directory holds config.json, tokenizer.json and either
 * model.safetensors or the shards that model.safetensors.index.json lists
 * (the index wins when both exist).  The import runs in two phases:
 *
 *	1. Validation reads only the JSON files and the safetensors headers:
 *	   the config must parse, the tokenizer must load and fit the
 *	   vocabulary, and every tensor the config needs must be present with
 *	   a supported dtype and its exact shape.  A tensor in the files that
 *	   the config does not need is an error too, because it almost always
 *	   means a layout mistake (a wrong expert count, a misspelt name).
 *	2. Storage streams each tensor from its file in chunks of at most
 *	   FM_CHUNK_RAW_MAX bytes, so memory use does not grow with the model.
 *
 * Nothing is written before phase 2, and everything runs in the caller's
 * transaction, so a failed import leaves nothing behind.  Tensors keep the
 * dtype of the file; conversion to fp32 happens when a backend loads them.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include "tcop/utility.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "catalog/pg_authid.h"
#include "common/cryptohash.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "reader/reader.h"
#include "storage/fd.h"
#include "utils/acl.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(flexmore_import);

/* JSON files larger than this are rejected rather than read into memory. */
#define FM_MAX_JSON_BYTES	((size_t) 256 * 1024 * 1024)

/* safetensors headers larger than this are rejected, as other readers do. */
#define FM_MAX_ST_HEADER	((uint64) 100 * 1024 * 1024)

/* One safetensors file of the checkpoint. */
typedef struct fm_import_file
{
	char	   *name;			/* file name inside the directory */
	char	   *path;
	fm_st_file st;
} fm_import_file;

/* A tensor chosen for storage, with where its bytes are. */
typedef struct fm_import_tensor
{
	const fm_import_file *file;
	const fm_st_tensor *tensor;
	int			expert;			/* expert index, or -1 */
	bool		used;
} fm_import_tensor;

typedef struct fm_import_state
{
	const char *model_name;
	const char *dir;
	fm_config	config;
	char	   *config_json;
	size_t		config_len;
	char	  **expert_names;
	char	   *tokenizer_json;
	int			nfiles;
	fm_import_file *files;
	int			ntensors;
	fm_import_tensor *tensors;	/* every tensor of every file, sorted by name */
} fm_import_state;

static char *
fm_join_path(const char *dir, const char *file)
{
	return psprintf("%s/%s", dir, file);
}

/* Opens a checkpoint file, raising an error naming it when that fails. */
static int
fm_open_file(const char *path, off_t *size)
{
	int			fd = OpenTransientFile(path, O_RDONLY | PG_BINARY);
	struct stat st;

	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open file \"%s\": %m", path)));
	if (fstat(fd, &st) < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not stat file \"%s\": %m", path)));
	if (!S_ISREG(st.st_mode))
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is not a regular file", path)));
	*size = st.st_size;
	return fd;
}

/* Reads exactly len bytes at offset, raising an error on a short read. */
static void
fm_read_exact(int fd, const char *path, char *buf, size_t len, uint64 offset)
{
	size_t		done = 0;

	while (done < len)
	{
		size_t		want = Min(len - done, (size_t) 1 << 30);
		ssize_t		got = pg_pread(fd, buf + done, want, (off_t) (offset + done));

		if (got < 0)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not read file \"%s\": %m", path)));
		if (got == 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("could not read file \"%s\": read %zu of %zu bytes at offset " UINT64_FORMAT,
							path, done, len, offset),
					 errdetail("The file is shorter than its header says; it may have changed during the import.")));
		done += got;
	}
}

/* Returns true when path names an existing file. */
static bool
fm_file_exists(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0;
}

/* Reads a whole JSON file into a NUL-terminated buffer. */
static char *
fm_read_json_file(const char *path, size_t *len)
{
	off_t		size;
	int			fd = fm_open_file(path, &size);
	char	   *buf;

	if ((uint64) size > FM_MAX_JSON_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("file \"%s\" is too large: %lld bytes, at most %zu",
						path, (long long) size, FM_MAX_JSON_BYTES)));
	buf = palloc((size_t) size + 1);
	fm_read_exact(fd, path, buf, (size_t) size, 0);
	buf[size] = '\0';
	CloseTransientFile(fd);
	if (memchr(buf, '\0', (size_t) size) != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("file \"%s\" contains a NUL byte", path)));
	*len = (size_t) size;
	return buf;
}

/*
 * Raises an engine or reader error with the file it concerns.  The reader
 * starts some messages with the file's base name, which the full path
 * makes redundant.
 */
static void
fm_raise_file(const fm_error *err, const char *path)
{
	const char *base = strrchr(path, '/');
	size_t		base_len;
	fm_error	trimmed = *err;

	base = base ? base + 1 : path;
	base_len = strlen(base);
	if (strncmp(err->message, base, base_len) == 0 &&
		strncmp(err->message + base_len, ": ", 2) == 0)
		memmove(trimmed.message, err->message + base_len + 2,
				strlen(err->message + base_len + 2) + 1);
	fm_raise(&trimmed, psprintf("file \"%s\"", path));
}

/* Phase 1a: config.json, expert names and tokenizer.json. */
static void
fm_import_read_metadata(fm_import_state *s)
{
	char	   *path;
	size_t		len;
	fm_error	err = {0};
	MemoryContext tok_cxt;
	fm_allocator a;
	fm_tokenizer *tok;
	int32		id_limit;

	path = fm_join_path(s->dir, "config.json");
	s->config_json = fm_read_json_file(path, &s->config_len);
	if (!pg_verify_mbstr(PG_UTF8, s->config_json, (int) s->config_len, true))
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("file \"%s\" is not valid UTF-8", path)));
	if (fm_config_parse(s->config_json, s->config_len, &s->config, &err) != FM_OK)
		fm_raise_file(&err, path);

	s->expert_names = palloc0(sizeof(char *) * s->config.num_experts);
	if (fm_config_expert_names(s->config_json, s->config_len, &s->config,
							   s->expert_names, &err) != FM_OK)
		fm_raise_file(&err, path);
	for (int i = 0; i < s->config.num_experts; i++)
		for (int j = 0; j < i; j++)
			if (strcmp(s->expert_names[i], s->expert_names[j]) == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("file \"%s\": experts %d and %d have the same name \"%s\"",
								path, j, i, s->expert_names[i])));
	for (int i = 0; i < s->config.num_eos; i++)
		if (s->config.eos_token_ids[i] < 0 ||
			s->config.eos_token_ids[i] >= s->config.vocab_size)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("file \"%s\": eos_token_id %d is outside the vocabulary of %d ids",
							path, s->config.eos_token_ids[i], s->config.vocab_size)));

	path = fm_join_path(s->dir, "tokenizer.json");
	s->tokenizer_json = fm_read_json_file(path, &len);

	/* Load it once to validate it, then let it go. */
	tok_cxt = AllocSetContextCreate(CurrentMemoryContext, "flexmore tokenizer check",
									ALLOCSET_DEFAULT_SIZES);
	fm_allocator_init(&a, tok_cxt);
	if (fm_tokenizer_load_json(s->tokenizer_json, len, &a, &tok, &err) != FM_OK)
		fm_raise_file(&err, path);
	id_limit = fm_tokenizer_id_limit(tok);
	if (id_limit > s->config.vocab_size)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("file \"%s\" has token ids up to %d, but vocab_size in config.json is %d",
						path, id_limit - 1, s->config.vocab_size),
				 errdetail("Every token id needs a row in the embedding matrix.")));
	fm_tokenizer_free(tok);
	MemoryContextDelete(tok_cxt);
}

/* Reads and parses one safetensors header. */
static void
fm_import_read_header(fm_import_file *f)
{
	off_t		size;
	int			fd = fm_open_file(f->path, &size);
	unsigned char prefix[8];
	uint64		header_len = 0;
	char	   *header;
	fm_error	err = {0};

	if (size < 8)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("file \"%s\" is not a safetensors file: it has %lld bytes, fewer than the 8-byte header length",
						f->path, (long long) size)));
	fm_read_exact(fd, f->path, (char *) prefix, 8, 0);
	for (int i = 7; i >= 0; i--)
		header_len = (header_len << 8) | prefix[i];
	if (header_len > (uint64) size - 8 || header_len > FM_MAX_ST_HEADER)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("file \"%s\" has a safetensors header length of " UINT64_FORMAT " bytes, but the file has %lld bytes",
						f->path, header_len, (long long) size),
				 errdetail("Headers longer than the file or longer than " UINT64_FORMAT " bytes are rejected.",
						   FM_MAX_ST_HEADER)));

	header = palloc(header_len + 1);
	fm_read_exact(fd, f->path, header, header_len, 8);
	header[header_len] = '\0';
	CloseTransientFile(fd);

	if (fm_st_parse_header(header, header_len, (uint64) size, &f->st, &err) != FM_OK)
		fm_raise_file(&err, f->path);
}

static int
fm_import_tensor_cmp(const void *a, const void *b)
{
	return strcmp(((const fm_import_tensor *) a)->tensor->name,
				  ((const fm_import_tensor *) b)->tensor->name);
}

static fm_import_tensor *
fm_import_find(fm_import_state *s, const char *name)
{
	int			lo = 0;
	int			hi = s->ntensors - 1;

	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;
		int			c = strcmp(name, s->tensors[mid].tensor->name);

		if (c == 0)
			return &s->tensors[mid];
		if (c < 0)
			hi = mid - 1;
		else
			lo = mid + 1;
	}
	return NULL;
}

/*
 * Phase 1b: finds the safetensors files, parses their headers and
 * collects every tensor, checking the shard index against the headers.
 */
static void
fm_import_read_headers(fm_import_state *s)
{
	char	   *index_path = fm_join_path(s->dir, "model.safetensors.index.json");
	char	  **names = NULL;
	char	  **shards = NULL;
	int32		nnames = 0;
	int			k = 0;

	if (fm_file_exists(index_path))
	{
		size_t		len;
		char	   *json = fm_read_json_file(index_path, &len);
		fm_error	err = {0};

		if (fm_st_parse_index(json, len, &names, &shards, &nnames, &err) != FM_OK)
			fm_raise_file(&err, index_path);
		if (nnames == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("file \"%s\" lists no tensors", index_path)));

		/* Distinct shard names, in order of first mention. */
		s->files = palloc0(sizeof(fm_import_file) * nnames);
		for (int i = 0; i < nnames; i++)
		{
			bool		seen = false;

			for (int j = 0; j < s->nfiles && !seen; j++)
				seen = strcmp(s->files[j].name, shards[i]) == 0;
			if (!seen)
				s->files[s->nfiles++].name = shards[i];
		}
	}
	else
	{
		s->files = palloc0(sizeof(fm_import_file));
		s->files[0].name = "model.safetensors";
		s->nfiles = 1;
	}

	for (int i = 0; i < s->nfiles; i++)
	{
		CHECK_FOR_INTERRUPTS();
		s->files[i].path = fm_join_path(s->dir, s->files[i].name);
		fm_import_read_header(&s->files[i]);
		s->ntensors += s->files[i].st.num_tensors;
	}

	s->tensors = palloc0(sizeof(fm_import_tensor) * Max(s->ntensors, 1));
	for (int i = 0; i < s->nfiles; i++)
		for (int j = 0; j < s->files[i].st.num_tensors; j++)
		{
			s->tensors[k].file = &s->files[i];
			s->tensors[k].tensor = &s->files[i].st.tensors[j];
			s->tensors[k].expert = -1;
			k++;
		}
	qsort(s->tensors, s->ntensors, sizeof(fm_import_tensor), fm_import_tensor_cmp);

	for (int i = 1; i < s->ntensors; i++)
		if (strcmp(s->tensors[i].tensor->name, s->tensors[i - 1].tensor->name) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("tensor \"%s\" is in both \"%s\" and \"%s\"",
							s->tensors[i].tensor->name, s->tensors[i - 1].file->path,
							s->tensors[i].file->path)));

	/* Each name the index lists must be in the shard it names, and vice versa. */
	for (int i = 0; i < nnames; i++)
	{
		fm_import_tensor *t = fm_import_find(s, names[i]);

		if (t == NULL || strcmp(t->file->name, shards[i]) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("file \"%s\" maps tensor \"%s\" to \"%s\", which does not contain it",
							index_path, names[i], shards[i])));
	}
	if (nnames > 0 && nnames != s->ntensors)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the shards hold %d tensors, but file \"%s\" lists %d",
						s->ntensors, index_path, nnames),
				 errdetail("Every tensor in a shard must be listed in the index.")));
}

/* Checks one file tensor's dtype and shape against what the config needs. */
static void
fm_import_check_tensor(const fm_import_tensor *t, int ndim, const int64 *shape)
{
	const fm_st_tensor *st = t->tensor;
	bool		same = st->ndim == ndim;
	StringInfoData want;
	StringInfoData got;

	if (!st->dtype_supported)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("file \"%s\": tensor \"%s\" has dtype %s, which is not supported",
						t->file->path, st->name, st->dtype_name),
				 errhint("Supported dtypes are F32, BF16 and F16.")));

	for (int i = 0; same && i < ndim; i++)
		same = st->shape[i] == shape[i];
	if (same)
		return;

	initStringInfo(&want);
	initStringInfo(&got);
	for (int i = 0; i < ndim; i++)
		appendStringInfo(&want, "%s" INT64_FORMAT, i ? ", " : "", shape[i]);
	for (int i = 0; i < st->ndim; i++)
		appendStringInfo(&got, "%s" INT64_FORMAT, i ? ", " : "", st->shape[i]);
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("file \"%s\": tensor \"%s\" has shape [%s], but config.json needs [%s]",
					t->file->path, st->name, got.data, want.data)));
}

/*
 * Tries the fused spelling for a per-expert FFN tensor name: every expert
 * full size, gate and up in model.layers.N.mlp.experts.gate_up_proj
 * [experts, 2 * inter, hidden] and down in ...experts.down_proj
 * [experts, hidden, inter].  Returns true when the fused tensor covers it.
 */
static bool
fm_import_match_fused(fm_import_state *s, const char *name)
{
	const fm_config *c = &s->config;
	int			layer;
	int			expert;
	char		proj[32];
	char		fused[128];
	int64		shape[3];
	fm_import_tensor *t;

	if (sscanf(name, "model.layers.%d.mlp.experts.%d.%31[a-z_].weight",
			   &layer, &expert, proj) != 3)
		return false;
	for (int e = 0; e < c->num_experts; e++)
		if (c->expert_ranks[e] != 0)
			return false;

	shape[0] = c->num_experts;
	if (strcmp(proj, "gate_proj") == 0 || strcmp(proj, "up_proj") == 0)
	{
		snprintf(fused, sizeof(fused), "model.layers.%d.mlp.experts.gate_up_proj", layer);
		shape[1] = 2 * (int64) c->intermediate_size;
		shape[2] = c->hidden_size;
	}
	else if (strcmp(proj, "down_proj") == 0)
	{
		snprintf(fused, sizeof(fused), "model.layers.%d.mlp.experts.down_proj", layer);
		shape[1] = c->hidden_size;
		shape[2] = c->intermediate_size;
	}
	else
		return false;

	t = fm_import_find(s, fused);
	if (t == NULL)
		return false;
	fm_import_check_tensor(t, 3, shape);
	t->used = true;
	return true;
}

/* Phase 1c: matches the files' tensors against the layout the config needs. */
static void
fm_import_match_layout(fm_import_state *s)
{
	MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext, "flexmore layout",
											  ALLOCSET_DEFAULT_SIZES);
	fm_allocator a;
	fm_tensor_spec *specs;
	int32		nspecs;
	fm_error	err = {0};

	fm_allocator_init(&a, cxt);
	if (fm_layout_expected(&s->config, &a, &specs, &nspecs, &err) != FM_OK)
		fm_raise_file(&err, fm_join_path(s->dir, "config.json"));

	for (int i = 0; i < nspecs; i++)
	{
		const fm_tensor_spec *spec = &specs[i];
		fm_import_tensor *t = fm_import_find(s, spec->name);

		if (t != NULL)
		{
			fm_import_check_tensor(t, spec->ndim, spec->shape);
			t->used = true;
			t->expert = spec->expert;
		}
		else if (!fm_import_match_fused(s, spec->name) && !spec->optional)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("checkpoint \"%s\" has no tensor \"%s\"", s->dir, spec->name),
					 errdetail("config.json (model_type %s, %d layers, %d experts) needs it.",
							   s->config.model_type, s->config.num_hidden_layers,
							   s->config.num_experts)));
	}

	for (int i = 0; i < s->ntensors; i++)
		if (!s->tensors[i].used)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("file \"%s\": tensor \"%s\" is not part of the model that config.json describes",
							s->tensors[i].file->path, s->tensors[i].tensor->name),
					 errhint("Check num_experts, num_hidden_layers and expert_ranks in config.json.")));
	MemoryContextDelete(cxt);
}

static int
fm_import_offset_cmp(const void *a, const void *b)
{
	const fm_import_tensor *x = *(fm_import_tensor *const *) a;
	const fm_import_tensor *y = *(fm_import_tensor *const *) b;

	if (x->file != y->file)
		return x->file < y->file ? -1 : 1;
	if (x->tensor->begin != y->tensor->begin)
		return x->tensor->begin < y->tensor->begin ? -1 : 1;
	return 0;
}

/*
 * Phase 2 for one tensor: streams its bytes from the file into chunks and
 * stores its checksum.  Returns the stored bytes.
 */
static int64
fm_import_store_tensor(int64 model_id, const fm_import_tensor *t, int fd, char *buf)
{
	const fm_st_tensor *st = t->tensor;
	uint64		begin = st->begin;	/* absolute file offset */
	uint64		len = st->end - st->begin;
	uint64		done = 0;
	int64		stored = 0;
	int64		tensor_id;
	pg_cryptohash_ctx *sha;
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	int			seq = 0;

	tensor_id = fm_storage_insert_tensor(model_id, st->name, t->expert, st->dtype,
										 st->ndim, st->shape, (int64) len);
	sha = pg_cryptohash_create(PG_SHA256);
	if (pg_cryptohash_init(sha) < 0)
		elog(ERROR, "could not initialize SHA-256: %s", pg_cryptohash_error(sha));

	while (done < len)
	{
		size_t		n = (size_t) Min(len - done, (uint64) FM_CHUNK_RAW_MAX);

		CHECK_FOR_INTERRUPTS();
		fm_read_exact(fd, t->file->path, buf, n, begin + done);
		if (pg_cryptohash_update(sha, (const uint8 *) buf, n) < 0)
			elog(ERROR, "could not update SHA-256: %s", pg_cryptohash_error(sha));
		stored += fm_storage_insert_chunk(tensor_id, seq++, buf, n);
		done += n;
	}

	if (pg_cryptohash_final(sha, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not finalize SHA-256: %s", pg_cryptohash_error(sha));
	pg_cryptohash_free(sha);
	fm_storage_set_checksum(tensor_id, digest);
	return stored;
}

/* Converts UTF-8 from a checkpoint file to the database encoding. */
static char *
fm_import_to_server(const char *s)
{
	return pg_any_to_server(s, strlen(s), PG_UTF8);
}

/*
 * Phase 2: writes the model.  The caller holds an SPI connection and runs
 * as the extension owner.
 */
static int64
fm_import_store(fm_import_state *s, bool replace)
{
	int64		generation = 1;
	int64		old_generation;
	int64		model_id;
	int64		parameters = 0;
	int64		raw_bytes = 0;
	int64		stored_bytes = 0;
	fm_import_tensor **order;
	int			norder = 0;
	char	   *buf;
	const fm_import_file *open_file = NULL;
	int			fd = -1;

	if (fm_storage_delete_model(s->model_name, &old_generation))
	{
		if (!replace)
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("model \"%s\" already exists", s->model_name),
					 errhint("Pass replace => true to import over it, or drop it with flexmore_drop_model().")));
		generation = old_generation + 1;
	}

	model_id = fm_storage_insert_model(s->model_name, s->config.model_type,
									   fm_import_to_server(s->config_json), generation);
	for (int e = 0; e < s->config.num_experts; e++)
		fm_storage_insert_expert(model_id, e, fm_import_to_server(s->expert_names[e]),
								 s->config.expert_ranks[e]);
	fm_storage_insert_tokenizer(model_id, s->tokenizer_json);

	/* Store in file order, so each file is read front to back. */
	order = palloc(sizeof(fm_import_tensor *) * Max(s->ntensors, 1));
	for (int i = 0; i < s->ntensors; i++)
		order[norder++] = &s->tensors[i];
	qsort(order, norder, sizeof(fm_import_tensor *), fm_import_offset_cmp);

	buf = MemoryContextAllocHuge(CurrentMemoryContext, FM_CHUNK_RAW_MAX);
	for (int i = 0; i < norder; i++)
	{
		const fm_import_tensor *t = order[i];
		int64		numel = 1;

		if (t->file != open_file)
		{
			off_t		size;

			if (fd >= 0)
				CloseTransientFile(fd);
			fd = fm_open_file(t->file->path, &size);
			if ((uint64) size != t->file->st.file_size)
				ereport(ERROR,
						(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						 errmsg("file \"%s\" changed size during the import", t->file->path)));
			open_file = t->file;
		}
		for (int d = 0; d < t->tensor->ndim; d++)
			numel *= t->tensor->shape[d];
		parameters += numel;
		raw_bytes += (int64) (t->tensor->end - t->tensor->begin);
		stored_bytes += fm_import_store_tensor(model_id, t, fd, buf);
	}
	if (fd >= 0)
		CloseTransientFile(fd);
	pfree(buf);

	fm_storage_finish_model(model_id, parameters, raw_bytes, stored_bytes);
	return model_id;
}

/* Raises an error unless the current user may read files on the server. */
static void
fm_import_check_privilege(void)
{
	if (!has_privs_of_role(GetUserId(), ROLE_PG_READ_SERVER_FILES))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to import a model from server files"),
				 errdetail("Only roles with privileges of the \"%s\" role may read checkpoint files on the server.",
						   "pg_read_server_files")));
}

/*
 * flexmore_import(model_name text, source_dir text, replace boolean)
 * returns the new model's id.
 */
Datum
flexmore_import(PG_FUNCTION_ARGS)
{
	char	   *model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *source_dir = text_to_cstring(PG_GETARG_TEXT_PP(1));
	bool		replace = PG_GETARG_BOOL(2);
	fm_import_state state;
	fm_user_switch sw;
	int64		model_id = 0;

	PreventCommandIfReadOnly("flexmore_import()");
	fm_import_check_privilege();
	if (model_name[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("model name must not be empty")));
	if (!is_absolute_path(source_dir))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("checkpoint directory \"%s\" is not an absolute path", source_dir)));
	canonicalize_path(source_dir);

	memset(&state, 0, sizeof(state));
	state.model_name = model_name;
	state.dir = source_dir;

	/* Phase 1: validate everything; nothing is written yet. */
	fm_import_read_metadata(&state);
	fm_import_read_headers(&state);
	fm_import_match_layout(&state);

	/* Phase 2: write. */
	SPI_connect();
	fm_switch_to_owner(&sw);
	PG_TRY();
	{
		model_id = fm_import_store(&state, replace);
	}
	PG_FINALLY();
	{
		fm_restore_user(&sw);
	}
	PG_END_TRY();
	SPI_finish();

	fm_model_forget(model_name);
	PG_RETURN_INT64(model_id);
}
