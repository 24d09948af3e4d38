#!/usr/bin/python3
"""Self-checks for the reference forward pass, safetensors I/O and the generator.

Plain Python: prints one line per check, then "N passed, N failed", and
exits non-zero on any failure.  Hand-computed values are worked out in
float64 from the formulas in reference.py.
"""

import hashlib
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_checkpoint  # noqa: E402
import reference  # noqa: E402
import safetensors_io  # noqa: E402

RESULTS = {"passed": 0, "failed": 0}


def check(name, condition, detail=""):
    """Record and print one check."""
    status = "ok  " if condition else "FAIL"
    RESULTS["passed" if condition else "failed"] += 1
    print(f"{status} {name}" + (f": {detail}" if detail else ""))


def close(a, b, tol):
    return np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                       rtol=0, atol=tol)


def test_rms_norm_eps():
    x = np.full(2048, 0.001)
    y = reference.rms_norm(x, np.ones(2048), 1e-6)
    check("rms_norm eps 1e-6", close(y, 0.70711, 5e-6), f"{y[0]:.6f}")
    y = reference.rms_norm(x, np.ones(2048), 1e-5)
    check("rms_norm eps 1e-5", close(y, 0.30151, 5e-6), f"{y[0]:.6f}")


def test_rope_rotate_half():
    q = np.array([[[1.0, 0.0, 0.0, 0.0]]])
    out = reference.rope_rotate_half(q, np.array([1]), 10000.0)[0, 0]
    check("rope rotate-half pairing", close(out, [0.5403, 0, 0.8415, 0], 5e-5),
          np.array2string(out, precision=4))
    out0 = reference.rope_rotate_half(q, np.array([0]), 10000.0)[0, 0]
    check("rope position 0 is identity", close(out0, [1, 0, 0, 0], 0))


def test_router():
    chosen, weights = reference.route([2, 1, 0, -1], 2, False)
    check("router top-2 indices", list(chosen) == [0, 1], str(list(chosen)))
    check("router top-2 unnormalised weights", close(weights, [0.6439, 0.2369], 5e-5),
          np.array2string(weights, precision=4))
    chosen, weights = reference.route([2, 1, 0, -1], 2, True)
    check("router top-2 normalised weights", close(weights, [0.7311, 0.2689], 5e-5),
          np.array2string(weights, precision=4))
    chosen, _ = reference.route([1, 1, 1, 0], 2, False)
    check("router ties lowest index first", list(chosen) == [0, 1], str(list(chosen)))
    chosen, weights = reference.route([2, 1, 0, -1], 2, False,
                                      allowed=[False, True, False, False])
    check("router allowed mask shrinks k", list(chosen) == [1], str(list(chosen)))
    check("router single expert weight", close(weights, [1.0], 1e-15), str(weights))


def test_bf16_round_trip():
    values = np.array([1.0, -2.5, 0.0, -0.0, np.inf, -np.inf, 3.140625], dtype=np.float32)
    subnormal = np.array([0x00010000], dtype=np.uint32).view(np.float32)
    values = np.concatenate([values, subnormal])
    back = safetensors_io.bf16_bits_to_float32(safetensors_io.float32_to_bf16_bits(values))
    same_bits = np.array_equal(back.view(np.uint32), values.view(np.uint32))
    check("bf16 representable values exact", same_bits, str(back.tolist()))

    # ulp(1) in bfloat16 is 2^-7, and halfway cases round to the even mantissa.
    halfway = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20], dtype=np.float32)
    back = safetensors_io.bf16_bits_to_float32(safetensors_io.float32_to_bf16_bits(halfway))
    check("bf16 round to nearest even",
          close(back, [1.0, 1 + 2 ** -6, 1 + 2 ** -7], 0), str(back))
    nan = safetensors_io.bf16_bits_to_float32(
        safetensors_io.float32_to_bf16_bits(np.array([np.nan], dtype=np.float32)))
    check("bf16 keeps NaN", bool(np.isnan(nan[0])))
    big = safetensors_io.bf16_bits_to_float32(
        safetensors_io.float32_to_bf16_bits(np.array([3.4e38], dtype=np.float32)))
    check("bf16 overflow rounds to inf", bool(np.isinf(big[0])), str(big))


def test_safetensors_round_trip(tmp):
    rng = np.random.default_rng(7)
    tensors = [("a", rng.standard_normal((3, 5)).astype(np.float32), "F32"),
               ("b", rng.standard_normal((4,)).astype(np.float32), "BF16"),
               ("c", rng.standard_normal((2, 2, 2)).astype(np.float32), "F16")]
    path = os.path.join(tmp, "rt.safetensors")
    safetensors_io.save_file(tensors, path, {"format": "pt"})
    arrays, dtypes = safetensors_io.load_file(path)
    check("safetensors F32 exact", np.array_equal(arrays["a"], tensors[0][1]))
    bf16 = safetensors_io.bf16_bits_to_float32(safetensors_io.float32_to_bf16_bits(tensors[1][1]))
    check("safetensors BF16 exact after rounding", np.array_equal(arrays["b"], bf16))
    check("safetensors F16 exact after rounding",
          np.array_equal(arrays["c"], tensors[2][1].astype(np.float16).astype(np.float32)))
    check("safetensors dtypes kept", dtypes == {"a": "F32", "b": "BF16", "c": "F16"}, str(dtypes))
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    check("safetensors header aligned to 8", header_len % 8 == 0, str(header_len))

    shard_dir = os.path.join(tmp, "sharded")
    os.makedirs(shard_dir)
    names = safetensors_io.save_sharded(tensors, shard_dir, 3)
    sharded, _ = safetensors_io.load_checkpoint_tensors(shard_dir)
    check("sharded write gives 3 shards", len(names) == 3, str(names))
    check("sharded round trip", all(np.array_equal(sharded[k], arrays[k]) for k in arrays))


def logits_match(dir_a, dir_b, ids, tol):
    a = reference.Model.load(dir_a).logits_all(ids)
    b = reference.Model.load(dir_b).logits_all(ids)
    err = np.max(np.abs(a - b)) / np.max(np.abs(a))
    return err <= tol, f"relative error {err:.2e}"


def rewrite_as_per_expert(src_dir, dst_dir):
    """Copy a checkpoint as a flex_olmo per-expert checkpoint in F32.

    Fused experts are split and low-rank experts are written as W0 + B A.
    """
    model = reference.Model.load(src_dir)
    with open(os.path.join(src_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    arrays, _ = safetensors_io.load_checkpoint_tensors(src_dir)
    tensors = []
    for name, value in arrays.items():
        if ".mlp.experts." in name:
            continue
        tensors.append((name, value, "F32"))
    for i, layer in enumerate(model.weights["layers"]):
        for e, mats in enumerate(layer["experts"]):
            for proj, w in zip(("gate", "up", "down"), mats):
                tensors.append((f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight",
                                w.astype(np.float32), "F32"))
    config["model_type"] = "flex_olmo"
    config["architectures"] = ["FlexOlmoForCausalLM"]
    config.pop("expert_ranks", None)
    os.makedirs(dst_dir)
    safetensors_io.save_file(sorted(tensors, key=lambda t: t[0]),
                             os.path.join(dst_dir, "model.safetensors"))
    with open(os.path.join(dst_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    with open(os.path.join(src_dir, "tokenizer.json"), "rb") as f:
        tok = f.read()
    with open(os.path.join(dst_dir, "tokenizer.json"), "wb") as f:
        f.write(tok)


def test_layouts(tmp):
    ids = [5, 17, 299, 42, 0, 255, 100, 7, 7, 7, 260, 3]
    presets = os.path.join(tmp, "presets")
    for name in gen_checkpoint.PRESETS:
        if name != "default":
            gen_checkpoint.generate_preset(name, os.path.join(presets, name))

    src = os.path.join(presets, "flexmore_ranks_f32")
    dst = os.path.join(tmp, "materialised")
    rewrite_as_per_expert(src, dst)
    ok, detail = logits_match(src, dst, ids, 1e-6)
    check("factorised equals materialised flex_olmo", ok, detail)

    src = os.path.join(presets, "flex_olmo_fused_bf16")
    dst = os.path.join(tmp, "unfused")
    rewrite_as_per_expert(src, dst)
    ok, detail = logits_match(src, dst, ids, 0.0)
    check("fused equals per-expert", ok, detail)

    model = reference.Model.load(os.path.join(presets, "flex_olmo_f32"))
    full = model.logits_all(ids)
    prefix = model.logits_all(ids[:5])
    check("reference is causal", close(full[:5], prefix, 1e-12))
    everyone = model.expert_mask(model.config["expert_names"])
    check("allowing every expert equals no mask",
          close(model.logits_all(ids, everyone), full, 1e-12))
    only = model.logits_all(ids, model.expert_mask(["public"]))
    check("single expert changes logits", not np.allclose(only, full))

    model = reference.Model.load(os.path.join(presets, "padded_vocab"))
    logits = model.logits_all(ids)
    raw = np.argmax(logits, axis=1)
    chosen = [model.argmax_sampleable(row) for row in logits]
    check("padded rows win the raw argmax", bool(np.all(raw >= 300)), str(raw[:4]))
    check("greedy skips padded rows", all(c < 300 for c in chosen), str(chosen[:4]))
    cont, finish = model.greedy([1, 2, 3], 8, stop_at_eos=False)
    check("greedy gives 8 ids", len(cont) == 8 and finish == "max_tokens", f"{cont} {finish}")
    forced, rows = model.teacher_forced([1, 2, 3], 8)
    check("teacher forcing ids match greedy", forced == cont, str(forced))
    check("teacher forcing rows match ids",
          all(model.argmax_sampleable(r) == c for r, c in zip(rows, cont)))

    tiny_ctx = reference.Model.load(os.path.join(presets, "flex_olmo_f32"))
    tiny_ctx.config["max_position_embeddings"] = 6
    cont, finish = tiny_ctx.greedy([1, 2, 3, 4], 10, stop_at_eos=False)
    check("greedy stops at the context", len(cont) == 2 and finish == "length", finish)


def test_determinism(tmp):
    digests = []
    for run in range(2):
        out = os.path.join(tmp, f"det{run}")
        gen_checkpoint.generate_preset("flexmore_f16_tied", out)
        h = hashlib.sha256()
        for file_name in sorted(os.listdir(out)):
            with open(os.path.join(out, file_name), "rb") as f:
                h.update(f.read())
        digests.append(h.hexdigest())
    check("generator is deterministic", digests[0] == digests[1], digests[0][:16])


def test_corruptions_rejected(tmp):
    for kind, (_, expected, _) in gen_checkpoint.CORRUPTIONS.items():
        out = os.path.join(tmp, "corrupt", kind)
        gen_checkpoint.corrupt(kind, out)
        try:
            reference.Model.load(out)
            check(f"corrupt {kind} rejected", False, "loaded without error")
        except reference.CheckpointError as exc:
            check(f"corrupt {kind} rejected", expected in str(exc), str(exc))


def main():
    test_rms_norm_eps()
    test_rope_rotate_half()
    test_router()
    test_bf16_round_trip()
    with tempfile.TemporaryDirectory(prefix="flexmore-ref-") as tmp:
        test_safetensors_round_trip(tmp)
        test_layouts(tmp)
        test_determinism(tmp)
        test_corruptions_rejected(tmp)
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    return 1 if RESULTS["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
