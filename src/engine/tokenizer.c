/*-------------------------------------------------------------------------
 *
 * tokenizer.c
 *	  Byte-level BPE tokenizer with the encoding rules of Hugging Face
 *	  tokenizers (the library that reads tokenizer.json files).
 *
 * Encoding runs in four stages:
 *	1. With allow_special, added tokens ("<|endoftext|>") are cut out of the
 *	   text first, leftmost-longest; without it they are ordinary text.
 *	2. The pre-tokenizer steps (Split with a PCRE2 pattern, then ByteLevel)
 *	   cut each remaining segment into pieces.
 *	3. Each piece, as raw bytes, starts as one symbol per byte.
 *	4. Rank-based BPE merges the adjacent pair with the lowest merge rank,
 *	   leftmost among equals, until no pair has a rule.
 *
 * The vocabulary of a tokenizer.json spells each byte as one printable
 * character (the GPT-2 "bytes to unicode" table).  The tokenizer converts
 * every entry back to raw bytes at load time, so encoding hashes byte
 * strings and decoding copies bytes, and the table is needed nowhere else.
 *
 * All memory, PCRE2's included, comes from the allocator given at creation,
 * except the executable memory of PCRE2's JIT compiler, which PCRE2 maps
 * itself.  A finished tokenizer is read-only, so concurrent encode and
 * decode calls on one tokenizer are safe.
 *
 *-------------------------------------------------------------------------
 */
#define PCRE2_CODE_UNIT_WIDTH 8

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <pcre2.h>

#include "engine/engine.h"
#include "engine/tokenizer_internal.h"

/* Ids index a table directly, so a corrupt file must not ask for 2^31. */
#define FM_TOKEN_ID_MAX		((1 << 24) - 1)
#define FM_MAX_PRETOK_STEPS 8

/* Code points of the byte-level alphabet are all below 256 + 68. */
#define FM_BYTE_LEVEL_CPS	324

/* The pattern Hugging Face's ByteLevel pre-tokenizer uses with use_regex. */
static const char gpt2_pattern[] =
"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/*
 * Bytes that one id decodes to, in the pool.  len is 0 for an id the
 * tokenizer does not know, because every known token has at least one byte.
 */
typedef struct fm_token_entry
{
	uint32_t	offset;
	uint32_t	len;
} fm_token_entry;

/* Vocabulary hash slot mapping raw token bytes to an id (id -1: free). */
typedef struct fm_vocab_slot
{
	uint32_t	offset;
	uint32_t	len;
	uint32_t	hash;
	int32_t		id;
} fm_vocab_slot;

/* Merge hash slot mapping (left id, right id) to rank and merged id (rank -1: free). */
typedef struct fm_merge_slot
{
	uint64_t	key;
	int32_t		rank;
	int32_t		merged;
} fm_merge_slot;

typedef struct fm_special
{
	uint32_t	offset;
	uint32_t	len;
	int32_t		id;
	bool		lstrip;
	bool		rstrip;
} fm_special;

typedef enum fm_pretok_kind
{
	FM_PRETOK_SPLIT,
	FM_PRETOK_BYTE_LEVEL
} fm_pretok_kind;

typedef struct fm_pretok_step
{
	fm_pretok_kind kind;
	pcre2_code *code;			/* Split, or ByteLevel with use_regex */
	fm_split_behavior behavior;
	bool		invert;
	bool		add_prefix_space;	/* ByteLevel only */
	bool		literal;		/* the pattern is a plain string */
	uint32_t	pattern_offset; /* pattern text in the pool, for images */
	uint32_t	pattern_len;
} fm_pretok_step;

struct fm_tokenizer
{
	fm_allocator alloc;
	pcre2_general_context *pcre_gc;
	pcre2_compile_context *pcre_cc;

	/*
	 * The image an attached tokenizer reads in place (fm_tokenizer_attach).
	 * Then pool, tokens, vocab, merges and specials point into it and are
	 * never written or freed; NULL for a tokenizer built by the loader.
	 */
	const void *image;

	/* bytes of vocabulary entries, added tokens and split patterns */
	char	   *pool;
	uint64_t	pool_len;
	uint64_t	pool_cap;

	fm_token_entry *tokens;		/* [tokens_cap], indexed by id */
	int32_t		tokens_cap;
	int32_t		id_limit;

	fm_vocab_slot *vocab;		/* [vocab_mask + 1] */
	uint32_t	vocab_mask;
	int32_t		vocab_count;

	fm_merge_slot *merges;		/* [merges_mask + 1] */
	uint32_t	merges_mask;
	int32_t		merges_count;
	int32_t		next_rank;

	int32_t		byte_ids[256];	/* id of each single byte, -1 when absent */
	int16_t		cp_to_byte[FM_BYTE_LEVEL_CPS];	/* byte-level character -> byte */

	fm_special *specials;		/* sorted by first byte, longest first */
	int32_t		n_specials;
	int32_t		specials_cap;
	int32_t		special_first[257];	/* specials of first byte b: [b], [b+1]) */

	fm_pretok_step steps[FM_MAX_PRETOK_STEPS];
	int32_t		n_steps;

	bool		ignore_merges;
	bool		finished;
};

/* ---------- small helpers ---------- */

static void *
tok_alloc(const fm_tokenizer *tok, size_t size, fm_error *err)
{
	void	   *p = fm_alloc(&tok->alloc, size);

	if (p == NULL)
		fm_set_error(err, FM_ENOMEM, "out of memory allocating %zu bytes for the tokenizer",
					 size);
	return p;
}

/*
 * Grows *buf (elem-sized items, *cap of them) to hold need items.  The
 * allocator has no realloc, so growth copies.
 */
static fm_status
tok_grow(const fm_tokenizer *tok, void **buf, size_t *cap, size_t need,
		 size_t elem, fm_error *err)
{
	size_t		newcap;
	void	   *p;

	if (need <= *cap)
		return FM_OK;
	newcap = *cap < 16 ? 16 : *cap;
	while (newcap < need)
		newcap *= 2;
	p = tok_alloc(tok, newcap * elem, err);
	if (p == NULL)
		return FM_ENOMEM;
	if (*buf != NULL)
	{
		memcpy(p, *buf, *cap * elem);
		fm_free(&tok->alloc, *buf);
	}
	*buf = p;
	*cap = newcap;
	return FM_OK;
}

static uint32_t
hash_bytes(const char *s, size_t len)
{
	uint64_t	h = 14695981039346656037ULL;	/* FNV-1a */

	for (size_t i = 0; i < len; i++)
	{
		h ^= (unsigned char) s[i];
		h *= 1099511628211ULL;
	}
	return (uint32_t) (h ^ (h >> 32));
}

static uint32_t
hash_pair(uint64_t key)
{
	key ^= key >> 33;			/* the splitmix64 finalizer */
	key *= 0xff51afd7ed558ccdULL;
	key ^= key >> 33;
	key *= 0xc4ceb9fe1a85ec53ULL;
	key ^= key >> 33;
	return (uint32_t) key;
}

static inline uint64_t
pair_key(int32_t left, int32_t right)
{
	return ((uint64_t) (uint32_t) left << 32) | (uint32_t) right;
}

/*
 * Returns the length of the valid UTF-8 character at s (at most avail
 * bytes), or 0 when the bytes there are not one; *cp receives the code
 * point.  Overlong forms, surrogates and values past U+10FFFF are invalid.
 */
static int
utf8_char(const unsigned char *s, size_t avail, uint32_t *cp)
{
	unsigned char c = s[0];
	int			n;
	uint32_t	v;
	uint32_t	min;

	if (c < 0x80)
	{
		*cp = c;
		return 1;
	}
	if (c >= 0xC2 && c <= 0xDF)
	{
		n = 2;
		v = c & 0x1F;
		min = 0x80;
	}
	else if (c >= 0xE0 && c <= 0xEF)
	{
		n = 3;
		v = c & 0x0F;
		min = 0x800;
	}
	else if (c >= 0xF0 && c <= 0xF4)
	{
		n = 4;
		v = c & 0x07;
		min = 0x10000;
	}
	else
		return 0;
	if (avail < (size_t) n)
		return 0;
	for (int i = 1; i < n; i++)
	{
		if ((s[i] & 0xC0) != 0x80)
			return 0;
		v = (v << 6) | (s[i] & 0x3F);
	}
	if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
		return 0;
	*cp = v;
	return n;
}

size_t
fm_utf8_complete_prefix(const char *s, size_t len)
{
	size_t		i = 0;

	while (i < len)
	{
		uint32_t	cp;
		int			n = utf8_char((const unsigned char *) s + i, len - i, &cp);

		if (n == 0)
			break;
		i += n;
	}
	return i;
}

/* Unicode White_Space, which Rust's char::is_whitespace also uses. */
static bool
is_unicode_space(uint32_t cp)
{
	return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 ||
		cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
		cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
		cp == 0x3000;
}

/*
 * Fills the GPT-2 byte-level table: the code point that spells each byte.
 * Printable Latin-1 bytes spell themselves; the other 68 bytes take code
 * points 256 and up, in byte order.
 */
static void
byte_level_table(uint32_t byte_to_cp[256])
{
	uint32_t	extra = 256;

	for (int b = 0; b < 256; b++)
	{
		bool		printable = (b >= 0x21 && b <= 0x7E) ||
			(b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);

		byte_to_cp[b] = printable ? (uint32_t) b : extra++;
	}
}

/*
 * Converts a byte-level string to raw bytes in out (room for len bytes).
 * Returns the byte count, or -1 when a character is not in the table.
 */
static int64_t
byte_level_to_bytes(const fm_tokenizer *tok, const char *s, size_t len, char *out)
{
	size_t		i = 0;
	int64_t		n = 0;

	while (i < len)
	{
		uint32_t	cp;
		int			k = utf8_char((const unsigned char *) s + i, len - i, &cp);

		if (k == 0 || cp >= FM_BYTE_LEVEL_CPS || tok->cp_to_byte[cp] < 0)
			return -1;
		out[n++] = (char) tok->cp_to_byte[cp];
		i += k;
	}
	return n;
}

/* ---------- PCRE2 memory through the fm_allocator ---------- */

static void *
pcre_malloc(size_t size, void *data)
{
	return fm_alloc((const fm_allocator *) data, size);
}

static void
pcre_free(void *ptr, void *data)
{
	if (ptr != NULL)
		fm_free((const fm_allocator *) data, ptr);
}

/* ---------- building ---------- */

fm_status
fm_tokenizer_create(const fm_allocator *a, fm_tokenizer **out, fm_error *err)
{
	fm_tokenizer *tok;
	uint32_t	table[256];

	*out = NULL;
	tok = fm_alloc_zero(a, sizeof(fm_tokenizer));
	if (tok == NULL)
		return fm_set_error(err, FM_ENOMEM, "out of memory allocating the tokenizer");
	tok->alloc = *a;
	for (int b = 0; b < 256; b++)
		tok->byte_ids[b] = -1;
	byte_level_table(table);
	for (int c = 0; c < FM_BYTE_LEVEL_CPS; c++)
		tok->cp_to_byte[c] = -1;
	for (int b = 0; b < 256; b++)
		tok->cp_to_byte[table[b]] = (int16_t) b;

	tok->pcre_gc = pcre2_general_context_create(pcre_malloc, pcre_free, &tok->alloc);
	if (tok->pcre_gc != NULL)
		tok->pcre_cc = pcre2_compile_context_create(tok->pcre_gc);
	if (tok->pcre_cc == NULL)
	{
		fm_tokenizer_free(tok);
		return fm_set_error(err, FM_ENOMEM, "out of memory creating the PCRE2 contexts");
	}
	*out = tok;
	return FM_OK;
}

void
fm_tokenizer_free(fm_tokenizer *tok)
{
	fm_allocator a;

	if (tok == NULL)
		return;
	a = tok->alloc;
	for (int i = 0; i < tok->n_steps; i++)
		pcre2_code_free(tok->steps[i].code);
	pcre2_compile_context_free(tok->pcre_cc);
	pcre2_general_context_free(tok->pcre_gc);
	if (tok->image != NULL)
	{
		fm_free(&a, tok);
		return;
	}
	if (tok->pool)
		fm_free(&a, tok->pool);
	if (tok->tokens)
		fm_free(&a, tok->tokens);
	if (tok->vocab)
		fm_free(&a, tok->vocab);
	if (tok->merges)
		fm_free(&a, tok->merges);
	if (tok->specials)
		fm_free(&a, tok->specials);
	fm_free(&a, tok);
}

bool
fm_split_behavior_parse(const char *name, fm_split_behavior *out)
{
	static const struct
	{
		const char *name;
		fm_split_behavior behavior;
	}			names[] = {
		{"Removed", FM_SPLIT_REMOVED},
		{"Isolated", FM_SPLIT_ISOLATED},
		{"MergedWithPrevious", FM_SPLIT_MERGED_WITH_PREVIOUS},
		{"MergedWithNext", FM_SPLIT_MERGED_WITH_NEXT},
		{"Contiguous", FM_SPLIT_CONTIGUOUS},
	};

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
	{
		if (strcmp(name, names[i].name) == 0)
		{
			*out = names[i].behavior;
			return true;
		}
	}
	return false;
}

/*
 * Appends bytes to the pool; *offset receives where they start.  Offsets
 * are 32-bit, so the pool contains at most UINT32_MAX bytes.
 */
static fm_status
pool_append(fm_tokenizer *tok, const char *s, size_t len, uint32_t *offset,
			fm_error *err)
{
	size_t		cap = tok->pool_cap;
	fm_status	st;

	if (len > UINT32_MAX - tok->pool_len)
		return fm_set_error(err, FM_ELIMIT,
							"the tokenizer's strings exceed %u bytes", UINT32_MAX);
	st = tok_grow(tok, (void **) &tok->pool, &cap, tok->pool_len + len + 1, 1, err);
	if (st != FM_OK)
		return st;
	tok->pool_cap = cap;
	memcpy(tok->pool + tok->pool_len, s, len);
	*offset = (uint32_t) tok->pool_len;
	tok->pool_len += len;
	return FM_OK;
}

/* Makes tokens[id] exist and raises id_limit past id. */
static fm_status
reserve_id(fm_tokenizer *tok, int32_t id, fm_error *err)
{
	size_t		cap = (size_t) tok->tokens_cap;
	size_t		old = cap;
	fm_status	st;

	if (id < 0 || id > FM_TOKEN_ID_MAX)
		return fm_set_error(err, FM_EINVAL, "token id %d is outside the range 0 to %d",
							id, FM_TOKEN_ID_MAX);
	st = tok_grow(tok, (void **) &tok->tokens, &cap, (size_t) id + 1,
				  sizeof(fm_token_entry), err);
	if (st != FM_OK)
		return st;
	if (cap > old)
		memset(tok->tokens + old, 0, (cap - old) * sizeof(fm_token_entry));
	tok->tokens_cap = (int32_t) cap;
	if (id >= tok->id_limit)
		tok->id_limit = id + 1;
	return FM_OK;
}

static int32_t
vocab_lookup(const fm_tokenizer *tok, const char *s, size_t len)
{
	uint32_t	h = hash_bytes(s, len);
	uint32_t	i;

	if (tok->vocab == NULL)
		return -1;
	for (i = h & tok->vocab_mask;; i = (i + 1) & tok->vocab_mask)
	{
		const fm_vocab_slot *slot = &tok->vocab[i];

		if (slot->id < 0)
			return -1;
		if (slot->hash == h && slot->len == len &&
			memcmp(tok->pool + slot->offset, s, len) == 0)
			return slot->id;
	}
}

/* Inserts without a duplicate check, so the table must have a free slot. */
static void
vocab_put(fm_vocab_slot *table, uint32_t mask, const fm_vocab_slot *entry)
{
	uint32_t	i;

	for (i = entry->hash & mask; table[i].id >= 0; i = (i + 1) & mask)
		;
	table[i] = *entry;
}

/* Keeps the vocabulary table at most half full. */
static fm_status
vocab_reserve(fm_tokenizer *tok, fm_error *err)
{
	uint32_t	size = tok->vocab ? tok->vocab_mask + 1 : 0;
	uint32_t	newsize;
	fm_vocab_slot *table;

	if ((uint64_t) (tok->vocab_count + 1) * 2 <= size)
		return FM_OK;
	newsize = size ? size * 2 : 1024;
	table = fm_alloc_zero(&tok->alloc, (size_t) newsize * sizeof(fm_vocab_slot));
	if (table == NULL)
		return fm_set_error(err, FM_ENOMEM, "out of memory allocating %zu bytes for the tokenizer",
							(size_t) newsize * sizeof(fm_vocab_slot));
	for (uint32_t i = 0; i < newsize; i++)
		table[i].id = -1;
	for (uint32_t i = 0; i < size; i++)
		if (tok->vocab[i].id >= 0)
			vocab_put(table, newsize - 1, &tok->vocab[i]);
	if (tok->vocab)
		fm_free(&tok->alloc, tok->vocab);
	tok->vocab = table;
	tok->vocab_mask = newsize - 1;
	return FM_OK;
}

fm_status
fm_tokenizer_add_vocab(fm_tokenizer *tok, const char *token, size_t len,
					   int32_t id, fm_error *err)
{
	char		stackbuf[256];
	char	   *bytes = stackbuf;
	int64_t		nbytes;
	uint32_t	offset;
	fm_status	st;

	if (len == 0)
		return fm_set_error(err, FM_EINVAL, "vocabulary entry with id %d is an empty string", id);
	if (len > UINT32_MAX)
		return fm_set_error(err, FM_EINVAL, "vocabulary entry with id %d is %zu bytes long",
							id, len);
	st = reserve_id(tok, id, err);
	if (st != FM_OK)
		return st;
	if (tok->tokens[id].len > 0)
		return fm_set_error(err, FM_EINVAL, "token id %d appears twice in the vocabulary", id);

	if (len > sizeof(stackbuf))
	{
		bytes = tok_alloc(tok, len, err);
		if (bytes == NULL)
			return FM_ENOMEM;
	}
	nbytes = byte_level_to_bytes(tok, token, len, bytes);

	if (nbytes < 0)
	{
		/*
		 * Not a byte-level string, so no piece of text can spell it.  Hugging
		 * Face's ByteLevel decoder emits such a token's UTF-8 unchanged.
		 */
		st = pool_append(tok, token, len, &offset, err);
		if (st == FM_OK)
		{
			tok->tokens[id].offset = offset;
			tok->tokens[id].len = (uint32_t) len;
		}
	}
	else if (vocab_lookup(tok, bytes, (size_t) nbytes) >= 0)
		st = fm_set_error(err, FM_EINVAL, "vocabulary entry \"%.*s\" (id %d) appears twice",
						  (int) (len > 64 ? 64 : len), token, id);
	else if ((st = vocab_reserve(tok, err)) == FM_OK &&
			 (st = pool_append(tok, bytes, (size_t) nbytes, &offset, err)) == FM_OK)
	{
		fm_vocab_slot slot;

		slot.offset = offset;
		slot.len = (uint32_t) nbytes;
		slot.hash = hash_bytes(bytes, (size_t) nbytes);
		slot.id = id;
		vocab_put(tok->vocab, tok->vocab_mask, &slot);
		tok->vocab_count++;
		tok->tokens[id].offset = offset;
		tok->tokens[id].len = (uint32_t) nbytes;
		if (nbytes == 1)
			tok->byte_ids[(unsigned char) bytes[0]] = id;
	}

	if (bytes != stackbuf)
		fm_free(&tok->alloc, bytes);
	return st;
}

static const fm_merge_slot *
merge_lookup(const fm_tokenizer *tok, int32_t left, int32_t right)
{
	uint64_t	key = pair_key(left, right);
	uint32_t	i;

	if (tok->merges == NULL)
		return NULL;
	for (i = hash_pair(key) & tok->merges_mask;; i = (i + 1) & tok->merges_mask)
	{
		const fm_merge_slot *slot = &tok->merges[i];

		if (slot->rank < 0)
			return NULL;
		if (slot->key == key)
			return slot;
	}
}

static void
merge_put(fm_merge_slot *table, uint32_t mask, const fm_merge_slot *entry)
{
	uint32_t	i;

	for (i = hash_pair(entry->key) & mask;
		 table[i].rank >= 0 && table[i].key != entry->key;
		 i = (i + 1) & mask)
		;
	table[i] = *entry;
}

static fm_status
merges_reserve(fm_tokenizer *tok, fm_error *err)
{
	uint32_t	size = tok->merges ? tok->merges_mask + 1 : 0;
	uint32_t	newsize;
	fm_merge_slot *table;

	if ((uint64_t) (tok->merges_count + 1) * 2 <= size)
		return FM_OK;
	newsize = size ? size * 2 : 1024;
	table = fm_alloc_zero(&tok->alloc, (size_t) newsize * sizeof(fm_merge_slot));
	if (table == NULL)
		return fm_set_error(err, FM_ENOMEM, "out of memory allocating %zu bytes for the tokenizer",
							(size_t) newsize * sizeof(fm_merge_slot));
	for (uint32_t i = 0; i < newsize; i++)
		table[i].rank = -1;
	for (uint32_t i = 0; i < size; i++)
		if (tok->merges[i].rank >= 0)
			merge_put(table, newsize - 1, &tok->merges[i]);
	if (tok->merges)
		fm_free(&tok->alloc, tok->merges);
	tok->merges = table;
	tok->merges_mask = newsize - 1;
	return FM_OK;
}

/* Looks up a byte-level string of a merge rule; -1 when absent. */
static int32_t
merge_part_id(fm_tokenizer *tok, const char *s, size_t len, char *scratch)
{
	int64_t		n = byte_level_to_bytes(tok, s, len, scratch);

	return n < 0 ? -1 : vocab_lookup(tok, scratch, (size_t) n);
}

fm_status
fm_tokenizer_add_merge(fm_tokenizer *tok, const char *left, size_t left_len,
					   const char *right, size_t right_len, fm_error *err)
{
	char	   *scratch;
	int32_t		left_id;
	int32_t		right_id;
	int32_t		merged_id;
	int64_t		n_left;
	int64_t		n_right;
	fm_merge_slot slot;
	fm_status	st = FM_OK;

	scratch = tok_alloc(tok, left_len + right_len + 1, err);
	if (scratch == NULL)
		return FM_ENOMEM;

	left_id = merge_part_id(tok, left, left_len, scratch);
	right_id = merge_part_id(tok, right, right_len, scratch);
	n_left = byte_level_to_bytes(tok, left, left_len, scratch);
	n_right = n_left < 0 ? -1 : byte_level_to_bytes(tok, right, right_len, scratch + n_left);
	merged_id = n_right < 0 ? -1 : vocab_lookup(tok, scratch, (size_t) (n_left + n_right));

	/* Hugging Face tokenizers 0.23 rejects these rules too ("out of vocabulary"). */
	if (left_id < 0 || right_id < 0 || merged_id < 0)
		st = fm_set_error(err, FM_EINVAL,
						  "merge rule %d \"%.*s %.*s\" uses a token that is not in the vocabulary",
						  tok->next_rank, (int) (left_len > 64 ? 64 : left_len), left,
						  (int) (right_len > 64 ? 64 : right_len), right);
	fm_free(&tok->alloc, scratch);
	if (st != FM_OK)
		return st;

	st = merges_reserve(tok, err);
	if (st != FM_OK)
		return st;

	/* A repeated rule takes the later rank, as in Hugging Face tokenizers 0.23. */
	slot.key = pair_key(left_id, right_id);
	slot.rank = tok->next_rank++;
	slot.merged = merged_id;
	if (merge_lookup(tok, left_id, right_id) == NULL)
		tok->merges_count++;
	merge_put(tok->merges, tok->merges_mask, &slot);
	return FM_OK;
}

fm_status
fm_tokenizer_add_special(fm_tokenizer *tok, const char *content, size_t len,
						 int32_t id, bool lstrip, bool rstrip, fm_error *err)
{
	size_t		cap = (size_t) tok->specials_cap;
	fm_special *sp;
	uint32_t	offset;
	fm_status	st;

	if (len == 0 || len > UINT32_MAX)
		return fm_set_error(err, FM_EINVAL, "added token with id %d has empty or oversized content",
							id);
	if (fm_utf8_complete_prefix(content, len) != len)
		return fm_set_error(err, FM_EINVAL, "added token with id %d is not valid UTF-8", id);
	st = reserve_id(tok, id, err);
	if (st == FM_OK)
		st = tok_grow(tok, (void **) &tok->specials, &cap, (size_t) tok->n_specials + 1,
					  sizeof(fm_special), err);
	if (st == FM_OK)
		st = pool_append(tok, content, len, &offset, err);
	if (st != FM_OK)
		return st;
	tok->specials_cap = (int32_t) cap;

	sp = &tok->specials[tok->n_specials++];
	sp->offset = offset;
	sp->len = (uint32_t) len;
	sp->id = id;
	sp->lstrip = lstrip;
	sp->rstrip = rstrip;

	/* An added token decodes to its content even when the vocabulary has it. */
	tok->tokens[id].offset = offset;
	tok->tokens[id].len = (uint32_t) len;
	return FM_OK;
}

static fm_status
compile_pattern(fm_tokenizer *tok, const char *pattern, size_t len, uint32_t options,
				pcre2_code **out, fm_error *err)
{
	int			errcode;
	PCRE2_SIZE	erroffset;
	pcre2_code *code;

	/* PCRE2 rejects PCRE2_UCP with PCRE2_LITERAL, where it would change nothing. */
	if ((options & PCRE2_LITERAL) == 0)
		options |= PCRE2_UCP;
	code = pcre2_compile((PCRE2_SPTR) pattern, len, options | PCRE2_UTF,
						 &errcode, &erroffset, tok->pcre_cc);
	if (code == NULL)
	{
		PCRE2_UCHAR msg[256];

		pcre2_get_error_message(errcode, msg, sizeof(msg));
		return fm_set_error(err, errcode == PCRE2_ERROR_HEAPLIMIT ? FM_ENOMEM : FM_EINVAL,
							"invalid split pattern \"%.*s\" at offset %zu: %s",
							(int) (len > 200 ? 200 : len), pattern, (size_t) erroffset, msg);
	}

	/* Without JIT support (or executable memory), the interpreter runs. */
	(void) pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
	*out = code;
	return FM_OK;
}

static fm_status
add_step(fm_tokenizer *tok, fm_pretok_step *step, fm_error *err)
{
	if (tok->n_steps > 0 && tok->steps[tok->n_steps - 1].kind == FM_PRETOK_BYTE_LEVEL)
	{
		pcre2_code_free(step->code);
		return fm_set_error(err, FM_EUNSUPPORTED,
							"pre-tokenizer steps after ByteLevel are not supported");
	}
	if (tok->n_steps == FM_MAX_PRETOK_STEPS)
	{
		pcre2_code_free(step->code);
		return fm_set_error(err, FM_EUNSUPPORTED,
							"a pre-tokenizer sequence of more than %d steps is not supported",
							FM_MAX_PRETOK_STEPS);
	}
	tok->steps[tok->n_steps++] = *step;
	return FM_OK;
}

fm_status
fm_tokenizer_add_split(fm_tokenizer *tok, const char *pattern, size_t len,
					   bool literal, fm_split_behavior behavior, bool invert,
					   fm_error *err)
{
	fm_pretok_step step;
	fm_status	st;

	memset(&step, 0, sizeof(step));
	step.kind = FM_PRETOK_SPLIT;
	step.behavior = behavior;
	step.invert = invert;
	step.literal = literal;
	st = pool_append(tok, pattern, len, &step.pattern_offset, err);
	if (st != FM_OK)
		return st;
	step.pattern_len = (uint32_t) len;
	st = compile_pattern(tok, pattern, len, literal ? PCRE2_LITERAL : 0, &step.code, err);
	if (st != FM_OK)
		return st;
	return add_step(tok, &step, err);
}

fm_status
fm_tokenizer_add_byte_level(fm_tokenizer *tok, bool add_prefix_space, bool use_regex,
							fm_error *err)
{
	fm_pretok_step step;
	fm_status	st;

	memset(&step, 0, sizeof(step));
	step.kind = FM_PRETOK_BYTE_LEVEL;
	step.behavior = FM_SPLIT_ISOLATED;
	step.add_prefix_space = add_prefix_space;
	if (use_regex)
	{
		st = pool_append(tok, gpt2_pattern, strlen(gpt2_pattern), &step.pattern_offset, err);
		if (st != FM_OK)
			return st;
		step.pattern_len = (uint32_t) strlen(gpt2_pattern);
		st = compile_pattern(tok, gpt2_pattern, strlen(gpt2_pattern), 0, &step.code, err);
		if (st != FM_OK)
			return st;
	}
	return add_step(tok, &step, err);
}

void
fm_tokenizer_set_ignore_merges(fm_tokenizer *tok, bool ignore_merges)
{
	tok->ignore_merges = ignore_merges;
}

/* Orders added tokens by first byte, longest first, so a scan finds the longest. */
static bool
special_before(const fm_tokenizer *tok, const fm_special *x, const fm_special *y)
{
	unsigned char fx = (unsigned char) tok->pool[x->offset];
	unsigned char fy = (unsigned char) tok->pool[y->offset];

	if (fx != fy)
		return fx < fy;
	if (x->len != y->len)
		return x->len > y->len;
	return x->id < y->id;
}

fm_status
fm_tokenizer_finish(fm_tokenizer *tok, fm_error *err)
{
	if (tok->n_steps == 0 || tok->steps[tok->n_steps - 1].kind != FM_PRETOK_BYTE_LEVEL)
		return fm_set_error(err, FM_EUNSUPPORTED,
							"the pre-tokenizer must end with a ByteLevel step, because the model is a byte-level BPE");
	for (int b = 0; b < 256; b++)
	{
		if (tok->byte_ids[b] < 0)
			return fm_set_error(err, FM_EINVAL,
								"the vocabulary has no token for byte 0x%02x, so text containing it cannot be encoded",
								b);
	}

	/* insertion sort: files have a few hundred added tokens at most */
	for (int32_t i = 1; i < tok->n_specials; i++)
	{
		fm_special	sp = tok->specials[i];
		int32_t		j = i;

		while (j > 0 && special_before(tok, &sp, &tok->specials[j - 1]))
		{
			tok->specials[j] = tok->specials[j - 1];
			j--;
		}
		tok->specials[j] = sp;
	}
	for (int b = 0, i = 0; b <= 256; b++)
	{
		while (i < tok->n_specials && (unsigned char) tok->pool[tok->specials[i].offset] < b)
			i++;
		tok->special_first[b] = i;
	}
	tok->finished = true;
	return FM_OK;
}

/* ---------- the position-independent image ---------- */

/*
 * A finished tokenizer's data already consists of flat arrays that refer
 * to each other by index or pool offset, never by pointer.  The image is
 * those arrays behind a header, so a tokenizer can use an image in place
 * (in shared memory, say) and only compile its PCRE2 patterns, whose
 * compiled and JIT forms are per process.  The layout depends on this
 * build's structs, so an image is for the build that wrote it, which the
 * magic number, version and header size check.
 */
#define FM_TOKENIZER_IMAGE_MAGIC	0x4b4f5446u	/* "FTOK" read as little-endian */
#define FM_TOKENIZER_IMAGE_VERSION	1
#define FM_IMAGE_ALIGN				8

typedef struct fm_image_step
{
	uint32_t	kind;			/* fm_pretok_kind */
	uint32_t	behavior;		/* fm_split_behavior */
	uint32_t	pattern_offset; /* in the pool */
	uint32_t	pattern_len;
	uint8_t		has_pattern;
	uint8_t		literal;
	uint8_t		invert;
	uint8_t		add_prefix_space;
} fm_image_step;

/* One array of the image: where it starts, from the image start, and its size. */
typedef struct fm_image_section
{
	uint64_t	offset;
	uint64_t	bytes;
} fm_image_section;

typedef struct fm_image_header
{
	uint32_t	magic;
	uint32_t	version;
	uint64_t	bytes;			/* whole image, header included */
	uint32_t	header_bytes;	/* sizeof(fm_image_header) of the writer */
	int32_t		id_limit;
	int32_t		vocab_count;
	uint32_t	vocab_mask;
	int32_t		merges_count;
	uint32_t	merges_mask;
	int32_t		next_rank;
	int32_t		n_specials;
	int32_t		n_steps;
	uint32_t	ignore_merges;
	int32_t		byte_ids[256];
	int32_t		special_first[257];
	fm_image_step steps[FM_MAX_PRETOK_STEPS];
	fm_image_section pool;
	fm_image_section tokens;
	fm_image_section vocab;
	fm_image_section merges;
	fm_image_section specials;
} fm_image_header;

static size_t
image_align(size_t n)
{
	return (n + FM_IMAGE_ALIGN - 1) & ~(size_t) (FM_IMAGE_ALIGN - 1);
}

/* Places a section of bytes at *end and moves *end past it. */
static void
image_place(fm_image_section *section, size_t bytes, size_t *end)
{
	section->offset = *end;
	section->bytes = bytes;
	*end = image_align(*end + bytes);
}

/* Fills header's sections and returns the image size. */
static size_t
image_layout(const fm_tokenizer *tok, fm_image_header *header)
{
	size_t		end = image_align(sizeof(fm_image_header));

	image_place(&header->pool, tok->pool_len, &end);
	image_place(&header->tokens, (size_t) tok->id_limit * sizeof(fm_token_entry), &end);
	image_place(&header->vocab, tok->vocab == NULL ? 0 :
				((size_t) tok->vocab_mask + 1) * sizeof(fm_vocab_slot), &end);
	image_place(&header->merges, tok->merges == NULL ? 0 :
				((size_t) tok->merges_mask + 1) * sizeof(fm_merge_slot), &end);
	image_place(&header->specials, (size_t) tok->n_specials * sizeof(fm_special), &end);
	return end;
}

size_t
fm_tokenizer_image_size(const fm_tokenizer *tok)
{
	fm_image_header header;

	return image_layout(tok, &header);
}

fm_status
fm_tokenizer_serialize(const fm_tokenizer *tok, void *dst, size_t len, fm_error *err)
{
	fm_image_header *header = dst;
	char	   *base = dst;
	size_t		bytes;

	if (!tok->finished)
		return fm_set_error(err, FM_EINTERNAL, "tokenizer serialized before fm_tokenizer_finish");
	if ((uintptr_t) dst % FM_IMAGE_ALIGN != 0)
		return fm_set_error(err, FM_EINVAL, "tokenizer image buffer is not %d-byte aligned",
							FM_IMAGE_ALIGN);
	memset(header, 0, sizeof(fm_image_header));
	bytes = image_layout(tok, header);
	if (len < bytes)
		return fm_set_error(err, FM_EINVAL,
							"tokenizer image needs %zu bytes, but the buffer has %zu", bytes, len);
	memset(base + sizeof(fm_image_header), 0, bytes - sizeof(fm_image_header));

	header->bytes = bytes;
	header->header_bytes = sizeof(fm_image_header);
	header->id_limit = tok->id_limit;
	header->vocab_count = tok->vocab_count;
	header->vocab_mask = tok->vocab_mask;
	header->merges_count = tok->merges_count;
	header->merges_mask = tok->merges_mask;
	header->next_rank = tok->next_rank;
	header->n_specials = tok->n_specials;
	header->n_steps = tok->n_steps;
	header->ignore_merges = tok->ignore_merges;
	memcpy(header->byte_ids, tok->byte_ids, sizeof(header->byte_ids));
	memcpy(header->special_first, tok->special_first, sizeof(header->special_first));
	for (int32_t i = 0; i < tok->n_steps; i++)
	{
		const fm_pretok_step *step = &tok->steps[i];
		fm_image_step *out = &header->steps[i];

		out->kind = step->kind;
		out->behavior = step->behavior;
		out->pattern_offset = step->pattern_offset;
		out->pattern_len = step->pattern_len;
		out->has_pattern = step->code != NULL;
		out->literal = step->literal;
		out->invert = step->invert;
		out->add_prefix_space = step->add_prefix_space;
	}

	memcpy(base + header->pool.offset, tok->pool, header->pool.bytes);
	memcpy(base + header->tokens.offset, tok->tokens, header->tokens.bytes);
	if (header->vocab.bytes > 0)
		memcpy(base + header->vocab.offset, tok->vocab, header->vocab.bytes);
	if (header->merges.bytes > 0)
		memcpy(base + header->merges.offset, tok->merges, header->merges.bytes);
	if (header->specials.bytes > 0)
		memcpy(base + header->specials.offset, tok->specials, header->specials.bytes);

	/* written last, so a half-written image has no valid magic number */
	header->version = FM_TOKENIZER_IMAGE_VERSION;
	header->magic = FM_TOKENIZER_IMAGE_MAGIC;
	return FM_OK;
}

/* True when a section lies inside an image of bytes, after the header, aligned. */
static bool
image_section_valid(const fm_image_section *section, uint64_t bytes)
{
	return section->offset >= sizeof(fm_image_header) &&
		section->offset % FM_IMAGE_ALIGN == 0 &&
		section->offset <= bytes && section->bytes <= bytes - section->offset;
}

/* True when a hash table of mask + 1 slots of slot_bytes fills section. */
static bool
image_table_valid(const fm_image_section *section, uint32_t mask, int32_t count,
				  size_t slot_bytes)
{
	if (section->bytes == 0)
		return mask == 0 && count == 0;
	return ((uint64_t) mask & ((uint64_t) mask + 1)) == 0 &&
		section->bytes == ((uint64_t) mask + 1) * slot_bytes &&
		count >= 0 && (uint64_t) count <= mask;
}

/*
 * Checks an image's header: magic, version, sizes, and that every array
 * lies inside the image and agrees with its count.  The arrays' contents
 * are trusted, because only fm_tokenizer_serialize writes images.
 */
static fm_status
image_check(const fm_image_header *h, size_t len, fm_error *err)
{
	if (len < sizeof(fm_image_header))
		return fm_set_error(err, FM_EINVAL, "tokenizer image of %zu bytes is shorter than its header",
							len);
	if (h->magic != FM_TOKENIZER_IMAGE_MAGIC)
		return fm_set_error(err, FM_EINVAL, "tokenizer image has magic number 0x%08x, expected 0x%08x",
							h->magic, FM_TOKENIZER_IMAGE_MAGIC);
	if (h->version != FM_TOKENIZER_IMAGE_VERSION || h->header_bytes != sizeof(fm_image_header))
		return fm_set_error(err, FM_EINVAL,
							"tokenizer image has version %u with a %u-byte header, expected version %d with %zu bytes",
							h->version, h->header_bytes, FM_TOKENIZER_IMAGE_VERSION,
							sizeof(fm_image_header));
	if (h->bytes > len)
		return fm_set_error(err, FM_EINVAL, "tokenizer image claims %llu bytes, but only %zu are given",
							(unsigned long long) h->bytes, len);
	if (!image_section_valid(&h->pool, h->bytes) || !image_section_valid(&h->tokens, h->bytes) ||
		!image_section_valid(&h->vocab, h->bytes) || !image_section_valid(&h->merges, h->bytes) ||
		!image_section_valid(&h->specials, h->bytes))
		return fm_set_error(err, FM_EINVAL, "tokenizer image has an array outside its %llu bytes",
							(unsigned long long) h->bytes);
	if (h->id_limit < 0 || h->id_limit > FM_TOKEN_ID_MAX + 1 ||
		h->tokens.bytes != (uint64_t) h->id_limit * sizeof(fm_token_entry) ||
		h->n_specials < 0 || h->specials.bytes != (uint64_t) h->n_specials * sizeof(fm_special) ||
		h->pool.bytes > UINT32_MAX ||
		!image_table_valid(&h->vocab, h->vocab_mask, h->vocab_count, sizeof(fm_vocab_slot)) ||
		!image_table_valid(&h->merges, h->merges_mask, h->merges_count, sizeof(fm_merge_slot)) ||
		h->vocab.bytes == 0 || h->n_steps < 1 || h->n_steps > FM_MAX_PRETOK_STEPS)
		return fm_set_error(err, FM_EINVAL, "tokenizer image has inconsistent array sizes");
	for (int b = 0; b < 256; b++)
		if (h->byte_ids[b] < 0 || h->byte_ids[b] >= h->id_limit)
			return fm_set_error(err, FM_EINVAL, "tokenizer image has no valid id for byte 0x%02x", b);
	for (int b = 0; b <= 256; b++)
		if (h->special_first[b] < 0 || h->special_first[b] > h->n_specials ||
			(b > 0 && h->special_first[b] < h->special_first[b - 1]))
			return fm_set_error(err, FM_EINVAL, "tokenizer image has an invalid added-token index");
	for (int32_t i = 0; i < h->n_steps; i++)
	{
		const fm_image_step *step = &h->steps[i];

		if (step->kind > FM_PRETOK_BYTE_LEVEL || step->behavior > FM_SPLIT_CONTIGUOUS ||
			(uint64_t) step->pattern_offset + step->pattern_len > h->pool.bytes ||
			(step->kind == FM_PRETOK_SPLIT && !step->has_pattern) ||
			(step->kind == FM_PRETOK_BYTE_LEVEL) != (i == h->n_steps - 1))
			return fm_set_error(err, FM_EINVAL, "tokenizer image has an invalid pre-tokenizer step %d",
								i);
	}
	return FM_OK;
}

fm_status
fm_tokenizer_attach(const void *image, size_t len, const fm_allocator *a,
					fm_tokenizer **out, fm_error *err)
{
	const fm_image_header *h = image;
	const char *base = image;
	fm_tokenizer *tok;
	fm_status	st;

	*out = NULL;
	if ((uintptr_t) image % FM_IMAGE_ALIGN != 0)
		return fm_set_error(err, FM_EINVAL, "tokenizer image is not %d-byte aligned",
							FM_IMAGE_ALIGN);
	st = image_check(h, len, err);
	if (st != FM_OK)
		return st;
	st = fm_tokenizer_create(a, &tok, err);
	if (st != FM_OK)
		return st;

	tok->image = image;
	tok->pool = (char *) (base + h->pool.offset);
	tok->pool_len = h->pool.bytes;
	tok->pool_cap = h->pool.bytes;
	tok->tokens = (fm_token_entry *) (base + h->tokens.offset);
	tok->tokens_cap = h->id_limit;
	tok->id_limit = h->id_limit;
	tok->vocab = (fm_vocab_slot *) (base + h->vocab.offset);
	tok->vocab_mask = h->vocab_mask;
	tok->vocab_count = h->vocab_count;
	tok->merges = h->merges.bytes > 0 ? (fm_merge_slot *) (base + h->merges.offset) : NULL;
	tok->merges_mask = h->merges_mask;
	tok->merges_count = h->merges_count;
	tok->next_rank = h->next_rank;
	tok->specials = h->specials.bytes > 0 ? (fm_special *) (base + h->specials.offset) : NULL;
	tok->n_specials = h->n_specials;
	tok->specials_cap = h->n_specials;
	memcpy(tok->byte_ids, h->byte_ids, sizeof(tok->byte_ids));
	memcpy(tok->special_first, h->special_first, sizeof(tok->special_first));
	tok->ignore_merges = h->ignore_merges != 0;

	for (int32_t i = 0; i < h->n_steps; i++)
	{
		const fm_image_step *in = &h->steps[i];
		fm_pretok_step *step = &tok->steps[i];

		step->kind = (fm_pretok_kind) in->kind;
		step->behavior = (fm_split_behavior) in->behavior;
		step->invert = in->invert != 0;
		step->add_prefix_space = in->add_prefix_space != 0;
		step->literal = in->literal != 0;
		step->pattern_offset = in->pattern_offset;
		step->pattern_len = in->pattern_len;
		step->code = NULL;
		if (in->has_pattern)
		{
			st = compile_pattern(tok, tok->pool + in->pattern_offset, in->pattern_len,
								 step->literal ? PCRE2_LITERAL : 0, &step->code, err);
			if (st != FM_OK)
			{
				fm_tokenizer_free(tok);
				return st;
			}
		}
		tok->n_steps = i + 1;
	}
	tok->finished = true;
	*out = tok;
	return FM_OK;
}

/* ---------- encoding ---------- */

typedef struct fm_span
{
	const char *p;
	size_t		len;
} fm_span;

typedef struct fm_match
{
	size_t		start;
	size_t		end;
	bool		is_match;
} fm_match;

/* Per-call scratch; every buffer grows by copying and is freed at the end. */
typedef struct fm_encoder
{
	const fm_tokenizer *tok;
	fm_error   *err;

	int32_t    *ids;			/* the output */
	size_t		n_ids;
	size_t		ids_cap;

	fm_span    *pieces;			/* pieces of the current segment */
	size_t		n_pieces;
	size_t		pieces_cap;
	fm_span    *next;			/* pieces after the current step */
	size_t		n_next;
	size_t		next_cap;

	fm_match   *matches;		/* one Split step on one piece */
	size_t		n_matches;
	size_t		matches_cap;

	int32_t    *sym;			/* BPE: ids, prev, next, heap */
	size_t		sym_cap;
	pcre2_match_data *md;

	size_t		max_ids;		/* 0 = no limit */
	fm_interrupt_fn interrupt;	/* NULL = never polled */
	void	   *interrupt_arg;
	uint32_t	work;			/* units of work since the last poll */
} fm_encoder;

/* Units of work (regex matches, pieces) between two interrupt polls. */
#define ENCODER_POLL_INTERVAL 4096

/*
 * Counts one unit of work and polls the interrupt callback every
 * ENCODER_POLL_INTERVAL units, so cancelling a huge text is prompt.
 */
static fm_status
encoder_poll(fm_encoder *enc)
{
	if (enc->interrupt == NULL || ++enc->work < ENCODER_POLL_INTERVAL)
		return FM_OK;
	enc->work = 0;
	if (enc->interrupt(enc->interrupt_arg))
		return fm_set_error(enc->err, FM_ECANCELED, "tokenization canceled");
	return FM_OK;
}

#define GROW(enc, field, count, need) \
	tok_grow((enc)->tok, (void **) &(enc)->field, &(enc)->count, (need), \
			 sizeof(*(enc)->field), (enc)->err)

static fm_status
emit_id(fm_encoder *enc, int32_t id)
{
	fm_status	st;

	if (enc->max_ids > 0 && enc->n_ids >= enc->max_ids)
		return fm_set_error(enc->err, FM_ELIMIT, "text encodes to more than %zu tokens",
							enc->max_ids);
	st = GROW(enc, ids, ids_cap, enc->n_ids + 1);

	if (st == FM_OK)
		enc->ids[enc->n_ids++] = id;
	return st;
}

static fm_status
push_next(fm_encoder *enc, const char *p, size_t len)
{
	fm_status	st;

	if (len == 0)				/* Hugging Face drops empty pieces */
		return FM_OK;
	st = GROW(enc, next, next_cap, enc->n_next + 1);
	if (st != FM_OK)
		return st;
	enc->next[enc->n_next].p = p;
	enc->next[enc->n_next].len = len;
	enc->n_next++;
	return FM_OK;
}

static fm_status
push_match(fm_encoder *enc, size_t start, size_t end, bool is_match)
{
	fm_status	st = GROW(enc, matches, matches_cap, enc->n_matches + 1);

	if (st == FM_OK)
	{
		enc->matches[enc->n_matches].start = start;
		enc->matches[enc->n_matches].end = end;
		enc->matches[enc->n_matches].is_match = is_match;
		enc->n_matches++;
	}
	return st;
}

/*
 * Lists the matches of code in one piece and the gaps between them.  An
 * empty match right where the previous match ended is skipped by moving
 * one character on, so the scan always advances.
 *
 * NOTE: the cl100k and Llama 3 patterns never match empty text, so the
 * empty-match rule is not compared with Hugging Face's Oniguruma scan.
 */
static fm_status
find_matches(fm_encoder *enc, pcre2_code *code, const char *s, size_t len)
{
	size_t		pos = 0;
	size_t		prev = 0;
	bool		have_last = false;
	size_t		last_end = 0;
	fm_status	st;

	enc->n_matches = 0;
	while (pos <= len)
	{
		int			rc;
		PCRE2_SIZE *ov;
		size_t		ms;
		size_t		me;

		rc = pcre2_match(code, (PCRE2_SPTR) s, len, pos, PCRE2_NO_UTF_CHECK, enc->md, NULL);
		if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
			rc = pcre2_match(code, (PCRE2_SPTR) s, len, pos,
							 PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, enc->md, NULL);
		if (rc == PCRE2_ERROR_NOMATCH)
			break;
		if (rc < 0)
		{
			PCRE2_UCHAR msg[256];

			pcre2_get_error_message(rc, msg, sizeof(msg));
			return fm_set_error(enc->err, rc == PCRE2_ERROR_NOMEMORY ? FM_ENOMEM : FM_ELIMIT,
								"split pattern failed on a piece of %zu bytes: %s", len, msg);
		}
		if ((st = encoder_poll(enc)) != FM_OK)
			return st;
		ov = pcre2_get_ovector_pointer(enc->md);
		ms = ov[0];
		me = ov[1];

		if (ms == me && have_last && last_end == me)
		{
			uint32_t	cp;
			int			k;

			if (pos >= len)
				break;
			k = utf8_char((const unsigned char *) s + pos, len - pos, &cp);
			pos += k > 0 ? k : 1;
			continue;
		}

		if (prev != ms && (st = push_match(enc, prev, ms, false)) != FM_OK)
			return st;
		if ((st = push_match(enc, ms, me, true)) != FM_OK)
			return st;
		prev = me;
		pos = me;
		have_last = true;
		last_end = me;
	}
	if (prev != len)
		return push_match(enc, prev, len, false);
	return FM_OK;
}

/*
 * Applies one Split step to a piece, appending the resulting pieces to
 * enc->next.  The rules reproduce SplitDelimiterBehavior of Hugging Face
 * tokenizers, whose results for every behavior and invert value the unit
 * test holds.  One corner case: with MergedWithPrevious, a match directly
 * after another match stays a piece of its own.
 */
static fm_status
split_piece(fm_encoder *enc, const fm_pretok_step *step, fm_span piece)
{
	fm_match   *m;
	size_t		n;
	size_t		out = 0;
	bool		prev_match = false;
	fm_status	st;

	st = find_matches(enc, step->code, piece.p, piece.len);
	if (st != FM_OK)
		return st;
	m = enc->matches;
	n = enc->n_matches;
	if (step->invert)
		for (size_t i = 0; i < n; i++)
			m[i].is_match = !m[i].is_match;

	/* Compact m in place into the pieces to keep; is_match marks removal. */
	switch (step->behavior)
	{
		case FM_SPLIT_REMOVED:
			out = n;
			break;
		case FM_SPLIT_ISOLATED:
			for (size_t i = 0; i < n; i++)
				m[i].is_match = false;
			out = n;
			break;
		case FM_SPLIT_CONTIGUOUS:
		case FM_SPLIT_MERGED_WITH_PREVIOUS:
			for (size_t i = 0; i < n; i++)
			{
				bool		join;

				if (step->behavior == FM_SPLIT_CONTIGUOUS)
					join = m[i].is_match == prev_match;
				else
					join = m[i].is_match && !prev_match;
				prev_match = m[i].is_match;
				if (join && out > 0)
					m[out - 1].end = m[i].end;
				else
				{
					m[out] = m[i];
					m[out].is_match = false;
					out++;
				}
			}
			break;
		case FM_SPLIT_MERGED_WITH_NEXT:
			/* the same walk from the right, so kept pieces fill from the end */
			for (size_t i = n; i-- > 0;)
			{
				bool		join = m[i].is_match && !prev_match;

				prev_match = m[i].is_match;
				if (join && out > 0)
					m[n - out].start = m[i].start;
				else
				{
					out++;
					m[n - out] = m[i];
					m[n - out].is_match = false;
				}
			}
			m += n - out;
			break;
	}

	for (size_t i = 0; i < out; i++)
	{
		if (m[i].is_match)
			continue;
		st = push_next(enc, piece.p + m[i].start, m[i].end - m[i].start);
		if (st != FM_OK)
			return st;
	}
	return FM_OK;
}

static void
swap_pieces(fm_encoder *enc)
{
	fm_span    *p = enc->pieces;
	size_t		cap = enc->pieces_cap;

	enc->pieces = enc->next;
	enc->pieces_cap = enc->next_cap;
	enc->n_pieces = enc->n_next;
	enc->next = p;
	enc->next_cap = cap;
	enc->n_next = 0;
}

/*
 * ByteLevel's own work on raw bytes: the optional leading space on every
 * piece that lacks one, then the optional GPT-2 split.  The byte-to-
 * character mapping itself needs no work because the vocabulary was
 * converted to raw bytes at load.  Prefixed copies go to *spaced.
 */
static fm_status
byte_level_step(fm_encoder *enc, const fm_pretok_step *step, char **spaced)
{
	fm_status	st;

	if (step->add_prefix_space)
	{
		size_t		total = 0;
		char	   *buf;

		for (size_t i = 0; i < enc->n_pieces; i++)
			total += enc->pieces[i].len + 1;
		buf = tok_alloc(enc->tok, total + 1, enc->err);
		if (buf == NULL)
			return FM_ENOMEM;
		*spaced = buf;
		for (size_t i = 0; i < enc->n_pieces; i++)
		{
			fm_span    *piece = &enc->pieces[i];

			if (piece->p[0] == ' ')
				continue;
			buf[0] = ' ';
			memcpy(buf + 1, piece->p, piece->len);
			piece->p = buf;
			piece->len++;
			buf += piece->len;
		}
	}
	if (step->code == NULL)
		return FM_OK;

	for (size_t i = 0; i < enc->n_pieces; i++)
		if ((st = split_piece(enc, step, enc->pieces[i])) != FM_OK)
			return st;
	swap_pieces(enc);
	return FM_OK;
}

typedef struct fm_heap_item
{
	int32_t		rank;
	int32_t		pos;
	int32_t		merged;
} fm_heap_item;

static bool
heap_less(const fm_heap_item *a, const fm_heap_item *b)
{
	return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void
heap_push(fm_heap_item *heap, int32_t *n, fm_heap_item item)
{
	int32_t		i = (*n)++;

	while (i > 0 && heap_less(&item, &heap[(i - 1) / 2]))
	{
		heap[i] = heap[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	heap[i] = item;
}

static fm_heap_item
heap_pop(fm_heap_item *heap, int32_t *n)
{
	fm_heap_item top = heap[0];
	fm_heap_item last = heap[--(*n)];
	int32_t		i = 0;

	for (;;)
	{
		int32_t		c = 2 * i + 1;

		if (c >= *n)
			break;
		if (c + 1 < *n && heap_less(&heap[c + 1], &heap[c]))
			c++;
		if (!heap_less(&heap[c], &last))
			break;
		heap[i] = heap[c];
		i = c;
	}
	if (*n > 0)
		heap[i] = last;
	return top;
}

static void
push_pair(const fm_tokenizer *tok, fm_heap_item *heap, int32_t *n_heap,
		  const int32_t *id, int32_t left, int32_t right)
{
	const fm_merge_slot *m = merge_lookup(tok, id[left], id[right]);

	if (m != NULL)
	{
		fm_heap_item item = {m->rank, left, m->merged};

		heap_push(heap, n_heap, item);
	}
}

/*
 * Merges one piece and emits its ids.  Each symbol lives at the byte
 * offset where it starts, linked to its neighbours through prev and next,
 * and a merged-away symbol gets id -1.  A popped heap entry is stale when
 * its pair changed after the push, which the merged-id check detects.
 */
static fm_status
bpe_piece(fm_encoder *enc, const char *p, size_t len)
{
	const fm_tokenizer *tok = enc->tok;
	int32_t    *id;
	int32_t    *prev;
	int32_t    *next;
	fm_heap_item *heap;
	int32_t		n_heap = 0;
	int32_t		n = (int32_t) len;
	fm_status	st;

	if (len > (size_t) INT32_MAX / 8)
		return fm_set_error(enc->err, FM_ELIMIT,
							"pre-tokenized piece of %zu bytes is too long to encode", len);
	if (tok->ignore_merges || len == 1)
	{
		int32_t		whole = vocab_lookup(tok, p, len);

		if (whole >= 0)
			return emit_id(enc, whole);
	}

	/* three int32 per symbol, plus a heap of at most 3n items */
	st = GROW(enc, sym, sym_cap, (size_t) n * 12);
	if (st != FM_OK)
		return st;
	id = enc->sym;
	prev = id + n;
	next = prev + n;
	heap = (fm_heap_item *) (next + n);

	for (int32_t i = 0; i < n; i++)
	{
		id[i] = tok->byte_ids[(unsigned char) p[i]];
		prev[i] = i - 1;
		next[i] = i + 1 < n ? i + 1 : -1;
	}
	for (int32_t i = 0; i + 1 < n; i++)
		push_pair(tok, heap, &n_heap, id, i, i + 1);

	while (n_heap > 0)
	{
		fm_heap_item top = heap_pop(heap, &n_heap);
		int32_t		pos = top.pos;
		int32_t		right;
		const fm_merge_slot *m;

		if (id[pos] < 0 || next[pos] < 0)
			continue;
		right = next[pos];
		m = merge_lookup(tok, id[pos], id[right]);
		if (m == NULL || m->merged != top.merged)
			continue;

		id[pos] = top.merged;
		id[right] = -1;
		next[pos] = next[right];
		if (next[pos] >= 0)
			prev[next[pos]] = pos;
		if (prev[pos] >= 0)
			push_pair(tok, heap, &n_heap, id, prev[pos], pos);
		if (next[pos] >= 0)
			push_pair(tok, heap, &n_heap, id, pos, next[pos]);
	}

	for (int32_t i = 0; i >= 0; i = next[i])
		if ((st = emit_id(enc, id[i])) != FM_OK)
			return st;
	return FM_OK;
}

/* Pre-tokenizes and merges a stretch of text that has no added tokens. */
static fm_status
encode_segment(fm_encoder *enc, const char *s, size_t len)
{
	const fm_tokenizer *tok = enc->tok;
	char	   *spaced = NULL;
	fm_status	st = FM_OK;

	if (len == 0)
		return FM_OK;
	enc->n_pieces = 0;
	enc->n_next = 0;
	if ((st = push_next(enc, s, len)) != FM_OK)
		return st;
	swap_pieces(enc);

	for (int32_t k = 0; k < tok->n_steps && st == FM_OK; k++)
	{
		const fm_pretok_step *step = &tok->steps[k];

		if (step->kind == FM_PRETOK_BYTE_LEVEL)
		{
			st = byte_level_step(enc, step, &spaced);
			continue;
		}
		for (size_t i = 0; i < enc->n_pieces && st == FM_OK; i++)
			st = split_piece(enc, step, enc->pieces[i]);
		swap_pieces(enc);
	}

	for (size_t i = 0; i < enc->n_pieces && st == FM_OK; i++)
	{
		st = encoder_poll(enc);
		if (st == FM_OK)
			st = bpe_piece(enc, enc->pieces[i].p, enc->pieces[i].len);
	}

	if (spaced != NULL)
		fm_free(&tok->alloc, spaced);
	return st;
}

/*
 * Finds the leftmost-longest added token in s[from, len); returns false
 * when there is none.  lstrip and rstrip widen the match over adjacent
 * whitespace, but lstrip never reaches back before floor.
 */
static bool
find_special(const fm_tokenizer *tok, const char *s, size_t len, size_t from,
			 size_t floor, size_t *start, size_t *end, int32_t *id)
{
	for (size_t i = from; i < len; i++)
	{
		unsigned char b = (unsigned char) s[i];

		for (int32_t k = tok->special_first[b]; k < tok->special_first[b + 1]; k++)
		{
			const fm_special *sp = &tok->specials[k];

			if (sp->len > len - i || memcmp(s + i, tok->pool + sp->offset, sp->len) != 0)
				continue;
			*start = i;
			*end = i + sp->len;
			*id = sp->id;
			if (sp->lstrip)
			{
				/* step back over whole characters that are whitespace */
				size_t		j = *start;

				while (j > floor)
				{
					size_t		c = j - 1;
					uint32_t	cp;

					while (c > floor && ((unsigned char) s[c] & 0xC0) == 0x80)
						c--;
					if (utf8_char((const unsigned char *) s + c, j - c, &cp) == 0 ||
						!is_unicode_space(cp))
						break;
					j = c;
				}
				*start = j;
			}
			if (sp->rstrip)
			{
				uint32_t	cp;
				int			k2;

				while (*end < len &&
					   (k2 = utf8_char((const unsigned char *) s + *end, len - *end, &cp)) > 0 &&
					   is_unicode_space(cp))
					*end += k2;
			}
			return true;
		}
	}
	return false;
}

static void
encoder_cleanup(fm_encoder *enc)
{
	const fm_allocator *a = &enc->tok->alloc;

	if (enc->pieces)
		fm_free(a, enc->pieces);
	if (enc->next)
		fm_free(a, enc->next);
	if (enc->matches)
		fm_free(a, enc->matches);
	if (enc->sym)
		fm_free(a, enc->sym);
	pcre2_match_data_free(enc->md);
}

fm_status
fm_tokenizer_encode(const fm_tokenizer *tok, const char *text, size_t len,
					bool allow_special, int32_t **ids, int32_t *n_ids,
					fm_error *err)
{
	fm_encode_options options = {.allow_special = allow_special};

	return fm_tokenizer_encode_ex(tok, text, len, &options, ids, n_ids, err);
}

fm_status
fm_tokenizer_encode_ex(const fm_tokenizer *tok, const char *text, size_t len,
					   const fm_encode_options *options, int32_t **ids,
					   int32_t *n_ids, fm_error *err)
{
	bool		allow_special = options->allow_special;
	fm_encoder	enc;
	size_t		valid;
	size_t		pos = 0;
	fm_status	st = FM_OK;

	*ids = NULL;
	*n_ids = 0;
	if (!tok->finished)
		return fm_set_error(err, FM_EINTERNAL, "tokenizer used before fm_tokenizer_finish");
	valid = fm_utf8_complete_prefix(text, len);
	if (valid != len)
		return fm_set_error(err, FM_EINVAL, "invalid UTF-8 byte 0x%02x at offset %zu of the text",
							(unsigned char) text[valid], valid);

	memset(&enc, 0, sizeof(enc));
	enc.tok = tok;
	enc.err = err;
	enc.max_ids = options->max_ids;
	enc.interrupt = options->interrupt;
	enc.interrupt_arg = options->interrupt_arg;
	enc.md = pcre2_match_data_create(1, tok->pcre_gc);
	if (enc.md == NULL)
		return fm_set_error(err, FM_ENOMEM, "out of memory creating PCRE2 match data");

	if (allow_special && tok->n_specials > 0)
	{
		size_t		start;
		size_t		end;
		int32_t		special_id;

		while (st == FM_OK &&
			   find_special(tok, text, len, pos, pos, &start, &end, &special_id))
		{
			st = encode_segment(&enc, text + pos, start - pos);
			if (st == FM_OK)
				st = emit_id(&enc, special_id);
			pos = end;
		}
	}
	if (st == FM_OK)
		st = encode_segment(&enc, text + pos, len - pos);

	if (st == FM_OK && enc.n_ids > (size_t) INT32_MAX)
		st = fm_set_error(err, FM_ELIMIT, "text encodes to %zu tokens, more than %d",
						  enc.n_ids, INT32_MAX);
	if (st == FM_OK)
	{
		*ids = enc.ids;
		*n_ids = (int32_t) enc.n_ids;
		enc.ids = NULL;
	}
	else if (enc.ids)
		fm_free(&tok->alloc, enc.ids);
	encoder_cleanup(&enc);
	return st;
}

/* ---------- decoding ---------- */

fm_status
fm_tokenizer_decode(const fm_tokenizer *tok, const int32_t *ids, int32_t n_ids,
					char **text, size_t *len, fm_error *err)
{
	size_t		total = 0;
	char	   *out;

	*text = NULL;
	*len = 0;
	for (int32_t i = 0; i < n_ids; i++)
	{
		if (!fm_tokenizer_has_id(tok, ids[i]))
			return fm_set_error(err, FM_EINVAL,
								"token id %d at position %d is not known to the tokenizer (ids run from 0 to %d)",
								ids[i], i, tok->id_limit - 1);
		total += tok->tokens[ids[i]].len;
	}

	out = tok_alloc(tok, total + 1, err);
	if (out == NULL)
		return FM_ENOMEM;
	total = 0;
	for (int32_t i = 0; i < n_ids; i++)
	{
		const fm_token_entry *t = &tok->tokens[ids[i]];

		memcpy(out + total, tok->pool + t->offset, t->len);
		total += t->len;
	}
	out[total] = '\0';
	*text = out;
	*len = total;
	return FM_OK;
}

int32_t
fm_tokenizer_id_limit(const fm_tokenizer *tok)
{
	return tok->id_limit;
}

bool
fm_tokenizer_has_id(const fm_tokenizer *tok, int32_t id)
{
	return id >= 0 && id < tok->id_limit && tok->tokens[id].len > 0;
}
