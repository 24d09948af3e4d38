/*
 * libFuzzer target for fm_tokenizer_load_json: the input is a
 * tokenizer.json.  A tokenizer that loads is also used once, to encode
 * and decode a short text, because a loader that accepts an inconsistent
 * vocabulary would fail there.
 */
#include "postgres_fe.h"

#include "engine/engine.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char	   *json = malloc(size + 1);
	fm_tokenizer *tok;
	fm_error	err = {0};

	memcpy(json, data, size);
	json[size] = '\0';
	if (fm_tokenizer_load_json(json, size, &fm_malloc_allocator, &tok, &err) == FM_OK)
	{
		static const char text[] = "Hello, world! 123 <|endoftext|> blåbær";
		int32_t    *ids;
		int32_t		n;
		char	   *out;
		size_t		len;

		if (fm_tokenizer_encode(tok, text, sizeof(text) - 1, true, &ids, &n, &err) == FM_OK)
		{
			if (fm_tokenizer_decode(tok, ids, n, &out, &len, &err) == FM_OK)
				fm_free(&fm_malloc_allocator, out);
			fm_free(&fm_malloc_allocator, ids);
		}
		fm_tokenizer_free(tok);
	}
	free(json);
	return 0;
}
