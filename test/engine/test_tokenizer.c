/*-------------------------------------------------------------------------
 *
 * test_tokenizer.c
 *	  Unit tests of the byte-level BPE tokenizer and its tokenizer.json
 *	  loader, without a server.
 *
 * The test builds small tokenizer.json files in memory: the 256 byte-level
 * characters plus a few merges, and pre-tokenizers in several forms.  The
 * same cases also run on tokenizers attached to a serialized image.  The
 * expected ids come from the Hugging Face tokenizers library (npm package
 * tokenizers 0.23.2, encode with addSpecialTokens false) run on the same
 * files.  "test_tokenizer --dump-json DIR" writes the files out, so the
 * values can be checked again.
 *
 *-------------------------------------------------------------------------
 */
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "testutil.h"

#define CL100K_PATTERN \
	"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}|" \
	" ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+"

#define BYTE_LEVEL_STEP \
	"{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, " \
	"\"use_regex\": false}"

#define SPLIT_STEP(behavior, invert) \
	"{\"type\": \"Split\", \"pattern\": {\"Regex\": \"" CL100K_PATTERN "\"}, " \
	"\"behavior\": \"" behavior "\", \"invert\": " invert "}"

#define BYTE_LEVEL_REGEX \
	"{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, " \
	"\"use_regex\": true}"

#define SEQUENCE(step) \
	"{\"type\": \"Sequence\", \"pretokenizers\": [" step ", " BYTE_LEVEL_STEP "]}"

#define LITERAL_SPLIT(behavior, invert) \
	SEQUENCE("{\"type\": \"Split\", \"pattern\": {\"String\": \" \"}, " \
			 "\"behavior\": \"" behavior "\", \"invert\": " invert "}")

/* Merge rules as pairs of byte-level strings; ids 256 and up, in order. */
static const char *const merges[][2] = {
	{"Ġ", "Ġ"},
	{"h", "e"},
	{"l", "l"},
	{"he", "ll"},
	{"hell", "o"},
	{"Ġ", "w"},
	{"o", "r"},
	{"Ġw", "or"},
	{"Ċ", "Ċ"},
	{"1", "2"},
	{"12", "3"},
	{"Ã", "¦"},
	{"Ġ", "hello"},
	{"ld", "Ġ"},
	{"l", "d"},
};

#define N_MERGES ((int) (sizeof(merges) / sizeof(merges[0])))
#define SPECIAL_ID 271

/* What varies between the generated tokenizer.json files. */
typedef struct tok_file
{
	const char *name;
	const char *normalizer;		/* JSON text */
	const char *pre_tokenizer;
	const char *decoder;
	const char *model_type;
	bool		merges_as_arrays;
	int			missing_byte;	/* a byte left out of the vocabulary, or -1 */
} tok_file;

static const tok_file base_file = {
	"base", "null", SEQUENCE(SPLIT_STEP("Removed", "true")), "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\": true}",
	"BPE", false, -1
};

/* Appends to a growing malloc'd string. */
typedef struct buf
{
	char	   *data;
	size_t		len;
	size_t		cap;
} buf;

static void
put(buf *b, const char *s)
{
	size_t		n = strlen(s);

	if (b->len + n + 1 > b->cap)
	{
		b->cap = (b->len + n + 1) * 2;
		b->data = realloc(b->data, b->cap);
		if (b->data == NULL)
			abort();
	}
	memcpy(b->data + b->len, s, n + 1);
	b->len += n;
}

/* Writes the byte-level character of byte as a JSON string body. */
static void
put_byte_char(buf *b, int byte)
{
	int			cp = byte;
	char		s[8];

	if (!((byte >= 0x21 && byte <= 0x7E) || (byte >= 0xA1 && byte <= 0xAC) || byte >= 0xAE))
	{
		int			extra = 256;

		for (int k = 0; k < byte; k++)
			if (!((k >= 0x21 && k <= 0x7E) || (k >= 0xA1 && k <= 0xAC) || k >= 0xAE))
				extra++;
		cp = extra;
	}
	if (cp == '"' || cp == '\\')
		snprintf(s, sizeof(s), "\\%c", cp);
	else if (cp < 0x80)
		snprintf(s, sizeof(s), "%c", cp);
	else
		snprintf(s, sizeof(s), "%c%c", 0xC0 | (cp >> 6), 0x80 | (cp & 0x3F));
	put(b, s);
}

/* Builds the tokenizer.json text of f; the caller frees it. */
static char *
build_json(const tok_file *f)
{
	buf			b = {0};
	char		num[32];

	put(&b, "{\"version\": \"1.0\", \"truncation\": null, \"padding\": null,\n"
		"\"added_tokens\": [{\"id\": 271, \"content\": \"<|endoftext|>\", "
		"\"single_word\": false, \"lstrip\": false, \"rstrip\": false, "
		"\"normalized\": false, \"special\": true}],\n\"normalizer\": ");
	put(&b, f->normalizer);
	put(&b, ",\n\"pre_tokenizer\": ");
	put(&b, f->pre_tokenizer);
	put(&b, ",\n\"post_processor\": null,\n\"decoder\": ");
	put(&b, f->decoder);
	put(&b, ",\n\"model\": {\"type\": \"");
	put(&b, f->model_type);
	put(&b, "\", \"dropout\": null, \"unk_token\": null, \"continuing_subword_prefix\": null, "
		"\"end_of_word_suffix\": null, \"fuse_unk\": false, \"byte_fallback\": false, "
		"\"vocab\": {");
	for (int byte = 0; byte < 256; byte++)
	{
		if (byte == f->missing_byte)
			continue;
		put(&b, byte == 0 || (byte == 1 && f->missing_byte == 0) ? "\"" : ", \"");
		put_byte_char(&b, byte);
		snprintf(num, sizeof(num), "\": %d", byte);
		put(&b, num);
	}
	for (int i = 0; i < N_MERGES; i++)
	{
		put(&b, ", \"");
		put(&b, merges[i][0]);
		put(&b, merges[i][1]);
		snprintf(num, sizeof(num), "\": %d", 256 + i);
		put(&b, num);
	}
	put(&b, "},\n\"merges\": [");
	for (int i = 0; i < N_MERGES; i++)
	{
		put(&b, i ? ", " : "");
		put(&b, f->merges_as_arrays ? "[\"" : "\"");
		put(&b, merges[i][0]);
		put(&b, f->merges_as_arrays ? "\", \"" : " ");
		put(&b, merges[i][1]);
		put(&b, f->merges_as_arrays ? "\"]" : "\"");
	}
	put(&b, "]}}\n");
	return b.data;
}

/* Loads the tokenizer.json that f describes. */
static fm_status
load(const tok_file *f, fm_tokenizer **tok, fm_error *err)
{
	char	   *json = build_json(f);
	fm_status	st;

	st = fm_tokenizer_load_json(json, strlen(json), &fm_malloc_allocator, tok, err);
	free(json);
	return st;
}

/* Loads f, which must succeed; NULL (after a failed check) when it does not. */
static fm_tokenizer *
load_ok(const tok_file *f)
{
	fm_tokenizer *tok = NULL;
	fm_error	err;
	fm_status	st = load(f, &tok, &err);

	CHECK(st == FM_OK);
	if (st != FM_OK)
		printf("  loading the %s file failed: %s\n", f->name, err.message);
	return st == FM_OK ? tok : NULL;
}

/* Encodes text and formats the ids as "1 2 3", or "error: message". */
static char *
encode_string(const fm_tokenizer *tok, const char *text, bool allow_special)
{
	int32_t    *ids;
	int32_t		n;
	fm_error	err;
	buf			b = {0};
	char		num[16];

	put(&b, "");
	if (fm_tokenizer_encode(tok, text, strlen(text), allow_special, &ids, &n, &err) != FM_OK)
	{
		put(&b, "error: ");
		put(&b, err.message);
		return b.data;
	}
	for (int32_t i = 0; i < n; i++)
	{
		snprintf(num, sizeof(num), i ? " %d" : "%d", ids[i]);
		put(&b, num);
	}
	fm_free(&fm_malloc_allocator, ids);
	return b.data;
}

/*
 * Checks the ids of text against the reference, and that decoding them
 * gives prefix followed by text (ByteLevel's add_prefix_space adds " ").
 */
static void
check_encode_prefix(const fm_tokenizer *tok, const char *file, const char *text,
					bool allow_special, const char *expected, const char *prefix)
{
	char	   *got = encode_string(tok, text, allow_special);
	int32_t    *ids;
	int32_t		n;
	char	   *decoded;
	size_t		len;
	fm_error	err;

	CHECK(strcmp(got, expected) == 0);
	if (strcmp(got, expected) != 0)
		printf("  %s, allow_special %d, text \"%s\":\n  expected %s\n  got      %s\n",
			   file, allow_special, text, expected, got);
	free(got);

	CHECK(fm_tokenizer_encode(tok, text, strlen(text), allow_special, &ids, &n, &err) == FM_OK);
	CHECK(fm_tokenizer_decode(tok, ids, n, &decoded, &len, &err) == FM_OK);
	CHECK(len == strlen(prefix) + strlen(text) &&
		  memcmp(decoded, prefix, strlen(prefix)) == 0 &&
		  memcmp(decoded + strlen(prefix), text, strlen(text)) == 0);
	fm_free(&fm_malloc_allocator, ids);
	fm_free(&fm_malloc_allocator, decoded);
}

static void
check_encode(const fm_tokenizer *tok, const char *file, const char *text,
			 bool allow_special, const char *expected)
{
	check_encode_prefix(tok, file, text, allow_special, expected, "");
}

typedef struct encode_case
{
	const char *text;
	bool		allow_special;
	const char *expected;		/* from Hugging Face tokenizers */
} encode_case;

/*
 * Cases for the base file; the Isolated file must give the same ids.  The
 * library matches added tokens in text by default, so the ids for
 * allow_special false came from the same file with added_tokens emptied.
 */
static const encode_case base_cases[] = {
	{"hello world", false, "260 263 270"},
	{"hello  world\n\nhello", false, "260 32 263 270 264 260"},
	{"1234567", false, "266 52 53 54 55"},
	{"\xC3\xA6\xC3\xB8\xC3\xA5", false, "267 195 184 195 165"},
	{"a\n\n\n\nb", false, "97 264 264 98"},
	{"   lead", false, "256 32 108 101 97 100"},
	{"\xF0\x9F\x98\x80\r\n", false, "240 159 152 128 13 10"},
	{"<|endoftext|>", false, "60 124 101 110 100 111 102 116 101 120 116 124 62"},
	{"say <|endoftext|>hello", false,
	"115 97 121 32 60 124 101 110 100 111 102 116 101 120 116 124 62 260"},
	{"<|endoftext|>", true, "271"},
	{"say <|endoftext|>hello", true, "115 97 121 32 271 260"},
	{"", false, ""},
};

static void
test_base_encoding(void)
{
	tok_file	isolated = base_file;
	fm_tokenizer *tok;

	isolated.name = "isolated";
	isolated.pre_tokenizer = SEQUENCE(SPLIT_STEP("Isolated", "false"));
	isolated.merges_as_arrays = true;

	if ((tok = load_ok(&base_file)) == NULL)
		return;
	for (size_t i = 0; i < sizeof(base_cases) / sizeof(base_cases[0]); i++)
		check_encode(tok, "base", base_cases[i].text, base_cases[i].allow_special,
					 base_cases[i].expected);
	fm_tokenizer_free(tok);

	if ((tok = load_ok(&isolated)) == NULL)
		return;
	for (size_t i = 0; i < sizeof(base_cases) / sizeof(base_cases[0]); i++)
		check_encode(tok, "isolated", base_cases[i].text, base_cases[i].allow_special,
					 base_cases[i].expected);
	fm_tokenizer_free(tok);
}

/* Special-token text typed by a user stays text unless allow_special is on. */
static void
test_special_text(void)
{
	const char *text = "a <|endoftext|> b";
	fm_tokenizer *tok;
	fm_error	err;
	int32_t    *ids;
	int32_t		n;
	bool		found = false;

	if ((tok = load_ok(&base_file)) == NULL)
		return;
	CHECK(fm_tokenizer_encode(tok, text, strlen(text), false, &ids, &n, &err) == FM_OK);
	for (int32_t i = 0; i < n; i++)
		found |= ids[i] == SPECIAL_ID;
	CHECK(!found);
	fm_free(&fm_malloc_allocator, ids);

	CHECK(fm_tokenizer_encode(tok, text, strlen(text), true, &ids, &n, &err) == FM_OK);
	found = false;
	for (int32_t i = 0; i < n; i++)
		found |= ids[i] == SPECIAL_ID;
	CHECK(found);
	fm_free(&fm_malloc_allocator, ids);
	fm_tokenizer_free(tok);
}

/*
 * Each Split behavior with and without invert, on a literal " " pattern,
 * encoding "a  b c ".
 */
static const struct
{
	const char *pre_tokenizer;
	const char *expected;		/* from Hugging Face tokenizers */
}			split_cases[] = {
	{LITERAL_SPLIT("Removed", "false"), "97 98 99"},
	{LITERAL_SPLIT("Removed", "true"), "32 32 32 32"},
	{LITERAL_SPLIT("Isolated", "false"), "97 32 32 98 32 99 32"},
	{LITERAL_SPLIT("Isolated", "true"), "97 32 32 98 32 99 32"},
	{LITERAL_SPLIT("MergedWithPrevious", "false"), "97 32 32 98 32 99 32"},
	{LITERAL_SPLIT("MergedWithPrevious", "true"), "97 32 32 98 32 99 32"},
	{LITERAL_SPLIT("MergedWithNext", "false"), "97 32 32 98 32 99 32"},
	{LITERAL_SPLIT("MergedWithNext", "true"), "97 32 32 98 32 99 32"},
	{LITERAL_SPLIT("Contiguous", "false"), "97 256 98 32 99 32"},
	{LITERAL_SPLIT("Contiguous", "true"), "97 256 98 32 99 32"},
};

#define N_SPLIT_CASES ((int) (sizeof(split_cases) / sizeof(split_cases[0])))

static void
test_split_behaviors(void)
{
	for (int i = 0; i < N_SPLIT_CASES; i++)
	{
		tok_file	f = base_file;
		fm_tokenizer *tok;
		char	   *got;

		f.pre_tokenizer = split_cases[i].pre_tokenizer;
		if ((tok = load_ok(&f)) == NULL)
			continue;
		got = encode_string(tok, "a  b c ", false);
		CHECK(strcmp(got, split_cases[i].expected) == 0);
		if (strcmp(got, split_cases[i].expected) != 0)
			printf("  split case %d: expected %s, got %s\n", i, split_cases[i].expected, got);
		free(got);
		fm_tokenizer_free(tok);
	}
}

/* A lone ByteLevel with use_regex applies the GPT-2 pattern itself. */
static void
test_byte_level_regex(void)
{
	tok_file	f = base_file;
	fm_tokenizer *tok;

	f.name = "bytelevel";
	f.pre_tokenizer = BYTE_LEVEL_REGEX;
	if ((tok = load_ok(&f)) == NULL)
		return;
	check_encode_prefix(tok, "bytelevel", "hello world", false, "268 263 270", " ");
	check_encode_prefix(tok, "bytelevel", "hello  world\n\nhello", false,
						"268 32 263 270 10 10 260", " ");
	check_encode_prefix(tok, "bytelevel", "1234567", false, "32 266 52 53 54 55", " ");
	fm_tokenizer_free(tok);
}

/* Checks that loading f fails with status and a message naming what. */
static void
check_load_error(const tok_file *f, fm_status status, const char *what)
{
	fm_tokenizer *tok = NULL;
	fm_error	err;
	fm_status	st = load(f, &tok, &err);

	CHECK(st == status);
	CHECK(tok == NULL);
	if (st == FM_OK)
	{
		fm_tokenizer_free(tok);
		return;
	}
	CHECK(strstr(err.message, what) != NULL);
	if (strstr(err.message, what) == NULL)
		printf("  message \"%s\" does not name \"%s\"\n", err.message, what);
}

static void
test_unsupported_types(void)
{
	tok_file	f;

	f = base_file;
	f.normalizer = "{\"type\": \"NFKC\"}";
	check_load_error(&f, FM_EUNSUPPORTED, "NFKC");

	f = base_file;
	f.pre_tokenizer = "{\"type\": \"Whitespace\"}";
	check_load_error(&f, FM_EUNSUPPORTED, "Whitespace");

	f = base_file;
	f.pre_tokenizer = SEQUENCE("{\"type\": \"Digits\", \"individual_digits\": true}");
	check_load_error(&f, FM_EUNSUPPORTED, "Digits");

	f = base_file;
	f.pre_tokenizer = SEQUENCE(SPLIT_STEP("Shuffled", "false"));
	check_load_error(&f, FM_EUNSUPPORTED, "Shuffled");

	f = base_file;
	f.decoder = "{\"type\": \"WordPiece\"}";
	check_load_error(&f, FM_EUNSUPPORTED, "WordPiece");

	f = base_file;
	f.decoder = "null";
	check_load_error(&f, FM_EUNSUPPORTED, "decoder");

	f = base_file;
	f.model_type = "Unigram";
	check_load_error(&f, FM_EUNSUPPORTED, "Unigram");

	f = base_file;
	f.missing_byte = 0x41;
	check_load_error(&f, FM_EINVAL, "0x41");
}

static void
test_invalid_input(void)
{
	fm_tokenizer *tok;
	fm_error	err;
	int32_t    *ids;
	int32_t		n;
	int32_t		unknown[] = {104, 272};
	char	   *text;
	size_t		len;

	if ((tok = load_ok(&base_file)) == NULL)
		return;
	CHECK(fm_tokenizer_encode(tok, "a\xC3", 2, false, &ids, &n, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "offset 1") != NULL);

	CHECK(fm_tokenizer_decode(tok, unknown, 2, &text, &len, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "272") != NULL);
	CHECK(fm_tokenizer_id_limit(tok) == SPECIAL_ID + 1);
	CHECK(fm_tokenizer_has_id(tok, 0));
	CHECK(fm_tokenizer_has_id(tok, 256 + N_MERGES - 1));
	CHECK(fm_tokenizer_has_id(tok, SPECIAL_ID));
	CHECK(!fm_tokenizer_has_id(tok, SPECIAL_ID + 1));
	CHECK(!fm_tokenizer_has_id(tok, -1));
	fm_tokenizer_free(tok);

	CHECK(fm_tokenizer_load_json("[1, 2", 5, &fm_malloc_allocator, &tok, &err) == FM_EINVAL);
	CHECK(fm_tokenizer_load_json("[1, 2]", 6, &fm_malloc_allocator, &tok, &err) == FM_EINVAL);
}

static void
test_utf8_complete_prefix(void)
{
	CHECK(fm_utf8_complete_prefix("abc", 3) == 3);
	CHECK(fm_utf8_complete_prefix("", 0) == 0);
	CHECK(fm_utf8_complete_prefix("\xC3\xA6", 2) == 2);	/* æ */
	CHECK(fm_utf8_complete_prefix("\xC3", 1) == 0);
	CHECK(fm_utf8_complete_prefix("a\xC3", 2) == 1);
	CHECK(fm_utf8_complete_prefix("a\xE2\x82", 3) == 1);	/* € cut */
	CHECK(fm_utf8_complete_prefix("\xE2\x82\xAC", 3) == 3);
	CHECK(fm_utf8_complete_prefix("x\xF0\x9F\x98", 4) == 1);	/* emoji cut */
	CHECK(fm_utf8_complete_prefix("x\xF0\x9F\x98\x80", 5) == 5);
	CHECK(fm_utf8_complete_prefix("\xFF", 1) == 0);
	CHECK(fm_utf8_complete_prefix("\xC0\x80", 2) == 0);	/* overlong NUL */
	CHECK(fm_utf8_complete_prefix("\xED\xA0\x80", 3) == 0);	/* surrogate */
	CHECK(fm_utf8_complete_prefix("\xF4\x90\x80\x80", 4) == 0);	/* past U+10FFFF */
	CHECK(fm_utf8_complete_prefix("ok\x80", 3) == 2);
}

/*
 * Streams "æø😀" one token at a time, holding back an incomplete tail:
 * every emitted piece is valid UTF-8 and the pieces join to the text.
 */
static void
test_streaming_pieces(void)
{
	const char *text = "\xC3\xA6\xC3\xB8\xF0\x9F\x98\x80";
	fm_tokenizer *tok;
	fm_error	err;
	int32_t    *ids;
	int32_t		n;
	char		pending[64];
	size_t		n_pending = 0;
	char		joined[64];
	size_t		n_joined = 0;
	bool		all_valid = true;

	if ((tok = load_ok(&base_file)) == NULL)
		return;
	CHECK(fm_tokenizer_encode(tok, text, strlen(text), false, &ids, &n, &err) == FM_OK);
	CHECK(n > 4);				/* the emoji needs several byte tokens */
	for (int32_t i = 0; i < n; i++)
	{
		char	   *piece;
		size_t		len;
		size_t		whole;

		CHECK(fm_tokenizer_decode(tok, &ids[i], 1, &piece, &len, &err) == FM_OK);
		memcpy(pending + n_pending, piece, len);
		n_pending += len;
		fm_free(&fm_malloc_allocator, piece);

		whole = fm_utf8_complete_prefix(pending, n_pending);
		all_valid &= fm_utf8_complete_prefix(pending, whole) == whole;
		memcpy(joined + n_joined, pending, whole);
		n_joined += whole;
		memmove(pending, pending + whole, n_pending - whole);
		n_pending -= whole;
	}
	CHECK(all_valid);
	CHECK(n_pending == 0);
	CHECK(n_joined == strlen(text));
	CHECK(memcmp(joined, text, n_joined) == 0);
	fm_free(&fm_malloc_allocator, ids);
	fm_tokenizer_free(tok);
}

/*
 * Serializes tok into a new 64-byte aligned buffer; NULL (after a failed
 * check) on error.  *len receives the image size.
 */
static void *
serialize_copy(const fm_tokenizer *tok, size_t *len)
{
	size_t		size = fm_tokenizer_image_size(tok);
	void	   *image = aligned_alloc(64, (size + 63) / 64 * 64);
	fm_error	err;
	fm_status	st;

	st = fm_tokenizer_serialize(tok, image, size, &err);
	CHECK(st == FM_OK);
	if (st != FM_OK)
	{
		printf("  serializing failed: %s\n", err.message);
		free(image);
		return NULL;
	}
	*len = size;
	return image;
}

/*
 * Loads f, serializes it, moves the image to a second buffer (so no
 * address inside the first one can be used), frees the loaded tokenizer
 * and attaches to the copy.  *image receives the buffer to free after
 * fm_tokenizer_free.
 */
static fm_tokenizer *
attach_ok(const tok_file *f, void **image)
{
	fm_tokenizer *loaded;
	fm_tokenizer *tok = NULL;
	void	   *first;
	size_t		len = 0;
	fm_error	err;
	fm_status	st;

	*image = NULL;
	if ((loaded = load_ok(f)) == NULL)
		return NULL;
	first = serialize_copy(loaded, &len);
	fm_tokenizer_free(loaded);
	if (first == NULL)
		return NULL;
	*image = aligned_alloc(64, (len + 63) / 64 * 64);
	memcpy(*image, first, len);
	memset(first, 0xAB, len);
	free(first);

	st = fm_tokenizer_attach(*image, len, &fm_malloc_allocator, &tok, &err);
	CHECK(st == FM_OK);
	if (st != FM_OK)
	{
		printf("  attaching the %s image failed: %s\n", f->name, err.message);
		free(*image);
		*image = NULL;
		return NULL;
	}
	return tok;
}

/* An attached tokenizer encodes and decodes as the one loaded from JSON. */
static void
test_image_round_trip(void)
{
	tok_file	f = base_file;
	fm_tokenizer *tok;
	void	   *image;

	if ((tok = attach_ok(&base_file, &image)) != NULL)
	{
		for (size_t i = 0; i < sizeof(base_cases) / sizeof(base_cases[0]); i++)
			check_encode(tok, "attached base", base_cases[i].text,
						 base_cases[i].allow_special, base_cases[i].expected);
		CHECK(fm_tokenizer_id_limit(tok) == SPECIAL_ID + 1);
		CHECK(fm_tokenizer_has_id(tok, SPECIAL_ID));
		fm_tokenizer_free(tok);
		free(image);
	}

	f.name = "attached bytelevel";
	f.pre_tokenizer = BYTE_LEVEL_REGEX;
	if ((tok = attach_ok(&f, &image)) != NULL)
	{
		check_encode_prefix(tok, f.name, "hello  world\n\nhello", false,
							"268 32 263 270 10 10 260", " ");
		fm_tokenizer_free(tok);
		free(image);
	}

	for (int i = 0; i < N_SPLIT_CASES; i++)
	{
		char	   *got;

		f = base_file;
		f.pre_tokenizer = split_cases[i].pre_tokenizer;
		if ((tok = attach_ok(&f, &image)) == NULL)
			continue;
		got = encode_string(tok, "a  b c ", false);
		CHECK(strcmp(got, split_cases[i].expected) == 0);
		if (strcmp(got, split_cases[i].expected) != 0)
			printf("  attached split case %d: expected %s, got %s\n", i,
				   split_cases[i].expected, got);
		free(got);
		fm_tokenizer_free(tok);
		free(image);
	}
}

/* Attaches to a damaged copy of image and checks the error names what. */
static void
check_attach_error(const void *image, size_t len, size_t at, uint32_t value,
				   size_t attach_len, const char *what)
{
	char	   *copy = aligned_alloc(64, (len + 63) / 64 * 64);
	fm_tokenizer *tok = NULL;
	fm_error	err;

	memcpy(copy, image, len);
	memcpy(copy + at, &value, sizeof(value));
	CHECK(fm_tokenizer_attach(copy, attach_len, &fm_malloc_allocator, &tok, &err) == FM_EINVAL);
	CHECK(tok == NULL);
	CHECK(strstr(err.message, what) != NULL);
	if (strstr(err.message, what) == NULL)
		printf("  expected an error naming \"%s\", got \"%s\"\n", what, err.message);
	free(copy);
}

/* A damaged, truncated or misaligned image is rejected. */
static void
test_image_rejects(void)
{
	fm_tokenizer *tok;
	fm_tokenizer *attached = NULL;
	void	   *image;
	char	   *shifted;
	size_t		len = 0;
	fm_error	err;

	if ((tok = load_ok(&base_file)) == NULL)
		return;
	if ((image = serialize_copy(tok, &len)) == NULL)
	{
		fm_tokenizer_free(tok);
		return;
	}

	/* The header starts with the magic number, then the format version. */
	check_attach_error(image, len, 0, 0x12345678u, len, "magic number");
	check_attach_error(image, len, 4, 99, len, "version");
	check_attach_error(image, len, 0, 0x4b4f5446u, len - 8, "bytes");
	check_attach_error(image, len, 0, 0x4b4f5446u, 16, "shorter than its header");

	shifted = aligned_alloc(64, (len + 64 + 63) / 64 * 64);
	memcpy(shifted + 4, image, len);
	CHECK(fm_tokenizer_attach(shifted + 4, len, &fm_malloc_allocator, &attached, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "aligned") != NULL);
	free(shifted);

	CHECK(fm_tokenizer_serialize(tok, image, len - 1, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "needs") != NULL);

	free(image);
	fm_tokenizer_free(tok);
}

static int
write_file(const char *dir, const char *name, const tok_file *file)
{
	char		path[1024];
	char	   *json = build_json(file);
	FILE	   *f;

	snprintf(path, sizeof(path), "%s/%s.json", dir, name);
	f = fopen(path, "w");
	if (f == NULL || fputs(json, f) < 0 || fclose(f) != 0)
	{
		fprintf(stderr, "could not write \"%s\"\n", path);
		return 1;
	}
	free(json);
	return 0;
}

/* Writes the generated files to dir, for checking them with Hugging Face. */
static int
dump_json(const char *dir)
{
	tok_file	f = base_file;
	char		name[32];
	int			failed = write_file(dir, "base", &f);

	f.pre_tokenizer = SEQUENCE(SPLIT_STEP("Isolated", "false"));
	f.merges_as_arrays = true;
	failed |= write_file(dir, "isolated", &f);
	f.merges_as_arrays = false;
	f.pre_tokenizer = BYTE_LEVEL_REGEX;
	failed |= write_file(dir, "bytelevel", &f);
	for (int i = 0; i < N_SPLIT_CASES; i++)
	{
		f.pre_tokenizer = split_cases[i].pre_tokenizer;
		snprintf(name, sizeof(name), "split_%d", i);
		failed |= write_file(dir, name, &f);
	}
	return failed;
}

static int	polls_until_stop;

/* Interrupt callback that asks to stop on its polls_until_stop-th call. */
static bool
stop_after_polls(void *arg)
{
	return --polls_until_stop <= 0;
}

static void
test_encode_limits(void)
{
	fm_tokenizer *tok;
	fm_error	err;
	int32_t    *ids;
	int32_t		n;
	fm_encode_options options = {0};
	size_t		len = 200000;
	char	   *text = malloc(len);

	if ((tok = load_ok(&base_file)) == NULL)
		return;

	/* "a a a ..." gives one id per word, so 100000 ids. */
	for (size_t i = 0; i < len; i += 2)
	{
		text[i] = 'a';
		text[i + 1] = ' ';
	}

	options.max_ids = 1000;
	CHECK(fm_tokenizer_encode_ex(tok, text, len, &options, &ids, &n, &err) == FM_ELIMIT);
	CHECK(strstr(err.message, "more than 1000 tokens") != NULL);
	CHECK(ids == NULL);

	options.max_ids = 0;
	options.interrupt = stop_after_polls;
	polls_until_stop = 3;
	CHECK(fm_tokenizer_encode_ex(tok, text, len, &options, &ids, &n, &err) == FM_ECANCELED);
	CHECK(polls_until_stop == 0);

	/* Without a stop the same text encodes whole. */
	polls_until_stop = 1000000;
	CHECK(fm_tokenizer_encode_ex(tok, text, len, &options, &ids, &n, &err) == FM_OK);
	CHECK(n >= 100000);
	free(ids);
	free(text);
	fm_tokenizer_free(tok);
}

int
main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "--dump-json") == 0)
		return dump_json(argv[2]);

	test_base_encoding();
	test_special_text();
	test_split_behaviors();
	test_byte_level_regex();
	test_unsupported_types();
	test_invalid_input();
	test_encode_limits();
	test_utf8_complete_prefix();
	test_streaming_pieces();
	test_image_round_trip();
	test_image_rejects();
	return TEST_SUMMARY();
}
