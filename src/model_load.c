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
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include "executor/spi.h"
#include "miscadmin.h"
#include "reader/reader.h"
#include "utils/builtins.h"

static fm_cached_model *fm_cache = NULL;

/* Unlinks and frees an entry. */
static void
fm_cache_remove(fm_cached_model *entry)
{
	fm_cached_model **link = &fm_cache;

	while (*link != NULL && *link != entry)
		link = &(*link)->next;
	if (*link == entry)
		*link = entry->next;
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

void
fm_model_forget(const char *name)
{
	fm_cached_model *entry = fm_cache_lookup(name);

	if (entry != NULL)
		fm_cache_remove(entry);
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
	fm_cached_model *entry;
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

		tokenizer_json = fm_storage_read_tokenizer(row->id, name);
		if (fm_tokenizer_load_json(tokenizer_json, strlen(tokenizer_json),
								   &entry->allocator, &entry->tokenizer, &err) != FM_OK)
			fm_raise(&err, psprintf("stored tokenizer of model \"%s\"", name));
		pfree(tokenizer_json);
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
		MemoryContextDelete(cxt);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return entry;
}

/* Name-sorted fp32 tensors that fm_layout_bind looks up. */
typedef struct fm_loaded_tensors
{
	int			n;
	fm_stored_tensor *stored;
	float	  **data;
} fm_loaded_tensors;

static const float *
fm_lookup_tensor(void *arg, const char *name, int32_t *ndim, int64_t *shape)
{
	fm_loaded_tensors *lt = (fm_loaded_tensors *) arg;
	int			lo = 0;
	int			hi = lt->n - 1;

	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;
		int			c = strcmp(name, lt->stored[mid].name);

		if (c == 0)
		{
			*ndim = lt->stored[mid].ndim;
			for (int d = 0; d < lt->stored[mid].ndim; d++)
				shape[d] = lt->stored[mid].shape[d];
			return lt->data[mid];
		}
		if (c < 0)
			hi = mid - 1;
		else
			lo = mid + 1;
	}
	return NULL;
}

/*
 * Reads every tensor of the entry's model, converts it to fp32 into the
 * entry's context and binds the weights.  On error the caller deletes the
 * entry.  Runs inside SPI as the extension owner.
 */
static void
fm_model_load_weights(fm_cached_model *entry)
{
	fm_loaded_tensors lt;
	fm_error	err = {0};
	const fm_config *c = &entry->model.config;

	lt.stored = fm_storage_list_tensors(entry->id, &lt.n);
	lt.data = MemoryContextAllocZero(entry->cxt, sizeof(float *) * Max(lt.n, 1));

	for (int i = 0; i < lt.n; i++)
	{
		fm_stored_tensor *t = &lt.stored[i];
		size_t		numel = t->raw_bytes / fm_dtype_size(t->dtype);

		CHECK_FOR_INTERRUPTS();
		lt.data[i] = MemoryContextAllocExtended(entry->cxt, Max(numel, 1) * sizeof(float),
												MCXT_ALLOC_HUGE | MCXT_ALLOC_NO_OOM);
		if (lt.data[i] == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory loading model \"%s\"", entry->name),
					 errdetail("Failed on a request of %zu bytes for tensor \"%s\".",
							   numel * sizeof(float), t->name)));
		fm_storage_read_tensor(t, entry->name, lt.data[i]);
	}

	entry->layers = MemoryContextAllocZero(entry->cxt,
										   sizeof(fm_layer_weights) * c->num_hidden_layers);
	if (fm_layout_bind(&entry->model, entry->layers, fm_lookup_tensor, &lt, &err) != FM_OK)
		fm_raise(&err, psprintf("model \"%s\"", entry->name));
	if (fm_model_validate(&entry->model, &err) != FM_OK)
		fm_raise(&err, psprintf("model \"%s\"", entry->name));
	entry->weights_loaded = true;
}

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
			fm_cache_remove(entry);
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" does not exist", name),
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
	}

	if (need_weights && !entry->weights_loaded)
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
	return entry;
}
