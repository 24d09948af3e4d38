/*
 * llama_logits: prints llama.cpp's next-token logits for a list of token
 * ids, so bench/run.sh can check that a GGUF export computes the same
 * function as flexmore before comparing speeds.  Built by bench/run.sh
 * against the llama.cpp library it builds, and not part of flexmore.
 *
 *	  llama_logits MODEL.gguf 1,2,3 [THREADS]
 *
 * Decodes the ids as one batch and prints the logits of the last one as a
 * JSON array with 9 significant digits.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void
quiet_log(enum ggml_log_level level, const char *text, void *user_data)
{
	if (level >= GGML_LOG_LEVEL_ERROR)
		fputs(text, stderr);
}

int
main(int argc, char **argv)
{
	struct llama_model_params model_params;
	struct llama_context_params context_params;
	struct llama_model *model;
	struct llama_context *context;
	llama_token ids[512];
	int			n_ids = 0;
	int			n_vocab;
	const float *logits;
	char	   *list;

	if (argc < 3 || argc > 4)
	{
		fprintf(stderr, "usage: llama_logits MODEL.gguf 1,2,3 [THREADS]\n");
		return 2;
	}
	list = strdup(argv[2]);
	for (char *p = strtok(list, ","); p != NULL && n_ids < 512; p = strtok(NULL, ","))
		ids[n_ids++] = atoi(p);
	if (n_ids == 0)
	{
		fprintf(stderr, "llama_logits: the id list is empty\n");
		return 2;
	}

	llama_log_set(quiet_log, NULL);
	llama_backend_init();
	model_params = llama_model_default_params();
	model = llama_model_load_from_file(argv[1], model_params);
	if (model == NULL)
	{
		fprintf(stderr, "llama_logits: could not load %s\n", argv[1]);
		return 1;
	}
	context_params = llama_context_default_params();
	context_params.n_ctx = 512;
	context_params.n_batch = 512;
	if (argc > 3)
	{
		context_params.n_threads = atoi(argv[3]);
		context_params.n_threads_batch = atoi(argv[3]);
	}
	context = llama_init_from_model(model, context_params);
	if (context == NULL)
	{
		fprintf(stderr, "llama_logits: could not create a context\n");
		return 1;
	}
	if (llama_decode(context, llama_batch_get_one(ids, n_ids)) != 0)
	{
		fprintf(stderr, "llama_logits: llama_decode failed\n");
		return 1;
	}
	logits = llama_get_logits_ith(context, -1);
	n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
	putchar('[');
	for (int i = 0; i < n_vocab; i++)
		printf("%s%.9g", i > 0 ? "," : "", logits[i]);
	printf("]\n");

	llama_free(context);
	llama_model_free(model);
	llama_backend_free();
	free(list);
	return 0;
}
