/*-------------------------------------------------------------------------
 *
 * flexmore.h
 *	  Declarations shared by the PostgreSQL side of flexmore: settings,
 *	  error mapping, allocation, storage access and the per-backend model
 *	  cache.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_H
#define FLEXMORE_H

#include "postgres.h"

#include "engine/engine.h"
#include "utils/array.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

/* ---------- settings (flexmore.c) ---------- */

extern int	flexmore_max_context;
extern int	flexmore_max_call_memory;	/* kB */

/* ---------- shared helpers (flexmore.c) ---------- */

/*
 * Raises err as an ERROR with the SQLSTATE its status maps to.  what, when
 * not NULL, is prefixed to the message (a file or model name).
 */
extern void fm_raise(const fm_error *err, const char *what) pg_attribute_noreturn();

/* Fills a with an allocator over cxt that returns NULL on failure. */
extern void fm_allocator_init(fm_allocator *a, MemoryContext cxt);

/*
 * Interrupt callback for the engine: true when an interrupt is pending.
 * After the engine returns FM_ECANCELED the caller runs
 * CHECK_FOR_INTERRUPTS(), which raises the cancel or terminate error.
 */
extern bool fm_interrupt_pending(void *arg);

/*
 * Switches the current user to the extension owner, so the storage
 * tables can be read and written without privileges of the caller.
 * fm_restore_user undoes it; callers restore in PG_FINALLY.
 */
typedef struct fm_user_switch
{
	Oid			saved_user;
	int			saved_sec_context;
} fm_user_switch;

extern void fm_switch_to_owner(fm_user_switch *sw);
extern void fm_restore_user(const fm_user_switch *sw);

/*
 * Converts text in the database encoding to a palloc'd, NUL-terminated
 * UTF-8 copy.  Raises an error when the result is not valid UTF-8.
 */
extern char *fm_text_to_utf8(const char *s, int len, int *out_len);

/*
 * Builds a text datum in the database encoding from bytes the tokenizer
 * decoded: a multi-byte character cut at the end is dropped, other
 * invalid UTF-8 and NUL bytes become U+FFFD, and characters the database
 * encoding cannot represent become '?'.
 */
extern text *fm_utf8_to_text(const char *s, size_t len);

/*
 * Returns name for an error message: itself when it is at most
 * NAMEDATALEN - 1 bytes, else a palloc'd copy cut at a character boundary
 * within that length and followed by "...", so a huge argument cannot
 * flood the client and the server log.
 */
extern const char *fm_quote_name(const char *name);

/* ---------- storage (storage.c) ---------- */

#define FM_CHUNK_RAW_MAX	((size_t) 64 * 1024 * 1024)

/*
 * Header at the start of every flexmore.tensor_chunks.data value, stored
 * little-endian.  raw_len is the byte count after decompression and
 * stored_len the payload byte count that follows the header.
 */
#define FM_CHUNK_MAGIC		0x4b43464du	/* "MFCK" read as little-endian */
#define FM_CHUNK_VERSION	1
#define FM_CHUNK_COMPRESSED	0x0001

typedef struct fm_chunk_header
{
	uint32		magic;
	uint16		version;
	uint16		flags;
	uint32		raw_len;
	uint32		stored_len;
} fm_chunk_header;

/* A model row as the inference functions need it. */
typedef struct fm_model_row
{
	int64		id;
	int64		generation;
	TimestampTz created;
	char	   *config_json;
} fm_model_row;

/*
 * Callers of the fm_storage_* functions hold an SPI connection and run as
 * the extension owner (fm_switch_to_owner).
 */
extern bool fm_storage_find_model(const char *name, fm_model_row *row);
extern int64 fm_storage_insert_model(const char *name, const char *architecture,
									 const char *config_json, int64 generation);
extern void fm_storage_finish_model(int64 model_id, int64 parameters,
									int64 raw_bytes, int64 stored_bytes);
extern bool fm_storage_delete_model(const char *name, int64 *generation);
extern void fm_storage_insert_expert(int64 model_id, int expert_index,
									 const char *name, int rank);
extern void fm_storage_insert_tokenizer(int64 model_id, const char *json);
extern char *fm_storage_read_tokenizer(int64 model_id, const char *model_name);
extern int64 fm_storage_insert_tensor(int64 model_id, const char *name, int expert_index,
									  fm_dtype dtype, int ndim, const int64 *shape,
									  int64 raw_bytes);
extern void fm_storage_set_checksum(int64 tensor_id, const uint8 *sha256);
extern int64 fm_storage_insert_chunk(int64 tensor_id, int seq,
									 const char *raw, size_t raw_len);

/* Expert names of a model in index order, palloc'd in the current context. */
extern char **fm_storage_read_experts(int64 model_id, int *n);

/* One stored tensor, as listed by fm_storage_list_tensors. */
typedef struct fm_stored_tensor
{
	int64		id;
	char	   *name;
	fm_dtype	dtype;
	int32		ndim;
	int64		shape[FM_MAX_DIMS];
	int64		raw_bytes;
	uint8		checksum[32];
} fm_stored_tensor;

extern fm_stored_tensor *fm_storage_list_tensors(int64 model_id, int *n);

/*
 * Reads a tensor's chunks in order, checks each chunk header, decompresses
 * and widens the elements into dst (raw_bytes / dtype size floats), then
 * checks the SHA-256 of the raw bytes against the stored checksum.
 */
extern void fm_storage_read_tensor(const fm_stored_tensor *t, const char *model_name,
								   float *dst);

/* ---------- per-backend model cache (model_load.c) ---------- */

/*
 * A model as one backend caches it.  Everything lives in cxt, a child of
 * TopMemoryContext that is deleted when the model is dropped or
 * re-imported.  weights_loaded is false until the first call that needs
 * the forward pass; the tokenizer and expert names are loaded with the
 * entry.
 */
typedef struct fm_cached_model
{
	char	   *name;
	int64		id;
	int64		generation;
	TimestampTz created;
	MemoryContext cxt;
	fm_allocator allocator;
	fm_model	model;
	fm_layer_weights *layers;
	bool		weights_loaded;
	fm_tokenizer *tokenizer;
	int32		id_limit;		/* one past the tokenizer's largest id */
	bool	   *sampleable;		/* [vocab_size] */
	int			num_experts;
	char	  **expert_names;	/* [num_experts] */
	struct fm_cached_model *next;

	/* shared weight cache: pins and bound items, private to model_load.c */
	struct fm_cache_binding *binding;
} fm_cached_model;

/*
 * Returns the current version of the named model, reading it from the
 * tables when this backend has none or an older generation.  With
 * need_weights the weights are loaded and converted to fp32 too.
 * Raises 42704 when the model does not exist.
 */
extern fm_cached_model *fm_model_get(const char *name, bool need_weights);

/*
 * Forgets the named model in this backend, if held, and invalidates its
 * shared-cache items when the current transaction commits.
 */
extern void fm_model_forget(const char *name);

/* ---------- shared weight cache (model_load.c, cache.c) ---------- */

/*
 * Makes the weights of the experts with allowed[e] true (NULL: all)
 * usable through entry->model for the current call.  With the shared
 * cache it pins the shared part, those experts and expert 0 when a
 * low-rank expert needs it, loading what is absent; the other experts'
 * pointers then lead to inaccessible memory, so the session must be
 * restricted to allowed (fm_session_set_experts).  The pins last until
 * fm_model_release or the end of the statement.  Without the shared
 * cache it loads every weight into this backend, once.  Raises 53200 when
 * the cache cannot hold the items.
 */
extern void fm_model_use_weights(fm_cached_model *entry, const bool *allowed);

/* Unpins what fm_model_use_weights pinned for this call; cannot fail. */
extern void fm_model_release(fm_cached_model *entry);

/* Forgets the named model in this backend only; true if it was held. */
extern bool fm_model_forget_private(const char *name);

/* ---------- helpers of the SQL functions (functions.c) ---------- */

extern int32 *fm_encode_text(fm_cached_model *entry, text *input, bool allow_special,
							 int *n);

/*
 * Encodes a prompt that must fit in the call's context, stopping as soon
 * as it has more tokens than that (54000, naming what).
 */
extern int32 *fm_encode_prompt(fm_cached_model *entry, text *input, const char *what,
							   int *n);
extern text *fm_decode_ids(fm_cached_model *entry, const int32 *ids, int n);
extern void fm_check_token_id(const fm_cached_model *entry, int32 id);
extern int32 *fm_array_to_ids(ArrayType *array, const char *argname, int *n);

/* Raises 2202E when an array argument has more than one dimension. */
extern void fm_check_array_1d(ArrayType *array, const char *argname);

/* ---------- import, large objects and experts (import.c, import_lo.c, experts.c) ---------- */

/* Defines flexmore.admin_role; _PG_init calls it. */
extern void fm_import_define_settings(void);

/* ---------- checks of the inference calls, for classify.c (inference.c) ---------- */

/* The smaller of flexmore.max_context and the model's max_position_embeddings. */
extern int32 fm_call_context_limit(const fm_cached_model *entry);

/* Raises 54000 when n tokens of what ("prompt", "input") exceed the context limit. */
extern void fm_call_check_length(const fm_cached_model *entry, int n, const char *what);

/*
 * Fills allowed[num_experts] from an experts argument (NULL: every
 * expert), raising the errors documented for experts in docs/sql.md.
 */
extern void fm_call_experts_mask(const fm_cached_model *entry, ArrayType *experts,
								 bool *allowed);

/*
 * Creates a session for context_len tokens restricted to allowed, after
 * checking it against flexmore.max_call_memory (54000).
 */
extern fm_session *fm_call_create_session(const fm_cached_model *entry, const fm_allocator *a,
										  int32 context_len, const bool *allowed);

/* ---------- expert governance (governance.c) ---------- */

/*
 * True when the governance objects of version 0.2.0 exist; until ALTER
 * EXTENSION flexmore UPDATE a 0.1.0 installation has none, and every
 * expert is usable by every role.
 */
extern bool fm_governance_installed(void);

/* Defines flexmore.expert_access; _PG_init calls it. */
extern void fm_governance_define_settings(void);

/*
 * Fills allowed[num_experts] with the experts of named (NULL: every
 * expert) that the calling role may use now: enabled, with consent
 * granted, and granted to the role, PUBLIC or a role it has the
 * privileges of.  flexmore.expert_access decides whether an expert left
 * out for lack of a grant is dropped or raises 42501.  Raises an error
 * when no expert is left.
 */
extern void fm_governance_apply(const fm_cached_model *entry, const bool *named, bool *allowed);

/*
 * The governance of a model's experts (metadata, state, grants), read
 * before a re-import deletes them and written back to the experts of the
 * same names afterwards, so replacing a model neither opens nor closes
 * access.  Both run inside SPI as the extension owner.
 */
typedef struct fm_governance_saved fm_governance_saved;
extern fm_governance_saved *fm_governance_save(const char *model_name);
extern void fm_governance_restore(const fm_governance_saved *saved, int64 model_id);

/* ---------- routing audit and usage counters (audit.c) ---------- */

/*
 * The routing report of one call.  tokens[e] counts the token positions
 * routed to expert e in at least one layer; seen marks, per chunk row,
 * the experts already counted for that row's position.  With
 * record_experts set, the choices of sequence 0 are also kept for
 * record_positions positions: [position][layer][record_k].
 */
typedef struct fm_route_tally
{
	int			num_experts;
	int64		tokens[FM_MAX_EXPERTS];
	bool		seen[FM_PROMPT_CHUNK][FM_MAX_EXPERTS];

	int32		record_positions;
	int32		record_layers;
	int32		record_k;
	int32	   *record_experts;
	float	   *record_weights;
	int32	   *record_counts;	/* [position][layer]: experts chosen */
} fm_route_tally;

extern void fm_usage_shmem_request(void);
extern void fm_usage_shmem_startup(void);

/* Empties tally for a call on entry, recording nothing. */
extern void fm_usage_begin(fm_route_tally *tally, const fm_cached_model *entry);

/* Makes session report its routing into tally. */
extern void fm_usage_attach(fm_route_tally *tally, fm_session *session);

/* Forgets the counts of a call that starts over after an interrupt. */
extern void fm_usage_restart(fm_route_tally *tally);

/*
 * Adds the counts of part, one finished piece of a call, to call and
 * empties part for the next piece.
 */
extern void fm_usage_merge(fm_route_tally *call, fm_route_tally *part);

/* Adds a finished call's counts to the calling role's usage counters. */
extern void fm_usage_commit(const fm_route_tally *tally, const fm_cached_model *entry);

/* Storage functions that change a stored model (storage.c); same contract as above. */
extern void fm_storage_read_tensor_bytes(const fm_stored_tensor *t, const char *model_name,
										 char *dst);
extern bool fm_storage_lock_model(const char *name, fm_model_row *row, char **architecture);
extern void fm_storage_read_expert_ranks(int64 model_id, int *n, char ***names, int **ranks);
extern void fm_storage_replace_experts(int64 model_id, int n, char **names, const int *ranks);
extern void fm_storage_delete_tensor(int64 tensor_id);
extern void fm_storage_delete_expert_tensors(int64 model_id, int expert_index);
extern void fm_storage_shift_expert_tensors(int64 model_id, int removed);
extern void fm_storage_update_model(int64 model_id, const char *config_json,
									const char *architecture);

#endif							/* FLEXMORE_H */
