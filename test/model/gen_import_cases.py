#!/usr/bin/python3
"""Write the checkpoints the import, expert and factorization tests use.

Built on gen_checkpoint.py's presets, into OUTDIR:

  hostile/KIND     hostile checkpoints the numpy reference loader does not
                   reject, so they live here rather than in gen_checkpoint's
                   CORRUPTIONS: non-finite weights, an undefined dtype, bad
                   offsets, a header that is not JSON, a Unigram tokenizer
  packages/NAME    two-expert expert packages, and the checkpoints that
                   adding or removing them must reproduce exactly
  lowrank          a flex_olmo model whose expert 1 is random and whose
                   expert 2 is W_0 plus an exact rank-4 delta, with
                   lowrank/expected_errors.json: numpy's optimal truncated
                   SVD error ||D - D_r||_F / ||D||_F per matrix and rank

    gen_import_cases.py OUTDIR
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_checkpoint  # noqa: E402
import safetensors_io  # noqa: E402

PROJS = ("gate_proj", "up_proj", "down_proj")

# kind -> (base preset, description)
HOSTILE = {
    "nan-weight": ("flex_olmo_f32", "NaN at [3, 7] of layer 1 expert 2 down_proj (F32)"),
    "inf-weight-bf16": ("sharded_gqa_bf16", "+inf at [5, 2] of the embedding (BF16, sharded)"),
    "inf-weight-f16": ("flexmore_f16_tied", "-inf at [0, 1] of layer 0 expert 3 up_proj_b (F16)"),
    "dtype-undefined": ("flex_olmo_f32", "model.norm.weight has dtype Q4_K, which safetensors "
                                         "does not define"),
    "offsets-beyond-data": ("flex_olmo_f32", "model.norm.weight data_offsets end past the data"),
    "offsets-end-before-begin": ("flex_olmo_f32", "model.norm.weight data_offsets [end, begin]"),
    "header-not-json": ("flex_olmo_f32", "the header bytes are not JSON"),
    "tokenizer-unigram": ("flex_olmo_f32", "tokenizer model type Unigram"),
    "eos-outside-vocab": ("flex_olmo_f32", "eos_token_id 5000 with 300 ids"),
}


def set_value(tensors, name, index, value):
    """Return tensors with one element of tensor name replaced."""
    out = []
    for n, v, d in tensors:
        if n == name:
            v = v.copy()
            v[index] = value
        out.append((n, v, d))
    return out


def write_hostile(kind, outdir):
    """Write hostile checkpoint kind into outdir."""
    base, _ = HOSTILE[kind]
    config, tensors, tokenizer, s = gen_checkpoint.build_preset(base)
    single = os.path.join(outdir, safetensors_io.SINGLE_NAME)
    norm = "model.norm.weight"

    if kind == "nan-weight":
        tensors = set_value(tensors, "model.layers.1.mlp.experts.2.down_proj.weight", (3, 7),
                            np.nan)
    elif kind == "inf-weight-bf16":
        tensors = set_value(tensors, "model.embed_tokens.weight", (5, 2), np.inf)
    elif kind == "inf-weight-f16":
        tensors = set_value(tensors, "model.layers.0.mlp.experts.3.up_proj_b.weight", (0, 1),
                            -np.inf)
    elif kind == "tokenizer-unigram":
        vocab = tokenizer["model"]["vocab"]
        tokenizer["model"] = {"type": "Unigram", "unk_id": None,
                              "vocab": [[tok, -1.0] for tok in vocab]}
    elif kind == "eos-outside-vocab":
        config["eos_token_id"] = 5000
    gen_checkpoint.write_checkpoint(outdir, config, tensors, tokenizer, s["shards"])

    if kind == "dtype-undefined":
        def edit(header):
            header[norm]["dtype"] = "Q4_K"
        gen_checkpoint._rewrite_header(single, edit)
    elif kind == "offsets-beyond-data":
        size = os.path.getsize(single)

        def edit(header):
            header[norm]["data_offsets"] = [size, size + 4 * s["hidden"]]
        gen_checkpoint._rewrite_header(single, edit)
    elif kind == "offsets-end-before-begin":
        def edit(header):
            begin, end = header[norm]["data_offsets"]
            header[norm]["data_offsets"] = [end, begin]
        gen_checkpoint._rewrite_header(single, edit)
    elif kind == "header-not-json":
        _, data = gen_checkpoint._read_raw(single)
        text = b"{not json" + b" " * 7
        safetensors_io.write_raw(single, text, data)


def preset_arrays(name):
    """Return (config, {name: (array, dtype)}, tokenizer) of a preset."""
    config, tensors, tokenizer, _ = gen_checkpoint.build_preset(name)
    return config, {n: (v, d) for n, v, d in tensors}, tokenizer


def write_dir(outdir, config, arrays, tokenizer):
    tensors = [(n, arrays[n][0], arrays[n][1]) for n in sorted(arrays)]
    gen_checkpoint.write_checkpoint(outdir, config, tensors, tokenizer)


def expert_tensors(arrays, layers, expert):
    """Names of one expert's FFN tensors (full or adapter) in every layer."""
    return [n for n in arrays if any(n.startswith(f"model.layers.{i}.mlp.experts.{expert}.")
                                     for i in range(layers))]


def renumber(name, old, new):
    return name.replace(f".mlp.experts.{old}.", f".mlp.experts.{new}.")


def select_experts(config, arrays, keep, names):
    """Checkpoint with only experts keep (in that order), renumbered 0.."""
    layers = config["num_hidden_layers"]
    out_config = dict(config)
    out_config["num_experts"] = len(keep)
    out_config["num_experts_per_tok"] = min(config["num_experts_per_tok"], len(keep))
    out_config["expert_names"] = names
    if "expert_ranks" in config:
        out_config["expert_ranks"] = [config["expert_ranks"][e] for e in keep]
    out = {}
    for n, (v, d) in arrays.items():
        if ".mlp.experts." in n:
            continue
        if n.endswith(".mlp.gate.weight"):
            v = v[keep]
        out[n] = (v, d)
    for new, old in enumerate(keep):
        for n in expert_tensors(arrays, layers, old):
            out[renumber(n, old, new)] = arrays[n]
    return out_config, out


def write_packages(outdir):
    """Expert packages cut from a bigger model, and the models they must give.

    base_full is flex_olmo_f32 without its expert 3; pkg_full is public plus
    expert 3; adding pkg_full to base_full must give flex_olmo_f32 exactly,
    with the router row last.  The same for the FlexMoRE adapter of rank 16
    of flexmore_ranks_f32.  pkg_mismatch is pkg_full with one bit of
    model.norm.weight changed.
    """
    config, arrays, tokenizer = preset_arrays("flex_olmo_f32")
    names = ["public", "expert_1", "expert_2", "expert_3"]
    c, a = select_experts(config, arrays, [0, 1, 2], names[:3])
    write_dir(os.path.join(outdir, "base_full"), c, a, tokenizer)
    c, a = select_experts(config, arrays, [0, 3], ["public", "expert_3"])
    write_dir(os.path.join(outdir, "pkg_full"), c, a, tokenizer)
    c, a = select_experts(config, arrays, [0, 1, 2, 3], names)
    write_dir(os.path.join(outdir, "combined_full"), c, a, tokenizer)
    c, a = select_experts(config, arrays, [0, 1, 3], ["public", "expert_1", "expert_3"])
    write_dir(os.path.join(outdir, "without_2"), c, a, tokenizer)

    c, a = select_experts(config, arrays, [0, 3], ["public", "expert_3"])
    v, d = a["model.norm.weight"]
    v = v.copy()
    v[0] = np.nextafter(v[0], np.float32(10))
    a["model.norm.weight"] = (v, d)
    write_dir(os.path.join(outdir, "pkg_mismatch"), c, a, tokenizer)

    # FlexMoRE: ranks [0, 1, 3, 16, 0]; the package carries the rank-16 adapter.
    config, arrays, tokenizer = preset_arrays("flexmore_ranks_f32")
    names = ["public", "e1", "e2", "r16", "e4"]
    c, a = select_experts(config, arrays, [0, 1, 2, 4], ["public", "e1", "e2", "e4"])
    write_dir(os.path.join(outdir, "base_ranks"), c, a, tokenizer)
    c, a = select_experts(config, arrays, [0, 3], ["public", "r16"])
    write_dir(os.path.join(outdir, "pkg_adapter"), c, a, tokenizer)
    c, a = select_experts(config, arrays, [0, 1, 2, 4, 3], ["public", "e1", "e2", "e4", "r16"])
    write_dir(os.path.join(outdir, "combined_ranks"), c, a, tokenizer)


def write_lowrank(outdir):
    """flex_olmo_f32 with expert 2 = W_0 + an exact rank-4 delta, and numpy's optima."""
    config, arrays, tokenizer = preset_arrays("flex_olmo_f32")
    rng = np.random.default_rng(7)
    layers = config["num_hidden_layers"]
    for i in range(layers):
        for proj in PROJS:
            w0 = arrays[f"model.layers.{i}.mlp.experts.0.{proj}.weight"][0]
            b = rng.standard_normal((w0.shape[0], 4)) * 0.1
            a = rng.standard_normal((4, w0.shape[1])) * 0.1
            name = f"model.layers.{i}.mlp.experts.2.{proj}.weight"
            arrays[name] = ((w0.astype(np.float64) + b @ a).astype(np.float32), "F32")
    write_dir(outdir, config, arrays, tokenizer)

    # Optimal relative errors from the stored float32 values, as the server sees them.
    expected = []
    for expert, ranks in ((1, (4, 8)), (2, (4,))):
        for i in range(layers):
            for proj in PROJS:
                w0 = arrays[f"model.layers.{i}.mlp.experts.0.{proj}.weight"][0]
                we = arrays[f"model.layers.{i}.mlp.experts.{expert}.{proj}.weight"][0]
                delta = we.astype(np.float64) - w0.astype(np.float64)
                s = np.linalg.svd(delta, compute_uv=False)
                for r in ranks:
                    err = np.sqrt(np.sum(s[r:] ** 2)) / np.sqrt(np.sum(s ** 2))
                    expected.append({"expert": f"expert_{expert}", "rank": r, "layer": i,
                                     "matrix": proj, "error": float(err)})
    with open(os.path.join(outdir, "expected_errors.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1)


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    outdir = argv[1]
    for kind in HOSTILE:
        write_hostile(kind, os.path.join(outdir, "hostile", kind))
    write_packages(os.path.join(outdir, "packages"))
    write_lowrank(os.path.join(outdir, "lowrank"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
