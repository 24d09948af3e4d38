/*-------------------------------------------------------------------------
 *
 * checkpoint.h
 *	  Loading a checkpoint folder into an fp32 fm_model, for the command-line
 *	  programs over the engine (tools/flexmore-run, bench/engine-bench).
 *
 * Every tensor is widened to fp32 in memory.  Errors print
 * "PROGRAM: message" on stderr and exit with status 1, because these are
 * short-lived programs with nothing to clean up.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_TOOLS_CHECKPOINT_H
#define FLEXMORE_TOOLS_CHECKPOINT_H

#include "engine/engine.h"

typedef struct loaded_tensor
{
	char	   *name;
	int32_t		ndim;
	int64_t		shape[FM_MAX_DIMS];
	float	   *data;			/* [product(shape)] fp32 */
} loaded_tensor;

typedef struct checkpoint
{
	char	   *config_json;
	size_t		config_len;
	fm_config	config;
	int32_t		num_tensors;
	loaded_tensor *tensors;		/* sorted by name */
	fm_layer_weights *layers;	/* [num_hidden_layers] */
	fm_model	model;			/* fp32, bound to tensors */
	fm_tokenizer *tokenizer;	/* NULL without tokenizer.json */
} checkpoint;

/* Program name that tool_fail puts before each message. */
extern const char *tool_name;

/* Prints "tool_name: message" on stderr and exits with status 1. */
void		tool_fail(const char *fmt,...) pg_attribute_printf(1, 2) pg_attribute_noreturn();

/* Calls tool_fail with "what: engine message" unless status is FM_OK. */
void		tool_check(fm_status status, const fm_error *err, const char *what);

/* Reads a whole file; NULL when it does not exist and missing_ok is set. */
char	   *tool_read_file(const char *path, size_t *len, bool missing_ok);

/*
 * Loads config.json, model.safetensors (or the shards of
 * model.safetensors.index.json) and, when load_tokenizer is set and the
 * file exists, tokenizer.json from dir, and binds and validates the model.
 */
void		checkpoint_load(checkpoint *ck, const char *dir, bool load_tokenizer);

/* Sets allowed[e] for each expert named in the comma-separated list. */
void		checkpoint_parse_experts(const checkpoint *ck, const char *list, bool *allowed);

#endif							/* FLEXMORE_TOOLS_CHECKPOINT_H */
