/*-------------------------------------------------------------------------
 *
 * tokenizer_internal.h
 *	  Builder interface between the tokenizer.json loader and the tokenizer.
 *
 * The loader (src/reader/tokenizer_json.c) parses the file with
 * PostgreSQL's JSON parser and describes the tokenizer through these calls.
 * The tokenizer (src/engine/tokenizer.c) owns every data structure, so the
 * encoding rules live in one file without a PostgreSQL dependency.
 *
 * Call order: fm_tokenizer_create, then any number of the add/set calls
 * (vocabulary entries before the merges that use them), then
 * fm_tokenizer_finish.  After a failed call, the only valid call is
 * fm_tokenizer_free.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_TOKENIZER_INTERNAL_H
#define FLEXMORE_TOKENIZER_INTERNAL_H

#include "engine/engine.h"

/*
 * What a Split pre-tokenizer does with the pattern's matches, as named in
 * Hugging Face tokenizers' SplitDelimiterBehavior.
 */
typedef enum fm_split_behavior
{
	FM_SPLIT_REMOVED = 0,		/* drop the matches */
	FM_SPLIT_ISOLATED,			/* each match is a piece of its own */
	FM_SPLIT_MERGED_WITH_PREVIOUS,	/* a match joins the piece before it */
	FM_SPLIT_MERGED_WITH_NEXT,	/* a match joins the piece after it */
	FM_SPLIT_CONTIGUOUS			/* adjacent matches form one piece */
} fm_split_behavior;

/* Parses a behavior name such as "Isolated"; false for an unknown one. */
bool		fm_split_behavior_parse(const char *name, fm_split_behavior *out);

/* Creates an empty tokenizer whose memory all comes from a. */
fm_status	fm_tokenizer_create(const fm_allocator *a, fm_tokenizer **out,
								fm_error *err);

/*
 * Adds a vocabulary entry.  token is the byte-level string of the file
 * (UTF-8, one character per byte of the real token).  Ids must be
 * non-negative and unique.
 */
fm_status	fm_tokenizer_add_vocab(fm_tokenizer *tok, const char *token, size_t len,
								   int32_t id, fm_error *err);

/*
 * Adds the next merge rule; rules added earlier have lower (better) ranks.
 * Both halves and their concatenation must already be in the vocabulary.
 */
fm_status	fm_tokenizer_add_merge(fm_tokenizer *tok, const char *left, size_t left_len,
								   const char *right, size_t right_len, fm_error *err);

/*
 * Adds an added token (a special token such as "<|endoftext|>").  lstrip
 * and rstrip make a match also take the whitespace to its left or right,
 * as in Hugging Face tokenizers.
 */
fm_status	fm_tokenizer_add_special(fm_tokenizer *tok, const char *content, size_t len,
									 int32_t id, bool lstrip, bool rstrip,
									 fm_error *err);

/*
 * Appends a Split pre-tokenizer step.  When literal is true the pattern is
 * a plain string (the file's {"String": ...} form), otherwise a regular
 * expression compiled with Unicode semantics.
 */
fm_status	fm_tokenizer_add_split(fm_tokenizer *tok, const char *pattern, size_t len,
								   bool literal, fm_split_behavior behavior, bool invert,
								   fm_error *err);

/*
 * Appends the ByteLevel pre-tokenizer step, which must be the last step.
 * use_regex adds the GPT-2 split pattern that Hugging Face's ByteLevel
 * applies itself.
 */
fm_status	fm_tokenizer_add_byte_level(fm_tokenizer *tok, bool add_prefix_space,
										bool use_regex, fm_error *err);

/* Makes a piece that is itself in the vocabulary skip merging (Llama 3). */
void		fm_tokenizer_set_ignore_merges(fm_tokenizer *tok, bool ignore_merges);

/*
 * Checks the finished description: a ByteLevel step is present and every
 * one of the 256 bytes has a vocabulary entry.
 */
fm_status	fm_tokenizer_finish(fm_tokenizer *tok, fm_error *err);

#endif							/* FLEXMORE_TOKENIZER_INTERNAL_H */
