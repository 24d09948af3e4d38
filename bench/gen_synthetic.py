#!/usr/bin/python3
"""Generate the random-weight checkpoints that `make bench` measures.

Both checkpoints have FlexOlmo-7x7B's layer shapes: hidden 4096,
intermediate 11008, 32 heads of 128 and 32 kv heads.  They have only a few
layers and a 32,000-row vocabulary (FlexOlmo: 32 layers, 100,352 rows), so
the weights are gigabytes, far beyond the CPU caches, while generation and
loading stay quick:

    OUTDIR/flexmore/  FlexMoRE: the public expert in full plus six low-rank
                      experts of ranks 1024, 256, 64, 16, 4 and 1, all of
                      them chosen per token (num_experts_per_tok 7)
    OUTDIR/dense/     the same model with the public expert only (flex_olmo,
                      one expert), the model exported to GGUF for llama.cpp

Every tensor the two share (embedding, attention, norms, the public expert,
lm_head) is stored once, in OUTDIR/shared.safetensors.  Each model directory
reaches it through a symbolic link and lists it in its
model.safetensors.index.json, next to a file of its own tensors (the router,
and the adapters).  With one
expert the router's softmax weight is exactly 1, so the dense model computes
the plain OLMo-2 forward pass of the public expert.

Tensors are F32, so a reader can map them without conversion.  Weights are
drawn from numpy's default generator seeded with (--seed, tensor index):
projections N(0, 1/in), adapters A N(0, 1/in) and B N(0, 0.25/r), norm
weights 1 + N(0, 0.1^2), the embedding N(0, 1).  The same arguments always
produce the same bytes.  There is no tokenizer: callers pass token ids.

    gen_synthetic.py OUTDIR [--layers 4] [--vocab 32000] [--seed 7]
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "model"))
import safetensors_io  # noqa: E402

HIDDEN = 4096
INTER = 11008
HEADS = 32
KV_HEADS = 32
HEAD_DIM = 128
RANKS = [0, 1024, 256, 64, 16, 4, 1]
EXPERT_NAMES = ["public", "r1024", "r256", "r64", "r16", "r4", "r1"]
SHARED_NAME = "shared.safetensors"


def shared_specs(layers, vocab):
    """List (name, shape, kind) of the tensors both models contain."""
    q_dim = HEADS * HEAD_DIM
    kv_dim = KV_HEADS * HEAD_DIM
    specs = [("model.embed_tokens.weight", (vocab, HIDDEN), "embedding"),
             ("model.norm.weight", (HIDDEN,), "norm"),
             ("lm_head.weight", (vocab, HIDDEN), "linear")]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "self_attn.q_proj.weight", (q_dim, HIDDEN), "linear"),
                  (p + "self_attn.k_proj.weight", (kv_dim, HIDDEN), "linear"),
                  (p + "self_attn.v_proj.weight", (kv_dim, HIDDEN), "linear"),
                  (p + "self_attn.o_proj.weight", (HIDDEN, q_dim), "linear"),
                  (p + "self_attn.q_norm.weight", (q_dim,), "norm"),
                  (p + "self_attn.k_norm.weight", (kv_dim,), "norm"),
                  (p + "post_attention_layernorm.weight", (HIDDEN,), "norm"),
                  (p + "post_feedforward_layernorm.weight", (HIDDEN,), "norm"),
                  (p + "mlp.experts.0.gate_proj.weight", (INTER, HIDDEN), "linear"),
                  (p + "mlp.experts.0.up_proj.weight", (INTER, HIDDEN), "linear"),
                  (p + "mlp.experts.0.down_proj.weight", (HIDDEN, INTER), "linear")]
    return specs


def router_specs(layers, n_experts):
    return [(f"model.layers.{i}.mlp.gate.weight", (n_experts, HIDDEN), "router")
            for i in range(layers)]


def adapter_specs(layers):
    """List the low-rank adapter tensors of experts 1..6."""
    specs = []
    dims = {"gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
    for i in range(layers):
        for e, rank in enumerate(RANKS):
            if rank == 0:
                continue
            base = f"model.layers.{i}.mlp.experts.{e}."
            for proj, (out_dim, in_dim) in dims.items():
                specs.append((f"{base}{proj}_proj_a.weight", (rank, in_dim), "linear"))
                specs.append((f"{base}{proj}_proj_b.weight", (out_dim, rank), "adapter_b"))
    return specs


def draw(kind, shape, seed, index):
    """Draw one tensor as float32; (seed, index) fixes its values."""
    rng = np.random.default_rng([seed, index])
    values = rng.standard_normal(shape, dtype=np.float32)
    if kind == "linear":
        values *= np.float32(1.0 / np.sqrt(shape[1]))
    elif kind == "adapter_b":
        values *= np.float32(0.5 / np.sqrt(shape[1]))
    elif kind == "router":
        values *= np.float32(2.0 / np.sqrt(shape[1]))
    elif kind == "norm":
        values *= np.float32(0.1)
        values += np.float32(1.0)
    return values


def write_safetensors(path, specs, seed, first_index):
    """Write specs as one F32 safetensors file, one tensor at a time."""
    entries = []
    offset = 0
    for name, shape, _ in specs:
        size = 4 * int(np.prod(shape))
        entries.append((name, "F32", shape, offset, offset + size))
        offset += size
    header = safetensors_io.build_header(entries, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for i, (name, shape, kind) in enumerate(specs):
            f.write(draw(kind, shape, seed, first_index + i).tobytes())
    return offset


def make_config(layers, vocab, ranks, names):
    flexmore = len(ranks) > 1
    config = {
        "architectures": ["FlexMoREForCausalLM" if flexmore else "FlexOlmoForCausalLM"],
        "model_type": "flexmore" if flexmore else "flex_olmo",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "max_position_embeddings": 4096,
        "num_experts": len(ranks),
        "num_experts_per_tok": len(ranks),
        "norm_topk_prob": False,
        "tie_word_embeddings": False,
        "eos_token_id": vocab - 1,
        "pad_token_id": None,
        "bos_token_id": None,
        "torch_dtype": "float32",
        "attention_bias": False,
        "expert_names": names,
    }
    if flexmore:
        config["expert_ranks"] = ranks
    return config


def write_model_dir(outdir, name, config, own_file, own_specs, shared, seed, first_index):
    """Write one model directory: config, its own tensors, a link to the shared file, the index."""
    directory = os.path.join(outdir, name)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    own_bytes = write_safetensors(os.path.join(directory, own_file), own_specs, seed, first_index)
    link = os.path.join(directory, SHARED_NAME)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.join("..", SHARED_NAME), link)

    weight_map = {n: SHARED_NAME for n, _, _ in shared}
    weight_map.update({n: own_file for n, _, _ in own_specs})
    total = own_bytes + sum(4 * int(np.prod(s)) for _, s, _ in shared)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, safetensors_io.INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.layers < 1 or args.vocab < 2:
        parser.error("--layers must be at least 1 and --vocab at least 2")

    os.makedirs(args.outdir, exist_ok=True)
    stamp = {"layers": args.layers, "vocab": args.vocab, "seed": args.seed, "ranks": RANKS}
    stamp_path = os.path.join(args.outdir, "generated.json")
    if os.path.exists(stamp_path):
        with open(stamp_path, encoding="utf-8") as f:
            if json.load(f) == stamp:
                print(f"gen_synthetic: {args.outdir} is up to date")
                return 0
        os.remove(stamp_path)

    shared = shared_specs(args.layers, args.vocab)
    shared_bytes = write_safetensors(os.path.join(args.outdir, SHARED_NAME), shared, args.seed, 0)
    # Index ranges keep every tensor's random stream distinct.
    flexmore_specs = router_specs(args.layers, len(RANKS)) + adapter_specs(args.layers)
    flexmore_bytes = write_model_dir(
        args.outdir, "flexmore", make_config(args.layers, args.vocab, RANKS, EXPERT_NAMES),
        "flexmore-own.safetensors", flexmore_specs, shared, args.seed, 100000)
    dense_bytes = write_model_dir(
        args.outdir, "dense", make_config(args.layers, args.vocab, [0], ["public"]),
        "dense-own.safetensors", router_specs(args.layers, 1), shared, args.seed, 200000)

    with open(stamp_path, "w", encoding="utf-8") as f:
        json.dump(stamp, f)
        f.write("\n")
    print(f"gen_synthetic: {args.layers} layers, vocab {args.vocab}: shared tensors "
          f"{shared_bytes / 1e9:.2f} GB, flexmore {flexmore_bytes / 1e9:.2f} GB, "
          f"dense {dense_bytes / 1e9:.2f} GB (F32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
