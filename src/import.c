/*-------------------------------------------------------------------------
 *
 * import.c
 *	  flexmore_import: copies a checkpoint directory on the server into the
 *	  flexmore tables.  The validation and storage phases here also serve
 *	  the large-object import (import_lo.c) and the expert functions
 *	  (experts.c), which read their files through another fm_import_source.
 *
 * A checkpoint directory contains config.json, tokenizer.json and either
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
 *	   FM_CHUNK_RAW_MAX bytes, so memory use does not grow with the model,
 *	   and rejects a NaN or infinite weight as it reads it.
 *
 * Nothing is written before phase 2, and everything runs in the caller's
 * transaction, so a failed import leaves nothing behind.  Tensors keep the
 * dtype of the file; conversion to fp32 happens when a backend loads them.
 *
 *-------------------------------------------------------------------------
 */
#include "import.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "catalog/pg_authid.h"
#include "common/cryptohash.h"
#include "common/hashfn.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/snapmgr.h"

PG_FUNCTION_INFO_V1(flexmore_import);

/* JSON files larger than this are rejected rather than read into memory. */
#define FM_MAX_JSON_BYTES	((size_t) 256 * 1024 * 1024)

/* safetensors headers larger than this are rejected, as other readers do. */
#define FM_MAX_ST_HEADER	((uint64) 100 * 1024 * 1024)

#define FM_INDEX_FILE		"model.safetensors.index.json"

/* ---------- the server-file source ---------- */

typedef struct fm_dir_handle
{
	int			fd;
} fm_dir_handle;

static char *
fm_dir_label(fm_import_source *src, const char *name)
{
	return psprintf("%s/%s", (const char *) src->arg, name);
}

static bool
fm_dir_exists(fm_import_source *src, const char *name)
{
	struct stat st;

	return stat(fm_dir_label(src, name), &st) == 0;
}

/* Names the type of a file that is not a regular file, for messages. */
static const char *
fm_file_type_name(mode_t mode)
{
	if (S_ISDIR(mode))
		return "a directory";
	if (S_ISFIFO(mode))
		return "a FIFO";
	if (S_ISSOCK(mode))
		return "a socket";
	if (S_ISCHR(mode))
		return "a character device";
	if (S_ISBLK(mode))
		return "a block device";
	return "not a regular file";
}

/* Raises 42809 for a checkpoint file that is not a regular file. */
static void
fm_dir_check_regular(const char *path, mode_t mode)
{
	if (S_ISREG(mode))
		return;
	ereport(ERROR,
			(errcode(ERRCODE_WRONG_OBJECT_TYPE),
			 errmsg("file \"%s\" is not a regular file", path),
			 errdetail("It is %s.", fm_file_type_name(mode)),
			 errhint("A checkpoint directory must contain regular files (or symbolic links to them).")));
}

/*
 * Opens a checkpoint file, raising an error naming it when that fails.
 *
 * Opening a FIFO for reading blocks until a writer appears, in a system
 * call that neither statement_timeout nor pg_terminate_backend can
 * interrupt, and a device can block or never end.  So the type is checked
 * with stat() before the open, and again with fstat() on a descriptor
 * opened with O_NONBLOCK, which closes the race of a file replaced in
 * between.  O_NONBLOCK is cleared before any read.
 */
static void *
fm_dir_open(fm_import_source *src, const char *name, uint64 *size)
{
	char	   *path = fm_dir_label(src, name);
	fm_dir_handle *h = palloc(sizeof(fm_dir_handle));
	struct stat st;
	int			flags;

	if (stat(path, &st) < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open file \"%s\": %m", path)));
	fm_dir_check_regular(path, st.st_mode);

	h->fd = OpenTransientFile(path, O_RDONLY | O_NONBLOCK | PG_BINARY);
	if (h->fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open file \"%s\": %m", path)));
	if (fstat(h->fd, &st) < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not stat file \"%s\": %m", path)));
	fm_dir_check_regular(path, st.st_mode);
	flags = fcntl(h->fd, F_GETFL);
	if (flags < 0 || fcntl(h->fd, F_SETFL, flags & ~O_NONBLOCK) < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not set file flags of \"%s\": %m", path)));
	*size = (uint64) st.st_size;
	return h;
}

/* Reads exactly len bytes at offset, raising an error on a short read. */
static void
fm_dir_read(void *handle, const char *label, char *buf, size_t len, uint64 offset)
{
	fm_dir_handle *h = handle;
	size_t		done = 0;

	while (done < len)
	{
		size_t		want = Min(len - done, (size_t) 1 << 30);
		ssize_t		got = pg_pread(h->fd, buf + done, want, (off_t) (offset + done));

		if (got < 0)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not read file \"%s\": %m", label)));
		if (got == 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("could not read file \"%s\": read %zu of %zu bytes at offset " UINT64_FORMAT,
							label, done, len, offset),
					 errdetail("The file is shorter than its header says; it may have changed during the import.")));
		done += got;
	}
}

static void
fm_dir_close(void *handle)
{
	fm_dir_handle *h = handle;

	CloseTransientFile(h->fd);
	pfree(h);
}

void
fm_import_source_dir(fm_import_source *src, const char *dir)
{
	memset(src, 0, sizeof(*src));
	src->exists = fm_dir_exists;
	src->open = fm_dir_open;
	src->read = fm_dir_read;
	src->close = fm_dir_close;
	src->label = fm_dir_label;
	src->description = psprintf("checkpoint \"%s\"", dir);
	src->arg = pstrdup(dir);
}

/* ---------- phase 1: validation ---------- */

/* Reads a whole JSON file into a NUL-terminated buffer. */
static char *
fm_read_json_file(fm_import_source *src, const char *name, size_t *len)
{
	char	   *label = src->label(src, name);
	uint64		size;
	void	   *h = src->open(src, name, &size);
	char	   *buf;

	if (size > FM_MAX_JSON_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("file \"%s\" is too large: " UINT64_FORMAT " bytes, at most %zu",
						label, size, FM_MAX_JSON_BYTES)));
	buf = palloc((size_t) size + 1);
	src->read(h, label, buf, (size_t) size, 0);
	buf[size] = '\0';
	src->close(h);
	if (memchr(buf, '\0', (size_t) size) != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("file \"%s\" contains a NUL byte", label)));
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

/* Loads tokenizer.json once to validate it against the config. */
static void
fm_import_check_tokenizer(fm_import_state *s, const char *path, size_t len)
{
	fm_error	err = {0};
	MemoryContext tok_cxt;
	fm_allocator a;
	fm_tokenizer *tok;
	int32		id_limit;

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

/* Phase 1a: config.json, expert names and tokenizer.json. */
static void
fm_import_read_metadata(fm_import_state *s, bool need_tokenizer)
{
	fm_import_source *src = s->src;
	char	   *path;
	size_t		len;
	fm_error	err = {0};

	path = src->label(src, "config.json");
	s->config_json = fm_read_json_file(src, "config.json", &s->config_len);
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
	{
		size_t		len = strlen(fm_import_to_server(s->expert_names[i]));

		if (len > FM_MAX_NAME_BYTES)
			ereport(ERROR,
					(errcode(ERRCODE_NAME_TOO_LONG),
					 errmsg("file \"%s\": expert_names entry %d is too long: %zu bytes, at most %d",
							path, i, len, FM_MAX_NAME_BYTES),
					 errdetail("Model and expert names are limited to %d bytes, like SQL identifiers.",
							   FM_MAX_NAME_BYTES)));
	}
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

	if (!need_tokenizer && !src->exists(src, "tokenizer.json"))
		return;
	path = src->label(src, "tokenizer.json");
	s->tokenizer_json = fm_read_json_file(src, "tokenizer.json", &len);
	fm_import_check_tokenizer(s, path, len);
}

/* Reads and parses one safetensors header. */
static void
fm_import_read_header(fm_import_source *src, fm_import_file *f)
{
	uint64		size;
	void	   *h = src->open(src, f->name, &size);
	unsigned char prefix[8];
	uint64		header_len = 0;
	char	   *header;
	fm_error	err = {0};

	if (size < 8)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("file \"%s\" is not a safetensors file: it has " UINT64_FORMAT " bytes, fewer than the 8-byte header length",
						f->label, size)));
	src->read(h, f->label, (char *) prefix, 8, 0);
	for (int i = 7; i >= 0; i--)
		header_len = (header_len << 8) | prefix[i];
	if (header_len > size - 8 || header_len > FM_MAX_ST_HEADER)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("file \"%s\" has a safetensors header length of " UINT64_FORMAT " bytes, but the file has " UINT64_FORMAT " bytes",
						f->label, header_len, size),
				 errdetail("Headers longer than the file or longer than " UINT64_FORMAT " bytes are rejected.",
						   FM_MAX_ST_HEADER)));

	header = palloc(header_len + 1);
	src->read(h, f->label, header, header_len, 8);
	header[header_len] = '\0';
	src->close(h);

	if (fm_st_parse_header(header, header_len, size, &f->st, &err) != FM_OK)
		fm_raise_file(&err, f->label);
	pfree(header);
}

static int
fm_import_tensor_cmp(const void *a, const void *b)
{
	return strcmp(((const fm_import_tensor *) a)->tensor->name,
				  ((const fm_import_tensor *) b)->tensor->name);
}

fm_import_tensor *
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
	fm_import_source *src = s->src;
	char	   *index_path = src->label(src, FM_INDEX_FILE);
	char	  **names = NULL;
	char	  **shards = NULL;
	int32		nnames = 0;
	int			k = 0;

	if (src->exists(src, FM_INDEX_FILE))
	{
		size_t		len;
		char	   *json = fm_read_json_file(src, FM_INDEX_FILE, &len);
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
		s->files[i].label = src->label(src, s->files[i].name);
		fm_import_read_header(src, &s->files[i]);
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
							s->tensors[i].tensor->name, s->tensors[i - 1].file->label,
							s->tensors[i].file->label)));

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
						t->file->label, st->name, st->dtype_name),
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
					t->file->label, st->name, got.data, want.data)));
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
		fm_raise_file(&err, s->src->label(s->src, "config.json"));

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
					 errmsg("%s has no tensor \"%s\"", s->src->description, spec->name),
					 errdetail("config.json (model_type %s, %d layers, %d experts) needs it.",
							   s->config.model_type, s->config.num_hidden_layers,
							   s->config.num_experts)));
	}

	for (int i = 0; i < s->ntensors; i++)
		if (!s->tensors[i].used)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("file \"%s\": tensor \"%s\" is not part of the model that config.json describes",
							s->tensors[i].file->label, s->tensors[i].tensor->name),
					 errhint("Check num_experts, num_hidden_layers and expert_ranks in config.json.")));
	MemoryContextDelete(cxt);
}

void
fm_import_validate(fm_import_state *s, bool need_tokenizer)
{
	fm_import_read_metadata(s, need_tokenizer);
	fm_import_read_headers(s);
	fm_import_match_layout(s);
}

/* ---------- phase 2: storage ---------- */

/*
 * Makes t's file the open one, checking that its size is still the one
 * its header was read with.
 */
static void
fm_import_open_file(fm_import_state *s, const fm_import_file *f)
{
	uint64		size;

	if (s->open_file == f)
		return;
	fm_import_close_file(s);
	s->open_handle = s->src->open(s->src, f->name, &size);
	s->open_file = f;
	if (size != f->st.file_size)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("file \"%s\" changed size during the import", f->label)));
}

void
fm_import_close_file(fm_import_state *s)
{
	if (s->open_file != NULL)
		s->src->close(s->open_handle);
	s->open_file = NULL;
	s->open_handle = NULL;
}

void
fm_import_read_tensor_bytes(fm_import_state *s, const fm_import_tensor *t,
							uint64 offset, size_t len, char *buf)
{
	Assert(offset + len <= t->tensor->end - t->tensor->begin);
	fm_import_open_file(s, t->file);
	s->src->read(s->open_handle, t->file->label, buf, len, t->tensor->begin + offset);
}

/* True when the element at p, of dtype, is a NaN or an infinity. */
static inline bool
fm_element_nonfinite(fm_dtype dtype, const unsigned char *p)
{
	switch (dtype)
	{
		case FM_DTYPE_F32:
			return (p[3] & 0x7f) == 0x7f && (p[2] & 0x80) == 0x80;
		case FM_DTYPE_BF16:
			return (p[1] & 0x7f) == 0x7f && (p[0] & 0x80) == 0x80;
		case FM_DTYPE_F16:
			return (p[1] & 0x7c) == 0x7c;
	}
	return false;
}

void
fm_import_check_finite(const char *label, const fm_st_tensor *t, const char *buf,
					   size_t n, uint64 first_index)
{
	size_t		esize = fm_dtype_size(t->dtype);
	const unsigned char *p = (const unsigned char *) buf;
	uint64		coords[FM_MAX_DIMS];
	StringInfoData where;
	uint64		index;
	uint64		rest;

	for (size_t i = 0; i < n; i++, p += esize)
	{
		if (!fm_element_nonfinite(t->dtype, p))
			continue;

		/* Name the element by its flat index and by its coordinates. */
		index = first_index + i;
		rest = index;
		for (int d = t->ndim - 1; d >= 0; d--)
		{
			uint64		dim = t->shape[d] > 0 ? (uint64) t->shape[d] : 1;

			coords[d] = rest % dim;
			rest /= dim;
		}
		initStringInfo(&where);
		for (int d = 0; d < t->ndim; d++)
			appendStringInfo(&where, "%s" UINT64_FORMAT, d > 0 ? ", " : "", coords[d]);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("file \"%s\": tensor \"%s\" has a non-finite value (NaN or infinity) at element " UINT64_FORMAT " [%s]",
						label, t->name, index, where.data),
				 errdetail("A checkpoint whose weights are not all finite would give NaN logits.")));
	}
}

int64
fm_import_stream_tensor(fm_import_state *s, const fm_import_tensor *t,
						int64 tensor_id, uint8 *sha256)
{
	const fm_st_tensor *st = t->tensor;
	uint64		len = st->end - st->begin;
	size_t		esize = st->dtype_supported ? fm_dtype_size(st->dtype) : 1;
	uint64		done = 0;
	int64		stored = 0;
	pg_cryptohash_ctx *sha;
	int			seq = 0;
	char	   *buf;

	Assert(st->dtype_supported);
	buf = MemoryContextAllocHuge(CurrentMemoryContext, Min(Max(len, 1), FM_CHUNK_RAW_MAX));
	sha = pg_cryptohash_create(PG_SHA256);
	if (pg_cryptohash_init(sha) < 0)
		elog(ERROR, "could not initialize SHA-256: %s", pg_cryptohash_error(sha));

	while (done < len)
	{
		size_t		n = (size_t) Min(len - done, (uint64) FM_CHUNK_RAW_MAX);

		CHECK_FOR_INTERRUPTS();
		fm_import_read_tensor_bytes(s, t, done, n, buf);
		fm_import_check_finite(t->file->label, st, buf, n / esize, done / esize);
		if (pg_cryptohash_update(sha, (const uint8 *) buf, n) < 0)
			elog(ERROR, "could not update SHA-256: %s", pg_cryptohash_error(sha));
		if (tensor_id > 0)
			stored += fm_storage_insert_chunk(tensor_id, seq++, buf, n);
		done += n;
	}

	if (pg_cryptohash_final(sha, sha256, PG_SHA256_DIGEST_LENGTH) < 0)
		elog(ERROR, "could not finalize SHA-256: %s", pg_cryptohash_error(sha));
	pg_cryptohash_free(sha);
	pfree(buf);
	if (tensor_id > 0)
		fm_storage_set_checksum(tensor_id, sha256);
	return stored;
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

char *
fm_import_to_server(const char *s)
{
	return pg_any_to_server(s, strlen(s), PG_UTF8);
}

/*
 * Inserts the model row.  fm_lock_model_name serialises writers of one
 * name, but a REPEATABLE READ or SERIALIZABLE transaction keeps the
 * snapshot it started with, so it may not see a row that a concurrent
 * import committed while it waited.  Its insert then violates the unique
 * index on the name, which is reported as the serialization failure it
 * is, so the caller can retry the transaction.
 */
static int64
fm_import_insert_model_row(fm_import_state *s, int64 generation)
{
	MemoryContext cxt = CurrentMemoryContext;
	char	   *config = fm_import_to_server(s->config_json);
	volatile int64 model_id = 0;

	PG_TRY();
	{
		model_id = fm_storage_insert_model(s->model_name, s->config.model_type, config,
										   generation);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		if (edata->sqlerrcode != ERRCODE_UNIQUE_VIOLATION)
			PG_RE_THROW();
		FlushErrorState();
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not import model \"%s\": another transaction imported it concurrently",
						s->model_name),
				 errhint("Retry the transaction.")));
	}
	PG_END_TRY();
	return model_id;
}

int64
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
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	fm_governance_saved *governance = fm_governance_save(s->model_name);

	if (fm_storage_delete_model(s->model_name, &old_generation))
	{
		if (!replace)
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("model \"%s\" already exists", s->model_name),
					 errhint("Pass replace => true to import over it, or drop it with flexmore_drop_model().")));
		generation = old_generation + 1;
	}

	model_id = fm_import_insert_model_row(s, generation);
	for (int e = 0; e < s->config.num_experts; e++)
		fm_storage_insert_expert(model_id, e, fm_import_to_server(s->expert_names[e]),
								 s->config.expert_ranks[e]);
	fm_governance_restore(governance, model_id);
	fm_storage_insert_tokenizer(model_id, s->tokenizer_json);

	/* Store in file order, so each file is read front to back. */
	order = palloc(sizeof(fm_import_tensor *) * Max(s->ntensors, 1));
	for (int i = 0; i < s->ntensors; i++)
		order[norder++] = &s->tensors[i];
	qsort(order, norder, sizeof(fm_import_tensor *), fm_import_offset_cmp);

	for (int i = 0; i < norder; i++)
	{
		const fm_import_tensor *t = order[i];
		const fm_st_tensor *st = t->tensor;
		int64		numel = 1;
		int64		tensor_id;

		for (int d = 0; d < st->ndim; d++)
			numel *= st->shape[d];
		parameters += numel;
		raw_bytes += (int64) (st->end - st->begin);
		tensor_id = fm_storage_insert_tensor(model_id, st->name, t->expert, st->dtype,
											 st->ndim, st->shape,
											 (int64) (st->end - st->begin));
		stored_bytes += fm_import_stream_tensor(s, t, tensor_id, digest);
	}
	fm_import_close_file(s);

	fm_storage_finish_model(model_id, parameters, raw_bytes, stored_bytes);
	return model_id;
}

/* ---------- privileges ---------- */

/* Role whose members may import, drop and change models; "" for none. */
char	   *flexmore_admin_role = NULL;

void
fm_check_read_server_files(const char *action)
{
	if (!has_privs_of_role(GetUserId(), ROLE_PG_READ_SERVER_FILES))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to %s from server files", action),
				 errdetail("Only roles with privileges of the \"%s\" role may read checkpoint files on the server.",
						   "pg_read_server_files")));
}

/*
 * Checks flexmore.admin_role: when it names a role, only roles with the
 * privileges of that role (and superusers) may import, drop or change
 * models.  An empty setting leaves the decision to EXECUTE grants alone.
 */
void
fm_check_admin(const char *action)
{
	Oid			admin;

	if (flexmore_admin_role == NULL || flexmore_admin_role[0] == '\0')
		return;
	admin = get_role_oid(flexmore_admin_role, true);
	if (!OidIsValid(admin))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role \"%s\" named by flexmore.admin_role does not exist",
						flexmore_admin_role),
				 errhint("Create the role, or set flexmore.admin_role to a role that exists or to an empty string.")));
	if (!has_privs_of_role(GetUserId(), admin))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to %s", action),
				 errdetail("Only roles with privileges of the \"%s\" role (flexmore.admin_role) may do this.",
						   flexmore_admin_role)));
}

void
fm_import_define_settings(void)
{
	DefineCustomStringVariable("flexmore.admin_role",
							   "Role whose members may import, drop and change models.",
							   "Empty means that EXECUTE on the functions decides alone.",
							   &flexmore_admin_role,
							   "",
							   PGC_SUSET, 0,
							   NULL, NULL, NULL);
}

/* Raises 22023 for an empty name and 42622 for one over FM_MAX_NAME_BYTES. */
static void
fm_check_name(const char *kind, const char *name)
{
	size_t		len = strlen(name);

	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s name must not be empty", kind)));
	if (len > FM_MAX_NAME_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_NAME_TOO_LONG),
				 errmsg("%s name \"%.*s...\" is too long: %zu bytes, at most %d",
						kind, pg_mbcliplen(name, (int) len, 20), name, len, FM_MAX_NAME_BYTES),
				 errdetail("Model and expert names are limited to %d bytes, like SQL identifiers.",
						   FM_MAX_NAME_BYTES)));
}

/* Checks the model name argument of the functions that create a model. */
void
fm_check_model_name(const char *model_name)
{
	fm_check_name("model", model_name);
}

/* Checks an expert name in the database encoding, before it is stored. */
void
fm_check_expert_name(const char *expert_name)
{
	fm_check_name("expert", expert_name);
}

/*
 * Takes a transaction-level advisory lock on a model name, so imports,
 * replacements, drops and expert changes of one name run one after the
 * other.  A waiter that goes on after the holder commits sees the
 * holder's rows in its next query (in READ COMMITTED, each SPI query takes
 * a new snapshot), so it reports "already exists" or replaces the model
 * instead of hitting the unique index.  The lock has the two-key form
 * with FM_NAME_LOCK_CLASS as its first key, so it does not collide with
 * single-key advisory locks of applications.  Two names with the same
 * hash share a lock, which only serialises them.
 */
void
fm_lock_model_name(const char *model_name)
{
	uint32		hash = DatumGetUInt32(hash_any((const unsigned char *) model_name,
											   (int) strlen(model_name)));

	DirectFunctionCall2(pg_advisory_xact_lock_int4,
						Int32GetDatum(FM_NAME_LOCK_CLASS), Int32GetDatum((int32) hash));
}

/* Runs phase 2 with SPI as the extension owner and returns the model id. */
int64
fm_import_store_as_owner(fm_import_state *s, bool replace)
{
	fm_user_switch sw;
	volatile int64 model_id = 0;

	fm_lock_model_name(s->model_name);
	SPI_connect();
	fm_switch_to_owner(&sw);
	PG_TRY();
	{
		/* A snapshot taken after the lock; see fm_as_owner in experts.c. */
		PushActiveSnapshot(GetTransactionSnapshot());
		model_id = fm_import_store(s, replace);
		PopActiveSnapshot();
	}
	PG_FINALLY();
	{
		fm_restore_user(&sw);
	}
	PG_END_TRY();
	SPI_finish();

	fm_model_forget(s->model_name);
	return model_id;
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
	fm_import_source src;
	fm_import_state state;

	PreventCommandIfReadOnly("flexmore_import()");
	fm_check_read_server_files("import a model");
	fm_check_admin("import a model");
	fm_check_model_name(model_name);
	if (!is_absolute_path(source_dir))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("checkpoint directory \"%s\" is not an absolute path", source_dir)));
	canonicalize_path(source_dir);

	fm_import_source_dir(&src, source_dir);
	memset(&state, 0, sizeof(state));
	state.model_name = model_name;
	state.src = &src;

	/* Phase 1: validate everything; nothing is written yet. */
	fm_import_validate(&state, true);

	/* Phase 2: write. */
	PG_RETURN_INT64(fm_import_store_as_owner(&state, replace));
}
