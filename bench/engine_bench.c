/*-------------------------------------------------------------------------
 *
 * engine_bench.c
 *	  Throughput of the engine on a checkpoint directory, per weight
 *	  format, without a server.
 *
 *	  engine-bench --model DIR --format f32|bf16|q8 --threads N
 *		  --decode N --prompt N [--experts NAME,NAME]
 *	  engine-bench --bandwidth [--threads N]
 *	  engine-bench --sgemm --model DIR [--threads N] [--prompt N]
 *
 * A run loads config.json and the safetensors files of DIR, widens every
 * tensor to fp32, converts the matrices to the format (fm_model_convert),
 * then times a prompt of --prompt ids in one fm_forward call and --decode
 * ids decoded one at a time (greedy) after it, each the median of three
 * runs.  It prints one JSON line:
 *
 *	  format, threads, isa: as run (isa is fm_kernel_isa)
 *	  decode_tok_s, prompt_tok_s: ids per second of wall-clock time
 *	  weight_bytes_per_token: bytes of weights one decoded id reads, from
 *		the experts the router chose for the decoded ids (a low-rank
 *		expert adds its factors to the public expert's matrices, which
 *		count once per layer): one embedding row, every attention matrix,
 *		norm and router, the chosen experts, and lm_head
 *	  prompt_flops_per_token: 2 flops per weight a prompt id multiplies
 *		(the routed experts of the prompt, as above, and lm_head for the
 *		last id only) plus 4 * position * heads * head_dim for attention,
 *		averaged over the prompt
 *
 * --bandwidth reads a 1 GiB buffer with AVX-512 loads (AVX2 when the
 * kernel set is lower; the read needs at least AVX2) on one
 * thread and on --threads threads and prints the best of five passes in
 * GB/s.  --sgemm prints, for the model's matrix shapes and a chunk of
 * min(--prompt, 64) rows (16 for lm_head, as scoring runs it), the
 * GFLOP/s of OpenBLAS sgemm, of the engine's bf16 and q8 products on the
 * same shapes (0 where the shape cannot be q8), and of dequantising the
 * q8 matrix to fp32 before each sgemm, the alternative q8 prompt path.
 *
 * Random ids (a fixed sequence) are used, so no tokenizer is needed.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres_fe.h"

#include <immintrin.h>
#include <math.h>
#include <sys/stat.h>
#include <time.h>

#include <cblas.h>

#include "common/checkpoint.h"
#include "engine/engine.h"
#include "engine/kernels.h"

#define RUNS 3


static double
now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int
compare_doubles(const void *a, const void *b)
{
	double		x = *(const double *) a;
	double		y = *(const double *) b;

	return x < y ? -1 : x > y;
}

static double
median(double *v, int n)
{
	qsort(v, n, sizeof(double), compare_doubles);
	return v[n / 2];
}

/* ---------- weight bytes and flops from routing ---------- */

/* Experts each layer's router chose, counted over the measured ids. */
typedef struct route_count
{
	const fm_config *config;
	int64_t		ids;			/* rows reported in layer 0 */
	int64_t		chose[64][FM_MAX_EXPERTS];	/* [layer][expert] */
	int64_t		shared[64];		/* rows needing expert 0's matrices */
} route_count;

static void
count_route(void *arg, int32_t row, int32_t seq, int32_t position, int32_t layer,
			int32_t n, const int32_t *experts, const float *weights)
{
	route_count *rc = arg;
	bool		shared = false;

	if (layer >= 64)
		return;
	if (layer == 0)
		rc->ids++;
	for (int32_t j = 0; j < n; j++)
	{
		rc->chose[layer][experts[j]]++;
		if (experts[j] == 0 || rc->config->expert_ranks[experts[j]] > 0)
			shared = true;
	}
	if (shared)
		rc->shared[layer]++;
}

static double
matrix_bytes(const fm_matrix *m)
{
	return (double) fm_matrix_bytes(m->format, m->rows, m->cols);
}

static double
matrix_weights(const fm_matrix *m)
{
	return (double) m->rows * m->cols;
}

/*
 * Average per routed id of value(matrix) over the experts' matrices:
 * bytes or weight counts, depending on value.
 */
static double
expert_average(const fm_model *m, const route_count *rc, double (*value) (const fm_matrix *))
{
	const fm_config *c = &m->config;
	double		total = 0.0;

	if (rc->ids == 0)
		return 0.0;
	for (int32_t l = 0; l < c->num_hidden_layers && l < 64; l++)
	{
		const fm_layer_weights *lw = &m->weights.layers[l];

		total += rc->shared[l] * (value(&lw->experts[0].gate) + value(&lw->experts[0].up) +
								  value(&lw->experts[0].down));
		for (int32_t e = 1; e < c->num_experts; e++)
		{
			const fm_ffn_weights *f = &lw->experts[e];

			if (f->rank == 0)
				total += rc->chose[l][e] * (value(&f->gate) + value(&f->up) + value(&f->down));
			else
				total += rc->chose[l][e] * (value(&f->gate_a) + value(&f->gate_b) +
											value(&f->up_a) + value(&f->up_b) +
											value(&f->down_a) + value(&f->down_b));
		}
	}
	return total / rc->ids;
}

/* Bytes or weights of everything but the experts and the output matrix. */
static double
dense_part(const fm_model *m, double (*value) (const fm_matrix *), bool bytes)
{
	const fm_config *c = &m->config;
	double		total = 0.0;

	for (int32_t l = 0; l < c->num_hidden_layers; l++)
	{
		const fm_layer_weights *lw = &m->weights.layers[l];
		double		router = (double) c->num_experts * c->hidden_size;
		double		norms = 2.0 * c->hidden_size +
			(double) (c->num_attention_heads + c->num_key_value_heads) * c->head_dim;

		total += value(&lw->q_proj) + value(&lw->k_proj) + value(&lw->v_proj) +
			value(&lw->o_proj);
		total += bytes ? 4.0 * (router + norms) : router;
	}
	return total;
}

/* ---------- runs ---------- */

static int32_t *
random_ids(int32_t n, int32_t vocab)
{
	int32_t    *ids = pg_malloc(sizeof(int32_t) * (n > 0 ? n : 1));
	uint64_t	state = 12345;

	for (int32_t i = 0; i < n; i++)
	{
		state = state * 6364136223846793005ull + 1442695040888963407ull;
		ids[i] = (int32_t) ((state >> 33) % (uint64_t) vocab);
	}
	return ids;
}

static int32_t
argmax(const float *v, int32_t n)
{
	int32_t		best = 0;

	for (int32_t i = 1; i < n; i++)
		if (v[i] > v[best])
			best = i;
	return best;
}

static void
run_model(const checkpoint *ck, fm_weight_format format, int32_t threads,
		  int32_t n_decode, int32_t n_prompt, const bool *allowed)
{
	const fm_config *c = &ck->model.config;
	fm_model	model;
	fm_layer_weights *layers = pg_malloc0(sizeof(fm_layer_weights) * c->num_hidden_layers);
	void	   *storage = NULL;
	fm_session *s;
	fm_error	err;
	int32_t		context = n_prompt + n_decode + 1;
	int32_t    *prompt = random_ids(n_prompt > 0 ? n_prompt : 1, c->vocab_size);
	float	   *logits = pg_malloc(sizeof(float) * c->vocab_size);
	double		prompt_times[RUNS];
	double		decode_times[RUNS];
	route_count *prompt_routes = pg_malloc0(sizeof(route_count));
	route_count *decode_routes = pg_malloc0(sizeof(route_count));
	double		prompt_tok_s = 0.0;
	double		decode_tok_s = 0.0;
	double		bytes_per_token;
	double		flops_per_token = 0.0;

	/*
	 * f32 is copied too, so every format's matrices sit in one block from
	 * the engine's allocator (huge pages), as they sit in cache items in
	 * the extension, not in the loader's per-tensor buffers.
	 */
	tool_check(fm_model_convert(&ck->model, format, &fm_malloc_allocator, &model, layers,
								&storage, &err), &err, "conversion");
	tool_check(fm_set_threads(threads, &err), &err, "--threads");
	openblas_set_num_threads(threads);
	if (context > c->max_position_embeddings)
		tool_fail("--prompt plus --decode needs %d positions, but the model has %d",
			 context, c->max_position_embeddings);
	tool_check(fm_session_create(&model, &fm_malloc_allocator, context, &s, &err), &err, "session");
	if (allowed != NULL)
		tool_check(fm_session_set_experts(s, allowed, &err), &err, "--experts");
	prompt_routes->config = c;
	decode_routes->config = c;

	for (int run = 0; run < RUNS; run++)
	{
		double		start;
		int32_t		id;

		fm_session_reset(s);
		fm_session_set_route_hook(s, run == 0 ? count_route : NULL, prompt_routes);
		start = now_seconds();
		tool_check(fm_forward(s, prompt, n_prompt > 0 ? n_prompt : 1, logits, NULL, NULL, &err),
			  &err, "prompt");
		prompt_times[run] = now_seconds() - start;

		fm_session_set_route_hook(s, run == 0 ? count_route : NULL, decode_routes);
		id = argmax(logits, c->vocab_size);
		start = now_seconds();
		for (int32_t i = 0; i < n_decode; i++)
		{
			tool_check(fm_forward(s, &id, 1, logits, NULL, NULL, &err), &err, "decode");
			id = argmax(logits, c->vocab_size);
		}
		decode_times[run] = now_seconds() - start;
	}
	if (n_prompt > 0)
		prompt_tok_s = n_prompt / median(prompt_times, RUNS);
	if (n_decode > 0)
		decode_tok_s = n_decode / median(decode_times, RUNS);

	bytes_per_token = matrix_bytes(&model.weights.embed_tokens) / c->vocab_size +
		dense_part(&model, matrix_bytes, true) + 4.0 * c->hidden_size +
		expert_average(&model, decode_routes, matrix_bytes) +
		matrix_bytes(&model.weights.lm_head);
	if (n_prompt > 0)
	{
		double		q_dim = (double) c->num_attention_heads * c->head_dim;

		flops_per_token = 2.0 * (dense_part(&model, matrix_weights, false) +
								 expert_average(&model, prompt_routes, matrix_weights) +
								 matrix_weights(&model.weights.lm_head) / n_prompt) +
			4.0 * q_dim * c->num_hidden_layers * (n_prompt + 1) / 2.0;
	}

	printf("{\"format\": \"%s\", \"threads\": %d, \"isa\": \"%s\", \"decode_tok_s\": %.3f, "
		   "\"prompt_tok_s\": %.3f, \"weight_bytes_per_token\": %.0f, "
		   "\"prompt_flops_per_token\": %.0f, \"decode\": %d, \"prompt\": %d}\n",
		   fm_weight_format_name(format), threads, fm_kernel_isa(), decode_tok_s,
		   prompt_tok_s, bytes_per_token, flops_per_token, n_decode, n_prompt);
	fflush(stdout);
	fm_session_destroy(s);
	free(storage);
	free(layers);
	free(prompt);
	free(logits);
	free(prompt_routes);
	free(decode_routes);
}

/* ---------- memory bandwidth ---------- */

typedef struct read_job
{
	const char *buf;
	size_t		chunk;
	int64_t		sink;			/* keeps the loads from being optimised away */
} read_job;

/* Reads every byte of chunks [begin, end) with 512-bit loads. */
__attribute__((target("avx512f"))) static void
read_range_avx512(void *arg, int32_t begin, int32_t end)
{
	read_job   *job = arg;
	const char *p = job->buf + (size_t) begin * job->chunk;
	const char *stop = job->buf + (size_t) end * job->chunk;
	__m512i		a = _mm512_setzero_si512();
	__m512i		b = _mm512_setzero_si512();
	__m512i		c = _mm512_setzero_si512();
	__m512i		d = _mm512_setzero_si512();

	for (; p < stop; p += 256)
	{
		a = _mm512_add_epi64(a, _mm512_load_si512((const void *) p));
		b = _mm512_add_epi64(b, _mm512_load_si512((const void *) (p + 64)));
		c = _mm512_add_epi64(c, _mm512_load_si512((const void *) (p + 128)));
		d = _mm512_add_epi64(d, _mm512_load_si512((const void *) (p + 192)));
	}
	a = _mm512_add_epi64(_mm512_add_epi64(a, b), _mm512_add_epi64(c, d));
	__atomic_fetch_add(&job->sink, _mm512_reduce_add_epi64(a), __ATOMIC_RELAXED);
}

/* Reads every byte of chunks [begin, end) with 256-bit loads. */
__attribute__((target("avx2"))) static void
read_range_avx2(void *arg, int32_t begin, int32_t end)
{
	read_job   *job = arg;
	const char *p = job->buf + (size_t) begin * job->chunk;
	const char *stop = job->buf + (size_t) end * job->chunk;
	__m256i		a = _mm256_setzero_si256();
	__m256i		b = _mm256_setzero_si256();

	for (; p < stop; p += 64)
	{
		a = _mm256_add_epi64(a, _mm256_load_si256((const __m256i *) p));
		b = _mm256_add_epi64(b, _mm256_load_si256((const __m256i *) (p + 32)));
	}
	a = _mm256_add_epi64(a, b);
	__atomic_fetch_add(&job->sink, _mm256_extract_epi64(a, 0), __ATOMIC_RELAXED);
}

/* Best GB/s of five passes over buf with threads threads. */
static double
read_bandwidth(const char *buf, size_t bytes, int32_t threads)
{
	read_job	job = {buf, 1 << 20, 0};
	fm_range_fn read_range = strcmp(fm_kernel_isa(), "avx512bf16") == 0 ||
		strcmp(fm_kernel_isa(), "amx") == 0 ? read_range_avx512 : read_range_avx2;
	int32_t		chunks = (int32_t) (bytes / job.chunk);
	double		best = 0.0;
	fm_error	err;

	tool_check(fm_set_threads(threads, &err), &err, "--threads");
	for (int pass = 0; pass < 5; pass++)
	{
		double		start = now_seconds();
		double		rate;

		fm_parallel_for(chunks, 1, read_range, &job);
		rate = (double) chunks * job.chunk / (now_seconds() - start) / 1e9;
		if (rate > best)
			best = rate;
	}
	return best;
}

static void
run_bandwidth(int32_t threads)
{
	size_t		bytes = (size_t) 1 << 30;
	char	   *buf = NULL;

	if (posix_memalign((void **) &buf, 64, bytes) != 0)
		tool_fail("could not allocate %zu bytes", bytes);
	memset(buf, 1, bytes);
	printf("{\"mode\": \"bandwidth\", \"isa\": \"%s\", \"buffer_bytes\": %zu, "
		   "\"single_thread_gb_s\": %.2f, \"threads\": %d, \"multi_thread_gb_s\": %.2f}\n",
		   fm_kernel_isa(), bytes, read_bandwidth(buf, bytes, 1), threads,
		   read_bandwidth(buf, bytes, threads));
	free(buf);
}

/* ---------- matrix product rates ---------- */

/*
 * GFLOP/s of one product over at least 0.3 s after one warm-up call:
 * kind 0 is sgemm on w, 1 the engine's product of m, 2 dequantising m
 * into w (the fp32 buffer) and then sgemm.
 */
static double
time_product(int kind, const float *x, float *w, const fm_matrix *m, float *y,
			 void *scratch, int32_t rows, int32_t out, int32_t in)
{
	long		calls = 0;
	double		start = now_seconds();
	double		elapsed;

	do
	{
		if (calls == 1)
			start = now_seconds();
		if (kind == 2)
			for (int32_t o = 0; o < out; o++)
				fm_matrix_row(m, o, w + (size_t) o * in);
		if (kind == 1)
			fm_matmul_w(y, x, m, rows, scratch);
		else
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, x, in,
						w, in, 0.0f, y, out);
		calls++;
		elapsed = calls > 1 ? now_seconds() - start : 0.0;
	} while (elapsed < 0.3);
	return 2.0 * rows * out * in * (calls - 1) / elapsed / 1e9;
}

static void
run_sgemm(const checkpoint *ck, int32_t threads, int32_t n_prompt)
{
	const fm_config *c = &ck->model.config;
	int32_t		rows = n_prompt;
	int32_t		q_dim = c->num_attention_heads * c->head_dim;
	const struct
	{
		const char *what;
		int32_t		out;
		int32_t		in;
	}			shapes[] = {
		{"q_proj", q_dim, c->hidden_size},
		{"o_proj", c->hidden_size, q_dim},
		{"gate_proj", c->intermediate_size, c->hidden_size},
		{"down_proj", c->hidden_size, c->intermediate_size},
		{"lm_head", c->vocab_size, c->hidden_size},
	};
	fm_error	err;

	if (rows < 1 || rows > FM_PROMPT_CHUNK)
		rows = FM_PROMPT_CHUNK;
	tool_check(fm_set_threads(threads, &err), &err, "--threads");
	openblas_set_num_threads(threads);
	for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
	{
		int32_t		out = shapes[i].out;
		int32_t		in = shapes[i].in;
		int32_t		m_rows = strcmp(shapes[i].what, "lm_head") == 0 ? FM_LOGPROB_ROWS : rows;
		float	   *x = pg_malloc(sizeof(float) * m_rows * in);
		float	   *w = pg_malloc(sizeof(float) * (size_t) out * in);
		float	   *y = pg_malloc(sizeof(float) * (size_t) m_rows * out);
		void	   *scratch = pg_malloc(fm_matmul_scratch_bytes(m_rows, in));
		double		rate[3];
		double		dequant_rate = 0.0;

		for (size_t j = 0; j < (size_t) m_rows * in; j++)
			x[j] = (float) ((j % 13) - 6) * 0.05f;
		for (size_t j = 0; j < (size_t) out * in; j++)
			w[j] = (float) ((j % 7) - 3) * 0.02f;
		rate[0] = time_product(0, x, w, NULL, y, NULL, m_rows, out, in);
		for (int f = FM_WEIGHTS_BF16; f <= FM_WEIGHTS_Q8; f++)
		{
			fm_weight_format mf = fm_matrix_format_for(f, in);
			void	   *packed = pg_malloc(fm_matrix_bytes(mf, out, in));
			fm_matrix	m;

			fm_matrix_pack(mf, w, out, in, packed);
			m = fm_matrix_view(mf, packed, out, in);
			rate[f] = mf == (fm_weight_format) f ?
				time_product(1, x, w, &m, y, scratch, m_rows, out, in) : 0.0;
			if (f == FM_WEIGHTS_Q8 && mf == FM_WEIGHTS_Q8)
			{
				float	   *deq = pg_malloc(sizeof(float) * (size_t) out * in);

				dequant_rate = time_product(2, x, deq, &m, y, NULL, m_rows, out, in);
				free(deq);
			}
			free(packed);
		}
		printf("{\"mode\": \"sgemm\", \"matrix\": \"%s\", \"m\": %d, \"n\": %d, \"k\": %d, "
			   "\"threads\": %d, \"isa\": \"%s\", \"sgemm_gflops\": %.2f, "
			   "\"bf16_gflops\": %.2f, \"q8_gflops\": %.2f, \"q8_dequant_sgemm_gflops\": %.2f}\n",
			   shapes[i].what, m_rows, out, in, threads, fm_kernel_isa(), rate[0], rate[1],
			   rate[2], dequant_rate);
		fflush(stdout);
		free(x);
		free(w);
		free(y);
		free(scratch);
	}
}

/* ---------- arguments ---------- */

static int32_t
int_arg(const char *opt, const char *val, int32_t min)
{
	char	   *end;
	long		v;

	errno = 0;
	v = strtol(val, &end, 10);
	if (errno != 0 || *end != '\0' || v < min || v > INT32_MAX)
		tool_fail("%s needs an integer of at least %d, not \"%s\"", opt, min, val);
	return (int32_t) v;
}

static void
usage(void)
{
	fprintf(stderr,
			"usage: engine-bench --model DIR --format f32|bf16|q8 --threads N --decode N --prompt N\n"
			"           [--experts NAME,NAME] [--isa c|avx2|avx512bf16|amx]\n"
			"       engine-bench --bandwidth [--threads N]\n"
			"       engine-bench --sgemm --model DIR [--threads N] [--prompt N]\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	const char *model_dir = NULL;
	const char *experts = NULL;
	fm_weight_format format = FM_WEIGHTS_F32;
	int32_t		threads = 1;
	int32_t		n_decode = 32;
	int32_t		n_prompt = 64;
	bool		bandwidth = false;
	bool		sgemm = false;
	checkpoint	ck;
	bool		allowed[FM_MAX_EXPERTS];

	tool_name = "engine-bench";
	for (int i = 1; i < argc; i++)
	{
		const char *opt = argv[i];

		if (strcmp(opt, "--bandwidth") == 0)
		{
			bandwidth = true;
			continue;
		}
		if (strcmp(opt, "--sgemm") == 0)
		{
			sgemm = true;
			continue;
		}
		if (i + 1 >= argc)
			usage();
		if (strcmp(opt, "--model") == 0)
			model_dir = argv[++i];
		else if (strcmp(opt, "--format") == 0)
		{
			if (!fm_weight_format_parse(argv[++i], &format))
				tool_fail("--format must be f32, bf16 or q8, not \"%s\"", argv[i]);
		}
		else if (strcmp(opt, "--threads") == 0)
		{
			threads = int_arg(opt, argv[++i], 1);
			if (threads > FM_MAX_THREADS)
				tool_fail("--threads must be at most %d", FM_MAX_THREADS);
		}
		else if (strcmp(opt, "--decode") == 0)
			n_decode = int_arg(opt, argv[++i], 0);
		else if (strcmp(opt, "--prompt") == 0)
			n_prompt = int_arg(opt, argv[++i], 0);
		else if (strcmp(opt, "--experts") == 0)
			experts = argv[++i];
		else if (strcmp(opt, "--isa") == 0)
		{
			if (!fm_force_isa(argv[++i]))
				tool_fail("--isa %s is unknown or not supported by this CPU (best: %s)",
					 argv[i], fm_kernel_isa());
		}
		else
			usage();
	}

	if (bandwidth)
	{
		run_bandwidth(threads);
		return 0;
	}
	if (model_dir == NULL)
		usage();
	checkpoint_load(&ck, model_dir, false);
	if (sgemm)
	{
		run_sgemm(&ck, threads, n_prompt);
		return 0;
	}
	if (experts != NULL)
		checkpoint_parse_experts(&ck, experts, allowed);
	run_model(&ck, format, threads, n_decode, n_prompt, experts != NULL ? allowed : NULL);
	return 0;
}
