/*-------------------------------------------------------------------------
 *
 * session.h
 *	  Layout of an inference session, shared by model.c (which owns it)
 *	  and sampler.c (which reads the model and the generation buffers).
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_SESSION_H
#define FLEXMORE_SESSION_H

#include "engine/engine.h"

struct fm_session
{
	const fm_model *model;
	fm_allocator allocator;
	int32_t		context_len;
	int32_t		position;		/* positions already in the KV cache */
	bool		allowed[FM_MAX_EXPERTS];
	int32_t		max_rank;		/* largest adapter rank, 0 without adapters */
	fm_route_fn route_hook;		/* routing report, NULL for none */
	void	   *route_arg;

	/* KV cache, k after QK-norm and RoPE */
	float	   *k_cache;		/* [layers, context_len, kv_heads*head_dim] */
	float	   *v_cache;		/* [layers, context_len, kv_heads*head_dim] */

	/* activations of one chunk of C = FM_PROMPT_CHUNK rows */
	float	   *x;				/* [C, hidden] residual stream */
	float	   *q;				/* [C, heads*head_dim] */
	float	   *k;				/* [C, kv_heads*head_dim] */
	float	   *v;				/* [C, kv_heads*head_dim] */
	float	   *att;			/* [C, heads*head_dim] attention output */
	float	   *proj;			/* [C, hidden] o_proj output */
	float	   *scores;			/* [heads][length] one row's attention weights */
	float	   *router;			/* [C, num_experts] router logits */
	float	   *probs;			/* [num_experts] routing scratch */
	int32_t    *top_expert;		/* [C, num_experts_per_tok] */
	float	   *top_weight;		/* [C, num_experts_per_tok] */
	int32_t    *n_top;			/* [C] experts kept per row */
	int32_t    *shared_rows;	/* [C] rows that need g0 and u0 */
	int32_t    *expert_rows;	/* [C] rows routed to one expert */
	float	   *expert_p;		/* [C] their routing weights */
	float	   *xs;				/* [C, hidden] rows needing the public FFN */
	float	   *xe;				/* [C, hidden] rows routed to one expert */
	float	   *gate0;			/* [C, inter] W_gate,0 x */
	float	   *up0;			/* [C, inter] W_up,0 x */
	float	   *hsum;			/* [C, inter] sum of p_e h_e into W_down,0 */
	float	   *gate;			/* [C, inter] one expert's gate, then h_e */
	float	   *up;				/* [C, inter] one expert's up */
	float	   *lowrank;		/* [C, max_rank] A x */
	float	   *down;			/* [C, hidden] one expert's output */
	float	   *moe;			/* [C, hidden] MoE output */
	float	   *last;			/* [hidden] final-norm output */

	/* generation buffers, used by fm_generate */
	float	   *logits;			/* [vocab] next-token logits */
	float	   *sample_f;		/* [vocab] sampler scratch */
	int32_t    *sample_i;		/* [vocab] sampler scratch */
	uint8_t    *seen;			/* [vocab] zero between calls; see fm_repetition_penalty */

	/*
	 * Several sequences in one session (fm_session_create_multi).  Sequence
	 * j owns cache slots [j * context_len, (j + 1) * context_len) of every
	 * layer.  A session from fm_session_create has n_seq 1 and keeps its
	 * position in the field above; seq_position is then unused.
	 */
	int32_t		n_seq;
	int32_t		cache_slots;	/* n_seq * context_len: KV rows per layer */
	int32_t    *seq_position;	/* [n_seq] positions in each sequence */
	int32_t    *row_base;		/* [C] first cache slot of each chunk row's sequence */
	int32_t    *row_pos;		/* [C] position of each chunk row in its sequence */
	uint8_t    *mm_scratch;		/* activations encoded by fm_matmul_w, C rows */
};

#endif							/* FLEXMORE_SESSION_H */
