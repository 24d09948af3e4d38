/*-------------------------------------------------------------------------
 *
 * tokenizer_json.c
 *	  Loads a Hugging Face tokenizer.json into the engine's tokenizer.
 *
 * The file is parsed in one streaming pass with PostgreSQL's JSON parser.
 * model.vocab (100k+ entries) goes straight into the tokenizer as the
 * parser reports each entry, and model.merges is copied into one compact
 * buffer, because the merges may come before the vocabulary they use.
 * Everything else (normalizer, pre_tokenizer, decoder, added_tokens, ...)
 * is small, so it is kept as a little tree and checked after the parse.
 *
 * Only what the engine implements is accepted; any other component type
 * is FM_EUNSUPPORTED naming the type, never replaced by a default:
 *	- normalizer: null (or an empty Sequence)
 *	- pre_tokenizer: ByteLevel, or a Sequence of Split steps ending with
 *	  ByteLevel
 *	- model: BPE without dropout, byte fallback, continuing_subword_prefix
 *	  or end_of_word_suffix
 *	- decoder: ByteLevel.  A null decoder is rejected too, because Hugging
 *	  Face then joins the byte-level token strings with spaces, and
 *	  decoding as ByteLevel would silently differ from it.
 *	- post_processor: null, ByteLevel, TemplateProcessing or a Sequence of
 *	  those.  They only add special tokens or adjust offsets, and the
 *	  engine adds no special token (no BOS) itself, so they are ignored.
 *	- added_tokens: single_word true is unsupported.
 *
 * Memory: the tokenizer comes from the caller's fm_allocator, and so do
 * the temporary tree and merge buffer, which are freed before returning.
 * NB: the JSON parser allocates its tokens with palloc (pg_malloc in
 * frontend builds), so running out of memory inside the parser raises an
 * ERROR in the server and exits a frontend program.
 *
 *-------------------------------------------------------------------------
 */
#ifdef FRONTEND
#include "postgres_fe.h"
#else
#include "postgres.h"
#endif

#include <limits.h>

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"

#include "engine/tokenizer_internal.h"
#include "reader/json_tree.h"
#include "reader/reader.h"

/* PostgreSQL 16 made the callbacks return a status and can stop a parse. */
#if PG_VERSION_NUM >= 160000
#define JSON_CALLBACK JsonParseErrorType
#define JSON_RETURN(state) \
	return ((state)->status == FM_OK ? JSON_SUCCESS : JSON_SEM_ACTION_FAILED)
#else
#define JSON_CALLBACK void
#define JSON_RETURN(state) return
#endif

#define MAX_JSON_DEPTH 64

typedef enum node_kind
{
	NODE_OBJECT,
	NODE_ARRAY,
	NODE_STRING,
	NODE_NUMBER,
	NODE_BOOL,
	NODE_NULL
} node_kind;

/* One value of the small part of the file, with its member name. */
typedef struct json_node
{
	node_kind	kind;
	char	   *key;			/* member name inside an object, else NULL */
	char	   *text;			/* string or number text; "true"/"false" */
	struct json_node *first;	/* children of an object or array */
	struct json_node *last;
	struct json_node *next;		/* next sibling */
	struct json_node *parent;
} json_node;

typedef enum frame_kind
{
	FRAME_TREE,					/* building json_node values */
	FRAME_VOCAB,				/* inside model.vocab */
	FRAME_MERGES,				/* inside model.merges */
	FRAME_MERGE_PAIR,			/* one ["a", "b"] merge */
	FRAME_SKIP					/* a value that is not used */
} frame_kind;

typedef struct load_state
{
	fm_tokenizer *tok;
	const fm_allocator *alloc;
	fm_error   *err;
	fm_status	status;			/* first failure; later callbacks do nothing */

	int			depth;
	frame_kind	frames[MAX_JSON_DEPTH];
	json_node  *nodes[MAX_JSON_DEPTH];	/* the container of a FRAME_TREE */
	json_node  *root;
	char	   *pending_key;	/* member name of the value that comes next */

	/* merges as "left\0right\0" pairs */
	char	   *merges;
	size_t		merges_len;
	size_t		merges_cap;
	int32_t		n_merges;
	int			pair_parts;		/* strings seen in the current [a, b] */
	size_t		pair_start;		/* where the current [a, b] begins */

	bool		saw_vocab;
	bool		saw_merges;
} load_state;

static fm_status
fail(load_state *state, fm_status status, const char *fmt,...)
pg_attribute_printf(3, 4);

static fm_status
fail(load_state *state, fm_status status, const char *fmt,...)
{
	va_list		args;

	if (state->status != FM_OK)
		return state->status;
	state->status = status;
	if (state->err != NULL)
	{
		state->err->status = status;
		va_start(args, fmt);
		vsnprintf(state->err->message, sizeof(state->err->message), fmt, args);
		va_end(args);
	}
	return status;
}

static char *
copy_string(load_state *state, const char *s)
{
	size_t		len = strlen(s);
	char	   *copy = fm_alloc(state->alloc, len + 1);

	if (copy == NULL)
	{
		fail(state, FM_ENOMEM, "out of memory reading tokenizer.json");
		return NULL;
	}
	memcpy(copy, s, len + 1);
	return copy;
}

static void
free_tree(const fm_allocator *a, json_node *node)
{
	while (node != NULL)
	{
		json_node  *next = node->next;

		free_tree(a, node->first);
		fm_free(a, node->key);
		fm_free(a, node->text);
		fm_free(a, node);
		node = next;
	}
}

static json_node *member(const json_node *obj, const char *key);

/* ---------- parser callbacks ---------- */

static frame_kind
top_frame(load_state *state)
{
	return state->depth > 0 ? state->frames[state->depth - 1] : FRAME_TREE;
}

/* True when the value about to start is member key of the root's "model". */
static bool
at_model_member(load_state *state, const char *key)
{
	json_node  *parent;

	if (state->depth != 2 || top_frame(state) != FRAME_TREE ||
		state->pending_key == NULL || strcmp(state->pending_key, key) != 0)
		return false;
	parent = state->nodes[1];
	return parent->key != NULL && strcmp(parent->key, "model") == 0;
}

/* Appends a tree node for the value that starts now. */
static json_node *
add_node(load_state *state, node_kind kind, const char *text)
{
	json_node  *node = fm_alloc_zero(state->alloc, sizeof(json_node));

	if (node == NULL)
	{
		fail(state, FM_ENOMEM, "out of memory reading tokenizer.json");
		return NULL;
	}
	node->kind = kind;
	node->key = state->pending_key;
	state->pending_key = NULL;
	if (text != NULL && (node->text = copy_string(state, text)) == NULL)
	{
		free_tree(state->alloc, node);
		return NULL;
	}

	if (state->depth == 0)
		state->root = node;
	else
	{
		json_node  *parent = state->nodes[state->depth - 1];

		node->parent = parent;
		if (parent->last)
			parent->last->next = node;
		else
			parent->first = node;
		parent->last = node;
	}
	return node;
}

static void
push_frame(load_state *state, frame_kind kind, json_node *node)
{
	if (state->depth == MAX_JSON_DEPTH)
	{
		fail(state, FM_EINVAL, "tokenizer.json nests deeper than %d levels", MAX_JSON_DEPTH);
		return;
	}
	state->frames[state->depth] = kind;
	state->nodes[state->depth] = node;
	state->depth++;
}

/* Opens an object or array, choosing how its contents are handled. */
static void
start_container(load_state *state, node_kind kind)
{
	frame_kind	top = top_frame(state);
	json_node  *node;

	switch (top)
	{
		case FRAME_SKIP:
			push_frame(state, FRAME_SKIP, NULL);
			return;
		case FRAME_VOCAB:
			fail(state, FM_EINVAL, "model.vocab entry \"%s\" is not a number",
				 state->pending_key ? state->pending_key : "");
			return;
		case FRAME_MERGES:
			if (kind != NODE_ARRAY)
			{
				fail(state, FM_EINVAL, "merge %d is neither a string nor an array",
					 state->n_merges);
				return;
			}
			state->pair_parts = 0;
			state->pair_start = state->merges_len;
			push_frame(state, FRAME_MERGE_PAIR, NULL);
			return;
		case FRAME_MERGE_PAIR:
			fail(state, FM_EINVAL, "merge %d holds a nested value", state->n_merges);
			return;
		case FRAME_TREE:
			break;
	}

	if (at_model_member(state, "vocab"))
	{
		json_node  *type = member(state->nodes[1], "type");

		/* name the model type before its vocabulary can cause odd errors */
		if (type != NULL && type->kind == NODE_STRING && strcmp(type->text, "BPE") != 0)
		{
			fail(state, FM_EUNSUPPORTED, "model type \"%s\" is not supported", type->text);
			return;
		}

		/* a Unigram vocabulary is an array; the model type check rejects it */
		state->saw_vocab = true;
		push_frame(state, kind == NODE_OBJECT ? FRAME_VOCAB : FRAME_SKIP, NULL);
	}
	else if (at_model_member(state, "merges") && kind == NODE_ARRAY)
	{
		state->saw_merges = true;
		push_frame(state, FRAME_MERGES, NULL);
	}
	else if ((node = add_node(state, kind, NULL)) != NULL)
	{
		push_frame(state, FRAME_TREE, node);
		return;
	}
	fm_free(state->alloc, state->pending_key);
	state->pending_key = NULL;
}

/* Appends one merge half plus a NUL to the merge buffer. */
static void
append_merge_part(load_state *state, const char *s, size_t len)
{
	if (state->merges_len + len + 1 > state->merges_cap)
	{
		size_t		cap = state->merges_cap ? state->merges_cap * 2 : 1 << 20;
		char	   *buf;

		while (cap < state->merges_len + len + 1)
			cap *= 2;
		buf = fm_alloc(state->alloc, cap);
		if (buf == NULL)
		{
			fail(state, FM_ENOMEM, "out of memory buffering %d merges", state->n_merges);
			return;
		}
		if (state->merges)
		{
			memcpy(buf, state->merges, state->merges_len);
			fm_free(state->alloc, state->merges);
		}
		state->merges = buf;
		state->merges_cap = cap;
	}
	memcpy(state->merges + state->merges_len, s, len);
	state->merges[state->merges_len + len] = '\0';
	state->merges_len += len + 1;
}

/* A merge written as one string: the two halves around its single space. */
static void
add_merge_string(load_state *state, const char *s)
{
	const char *space = strchr(s, ' ');

	if (space == NULL || space == s || space[1] == '\0' || strchr(space + 1, ' ') != NULL)
	{
		fail(state, FM_EINVAL, "merge %d \"%.64s\" is not two tokens separated by one space",
			 state->n_merges, s);
		return;
	}
	append_merge_part(state, s, space - s);
	append_merge_part(state, space + 1, strlen(space + 1));
	state->n_merges++;
}

static void
add_vocab_entry(load_state *state, const char *token, const char *number)
{
	char	   *end;
	long		id;
	fm_status	st;

	errno = 0;
	id = strtol(number, &end, 10);
	if (*end != '\0' || errno != 0 || id < 0 || id > INT32_MAX)
	{
		fail(state, FM_EINVAL, "model.vocab entry \"%.64s\" has invalid id %s", token, number);
		return;
	}
	st = fm_tokenizer_add_vocab(state->tok, token, strlen(token), (int32_t) id, state->err);
	if (st != FM_OK)
		state->status = st;
}

static JSON_CALLBACK
on_object_start(void *arg)
{
	load_state *state = arg;

	if (state->status == FM_OK)
		start_container(state, NODE_OBJECT);
	JSON_RETURN(state);
}

static JSON_CALLBACK
on_array_start(void *arg)
{
	load_state *state = arg;

	if (state->status == FM_OK)
		start_container(state, NODE_ARRAY);
	JSON_RETURN(state);
}

static JSON_CALLBACK
on_container_end(void *arg)
{
	load_state *state = arg;

	if (state->status != FM_OK)
		JSON_RETURN(state);
	if (top_frame(state) == FRAME_MERGE_PAIR)
	{
		if (state->pair_parts != 2)
			fail(state, FM_EINVAL, "merge %d has %d parts instead of 2",
				 state->n_merges, state->pair_parts);
		else
			state->n_merges++;
	}
	state->depth--;
	JSON_RETURN(state);
}

static JSON_CALLBACK
on_field_start(void *arg, char *fname, bool isnull)
{
	load_state *state = arg;

	if (state->status == FM_OK && top_frame(state) != FRAME_SKIP)
	{
		fm_free(state->alloc, state->pending_key);
		state->pending_key = copy_string(state, fname);
	}
	pfree(fname);
	JSON_RETURN(state);
}

static JSON_CALLBACK
on_scalar(void *arg, char *token, JsonTokenType type)
{
	load_state *state = arg;

	if (state->status != FM_OK)
	{
		pfree(token);
		JSON_RETURN(state);
	}

	switch (top_frame(state))
	{
		case FRAME_SKIP:
			break;
		case FRAME_VOCAB:
			if (type != JSON_TOKEN_NUMBER)
				fail(state, FM_EINVAL, "model.vocab entry \"%.64s\" is not a number",
					 state->pending_key);
			else
				add_vocab_entry(state, state->pending_key, token);
			fm_free(state->alloc, state->pending_key);
			state->pending_key = NULL;
			break;
		case FRAME_MERGES:
			if (type != JSON_TOKEN_STRING)
				fail(state, FM_EINVAL, "merge %d is neither a string nor an array",
					 state->n_merges);
			else
				add_merge_string(state, token);
			break;
		case FRAME_MERGE_PAIR:
			if (type != JSON_TOKEN_STRING || ++state->pair_parts > 2)
				fail(state, FM_EINVAL, "merge %d is not an array of two strings",
					 state->n_merges);
			else
				append_merge_part(state, token, strlen(token));
			break;
		case FRAME_TREE:
			if (state->depth == 0)
				fail(state, FM_EINVAL, "tokenizer.json is not a JSON object");
			else
				add_node(state,
						 type == JSON_TOKEN_STRING ? NODE_STRING :
						 type == JSON_TOKEN_NUMBER ? NODE_NUMBER :
						 type == JSON_TOKEN_NULL ? NODE_NULL : NODE_BOOL,
						 type == JSON_TOKEN_NULL ? NULL : token);
			break;
	}
	pfree(token);
	JSON_RETURN(state);
}

/* ---------- reading the tree ---------- */

static json_node *
member(const json_node *obj, const char *key)
{
	if (obj == NULL || obj->kind != NODE_OBJECT)
		return NULL;
	for (json_node *n = obj->first; n != NULL; n = n->next)
		if (strcmp(n->key, key) == 0)
			return n;
	return NULL;
}

static bool
is_null(const json_node *node)
{
	return node == NULL || node->kind == NODE_NULL;
}

/* The "type" member of a component, or a placeholder for error messages. */
static const char *
type_name(const json_node *component)
{
	json_node  *type = member(component, "type");

	if (type == NULL || type->kind != NODE_STRING)
		return "(no type)";
	return type->text;
}

static bool
has_type(const json_node *component, const char *type)
{
	return strcmp(type_name(component), type) == 0;
}

/*
 * Reads an optional boolean member; *value keeps its default when the
 * member is missing or null.
 */
static fm_status
get_bool(const json_node *obj, const char *key, const char *where, bool *value,
		 fm_error *err)
{
	json_node  *node = member(obj, key);

	if (is_null(node))
		return FM_OK;
	if (node->kind != NODE_BOOL)
		return fm_set_error(err, FM_EINVAL, "%s.%s is not a boolean", where, key);
	*value = strcmp(node->text, "true") == 0;
	return FM_OK;
}

static fm_status
load_normalizer(const json_node *root, fm_error *err)
{
	json_node  *normalizer = member(root, "normalizer");
	json_node  *list;

	if (is_null(normalizer))
		return FM_OK;
	list = member(normalizer, "normalizers");
	if (has_type(normalizer, "Sequence") && list != NULL && list->first == NULL)
		return FM_OK;
	return fm_set_error(err, FM_EUNSUPPORTED, "normalizer type \"%s\" is not supported",
						type_name(normalizer));
}

static fm_status
load_split(fm_tokenizer *tok, const json_node *split, fm_error *err)
{
	json_node  *pattern = member(split, "pattern");
	json_node  *behavior = member(split, "behavior");
	json_node  *regex = member(pattern, "Regex");
	json_node  *literal = member(pattern, "String");
	json_node  *source = regex ? regex : literal;
	fm_split_behavior b;
	bool		invert = false;
	fm_status	st;

	if (source == NULL || source->kind != NODE_STRING)
		return fm_set_error(err, FM_EINVAL,
							"Split pre-tokenizer has no pattern {\"Regex\": ...} or {\"String\": ...}");
	if (behavior == NULL || behavior->kind != NODE_STRING)
		return fm_set_error(err, FM_EINVAL, "Split pre-tokenizer has no behavior");
	if (!fm_split_behavior_parse(behavior->text, &b))
		return fm_set_error(err, FM_EUNSUPPORTED, "Split behavior \"%s\" is not supported",
							behavior->text);
	st = get_bool(split, "invert", "Split", &invert, err);
	if (st != FM_OK)
		return st;
	return fm_tokenizer_add_split(tok, source->text, strlen(source->text),
								  source == literal, b, invert, err);
}

static fm_status
load_pre_step(fm_tokenizer *tok, const json_node *step, fm_error *err)
{
	bool		add_prefix_space = false;
	bool		use_regex = true;	/* the Hugging Face default */
	fm_status	st;

	if (has_type(step, "Split"))
		return load_split(tok, step, err);
	if (!has_type(step, "ByteLevel"))
		return fm_set_error(err, FM_EUNSUPPORTED, "pre-tokenizer type \"%s\" is not supported",
							type_name(step));
	st = get_bool(step, "add_prefix_space", "ByteLevel", &add_prefix_space, err);
	if (st == FM_OK)
		st = get_bool(step, "use_regex", "ByteLevel", &use_regex, err);
	if (st == FM_OK)
		st = fm_tokenizer_add_byte_level(tok, add_prefix_space, use_regex, err);
	return st;
}

static fm_status
load_pre_tokenizer(fm_tokenizer *tok, const json_node *root, fm_error *err)
{
	json_node  *pre = member(root, "pre_tokenizer");
	json_node  *list;
	fm_status	st;

	if (is_null(pre))
		return fm_set_error(err, FM_EUNSUPPORTED,
							"a null pre_tokenizer is not supported: a byte-level BPE needs a ByteLevel pre-tokenizer");
	if (!has_type(pre, "Sequence"))
		return load_pre_step(tok, pre, err);

	list = member(pre, "pretokenizers");
	if (list == NULL || list->kind != NODE_ARRAY)
		return fm_set_error(err, FM_EINVAL, "pre_tokenizer Sequence has no pretokenizers list");
	for (json_node *step = list->first; step != NULL; step = step->next)
	{
		if (has_type(step, "Sequence"))
			return fm_set_error(err, FM_EUNSUPPORTED,
								"a pre_tokenizer Sequence inside a Sequence is not supported");
		if ((st = load_pre_step(tok, step, err)) != FM_OK)
			return st;
	}
	return FM_OK;
}

/* Checks the model's options; the vocabulary and merges were read already. */
static fm_status
check_model(fm_tokenizer *tok, const json_node *root, fm_error *err)
{
	json_node  *model = member(root, "model");
	json_node  *type = member(model, "type");
	bool		byte_fallback = false;
	bool		ignore_merges = false;
	fm_status	st;
	static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};

	if (model == NULL || model->kind != NODE_OBJECT)
		return fm_set_error(err, FM_EINVAL, "tokenizer.json has no model object");

	/* files written by old versions of the library omit "type" for BPE */
	if (type != NULL && !has_type(model, "BPE"))
		return fm_set_error(err, FM_EUNSUPPORTED, "model type \"%s\" is not supported",
							type_name(model));
	if (!is_null(member(model, "dropout")))
		return fm_set_error(err, FM_EUNSUPPORTED, "BPE dropout is not supported");
	for (int i = 0; i < 2; i++)
	{
		json_node  *affix = member(model, affixes[i]);

		if (!is_null(affix) && (affix->kind != NODE_STRING || affix->text[0] != '\0'))
			return fm_set_error(err, FM_EUNSUPPORTED, "BPE %s \"%s\" is not supported",
								affixes[i], affix->text ? affix->text : "");
	}
	st = get_bool(model, "byte_fallback", "model", &byte_fallback, err);
	if (st == FM_OK && byte_fallback)
		st = fm_set_error(err, FM_EUNSUPPORTED, "BPE byte_fallback is not supported");
	if (st == FM_OK)
		st = get_bool(model, "ignore_merges", "model", &ignore_merges, err);
	if (st != FM_OK)
		return st;
	fm_tokenizer_set_ignore_merges(tok, ignore_merges);

	/*
	 * unk_token is accepted: with all 256 bytes in the vocabulary (which
	 * fm_tokenizer_finish checks), no input ever needs it.
	 */
	return FM_OK;
}

static fm_status
check_decoder(const json_node *root, fm_error *err)
{
	json_node  *decoder = member(root, "decoder");

	if (is_null(decoder))
		return fm_set_error(err, FM_EUNSUPPORTED,
							"a null decoder is not supported: decoding needs a ByteLevel decoder");
	if (!has_type(decoder, "ByteLevel"))
		return fm_set_error(err, FM_EUNSUPPORTED, "decoder type \"%s\" is not supported",
							type_name(decoder));
	return FM_OK;
}

static bool
ignorable_post_processor(const json_node *node)
{
	return has_type(node, "ByteLevel") || has_type(node, "TemplateProcessing");
}

static fm_status
check_post_processor(const json_node *root, fm_error *err)
{
	json_node  *post = member(root, "post_processor");
	json_node  *list;

	if (is_null(post) || ignorable_post_processor(post))
		return FM_OK;
	if (!has_type(post, "Sequence"))
		return fm_set_error(err, FM_EUNSUPPORTED, "post_processor type \"%s\" is not supported",
							type_name(post));
	list = member(post, "processors");
	for (json_node *p = list ? list->first : NULL; p != NULL; p = p->next)
		if (!ignorable_post_processor(p))
			return fm_set_error(err, FM_EUNSUPPORTED,
								"post_processor type \"%s\" is not supported", type_name(p));
	return FM_OK;
}

static fm_status
load_added_tokens(fm_tokenizer *tok, const json_node *root, fm_error *err)
{
	json_node  *list = member(root, "added_tokens");

	if (is_null(list))
		return FM_OK;
	if (list->kind != NODE_ARRAY)
		return fm_set_error(err, FM_EINVAL, "added_tokens is not an array");

	for (json_node *t = list->first; t != NULL; t = t->next)
	{
		json_node  *id = member(t, "id");
		json_node  *content = member(t, "content");
		bool		single_word = false;
		bool		lstrip = false;
		bool		rstrip = false;
		char	   *end;
		long		value;
		fm_status	st;

		if (content == NULL || content->kind != NODE_STRING || id == NULL ||
			id->kind != NODE_NUMBER)
			return fm_set_error(err, FM_EINVAL, "an added token lacks a string content or a numeric id");
		errno = 0;
		value = strtol(id->text, &end, 10);
		if (*end != '\0' || errno != 0 || value < 0 || value > INT32_MAX)
			return fm_set_error(err, FM_EINVAL, "added token \"%.64s\" has invalid id %s",
								content->text, id->text);
		if ((st = get_bool(t, "single_word", "added_tokens", &single_word, err)) != FM_OK ||
			(st = get_bool(t, "lstrip", "added_tokens", &lstrip, err)) != FM_OK ||
			(st = get_bool(t, "rstrip", "added_tokens", &rstrip, err)) != FM_OK)
			return st;
		if (single_word)
			return fm_set_error(err, FM_EUNSUPPORTED,
								"added token \"%.64s\" has single_word true, which is not supported",
								content->text);
		st = fm_tokenizer_add_special(tok, content->text, strlen(content->text),
									  (int32_t) value, lstrip, rstrip, err);
		if (st != FM_OK)
			return st;
	}
	return FM_OK;
}

static fm_status
apply_merges(fm_tokenizer *tok, const load_state *state, fm_error *err)
{
	const char *p = state->merges;

	for (int32_t i = 0; i < state->n_merges; i++)
	{
		const char *left = p;
		size_t		left_len = strlen(left);
		const char *right = left + left_len + 1;
		size_t		right_len = strlen(right);
		fm_status	st;

		st = fm_tokenizer_add_merge(tok, left, left_len, right, right_len, err);
		if (st != FM_OK)
			return st;
		p = right + right_len + 1;
	}
	return FM_OK;
}

/* Turns the parsed tree and merge buffer into a finished tokenizer. */
static fm_status
build_tokenizer(fm_tokenizer *tok, const load_state *state, fm_error *err)
{
	const json_node *root = state->root;
	fm_status	st;

	if (!state->saw_vocab)
		return fm_set_error(err, FM_EINVAL, "tokenizer.json has no model.vocab");
	if ((st = load_normalizer(root, err)) != FM_OK ||
		(st = check_model(tok, root, err)) != FM_OK ||
		(st = check_decoder(root, err)) != FM_OK ||
		(st = check_post_processor(root, err)) != FM_OK ||
		(st = load_pre_tokenizer(tok, root, err)) != FM_OK ||
		(st = apply_merges(tok, state, err)) != FM_OK ||
		(st = load_added_tokens(tok, root, err)) != FM_OK)
		return st;
	return fm_tokenizer_finish(tok, err);
}

/*
 * Describes a JSON syntax error.  json_errdetail would do this, but the
 * frontend libpgcommon of PostgreSQL 15 does not export it.
 */
static const char *
json_error_text(JsonParseErrorType error)
{
	switch (error)
	{
		case JSON_ESCAPING_INVALID:
			return "invalid escape sequence";
		case JSON_ESCAPING_REQUIRED:
			return "control character in a string must be escaped";
		case JSON_EXPECTED_ARRAY_FIRST:
		case JSON_EXPECTED_ARRAY_NEXT:
			return "expected an array element or \"]\"";
		case JSON_EXPECTED_COLON:
			return "expected \":\"";
		case JSON_EXPECTED_END:
			return "expected end of input";
		case JSON_EXPECTED_JSON:
			return "expected a JSON value";
		case JSON_EXPECTED_MORE:
			return "the input ends too early";
		case JSON_EXPECTED_OBJECT_FIRST:
		case JSON_EXPECTED_OBJECT_NEXT:
		case JSON_EXPECTED_STRING:
			return "expected a member name or \"}\"";
		case JSON_INVALID_TOKEN:
			return "invalid token";
		case JSON_UNICODE_CODE_POINT_ZERO:
			return "\\u0000 cannot be used";
		case JSON_UNICODE_ESCAPE_FORMAT:
			return "\\u must be followed by four hexadecimal digits";
		case JSON_UNICODE_HIGH_ESCAPE:
			return "a non-ASCII \\u escape needs UTF-8 input";
		case JSON_UNICODE_HIGH_SURROGATE:
		case JSON_UNICODE_LOW_SURROGATE:
			return "unpaired Unicode surrogate";
		default:
			return "invalid JSON";
	}
}

/* Runs the JSON parser over the text with the callbacks above. */
static fm_status
parse_json(load_state *state, const char *json, size_t len)
{
	JsonLexContext *lex;
	JsonSemAction sem;
	JsonParseErrorType result;

	memset(&sem, 0, sizeof(sem));
	sem.semstate = state;
	sem.object_start = on_object_start;
	sem.object_end = on_container_end;
	sem.array_start = on_array_start;
	sem.array_end = on_container_end;
	sem.object_field_start = on_field_start;
	sem.scalar = on_scalar;

#if PG_VERSION_NUM >= 170000
	lex = makeJsonLexContextCstringLen(NULL, (char *) json, (int) len, PG_UTF8, true);
#else
	lex = makeJsonLexContextCstringLen((char *) json, (int) len, PG_UTF8, true);
#endif
	result = pg_parse_json(lex, &sem);
	if (result != JSON_SUCCESS && state->status == FM_OK)
		fail(state, FM_EINVAL, "invalid tokenizer.json at line %d: %s",
			 lex->line_number, json_error_text(result));

#if PG_VERSION_NUM >= 170000
	freeJsonLexContext(lex);
#else
	if (lex->strval != NULL)
	{
		pfree(lex->strval->data);
		pfree(lex->strval);
	}
	pfree(lex);
#endif
	return state->status;
}

fm_status
fm_tokenizer_load_json(const char *json, size_t len, const fm_allocator *a,
					   fm_tokenizer **out, fm_error *err)
{
	load_state	state;
	fm_tokenizer *tok;
	fm_status	st;
	const char *text;

	*out = NULL;
	if (len > INT_MAX)
		return fm_set_error(err, FM_ELIMIT, "tokenizer.json is %zu bytes, more than the %d the JSON parser accepts",
							len, INT_MAX);

	st = fm_tokenizer_create(a, &tok, err);
	if (st != FM_OK)
		return st;

	memset(&state, 0, sizeof(state));
	state.tok = tok;
	state.alloc = a;
	state.err = err;

	text = fm_json_utf8_escapes(json, len, &len);
	st = parse_json(&state, text, len);
	if (text != json)
		pfree((char *) text);
	if (st == FM_OK && (state.root == NULL || state.root->kind != NODE_OBJECT))
		st = fm_set_error(err, FM_EINVAL, "tokenizer.json is not a JSON object");
	if (st == FM_OK)
		st = build_tokenizer(tok, &state, err);

	free_tree(a, state.root);
	fm_free(a, state.pending_key);
	fm_free(a, state.merges);
	if (st != FM_OK)
	{
		fm_tokenizer_free(tok);
		return st;
	}
	*out = tok;
	return FM_OK;
}
