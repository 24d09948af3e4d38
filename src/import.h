/*-------------------------------------------------------------------------
 *
 * import.h
 *	  The checkpoint importer shared by flexmore_import (server files),
 *	  flexmore_import_lo (large objects) and the expert functions.
 *
 * A checkpoint is read through an fm_import_source, which names files the
 * way a checkpoint directory does (config.json, model.safetensors, ...)
 * and hides where their bytes are.  Validation and storage are the same
 * code for every source, so a checkpoint streamed by the client command
 * is checked exactly as one read from the server's disk.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_IMPORT_H
#define FLEXMORE_IMPORT_H

#include "flexmore.h"

#include "reader/reader.h"
#include "utils/jsonb.h"

/*
 * Where a checkpoint's files come from.  open returns a handle for read
 * and close, and raises an error naming the file when it cannot open it.
 * read reads exactly len bytes at offset or raises an error.  label
 * returns the name to print in messages (a path, or a file name).
 */
typedef struct fm_import_source
{
	bool		(*exists) (struct fm_import_source *src, const char *name);
	void	   *(*open) (struct fm_import_source *src, const char *name, uint64 *size);
	void		(*read) (void *handle, const char *label, char *buf, size_t len,
						 uint64 offset);
	void		(*close) (void *handle);
	char	   *(*label) (struct fm_import_source *src, const char *name);
	const char *description;	/* "checkpoint \"/dir\"" or similar */
	void	   *arg;
} fm_import_source;

/* One safetensors file of the checkpoint. */
typedef struct fm_import_file
{
	char	   *name;			/* file name inside the checkpoint */
	char	   *label;			/* name for messages */
	fm_st_file	st;
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
	fm_import_source *src;
	fm_config	config;
	char	   *config_json;
	size_t		config_len;
	char	  **expert_names;
	char	   *tokenizer_json;	/* NULL when not read */
	int			nfiles;
	fm_import_file *files;
	int			ntensors;
	fm_import_tensor *tensors;	/* every tensor of every file, sorted by name */
	const fm_import_file *open_file;	/* file of open_handle, or NULL */
	void	   *open_handle;
} fm_import_state;

/* The server-file source over an absolute, canonical directory path. */
extern void fm_import_source_dir(fm_import_source *src, const char *dir);

/*
 * The large-object source: files maps each file name to the OID of a
 * large object, read with the current user's privileges (import_lo.c).
 */
extern void fm_import_source_lo(fm_import_source *src, Jsonb *files);

/*
 * Phase 1: reads config.json, tokenizer.json (when need_tokenizer, or
 * when present) and the safetensors headers, and matches every tensor
 * against the layout the config needs.  Writes nothing.
 */
extern void fm_import_validate(fm_import_state *s, bool need_tokenizer);

/* Finds a tensor of the checkpoint by name, or NULL. */
extern fm_import_tensor *fm_import_find(fm_import_state *s, const char *name);

/*
 * Phase 2: writes the validated checkpoint as model s->model_name.
 * The caller has an open SPI connection and runs as the extension owner.
 * Returns the new model's id.
 */
extern int64 fm_import_store(fm_import_state *s, bool replace);

/*
 * Streams one tensor from its file, rejecting non-finite values, and
 * fills sha256 (32 bytes) with the checksum of its bytes.  With
 * tensor_id > 0 the chunks and the checksum are stored under that tensor
 * and the stored bytes are returned; with tensor_id 0 the bytes are only
 * hashed.  The file stays open for the next call; fm_import_close_file
 * closes it.
 */
extern int64 fm_import_stream_tensor(fm_import_state *s, const fm_import_tensor *t,
									 int64 tensor_id, uint8 *sha256);

extern void fm_import_close_file(fm_import_state *s);

/* Reads len bytes at offset inside a tensor's data into buf. */
extern void fm_import_read_tensor_bytes(fm_import_state *s, const fm_import_tensor *t,
										uint64 offset, size_t len, char *buf);

/*
 * Raises an error naming the first NaN or infinite element among the n
 * elements of t's dtype in buf.  first_index is the flat index of buf[0]
 * in the tensor.
 */
extern void fm_import_check_finite(const char *label, const fm_st_tensor *t,
								   const char *buf, size_t n, uint64 first_index);

/* Converts UTF-8 from a checkpoint file to the database encoding. */
extern char *fm_import_to_server(const char *s);

/*
 * Runs fm_import_store inside SPI as the extension owner, then drops this
 * backend's cached copy of the model.
 */
extern int64 fm_import_store_as_owner(fm_import_state *s, bool replace);

/*
 * Longest model or expert name, in bytes of the database encoding: the
 * length of an SQL identifier, which is also what the shared cache keeps
 * of a name (cache.c).
 */
#define FM_MAX_NAME_BYTES	(NAMEDATALEN - 1)

/*
 * Raise 22023 for an empty name and 42622 (name_too_long) for one longer
 * than FM_MAX_NAME_BYTES.
 */
extern void fm_check_model_name(const char *model_name);
extern void fm_check_expert_name(const char *expert_name);

/* First key of the advisory lock that fm_lock_model_name takes: "FMMN". */
#define FM_NAME_LOCK_CLASS	0x464d4d4e

/*
 * Takes a transaction-level advisory lock on a model name; every function
 * that creates, replaces, drops or changes a model takes it first.
 */
extern void fm_lock_model_name(const char *model_name);

/*
 * Privilege checks; each raises 42501 naming action when the current user
 * lacks the privilege.  fm_check_admin applies flexmore.admin_role.
 */
extern char *flexmore_admin_role;
extern void fm_check_admin(const char *action);
extern void fm_check_read_server_files(const char *action);

#endif							/* FLEXMORE_IMPORT_H */
