/*-------------------------------------------------------------------------
 *
 * engine.h
 *	  Public interface of the flexmore inference engine.
 *
 * The engine computes FlexOlmo / FlexMoRE forward passes, samples tokens
 * and runs the byte-level BPE tokenizer.  It includes no PostgreSQL header,
 * so it builds, tests and benchmarks on its own.  The PostgreSQL glue and
 * the command-line tools are its only callers.
 *
 * Contracts shared by every function here:
 *	- Memory comes from the caller's fm_allocator, never from a global
 *	  malloc, so the glue can hand out memory-context allocations.  An
 *	  allocator returns NULL on failure, and the engine turns that into
 *	  FM_ENOMEM.  Sizes above 1 GB must work.
 *	- Failure is a status plus a message in an fm_error.  The engine never
 *	  prints, never exits and never longjmps.
 *	- Long loops call the caller's fm_interrupt_fn between layers and
 *	  tokens; when it returns true the engine stops with FM_ECANCELED.
 *	- Weight matrices are fm_matrix descriptors of [out, in] matrices,
 *	  y = W x, in one of the fm_weight_format layouts.  The engine only
 *	  reads them: the caller owns and frees them.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_ENGINE_H
#define FLEXMORE_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define FM_MAX_EXPERTS	128
#define FM_MAX_EOS		8
#define FM_ERROR_LEN	512

/* ---------- status, errors, allocation, interrupts ---------- */

typedef enum fm_status
{
	FM_OK = 0,
	FM_EINVAL,					/* bad input: ids, shapes, parameters, files */
	FM_EUNSUPPORTED,			/* valid but not implemented (a tokenizer type) */
	FM_ELIMIT,					/* a configured bound would be exceeded */
	FM_ENOMEM,					/* the allocator returned NULL */
	FM_ECANCELED,				/* the interrupt callback asked to stop */
	FM_EINTERNAL				/* a bug: an invariant did not hold */
} fm_status;

typedef struct fm_error
{
	fm_status	status;
	char		message[FM_ERROR_LEN];	/* lower-case, no trailing period */
} fm_error;

/* Sets err (when not NULL) and returns status; printf-style message. */
fm_status	fm_set_error(fm_error *err, fm_status status, const char *fmt,...)
			__attribute__((format(printf, 3, 4)));

typedef struct fm_allocator
{
	void	   *(*alloc) (void *context, size_t size);	/* NULL on failure */
	void		(*free) (void *context, void *ptr);
	void	   *context;
} fm_allocator;

/* malloc/free, for tools and unit tests. */
extern const fm_allocator fm_malloc_allocator;

void	   *fm_alloc(const fm_allocator *a, size_t size);
void	   *fm_alloc_zero(const fm_allocator *a, size_t size);
void		fm_free(const fm_allocator *a, void *ptr);

/* Returns true when the engine should stop as soon as it safely can. */
typedef bool (*fm_interrupt_fn) (void *arg);

/* ---------- model description ---------- */

/*
 * Model hyperparameters, as read from config.json by the reader
 * (src/reader/config.c).  Every field is filled; optional fields of the
 * file get their documented defaults there, never here.
 */
typedef struct fm_config
{
	char		model_type[32];	/* "flex_olmo" or "flexmore" */
	int32_t		vocab_size;		/* rows of embed_tokens and lm_head */
	int32_t		hidden_size;
	int32_t		intermediate_size;	/* per expert */
	int32_t		num_hidden_layers;
	int32_t		num_attention_heads;
	int32_t		num_key_value_heads;
	int32_t		head_dim;
	int32_t		max_position_embeddings;
	int32_t		num_experts;
	int32_t		num_experts_per_tok;
	bool		norm_topk_prob;
	bool		tie_word_embeddings;
	double		rms_norm_eps;
	double		rope_theta;
	int32_t		expert_ranks[FM_MAX_EXPERTS];	/* 0 = full size; [0] is 0 */
	int32_t		num_eos;
	int32_t		eos_token_ids[FM_MAX_EOS];
	int32_t		pad_token_id;	/* -1 when absent or null */
	int32_t		bos_token_id;	/* -1 when absent or null */
} fm_config;

/* ---------- weight formats (src/engine/formats.c) ---------- */

/*
 * Storage format of a weight matrix.
 *
 * FM_WEIGHTS_F32: row-major float[rows][cols].
 *
 * FM_WEIGHTS_BF16: bfloat16 (the top 16 bits of an fp32, rounded to
 * nearest even) in panels of FM_PANEL_ROWS rows, so one 64-byte vector
 * contains two neighbouring columns of 16 rows: element (o, k) is uint16 number
 * ((o / 16) * ceil(cols / 2) + k / 2) * 32 + (o % 16) * 2 + k % 2.  Rows
 * past the last and the odd column past the last are zero.  Products
 * round each activation to bfloat16 too, and accumulate in fp32.
 *
 * FM_WEIGHTS_Q8: symmetric 8-bit blocks of FM_Q8_BLOCK columns, only for
 * matrices whose cols is a multiple of FM_Q8_BLOCK, 34 bytes per 32
 * weights as in llama.cpp's Q8_0.  Per row and block, the scale
 * d = max|w| / 127 is rounded so that d * 2^e is an fp16 value (e is the
 * matrix's exponent, below), and q = round(w / d) in [-127, 127].  With
 * np = ceil(rows / 16) panels and nb = cols / 32 blocks, the data is, one
 * after the other:
 *	  int8 q[np][nb][8][16][4]: 4 neighbouring columns of 16 rows per 64 bytes
 *	  uint16 scale[np][nb][16]: IEEE binary16 bits of d * 2^e
 *	  float unit = 2^-e, with e chosen per matrix so that the largest scale
 *	  times 2^e lies in [2^14, 2^15): fp16 then holds every scale of the
 *	  matrix down to 2^-29 of the largest as a normal number, whatever the
 *	  weights' magnitude
 * Products quantise each activation block the same way (with an fp32
 * scale), sum each block's integer products exactly, multiply them by
 * d * 2^e times the activation scale, and multiply each output's sum of
 * blocks by unit.
 *
 * The panel layouts let one vector instruction work on 16 output rows at
 * once, for one decoded token and for prompt chunks alike.
 */
typedef enum fm_weight_format
{
	FM_WEIGHTS_F32 = 0,
	FM_WEIGHTS_BF16,
	FM_WEIGHTS_Q8
} fm_weight_format;

#define FM_PANEL_ROWS	16
#define FM_Q8_BLOCK		32

/* Parses "f32", "bf16" or "q8"; false for anything else. */
bool		fm_weight_format_parse(const char *name, fm_weight_format *out);
const char *fm_weight_format_name(fm_weight_format format);

/* A weight matrix [rows, cols] in some format; see fm_matrix_view. */
typedef struct fm_matrix
{
	fm_weight_format format;
	int32_t		rows;
	int32_t		cols;
	const void *data;			/* NULL when the matrix is not set */
	const uint16_t *scales;		/* q8 only: fp16 scale[np][nb][16] inside data */
	float		scale_unit;		/* q8 only: the matrix's 2^-e, stored after the scales */
} fm_matrix;

/*
 * Returns the format a matrix of cols columns gets when format is
 * requested: q8 falls back to bf16 when cols is not a multiple of
 * FM_Q8_BLOCK; f32 and bf16 are always possible.
 */
fm_weight_format fm_matrix_format_for(fm_weight_format format, int64_t cols);

/*
 * Bytes of a [rows, cols] matrix in format, a multiple of 64; SIZE_MAX
 * when the size overflows or rows or cols is outside [1, INT32_MAX], or
 * for q8 when cols is not a multiple of FM_Q8_BLOCK.
 */
size_t		fm_matrix_bytes(fm_weight_format format, int64_t rows, int64_t cols);

/*
 * Writes the [rows, cols] row-major fp32 matrix src in format to dst,
 * which is fm_matrix_bytes long.  The kernels load unaligned, but a
 * 64-byte aligned dst keeps each vector in one cache line.  Values must
 * be finite, as the import checks.
 */
void		fm_matrix_pack(fm_weight_format format, const float *src, int32_t rows,
						   int32_t cols, void *dst);

/* Returns the descriptor of data written by fm_matrix_pack (or fp32 rows). */
fm_matrix	fm_matrix_view(fm_weight_format format, const void *data, int32_t rows,
						   int32_t cols);

/* Returns an f32 descriptor of a row-major float matrix. */
fm_matrix	fm_matrix_f32(const float *data, int32_t rows, int32_t cols);

/* Writes row `row` of m, dequantised to fp32, to out[cols]. */
void		fm_matrix_row(const fm_matrix *m, int32_t row, float *out);

/*
 * The kernel set chosen from the CPU at first use: "amx", "avx512bf16"
 * (AVX-512 F, BW, VL, VNNI and BF16), "avx2" (AVX2, FMA and F16C) or "c"
 * (plain C).  "amx" is avx512bf16 with bf16 products on AMX tiles, chosen
 * when the CPU has AMX-BF16 and Linux grants this process the tile state.
 */
const char *fm_kernel_isa(void);

/*
 * The OPENBLAS_CORETYPE that matches this CPU's vector instructions:
 * "Zen" on an AMD CPU with AVX2 and FMA, otherwise "SkylakeX" with AVX-512
 * F, BW, VL, DQ and CD, "Haswell" with AVX2 and FMA, else NULL.  An
 * OpenBLAS older than the CPU does not recognise it and falls back to SSE
 * kernels ("Prescott").  Debian 12's 0.3.21 does so on a Xeon of family
 * 6, model 207, where its one-thread sgemm ran at 11 GFLOP/s against 84
 * to 93 with the SkylakeX kernels.  Setting the variable before OpenBLAS
 * loads avoids that.  On a Zen 4 EPYC, whose AVX-512 units are 256 bits
 * wide, the Zen kernels ran the model's 64-row products at 69 to 74
 * GFLOP/s against 65 to 68 with SkylakeX (one thread, four interleaved
 * rounds).
 */
const char *fm_openblas_coretype(void);

/*
 * Restricts the kernels to a set no higher than the CPU's: "amx",
 * "avx512bf16", "avx2" or "c".  Returns false, changing nothing, for an
 * unknown name or a set the CPU lacks.  For tests and benchmarks; call it from the
 * thread that runs the engine, between products.
 */
bool		fm_force_isa(const char *name);

/*
 * One expert's SwiGLU FFN.  rank 0: gate/up [inter, hidden], down
 * [hidden, inter].  rank r > 0: a delta on expert 0, W = W0 + B A, with
 * *_a [r, in] and *_b [out, r]; gate/up/down are then NULL.
 */
typedef struct fm_ffn_weights
{
	int32_t		rank;
	fm_matrix	gate;
	fm_matrix	up;
	fm_matrix	down;
	fm_matrix	gate_a;
	fm_matrix	gate_b;
	fm_matrix	up_a;
	fm_matrix	up_b;
	fm_matrix	down_a;
	fm_matrix	down_b;
} fm_ffn_weights;

typedef struct fm_layer_weights
{
	fm_matrix	q_proj;			/* [heads*head_dim, hidden] */
	fm_matrix	k_proj;			/* [kv_heads*head_dim, hidden] */
	fm_matrix	v_proj;			/* [kv_heads*head_dim, hidden] */
	fm_matrix	o_proj;			/* [hidden, heads*head_dim] */
	const float *q_norm;		/* [heads*head_dim] */
	const float *k_norm;		/* [kv_heads*head_dim] */
	const float *post_attention_norm;	/* [hidden] */
	const float *post_feedforward_norm;	/* [hidden] */
	const float *router;		/* [num_experts, hidden], always fp32 */
	fm_ffn_weights experts[FM_MAX_EXPERTS];
} fm_layer_weights;

typedef struct fm_weights
{
	fm_matrix	embed_tokens;	/* [vocab, hidden] */
	fm_matrix	lm_head;		/* [vocab, hidden]; == embed_tokens when tied */
	const float *final_norm;	/* [hidden] */
	fm_layer_weights *layers;	/* [num_hidden_layers], caller-owned */
} fm_weights;

typedef struct fm_model
{
	fm_config	config;
	fm_weights	weights;
} fm_model;

/*
 * Checks that every weight pointer the config needs is set and that the
 * config is coherent (expert 0 full size, ranks in range, k >= 1, ...).
 */
fm_status	fm_model_validate(const fm_model *model, fm_error *err);

/* ---------- checkpoint tensor layout (src/engine/layout.c) ---------- */

typedef enum fm_dtype
{
	FM_DTYPE_F32 = 0,
	FM_DTYPE_BF16,
	FM_DTYPE_F16
} fm_dtype;

/* Bytes per element of a supported dtype. */
size_t		fm_dtype_size(fm_dtype dtype);

/* Parses "F32", "BF16", "F16"; false for anything else. */
bool		fm_dtype_parse(const char *name, fm_dtype *out);
const char *fm_dtype_name(fm_dtype dtype);

/* Widens n elements of src (in dtype, little-endian) to fp32, exactly. */
void		fm_convert_to_f32(fm_dtype dtype, const void *src, float *dst, size_t n);

#define FM_MAX_DIMS 4

/*
 * What a checkpoint must contain: one entry per tensor the config
 * requires.  Fused expert tensors (mlp.experts.gate_up_proj, down_proj)
 * are an alternative spelling of the per-expert ones; fm_layout_expected
 * lists the per-expert names, and fm_layout_bind accepts either.
 */
typedef struct fm_tensor_spec
{
	char		name[128];
	int32_t		ndim;
	int64_t		shape[FM_MAX_DIMS];
	int32_t		expert;			/* expert index, or -1 for shared weights */
	bool		optional;		/* lm_head when tied */
} fm_tensor_spec;

/*
 * Lists the tensors a checkpoint of this config contains, in the per-expert
 * spelling.  *out is allocated from a; returns the count via *n.
 */
fm_status	fm_layout_expected(const fm_config *config, const fm_allocator *a,
							   fm_tensor_spec **out, int32_t *n, fm_error *err);

/*
 * Lookup of one tensor by name for fm_layout_bind: returns its fp32 data
 * and shape, or NULL when the checkpoint has no such tensor.
 */
typedef const float *(*fm_tensor_lookup_fn) (void *arg, const char *name,
											 int32_t *ndim, int64_t *shape);

/*
 * Fills model->weights from fp32 tensors found through lookup, accepting
 * per-expert and fused expert tensors and checking every shape.  layers
 * must point to num_hidden_layers caller-owned fm_layer_weights.
 */
fm_status	fm_layout_bind(fm_model *model, fm_layer_weights *layers,
						   fm_tensor_lookup_fn lookup, void *arg, fm_error *err);

/*
 * Lookup of one tensor for fm_layout_bind_formats: like
 * fm_tensor_lookup_fn, and sets *format to the layout of the data.
 */
typedef const void *(*fm_matrix_lookup_fn) (void *arg, const char *name,
											int32_t *ndim, int64_t *shape,
											fm_weight_format *format);

/*
 * fm_layout_bind for tensors in any format.  Vectors, routers and fused
 * expert tensors must be fp32 (FM_EINVAL otherwise); the format of every
 * other matrix is taken as the lookup reports it.
 */
fm_status	fm_layout_bind_formats(fm_model *model, fm_layer_weights *layers,
								   fm_matrix_lookup_fn lookup, void *arg,
								   fm_error *err);

/*
 * Returns the format a checkpoint tensor gets when format is requested:
 * fp32 for vectors, the routers (mlp.gate.weight) and anything not 2-D,
 * else fm_matrix_format_for(format, shape[1]).
 */
fm_weight_format fm_layout_tensor_format(const char *name, int32_t ndim,
										 const int64_t *shape,
										 fm_weight_format format);

/*
 * Converts every matrix of a bound fp32 model to format (as
 * fm_layout_tensor_format decides per tensor) into one block from a,
 * returned in *storage for the caller to free after the model.  dst gets
 * the config, the vectors and routers of src (shared, not copied) and
 * layers, which must have room for num_hidden_layers entries.
 */
fm_status	fm_model_convert(const fm_model *src, fm_weight_format format,
							 const fm_allocator *a, fm_model *dst,
							 fm_layer_weights *layers, void **storage, fm_error *err);

/* Bytes of weights in the model's matrices, vectors and routers. */
size_t		fm_model_weight_bytes(const fm_model *model);

/* ---------- forward pass (src/engine/model.c) ---------- */

typedef struct fm_session fm_session;

/*
 * Bytes a session of this context length needs (KV cache, activations
 * for prompt chunks of FM_PROMPT_CHUNK rows, and the logits and sampler
 * buffers of fm_generate), so the caller can enforce a memory cap before
 * creating it.  fm_session_create allocates exactly this much, in one
 * block, and neither fm_forward nor fm_generate allocates more.  Returns
 * SIZE_MAX when the size overflows.
 */
#define FM_PROMPT_CHUNK 64
size_t		fm_session_bytes(const fm_config *config, int32_t context_len);

/*
 * Creates a session: a KV cache for context_len positions over model,
 * after fm_model_validate.  FM_EINVAL unless 1 <= context_len <=
 * max_position_embeddings.  The model must outlive the session.
 */
fm_status	fm_session_create(const fm_model *model, const fm_allocator *a,
							  int32_t context_len, fm_session **out, fm_error *err);
void		fm_session_destroy(fm_session *session);

/*
 * Restricts routing to experts with allowed[e] true (NULL: all).  An
 * excluded expert's router logit is -inf; k shrinks to the allowed count.
 * FM_EINVAL when no expert is allowed.
 */
fm_status	fm_session_set_experts(fm_session *session, const bool *allowed,
								   fm_error *err);

/*
 * Routing report: the experts the router chose for one row in one layer,
 * in the order fm_route selected them (highest weight first), with their
 * weights.  row is the row's index in its chunk of at most
 * FM_PROMPT_CHUNK rows; seq and position place it in the session.  Every
 * layer of a chunk reports all its rows before the next layer, and layer
 * 0 of a row comes first.  A chunk that is cancelled may have reported
 * some layers; the caller that starts over discards those reports.
 */
typedef void (*fm_route_fn) (void *arg, int32_t row, int32_t seq, int32_t position,
							 int32_t layer, int32_t n, const int32_t *experts,
							 const float *weights);

/* Sets the routing report of a session (fn NULL: none, the default). */
void		fm_session_set_route_hook(fm_session *session, fm_route_fn fn, void *arg);

/* Positions already in the KV cache. */
int32_t		fm_session_position(const fm_session *session);

/* Empties the KV cache (position 0). */
void		fm_session_reset(fm_session *session);

/*
 * Appends n ids at the current position and computes their hidden states,
 * processing prompts in chunks of FM_PROMPT_CHUNK rows through BLAS.  When
 * logits is not NULL it receives vocab_size logits for the last id.
 * FM_ELIMIT when position + n exceeds the context; FM_EINVAL for an id
 * outside [0, vocab_size).
 */
fm_status	fm_forward(fm_session *session, const int32_t *ids, int32_t n,
					   float *logits, fm_interrupt_fn interrupt, void *arg,
					   fm_error *err);

/* ---------- scoring and batched forward passes (src/engine/model.c) ---------- */

/*
 * Bytes of a session holding n_seq independent sequences of up to
 * context_len positions each: one KV cache per sequence, one set of
 * FM_PROMPT_CHUNK-row activations shared by all.  SIZE_MAX on overflow.
 */
size_t		fm_session_multi_bytes(const fm_config *config, int32_t n_seq,
								   int32_t context_len);

/*
 * Creates a session of n_seq sequences, each with its own KV cache of
 * context_len positions (at most max_position_embeddings).  Only
 * fm_forward_multi, the fm_session_seq_* calls, fm_session_reset and
 * fm_session_set_experts accept it; fm_forward and fm_generate need a
 * session from fm_session_create, which has one sequence.
 */
fm_status	fm_session_create_multi(const fm_model *model, const fm_allocator *a,
									int32_t n_seq, int32_t context_len,
									fm_session **out, fm_error *err);

int32_t		fm_session_seq_count(const fm_session *session);

/* Positions in the KV cache of sequence seq; -1 for a seq out of range. */
int32_t		fm_session_seq_position(const fm_session *session, int32_t seq);

/*
 * Rolls sequence seq back to position (0 <= position <= its current
 * position): later calls overwrite the cache from there, so a shared
 * prefix is computed once and each continuation starts from it.
 * fm_session_truncate is the same for sequence 0.  FM_EINVAL otherwise.
 */
fm_status	fm_session_seq_truncate(fm_session *session, int32_t seq, int32_t position,
									fm_error *err);
fm_status	fm_session_truncate(fm_session *session, int32_t position, fm_error *err);

/*
 * Appends n rows: ids[i] goes to sequence seqs[i] (seqs NULL: all to
 * sequence 0) at that sequence's next position, so rows of one sequence
 * must come in order.  Rows of all sequences share each matrix product,
 * FM_PROMPT_CHUNK rows at a time; attention reads only the row's own
 * sequence.  When hidden is not NULL it receives the hidden state of
 * every row after the final norm, [n, hidden_size].  Ids, sequences and
 * context room are checked before any row runs (FM_EINVAL, FM_ELIMIT).
 * On FM_ECANCELED the chunks that completed stay in the caches.
 */
fm_status	fm_forward_multi(fm_session *session, const int32_t *ids, const int32_t *seqs,
							 int32_t n, float *hidden, fm_interrupt_fn interrupt,
							 void *arg, fm_error *err);

/* fm_forward_multi for a one-sequence session. */
fm_status	fm_forward_hidden(fm_session *session, const int32_t *ids, int32_t n,
							  float *hidden, fm_interrupt_fn interrupt, void *arg,
							  fm_error *err);

/*
 * Log-probabilities of next tokens.  For each of n final-normed hidden
 * rows ([n, hidden_size], as fm_forward_multi returns them) computes the
 * lm_head logits and their log-softmax over the ids with sampleable[id]
 * true (NULL: every id), in double precision after fp32 logits.  Row i
 * has k targets, targets[i * k .. i * k + k); out[i * k + j] receives the
 * log-probability of targets[i * k + j]: NaN for a negative target,
 * -inf for an id outside sampleable.  scratch has room for FM_LOGPROB_ROWS *
 * vocab_size floats.  FM_EINVAL for a target id >= vocab_size.
 */
#define FM_LOGPROB_ROWS 16
fm_status	fm_token_logprobs(const fm_model *model, const bool *sampleable,
							  const float *hidden, int32_t n, const int32_t *targets,
							  int32_t k, double *out, float *scratch, fm_error *err);

/* ---------- sampling and generation (src/engine/sampler.c) ---------- */

typedef struct fm_sampler_params
{
	double		temperature;	/* 0 = greedy; must be >= 0 and finite */
	double		top_p;			/* (0, 1]; 1 = off */
	int32_t		top_k;			/* 0 = off */
	double		repetition_penalty; /* > 0 and finite; 1 = off */
	uint64_t	seed;
} fm_sampler_params;

typedef struct fm_rng
{
	uint64_t	state;
} fm_rng;

void		fm_rng_seed(fm_rng *rng, uint64_t seed);
uint64_t	fm_rng_next(fm_rng *rng);

/*
 * Picks the next id from logits[0 .. vocab_size).  Only ids with
 * sampleable[id] true can be picked (ids the tokenizer defines; padded rows
 * never); sampleable NULL allows every id.  Temperature 0 is greedy and
 * does not advance rng; greedy ties go to the lowest id.  Otherwise top_k,
 * then top_p, filter the candidates ranked by logit (ties to the lower
 * id).  scratch has room for vocab_size floats and vocab_size int32s.  Returns
 * -1 only when no id is sampleable.
 */
int32_t		fm_sample(const float *logits, const bool *sampleable, int32_t vocab_size,
					  const fm_sampler_params *params, fm_rng *rng,
					  float *scratch_f, int32_t *scratch_i);

/*
 * Penalises ids that are already in the context, by the rule of the
 * repetition_penalty of Hugging Face's generate.  The logit of every
 * distinct id in ids[0 .. n) and more[0 .. n_more) that lies in
 * [0, vocab_size) is divided by penalty when positive and multiplied by it
 * otherwise, once however often the id occurs.  A penalty above 1 makes
 * repeats less likely, below 1 more likely.  seen has vocab_size bytes,
 * all zero on entry; they are zero again on return.
 */
void		fm_repetition_penalty(float *logits, int32_t vocab_size, double penalty,
								  const int32_t *ids, int32_t n,
								  const int32_t *more, int32_t n_more, uint8_t *seen);

typedef enum fm_finish
{
	FM_FINISH_EOS = 0,			/* an end-of-sequence id was produced */
	FM_FINISH_MAX_TOKENS,		/* max_tokens ids were produced */
	FM_FINISH_LENGTH			/* the context is full */
} fm_finish;

const char *fm_finish_name(fm_finish finish);

/*
 * Runs the prompt (at least one id) through session from its current
 * position, then samples up to max_tokens ids into out, which has room
 * for max_tokens ids.  Generation stops at an eos id, which is not
 * stored, or when the context is full.  Prompt and output together never
 * exceed the context, and a full context ends with FM_FINISH_LENGTH.
 * max_tokens 0 runs the prompt and samples nothing.  The last id stored
 * is not run through the model.  A repetition_penalty other than 1 applies
 * fm_repetition_penalty over the prompt and the ids produced so far before
 * each sample.  FM_EINVAL for a negative or non-finite temperature, top_p
 * outside (0, 1], a repetition_penalty that is not positive and finite,
 * negative top_k or max_tokens.
 */
fm_status	fm_generate(fm_session *session, const int32_t *prompt, int32_t n_prompt,
						int32_t max_tokens, const fm_sampler_params *params,
						const bool *sampleable, int32_t *out, int32_t *n_out,
						fm_finish *finish, fm_interrupt_fn interrupt, void *arg,
						fm_error *err);

/* ---------- tokenizer (src/engine/tokenizer.c) ---------- */

typedef struct fm_tokenizer fm_tokenizer;

/*
 * Parses a Hugging Face tokenizer.json (byte-level BPE) into a tokenizer
 * allocated from a.  Unsupported normalizer, pre-tokenizer, model or
 * decoder types are FM_EUNSUPPORTED naming the type.  Defined in
 * src/reader/tokenizer_json.c because it uses PostgreSQL's JSON parser;
 * the tokenizer itself (below) has no PostgreSQL dependency.
 */
fm_status	fm_tokenizer_load_json(const char *json, size_t len, const fm_allocator *a,
								   fm_tokenizer **out, fm_error *err);
void		fm_tokenizer_free(fm_tokenizer *tok);

/*
 * Encodes UTF-8 text.  Special/added tokens written in the text are
 * matched only when allow_special is true; otherwise they are ordinary
 * text.  *ids is allocated from the tokenizer's allocator.
 */
fm_status	fm_tokenizer_encode(const fm_tokenizer *tok, const char *text, size_t len,
								bool allow_special, int32_t **ids, int32_t *n_ids,
								fm_error *err);

/* Options of fm_tokenizer_encode_ex. */
typedef struct fm_encode_options
{
	bool		allow_special;	/* as for fm_tokenizer_encode */
	size_t		max_ids;		/* FM_ELIMIT past this many ids; 0 = no limit */
	fm_interrupt_fn interrupt;	/* polled during long texts; may be NULL */
	void	   *interrupt_arg;
} fm_encode_options;

/*
 * Encodes like fm_tokenizer_encode, stopping with FM_ELIMIT once the
 * text yields more than max_ids ids and with FM_ECANCELED when the
 * interrupt callback returns true, so a huge text can be bounded and
 * cancelled.
 */
fm_status	fm_tokenizer_encode_ex(const fm_tokenizer *tok, const char *text, size_t len,
								   const fm_encode_options *options, int32_t **ids,
								   int32_t *n_ids, fm_error *err);

/*
 * Decodes ids to bytes (ByteLevel decoding; added tokens decode to their
 * content).  The result may end inside a multi-byte UTF-8 character; see
 * fm_utf8_complete_prefix.  *text is NUL-terminated, from the tokenizer's
 * allocator.  FM_EINVAL for an id the tokenizer does not know.
 */
fm_status	fm_tokenizer_decode(const fm_tokenizer *tok, const int32_t *ids, int32_t n_ids,
								char **text, size_t *len, fm_error *err);

/* One past the largest id the tokenizer defines. */
int32_t		fm_tokenizer_id_limit(const fm_tokenizer *tok);

/* True when the tokenizer defines id (vocabulary or added token). */
bool		fm_tokenizer_has_id(const fm_tokenizer *tok, int32_t id);

/*
 * The tokenizer image: a position-independent copy of a finished
 * tokenizer (flat arrays addressed by offsets, pattern texts included)
 * that fm_tokenizer_attach uses in place, so one image in shared memory
 * serves every process.  An image is only valid for the build that wrote
 * it; a magic number, a format version and the header size are checked.
 */

/* Bytes of the image of tok. */
size_t		fm_tokenizer_image_size(const fm_tokenizer *tok);

/*
 * Writes the image of a finished tokenizer to dst, which must be 8-byte
 * aligned and at least fm_tokenizer_image_size bytes long.
 */
fm_status	fm_tokenizer_serialize(const fm_tokenizer *tok, void *dst, size_t len,
								   fm_error *err);

/*
 * Creates a tokenizer that reads the image (len bytes, 8-byte aligned) in
 * place and never writes it.  Only the small tokenizer struct, the PCRE2
 * patterns compiled from the image's pattern texts and each call's scratch
 * memory come from a.  The image must stay mapped and unchanged until
 * fm_tokenizer_free.  FM_EINVAL for a bad magic number, version or layout.
 */
fm_status	fm_tokenizer_attach(const void *image, size_t len, const fm_allocator *a,
								fm_tokenizer **out, fm_error *err);

/* Length of the longest prefix of s[0..len) that is whole, valid UTF-8. */
size_t		fm_utf8_complete_prefix(const char *s, size_t len);

/* ---------- compute threads and BLAS (src/engine/threads.c, kernels.c) ---------- */

#define FM_MAX_THREADS	64

/*
 * Sets how many threads (the caller's included) the kernels may use,
 * from 1 to FM_MAX_THREADS; FM_EINVAL outside.  Threads are created on
 * the first kernel call that can use them, with every signal blocked,
 * and never call back into the caller.  Results are bitwise the same for
 * every thread count.  Not thread-safe: call it from the thread that runs
 * the engine.
 */
fm_status	fm_set_threads(int32_t n, fm_error *err);
int32_t		fm_get_threads(void);

/*
 * The cblas_sgemm signature (enum arguments passed as int).  fm_matmul
 * calls it for prompt chunks as (RowMajor 101, NoTrans 111, Trans 112).
 */
typedef void (*fm_sgemm_fn) (int order, int trans_a, int trans_b,
							 int m, int n, int k, float alpha,
							 const float *a, int lda, const float *b, int ldb,
							 float beta, float *c, int ldc);

/*
 * Sets the sgemm that fm_matmul uses for several rows; NULL falls back to
 * one fm_matvec per row.  The standalone build (tools and unit tests)
 * starts with OpenBLAS's cblas_sgemm; the PostgreSQL module starts with
 * none and sets it after loading OpenBLAS in a backend.
 */
void		fm_set_sgemm(fm_sgemm_fn fn);

/*
 * Rows of a matrix product from which sgemm is used.  Below it, a C loop
 * that reads each weight row once is as fast (the product is bound by
 * reading the weights), and a connection that only runs short prompts
 * never loads the BLAS library.
 */
#define FM_SGEMM_MIN_ROWS 8

/*
 * Sets a callback that fm_matmul calls once, on the engine's thread, the
 * first time it has FM_SGEMM_MIN_ROWS rows or more and no sgemm; the
 * callback may call fm_set_sgemm.  The PostgreSQL module loads OpenBLAS
 * this way, so short calls never pay for loading it.
 */
typedef void (*fm_sgemm_loader_fn) (void);
void		fm_set_sgemm_loader(fm_sgemm_loader_fn loader);

#endif							/* FLEXMORE_ENGINE_H */
