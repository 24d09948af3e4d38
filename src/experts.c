/*-------------------------------------------------------------------------
 *
 * experts.c
 *	  Changing the experts of a stored model: flexmore_add_expert(_lo),
 *	  flexmore_remove_expert and flexmore_factorize_expert.
 *
 * An expert package is a two-expert checkpoint (a FlexOlmo public expert
 * plus one domain expert, or a FlexMoRE public expert plus one adapter).
 * Adding it appends expert 1 of the package as expert X of a model with X
 * experts, after checking that every shared tensor of the package (all
 * but the routers and the expert-1 tensors) has the model's SHA-256: the
 * expert was trained against exactly these weights, and anything else
 * would silently give a different model.  The package's router row 1
 * becomes row X of every layer's router.
 *
 * Every change rewrites each layer's router [experts, hidden] as a new
 * tensor, updates num_experts, expert_ranks and expert_names in the stored
 * config, and bumps the model's generation, so other backends load the
 * new version at their next call.  All of it happens in the caller's
 * transaction under a row lock on the model.  Models with fused expert
 * tensors (mlp.experts.gate_up_proj) are not supported here.
 *
 *-------------------------------------------------------------------------
 */
#include "import.h"

#include "common/cryptohash.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/snapmgr.h"

#include <dlfcn.h>

#include "cache.h"
#include "factorize.h"

PG_FUNCTION_INFO_V1(flexmore_add_expert);
PG_FUNCTION_INFO_V1(flexmore_add_expert_lo);
PG_FUNCTION_INFO_V1(flexmore_remove_expert);
PG_FUNCTION_INFO_V1(flexmore_factorize_expert);

/* A stored model opened for a change, with its parsed config. */
typedef struct fm_model_edit
{
	const char *name;
	fm_model_row row;
	char	   *architecture;
	fm_config	config;
	int			num_experts;
	char	  **expert_names;
	int		   *expert_ranks;
	int			ntensors;
	fm_stored_tensor *tensors;	/* sorted by name */
} fm_model_edit;

/* ---------- helpers ---------- */

static fm_stored_tensor *
fm_edit_find(fm_model_edit *m, const char *name)
{
	int			lo = 0;
	int			hi = m->ntensors - 1;

	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;
		int			c = strcmp(name, m->tensors[mid].name);

		if (c == 0)
			return &m->tensors[mid];
		if (c < 0)
			hi = mid - 1;
		else
			lo = mid + 1;
	}
	return NULL;
}

/*
 * Locks and reads the named model.  The caller holds SPI and runs as the
 * extension owner.  Raises 42704 for an unknown model and 0A000 for fused
 * expert tensors.
 */
static void
fm_edit_open(fm_model_edit *m, const char *name)
{
	char	   *utf8;
	int			utf8_len;
	fm_error	err = {0};

	memset(m, 0, sizeof(*m));
	m->name = name;
	if (!fm_storage_lock_model(name, &m->row, &m->architecture))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" does not exist", fm_quote_name(name))));

	utf8 = fm_text_to_utf8(m->row.config_json, strlen(m->row.config_json), &utf8_len);
	if (fm_config_parse(utf8, utf8_len, &m->config, &err) != FM_OK)
		fm_raise(&err, psprintf("stored config of model \"%s\"", name));

	fm_storage_read_expert_ranks(m->row.id, &m->num_experts, &m->expert_names,
								 &m->expert_ranks);
	m->tensors = fm_storage_list_tensors(m->row.id, &m->ntensors);
	if (m->num_experts != m->config.num_experts)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("model \"%s\" has %d expert rows, but its config has num_experts %d",
						name, m->num_experts, m->config.num_experts)));
	if (fm_edit_find(m, "model.layers.0.mlp.experts.gate_up_proj") != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("model \"%s\" stores its experts fused (mlp.experts.gate_up_proj), which adding, removing and factorizing experts do not support",
						name),
				 errhint("Import the model from a checkpoint with one tensor per expert projection.")));
}

/* Returns the index of the named expert; 42704 when there is none. */
static int
fm_edit_expert_index(fm_model_edit *m, const char *expert_name)
{
	for (int e = 0; e < m->num_experts; e++)
		if (strcmp(m->expert_names[e], expert_name) == 0)
			return e;
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("model \"%s\" has no expert \"%s\"", m->name, expert_name)));
	return -1;					/* keep compiler quiet */
}

/*
 * Stores bytes as a new tensor in chunks, with its checksum, and returns
 * the stored bytes.
 */
static int64
fm_edit_store_bytes(fm_model_edit *m, const char *name, int expert, fm_dtype dtype,
					int ndim, const int64 *shape, const char *bytes, size_t len)
{
	int64		tensor_id = fm_storage_insert_tensor(m->row.id, name, expert, dtype,
													 ndim, shape, (int64) len);
	pg_cryptohash_ctx *sha = pg_cryptohash_create(PG_SHA256);
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	int64		stored = 0;
	int			seq = 0;

	if (pg_cryptohash_init(sha) < 0 ||
		pg_cryptohash_update(sha, (const uint8 *) bytes, len) < 0 ||
		pg_cryptohash_final(sha, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not compute SHA-256: %s", pg_cryptohash_error(sha));
	pg_cryptohash_free(sha);

	for (size_t done = 0; done < len;)
	{
		size_t		n = Min(len - done, FM_CHUNK_RAW_MAX);

		CHECK_FOR_INTERRUPTS();
		stored += fm_storage_insert_chunk(tensor_id, seq++, bytes + done, n);
		done += n;
	}
	fm_storage_set_checksum(tensor_id, digest);
	return stored;
}

/*
 * Rewrites every layer's router [experts, hidden] as a new tensor of
 * new_rows rows: the old rows without row removed (-1 keeps all), then
 * extra_rows[layer] when extra_rows is not NULL (one row in the router's
 * dtype).
 */
static void
fm_edit_rewrite_routers(fm_model_edit *m, int new_rows, int removed,
						char **extra_rows)
{
	int			hidden = m->config.hidden_size;

	for (int layer = 0; layer < m->config.num_hidden_layers; layer++)
	{
		char		name[128];
		fm_stored_tensor *t;
		size_t		esize;
		size_t		row_bytes;
		char	   *old_bytes;
		char	   *new_bytes;
		int64		shape[2];
		int			out = 0;

		snprintf(name, sizeof(name), "model.layers.%d.mlp.gate.weight", layer);
		t = fm_edit_find(m, name);
		if (t == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("model \"%s\" has no stored tensor \"%s\"", m->name, name)));
		esize = fm_dtype_size(t->dtype);
		row_bytes = (size_t) hidden * esize;
		if (t->ndim != 2 || t->shape[0] != m->num_experts || t->shape[1] != hidden)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("stored router \"%s\" of model \"%s\" does not have shape [%d, %d]",
							name, m->name, m->num_experts, hidden)));

		old_bytes = palloc(t->raw_bytes);
		fm_storage_read_tensor_bytes(t, m->name, old_bytes);
		new_bytes = palloc(row_bytes * new_rows);
		for (int e = 0; e < m->num_experts; e++)
			if (e != removed)
				memcpy(new_bytes + row_bytes * out++, old_bytes + row_bytes * e, row_bytes);
		if (extra_rows != NULL)
			memcpy(new_bytes + row_bytes * out++, extra_rows[layer], row_bytes);
		Assert(out == new_rows);

		shape[0] = new_rows;
		shape[1] = hidden;
		fm_storage_delete_tensor(t->id);
		fm_edit_store_bytes(m, name, -1, t->dtype, 2, shape, new_bytes, row_bytes * new_rows);
		pfree(old_bytes);
		pfree(new_bytes);
	}
}

/*
 * Writes the expert rows, the config with the new expert list and the
 * size columns, and bumps the generation.
 */
static void
fm_edit_finish(fm_model_edit *m, int n, char **names, const int *ranks)
{
	StringInfoData sql;
	Oid			types[4] = {INT8OID, INT4OID, TEXTARRAYOID, INT4ARRAYOID};
	Datum		values[4];
	Datum	   *name_datums = palloc(sizeof(Datum) * n);
	Datum	   *rank_datums = palloc(sizeof(Datum) * n);
	bool		any_low_rank = false;
	const char *model_type;
	int			rc;

	for (int e = 0; e < n; e++)
	{
		name_datums[e] = CStringGetTextDatum(names[e]);
		rank_datums[e] = Int32GetDatum(ranks[e]);
		any_low_rank |= ranks[e] > 0;
	}
	fm_storage_replace_experts(m->row.id, n, names, ranks);

	/*
	 * A low-rank expert needs model_type flexmore and expert_ranks.  A
	 * flex_olmo model that had no expert_ranks keeps none while all its
	 * experts are full size.
	 */
	model_type = any_low_rank ? "flexmore" : m->config.model_type;

	values[0] = Int64GetDatum(m->row.id);
	values[1] = Int32GetDatum(n);
	values[2] = PointerGetDatum(construct_array(name_datums, n, TEXTOID, -1, false,
												TYPALIGN_INT));
	values[3] = PointerGetDatum(construct_array(rank_datums, n, INT4OID, 4, true,
												TYPALIGN_INT));
	initStringInfo(&sql);
	appendStringInfo(&sql,
					 "SELECT ((config - 'num_local_experts' - 'expert_ranks')"
					 " || jsonb_build_object('num_experts', $2, 'expert_names', to_jsonb($3),"
					 "      'num_experts_per_tok', least((config ->> 'num_experts_per_tok')::int, $2),"
					 "      'model_type', %s)"
					 " || CASE WHEN %s OR config ? 'expert_ranks' THEN jsonb_build_object('expert_ranks', to_jsonb($4))"
					 "    ELSE '{}'::jsonb END)::text"
					 " FROM flexmore.models WHERE id = $1",
					 quote_literal_cstr(model_type),
					 any_low_rank ? "true" : "false");
	rc = SPI_execute_with_args(sql.data, 4, types, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not build the new config of model \"%s\": %s",
			 m->name, SPI_result_code_string(rc));
	fm_storage_update_model(m->row.id,
							SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1),
							model_type);
}

/*
 * Runs fn(arg) inside SPI as the extension owner.  The caller holds the
 * model name's lock (fm_lock_model_name), and fn runs with a snapshot
 * taken after it: in READ COMMITTED, the statement's own snapshot may
 * predate the commit of a replace that held the lock, and the read-only
 * queries would then miss the new model's rows.  An error pops the
 * snapshot with the rest of the transaction's state.
 */
static void
fm_as_owner(void (*fn) (void *), void *arg)
{
	fm_user_switch sw;

	SPI_connect();
	fm_switch_to_owner(&sw);
	PG_TRY();
	{
		PushActiveSnapshot(GetTransactionSnapshot());
		fn(arg);
		PopActiveSnapshot();
	}
	PG_FINALLY();
	{
		fm_restore_user(&sw);
	}
	PG_END_TRY();
	SPI_finish();
}

/* ---------- adding an expert ---------- */

typedef struct fm_add_args
{
	const char *model_name;
	const char *expert_name;	/* NULL: the package's name for expert 1 */
	fm_import_state *pkg;
	int			new_index;		/* out */
} fm_add_args;

/* Raises an error unless the package's config describes the model's shape. */
static void
fm_add_check_config(fm_model_edit *m, fm_import_state *pkg)
{
	const fm_config *a = &m->config;
	const fm_config *b = &pkg->config;
	char	   *label = pkg->src->label(pkg->src, "config.json");

#define FM_SAME_INT(field) \
	if (a->field != b->field) \
		ereport(ERROR, \
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE), \
				 errmsg("file \"%s\": " #field " is %d, but model \"%s\" has %d", \
						label, (int) b->field, m->name, (int) a->field), \
				 errdetail("An expert package must have the shape of the model it is added to.")))

	FM_SAME_INT(vocab_size);
	FM_SAME_INT(hidden_size);
	FM_SAME_INT(intermediate_size);
	FM_SAME_INT(num_hidden_layers);
	FM_SAME_INT(num_attention_heads);
	FM_SAME_INT(num_key_value_heads);
	FM_SAME_INT(head_dim);
	FM_SAME_INT(tie_word_embeddings);
#undef FM_SAME_INT

	if (b->num_experts != 2)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("file \"%s\": an expert package has 2 experts (the public expert and the one to add), but it has %d",
						label, b->num_experts)));
	if (a->rope_theta != b->rope_theta || a->rms_norm_eps != b->rms_norm_eps)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("file \"%s\": rope_theta or rms_norm_eps differs from model \"%s\"",
						label, m->name)));
	if (m->num_experts + 1 > FM_MAX_EXPERTS)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("model \"%s\" has %d experts, the maximum", m->name, m->num_experts)));
}

/* True for a tensor the package shares with the model. */
static bool
fm_add_is_shared(const fm_import_tensor *t)
{
	return t->expert == 0 ||
		(t->expert < 0 && strstr(t->tensor->name, ".mlp.gate.weight") == NULL);
}

/*
 * Compares every shared tensor of the package with the model's by dtype,
 * shape and SHA-256.
 */
static void
fm_add_check_shared(fm_model_edit *m, fm_import_state *pkg)
{
	for (int i = 0; i < pkg->ntensors; i++)
	{
		const fm_import_tensor *t = &pkg->tensors[i];
		const fm_st_tensor *st = t->tensor;
		fm_stored_tensor *mine;
		uint8		digest[PG_SHA256_DIGEST_LENGTH];
		bool		same_shape;

		if (!fm_add_is_shared(t))
			continue;
		if (t->expert < 0 && strstr(st->name, ".mlp.experts.") != NULL)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("file \"%s\": tensor \"%s\" is a fused expert tensor, which expert packages do not support",
							t->file->label, st->name)));
		mine = fm_edit_find(m, st->name);
		if (mine == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("file \"%s\": tensor \"%s\" is not in model \"%s\"",
							t->file->label, st->name, m->name)));
		same_shape = mine->ndim == st->ndim;
		for (int d = 0; same_shape && d < st->ndim; d++)
			same_shape = mine->shape[d] == st->shape[d];
		if (mine->dtype != st->dtype || !same_shape)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("file \"%s\": tensor \"%s\" has dtype %s, but model \"%s\" stores it as %s with another shape or dtype",
							t->file->label, st->name, st->dtype_name, m->name,
							fm_dtype_name(mine->dtype)),
					 errdetail("Shared weights are compared byte for byte, so the package must use the model's dtypes.")));

		fm_import_stream_tensor(pkg, t, 0, digest);
		if (memcmp(digest, mine->checksum, sizeof(digest)) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("file \"%s\": tensor \"%s\" differs from the one in model \"%s\" (SHA-256)",
							t->file->label, st->name, m->name),
					 errdetail("An expert can only be added to the model whose shared weights it was trained with.")));
	}
}

static void
fm_add_run(void *arg)
{
	fm_add_args *args = arg;
	fm_import_state *pkg = args->pkg;
	fm_model_edit m;
	const char *expert_name;
	int			x;
	int			rank = pkg->config.expert_ranks[1];
	char	  **router_rows;
	char	  **names;
	int		   *ranks;

	fm_edit_open(&m, args->model_name);
	fm_add_check_config(&m, pkg);

	expert_name = args->expert_name ? args->expert_name :
		fm_import_to_server(pkg->expert_names[1]);
	fm_check_expert_name(expert_name);
	for (int e = 0; e < m.num_experts; e++)
		if (strcmp(m.expert_names[e], expert_name) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("model \"%s\" already has an expert \"%s\"", m.name, expert_name),
					 errhint("Pass another expert_name.")));

	fm_add_check_shared(&m, pkg);

	/* The package's router row 1, one per layer, in the model's dtype. */
	x = m.num_experts;
	router_rows = palloc(sizeof(char *) * m.config.num_hidden_layers);
	for (int layer = 0; layer < m.config.num_hidden_layers; layer++)
	{
		char		name[128];
		fm_import_tensor *t;
		fm_stored_tensor *mine;
		size_t		row_bytes;

		snprintf(name, sizeof(name), "model.layers.%d.mlp.gate.weight", layer);
		t = fm_import_find(pkg, name);
		mine = fm_edit_find(&m, name);
		Assert(t != NULL);
		if (mine == NULL || mine->dtype != t->tensor->dtype)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("file \"%s\": router \"%s\" has dtype %s, but model \"%s\" stores routers as %s",
							t->file->label, name, t->tensor->dtype_name, m.name,
							mine ? fm_dtype_name(mine->dtype) : "nothing")));
		row_bytes = (size_t) m.config.hidden_size * fm_dtype_size(t->tensor->dtype);
		router_rows[layer] = palloc(row_bytes);
		fm_import_read_tensor_bytes(pkg, t, row_bytes, row_bytes, router_rows[layer]);
		fm_import_check_finite(t->file->label, t->tensor, router_rows[layer],
							   m.config.hidden_size, m.config.hidden_size);
	}

	/* Expert 1's tensors, renamed to expert x. */
	for (int i = 0; i < pkg->ntensors; i++)
	{
		const fm_import_tensor *t = &pkg->tensors[i];
		const fm_st_tensor *st = t->tensor;
		const char *rest;
		char	   *name;
		int64		tensor_id;
		uint8		digest[PG_SHA256_DIGEST_LENGTH];

		if (t->expert != 1)
			continue;
		rest = strstr(st->name, ".mlp.experts.1.");
		if (rest == NULL)
			elog(ERROR, "expert tensor \"%s\" has no expert number", st->name);
		name = psprintf("%.*s.mlp.experts.%d.%s", (int) (rest - st->name), st->name, x,
						rest + strlen(".mlp.experts.1."));
		tensor_id = fm_storage_insert_tensor(m.row.id, name, x, st->dtype, st->ndim,
											 st->shape, (int64) (st->end - st->begin));
		fm_import_stream_tensor(pkg, t, tensor_id, digest);
	}
	fm_import_close_file(pkg);

	fm_edit_rewrite_routers(&m, x + 1, -1, router_rows);

	names = palloc(sizeof(char *) * (x + 1));
	ranks = palloc(sizeof(int) * (x + 1));
	memcpy(names, m.expert_names, sizeof(char *) * x);
	memcpy(ranks, m.expert_ranks, sizeof(int) * x);
	names[x] = pstrdup(expert_name);
	ranks[x] = rank;
	fm_edit_finish(&m, x + 1, names, ranks);
	args->new_index = x;
}

/* Shared body of flexmore_add_expert and flexmore_add_expert_lo. */
static int
fm_add_expert(const char *model_name, fm_import_source *src, const char *expert_name)
{
	fm_import_state pkg;
	fm_add_args args;

	memset(&pkg, 0, sizeof(pkg));
	pkg.model_name = model_name;
	pkg.src = src;
	fm_import_validate(&pkg, false);

	args.model_name = model_name;
	args.expert_name = expert_name;
	args.pkg = &pkg;
	args.new_index = -1;
	fm_lock_model_name(model_name);
	fm_as_owner(fm_add_run, &args);
	fm_model_forget(model_name);
	return args.new_index;
}

/*
 * flexmore_add_expert(model_name text, source_dir text, expert_name text)
 * returns the new expert's index.  expert_name NULL takes the package's
 * name for its expert 1.
 */
Datum
flexmore_add_expert(PG_FUNCTION_ARGS)
{
	char	   *model_name;
	char	   *source_dir;
	char	   *expert_name = NULL;
	fm_import_source src;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	source_dir = text_to_cstring(PG_GETARG_TEXT_PP(1));
	if (!PG_ARGISNULL(2))
		expert_name = text_to_cstring(PG_GETARG_TEXT_PP(2));

	PreventCommandIfReadOnly("flexmore_add_expert()");
	fm_check_read_server_files("add an expert");
	fm_check_admin("add an expert");
	if (!is_absolute_path(source_dir))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("checkpoint directory \"%s\" is not an absolute path", source_dir)));
	canonicalize_path(source_dir);
	fm_import_source_dir(&src, source_dir);
	PG_RETURN_INT32(fm_add_expert(model_name, &src, expert_name));
}

/*
 * flexmore_add_expert_lo(model_name text, files jsonb, expert_name text)
 * returns the new expert's index.
 */
Datum
flexmore_add_expert_lo(PG_FUNCTION_ARGS)
{
	char	   *model_name;
	char	   *expert_name = NULL;
	fm_import_source src;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (!PG_ARGISNULL(2))
		expert_name = text_to_cstring(PG_GETARG_TEXT_PP(2));

	PreventCommandIfReadOnly("flexmore_add_expert_lo()");
	fm_check_admin("add an expert");
	fm_import_source_lo(&src, PG_GETARG_JSONB_P(1));
	PG_RETURN_INT32(fm_add_expert(model_name, &src, expert_name));
}

/* ---------- removing an expert ---------- */

typedef struct fm_remove_args
{
	const char *model_name;
	const char *expert_name;
} fm_remove_args;

static void
fm_remove_run(void *arg)
{
	fm_remove_args *args = arg;
	fm_model_edit m;
	int			e;
	char	  **names;
	int		   *ranks;
	int			n = 0;

	fm_edit_open(&m, args->model_name);
	e = fm_edit_expert_index(&m, args->expert_name);
	if (e == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("expert \"%s\" of model \"%s\" is the public expert 0, which cannot be removed",
						args->expert_name, m.name),
				 errdetail("Every other expert is defined relative to it, and the shared weights were trained with it.")));

	fm_storage_delete_expert_tensors(m.row.id, e);
	fm_storage_shift_expert_tensors(m.row.id, e);
	fm_edit_rewrite_routers(&m, m.num_experts - 1, e, NULL);

	names = palloc(sizeof(char *) * m.num_experts);
	ranks = palloc(sizeof(int) * m.num_experts);
	for (int i = 0; i < m.num_experts; i++)
		if (i != e)
		{
			names[n] = m.expert_names[i];
			ranks[n] = m.expert_ranks[i];
			n++;
		}
	if (m.config.num_experts_per_tok > n)
		ereport(NOTICE,
				(errmsg("num_experts_per_tok of model \"%s\" is lowered from %d to %d, the number of experts left",
						m.name, m.config.num_experts_per_tok, n)));
	fm_edit_finish(&m, n, names, ranks);
}

/* flexmore_remove_expert(model_name text, expert_name text) returns void. */
Datum
flexmore_remove_expert(PG_FUNCTION_ARGS)
{
	fm_remove_args args;

	args.model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	args.expert_name = text_to_cstring(PG_GETARG_TEXT_PP(1));
	PreventCommandIfReadOnly("flexmore_remove_expert()");
	fm_check_admin("remove an expert");
	fm_lock_model_name(args.model_name);
	fm_as_owner(fm_remove_run, &args);
	fm_model_forget(args.model_name);
	PG_RETURN_VOID();
}

/* ---------- factorizing an expert ---------- */

typedef struct fm_factorize_args
{
	const char *model_name;
	const char *expert_name;
	int			rank;
	fm_svd_method method;
	int			nresults;
	int		   *layers;			/* [nresults] */
	const char **matrices;		/* [nresults] */
	double	   *errors;			/* [nresults] */
	MemoryContext result_cxt;
} fm_factorize_args;

/*
 * Finds the BLAS and LAPACK entry points in the OpenBLAS that
 * fm_blas_ensure loads into the backend.
 */
static void
fm_lapack_load(fm_lapack_api *api)
{
	void	   *handle;

	fm_blas_ensure();
	handle = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_NOLOAD);
	if (handle != NULL)
	{
		api->dgemm = dlsym(handle, "cblas_dgemm");
		api->dgesdd = dlsym(handle, "dgesdd_");
		api->dgeqrf = dlsym(handle, "dgeqrf_");
		api->dorgqr = dlsym(handle, "dorgqr_");
	}
	if (handle == NULL || api->dgemm == NULL || api->dgesdd == NULL ||
		api->dgeqrf == NULL || api->dorgqr == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FILE),
				 errmsg("factorizing an expert needs the BLAS and LAPACK of libopenblas.so.0, which could not be loaded"),
				 errhint("Install the Debian package libopenblas0.")));
}

/* Reads a stored tensor widened to fp32. */
static float *
fm_edit_read_f32(fm_model_edit *m, const char *name, int64 *rows, int64 *cols)
{
	fm_stored_tensor *t = fm_edit_find(m, name);
	float	   *data;

	if (t == NULL || t->ndim != 2)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("model \"%s\" has no stored matrix \"%s\"", m->name, name)));
	data = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(float) * t->shape[0] * t->shape[1]);
	fm_storage_read_tensor(t, m->name, data);
	*rows = t->shape[0];
	*cols = t->shape[1];
	return data;
}

static void
fm_factorize_run(void *arg)
{
	static const char *const projs[3] = {"gate_proj", "up_proj", "down_proj"};
	fm_factorize_args *args = arg;
	fm_model_edit m;
	int			e;
	int			nlayers;
	int			max_rank;
	int			k = 0;
	int		   *ranks;
	fm_lapack_api api;

	fm_lapack_load(&api);
	fm_edit_open(&m, args->model_name);
	e = fm_edit_expert_index(&m, args->expert_name);
	if (e == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("expert \"%s\" of model \"%s\" is the public expert 0, which the other experts are factorized against",
						args->expert_name, m.name)));
	if (m.expert_ranks[e] != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("expert \"%s\" of model \"%s\" already has rank %d; only a full-size expert can be factorized",
						args->expert_name, m.name, m.expert_ranks[e])));
	max_rank = Min(m.config.hidden_size, m.config.intermediate_size);
	if (args->rank < 1 || args->rank > max_rank)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("rank %d is outside [1, %d] for model \"%s\"",
						args->rank, max_rank, m.name),
				 errdetail("The rank is at most the smaller of hidden_size and intermediate_size.")));

	nlayers = m.config.num_hidden_layers;
	args->nresults = 3 * nlayers;
	args->layers = MemoryContextAlloc(args->result_cxt, sizeof(int) * 3 * nlayers);
	args->matrices = MemoryContextAlloc(args->result_cxt, sizeof(char *) * 3 * nlayers);
	args->errors = MemoryContextAlloc(args->result_cxt, sizeof(double) * 3 * nlayers);

	for (int layer = 0; layer < nlayers; layer++)
		for (int p = 0; p < 3; p++)
		{
			MemoryContext work = AllocSetContextCreate(CurrentMemoryContext,
													   "flexmore factorize",
													   ALLOCSET_DEFAULT_SIZES);
			MemoryContext old = MemoryContextSwitchTo(work);
			char	   *name_e = psprintf("model.layers.%d.mlp.experts.%d.%s.weight",
										  layer, e, projs[p]);
			char	   *name_0 = psprintf("model.layers.%d.mlp.experts.0.%s.weight",
										  layer, projs[p]);
			int64		rows;
			int64		cols;
			int64		rows0;
			int64		cols0;
			float	   *we = fm_edit_read_f32(&m, name_e, &rows, &cols);
			float	   *w0 = fm_edit_read_f32(&m, name_0, &rows0, &cols0);
			double	   *delta;
			float	   *b;
			float	   *a;
			char		message[128];
			int64		shape[2];

			CHECK_FOR_INTERRUPTS();
			if (rows != rows0 || cols != cols0)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("tensors \"%s\" and \"%s\" of model \"%s\" differ in shape",
								name_e, name_0, m.name)));
			delta = MemoryContextAllocHuge(work, sizeof(double) * rows * cols);
			for (int64 i = 0; i < rows * cols; i++)
				delta[i] = (double) we[i] - (double) w0[i];
			b = MemoryContextAllocHuge(work, sizeof(float) * rows * args->rank);
			a = MemoryContextAllocHuge(work, sizeof(float) * args->rank * cols);
			if (fm_lowrank_factorize(&api, delta, (int) rows, (int) cols, args->rank, args->method,
									 b, a, message) != 0)
				ereport(ERROR,
						(errcode(ERRCODE_INTERNAL_ERROR),
						 errmsg("could not factorize \"%s\" of model \"%s\": %s",
								name_e, m.name, message)));

			args->layers[k] = layer;
			args->matrices[k] = projs[p];
			args->errors[k] = fm_lowrank_relative_error(delta, (int) rows, (int) cols,
														args->rank, b, a);
			k++;

			/* *_a [r, in] and *_b [out, r], in F32. */
			shape[0] = args->rank;
			shape[1] = cols;
			fm_edit_store_bytes(&m, psprintf("model.layers.%d.mlp.experts.%d.%s_a.weight",
											 layer, e, projs[p]),
								e, FM_DTYPE_F32, 2, shape, (char *) a,
								sizeof(float) * args->rank * cols);
			shape[0] = rows;
			shape[1] = args->rank;
			fm_edit_store_bytes(&m, psprintf("model.layers.%d.mlp.experts.%d.%s_b.weight",
											 layer, e, projs[p]),
								e, FM_DTYPE_F32, 2, shape, (char *) b,
								sizeof(float) * rows * args->rank);
			fm_storage_delete_tensor(fm_edit_find(&m, name_e)->id);

			MemoryContextSwitchTo(old);
			MemoryContextDelete(work);
		}

	ranks = palloc(sizeof(int) * m.num_experts);
	memcpy(ranks, m.expert_ranks, sizeof(int) * m.num_experts);
	ranks[e] = args->rank;
	fm_edit_finish(&m, m.num_experts, m.expert_names, ranks);
}

/*
 * flexmore_factorize_expert(model_name text, expert_name text, rank int,
 * method text) returns table (layer int, matrix text, relative_error
 * float8): one row per replaced matrix.
 */
Datum
flexmore_factorize_expert(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	fm_factorize_args args;
	char	   *method = text_to_cstring(PG_GETARG_TEXT_PP(3));

	memset(&args, 0, sizeof(args));
	args.model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	args.expert_name = text_to_cstring(PG_GETARG_TEXT_PP(1));
	args.rank = PG_GETARG_INT32(2);
	if (strcmp(method, "auto") == 0)
		args.method = FM_SVD_AUTO;
	else if (strcmp(method, "exact") == 0)
		args.method = FM_SVD_EXACT;
	else if (strcmp(method, "randomized") == 0)
		args.method = FM_SVD_RANDOMIZED;
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown factorization method \"%s\"", method),
				 errhint("Use \"auto\", \"exact\" or \"randomized\".")));

	PreventCommandIfReadOnly("flexmore_factorize_expert()");
	fm_check_admin("factorize an expert");
	InitMaterializedSRF(fcinfo, 0);
	args.result_cxt = CurrentMemoryContext;
	fm_lock_model_name(args.model_name);
	fm_as_owner(fm_factorize_run, &args);
	fm_model_forget(args.model_name);

	for (int i = 0; i < args.nresults; i++)
	{
		Datum		values[3];
		bool		nulls[3] = {false, false, false};

		values[0] = Int32GetDatum(args.layers[i]);
		values[1] = CStringGetTextDatum(args.matrices[i]);
		values[2] = Float8GetDatum(args.errors[i]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
