/*-------------------------------------------------------------------------
 *
 * test_reader.c
 *	  Unit tests of the checkpoint readers: config.json, safetensors
 *	  headers and the shard index.
 *
 *-------------------------------------------------------------------------
 */
#include <string.h>

#include "reader/json_tree.h"
#include "reader/reader.h"
#include "testutil.h"

/* Parses header as a safetensors header followed by data_bytes of data. */
static fm_status
parse_header(const char *header, uint64_t data_bytes, fm_st_file *file, fm_error *err)
{
	uint64_t	len = strlen(header);

	return fm_st_parse_header(header, len, 8 + len + data_bytes, file, err);
}

static void
test_safetensors_valid_header(void)
{
	const char *header =
		"{\"__metadata__\": {\"format\": \"pt\"},"
		" \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
		" \"a\": {\"dtype\": \"BF16\", \"shape\": [2, 2], \"data_offsets\": [8, 16]},"
		" \"c\": {\"dtype\": \"I64\", \"shape\": [1], \"data_offsets\": [16, 24]},"
		" \"d\": {\"dtype\": \"Q4_K\", \"shape\": [3], \"data_offsets\": [24, 26]},"
		" \"e\": {\"dtype\": \"F16\", \"shape\": [0, 4], \"data_offsets\": [26, 26]}}   ";
	uint64_t	start = 8 + strlen(header);
	fm_st_file	file;
	fm_error	err;
	const fm_st_tensor *t;

	CHECK(parse_header(header, 26, &file, &err) == FM_OK);
	CHECK(file.num_tensors == 5);
	CHECK(file.data_start == start);
	CHECK(strcmp(file.tensors[0].name, "a") == 0);

	t = fm_st_find(&file, "a");
	CHECK(t != NULL);
	if (t != NULL)
	{
		CHECK(t->dtype_supported);
		CHECK(t->dtype == FM_DTYPE_BF16);
	}
	CHECK(t != NULL);
	if (t != NULL)
	{
		CHECK(t->ndim == 2);
		CHECK(t->shape[0] == 2);
		CHECK(t->shape[1] == 2);
	}
	CHECK(t != NULL);
	if (t != NULL)
	{
		CHECK(t->begin == start + 8);
		CHECK(t->end == start + 16);
	}

	t = fm_st_find(&file, "c");
	CHECK(t != NULL);
	if (t != NULL)
	{
		CHECK(!t->dtype_supported);
		CHECK(strcmp(t->dtype_name, "I64") == 0);
	}
	t = fm_st_find(&file, "d");
	CHECK(t != NULL);
	if (t != NULL)
	{
		CHECK(!t->dtype_supported);
		CHECK(strcmp(t->dtype_name, "Q4_K") == 0);
	}
	CHECK(fm_st_find(&file, "__metadata__") == NULL);
	CHECK(fm_st_find(&file, "z") == NULL);
	fm_st_free(&file);
}

static void
test_safetensors_rejections(void)
{
	fm_st_file	file;
	fm_error	err;

	/* header length beyond the file */
	CHECK(fm_st_parse_header("{}", 100, 50, &file, &err) == FM_EINVAL);
	CHECK(strcmp(err.message, "safetensors header length 100 exceeds the file size 50") == 0);

	/* end beyond the data */
	CHECK(parse_header("{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}",
					   8, &file, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "beyond the 8 data bytes") != NULL);

	/* end before begin */
	CHECK(parse_header("{\"a\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [8, 4]}}",
					   8, &file, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "end before begin") != NULL);

	/* byte count against dtype x shape */
	CHECK(parse_header("{\"a\": {\"dtype\": \"BF16\", \"shape\": [3], \"data_offsets\": [0, 8]}}",
					   8, &file, &err) == FM_EINVAL);
	CHECK(strcmp(err.message,
				 "safetensors header: tensor a holds 8 bytes, but dtype BF16 and its shape need 6") == 0);

	/* overlapping ranges */
	CHECK(parse_header("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
					   " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
					   12, &file, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "tensors a and b overlap") != NULL);

	/* duplicate names */
	CHECK(parse_header("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
					   " \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
					   8, &file, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "duplicate key \"a\"") != NULL);

	/* the message names the bad size, not only its position */
	CHECK(parse_header("{\"a\": {\"dtype\": \"F32\", \"shape\": [2, -32], \"data_offsets\": [0, 4]}}",
					   4, &file, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "invalid size -32 in dimension 1") != NULL);
	CHECK(parse_header("{\"a\": {\"dtype\": \"F32\", \"shape\": [31.5], \"data_offsets\": [0, 4]}}",
					   4, &file, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "invalid size 31.5 in dimension 0") != NULL);

	/* malformed entries and JSON */
	CHECK(parse_header("{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, &file, &err) == FM_EINVAL);
	CHECK(parse_header("{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 0]}}",
					   4, &file, &err) == FM_EINVAL);
	CHECK(parse_header("{\"a\": ", 4, &file, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "invalid JSON in safetensors header") != NULL);
	CHECK(parse_header("[1, 2]", 4, &file, &err) == FM_EINVAL);
}

static void
test_shard_index(void)
{
	const char *good =
		"{\"metadata\": {\"total_size\": 24},"
		" \"weight_map\": {\"a\": \"model-00001-of-00002.safetensors\","
		" \"b\": \"model-00002-of-00002.safetensors\"}}";
	const char *dotdot = "{\"weight_map\": {\"a\": \"../x.safetensors\"}}";
	const char *subdir = "{\"weight_map\": {\"a\": \"d/x.safetensors\"}}";
	char	  **names;
	char	  **files;
	int32_t		n;
	fm_error	err;

	CHECK(fm_st_parse_index(good, strlen(good), &names, &files, &n, &err) == FM_OK);
	CHECK(n == 2);
	if (n == 2)
	{
		CHECK(strcmp(names[1], "b") == 0);
		CHECK(strcmp(files[1], "model-00002-of-00002.safetensors") == 0);
	}

	CHECK(fm_st_parse_index(dotdot, strlen(dotdot), &names, &files, &n, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "../x.safetensors") != NULL);
	CHECK(fm_st_parse_index(subdir, strlen(subdir), &names, &files, &n, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "invalid shard file name d/x.safetensors") != NULL);
	CHECK(fm_st_parse_index("{\"metadata\": {}}", strlen("{\"metadata\": {}}"), &names, &files, &n, &err) == FM_EINVAL);
}

#define BASE_CONFIG \
	"\"vocab_size\": 300, \"hidden_size\": 32, \"intermediate_size\": 48," \
	" \"num_hidden_layers\": 2, \"num_attention_heads\": 4," \
	" \"max_position_embeddings\": 256, \"num_experts_per_tok\": 2"

static fm_status
parse_config(const char *json, fm_config *c, fm_error *err)
{
	return fm_config_parse(json, strlen(json), c, err);
}

static void
test_config_fields_and_defaults(void)
{
	const char *json =
		"{\"model_type\": \"flex_olmo\", " BASE_CONFIG ","
		" \"num_local_experts\": 3, \"rope_parameters\": {\"rope_type\": \"default\","
		" \"rope_theta\": 500000.0}, \"rope_scaling\": null, \"rms_norm_eps\": 1e-05,"
		" \"eos_token_id\": [299, 10], \"pad_token_id\": 1, \"bos_token_id\": null,"
		" \"tie_word_embeddings\": true}";
	fm_config	c;
	fm_error	err;

	CHECK(parse_config(json, &c, &err) == FM_OK);
	CHECK(strcmp(c.model_type, "flex_olmo") == 0);
	CHECK(c.num_experts == 3);
	CHECK(c.num_key_value_heads == 4);
	CHECK(c.head_dim == 8);
	CHECK(c.rope_theta == 500000.0);
	CHECK(c.rms_norm_eps == 1e-5);
	CHECK(c.num_eos == 2);
	CHECK(c.eos_token_ids[0] == 299);
	CHECK(c.eos_token_ids[1] == 10);
	CHECK(c.pad_token_id == 1);
	CHECK(c.bos_token_id == -1);
	CHECK(c.tie_word_embeddings);
	CHECK(!c.norm_topk_prob);
	CHECK(c.expert_ranks[0] == 0);
	CHECK(c.expert_ranks[2] == 0);

	json = "{\"model_type\": \"flexmore\", " BASE_CONFIG ", \"num_experts\": 3,"
		" \"num_key_value_heads\": 2, \"head_dim\": 16, \"rope_theta\": 10000,"
		" \"expert_ranks\": [0, 4, 0], \"eos_token_id\": 7, \"norm_topk_prob\": true}";
	CHECK(parse_config(json, &c, &err) == FM_OK);
	CHECK(c.num_key_value_heads == 2);
	CHECK(c.head_dim == 16);
	CHECK(c.expert_ranks[1] == 4);
	CHECK(c.num_eos == 1);
	CHECK(c.eos_token_ids[0] == 7);
	CHECK(c.norm_topk_prob);
	CHECK(c.pad_token_id == -1);
}

static void
test_config_errors(void)
{
	fm_config	c;
	fm_error	err;

	CHECK(parse_config("{\"model_type\": \"flex_olmo\", " BASE_CONFIG ", \"num_experts\": 3}",
					   &c, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "missing field rope_theta") != NULL);

	CHECK(parse_config("{\"model_type\": \"flex_olmo\", " BASE_CONFIG ", \"num_experts\": 3,"
					   " \"rope_theta\": 10000, \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4}}",
					   &c, &err) == FM_EUNSUPPORTED);
	CHECK(strstr(err.message, "rope_scaling yarn") != NULL);

	CHECK(parse_config("{\"model_type\": \"llama\", " BASE_CONFIG ", \"num_experts\": 3,"
					   " \"rope_theta\": 10000}", &c, &err) == FM_EUNSUPPORTED);
	CHECK(strstr(err.message, "model_type llama") != NULL);

	CHECK(parse_config("{\"model_type\": \"flexmore\", " BASE_CONFIG ", \"num_experts\": 3,"
					   " \"rope_theta\": 10000}", &c, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "requires expert_ranks") != NULL);

	CHECK(parse_config("{\"model_type\": \"flexmore\", " BASE_CONFIG ", \"num_experts\": 3,"
					   " \"rope_theta\": 10000, \"expert_ranks\": [2, 0, 0]}", &c, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "expert_ranks[0] is 2") != NULL);

	CHECK(parse_config("{\"model_type\": \"flexmore\", " BASE_CONFIG ", \"num_experts\": 3,"
					   " \"rope_theta\": 10000, \"expert_ranks\": [0, 1]}", &c, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "expert_ranks has 2 entries but num_experts is 3") != NULL);

	CHECK(parse_config("{\"model_type\": \"flex_olmo\", " BASE_CONFIG ", \"num_experts\": 1,"
					   " \"rope_theta\": 10000}", &c, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "num_experts_per_tok 2 is outside [1, num_experts 1]") != NULL);

	CHECK(parse_config("{\"model_type\": \"flex_olmo\", " BASE_CONFIG ", \"num_experts\": 129,"
					   " \"rope_theta\": 10000}", &c, &err) == FM_ELIMIT);
	CHECK(strstr(err.message, "num_experts 129") != NULL);

	CHECK(parse_config("{\"model_type\": \"flex_olmo\", \"vocab_size\": 300, \"hidden_size\": 30,"
					   " \"intermediate_size\": 48, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
					   " \"max_position_embeddings\": 256, \"num_experts_per_tok\": 2,"
					   " \"num_experts\": 3, \"rope_theta\": 10000}", &c, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "hidden_size 30 is not a multiple of num_attention_heads 4") != NULL);

	CHECK(parse_config("{\"model_type\": \"flex_olmo\", " BASE_CONFIG ", \"num_experts\": 3,"
					   " \"rope_theta\": 10000, \"num_key_value_heads\": 3}", &c, &err) == FM_EINVAL);
	CHECK(parse_config("{\"model_type\": \"flex_olmo\", \"vocab_size\": 0}", &c, &err) == FM_EINVAL);
	CHECK(parse_config("{\"model_type\": \"flex_olmo\", " BASE_CONFIG ", \"num_experts\": 3,"
					   " \"rope_theta\": \"big\"}", &c, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "rope_theta must be a finite number") != NULL);
	CHECK(parse_config("{\"model_type\": ", &c, &err) == FM_EINVAL);

	CHECK(parse_config("{\"model_type\": 5}", &c, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "model_type must be a string, got number") != NULL);

	/* a repeated key would be checked with one value and stored with another */
	CHECK(parse_config("{\"model_type\": \"flex_olmo\", " BASE_CONFIG ", \"num_experts\": 3,"
					   " \"rope_theta\": 10000, \"rope_theta\": 500000}", &c, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "duplicate key \"rope_theta\"") != NULL);
	CHECK(parse_config("{\"model_type\": \"flex\xff\"}", &c, &err) == FM_EINVAL);
	CHECK(strstr(err.message, "not valid UTF-8 at byte 20") != NULL);
}

static void
test_expert_names(void)
{
	const char *plain = "{\"model_type\": \"flex_olmo\", " BASE_CONFIG ", \"num_experts\": 3,"
		" \"rope_theta\": 10000}";
	const char *named = "{\"model_type\": \"flex_olmo\", " BASE_CONFIG ", \"num_experts\": 3,"
		" \"rope_theta\": 10000, \"expert_names\": [\"public\", \"math\", \"code\"]}";
	const char *dup = "{\"model_type\": \"flex_olmo\", " BASE_CONFIG ", \"num_experts\": 3,"
		" \"rope_theta\": 10000, \"expert_names\": [\"public\", \"math\", \"math\"]}";
	fm_config	c;
	char	   *names[3];
	fm_error	err;

	CHECK(parse_config(plain, &c, &err) == FM_OK);
	CHECK(fm_config_expert_names(plain, strlen(plain), &c, names, &err) == FM_OK);
	CHECK(strcmp(names[0], "public") == 0);
	CHECK(strcmp(names[2], "expert_2") == 0);
	CHECK(fm_config_expert_names(named, strlen(named), &c, names, &err) == FM_OK);
	CHECK(strcmp(names[1], "math") == 0);
	CHECK(strcmp(names[2], "code") == 0);
	CHECK(fm_config_expert_names(dup, strlen(dup), &c, names, &err) == FM_EINVAL);
}

/* Checks that rewriting escapes of in gives exactly expected. */
static void
check_escapes(const char *in, const char *expected)
{
	size_t		len;
	const char *out = fm_json_utf8_escapes(in, strlen(in), &len);

	CHECK(len == strlen(expected));
	CHECK(memcmp(out, expected, len) == 0);
}

static void
test_utf8_escapes(void)
{
	/* Expected bytes: U+00E6 is C3 A6, U+1F600 is F0 9F 98 80. */
	check_escapes("\"\\u00e6\"", "\"\xc3\xa6\"");
	check_escapes("\"\\u00C6\\u00f8\"", "\"\xc3\x86\xc3\xb8\"");
	check_escapes("\"\\ud83d\\ude00\"", "\"\xf0\x9f\x98\x80\"");
	check_escapes("\"\\u0120\"", "\"\xc4\xa0\"");
	/* ASCII escapes, an escaped backslash and lone surrogates stay. */
	check_escapes("\"\\u0022\\u0041\"", "\"\\u0022\\u0041\"");
	check_escapes("\"\\\\u00e6\"", "\"\\\\u00e6\"");
	check_escapes("\"\\ud83d\"", "\"\\ud83d\"");
	check_escapes("\"\\u00zz\"", "\"\\u00zz\"");
}

int
main(void)
{
	test_utf8_escapes();
	test_safetensors_valid_header();
	test_safetensors_rejections();
	test_shard_index();
	test_config_fields_and_defaults();
	test_config_errors();
	test_expert_names();
	return TEST_SUMMARY();
}
