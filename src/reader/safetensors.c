/*-------------------------------------------------------------------------
 *
 * safetensors.c
 *	  Parses and validates safetensors headers and the shard index
 *	  model.safetensors.index.json.
 *
 * A safetensors file is an 8-byte little-endian header length n, n bytes
 * of JSON mapping each tensor name to {dtype, shape, data_offsets}, then
 * the raw data.  Offsets in the header are relative to the end of the
 * header.  fm_st_parse_header turns them into absolute file offsets, so
 * callers can read or map a tensor directly.
 *
 * Every range is checked before anything is read: it must lie inside the
 * file, hold exactly dtype size x product(shape) bytes, and not overlap
 * another tensor.  A dtype outside F32/BF16/F16 is kept with
 * dtype_supported false, so the importer can name the tensor and the
 * dtype instead of failing on the first unknown entry.
 *
 *-------------------------------------------------------------------------
 */
#ifdef FRONTEND
#include "postgres_fe.h"
#else
#include "postgres.h"
#endif

#include "reader/json_tree.h"
#include "reader/reader.h"

#define INDEX_FILE "model.safetensors.index.json"

/* Element sizes of the dtypes the safetensors format defines. */
static const struct
{
	const char *name;
	int			size;
}			known_dtypes[] = {
	{"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
	{"I16", 2}, {"U16", 2}, {"F16", 2}, {"BF16", 2},
	{"I32", 4}, {"U32", 4}, {"F32", 4},
	{"I64", 8}, {"U64", 8}, {"F64", 8},
};

/* Element size of a dtype name, or 0 when the format does not define it. */
static int
dtype_element_size(const char *name)
{
	for (size_t i = 0; i < lengthof(known_dtypes); i++)
		if (strcmp(known_dtypes[i].name, name) == 0)
			return known_dtypes[i].size;
	return 0;
}

static bool
read_offset(const fm_json *node, uint64_t *out)
{
	int64_t		value;

	if (!fm_json_int64(node, &value) || value < 0)
		return false;
	*out = (uint64_t) value;
	return true;
}

/* Fills *t from one header entry, checking its fields and its range. */
static fm_status
parse_tensor(const char *name, const fm_json *entry, const fm_st_file *file,
			 fm_st_tensor *t, fm_error *err)
{
	const fm_json *dtype = fm_json_member(entry, "dtype");
	const fm_json *shape = fm_json_member(entry, "shape");
	const fm_json *offsets = fm_json_member(entry, "data_offsets");
	uint64_t	data_size = file->file_size - file->data_start;
	uint64_t	begin;
	uint64_t	end;
	uint64_t	elements = 1;
	int			element_size;

	memset(t, 0, sizeof(*t));
	t->name = pstrdup(name);
	if (entry->kind != FM_JSON_OBJECT || dtype == NULL || dtype->kind != FM_JSON_STRING ||
		shape == NULL || shape->kind != FM_JSON_ARRAY ||
		offsets == NULL || offsets->kind != FM_JSON_ARRAY)
		return fm_set_error(err, FM_EINVAL,
							"safetensors header: tensor %s needs dtype, shape and data_offsets",
							name);

	strlcpy(t->dtype_name, dtype->text, sizeof(t->dtype_name));
	t->dtype_supported = strlen(dtype->text) < sizeof(t->dtype_name) &&
		fm_dtype_parse(dtype->text, &t->dtype);

	if (shape->count > FM_MAX_DIMS)
		return fm_set_error(err, FM_EINVAL,
							"safetensors header: tensor %s has %d dimensions, more than the supported %d",
							name, shape->count, FM_MAX_DIMS);
	t->ndim = shape->count;
	for (int32_t d = 0; d < shape->count; d++)
	{
		int64_t		dim;

		if (!fm_json_int64(shape->items[d], &dim) || dim < 0)
		{
			const fm_json *item = shape->items[d];

			return fm_set_error(err, FM_EINVAL,
								"safetensors header: tensor %s has invalid size %s in dimension %d; expected a non-negative integer",
								name,
								item->kind == FM_JSON_NUMBER ? item->text : fm_json_kind_name(item->kind),
								d);
		}
		t->shape[d] = dim;
		if (__builtin_mul_overflow(elements, (uint64_t) dim, &elements))
			return fm_set_error(err, FM_EINVAL,
								"safetensors header: tensor %s has too many elements",
								name);
	}

	if (offsets->count != 2 || !read_offset(offsets->items[0], &begin) ||
		!read_offset(offsets->items[1], &end))
		return fm_set_error(err, FM_EINVAL,
							"safetensors header: tensor %s needs data_offsets [begin, end] of non-negative integers",
							name);
	if (end < begin)
		return fm_set_error(err, FM_EINVAL,
							"safetensors header: tensor %s has data_offsets [%llu, %llu] with end before begin",
							name, (unsigned long long) begin, (unsigned long long) end);
	if (end > data_size)
		return fm_set_error(err, FM_EINVAL,
							"safetensors header: tensor %s has data_offsets [%llu, %llu] beyond the %llu data bytes of the file",
							name, (unsigned long long) begin, (unsigned long long) end,
							(unsigned long long) data_size);

	element_size = dtype_element_size(dtype->text);
	if (element_size > 0)
	{
		uint64_t	expected;

		if (__builtin_mul_overflow(elements, (uint64_t) element_size, &expected) ||
			expected != end - begin)
			return fm_set_error(err, FM_EINVAL,
								"safetensors header: tensor %s holds %llu bytes, but dtype %s and its shape need %llu",
								name, (unsigned long long) (end - begin), dtype->text,
								(unsigned long long) (elements * element_size));
	}

	t->begin = file->data_start + begin;
	t->end = file->data_start + end;
	return FM_OK;
}

static int
compare_by_name(const void *a, const void *b)
{
	return strcmp(((const fm_st_tensor *) a)->name, ((const fm_st_tensor *) b)->name);
}

static int
compare_by_begin(const void *a, const void *b)
{
	const fm_st_tensor *ta = *(const fm_st_tensor *const *) a;
	const fm_st_tensor *tb = *(const fm_st_tensor *const *) b;

	if (ta->begin != tb->begin)
		return ta->begin < tb->begin ? -1 : 1;
	return ta->end < tb->end ? -1 : (ta->end > tb->end ? 1 : 0);
}

/* Rejects two tensors whose byte ranges share a byte. */
static fm_status
check_overlaps(const fm_st_file *file, fm_error *err)
{
	const fm_st_tensor **order;
	const fm_st_tensor *prev = NULL;
	fm_status	status = FM_OK;

	if (file->num_tensors == 0)
		return FM_OK;
	order = palloc(sizeof(fm_st_tensor *) * file->num_tensors);
	for (int32_t i = 0; i < file->num_tensors; i++)
		order[i] = &file->tensors[i];
	qsort(order, file->num_tensors, sizeof(fm_st_tensor *), compare_by_begin);

	for (int32_t i = 0; i < file->num_tensors; i++)
	{
		const fm_st_tensor *t = order[i];

		/* an empty tensor occupies no byte, wherever it points */
		if (t->begin == t->end)
			continue;
		if (prev != NULL && t->begin < prev->end)
		{
			status = fm_set_error(err, FM_EINVAL,
								  "safetensors header: tensors %s and %s overlap in bytes [%llu, %llu)",
								  prev->name, t->name,
								  (unsigned long long) (t->begin - file->data_start),
								  (unsigned long long) ((t->end < prev->end ? t->end : prev->end) - file->data_start));
			break;
		}
		prev = t;
	}
	pfree(order);
	return status;
}

fm_status
fm_st_parse_header(const char *header, uint64_t header_len,
				   uint64_t file_size, fm_st_file *out, fm_error *err)
{
	fm_json    *root;
	fm_status	status;
	int32_t		n = 0;

	memset(out, 0, sizeof(*out));
	if (file_size < 8 || header_len > file_size - 8)
		return fm_set_error(err, FM_EINVAL,
							"safetensors header length %llu exceeds the file size %llu",
							(unsigned long long) header_len, (unsigned long long) file_size);
	out->file_size = file_size;
	out->header_len = header_len;
	out->data_start = 8 + header_len;

	status = fm_json_parse(header, header_len, "safetensors header", &root, err);
	if (status != FM_OK)
		return status;
	if (root->kind != FM_JSON_OBJECT)
	{
		const char *kind = fm_json_kind_name(root->kind);

		fm_json_free(root);
		return fm_set_error(err, FM_EINVAL, "safetensors header must be a JSON object, got %s",
							kind);
	}

	out->tensors = palloc0(sizeof(fm_st_tensor) * (root->count > 0 ? root->count : 1));
	for (int32_t i = 0; i < root->count && status == FM_OK; i++)
	{
		if (strcmp(root->keys[i], "__metadata__") == 0)
			continue;
		status = parse_tensor(root->keys[i], root->items[i], out, &out->tensors[n], err);
		n++;
	}
	out->num_tensors = n;
	fm_json_free(root);

	if (status == FM_OK)
	{
		qsort(out->tensors, n, sizeof(fm_st_tensor), compare_by_name);
		for (int32_t i = 1; i < n; i++)
			if (strcmp(out->tensors[i - 1].name, out->tensors[i].name) == 0)
			{
				status = fm_set_error(err, FM_EINVAL,
									  "safetensors header: tensor %s appears twice",
									  out->tensors[i].name);
				break;
			}
	}
	if (status == FM_OK)
		status = check_overlaps(out, err);
	if (status != FM_OK)
		fm_st_free(out);
	return status;
}

void
fm_st_free(fm_st_file *file)
{
	for (int32_t i = 0; i < file->num_tensors; i++)
		if (file->tensors[i].name != NULL)
			pfree(file->tensors[i].name);
	if (file->tensors != NULL)
		pfree(file->tensors);
	file->tensors = NULL;
	file->num_tensors = 0;
}

const fm_st_tensor *
fm_st_find(const fm_st_file *file, const char *name)
{
	int32_t		lo = 0;
	int32_t		hi = file->num_tensors - 1;

	while (lo <= hi)
	{
		int32_t		mid = lo + (hi - lo) / 2;
		int			cmp = strcmp(file->tensors[mid].name, name);

		if (cmp == 0)
			return &file->tensors[mid];
		if (cmp < 0)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return NULL;
}

fm_status
fm_st_parse_index(const char *json, size_t len, char ***names,
				  char ***files, int32_t *n, fm_error *err)
{
	fm_json    *root;
	const fm_json *map;
	fm_status	status = FM_OK;

	*names = NULL;
	*files = NULL;
	*n = 0;
	status = fm_json_parse(json, len, INDEX_FILE, &root, err);
	if (status != FM_OK)
		return status;

	map = fm_json_member(root, "weight_map");
	if (map == NULL || map->kind != FM_JSON_OBJECT)
	{
		fm_json_free(root);
		return fm_set_error(err, FM_EINVAL, "%s: missing object weight_map", INDEX_FILE);
	}

	for (int32_t i = 0; i < map->count; i++)
	{
		const fm_json *file = map->items[i];

		if (file->kind != FM_JSON_STRING || file->text[0] == '\0' ||
			file->text[0] == '.' || strchr(file->text, '/') != NULL ||
			strchr(file->text, '\\') != NULL)
		{
			status = fm_set_error(err, FM_EINVAL,
								  "%s: tensor %s maps to invalid shard file name %s; expected a plain file name in the checkpoint directory",
								  INDEX_FILE, map->keys[i],
								  file->text != NULL ? file->text : fm_json_kind_name(file->kind));
			break;
		}
	}

	if (status == FM_OK && map->count > 0)
	{
		*names = palloc(sizeof(char *) * map->count);
		*files = palloc(sizeof(char *) * map->count);
		for (int32_t i = 0; i < map->count; i++)
		{
			(*names)[i] = pstrdup(map->keys[i]);
			(*files)[i] = pstrdup(map->items[i]->text);
		}
		*n = map->count;
	}
	fm_json_free(root);
	return status;
}
