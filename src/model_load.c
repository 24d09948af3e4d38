/*-------------------------------------------------------------------------
 *
 * model_load.c
 *	  The per-backend model cache: each backend reads a model from the
 *	  flexmore tables once and keeps it for later calls.
 *
 * An entry lives in its own memory context under TopMemoryContext and
 * holds the parsed config, the tokenizer, the expert names and, once a
 * call needs the forward pass, every weight converted to fp32.  Entries
 * are never modified after they are built, so an error in the middle of a
 * call cannot leave one half-updated: a load that fails deletes its new
 * context and the list keeps what it had.
 *
 * Every call reads the model row by name (one index lookup) and compares
 * its id, generation and creation time with the entry.  A committed
 * re-import or drop therefore takes effect at the next call in every
 * backend, and a model imported earlier in the same transaction is seen
 * at once.  The list is not bounded: a backend keeps every model it has
 * used until the model changes.
 *
 * With the shared weight cache (flexmore in shared_preload_libraries,
 * src/cache.c) an entry holds no weights.  Each call pins the cache
 * items it needs (the shared part and the experts it may route to),
 * keyed by the import it sees in its own snapshot, and binds the entry's
 * weight pointers to them; fused expert tensors are split per expert when
 * an item is loaded.  An item starts with a directory (fm_item_header and
 * one fm_item_tensor per tensor, sorted by name) and then the fp32 data.
 * Without the shared cache every backend loads every weight privately, as
 * above, and is told once how to share them.
 *
 * With the shared cache the tokenizer is an item too: the image of
 * fm_tokenizer_serialize, built once from tokenizer.json by the first
 * backend that needs it.  Each backend attaches to the image in place
 * (fm_tokenizer_attach), which compiles only the split patterns, and
 * pins the item on every call like the weights, so an entry's tokenizer
 * is used only while its item is pinned.  Without the shared cache each
 * backend parses tokenizer.json itself.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include <sys/mman.h>

#include "access/parallel.h"
#include "cache.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "portability/instr_time.h"
#include "reader/reader.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(flexmore_cache_load);

static fm_cached_model *fm_cache = NULL;

static void fm_tokenizer_pin(fm_cached_model *entry);

/* Unlinks and frees an entry. */
static void
fm_cache_remove(fm_cached_model *entry)
{
	fm_cached_model **link = &fm_cache;

	while (*link != NULL && *link != entry)
		link = &(*link)->next;
	if (*link == entry)
		*link = entry->next;
	/* frees the JIT code of the split patterns, which PCRE2 maps itself */
	fm_tokenizer_free(entry->tokenizer);
	entry->tokenizer = NULL;
	MemoryContextDelete(entry->cxt);
}

static fm_cached_model *
fm_cache_lookup(const char *name)
{
	for (fm_cached_model *e = fm_cache; e != NULL; e = e->next)
		if (strcmp(e->name, name) == 0)
			return e;
	return NULL;
}

bool
fm_model_forget_private(const char *name)
{
	fm_cached_model *entry = fm_cache_lookup(name);

	if (entry == NULL)
		return false;
	fm_cache_remove(entry);
	return true;
}

void
fm_model_forget(const char *name)
{
	fm_model_forget_private(name);
	fm_cache_invalidate_at_commit(name);
}

/*
 * Builds a new entry (config, experts, tokenizer; no weights) in a new
 * context.  Runs inside SPI as the extension owner.
 */
static fm_cached_model *
fm_model_build(const char *name, const fm_model_row *row)
{
	MemoryContext cxt;
	MemoryContext old = CurrentMemoryContext;
	fm_cached_model *volatile entry = NULL;
	fm_error	err = {0};
	char	   *config_utf8;
	int			config_len;
	char	   *tokenizer_json;
	char	  **names;

	cxt = AllocSetContextCreate(TopMemoryContext, "flexmore model",
								ALLOCSET_DEFAULT_SIZES);
	MemoryContextSetIdentifier(cxt, MemoryContextStrdup(cxt, name));
	PG_TRY();
	{
		MemoryContextSwitchTo(cxt);
		entry = palloc0(sizeof(fm_cached_model));
		entry->name = pstrdup(name);
		entry->id = row->id;
		entry->generation = row->generation;
		entry->created = row->created;
		entry->cxt = cxt;
		fm_allocator_init(&entry->allocator, cxt);

		config_utf8 = fm_text_to_utf8(row->config_json, strlen(row->config_json),
									  &config_len);
		if (fm_config_parse(config_utf8, config_len, &entry->model.config, &err) != FM_OK)
			fm_raise(&err, psprintf("stored config of model \"%s\"", name));

		names = fm_storage_read_experts(row->id, &entry->num_experts);
		if (entry->num_experts != entry->model.config.num_experts)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("model \"%s\" has %d stored experts, but its config has %d",
							name, entry->num_experts, entry->model.config.num_experts)));
		/* SPI calls leave the SPI procedure context current, so name cxt. */
		entry->expert_names = MemoryContextAlloc(cxt, sizeof(char *) * entry->num_experts);
		for (int i = 0; i < entry->num_experts; i++)
			entry->expert_names[i] = MemoryContextStrdup(cxt, names[i]);

		if (fm_cache_enabled())
			fm_tokenizer_pin(entry);
		else
		{
			tokenizer_json = fm_storage_read_tokenizer(row->id, name);
			if (fm_tokenizer_load_json(tokenizer_json, strlen(tokenizer_json),
									   &entry->allocator, &entry->tokenizer, &err) != FM_OK)
				fm_raise(&err, psprintf("stored tokenizer of model \"%s\"", name));
			pfree(tokenizer_json);
		}
		entry->id_limit = fm_tokenizer_id_limit(entry->tokenizer);

		entry->sampleable = MemoryContextAllocZero(cxt, sizeof(bool) *
												   entry->model.config.vocab_size);
		for (int32 id = 0; id < entry->model.config.vocab_size; id++)
			entry->sampleable[id] = fm_tokenizer_has_id(entry->tokenizer, id);
		MemoryContextSwitchTo(old);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(old);
		if (entry != NULL)
			fm_tokenizer_free(entry->tokenizer);
		MemoryContextDelete(cxt);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return entry;
}

static void fm_model_load_weights(fm_cached_model *entry);
static bool fm_private_weights_current(const fm_cached_model *entry);

/*
 * Does the lookup and loading of fm_model_get.  Runs inside SPI as the
 * extension owner.
 */
static fm_cached_model *
fm_model_get_internal(const char *name, bool need_weights)
{
	fm_model_row row;
	fm_cached_model *volatile entry = fm_cache_lookup(name);

	if (!fm_storage_find_model(name, &row))
	{
		if (entry != NULL)
		{
			/* dropped since this backend last used it */
			fm_cache_remove(entry);
			fm_cache_invalidate(name, 0, 0, 0);
		}
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" does not exist", fm_quote_name(name)),
				 errhint("The models that exist are listed in the flexmore_models view.")));
	}

	if (entry != NULL &&
		(entry->id != row.id || entry->generation != row.generation ||
		 entry->created != row.created))
	{
		fm_cache_remove(entry);
		entry = NULL;
	}

	if (entry == NULL)
	{
		entry = fm_model_build(name, &row);
		entry->next = fm_cache;
		fm_cache = entry;
		/* older imports of this name are garbage once their pins go */
		fm_cache_invalidate(name, row.id, row.generation, row.created);
	}
	else if (fm_cache_enabled())
		fm_tokenizer_pin(entry);

	if (need_weights && !fm_private_weights_current(entry) && !fm_cache_enabled())
	{
		PG_TRY();
		{
			fm_model_load_weights(entry);
		}
		PG_CATCH();
		{
			/* Rebuild from scratch next time rather than keep partial weights. */
			fm_cache_remove(entry);
			PG_RE_THROW();
		}
		PG_END_TRY();
	}
	return entry;
}

fm_cached_model *
fm_model_get(const char *name, bool need_weights)
{
	fm_cached_model *volatile entry = NULL;
	fm_user_switch sw;

	SPI_connect();
	fm_switch_to_owner(&sw);
	PG_TRY();
	{
		entry = fm_model_get_internal(name, need_weights);
	}
	PG_FINALLY();
	{
		fm_restore_user(&sw);
	}
	PG_END_TRY();
	SPI_finish();

	if (need_weights)
		fm_model_use_weights(entry, NULL);
	return entry;
}

/* ---------- the shared weight cache ---------- */

#define FM_ITEM_MAGIC		0x4943464du	/* "MFCI" read as little-endian */
#define FM_ITEM_VERSION		2
#define FM_ITEM_NAME_LEN	128
#define FM_ITEM_ALIGN		64

/* Start of every cached item. */
typedef struct fm_item_header
{
	uint32		magic;
	uint16		version;
	uint16		flags;			/* none yet */
	int32		n_tensors;
	int32		expert;			/* -1 for the shared part */
	uint64		bytes;			/* whole item, header included */
} fm_item_header;

/*
 * One tensor of an item; data is at offset bytes from the item start, in
 * format (fm_weight_format: f32 for vectors and routers, else as
 * fm_layout_tensor_format decides for the item's format).
 */
typedef struct fm_item_tensor
{
	char		name[FM_ITEM_NAME_LEN];
	int32		ndim;
	int32		format;
	int64		shape[FM_MAX_DIMS];
	uint64		offset;
	uint64		bytes;
} fm_item_tensor;

/*
 * One tensor to write into an item: all of src, or for a fused expert
 * tensor numel elements of src starting at element src_start.
 */
typedef struct fm_item_part
{
	const fm_stored_tensor *src;
	fm_item_tensor dir;
	Size		src_start;
	Size		numel;
} fm_item_part;

typedef struct fm_item_plan
{
	fm_cached_model *entry;
	int32		expert;
	fm_weight_format format;	/* requested for the item's matrices */
	int			n;
	fm_item_part *parts;		/* sorted by dir.name */
	Size		bytes;
} fm_item_plan;

/* Per-entry state of the shared cache; lives in the entry's context. */
typedef struct fm_cache_binding
{
	int			n_tensors;
	fm_stored_tensor *tensors;	/* every stored tensor, NULL until first needed */
	int			n_pins;
	int			pins[FM_MAX_EXPERTS + 1];
	ResourceOwner pin_owner;
	bool		bound;
	const char *bound_items[FM_MAX_EXPERTS + 1];	/* [0] shared, [e + 1] expert e */
	fm_weight_format bound_format;	/* items of another format may reuse an address */

	/*
	 * Without the shared cache: the items' allocations in the entry's
	 * context ([0] shared, [e + 1] expert e), and their format.
	 */
	bool		private_loaded;
	char	   *private_items[FM_MAX_EXPERTS + 1];
	fm_weight_format private_format;

	/* the tokenizer item: its latest pin and the image entry->tokenizer reads */
	int			tokenizer_pin;	/* -1 for none */
	ResourceOwner tokenizer_owner;
	const char *tokenizer_image;
} fm_cache_binding;

/* Returns the entry's cache binding, creating it on first use. */
static fm_cache_binding *
fm_binding_get(fm_cached_model *entry)
{
	if (entry->binding == NULL)
	{
		entry->binding = MemoryContextAllocZero(entry->cxt, sizeof(fm_cache_binding));
		entry->binding->tokenizer_pin = -1;
	}
	return entry->binding;
}

static bool private_notice_sent = false;

/*
 * Address space that faults on any access, handed to the engine for the
 * experts a call did not pin.  Reserved, never committed.
 */
static char *absent_region = NULL;
static Size absent_bytes = 0;

/*
 * Returns the expert index of a per-expert tensor name and sets *proj to
 * the part after "experts.E.", or returns -1.
 */
static int32
fm_expert_of(const char *name, const char **proj)
{
	int			layer;
	int			expert;
	int			used = 0;

	if (sscanf(name, "model.layers.%d.mlp.experts.%d.%n", &layer, &expert, &used) == 2 &&
		used > 0)
	{
		*proj = name + used;
		return expert;
	}
	return -1;
}

/* Returns 1 for a fused gate_up_proj, 2 for a fused down_proj, else 0; sets *layer. */
static int
fm_fused_kind(const char *name, int *layer)
{
	int			used = 0;
	const char *rest;

	if (sscanf(name, "model.layers.%d.mlp.experts.%n", layer, &used) != 1 || used == 0)
		return 0;
	rest = name + used;
	if (strcmp(rest, "gate_up_proj") == 0 || strcmp(rest, "gate_up_proj.weight") == 0)
		return 1;
	if (strcmp(rest, "down_proj") == 0 || strcmp(rest, "down_proj.weight") == 0)
		return 2;
	return 0;
}

static int
fm_item_part_cmp(const void *a, const void *b)
{
	return strcmp(((const fm_item_part *) a)->dir.name,
				  ((const fm_item_part *) b)->dir.name);
}

static void
fm_plan_add(fm_item_plan *plan, const fm_stored_tensor *src, const char *name,
			int32 ndim, const int64 *shape, Size src_start)
{
	fm_item_part *p = &plan->parts[plan->n++];
	Size		numel = 1;

	memset(p, 0, sizeof(*p));
	p->src = src;
	if (strlen(name) >= FM_ITEM_NAME_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("tensor name \"%s\" of model \"%s\" is longer than %d bytes",
						name, plan->entry->name, FM_ITEM_NAME_LEN - 1)));
	strlcpy(p->dir.name, name, FM_ITEM_NAME_LEN);
	p->dir.ndim = ndim;
	for (int d = 0; d < ndim; d++)
	{
		p->dir.shape[d] = shape[d];
		numel *= (Size) shape[d];
	}
	p->src_start = src_start;
	p->numel = numel;
	p->dir.format = fm_layout_tensor_format(name, ndim, shape, plan->format);
	p->dir.bytes = p->dir.format == FM_WEIGHTS_F32 ? numel * sizeof(float) :
		fm_matrix_bytes(p->dir.format, shape[0], shape[1]);
	if (p->dir.bytes == SIZE_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("tensor \"%s\" of model \"%s\" is too large for format %s",
						name, plan->entry->name, fm_weight_format_name(p->dir.format))));
}

/* Adds expert e's slices of a fused tensor to plan. */
static void
fm_plan_add_fused(fm_item_plan *plan, const fm_stored_tensor *t, int kind, int layer,
				  int32 e)
{
	char		name[FM_ITEM_NAME_LEN];
	int64		shape[2];
	int64		rows;
	int64		cols;

	if (t->ndim != 3 || t->shape[0] != plan->entry->num_experts ||
		(kind == 1 && t->shape[1] % 2 != 0))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("fused tensor \"%s\" of model \"%s\" does not have one slice per expert",
						t->name, plan->entry->name)));
	rows = t->shape[1];
	cols = t->shape[2];
	if (kind == 1)
	{
		/* gate rows first, then up rows: [E, 2 * inter, hidden] */
		shape[0] = rows / 2;
		shape[1] = cols;
		snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.gate_proj.weight", layer, e);
		fm_plan_add(plan, t, name, 2, shape, (Size) e * rows * cols);
		snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.up_proj.weight", layer, e);
		fm_plan_add(plan, t, name, 2, shape, (Size) e * rows * cols + (Size) (rows / 2) * cols);
	}
	else
	{
		shape[0] = rows;
		shape[1] = cols;
		snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.down_proj.weight", layer, e);
		fm_plan_add(plan, t, name, 2, shape, (Size) e * rows * cols);
	}
}

/*
 * Lists the tensors of one item (expert -1: the shared part) with their
 * place and format in it, and its size.  Allocated in the current context.
 */
static void
fm_plan_item(fm_cached_model *entry, int32 expert, fm_weight_format format,
			 fm_item_plan *plan)
{
	fm_cache_binding *b = entry->binding;
	Size		offset;

	plan->entry = entry;
	plan->expert = expert;
	plan->format = format;
	plan->n = 0;
	plan->parts = palloc(sizeof(fm_item_part) * (2 * b->n_tensors + 1));

	for (int i = 0; i < b->n_tensors; i++)
	{
		const fm_stored_tensor *t = &b->tensors[i];
		const char *proj;
		int32		e = fm_expert_of(t->name, &proj);
		int			layer;
		int			kind = fm_fused_kind(t->name, &layer);

		if (kind != 0)
		{
			if (expert >= 0)
				fm_plan_add_fused(plan, t, kind, layer, expert);
		}
		else if (e == expert)
			fm_plan_add(plan, t, t->name, t->ndim, t->shape, 0);
	}
	qsort(plan->parts, plan->n, sizeof(fm_item_part), fm_item_part_cmp);

	offset = TYPEALIGN(FM_ITEM_ALIGN, sizeof(fm_item_header) +
					   sizeof(fm_item_tensor) * plan->n);
	for (int i = 0; i < plan->n; i++)
	{
		plan->parts[i].dir.offset = offset;
		offset = TYPEALIGN(FM_ITEM_ALIGN, offset + plan->parts[i].dir.bytes);
	}
	plan->bytes = offset;
}

/*
 * Writes an item: the directory, then each tensor read from the tables,
 * widened to fp32 and converted to its format.  A fused tensor is read
 * whole into private memory and only this expert's slices are copied.
 * Runs inside SPI as the extension owner; fm_cache_pin frees the item if
 * this raises an error.
 */
static void
fm_fill_item(void *arg, char *dst, Size bytes)
{
	fm_item_plan *plan = (fm_item_plan *) arg;
	fm_item_header *header = (fm_item_header *) dst;
	fm_item_tensor *dir = (fm_item_tensor *) (dst + sizeof(fm_item_header));
	MemoryContext scratch = AllocSetContextCreate(CurrentMemoryContext,
												  "flexmore item load",
												  ALLOCSET_DEFAULT_SIZES);
	MemoryContext widened = AllocSetContextCreate(CurrentMemoryContext,
												  "flexmore item conversion",
												  ALLOCSET_DEFAULT_SIZES);
	const fm_stored_tensor *fused_src = NULL;
	float	   *fused = NULL;

	memset(header, 0, sizeof(*header));
	header->n_tensors = plan->n;
	header->expert = plan->expert;
	header->bytes = bytes;
	for (int i = 0; i < plan->n; i++)
		dir[i] = plan->parts[i].dir;

	for (int i = 0; i < plan->n; i++)
	{
		const fm_item_part *p = &plan->parts[i];
		char	   *out = dst + p->dir.offset;
		float	   *values = (float *) out;
		Size		src_numel = p->src->raw_bytes / fm_dtype_size(p->src->dtype);

		CHECK_FOR_INTERRUPTS();
		/* other formats are packed from an fp32 copy */
		if (p->dir.format != FM_WEIGHTS_F32)
		{
			MemoryContextReset(widened);
			values = MemoryContextAllocExtended(widened, p->numel * sizeof(float),
												MCXT_ALLOC_HUGE);
		}

		if (p->src_start == 0 && p->numel == src_numel)
			fm_storage_read_tensor(p->src, plan->entry->name, values);
		else
		{
			if (fused_src != p->src)
			{
				MemoryContextReset(scratch);
				fused = MemoryContextAllocExtended(scratch, src_numel * sizeof(float),
												   MCXT_ALLOC_HUGE);
				fm_storage_read_tensor(p->src, plan->entry->name, fused);
				fused_src = p->src;
			}
			memcpy(values, fused + p->src_start, p->numel * sizeof(float));
		}

		if (p->dir.format != FM_WEIGHTS_F32)
			fm_matrix_pack(p->dir.format, values, (int32) p->dir.shape[0],
						   (int32) p->dir.shape[1], out);
	}
	MemoryContextDelete(scratch);
	MemoryContextDelete(widened);

	/* written last, so a directory is never valid before its data */
	header->magic = FM_ITEM_MAGIC;
	header->version = FM_ITEM_VERSION;
}

/* Reads and keeps the entry's tensor list.  Runs inside SPI as the owner. */
static void
fm_binding_tensors(fm_cached_model *entry)
{
	fm_cache_binding *b = entry->binding;
	fm_stored_tensor *list;
	int			n;

	if (b->tensors != NULL)
		return;
	list = fm_storage_list_tensors(entry->id, &n);
	b->tensors = MemoryContextAlloc(entry->cxt, sizeof(fm_stored_tensor) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		b->tensors[i] = list[i];
		b->tensors[i].name = MemoryContextStrdup(entry->cxt, list[i].name);
	}
	b->n_tensors = n;
}

/* Sets needed[e] from allowed, adding expert 0 when a low-rank expert is allowed. */
static void
fm_needed_experts(const fm_cached_model *entry, const bool *allowed, bool *needed)
{
	const fm_config *c = &entry->model.config;

	for (int e = 0; e < entry->num_experts; e++)
		needed[e] = (allowed == NULL || allowed[e]);
	for (int e = 1; e < entry->num_experts; e++)
		if (needed[e] && c->expert_ranks[e] > 0)
			needed[0] = true;
}

/* Pins (loading if needed) the items of needed into b->pins and items[]. */
static void
fm_pin_items(fm_cached_model *entry, const bool *needed, const char **items)
{
	fm_cache_binding *b = entry->binding;

	fm_binding_tensors(entry);
	for (int32 e = -1; e < entry->num_experts; e++)
	{
		fm_cache_key key;
		fm_item_plan plan;
		char	   *data;

		items[e + 1] = NULL;
		if (e >= 0 && !needed[e])
			continue;
		key.dbid = MyDatabaseId;
		key.model_id = entry->id;
		key.generation = entry->generation;
		key.created = entry->created;
		key.expert = e;
		key.kind = FM_CACHE_WEIGHTS;
		key.format = flexmore_weight_format;
		fm_plan_item(entry, e, (fm_weight_format) flexmore_weight_format, &plan);
		b->pins[b->n_pins++] = fm_cache_pin(&key, entry->name,
											e < 0 ? NULL : entry->expert_names[e],
											plan.bytes, fm_fill_item, &plan, &data);
		items[e + 1] = data;
		pfree(plan.parts);
	}
}

/* Makes absent_region at least bytes long.  Old reservations stay mapped. */
static void
fm_reserve_absent(Size bytes)
{
	void	   *p;

	if (bytes <= absent_bytes)
		return;
	bytes = TYPEALIGN(1024 * 1024, bytes);
	p = mmap(NULL, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not reserve %zu bytes of address space: %m", bytes)));
	/* NB: the old region is not unmapped, so old pointers keep faulting */
	absent_region = p;
	absent_bytes = bytes;
}

typedef struct fm_bind_lookup
{
	const fm_cached_model *entry;
	const char **items;
	fm_weight_format format;	/* of the items, for absent experts */
} fm_bind_lookup;

/* Shape of a per-expert tensor from the config, for experts not pinned. */
static bool
fm_absent_shape(const fm_config *c, int32 e, const char *proj, int64 *shape)
{
	int64		h = c->hidden_size;
	int64		i = c->intermediate_size;
	int64		r = c->expert_ranks[e];
	static const char *const names[] = {
		"gate_proj.weight", "up_proj.weight", "down_proj.weight",
		"gate_proj_a.weight", "gate_proj_b.weight", "up_proj_a.weight",
		"up_proj_b.weight", "down_proj_a.weight", "down_proj_b.weight"
	};
	int64		dims[9][2] = {{i, h}, {i, h}, {h, i}, {r, h}, {i, r}, {r, h},
	{i, r}, {r, i}, {h, r}};

	for (int k = 0; k < 9; k++)
		if (strcmp(proj, names[k]) == 0)
		{
			shape[0] = dims[k][0];
			shape[1] = dims[k][1];
			return true;
		}
	return false;
}

/* fm_matrix_lookup_fn over the pinned (or private) items. */
static const void *
fm_lookup_item_tensor(void *arg, const char *name, int32_t *ndim, int64_t *shape,
					  fm_weight_format *format)
{
	fm_bind_lookup *l = (fm_bind_lookup *) arg;
	const char *proj = NULL;
	int32		e = fm_expert_of(name, &proj);
	const char *item;
	const fm_item_header *header;
	const fm_item_tensor *dir;
	int			lo;
	int			hi;

	if (e >= l->entry->num_experts)
		return NULL;
	item = l->items[e + 1];
	if (item == NULL)
	{
		if (e < 0 || !fm_absent_shape(&l->entry->model.config, e, proj, shape))
			return NULL;
		*ndim = 2;
		*format = fm_layout_tensor_format(name, 2, shape, l->format);
		return absent_region;
	}

	header = (const fm_item_header *) item;
	dir = (const fm_item_tensor *) (item + sizeof(fm_item_header));
	lo = 0;
	hi = header->n_tensors - 1;
	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;
		int			cmp = strcmp(name, dir[mid].name);

		if (cmp == 0)
		{
			*ndim = dir[mid].ndim;
			for (int d = 0; d < dir[mid].ndim; d++)
				shape[d] = dir[mid].shape[d];
			*format = (fm_weight_format) dir[mid].format;
			return item + dir[mid].offset;
		}
		if (cmp < 0)
			hi = mid - 1;
		else
			lo = mid + 1;
	}
	return NULL;
}

/* Points the entry's weights at the pinned items; checks every item header. */
static void
fm_bind_items(fm_cached_model *entry, const char **items, fm_weight_format format)
{
	fm_cache_binding *b = entry->binding;
	const fm_config *c = &entry->model.config;
	fm_bind_lookup lookup = {entry, items, format};
	fm_error	err = {0};
	Size		largest = 0;

	if (b->bound && b->bound_format == format &&
		memcmp(b->bound_items, items, sizeof(char *) * (entry->num_experts + 1)) == 0)
		return;

	for (int e = -1; e < entry->num_experts; e++)
	{
		const fm_item_header *h = (const fm_item_header *) items[e + 1];

		if (h != NULL && (h->magic != FM_ITEM_MAGIC || h->version != FM_ITEM_VERSION ||
						  h->expert != e))
			elog(ERROR, "flexmore cache item of model \"%s\" expert %d has a bad header",
				 entry->name, e);
	}

	/*
	 * The largest expert tensor in any format: [inter, hidden] or a
	 * low-rank factor, whose panels of 16 rows can make it larger in q8
	 * than in f32.
	 */
	for (int e = 0; e < entry->num_experts; e++)
	{
		int64		r = c->expert_ranks[e] > 0 ? c->expert_ranks[e] : c->intermediate_size;
		int64		in = Max(c->hidden_size, c->intermediate_size);

		for (int f = FM_WEIGHTS_F32; f <= FM_WEIGHTS_Q8; f++)
		{
			Size		bytes = fm_matrix_bytes(fm_matrix_format_for(f, in), r, in);

			if (bytes != SIZE_MAX)
				largest = Max(largest, bytes);
		}
	}
	fm_reserve_absent(Max(largest, 1));

	b->bound = false;
	entry->weights_loaded = false;
	if (entry->layers == NULL)
		entry->layers = MemoryContextAllocZero(entry->cxt,
											   sizeof(fm_layer_weights) * c->num_hidden_layers);
	if (fm_layout_bind_formats(&entry->model, entry->layers, fm_lookup_item_tensor, &lookup,
							   &err) != FM_OK)
		fm_raise(&err, psprintf("model \"%s\"", entry->name));
	if (fm_model_validate(&entry->model, &err) != FM_OK)
		fm_raise(&err, psprintf("model \"%s\"", entry->name));
	memcpy(b->bound_items, items, sizeof(char *) * (entry->num_experts + 1));
	b->bound_format = format;
	b->bound = true;
	entry->weights_loaded = true;
}

/*
 * Without the shared cache: builds every item (the shared part and each
 * expert) in the entry's context, in the format of
 * flexmore.weight_format, and binds the weights to them.  A previous
 * private copy in another format is freed first; each item is one large
 * allocation, which the context returns to the system when freed.  On
 * error the caller deletes the entry.  Runs inside SPI as the extension
 * owner.
 */
static void
fm_model_load_weights(fm_cached_model *entry)
{
	fm_cache_binding *b = fm_binding_get(entry);
	fm_weight_format format = (fm_weight_format) flexmore_weight_format;
	const char *items[FM_MAX_EXPERTS + 1];

	entry->weights_loaded = false;
	b->bound = false;
	b->private_loaded = false;
	for (int i = 0; i <= entry->num_experts; i++)
	{
		if (b->private_items[i] != NULL)
			pfree(b->private_items[i]);
		b->private_items[i] = NULL;
	}
	fm_binding_tensors(entry);

	for (int32 e = -1; e < entry->num_experts; e++)
	{
		fm_item_plan plan;
		char	   *mem;

		fm_plan_item(entry, e, format, &plan);
		mem = MemoryContextAllocExtended(entry->cxt, plan.bytes + FM_ITEM_ALIGN,
										 MCXT_ALLOC_HUGE | MCXT_ALLOC_NO_OOM);
		if (mem == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory loading model \"%s\"", entry->name),
					 errdetail("Failed on a request of %zu bytes of %s weights.",
							   plan.bytes, fm_weight_format_name(format))));
		b->private_items[e + 1] = mem;
		items[e + 1] = (const char *) TYPEALIGN(FM_ITEM_ALIGN, mem);
		fm_fill_item(&plan, (char *) items[e + 1], plan.bytes);
		pfree(plan.parts);
	}
	fm_bind_items(entry, items, format);
	b->private_format = format;
	b->private_loaded = true;
}

/* True when the entry has private weights in the current format. */
static bool
fm_private_weights_current(const fm_cached_model *entry)
{
	return entry->weights_loaded && entry->binding != NULL &&
		entry->binding->private_loaded &&
		entry->binding->private_format == (fm_weight_format) flexmore_weight_format;
}

/* Loads every weight into the entry (no shared cache), removing it on failure. */
static void
fm_model_load_private(fm_cached_model *entry)
{
	fm_user_switch sw;

	SPI_connect();
	fm_switch_to_owner(&sw);
	PG_TRY();
	{
		fm_model_load_weights(entry);
	}
	PG_CATCH();
	{
		fm_restore_user(&sw);
		fm_cache_remove(entry);
		PG_RE_THROW();
	}
	PG_END_TRY();
	fm_restore_user(&sw);
	SPI_finish();
}

void
fm_model_use_weights(fm_cached_model *entry, const bool *allowed)
{
	bool		needed[FM_MAX_EXPERTS];
	const char *items[FM_MAX_EXPERTS + 1];
	fm_user_switch sw;
	instr_time	start;
	instr_time	blas_done;
	instr_time	pinned;
	instr_time	bound;

	INSTR_TIME_SET_CURRENT(start);
	fm_threads_begin_call();

	/*
	 * OpenBLAS is loaded only when a product first has enough rows for
	 * sgemm, so a connection running short calls never pays for it.
	 */
	fm_set_sgemm_loader(fm_blas_ensure);
	INSTR_TIME_SET_CURRENT(blas_done);
	if (!fm_cache_enabled())
	{
		if (!private_notice_sent && !IsParallelWorker() && !IsBackgroundWorker)
		{
			ereport(NOTICE,
					(errmsg("flexmore is not in shared_preload_libraries, so this connection keeps its own copy of the weights"),
					 errhint("Add flexmore to shared_preload_libraries and restart the server to share one copy between all connections; flexmore.cache_size sets its size.")));
			private_notice_sent = true;
		}
		if (!fm_private_weights_current(entry))
			fm_model_load_private(entry);
		return;
	}

	fm_binding_get(entry);
	fm_model_release(entry);
	entry->binding->pin_owner = CurrentResourceOwner;
	fm_needed_experts(entry, allowed, needed);

	SPI_connect();
	fm_switch_to_owner(&sw);
	PG_TRY();
	{
		fm_pin_items(entry, needed, items);
	}
	PG_FINALLY();
	{
		fm_restore_user(&sw);
	}
	PG_END_TRY();
	SPI_finish();
	INSTR_TIME_SET_CURRENT(pinned);

	fm_bind_items(entry, items, (fm_weight_format) flexmore_weight_format);
	INSTR_TIME_SET_CURRENT(bound);

	/* The parts of a first call's cost that do not depend on the prompt. */
	INSTR_TIME_SUBTRACT(bound, pinned);
	INSTR_TIME_SUBTRACT(pinned, blas_done);
	INSTR_TIME_SUBTRACT(blas_done, start);
	elog(DEBUG1, "flexmore: model \"%s\": OpenBLAS check %.2f ms, pinning %.2f ms, binding %.2f ms",
		 entry->name, INSTR_TIME_GET_MILLISEC(blas_done), INSTR_TIME_GET_MILLISEC(pinned),
		 INSTR_TIME_GET_MILLISEC(bound));
}

/* ---------- the tokenizer item ---------- */

/* Writes the tokenizer image into a new item; arg is the parsed tokenizer. */
static void
fm_fill_tokenizer(void *arg, char *dst, Size bytes)
{
	fm_error	err = {0};

	if (fm_tokenizer_serialize((const fm_tokenizer *) arg, dst, bytes, &err) != FM_OK)
		fm_raise(&err, "tokenizer image");
}

/*
 * Pins the entry's tokenizer item for the current call, building it from
 * the stored tokenizer.json when no backend has, and attaches
 * entry->tokenizer to it when the item is new to this entry.  Runs inside
 * SPI as the extension owner.
 *
 * NB: the previous call's pin is dropped before the new one is taken.  Its
 * resource owner may be gone, and a new owner can sit at the same address,
 * so dropping it after taking the new pin could release the new pin
 * itself and leave the image in use unpinned.  Between the two steps this
 * backend does not use the image; if it is evicted meanwhile, the address
 * check below attaches to the new copy.
 */
static void
fm_tokenizer_pin(fm_cached_model *entry)
{
	fm_cache_binding *b = fm_binding_get(entry);
	int			old_pin = b->tokenizer_pin;
	ResourceOwner old_owner = b->tokenizer_owner;
	fm_cache_key key;
	char	   *data;
	int			slot;

	key.dbid = MyDatabaseId;
	key.model_id = entry->id;
	key.generation = entry->generation;
	key.created = entry->created;
	key.expert = FM_CACHE_SHARED_PART;
	key.kind = FM_CACHE_TOKENIZER;
	key.format = 0;

	if (old_pin >= 0)
		(void) fm_cache_unpin_if_held(old_pin, old_owner);
	b->tokenizer_pin = -1;

	slot = fm_cache_pin(&key, entry->name, NULL, 0, NULL, NULL, &data);
	if (slot < 0)
	{
		/*
		 * Parse privately, then store the image.  When another backend
		 * stores it first, fm_cache_pin returns that one and this parse
		 * was wasted, which is harmless.
		 */
		MemoryContext parse_cxt = AllocSetContextCreate(CurrentMemoryContext,
														"flexmore tokenizer parse",
														ALLOCSET_DEFAULT_SIZES);
		MemoryContext old = MemoryContextSwitchTo(parse_cxt);
		fm_allocator a;
		fm_tokenizer *parsed;
		fm_error	err = {0};
		char	   *json;
		instr_time	start;
		instr_time	elapsed;

		INSTR_TIME_SET_CURRENT(start);
		fm_allocator_init(&a, parse_cxt);
		json = fm_storage_read_tokenizer(entry->id, entry->name);
		if (fm_tokenizer_load_json(json, strlen(json), &a, &parsed, &err) != FM_OK)
			fm_raise(&err, psprintf("stored tokenizer of model \"%s\"", entry->name));
		MemoryContextSwitchTo(old);
		slot = fm_cache_pin(&key, entry->name, NULL, fm_tokenizer_image_size(parsed),
							fm_fill_tokenizer, parsed, &data);
		fm_tokenizer_free(parsed);
		MemoryContextDelete(parse_cxt);
		INSTR_TIME_SET_CURRENT(elapsed);
		INSTR_TIME_SUBTRACT(elapsed, start);
		elog(DEBUG1, "flexmore: read, parsed and cached the tokenizer of model \"%s\" in %.1f ms",
			 entry->name, INSTR_TIME_GET_MILLISEC(elapsed));
	}
	b->tokenizer_pin = slot;
	b->tokenizer_owner = CurrentResourceOwner;

	if (data != b->tokenizer_image || entry->tokenizer == NULL)
	{
		fm_error	err = {0};
		fm_tokenizer *tok;
		instr_time	start;
		instr_time	elapsed;

		/* the item was evicted and loaded again at another place */
		fm_tokenizer_free(entry->tokenizer);
		entry->tokenizer = NULL;
		b->tokenizer_image = NULL;

		INSTR_TIME_SET_CURRENT(start);
		if (fm_tokenizer_attach(data, fm_cache_item_bytes(slot), &entry->allocator,
								&tok, &err) != FM_OK)
			fm_raise(&err, psprintf("cached tokenizer of model \"%s\"", entry->name));
		INSTR_TIME_SET_CURRENT(elapsed);
		INSTR_TIME_SUBTRACT(elapsed, start);
		elog(DEBUG1, "flexmore: attached the cached tokenizer of model \"%s\" in %.2f ms",
			 entry->name, INSTR_TIME_GET_MILLISEC(elapsed));
		entry->tokenizer = tok;
		b->tokenizer_image = data;
	}
}

void
fm_model_release(fm_cached_model *entry)
{
	fm_cache_binding *b = entry->binding;

	if (b == NULL)
		return;
	for (int i = 0; i < b->n_pins; i++)
		(void) fm_cache_unpin_if_held(b->pins[i], b->pin_owner);
	b->n_pins = 0;
}

/*
 * flexmore_cache_load(model_name text, experts text[] DEFAULT NULL) loads
 * the shared part, the named experts (NULL: every expert) and the
 * tokenizer into the cache and returns their size in bytes.  Without the shared cache it
 * loads the whole model into this backend.
 */
Datum
flexmore_cache_load(PG_FUNCTION_ARGS)
{
	char	   *model_name;
	fm_cached_model *entry;
	bool		allowed[FM_MAX_EXPERTS];
	bool		needed[FM_MAX_EXPERTS];
	int64		bytes = 0;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	entry = fm_model_get(model_name, false);

	if (PG_ARGISNULL(1))
		memset(allowed, true, sizeof(allowed));
	else
	{
		Datum	   *elems;
		bool	   *nulls;
		int			n;

		memset(allowed, false, sizeof(allowed));
		deconstruct_array(PG_GETARG_ARRAYTYPE_P(1), TEXTOID, -1, false, TYPALIGN_INT,
						  &elems, &nulls, &n);
		for (int i = 0; i < n; i++)
		{
			char	   *name;
			int			e;

			if (nulls[i])
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("experts must not contain nulls")));
			name = TextDatumGetCString(elems[i]);
			for (e = 0; e < entry->num_experts; e++)
				if (strcmp(entry->expert_names[e], name) == 0)
					break;
			if (e == entry->num_experts)
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_OBJECT),
						 errmsg("expert \"%s\" does not exist in model \"%s\"",
								fm_quote_name(name), model_name)));
			allowed[e] = true;
		}
	}

	fm_model_use_weights(entry, allowed);
	if (entry->binding != NULL && fm_cache_enabled())
	{
		const fm_item_header *h;

		fm_needed_experts(entry, allowed, needed);
		for (int e = -1; e < entry->num_experts; e++)
			if ((e < 0 || needed[e]) &&
				(h = (const fm_item_header *) entry->binding->bound_items[e + 1]) != NULL)
				bytes += (int64) h->bytes;
		if (entry->binding->tokenizer_pin >= 0)
			bytes += (int64) fm_cache_item_bytes(entry->binding->tokenizer_pin);
	}
	else
		bytes = (int64) MemoryContextMemAllocated(entry->cxt, true);
	fm_model_release(entry);
	PG_RETURN_INT64(bytes);
}
