#!/usr/bin/python3
"""Float64 reference forward pass for FlexOlmo / FlexMoRE checkpoints.

The C engine is compared against this code, so it favours plain,
step-by-step numpy over speed.  Every weight is widened to float64,
low-rank experts are materialised as W0 + B A, and logits are recomputed
from scratch for the whole sequence.

The forward pass, per position (weights are [out, in], y = W x):

    h = embed_tokens[id]                        no scaling
    per layer:
        a = attention(h)                        reads the raw residual stream
        h = h + RMSNorm_post_attention(a)
        h = h + RMSNorm_post_feedforward(MoE(h))
    logits = lm_head . RMSNorm_final(h)          embed_tokens when tied

Attention applies RMSNorm with weights to the whole q and k projections
(before splitting heads), then rotate-half RoPE, grouped-query causal
softmax attention with scale 1/sqrt(head_dim), then o_proj.  The MoE
block takes the softmax over the allowed experts' router logits, keeps
the top k (ties go to the lower index), optionally renormalises them,
and sums the chosen SwiGLU experts weighted by those probabilities.

Command line:
    reference.py DIR --ids 1,2,3 [--experts public,expert_2]
    reference.py DIR --ids 1,2,3 --greedy 16
"""

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402


class CheckpointError(ValueError):
    """A checkpoint's config, tensors or tokenizer are invalid or unsupported."""


# ---------------------------------------------------------------- kernels
#
# The kernels keep float32 inputs in float32 (so that a float32 variant of
# the model can show what error an fp32 engine should reach) and compute
# everything else in float64.


def as_float(x):
    """x as a float array: float32 and float64 stay as they are, the rest becomes float64."""
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)


def rms_norm(x, weight, eps):
    """RMSNorm over the last axis: weight * x / sqrt(mean(x^2) + eps)."""
    x = as_float(x)
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + x.dtype.type(eps))
    return as_float(weight).astype(x.dtype) * (x * scale)


def rope_rotate_half(x, positions, theta):
    """Apply rotate-half (NeoX) RoPE to x [n, heads, head_dim] at the given positions.

    Dimension i of the first half pairs with dimension i + head_dim/2, at
    angle position * theta^(-2i/head_dim).
    """
    x = as_float(x)
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = theta ** (-2.0 * np.arange(half, dtype=np.float64) / head_dim)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(angles)[:, None, :].astype(x.dtype)
    sin = np.sin(angles)[:, None, :].astype(x.dtype)
    x1 = x[..., :half]
    x2 = x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def route(router_logits, k, norm_topk_prob, allowed=None):
    """Choose experts for one token: softmax over allowed experts, then top k.

    Returns (expert indices, weights).  Excluded experts get logit -inf,
    k shrinks to the number of allowed experts, and equal probabilities
    go to the lower expert index first.
    """
    z = np.array(router_logits, dtype=np.float64)
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if not allowed.any():
            raise ValueError("no expert is allowed")
        z[~allowed] = -np.inf
        k = min(k, int(allowed.sum()))
    p = np.exp(z - np.max(z))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    chosen = order[:k]
    weights = p[chosen]
    if norm_topk_prob:
        weights = weights / weights.sum()
    return chosen, weights


def silu(u):
    """SiLU(u) = u * sigmoid(u), written to stay finite for large |u|."""
    return u * 0.5 * (1.0 + np.tanh(0.5 * u))


def softmax(scores, axis=-1):
    """Numerically stable softmax, in which -inf entries get probability 0."""
    shifted = scores - np.max(scores, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


# ---------------------------------------------------------------- config


def _require(config, key, kind):
    if key not in config or config[key] is None:
        raise CheckpointError(f"config.json: missing {key}")
    value = config[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise CheckpointError(f"config.json: {key} must be an integer, not {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise CheckpointError(f"config.json: {key} must be a number, not {value!r}")
    return value


def _rope_theta(config):
    """Read rope_theta from the top level or rope_parameters, rejecting RoPE scaling."""
    scaling = config.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise CheckpointError(f"config.json: unsupported rope_scaling type {kind!r}")
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        kind = params.get("rope_type", "default")
        if kind != "default":
            raise CheckpointError(f"config.json: unsupported rope_parameters.rope_type {kind!r}")
        if params.get("rope_theta") is not None:
            return float(params["rope_theta"])
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    raise CheckpointError("config.json: missing rope_theta (top level or rope_parameters)")


def parse_config(config):
    """Validate config.json and return a flat dict of the hyperparameters used here."""
    model_type = config.get("model_type")
    if model_type not in ("flex_olmo", "flexmore"):
        raise CheckpointError(f"config.json: unsupported model_type {model_type!r}")

    c = {"model_type": model_type}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_experts_per_tok"):
        c[key] = _require(config, key, int)
    if config.get("num_experts") is not None:
        c["num_experts"] = _require(config, "num_experts", int)
    else:
        c["num_experts"] = _require(config, "num_local_experts", int)
    kv = config.get("num_key_value_heads")
    c["num_key_value_heads"] = c["num_attention_heads"] if kv is None else _require(
        config, "num_key_value_heads", int)
    c["rms_norm_eps"] = float(_require(config, "rms_norm_eps", float))
    c["rope_theta"] = _rope_theta(config)
    c["max_position_embeddings"] = _require(config, "max_position_embeddings", int)
    # Absent flags default to false, the value FlexOlmo-7x7B uses for both.
    c["norm_topk_prob"] = bool(config.get("norm_topk_prob", False))
    c["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))

    heads = c["num_attention_heads"]
    if config.get("head_dim") is not None:
        c["head_dim"] = _require(config, "head_dim", int)
    elif c["hidden_size"] % heads != 0:
        raise CheckpointError(
            f"config.json: hidden_size {c['hidden_size']} is not a multiple of "
            f"num_attention_heads {heads}")
    else:
        c["head_dim"] = c["hidden_size"] // heads
    if c["head_dim"] % 2 != 0:
        raise CheckpointError(f"config.json: head_dim {c['head_dim']} must be even for RoPE")
    if heads % c["num_key_value_heads"] != 0:
        raise CheckpointError(
            f"config.json: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {c['num_key_value_heads']}")
    if not 1 <= c["num_experts_per_tok"] <= c["num_experts"]:
        raise CheckpointError(
            f"config.json: num_experts_per_tok {c['num_experts_per_tok']} must be in "
            f"[1, {c['num_experts']}]")

    n_experts = c["num_experts"]
    if model_type == "flexmore":
        ranks = config.get("expert_ranks")
        if not isinstance(ranks, list) or len(ranks) != n_experts:
            raise CheckpointError(
                f"config.json: expert_ranks must list {n_experts} ranks, not {ranks!r}")
        if ranks[0] != 0 or any((not isinstance(r, int)) or r < 0 for r in ranks):
            raise CheckpointError(
                f"config.json: expert_ranks {ranks} must be non-negative integers with "
                f"expert 0 at rank 0")
        c["expert_ranks"] = list(ranks)
    else:
        c["expert_ranks"] = [0] * n_experts

    eos = config.get("eos_token_id")
    if eos is None:
        c["eos_token_ids"] = []
    elif isinstance(eos, list):
        c["eos_token_ids"] = list(eos)
    else:
        c["eos_token_ids"] = [eos]
    names = config.get("expert_names")
    if names is None:
        names = ["public"] + [f"expert_{e}" for e in range(1, n_experts)]
    elif len(names) != n_experts or len(set(names)) != n_experts:
        raise CheckpointError(f"config.json: expert_names must be {n_experts} distinct names")
    c["expert_names"] = list(names)
    return c


# ---------------------------------------------------------------- tokenizer


def tokenizer_ids(path, vocab_size):
    """Return a bool mask [vocab_size] of the ids a tokenizer.json defines.

    Also rejects tokenizer types flexmore does not implement, so that the
    hostile checkpoints fail here as they must in the engine.
    """
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"tokenizer.json: unsupported model type {model.get('type')!r}")
    if tok.get("normalizer") is not None:
        raise CheckpointError(
            f"tokenizer.json: unsupported normalizer {tok['normalizer'].get('type')!r}")
    pre = tok.get("pre_tokenizer")
    pieces = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    for piece in pieces:
        if piece is not None and piece.get("type") not in ("Split", "ByteLevel"):
            raise CheckpointError(
                f"tokenizer.json: unsupported pre_tokenizer {piece.get('type')!r}")
    decoder = tok.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise CheckpointError(f"tokenizer.json: unsupported decoder {decoder.get('type')!r}")

    ids = list(model.get("vocab", {}).values())
    ids += [t["id"] for t in tok.get("added_tokens", [])]
    mask = np.zeros(vocab_size, dtype=bool)
    for i in ids:
        if not 0 <= i < vocab_size:
            raise CheckpointError(f"tokenizer.json: id {i} is outside vocab_size {vocab_size}")
        mask[i] = True
    return mask


# ---------------------------------------------------------------- weights


class _TensorSource:
    """Hands out checkpoint tensors as float64, checking shapes and use."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.used = set()

    def has(self, name):
        return name in self.arrays

    def get(self, name, shape):
        if name not in self.arrays:
            raise CheckpointError(f"missing tensor {name}")
        value = self.arrays[name]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name} has shape {list(value.shape)}, expected {list(shape)}")
        self.used.add(name)
        return value.astype(np.float64)

    def check_all_used(self):
        extra = sorted(set(self.arrays) - self.used)
        if extra:
            raise CheckpointError(f"unexpected tensors: {', '.join(extra[:5])}")


def _load_experts(src, c, prefix):
    """Return [(gate, up, down)] float64 for every expert of one layer."""
    hidden, inter, n_experts = c["hidden_size"], c["intermediate_size"], c["num_experts"]
    fused_name = prefix + "mlp.experts.gate_up_proj"
    if src.has(fused_name):
        if any(c["expert_ranks"]):
            raise CheckpointError(f"{fused_name}: the fused form contains full-size experts only")
        gate_up = src.get(fused_name, (n_experts, 2 * inter, hidden))
        down = src.get(prefix + "mlp.experts.down_proj", (n_experts, hidden, inter))
        return [(gate_up[e, :inter], gate_up[e, inter:], down[e]) for e in range(n_experts)]

    experts = []
    shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    for e, rank in enumerate(c["expert_ranks"]):
        base = f"{prefix}mlp.experts.{e}."
        mats = []
        for proj in ("gate", "up", "down"):
            out_dim, in_dim = shapes[proj]
            if rank == 0:
                mats.append(src.get(f"{base}{proj}_proj.weight", (out_dim, in_dim)))
            else:
                a = src.get(f"{base}{proj}_proj_a.weight", (rank, in_dim))
                b = src.get(f"{base}{proj}_proj_b.weight", (out_dim, rank))
                mats.append(experts[0][len(mats)] + b @ a)
        experts.append(tuple(mats))
    return experts


def load_weights(arrays, c):
    """Bind checkpoint tensors to the model structure, as float64 arrays."""
    src = _TensorSource(arrays)
    hidden, vocab = c["hidden_size"], c["vocab_size"]
    q_dim = c["num_attention_heads"] * c["head_dim"]
    kv_dim = c["num_key_value_heads"] * c["head_dim"]

    w = {"embed": src.get("model.embed_tokens.weight", (vocab, hidden)),
         "final_norm": src.get("model.norm.weight", (hidden,))}
    if src.has("lm_head.weight"):
        w["lm_head"] = src.get("lm_head.weight", (vocab, hidden))
    elif c["tie_word_embeddings"]:
        w["lm_head"] = w["embed"]
    else:
        raise CheckpointError("missing tensor lm_head.weight and tie_word_embeddings is false")

    layers = []
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        att = p + "self_attn."
        layers.append({
            "q": src.get(att + "q_proj.weight", (q_dim, hidden)),
            "k": src.get(att + "k_proj.weight", (kv_dim, hidden)),
            "v": src.get(att + "v_proj.weight", (kv_dim, hidden)),
            "o": src.get(att + "o_proj.weight", (hidden, q_dim)),
            "q_norm": src.get(att + "q_norm.weight", (q_dim,)),
            "k_norm": src.get(att + "k_norm.weight", (kv_dim,)),
            "post_attention_norm": src.get(p + "post_attention_layernorm.weight", (hidden,)),
            "post_feedforward_norm": src.get(p + "post_feedforward_layernorm.weight", (hidden,)),
            "router": src.get(p + "mlp.gate.weight", (c["num_experts"], hidden)),
            "experts": _load_experts(src, c, p),
        })
    w["layers"] = layers
    src.check_all_used()
    return w


# ---------------------------------------------------------------- model


class Model:
    """A loaded checkpoint and its float64 forward pass.

    The kernels are methods so that a test can subclass the model with a
    deliberate mistake and check that the comparison harness catches it.
    """

    def __init__(self, config, weights, sampleable):
        self.config = config
        self.weights = weights
        self.sampleable = sampleable

    @classmethod
    def load(cls, directory):
        """Load config.json, the safetensors tensors and tokenizer.json from directory."""
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            config = parse_config(json.load(f))
        try:
            arrays, _ = safetensors_io.load_checkpoint_tensors(directory)
        except safetensors_io.SafetensorsError as exc:
            raise CheckpointError(str(exc)) from exc
        weights = load_weights(arrays, config)
        sampleable = tokenizer_ids(os.path.join(directory, "tokenizer.json"),
                                   config["vocab_size"])
        return cls(config, weights, sampleable)

    # The kernels, overridable for mutation tests.

    def rms_norm(self, x, weight):
        return rms_norm(x, weight, self.config["rms_norm_eps"])

    def rope(self, x, positions):
        return rope_rotate_half(x, positions, self.config["rope_theta"])

    def route(self, router_logits, allowed):
        return route(router_logits, self.config["num_experts_per_tok"],
                     self.config["norm_topk_prob"], allowed)

    def kv_head_of(self, head):
        """Map query head h to kv head h // (heads / kv_heads).

        This is the grouping of transformers' repeat_kv, which repeats each
        kv head for consecutive query heads.
        """
        c = self.config
        return head // (c["num_attention_heads"] // c["num_key_value_heads"])

    # The forward pass.

    def attention(self, layer, h):
        """Compute causal grouped-query attention over h [n, hidden], returning [n, hidden]."""
        c = self.config
        n = h.shape[0]
        d = c["head_dim"]
        q = self.rms_norm(h @ layer["q"].T, layer["q_norm"])
        k = self.rms_norm(h @ layer["k"].T, layer["k_norm"])
        v = h @ layer["v"].T
        positions = np.arange(n)
        q = self.rope(q.reshape(n, c["num_attention_heads"], d), positions)
        k = self.rope(k.reshape(n, c["num_key_value_heads"], d), positions)
        v = v.reshape(n, c["num_key_value_heads"], d)

        future = np.triu(np.ones((n, n), dtype=bool), k=1)
        out = np.empty((n, c["num_attention_heads"], d), dtype=h.dtype)
        for head in range(c["num_attention_heads"]):
            g = self.kv_head_of(head)
            scores = (q[:, head, :] @ k[:, g, :].T) / h.dtype.type(math.sqrt(d))
            scores[future] = -np.inf
            out[:, head, :] = softmax(scores) @ v[:, g, :]
        return out.reshape(n, -1) @ layer["o"].T

    def moe(self, layer, h, allowed, trace=None):
        """Compute the mixture of SwiGLU experts over h [n, hidden], returning [n, hidden].

        When trace is a list, (position, chosen experts, weights) is appended
        for every position.
        """
        router_logits = h @ layer["router"].T
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            chosen, weights = self.route(router_logits[t], allowed)
            if trace is not None:
                trace.append((t, [int(e) for e in chosen], [float(w) for w in weights]))
            for e, p in zip(chosen, weights):
                gate, up, down = layer["experts"][e]
                out[t] += p * (down @ (silu(gate @ h[t]) * (up @ h[t])))
        return out

    def hidden_states(self, ids, allowed=None, trace=None):
        """Final-normed hidden states [n, hidden] for every position of ids.

        When trace is a list, moe appends each layer's routing to it, layer
        after layer.
        """
        c = self.config
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("ids must be a non-empty list")
        if ids.min() < 0 or ids.max() >= c["vocab_size"]:
            raise ValueError(f"ids must lie in [0, {c['vocab_size']})")
        if len(ids) > c["max_position_embeddings"]:
            raise ValueError(
                f"{len(ids)} ids exceed max_position_embeddings {c['max_position_embeddings']}")

        h = self.weights["embed"][ids].copy()
        for layer in self.weights["layers"]:
            h = h + self.rms_norm(self.attention(layer, h), layer["post_attention_norm"])
            h = h + self.rms_norm(self.moe(layer, h, allowed, trace), layer["post_feedforward_norm"])
        return self.rms_norm(h, self.weights["final_norm"])

    def logits_all(self, ids, allowed=None):
        """Logits [n, vocab_size] at every position of ids.

        allowed is a bool mask over experts (None: all experts).
        """
        return self.hidden_states(ids, allowed) @ self.weights["lm_head"].T

    def routing(self, ids, allowed=None):
        """Return the router's choices as a list of (position, layer, experts, weights).

        experts are indices in the order route() chose them (highest weight
        first) and weights their routing weights, one tuple per position and
        layer, ordered by position and then layer.
        """
        trace = []
        self.hidden_states(ids, allowed, trace)
        n = len(ids)
        rows = []
        for i, (position, experts, weights) in enumerate(trace):
            rows.append((position, i // n, experts, weights))
        rows.sort(key=lambda r: (r[0], r[1]))
        return rows

    def expert_mask(self, names):
        """Bool mask over experts from a list of expert names (None: all)."""
        if names is None:
            return None
        known = self.config["expert_names"]
        mask = np.zeros(len(known), dtype=bool)
        for name in names:
            if name not in known:
                raise ValueError(f"unknown expert {name!r}; experts are {', '.join(known)}")
            mask[known.index(name)] = True
        return mask

    def argmax_sampleable(self, logits):
        """Return the greedy choice among ids the tokenizer defines, the lowest id on ties."""
        masked = np.where(self.sampleable, logits, -np.inf)
        return int(np.argmax(masked))

    def greedy(self, ids, max_tokens, allowed=None, stop_at_eos=True):
        """Generate greedily with the engine's stop rules; returns (new ids, finish reason).

        Generation stops at an eos id (not returned), after max_tokens ids,
        or when the context of max_position_embeddings positions is full.
        """
        seq = list(ids)
        out = []
        while len(out) < max_tokens:
            if len(seq) >= self.config["max_position_embeddings"]:
                return out, "length"
            nxt = self.argmax_sampleable(self.logits_all(seq, allowed)[-1])
            if stop_at_eos and nxt in self.config["eos_token_ids"]:
                return out, "eos"
            out.append(nxt)
            seq.append(nxt)
        return out, "max_tokens"

    def teacher_forced(self, prompt, steps, allowed=None):
        """Continue prompt greedily for steps ids, ignoring eos, and return every step's logits.

        Returns (continuation ids, logits [steps, vocab]) where row i contains
        the logits after prompt + continuation[:i].  Because attention is
        causal, one forward pass over the whole sequence gives every row.
        """
        seq = list(prompt)
        for _ in range(steps):
            seq.append(self.argmax_sampleable(self.logits_all(seq, allowed)[-1]))
        logits = self.logits_all(seq[:-1], allowed)[len(prompt) - 1:]
        return seq[len(prompt):], logits


# ---------------------------------------------------------------- CLI


def parse_ids(text):
    """Parse "1,2,3" into a list of ints."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid id list {text!r}: {exc}") from exc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="checkpoint directory (config.json, safetensors, "
                        "tokenizer.json)")
    parser.add_argument("--ids", type=parse_ids, required=True, help="comma-separated token ids")
    parser.add_argument("--experts", help="comma-separated expert names to allow (default: all)")
    parser.add_argument("--route", action="store_true",
                        help="print the routing of every position and layer as JSON "
                        "([position, layer, expert names, weights] rows) instead of logits")
    parser.add_argument("--greedy", type=int, metavar="N",
                        help="print up to N greedy ids as JSON instead of logits")
    parser.add_argument("--no-eos-stop", action="store_true",
                        help="with --greedy, keep generating past eos ids")
    args = parser.parse_args(argv)

    try:
        model = Model.load(args.directory)
        allowed = model.expert_mask(args.experts.split(",") if args.experts else None)
        if args.route:
            names = model.config["expert_names"]
            print(json.dumps([[p, l, [names[e] for e in experts], weights]
                              for p, l, experts, weights in model.routing(args.ids, allowed)]))
        elif args.greedy is not None:
            ids, finish = model.greedy(args.ids, args.greedy, allowed,
                                       stop_at_eos=not args.no_eos_stop)
            print(json.dumps({"ids": ids, "finish": finish}))
        else:
            logits = model.logits_all(args.ids, allowed)[-1]
            print(json.dumps([float(x) for x in logits]))
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"reference.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
