/*-------------------------------------------------------------------------
 *
 * flexmore-run.c
 *	  Command-line driver of the engine: loads a checkpoint directory and
 *	  prints next-token logits or generated ids.
 *
 *	  flexmore-run logits DIR --ids 1,2,3 [--experts NAME,NAME]
 *	  flexmore-run generate DIR (--ids 1,2,3 | --prompt TEXT) --max-tokens N
 *		  [--temperature T] [--top-p P] [--top-k K] [--seed S]
 *		  [--repetition-penalty R] [--experts NAME,NAME] [--context N]
 *
 * The directory contains config.json and either model.safetensors or the
 * shards listed in model.safetensors.index.json.  Every tensor is
 * converted to fp32 in malloc'd memory, so the tool needs about four
 * bytes of RAM per parameter: it is for tests, debugging and small
 * models, not for serving.  tokenizer.json, when present, marks which
 * ids can be sampled and serves --prompt.
 *
 * logits prints a JSON array of floats with 9 significant digits, which
 * round-trips fp32 exactly.  generate prints a JSON object with the ids,
 * the finish reason and, when a tokenizer is loaded, the decoded text.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres_fe.h"

#include <math.h>
#include <sys/stat.h>

#include "common/checkpoint.h"
#include "engine/engine.h"


/* Parses "1,2,3" into a malloc'd array. */
static int32_t *
parse_ids(const char *text, int32_t *n)
{
	int32_t    *ids = pg_malloc(sizeof(int32_t) * (strlen(text) / 2 + 1));
	const char *p = text;

	*n = 0;
	while (*p != '\0')
	{
		char	   *end;
		long		value;

		errno = 0;
		value = strtol(p, &end, 10);
		if (end == p || errno != 0 || value < INT32_MIN || value > INT32_MAX ||
			(*end != ',' && *end != '\0'))
			tool_fail("invalid --ids list \"%s\": expected integers separated by commas", text);
		ids[(*n)++] = (int32_t) value;
		p = (*end == ',') ? end + 1 : end;
	}
	if (*n == 0)
		tool_fail("--ids is empty");
	return ids;
}

static void
print_json_string(const char *s, size_t len)
{
	putchar('"');
	for (size_t i = 0; i < len; i++)
	{
		unsigned char ch = (unsigned char) s[i];

		if (ch == '"' || ch == '\\')
			printf("\\%c", ch);
		else if (ch < 0x20)
			printf("\\u%04x", ch);
		else
			putchar(ch);
	}
	putchar('"');
}

static void
usage(void)
{
	fprintf(stderr,
			"usage: flexmore-run logits DIR --ids 1,2,3 [--experts NAME,NAME]\n"
			"       flexmore-run generate DIR (--ids 1,2,3 | --prompt TEXT) --max-tokens N\n"
			"           [--temperature T] [--top-p P] [--top-k K] [--seed S]\n"
			"           [--repetition-penalty R] [--experts NAME,NAME] [--context N]\n"
			"  --temperature  sampling temperature, 0 (default) is greedy\n"
			"  --top-p        nucleus probability mass in (0, 1], default 1 (off)\n"
			"  --top-k        keep the K most likely ids, default 0 (off)\n"
			"  --seed         random seed, default 0\n"
			"  --repetition-penalty  divide the positive logits of ids already in the\n"
			"                 context by R, multiply the negative ones; default 1 (off)\n"
			"  --context      KV cache positions, default max_position_embeddings\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	const char *command;
	const char *dir;
	const char *ids_arg = NULL;
	const char *prompt = NULL;
	const char *experts_arg = NULL;
	int32_t		max_tokens = -1;
	int32_t		context_len = 0;
	fm_sampler_params params = {.temperature = 0.0, .top_p = 1.0, .top_k = 0,
		.repetition_penalty = 1.0, .seed = 0};
	checkpoint	ck;
	int32_t    *ids;
	int32_t		n_ids;
	bool		allowed[FM_MAX_EXPERTS];
	fm_session *session;
	fm_error	err;

	tool_name = "flexmore-run";
	if (argc < 3)
		usage();
	command = argv[1];
	dir = argv[2];
	for (int i = 3; i < argc; i++)
	{
		const char *opt = argv[i];
		const char *val = (i + 1 < argc) ? argv[i + 1] : NULL;

		if (val == NULL)
			usage();
		if (strcmp(opt, "--ids") == 0)
			ids_arg = val;
		else if (strcmp(opt, "--prompt") == 0)
			prompt = val;
		else if (strcmp(opt, "--experts") == 0)
			experts_arg = val;
		else if (strcmp(opt, "--max-tokens") == 0)
			max_tokens = atoi(val);
		else if (strcmp(opt, "--context") == 0)
			context_len = atoi(val);
		else if (strcmp(opt, "--temperature") == 0)
			params.temperature = strtod(val, NULL);
		else if (strcmp(opt, "--top-p") == 0)
			params.top_p = strtod(val, NULL);
		else if (strcmp(opt, "--top-k") == 0)
			params.top_k = atoi(val);
		else if (strcmp(opt, "--repetition-penalty") == 0)
			params.repetition_penalty = strtod(val, NULL);
		else if (strcmp(opt, "--seed") == 0)
			params.seed = strtoull(val, NULL, 10);
		else
			usage();
		i++;
	}
	if (strcmp(command, "logits") != 0 && strcmp(command, "generate") != 0)
		usage();
	if ((ids_arg == NULL) == (prompt == NULL))
		tool_fail("give exactly one of --ids and --prompt");

	checkpoint_load(&ck, dir, true);

	if (prompt != NULL)
	{
		if (ck.tokenizer == NULL)
			tool_fail("--prompt needs %s/tokenizer.json", dir);
		tool_check(fm_tokenizer_encode(ck.tokenizer, prompt, strlen(prompt), false,
								  &ids, &n_ids, &err), &err, "tokenizer");
		if (n_ids == 0)
			tool_fail("the prompt encodes to no ids");
	}
	else
		ids = parse_ids(ids_arg, &n_ids);

	if (context_len == 0)
	{
		context_len = ck.config.max_position_embeddings;
		if (strcmp(command, "logits") == 0 && n_ids < context_len)
			context_len = n_ids;
	}
	tool_check(fm_session_create(&ck.model, &fm_malloc_allocator, context_len, &session, &err),
		  &err, "session");
	if (experts_arg != NULL)
	{
		checkpoint_parse_experts(&ck, experts_arg, allowed);
		tool_check(fm_session_set_experts(session, allowed, &err), &err, "--experts");
	}

	if (strcmp(command, "logits") == 0)
	{
		float	   *logits = pg_malloc(sizeof(float) * ck.config.vocab_size);

		tool_check(fm_forward(session, ids, n_ids, logits, NULL, NULL, &err), &err, "forward");
		putchar('[');
		for (int32_t i = 0; i < ck.config.vocab_size; i++)
		{
			if (isfinite(logits[i]))
				printf("%s%.9g", i > 0 ? "," : "", logits[i]);
			else
				printf("%snull", i > 0 ? "," : "");
		}
		printf("]\n");
	}
	else
	{
		bool	   *sampleable = NULL;
		int32_t    *out;
		int32_t		n_out;
		fm_finish	finish;

		if (max_tokens < 0)
			tool_fail("generate needs --max-tokens N with N >= 0");
		if (ck.tokenizer != NULL)
		{
			sampleable = pg_malloc(sizeof(bool) * ck.config.vocab_size);
			for (int32_t i = 0; i < ck.config.vocab_size; i++)
				sampleable[i] = fm_tokenizer_has_id(ck.tokenizer, i);
		}
		out = pg_malloc(sizeof(int32_t) * (max_tokens + 1));
		tool_check(fm_generate(session, ids, n_ids, max_tokens, &params, sampleable,
						  out, &n_out, &finish, NULL, NULL, &err), &err, "generate");

		printf("{\"ids\": [");
		for (int32_t i = 0; i < n_out; i++)
			printf("%s%d", i > 0 ? ", " : "", out[i]);
		printf("], \"finish\": \"%s\"", fm_finish_name(finish));
		if (ck.tokenizer != NULL)
		{
			char	   *text;
			size_t		len;

			tool_check(fm_tokenizer_decode(ck.tokenizer, out, n_out, &text, &len, &err),
				  &err, "decode");
			printf(", \"text\": ");
			print_json_string(text, fm_utf8_complete_prefix(text, len));
		}
		printf("}\n");
	}

	fm_session_destroy(session);
	return 0;
}
