/*-------------------------------------------------------------------------
 *
 * reader.h
 *	  Checkpoint file readers: config.json, safetensors headers and the
 *	  model.safetensors.index.json shard list.
 *
 * These files parse JSON with PostgreSQL's own parser (common/jsonapi.h),
 * which exists both in the server and in libpgcommon for frontend
 * programs.  Each .c file here includes postgres.h in the server build and
 * postgres_fe.h when FRONTEND is defined, so the same code serves
 * flexmore_import and the command-line tools.  They allocate with palloc
 * (pg_malloc in frontend builds) and report failure through fm_error,
 * never through ereport, so the caller decides how to raise it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_READER_H
#define FLEXMORE_READER_H

#include "engine/engine.h"

/*
 * Parses config.json text into *config, applying the defaults of the
 * FlexOlmo config: num_key_value_heads = num_attention_heads, head_dim =
 * hidden/heads, rope_theta from the top level or rope_parameters (missing
 * is an error, never 10000), eos_token_id a number or a list.
 * model_type must be flex_olmo or flexmore; flexmore needs expert_ranks.
 * rope_scaling other than null is FM_EUNSUPPORTED.
 */
fm_status	fm_config_parse(const char *json, size_t len, fm_config *config,
							fm_error *err);

/*
 * Expert names from config.json's optional "expert_names" list; when it is
 * absent, expert 0 is "public" and expert e is "expert_<e>".  names must
 * have room for num_experts entries; each is palloc'd.
 */
fm_status	fm_config_expert_names(const char *json, size_t len, const fm_config *config,
								   char **names, fm_error *err);

/* One tensor in a safetensors header. */
typedef struct fm_st_tensor
{
	char	   *name;
	char		dtype_name[16];	/* as written in the file */
	bool		dtype_supported;	/* F32, BF16 or F16 */
	fm_dtype	dtype;
	int32_t		ndim;
	int64_t		shape[FM_MAX_DIMS];
	uint64_t	begin;			/* absolute file offsets, [begin, end) */
	uint64_t	end;
} fm_st_tensor;

typedef struct fm_st_file
{
	uint64_t	file_size;
	uint64_t	header_len;		/* n, the JSON length after the 8-byte prefix */
	uint64_t	data_start;		/* 8 + n */
	int32_t		num_tensors;
	fm_st_tensor *tensors;		/* sorted by name */
} fm_st_file;

/*
 * Parses and validates a safetensors header.  The caller decodes the
 * file's 8-byte length prefix into header_len and passes the header_len
 * bytes that follow, plus the whole file's size.  Rejects a header length
 * beyond the file, a byte count that does not match dtype x shape, ranges
 * outside the data area or with end < begin, overlapping ranges and
 * duplicate names.  A dtype other than F32, BF16 and F16 is not an error
 * here: the tensor gets dtype_supported false, and the caller rejects it
 * by name if it needs that tensor.  On failure *out is empty.
 */
fm_status	fm_st_parse_header(const char *header, uint64_t header_len,
							   uint64_t file_size, fm_st_file *out, fm_error *err);

/* Frees the tensor list of a parsed header. */
void		fm_st_free(fm_st_file *file);

/* Finds a tensor by name, or NULL. */
const fm_st_tensor *fm_st_find(const fm_st_file *file, const char *name);

/*
 * Parses model.safetensors.index.json: fills *names and *files with the
 * weight_map's tensor names and shard file names (parallel arrays).
 * Shard names containing '/' or starting with '.' are rejected.
 */
fm_status	fm_st_parse_index(const char *json, size_t len, char ***names,
							  char ***files, int32_t *n, fm_error *err);

#endif							/* FLEXMORE_READER_H */
