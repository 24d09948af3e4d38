/*-------------------------------------------------------------------------
 *
 * checkpoint.c
 *	  Loading a checkpoint folder into an fp32 fm_model for the
 *	  command-line programs; see checkpoint.h.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres_fe.h"

#include <sys/stat.h>

#include "common/checkpoint.h"
#include "reader/reader.h"

const char *tool_name = "flexmore";

void
tool_fail(const char *fmt,...)
{
	va_list		args;

	fprintf(stderr, "%s: ", tool_name);
	va_start(args, fmt);
	vfprintf(stderr, fmt, args);
	va_end(args);
	fprintf(stderr, "\n");
	exit(1);
}
void
tool_check(fm_status status, const fm_error *err, const char *what)
{
	if (status != FM_OK)
		tool_fail("%s: %s", what, err->message);
}

char *
tool_read_file(const char *path, size_t *len, bool missing_ok)
{
	FILE	   *f = fopen(path, "rb");
	struct stat st;
	char	   *buf;

	if (f == NULL)
	{
		if (missing_ok && errno == ENOENT)
			return NULL;
		tool_fail("could not open \"%s\": %s", path, strerror(errno));
	}
	if (fstat(fileno(f), &st) != 0)
		tool_fail("could not stat \"%s\": %s", path, strerror(errno));
	buf = pg_malloc((size_t) st.st_size + 1);
	if (fread(buf, 1, (size_t) st.st_size, f) != (size_t) st.st_size)
		tool_fail("could not read \"%s\"", path);
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
		tool_fail("could not open \"%s\": %s", path, strerror(errno));
	if (fstat(fileno(f), &st) != 0)
		tool_fail("could not stat \"%s\": %s", path, strerror(errno));
	if (fread(prefix, 1, 8, f) != 8)
		tool_fail("\"%s\" is shorter than a safetensors header", path);
	for (int i = 7; i >= 0; i--)
		header_len = (header_len << 8) | prefix[i];
	if (header_len > (uint64_t) st.st_size - 8)
		tool_fail("\"%s\": safetensors header length %llu exceeds the file size %lld",
			 path, (unsigned long long) header_len, (long long) st.st_size);
	header = pg_malloc(header_len + 1);
	if (fread(header, 1, header_len, f) != header_len)
		tool_fail("could not read the header of \"%s\"", path);
	tool_check(fm_st_parse_header(header, header_len, (uint64_t) st.st_size, &st_file, &err),
		  &err, path);

	for (int32_t i = 0; i < st_file.num_tensors; i++)
	{
		const fm_st_tensor *t = &st_file.tensors[i];
		loaded_tensor *lt;
		size_t		bytes = t->end - t->begin;
		size_t		count;
		void	   *raw;

		if (!t->dtype_supported)
			tool_fail("\"%s\": tensor %s has dtype %s; supported dtypes are F32, BF16 and F16",
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
			tool_fail("could not read tensor %s from \"%s\"", t->name, path);
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

void
checkpoint_load(checkpoint *ck, const char *dir, bool load_tokenizer)
{
	char	   *path;
	char	   *index_json;
	size_t		len;
	int32_t		capacity = 0;
	fm_error	err;

	memset(ck, 0, sizeof(*ck));
	path = psprintf("%s/config.json", dir);
	ck->config_json = tool_read_file(path, &ck->config_len, false);
	tool_check(fm_config_parse(ck->config_json, ck->config_len, &ck->config, &err), &err, path);
	free(path);

	path = psprintf("%s/model.safetensors.index.json", dir);
	index_json = tool_read_file(path, &len, true);
	if (index_json == NULL)
		load_shard(ck, dir, "model.safetensors", &capacity);
	else
	{
		char	  **names;
		char	  **files;
		int32_t		n;

		tool_check(fm_st_parse_index(index_json, len, &names, &files, &n, &err), &err, path);
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
			tool_fail("tensor %s appears in more than one shard", ck->tensors[i].name);

	ck->model.config = ck->config;
	ck->layers = pg_malloc0(sizeof(fm_layer_weights) * ck->config.num_hidden_layers);
	tool_check(fm_layout_bind(&ck->model, ck->layers, lookup_tensor, ck, &err), &err, dir);
	tool_check(fm_model_validate(&ck->model, &err), &err, dir);

	if (!load_tokenizer)
		return;
	path = psprintf("%s/tokenizer.json", dir);
	{
		char	   *json = tool_read_file(path, &len, true);

		if (json != NULL)
		{
			tool_check(fm_tokenizer_load_json(json, len, &fm_malloc_allocator,
										 &ck->tokenizer, &err), &err, path);
			free(json);
		}
	}
	free(path);
}

/* Builds the allowed-expert mask; an unknown name lists the experts and exits. */
void
checkpoint_parse_experts(const checkpoint *ck, const char *list, bool *allowed)
{
	char	   *names[FM_MAX_EXPERTS];
	char	   *copy = pg_strdup(list);
	char	   *save = NULL;
	fm_error	err;

	tool_check(fm_config_expert_names(ck->config_json, ck->config_len, &ck->config, names, &err),
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
			fprintf(stderr, "%s: unknown expert \"%s\"; experts are:", tool_name, name);
			for (int32_t e = 0; e < ck->config.num_experts; e++)
				fprintf(stderr, " %s", names[e]);
			fprintf(stderr, "\n");
			exit(1);
		}
	}
	free(copy);
}
