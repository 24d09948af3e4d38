/*-------------------------------------------------------------------------
 *
 * flexmore-tokenize.c
 *	  Encodes lines of text with a tokenizer.json, for conformance tests.
 *
 * Usage: flexmore-tokenize [--allow-special] [--attached] TOKENIZER_JSON [INPUT]
 *
 * Each input line (from INPUT, or standard input) is one JSON string
 * literal, such as "a\n\nb", so that newlines, tabs and CR survive the
 * line format.  For each line the tool writes one output line:
 *
 *	ids<TAB>decoded
 *
 * where ids are the token ids separated by spaces and decoded is the
 * decoded text of those ids as a JSON string literal, so a caller can
 * check decode(encode(s)) == s.  A line that fails to encode prints
 * "error<TAB>message", and the tool goes on with the next line.  The exit
 * status is 1 when any line failed and 2 for a usage or load error.
 *
 * With --attached the tool serializes the loaded tokenizer, frees it and
 * encodes with a tokenizer attached to the image, the form the server's
 * shared cache uses, so the conformance test covers both forms.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres_fe.h"

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"

#include "engine/engine.h"

/* Reads a whole file into a pg_malloc'd buffer. */
static char *
read_file(const char *path, size_t *len)
{
	FILE	   *f = fopen(path, "rb");
	char	   *buf;
	long		size;

	if (f == NULL)
	{
		fprintf(stderr, "flexmore-tokenize: could not open \"%s\": %m\n", path);
		exit(2);
	}
	if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0)
	{
		fprintf(stderr, "flexmore-tokenize: could not size \"%s\": %m\n", path);
		exit(2);
	}
	buf = pg_malloc(size + 1);
	if (fread(buf, 1, size, f) != (size_t) size)
	{
		fprintf(stderr, "flexmore-tokenize: could not read \"%s\": %m\n", path);
		exit(2);
	}
	fclose(f);
	buf[size] = '\0';
	*len = size;
	return buf;
}

/*
 * Decodes one JSON string literal with PostgreSQL's lexer.  Returns a
 * pg_malloc'd string, or NULL when the line is not a string literal.
 */
static char *
unquote(char *line, size_t len, size_t *out_len)
{
	JsonLexContext *lex;
	char	   *result = NULL;

#if PG_VERSION_NUM >= 160000
	lex = makeJsonLexContextCstringLen(NULL, line, (int) len, PG_UTF8, true);
#else
	lex = makeJsonLexContextCstringLen(line, (int) len, PG_UTF8, true);
#endif
	if (json_lex(lex) == JSON_SUCCESS && lex->token_type == JSON_TOKEN_STRING &&
		json_lex(lex) == JSON_SUCCESS && lex->token_type == JSON_TOKEN_END)
	{
		result = pg_strdup(lex->strval->data);
		*out_len = lex->strval->len;
	}
#if PG_VERSION_NUM >= 160000
	freeJsonLexContext(lex);
#else
	pfree(lex->strval->data);
	pfree(lex->strval);
	pfree(lex);
#endif
	return result;
}

/*
 * Replaces *tok with a tokenizer attached to its serialized image; the
 * image is returned and must outlive the tokenizer.  Exits on failure.
 */
static void *
attach_image(fm_tokenizer **tok)
{
	size_t		len = fm_tokenizer_image_size(*tok);
	void	   *image = aligned_alloc(64, (len + 63) / 64 * 64);
	fm_error	err;

	if (image == NULL)
	{
		fprintf(stderr, "flexmore-tokenize: out of memory allocating a %zu-byte image\n", len);
		exit(2);
	}
	if (fm_tokenizer_serialize(*tok, image, len, &err) != FM_OK)
	{
		fprintf(stderr, "flexmore-tokenize: could not serialize the tokenizer: %s\n", err.message);
		exit(2);
	}
	fm_tokenizer_free(*tok);
	if (fm_tokenizer_attach(image, len, &fm_malloc_allocator, tok, &err) != FM_OK)
	{
		fprintf(stderr, "flexmore-tokenize: could not attach to the tokenizer image: %s\n",
				err.message);
		exit(2);
	}
	return image;
}

/* Writes s as a JSON string literal. */
static void
print_quoted(const char *s, size_t len)
{
	putchar('"');
	for (size_t i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c == '"' || c == '\\')
			printf("\\%c", c);
		else if (c == '\n')
			fputs("\\n", stdout);
		else if (c == '\r')
			fputs("\\r", stdout);
		else if (c == '\t')
			fputs("\\t", stdout);
		else if (c < 0x20)
			printf("\\u%04x", c);
		else
			putchar(c);
	}
	putchar('"');
}

int
main(int argc, char **argv)
{
	bool		allow_special = false;
	bool		attached = false;
	void	   *image = NULL;
	int			argi = 1;
	char	   *json;
	size_t		json_len;
	fm_tokenizer *tok;
	fm_error	err;
	FILE	   *in = stdin;
	char	   *line = NULL;
	size_t		line_cap = 0;
	ssize_t		n;
	int			failures = 0;

	for (; argi < argc && strncmp(argv[argi], "--", 2) == 0; argi++)
	{
		if (strcmp(argv[argi], "--allow-special") == 0)
			allow_special = true;
		else if (strcmp(argv[argi], "--attached") == 0)
			attached = true;
		else
			break;
	}
	if (argc - argi < 1 || argc - argi > 2)
	{
		fprintf(stderr, "usage: flexmore-tokenize [--allow-special] [--attached] TOKENIZER_JSON [INPUT]\n"
				"Encodes each input line, a JSON string literal, and prints its ids and decoded text.\n"
				"--attached encodes with a tokenizer attached to its serialized image.\n");
		return 2;
	}

	json = read_file(argv[argi], &json_len);
	if (fm_tokenizer_load_json(json, json_len, &fm_malloc_allocator, &tok, &err) != FM_OK)
	{
		fprintf(stderr, "flexmore-tokenize: could not load \"%s\": %s\n", argv[argi], err.message);
		return 2;
	}
	pg_free(json);
	if (attached)
		image = attach_image(&tok);
	if (argc - argi == 2 && (in = fopen(argv[argi + 1], "rb")) == NULL)
	{
		fprintf(stderr, "flexmore-tokenize: could not open \"%s\": %m\n", argv[argi + 1]);
		return 2;
	}

	while ((n = getline(&line, &line_cap, in)) >= 0)
	{
		size_t		text_len;
		char	   *text;
		int32_t    *ids;
		int32_t		n_ids;
		char	   *decoded;
		size_t		decoded_len;

		while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
			line[--n] = '\0';
		text = unquote(line, n, &text_len);
		if (text == NULL)
		{
			printf("error\tinput line is not a JSON string literal\n");
			failures++;
			continue;
		}
		if (fm_tokenizer_encode(tok, text, text_len, allow_special, &ids, &n_ids, &err) != FM_OK)
		{
			printf("error\t%s\n", err.message);
			failures++;
			pg_free(text);
			continue;
		}
		if (fm_tokenizer_decode(tok, ids, n_ids, &decoded, &decoded_len, &err) != FM_OK)
		{
			printf("error\t%s\n", err.message);
			failures++;
			fm_free(&fm_malloc_allocator, ids);
			pg_free(text);
			continue;
		}
		for (int32_t i = 0; i < n_ids; i++)
			printf(i ? " %d" : "%d", ids[i]);
		putchar('\t');
		print_quoted(decoded, decoded_len);
		putchar('\n');
		fm_free(&fm_malloc_allocator, ids);
		fm_free(&fm_malloc_allocator, decoded);
		pg_free(text);
	}
	free(line);
	fm_tokenizer_free(tok);
	free(image);
	return failures ? 1 : 0;
}
