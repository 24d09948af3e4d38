/*-------------------------------------------------------------------------
 *
 * functions.c
 *	  SQL functions that need no forward pass: flexmore_tokenize,
 *	  flexmore_detokenize and flexmore_drop_model.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(flexmore_tokenize);
PG_FUNCTION_INFO_V1(flexmore_detokenize);
PG_FUNCTION_INFO_V1(flexmore_drop_model);

/*
 * Encodes text in the database encoding with the model's tokenizer and
 * returns palloc'd ids.  The engine allocates the ids from the cached
 * tokenizer's allocator, so they are copied out and freed at once.
 */
int32 *
fm_encode_text(fm_cached_model *entry, text *input, bool allow_special, int *n)
{
	int			len;
	char	   *utf8 = fm_text_to_utf8(VARDATA_ANY(input), VARSIZE_ANY_EXHDR(input), &len);
	int32_t    *engine_ids = NULL;
	int32_t		n_ids = 0;
	int32	   *ids;
	fm_error	err = {0};

	if (fm_tokenizer_encode(entry->tokenizer, utf8, len, allow_special,
							&engine_ids, &n_ids, &err) != FM_OK)
		fm_raise(&err, psprintf("tokenizer of model \"%s\"", entry->name));

	ids = palloc(sizeof(int32) * Max(n_ids, 1));
	if (n_ids > 0)
		memcpy(ids, engine_ids, sizeof(int32) * n_ids);
	fm_free(&entry->allocator, engine_ids);
	*n = n_ids;
	return ids;
}

/*
 * Decodes ids to text in the database encoding (see fm_utf8_to_text for
 * the handling of invalid UTF-8).  The caller has checked the ids.
 */
text *
fm_decode_ids(fm_cached_model *entry, const int32 *ids, int n)
{
	char	   *engine_text = NULL;
	size_t		len = 0;
	char	   *bytes;
	fm_error	err = {0};

	if (fm_tokenizer_decode(entry->tokenizer, ids, n, &engine_text, &len, &err) != FM_OK)
		fm_raise(&err, psprintf("tokenizer of model \"%s\"", entry->name));
	bytes = palloc(len + 1);
	memcpy(bytes, engine_text, len);
	fm_free(&entry->allocator, engine_text);
	return fm_utf8_to_text(bytes, len);
}

/*
 * Raises an error unless the tokenizer knows id.  Padded vocabulary rows,
 * which the embedding matrix has but the tokenizer does not, get a detail
 * saying so.
 */
void
fm_check_token_id(const fm_cached_model *entry, int32 id)
{
	int32		vocab = entry->model.config.vocab_size;

	if (id >= 0 && fm_tokenizer_has_id(entry->tokenizer, id))
		return;
	if (id >= entry->id_limit && id < vocab)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("token id %d is not in the tokenizer of model \"%s\"", id, entry->name),
				 errdetail("Ids %d to %d are padding rows of the embedding matrix, not tokens.",
						   entry->id_limit, vocab - 1)));
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("token id %d is not in the tokenizer of model \"%s\"", id, entry->name),
			 errdetail("The tokenizer's ids are below %d.", entry->id_limit)));
}

/*
 * Returns the elements of an int4 array as a flat palloc'd list, raising
 * an error for a null element.
 */
int32 *
fm_array_to_ids(ArrayType *array, const char *argname, int *n)
{
	Datum	   *elems;
	bool	   *nulls;
	int			nelems;
	int32	   *ids;

	deconstruct_array(array, INT4OID, sizeof(int32), true, TYPALIGN_INT,
					  &elems, &nulls, &nelems);
	ids = palloc(sizeof(int32) * Max(nelems, 1));
	for (int i = 0; i < nelems; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not contain nulls", argname),
					 errdetail("Element %d is null.", i + 1)));
		ids[i] = DatumGetInt32(elems[i]);
	}
	*n = nelems;
	return ids;
}

/*
 * flexmore_tokenize(model_name text, input text, allow_special boolean)
 * returns int[].  Special-token text in input is ordinary text unless
 * allow_special is true.
 */
Datum
flexmore_tokenize(PG_FUNCTION_ARGS)
{
	char	   *model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	text	   *input = PG_GETARG_TEXT_PP(1);
	bool		allow_special = PG_GETARG_BOOL(2);
	fm_cached_model *entry = fm_model_get(model_name, false);
	int			n;
	int32	   *ids = fm_encode_text(entry, input, allow_special, &n);
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		elems[i] = Int32GetDatum(ids[i]);
	if (n == 0)
		PG_RETURN_ARRAYTYPE_P(construct_empty_array(INT4OID));
	PG_RETURN_ARRAYTYPE_P(construct_array(elems, n, INT4OID, sizeof(int32), true,
										  TYPALIGN_INT));
}

/* flexmore_detokenize(model_name text, ids int[]) returns text. */
Datum
flexmore_detokenize(PG_FUNCTION_ARGS)
{
	char	   *model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	ArrayType  *array = PG_GETARG_ARRAYTYPE_P(1);
	fm_cached_model *entry = fm_model_get(model_name, false);
	int			n;
	int32	   *ids = fm_array_to_ids(array, "ids", &n);

	for (int i = 0; i < n; i++)
		fm_check_token_id(entry, ids[i]);
	PG_RETURN_TEXT_P(fm_decode_ids(entry, ids, n));
}

/* flexmore_drop_model(model_name text): deletes a model and its data. */
Datum
flexmore_drop_model(PG_FUNCTION_ARGS)
{
	char	   *model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	fm_user_switch sw;
	bool		found = false;
	int64		generation;

	PreventCommandIfReadOnly("flexmore_drop_model()");
	SPI_connect();
	fm_switch_to_owner(&sw);
	PG_TRY();
	{
		found = fm_storage_delete_model(model_name, &generation);
	}
	PG_FINALLY();
	{
		fm_restore_user(&sw);
	}
	PG_END_TRY();
	SPI_finish();

	fm_model_forget(model_name);
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" does not exist", model_name)));
	PG_RETURN_VOID();
}
