/*-------------------------------------------------------------------------
 *
 * flexmore-run.c
 *	  Command-line driver of the engine: loads a checkpoint directory and
 *	  prints next-token logits or generated ids.
 *
 *	  flexmore-run logits DIR --ids 1,2,3 [--experts NAME,NAME]
 *	  flexmore-run generate DIR (--ids 1,2,3 | --prompt TEXT) --max-tokens N
 *		  [--temperature T] [--top-p P] [--top-k K] [--seed S]
 *		  [--experts NAME,NAME] [--context N]
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

#include "engine/engine.h"
#include "reader/reader.h"

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
	fm_model	model;
	fm_tokenizer *tokenizer;	/* NULL without tokenizer.json */
} checkpoint;

static void
fail(const char *fmt,...)
{
	va_list		args;

	fprintf(stderr, "flexmore-run: ");
	va_start(args, fmt);
	vfprintf(stderr, fmt, args);
	va_end(args);
	fprintf(stderr, "\n");
	exit(1);
}

static void
check(fm_status status, const fm_error *err, const char *what)
{
	if (status != FM_OK)
		fail("%s: %s", what, err->message);
}

/* Reads a whole file; NULL when it does not exist. */
static char *
read_file(const char *path, size_t *len, bool missing_ok)
{
	FILE	   *f = fopen(path, "rb");
	struct stat st;
	char	   *buf;

	if (f == NULL)
	{
		if (missing_ok && errno == ENOENT)
			return NULL;
		fail("could not open \"%s\": %s", path, strerror(errno));
	}
	if (fstat(fileno(f), &st) != 0)
		fail("could not stat \"%s\": %s", path, strerror(errno));
	buf = pg_malloc((size_t) st.st_size + 1);
	if (fread(buf, 1, (size_t) st.st_size, f) != (size_t) st.st_size)
		fail("could not read \"%s\"", path);
	buf[st.st_size] = '\0';
	fclose(f);
	*len = (size_t) st.st_size;
	return buf;
}

static int
compare_tensors(const void *a, const void *b)
{
	return strcmp(((const loaded_tensor *) a)->name, ((const loaded_tensor *) b)->name);
}

/* Converts every tensor of one safetensors file to fp32 and appends it. */
static void
load_shard(checkpoint *ck, const char *dir, const char *file, int32_t *capacity)
{
	char	   *path = psprintf("%s/%s", dir, file);
	FILE	   *f = fopen(path, "rb");
	struct stat st;
	unsigned char prefix[8];
	uint64_t	header_len = 0;
	char	   *header;
	fm_st_file	st_file;
	fm_error	err;

	if (f == NULL)
		fail("could not open \"%s\": %s", path, strerror(errno));
	if (fstat(fileno(f), &st) != 0)
		fail("could not stat \"%s\": %s", path, strerror(errno));
	if (fread(prefix, 1, 8, f) != 8)
		fail("\"%s\" is shorter than a safetensors header", path);
	for (int i = 7; i >= 0; i--)
		header_len = (header_len << 8) | prefix[i];
	if (header_len > (uint64_t) st.st_size - 8)
		fail("\"%s\": safetensors header length %llu exceeds the file size %lld",
			 path, (unsigned long long) header_len, (long long) st.st_size);
	header = pg_malloc(header_len + 1);
	if (fread(header, 1, header_len, f) != header_len)
		fail("could not read the header of \"%s\"", path);
	check(fm_st_parse_header(header, header_len, (uint64_t) st.st_size, &st_file, &err),
		  &err, path);

	for (int32_t i = 0; i < st_file.num_tensors; i++)
	{
		const fm_st_tensor *t = &st_file.tensors[i];
		loaded_tensor *lt;
		size_t		bytes = t->end - t->begin;
		size_t		count;
		void	   *raw;

		if (!t->dtype_supported)
			fail("\"%s\": tensor %s has dtype %s; supported dtypes are F32, BF16 and F16",
				 path, t->name, t->dtype_name);
		if (ck->num_tensors == *capacity)
		{
			*capacity = *capacity * 2 + 16;
			ck->tensors = pg_realloc(ck->tensors, sizeof(loaded_tensor) * *capacity);
		}
		lt = &ck->tensors[ck->num_tensors++];
		lt->name = pg_strdup(t->name);
		lt->ndim = t->ndim;
		memcpy(lt->shape, t->shape, sizeof(lt->shape));
		count = bytes / fm_dtype_size(t->dtype);
		raw = pg_malloc(bytes + 1);
		lt->data = pg_malloc(sizeof(float) * count + 1);
		if (fseeko(f, (off_t) t->begin, SEEK_SET) != 0 ||
			fread(raw, 1, bytes, f) != bytes)
			fail("could not read tensor %s from \"%s\"", t->name, path);
		fm_convert_to_f32(t->dtype, raw, lt->data, count);
		free(raw);
	}
	fm_st_free(&st_file);
	free(header);
	fclose(f);
	free(path);
}

static const float *
lookup_tensor(void *arg, const char *name, int32_t *ndim, int64_t *shape)
{
	checkpoint *ck = arg;
	loaded_tensor key = {.name = (char *) name};
	loaded_tensor *t = bsearch(&key, ck->tensors, ck->num_tensors,
							   sizeof(loaded_tensor), compare_tensors);

	if (t == NULL)
		return NULL;
	*ndim = t->ndim;
	memcpy(shape, t->shape, sizeof(int64_t) * FM_MAX_DIMS);
	return t->data;
}

static void
load_checkpoint(checkpoint *ck, const char *dir)
{
	char	   *path;
	char	   *index_json;
	size_t		len;
	int32_t		capacity = 0;
	fm_error	err;

	memset(ck, 0, sizeof(*ck));
	path = psprintf("%s/config.json", dir);
	ck->config_json = read_file(path, &ck->config_len, false);
	check(fm_config_parse(ck->config_json, ck->config_len, &ck->config, &err), &err, path);
	free(path);

	path = psprintf("%s/model.safetensors.index.json", dir);
	index_json = read_file(path, &len, true);
	if (index_json == NULL)
		load_shard(ck, dir, "model.safetensors", &capacity);
	else
	{
		char	  **names;
		char	  **files;
		int32_t		n;

		check(fm_st_parse_index(index_json, len, &names, &files, &n, &err), &err, path);
		for (int32_t i = 0; i < n; i++)
		{
			bool		seen = false;

			for (int32_t j = 0; j < i && !seen; j++)
				seen = (strcmp(files[i], files[j]) == 0);
			if (!seen)
				load_shard(ck, dir, files[i], &capacity);
		}
		free(index_json);
	}
	free(path);

	qsort(ck->tensors, ck->num_tensors, sizeof(loaded_tensor), compare_tensors);
	for (int32_t i = 1; i < ck->num_tensors; i++)
		if (strcmp(ck->tensors[i - 1].name, ck->tensors[i].name) == 0)
			fail("tensor %s appears in more than one shard", ck->tensors[i].name);

	ck->model.config = ck->config;
	ck->layers = pg_malloc0(sizeof(fm_layer_weights) * ck->config.num_hidden_layers);
	check(fm_layout_bind(&ck->model, ck->layers, lookup_tensor, ck, &err), &err, dir);
	check(fm_model_validate(&ck->model, &err), &err, dir);

	path = psprintf("%s/tokenizer.json", dir);
	{
		char	   *json = read_file(path, &len, true);

		if (json != NULL)
		{
			check(fm_tokenizer_load_json(json, len, &fm_malloc_allocator,
										 &ck->tokenizer, &err), &err, path);
			free(json);
		}
	}
	free(path);
}

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
			fail("invalid --ids list \"%s\": expected integers separated by commas", text);
		ids[(*n)++] = (int32_t) value;
		p = (*end == ',') ? end + 1 : end;
	}
	if (*n == 0)
		fail("--ids is empty");
	return ids;
}

/* Builds the allowed-expert mask from "name,name". */
static void
parse_experts(const checkpoint *ck, const char *list, bool *allowed)
{
	char	   *names[FM_MAX_EXPERTS];
	char	   *copy = pg_strdup(list);
	char	   *save = NULL;
	fm_error	err;

	check(fm_config_expert_names(ck->config_json, ck->config_len, &ck->config, names, &err),
		  &err, "config.json");
	memset(allowed, 0, sizeof(bool) * FM_MAX_EXPERTS);
	for (char *name = strtok_r(copy, ",", &save); name != NULL;
		 name = strtok_r(NULL, ",", &save))
	{
		bool		found = false;

		for (int32_t e = 0; e < ck->config.num_experts; e++)
			if (strcmp(names[e], name) == 0)
			{
				allowed[e] = true;
				found = true;
			}
		if (!found)
		{
			fprintf(stderr, "flexmore-run: unknown expert \"%s\"; experts are:", name);
			for (int32_t e = 0; e < ck->config.num_experts; e++)
				fprintf(stderr, " %s", names[e]);
			fprintf(stderr, "\n");
			exit(1);
		}
	}
	free(copy);
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
			"           [--experts NAME,NAME] [--context N]\n"
			"  --temperature  sampling temperature, 0 (default) is greedy\n"
			"  --top-p        nucleus probability mass in (0, 1], default 1 (off)\n"
			"  --top-k        keep the K most likely ids, default 0 (off)\n"
			"  --seed         random seed, default 0\n"
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
	fm_sampler_params params = {.temperature = 0.0, .top_p = 1.0, .top_k = 0, .seed = 0};
	checkpoint	ck;
	int32_t    *ids;
	int32_t		n_ids;
	bool		allowed[FM_MAX_EXPERTS];
	fm_session *session;
	fm_error	err;

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
		else if (strcmp(opt, "--seed") == 0)
			params.seed = strtoull(val, NULL, 10);
		else
			usage();
		i++;
	}
	if (strcmp(command, "logits") != 0 && strcmp(command, "generate") != 0)
		usage();
	if ((ids_arg == NULL) == (prompt == NULL))
		fail("give exactly one of --ids and --prompt");

	load_checkpoint(&ck, dir);

	if (prompt != NULL)
	{
		if (ck.tokenizer == NULL)
			fail("--prompt needs %s/tokenizer.json", dir);
		check(fm_tokenizer_encode(ck.tokenizer, prompt, strlen(prompt), false,
								  &ids, &n_ids, &err), &err, "tokenizer");
		if (n_ids == 0)
			fail("the prompt encodes to no ids");
	}
	else
		ids = parse_ids(ids_arg, &n_ids);

	if (context_len == 0)
	{
		context_len = ck.config.max_position_embeddings;
		if (strcmp(command, "logits") == 0 && n_ids < context_len)
			context_len = n_ids;
	}
	check(fm_session_create(&ck.model, &fm_malloc_allocator, context_len, &session, &err),
		  &err, "session");
	if (experts_arg != NULL)
	{
		parse_experts(&ck, experts_arg, allowed);
		check(fm_session_set_experts(session, allowed, &err), &err, "--experts");
	}

	if (strcmp(command, "logits") == 0)
	{
		float	   *logits = pg_malloc(sizeof(float) * ck.config.vocab_size);

		check(fm_forward(session, ids, n_ids, logits, NULL, NULL, &err), &err, "forward");
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
			fail("generate needs --max-tokens N with N >= 0");
		if (ck.tokenizer != NULL)
		{
			sampleable = pg_malloc(sizeof(bool) * ck.config.vocab_size);
			for (int32_t i = 0; i < ck.config.vocab_size; i++)
				sampleable[i] = fm_tokenizer_has_id(ck.tokenizer, i);
		}
		out = pg_malloc(sizeof(int32_t) * (max_tokens + 1));
		check(fm_generate(session, ids, n_ids, max_tokens, &params, sampleable,
						  out, &n_out, &finish, NULL, NULL, &err), &err, "generate");

		printf("{\"ids\": [");
		for (int32_t i = 0; i < n_out; i++)
			printf("%s%d", i > 0 ? ", " : "", out[i]);
		printf("], \"finish\": \"%s\"", fm_finish_name(finish));
		if (ck.tokenizer != NULL)
		{
			char	   *text;
			size_t		len;

			check(fm_tokenizer_decode(ck.tokenizer, out, n_out, &text, &len, &err),
				  &err, "decode");
			printf(", \"text\": ");
			print_json_string(text, fm_utf8_complete_prefix(text, len));
		}
		printf("}\n");
	}

	fm_session_destroy(session);
	return 0;
}
