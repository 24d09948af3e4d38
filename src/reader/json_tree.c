/*-------------------------------------------------------------------------
 *
 * json_tree.c
 *	  Builds an fm_json tree from PostgreSQL's callback JSON parser.
 *
 * The callbacks keep a cursor (the container being filled) and the member
 * name announced by the last object_field_start.  Each value attaches to
 * the cursor under that name.  PostgreSQL 16 changed the
 * callbacks to return a JsonParseErrorType, and 17 gave
 * makeJsonLexContextCstringLen a caller-supplied context, so both are
 * wrapped below.
 *
 *-------------------------------------------------------------------------
 */
#ifdef FRONTEND
#include "postgres_fe.h"
#else
#include "postgres.h"
#endif

#include <errno.h>
#include <math.h>
#include <stdlib.h>

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"

#include "reader/json_tree.h"

/* NOTE: only the PostgreSQL 15 branches below have been compiled and tested. */
#if PG_VERSION_NUM >= 160000
#define JSON_ACTION_TYPE JsonParseErrorType
#define JSON_ACTION_DONE return JSON_SUCCESS
#else
#define JSON_ACTION_TYPE void
#define JSON_ACTION_DONE return
#endif

typedef struct tree_state
{
	fm_json    *root;
	fm_json    *cursor;			/* container receiving values */
	char	   *pending_key;	/* member name for the next value */
	char	   *duplicate_key;	/* first member name seen twice in an object */
} tree_state;

static void
append_child(fm_json *parent, char *key, fm_json *child)
{
	if (parent->count == parent->capacity)
	{
		int32_t		capacity = parent->capacity == 0 ? 8 : parent->capacity * 2;

		if (parent->items == NULL)
		{
			parent->items = palloc(sizeof(fm_json *) * capacity);
			parent->keys = palloc(sizeof(char *) * capacity);
		}
		else
		{
			parent->items = repalloc(parent->items, sizeof(fm_json *) * capacity);
			parent->keys = repalloc(parent->keys, sizeof(char *) * capacity);
		}
		parent->capacity = capacity;
	}
	parent->keys[parent->count] = key;
	parent->items[parent->count] = child;
	parent->count++;
	child->parent = parent;
}

static fm_json *
attach_new(tree_state *state, fm_json_kind kind)
{
	fm_json    *node = palloc0(sizeof(fm_json));

	node->kind = kind;
	if (state->cursor == NULL)
		state->root = node;
	else
	{
		append_child(state->cursor,
					 state->cursor->kind == FM_JSON_OBJECT ? state->pending_key : NULL,
					 node);
		state->pending_key = NULL;
	}
	return node;
}

static JSON_ACTION_TYPE
on_container_start(tree_state *state, fm_json_kind kind)
{
	state->cursor = attach_new(state, kind);
	JSON_ACTION_DONE;
}

static JSON_ACTION_TYPE
on_object_start(void *arg)
{
	return on_container_start(arg, FM_JSON_OBJECT);
}

static JSON_ACTION_TYPE
on_array_start(void *arg)
{
	return on_container_start(arg, FM_JSON_ARRAY);
}

static JSON_ACTION_TYPE
on_container_end(void *arg)
{
	tree_state *state = arg;

	state->cursor = state->cursor->parent;
	JSON_ACTION_DONE;
}

static JSON_ACTION_TYPE
on_field_start(void *arg, char *fname, bool isnull)
{
	tree_state *state = arg;
	fm_json    *obj = state->cursor;

	/*
	 * A repeated key would be read here as its first value but stored in
	 * jsonb as its last, so the checks and the stored config could
	 * disagree: reject it.
	 */
	if (state->duplicate_key == NULL && obj != NULL)
	{
		for (int32_t i = 0; i < obj->count; i++)
		{
			if (obj->keys[i] != NULL && strcmp(obj->keys[i], fname) == 0)
			{
				state->duplicate_key = fname;
				break;
			}
		}
	}
	state->pending_key = fname;
	JSON_ACTION_DONE;
}

static JSON_ACTION_TYPE
on_scalar(void *arg, char *token, JsonTokenType type)
{
	tree_state *state = arg;
	fm_json_kind kind;
	fm_json    *node;

	switch (type)
	{
		case JSON_TOKEN_STRING:
			kind = FM_JSON_STRING;
			break;
		case JSON_TOKEN_NUMBER:
			kind = FM_JSON_NUMBER;
			break;
		case JSON_TOKEN_TRUE:
		case JSON_TOKEN_FALSE:
			kind = FM_JSON_BOOL;
			break;
		default:
			kind = FM_JSON_NULL;
			break;
	}
	node = attach_new(state, kind);
	node->text = token;
	JSON_ACTION_DONE;
}

/*
 * Describes a parse error.  json_errdetail would do this, but PostgreSQL
 * 15's frontend libpgcommon does not export it.
 */
static const char *
describe_error(JsonParseErrorType error)
{
	switch (error)
	{
		case JSON_ESCAPING_INVALID:
			return "invalid escape sequence";
		case JSON_ESCAPING_REQUIRED:
			return "unescaped control character in a string";
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
			return "unexpected end of input";
		case JSON_EXPECTED_OBJECT_FIRST:
		case JSON_EXPECTED_OBJECT_NEXT:
			return "expected a member name or \"}\"";
		case JSON_EXPECTED_STRING:
			return "expected a string";
		case JSON_INVALID_TOKEN:
			return "invalid token";
		case JSON_UNICODE_CODE_POINT_ZERO:
			return "\\u0000 is not allowed";
		case JSON_UNICODE_ESCAPE_FORMAT:
			return "\\u must be followed by four hexadecimal digits";
		case JSON_UNICODE_HIGH_ESCAPE:
			return "unicode escape outside the database encoding";
		case JSON_UNICODE_HIGH_SURROGATE:
		case JSON_UNICODE_LOW_SURROGATE:
			return "unpaired unicode surrogate";
		default:
			break;
	}
	return "parse error";
}

/* Value of the four hex digits at s, or -1 when they are not hex. */
static int32_t
hex4(const char *s)
{
	int32_t		value = 0;

	for (int i = 0; i < 4; i++)
	{
		char		c = s[i];

		value <<= 4;
		if (c >= '0' && c <= '9')
			value |= c - '0';
		else if (c >= 'a' && c <= 'f')
			value |= c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			value |= c - 'A' + 10;
		else
			return -1;
	}
	return value;
}

/* Writes code point cp (at most U+10FFFF) as UTF-8; returns the length. */
static int
put_utf8(char *out, int32_t cp)
{
	if (cp < 0x800)
	{
		out[0] = (char) (0xC0 | (cp >> 6));
		out[1] = (char) (0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000)
	{
		out[0] = (char) (0xE0 | (cp >> 12));
		out[1] = (char) (0x80 | ((cp >> 6) & 0x3F));
		out[2] = (char) (0x80 | (cp & 0x3F));
		return 3;
	}
	out[0] = (char) (0xF0 | (cp >> 18));
	out[1] = (char) (0x80 | ((cp >> 12) & 0x3F));
	out[2] = (char) (0x80 | ((cp >> 6) & 0x3F));
	out[3] = (char) (0x80 | (cp & 0x3F));
	return 4;
}

const char *
fm_json_utf8_escapes(const char *json, size_t len, size_t *out_len)
{
	char	   *out = NULL;
	size_t		o = 0;

	*out_len = len;
	for (size_t i = 0; i < len; i++)
	{
		int32_t		cp;
		size_t		used = 6;

		if (json[i] != '\\' || i + 1 >= len)
		{
			if (out)
				out[o++] = json[i];
			continue;
		}

		/*
		 * Every other escape (\\, \", \n, ...) is two bytes copied as they
		 * are, which also keeps "\\u" from being read as an escape.
		 */
		cp = (json[i + 1] == 'u' && i + 6 <= len) ? hex4(json + i + 2) : -1;
		if (cp >= 0xD800 && cp <= 0xDBFF && i + 12 <= len &&
			json[i + 6] == '\\' && json[i + 7] == 'u')
		{
			int32_t		low = hex4(json + i + 8);

			if (low >= 0xDC00 && low <= 0xDFFF)
			{
				cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
				used = 12;
			}
		}

		/* ASCII escapes and lone surrogates are left to the parser. */
		if (cp < 0x80 || (cp >= 0xD800 && cp <= 0xDFFF))
		{
			if (out)
			{
				out[o++] = json[i];
				out[o++] = json[i + 1];
			}
			i++;
			continue;
		}

		if (out == NULL)
		{
			/* UTF-8 is never longer than the escape it replaces. */
			out = palloc(len + 1);
			memcpy(out, json, i);
			o = i;
		}
		o += put_utf8(out + o, cp);
		i += used - 1;
	}
	if (out == NULL)
		return json;
	out[o] = '\0';
	*out_len = o;
	return out;
}

fm_status
fm_json_parse(const char *json, size_t len, const char *what,
			  fm_json **out, fm_error *err)
{
	JsonLexContext *lex;
	JsonSemAction sem;
	JsonParseErrorType result;
	tree_state	state = {0};
	const char *text;
	int			valid;

	*out = NULL;
	if (len > INT32_MAX)
		return fm_set_error(err, FM_ELIMIT, "%s is too large to parse: %zu bytes",
							what, len);
	valid = pg_encoding_verifymbstr(PG_UTF8, json, (int) len);
	if ((size_t) valid != len)
		return fm_set_error(err, FM_EINVAL, "%s is not valid UTF-8 at byte %d",
							what, valid);
	text = fm_json_utf8_escapes(json, len, &len);

#if PG_VERSION_NUM >= 170000
	lex = makeJsonLexContextCstringLen(NULL, (char *) text, len, PG_UTF8, true);
#else
	lex = makeJsonLexContextCstringLen((char *) text, (int) len, PG_UTF8, true);
#endif

	memset(&sem, 0, sizeof(sem));
	sem.semstate = &state;
	sem.object_start = on_object_start;
	sem.object_end = on_container_end;
	sem.array_start = on_array_start;
	sem.array_end = on_container_end;
	sem.object_field_start = on_field_start;
	sem.scalar = on_scalar;

	result = pg_parse_json(lex, &sem);
	if (result != JSON_SUCCESS)
	{
		fm_set_error(err, FM_EINVAL, "invalid JSON in %s at line %d: %s",
					 what, lex->line_number, describe_error(result));
		fm_json_free(state.root);
		state.root = NULL;
	}

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
	if (text != json)
		pfree((char *) text);

	if (result != JSON_SUCCESS)
		return FM_EINVAL;
	if (state.duplicate_key != NULL)
	{
		fm_set_error(err, FM_EINVAL, "duplicate key \"%s\" in %s",
					 state.duplicate_key, what);
		fm_json_free(state.root);
		return FM_EINVAL;
	}
	*out = state.root;
	return FM_OK;
}

void
fm_json_free(fm_json *node)
{
	if (node == NULL)
		return;
	for (int32_t i = 0; i < node->count; i++)
	{
		if (node->keys[i] != NULL)
			pfree(node->keys[i]);
		fm_json_free(node->items[i]);
	}
	if (node->items != NULL)
	{
		pfree(node->items);
		pfree(node->keys);
	}
	if (node->text != NULL)
		pfree(node->text);
	pfree(node);
}

const fm_json *
fm_json_member(const fm_json *obj, const char *key)
{
	if (obj == NULL || obj->kind != FM_JSON_OBJECT)
		return NULL;
	for (int32_t i = 0; i < obj->count; i++)
		if (strcmp(obj->keys[i], key) == 0)
			return obj->items[i];
	return NULL;
}

bool
fm_json_double(const fm_json *node, double *out)
{
	char	   *end;

	if (node == NULL || node->kind != FM_JSON_NUMBER)
		return false;
	errno = 0;
	*out = strtod(node->text, &end);
	return *end == '\0';
}

bool
fm_json_int64(const fm_json *node, int64_t *out)
{
	double		value;
	char	   *end;
	long long	parsed;

	if (node == NULL || node->kind != FM_JSON_NUMBER)
		return false;

	/* "4096" parses exactly; "4096.0" or "1e3" go through double */
	errno = 0;
	parsed = strtoll(node->text, &end, 10);
	if (*end == '\0' && errno == 0)
	{
		*out = parsed;
		return true;
	}
	if (!fm_json_double(node, &value) || value != floor(value) ||
		fabs(value) > 9007199254740992.0)
		return false;
	*out = (int64_t) value;
	return true;
}

const char *
fm_json_kind_name(fm_json_kind kind)
{
	switch (kind)
	{
		case FM_JSON_NULL:
			return "null";
		case FM_JSON_BOOL:
			return "boolean";
		case FM_JSON_NUMBER:
			return "number";
		case FM_JSON_STRING:
			return "string";
		case FM_JSON_ARRAY:
			return "array";
		case FM_JSON_OBJECT:
			return "object";
	}
	return "unknown";
}
