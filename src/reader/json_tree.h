/*-------------------------------------------------------------------------
 *
 * json_tree.h
 *	  A small JSON document tree built on PostgreSQL's JSON parser, for the
 *	  checkpoint readers.
 *
 * Checkpoint JSON files (config.json, safetensors headers, shard indexes)
 * are read whole and then queried by key, which a tree makes simpler than
 * parser callbacks.  Nodes are palloc'd in the current memory context;
 * fm_json_free releases a tree in frontend builds, where nothing else
 * would.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_JSON_TREE_H
#define FLEXMORE_JSON_TREE_H

#include "engine/engine.h"

typedef enum fm_json_kind
{
	FM_JSON_NULL,
	FM_JSON_BOOL,
	FM_JSON_NUMBER,
	FM_JSON_STRING,
	FM_JSON_ARRAY,
	FM_JSON_OBJECT
} fm_json_kind;

typedef struct fm_json
{
	fm_json_kind kind;
	char	   *text;			/* de-escaped string, number text, "true" */
	int32_t		count;			/* members or elements */
	int32_t		capacity;
	char	  **keys;			/* [count] member names, objects only */
	struct fm_json **items;		/* [count] */
	struct fm_json *parent;
} fm_json;

/*
 * Parses len bytes of UTF-8 JSON.  what names the document in error
 * messages ("config.json").
 */
fm_status	fm_json_parse(const char *json, size_t len, const char *what,
						  fm_json **out, fm_error *err);
void		fm_json_free(fm_json *node);

/*
 * Rewrites \uXXXX escapes of non-ASCII characters in JSON text as raw UTF-8
 * bytes, so that the server's JSON parser, which converts such escapes to
 * the database encoding rather than to UTF-8, yields UTF-8 strings in any
 * database.  Returns json itself when nothing needs rewriting, otherwise a
 * palloc'd copy; *out_len receives the length either way.
 */
const char *fm_json_utf8_escapes(const char *json, size_t len, size_t *out_len);

/* First member of object named key, or NULL (also when obj is no object). */
const fm_json *fm_json_member(const fm_json *obj, const char *key);

/*
 * Reads a number node as an integer; false when the node is not a number
 * or its value is not an integer within int64.
 */
bool		fm_json_int64(const fm_json *node, int64_t *out);

/* Reads a number node as a double; false when it is not a number. */
bool		fm_json_double(const fm_json *node, double *out);

const char *fm_json_kind_name(fm_json_kind kind);

#endif							/* FLEXMORE_JSON_TREE_H */
