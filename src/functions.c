/*-------------------------------------------------------------------------
 *
 * functions.c
 *	  SQL functions that need no forward pass: flexmore_tokenize,
 *	  flexmore_detokenize and flexmore_drop_model.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"
#include "import.h"

#include "tcop/utility.h"

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
 * Encodes text in the database encoding with the model's tokenizer,
 * stopping with FM_ELIMIT once it yields more than max_ids ids.  The
 * engine polls fm_interrupt_pending, so a huge text can be canceled: on
 * FM_ECANCELED, CHECK_FOR_INTERRUPTS() raises the cancel or terminate
 * error, and an interrupt that raises nothing starts the encoding over.
 * On FM_OK, *engine_ids comes from the tokenizer's allocator
 * (entry->allocator), and the caller frees it with fm_free.
 */
static fm_status
fm_encode_engine(fm_cached_model *entry, text *input, bool allow_special, size_t max_ids,
				 int32_t **engine_ids, int32_t *n_ids, fm_error *err)
{
	int			len;
	char	   *utf8 = fm_text_to_utf8(VARDATA_ANY(input), VARSIZE_ANY_EXHDR(input), &len);
	fm_encode_options options = {0};
	fm_status	status;

	options.allow_special = allow_special;
	options.max_ids = max_ids;
	options.interrupt = fm_interrupt_pending;
	options.interrupt_arg = NULL;
	for (;;)
	{
		status = fm_tokenizer_encode_ex(entry->tokenizer, utf8, len, &options,
										engine_ids, n_ids, err);
		if (status != FM_ECANCELED)
			break;
		CHECK_FOR_INTERRUPTS();
	}
	pfree(utf8);
	return status;
}

/*
 * Copies the engine's ids into a palloc'd list and frees them.  The copy
 * is allocated without raising, so the engine's list, which lives as long
 * as the model, is freed before an out-of-memory error.
 */
static int32 *
fm_copy_engine_ids(fm_cached_model *entry, int32_t *engine_ids, int32_t n_ids)
{
	int32	   *ids = MemoryContextAllocExtended(CurrentMemoryContext,
												 sizeof(int32) * (Size) Max(n_ids, 1),
												 MCXT_ALLOC_NO_OOM);

	if (ids != NULL && n_ids > 0)
		memcpy(ids, engine_ids, sizeof(int32) * (Size) n_ids);
	fm_free(&entry->allocator, engine_ids);
	if (ids == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Failed on a request for the %d token ids of a text.", n_ids)));
	return ids;
}

/*
 * Encodes text in the database encoding with the model's tokenizer and
 * returns palloc'd ids.  The result is bounded by what an int[] can hold
 * (MaxArraySize elements); a text that encodes to more fails with 54000.
 */
int32 *
fm_encode_text(fm_cached_model *entry, text *input, bool allow_special, int *n)
{
	int32_t    *engine_ids = NULL;
	int32_t		n_ids = 0;
	fm_error	err = {0};

	if (fm_encode_engine(entry, input, allow_special, MaxArraySize, &engine_ids, &n_ids,
						 &err) != FM_OK)
		fm_raise(&err, psprintf("tokenizer of model \"%s\"", entry->name));
	*n = n_ids;
	return fm_copy_engine_ids(entry, engine_ids, n_ids);
}

/*
 * Encodes a prompt (special-token text as ordinary text) that must fit in
 * the call's context.  Tokenizing stops as soon as the prompt has more
 * tokens than the context, so an oversized prompt fails fast with 54000
 * instead of being encoded in full.  what names the argument in the
 * message ("prompt", "input").
 */
int32 *
fm_encode_prompt(fm_cached_model *entry, text *input, const char *what, int *n)
{
	int32		limit = fm_call_context_limit(entry);
	int32_t    *engine_ids = NULL;
	int32_t		n_ids = 0;
	fm_error	err = {0};
	char		limit_message[sizeof(err.message)];
	fm_status	status;

	status = fm_encode_engine(entry, input, false, (size_t) limit, &engine_ids, &n_ids, &err);

	/*
	 * The engine's FM_ELIMIT also covers other limits (a pre-tokenized
	 * piece too long to encode, say), which keep their own message.
	 */
	snprintf(limit_message, sizeof(limit_message), "text encodes to more than %zu tokens",
			 (size_t) limit);
	if (status == FM_ELIMIT && strcmp(err.message, limit_message) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("%s has more tokens than the context of %d tokens", what, limit),
				 errdetail("The context is the smaller of flexmore.max_context (%d) and the max_position_embeddings of model \"%s\" (%d).",
						   flexmore_max_context, entry->name,
						   entry->model.config.max_position_embeddings),
				 errhint("Shorten the input, or raise flexmore.max_context if the model allows it.")));
	if (status != FM_OK)
		fm_raise(&err, psprintf("tokenizer of model \"%s\"", entry->name));
	*n = n_ids;
	return fm_copy_engine_ids(entry, engine_ids, n_ids);
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
 * Raises 2202E (array_subscript_error) for an array argument with more
 * than one dimension, whose elements would otherwise be read as one flat
 * list.  An empty array has 0 dimensions and passes.
 */
void
fm_check_array_1d(ArrayType *array, const char *argname)
{
	if (ARR_NDIM(array) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("%s must be a one-dimensional array", argname),
				 errdetail("It has %d dimensions.", ARR_NDIM(array))));
}

/*
 * Returns the elements of a one-dimensional int4 array as a palloc'd
 * list, raising an error for a null element or more dimensions.
 */
int32 *
fm_array_to_ids(ArrayType *array, const char *argname, int *n)
{
	Datum	   *elems;
	bool	   *nulls;
	int			nelems;
	int32	   *ids;

	fm_check_array_1d(array, argname);
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
	int32_t    *engine_ids = NULL;
	int32_t		n_ids = 0;
	fm_error	err = {0};
	ArrayType  *volatile result = NULL;

	if (fm_encode_engine(entry, input, allow_special, MaxArraySize, &engine_ids, &n_ids,
						 &err) != FM_OK)
		fm_raise(&err, psprintf("tokenizer of model \"%s\"", entry->name));

	/*
	 * Build the int[] in place rather than through a Datum per element,
	 * whose list alone would pass palloc's 1 GB limit at 134 million ids.
	 * MaxArraySize int4 elements plus the header stay below that limit.
	 */
	PG_TRY();
	{
		if (n_ids == 0)
			result = construct_empty_array(INT4OID);
		else
		{
			Size		bytes = ARR_OVERHEAD_NONULLS(1) + sizeof(int32) * (Size) n_ids;

			result = palloc0(bytes);
			SET_VARSIZE(result, bytes);
			result->ndim = 1;
			result->dataoffset = 0;
			result->elemtype = INT4OID;
			ARR_DIMS(result)[0] = n_ids;
			ARR_LBOUND(result)[0] = 1;
			memcpy((char *) result + ARR_OVERHEAD_NONULLS(1), engine_ids, sizeof(int32) * (Size) n_ids);
		}
	}
	PG_FINALLY();
	{
		fm_free(&entry->allocator, engine_ids);
	}
	PG_END_TRY();
	PG_RETURN_ARRAYTYPE_P(result);
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
	fm_check_admin("drop a model");
	fm_lock_model_name(model_name);
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
				 errmsg("model \"%s\" does not exist", fm_quote_name(model_name))));
	PG_RETURN_VOID();
}
