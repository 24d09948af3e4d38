/*-------------------------------------------------------------------------
 *
 * config.c
 *	  Reads a FlexOlmo / FlexMoRE config.json into an fm_config.
 *
 * Defaults follow transformers' FlexOlmoConfig where the file may omit a
 * field (num_key_value_heads, head_dim, norm_topk_prob, ...).  Fields
 * whose silent default would change the numbers are required instead:
 * rope_theta must be present, at the top level or under rope_parameters,
 * and any rope_scaling other than null is rejected because only plain
 * RoPE is implemented.
 *
 *-------------------------------------------------------------------------
 */
#ifdef FRONTEND
#include "postgres_fe.h"
#else
#include "postgres.h"
#endif

#include <math.h>

#include "reader/json_tree.h"
#include "reader/reader.h"

#define CONFIG_FILE "config.json"

/*
 * Reads an integer field into *out.  A missing (or null) field keeps
 * *out and is an error only when required.
 */
static fm_status
read_int(const fm_json *root, const char *field, bool required, int32_t *out,
		 fm_error *err)
{
	const fm_json *node = fm_json_member(root, field);
	int64_t		value;

	if (node == NULL || node->kind == FM_JSON_NULL)
	{
		if (required)
			return fm_set_error(err, FM_EINVAL, "%s: missing field %s",
								CONFIG_FILE, field);
		return FM_OK;
	}
	if (!fm_json_int64(node, &value) || value < INT32_MIN || value > INT32_MAX)
		return fm_set_error(err, FM_EINVAL, "%s: field %s must be a 32-bit integer, got %s %s",
							CONFIG_FILE, field, fm_json_kind_name(node->kind),
							node->text ? node->text : "");
	*out = (int32_t) value;
	return FM_OK;
}

static fm_status
read_double(const fm_json *root, const char *field, double *out, bool *found,
			fm_error *err)
{
	const fm_json *node = fm_json_member(root, field);

	*found = false;
	if (node == NULL || node->kind == FM_JSON_NULL)
		return FM_OK;
	if (!fm_json_double(node, out) || !isfinite(*out))
		return fm_set_error(err, FM_EINVAL, "%s: field %s must be a finite number, got %s %s",
							CONFIG_FILE, field, fm_json_kind_name(node->kind),
							node->text ? node->text : "");
	*found = true;
	return FM_OK;
}

static fm_status
read_bool(const fm_json *root, const char *field, bool *out, fm_error *err)
{
	const fm_json *node = fm_json_member(root, field);

	if (node == NULL || node->kind == FM_JSON_NULL)
		return FM_OK;
	if (node->kind != FM_JSON_BOOL)
		return fm_set_error(err, FM_EINVAL, "%s: field %s must be true or false, got %s %s",
							CONFIG_FILE, field, fm_json_kind_name(node->kind),
							node->text ? node->text : "");
	*out = (strcmp(node->text, "true") == 0);
	return FM_OK;
}

/* Reads eos_token_id: absent, null, one id, or a list of ids. */
static fm_status
read_eos(const fm_json *root, fm_config *c, fm_error *err)
{
	const fm_json *node = fm_json_member(root, "eos_token_id");
	int64_t		value;

	c->num_eos = 0;
	if (node == NULL || node->kind == FM_JSON_NULL)
		return FM_OK;
	if (node->kind == FM_JSON_NUMBER)
	{
		if (!fm_json_int64(node, &value) || value < 0 || value > INT32_MAX)
			return fm_set_error(err, FM_EINVAL, "%s: eos_token_id %s is not a valid id",
								CONFIG_FILE, node->text);
		c->eos_token_ids[c->num_eos++] = (int32_t) value;
		return FM_OK;
	}
	if (node->kind != FM_JSON_ARRAY)
		return fm_set_error(err, FM_EINVAL,
							"%s: eos_token_id must be a number or a list of numbers, got %s",
							CONFIG_FILE, fm_json_kind_name(node->kind));
	if (node->count > FM_MAX_EOS)
		return fm_set_error(err, FM_ELIMIT,
							"%s: eos_token_id lists %d ids, more than the supported %d",
							CONFIG_FILE, node->count, FM_MAX_EOS);
	for (int32_t i = 0; i < node->count; i++)
	{
		const fm_json *item = node->items[i];

		if (!fm_json_int64(item, &value) || value < 0 || value > INT32_MAX)
			return fm_set_error(err, FM_EINVAL, "%s: eos_token_id[%d] is not a valid id",
								CONFIG_FILE, i);
		c->eos_token_ids[c->num_eos++] = (int32_t) value;
	}
	return FM_OK;
}

/* Reads an optional special id; null or absent gives -1. */
static fm_status
read_special_id(const fm_json *root, const char *field, int32_t *out, fm_error *err)
{
	const fm_json *node = fm_json_member(root, field);
	int64_t		value;

	*out = -1;
	if (node != NULL && node->kind == FM_JSON_ARRAY)
	{
		/* some configs list several; the first is the one to use */
		node = node->count > 0 ? node->items[0] : NULL;
		if (node == NULL)
			return FM_OK;
	}
	if (node == NULL || node->kind == FM_JSON_NULL)
		return FM_OK;
	if (!fm_json_int64(node, &value) || value < 0 || value > INT32_MAX)
		return fm_set_error(err, FM_EINVAL, "%s: %s %s is not a valid id",
							CONFIG_FILE, field, node->text ? node->text : fm_json_kind_name(node->kind));
	*out = (int32_t) value;
	return FM_OK;
}

static fm_status
read_rope(const fm_json *root, fm_config *c, fm_error *err)
{
	const fm_json *scaling = fm_json_member(root, "rope_scaling");
	const fm_json *params = fm_json_member(root, "rope_parameters");
	bool		found;
	fm_status	status;

	if (scaling != NULL && scaling->kind != FM_JSON_NULL)
	{
		const fm_json *type = fm_json_member(scaling, "rope_type");

		if (type == NULL)
			type = fm_json_member(scaling, "type");
		return fm_set_error(err, FM_EUNSUPPORTED,
							"%s: rope_scaling %s is not supported; only unscaled RoPE is implemented",
							CONFIG_FILE,
							type != NULL && type->kind == FM_JSON_STRING ? type->text : "(of unknown type)");
	}

	status = read_double(root, "rope_theta", &c->rope_theta, &found, err);
	if (status != FM_OK)
		return status;
	if (!found && params != NULL && params->kind == FM_JSON_OBJECT)
	{
		const fm_json *type = fm_json_member(params, "rope_type");

		if (type != NULL && type->kind == FM_JSON_STRING &&
			strcmp(type->text, "default") != 0)
			return fm_set_error(err, FM_EUNSUPPORTED,
								"%s: rope_parameters.rope_type %s is not supported; only default RoPE is implemented",
								CONFIG_FILE, type->text);
		status = read_double(params, "rope_theta", &c->rope_theta, &found, err);
		if (status != FM_OK)
			return status;
	}
	if (!found)
		return fm_set_error(err, FM_EINVAL,
							"%s: missing field rope_theta (at the top level or in rope_parameters)",
							CONFIG_FILE);
	if (c->rope_theta <= 0.0)
		return fm_set_error(err, FM_EINVAL, "%s: rope_theta %g must be positive",
							CONFIG_FILE, c->rope_theta);
	return FM_OK;
}

static fm_status
read_expert_ranks(const fm_json *root, fm_config *c, fm_error *err)
{
	const fm_json *node = fm_json_member(root, "expert_ranks");
	bool		flexmore = (strcmp(c->model_type, "flexmore") == 0);

	memset(c->expert_ranks, 0, sizeof(c->expert_ranks));
	if (node == NULL || node->kind == FM_JSON_NULL)
	{
		if (flexmore)
			return fm_set_error(err, FM_EINVAL,
								"%s: model_type flexmore requires expert_ranks", CONFIG_FILE);
		return FM_OK;
	}
	if (node->kind != FM_JSON_ARRAY)
		return fm_set_error(err, FM_EINVAL, "%s: expert_ranks must be a list, got %s",
							CONFIG_FILE, fm_json_kind_name(node->kind));
	if (node->count != c->num_experts)
		return fm_set_error(err, FM_EINVAL,
							"%s: expert_ranks has %d entries but num_experts is %d",
							CONFIG_FILE, node->count, c->num_experts);
	for (int32_t e = 0; e < node->count; e++)
	{
		int64_t		rank;

		if (!fm_json_int64(node->items[e], &rank) || rank < 0 || rank > INT32_MAX)
			return fm_set_error(err, FM_EINVAL,
								"%s: expert_ranks[%d] %s is not a rank (an integer >= 0)",
								CONFIG_FILE, e,
								node->items[e]->text ? node->items[e]->text : fm_json_kind_name(node->items[e]->kind));
		c->expert_ranks[e] = (int32_t) rank;
	}
	if (c->expert_ranks[0] != 0)
		return fm_set_error(err, FM_EINVAL,
							"%s: expert_ranks[0] is %d, but the public expert 0 must be full size (0)",
							CONFIG_FILE, c->expert_ranks[0]);
	return FM_OK;
}

/* Checks sizes and their relations once every field is read. */
static fm_status
check_sizes(fm_config *c, fm_error *err)
{
	const struct
	{
		const char *name;
		int32_t		value;
	}			sizes[] = {
		{"vocab_size", c->vocab_size},
		{"hidden_size", c->hidden_size},
		{"intermediate_size", c->intermediate_size},
		{"num_hidden_layers", c->num_hidden_layers},
		{"num_attention_heads", c->num_attention_heads},
		{"num_key_value_heads", c->num_key_value_heads},
		{"head_dim", c->head_dim},
		{"max_position_embeddings", c->max_position_embeddings},
		{"num_experts", c->num_experts},
	};

	for (size_t i = 0; i < lengthof(sizes); i++)
		if (sizes[i].value <= 0)
			return fm_set_error(err, FM_EINVAL, "%s: %s must be positive, got %d",
								CONFIG_FILE, sizes[i].name, sizes[i].value);
	if (c->num_attention_heads % c->num_key_value_heads != 0)
		return fm_set_error(err, FM_EINVAL,
							"%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
							CONFIG_FILE, c->num_attention_heads, c->num_key_value_heads);
	if (c->head_dim % 2 != 0)
		return fm_set_error(err, FM_EINVAL, "%s: head_dim %d must be even for RoPE",
							CONFIG_FILE, c->head_dim);
	if (c->num_experts > FM_MAX_EXPERTS)
		return fm_set_error(err, FM_ELIMIT,
							"%s: num_experts %d exceeds the supported maximum of %d",
							CONFIG_FILE, c->num_experts, FM_MAX_EXPERTS);
	if (c->num_experts_per_tok < 1 || c->num_experts_per_tok > c->num_experts)
		return fm_set_error(err, FM_EINVAL,
							"%s: num_experts_per_tok %d is outside [1, num_experts %d]",
							CONFIG_FILE, c->num_experts_per_tok, c->num_experts);
	if (!(c->rms_norm_eps >= 0.0))
		return fm_set_error(err, FM_EINVAL, "%s: rms_norm_eps %g must not be negative",
							CONFIG_FILE, c->rms_norm_eps);
	for (int32_t i = 0; i < c->num_eos; i++)
		if (c->eos_token_ids[i] >= c->vocab_size)
			return fm_set_error(err, FM_EINVAL,
								"%s: eos_token_id %d is outside [0, vocab_size %d)",
								CONFIG_FILE, c->eos_token_ids[i], c->vocab_size);
	return FM_OK;
}

static fm_status
parse_fields(const fm_json *root, fm_config *c, fm_error *err)
{
	const fm_json *type = fm_json_member(root, "model_type");
	bool		found;
	fm_status	status;

	if (root->kind != FM_JSON_OBJECT)
		return fm_set_error(err, FM_EINVAL, "%s: expected an object, got %s",
							CONFIG_FILE, fm_json_kind_name(root->kind));
	if (type == NULL)
		return fm_set_error(err, FM_EINVAL, "%s: missing field model_type", CONFIG_FILE);
	if (type->kind != FM_JSON_STRING)
		return fm_set_error(err, FM_EINVAL, "%s: model_type must be a string, got %s",
							CONFIG_FILE, fm_json_kind_name(type->kind));
	if (strcmp(type->text, "flex_olmo") != 0 && strcmp(type->text, "flexmore") != 0)
		return fm_set_error(err, FM_EUNSUPPORTED,
							"%s: model_type %s is not supported; expected flex_olmo or flexmore",
							CONFIG_FILE, type->text);
	strlcpy(c->model_type, type->text, sizeof(c->model_type));

#define TRY(call) do { if ((status = (call)) != FM_OK) return status; } while (0)

	TRY(read_int(root, "vocab_size", true, &c->vocab_size, err));
	TRY(read_int(root, "hidden_size", true, &c->hidden_size, err));
	TRY(read_int(root, "intermediate_size", true, &c->intermediate_size, err));
	TRY(read_int(root, "num_hidden_layers", true, &c->num_hidden_layers, err));
	TRY(read_int(root, "num_attention_heads", true, &c->num_attention_heads, err));
	TRY(read_int(root, "max_position_embeddings", true, &c->max_position_embeddings, err));

	c->num_key_value_heads = c->num_attention_heads;
	TRY(read_int(root, "num_key_value_heads", false, &c->num_key_value_heads, err));

	if (c->num_attention_heads > 0 && fm_json_member(root, "head_dim") == NULL &&
		c->hidden_size % c->num_attention_heads != 0)
		return fm_set_error(err, FM_EINVAL,
							"%s: hidden_size %d is not a multiple of num_attention_heads %d and head_dim is not given",
							CONFIG_FILE, c->hidden_size, c->num_attention_heads);
	c->head_dim = c->num_attention_heads > 0 ? c->hidden_size / c->num_attention_heads : 0;
	TRY(read_int(root, "head_dim", false, &c->head_dim, err));

	if (fm_json_member(root, "num_experts") != NULL)
		TRY(read_int(root, "num_experts", true, &c->num_experts, err));
	else if (fm_json_member(root, "num_local_experts") != NULL)
		TRY(read_int(root, "num_local_experts", true, &c->num_experts, err));
	else
		return fm_set_error(err, FM_EINVAL,
							"%s: missing field num_experts (or num_local_experts)", CONFIG_FILE);
	TRY(read_int(root, "num_experts_per_tok", true, &c->num_experts_per_tok, err));

	c->norm_topk_prob = false;
	TRY(read_bool(root, "norm_topk_prob", &c->norm_topk_prob, err));
	c->tie_word_embeddings = false;
	TRY(read_bool(root, "tie_word_embeddings", &c->tie_word_embeddings, err));

	c->rms_norm_eps = 1e-6;
	TRY(read_double(root, "rms_norm_eps", &c->rms_norm_eps, &found, err));
	TRY(read_rope(root, c, err));

	TRY(check_sizes(c, err));
	TRY(read_expert_ranks(root, c, err));
	TRY(read_eos(root, c, err));
	TRY(read_special_id(root, "pad_token_id", &c->pad_token_id, err));
	TRY(read_special_id(root, "bos_token_id", &c->bos_token_id, err));
	TRY(check_sizes(c, err));
#undef TRY
	return FM_OK;
}

fm_status
fm_config_parse(const char *json, size_t len, fm_config *config, fm_error *err)
{
	fm_json    *root;
	fm_status	status;

	memset(config, 0, sizeof(*config));
	status = fm_json_parse(json, len, CONFIG_FILE, &root, err);
	if (status != FM_OK)
		return status;
	status = parse_fields(root, config, err);
	fm_json_free(root);
	return status;
}

fm_status
fm_config_expert_names(const char *json, size_t len, const fm_config *config,
					   char **names, fm_error *err)
{
	fm_json    *root;
	const fm_json *list;
	fm_status	status;

	status = fm_json_parse(json, len, CONFIG_FILE, &root, err);
	if (status != FM_OK)
		return status;

	list = fm_json_member(root, "expert_names");
	if (list != NULL && list->kind != FM_JSON_NULL)
	{
		if (list->kind != FM_JSON_ARRAY || list->count != config->num_experts)
		{
			status = fm_set_error(err, FM_EINVAL,
								  "%s: expert_names must be a list of %d strings",
								  CONFIG_FILE, config->num_experts);
			goto done;
		}
		for (int32_t e = 0; e < list->count; e++)
		{
			const fm_json *item = list->items[e];

			if (item->kind != FM_JSON_STRING || item->text[0] == '\0')
			{
				status = fm_set_error(err, FM_EINVAL,
									  "%s: expert_names[%d] must be a non-empty string",
									  CONFIG_FILE, e);
				goto done;
			}
			for (int32_t j = 0; j < e; j++)
				if (strcmp(list->items[j]->text, item->text) == 0)
				{
					status = fm_set_error(err, FM_EINVAL,
										  "%s: expert name %s appears twice in expert_names",
										  CONFIG_FILE, item->text);
					goto done;
				}
		}
	}

	for (int32_t e = 0; e < config->num_experts; e++)
	{
		if (list != NULL && list->kind == FM_JSON_ARRAY)
			names[e] = pstrdup(list->items[e]->text);
		else if (e == 0)
			names[e] = pstrdup("public");
		else
			names[e] = psprintf("expert_%d", e);
	}

done:
	fm_json_free(root);
	return status;
}
