#!/usr/bin/python3
"""Train the miniature FlexOlmo and FlexMoRE models that flexmore ships as
its default model.

Recipe, at miniature scale:
 1. a dense public model trained on the public corpus;
 2. one expert per domain corpus, each trained on its own, starting from the
    public model with every shared weight and the public FFN frozen.  The
    training model is a two-expert MoE (public + new).  The new FFN starts
    as a copy of the public FFN, and the new router row as the domain's
    mean hidden state at that layer, scaled to unit length;
 3. the experts merged into one FlexOlmo model (public expert 0 + domain
    experts, top-2 routing), whose router rows alone are then tuned on a
    small mixed sample of every corpus, because rows trained against the
    public expert alone have never competed with each other;
 4. the FlexMoRE version: each domain expert replaced by a truncated SVD of
    its difference from the public expert, at the smallest rank of a sweep
    whose validation perplexity is within RANK_TOLERANCE of the full
    expert's;
 5. both exported as checkpoint directories, and held-out perplexities
    written to evaluation.json.

Training steps run their matrix products in bfloat16 (torch.autocast) with
float32 master weights: on CPUs with AMX or AVX-512 BF16 this is several
times faster than float32.  Every weight is rounded to bfloat16 before
evaluation and export, and evaluation runs in float32, so the figures in
evaluation.json are those of the exported weights as flexmore computes
them.  Inputs come
from corpora.py and trim_vocab.py (build/train/); the run is deterministic
for a given machine and seed.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

# Debian's torch calls the system BLAS for float32 products.  An OpenBLAS
# older than the CPU falls back to SSE kernels (Debian 12's 0.3.21 does on
# a Xeon of family 6, model 207), so name the kernels before torch loads it,
# by the rule of fm_openblas_coretype in src/engine/formats.c.
def _openblas_coretype():
    with open("/proc/cpuinfo") as f:
        lines = f.readlines()
    flags = next((line.split(":", 1)[1].split() for line in lines
                  if line.startswith("flags")), [])
    amd = any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in lines)
    if amd and {"avx2", "fma"} <= set(flags):
        return "Zen"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= set(flags):
        return "SkylakeX"
    if {"avx2", "fma"} <= set(flags):
        return "Haswell"
    return None


_CORETYPE = _openblas_coretype()
if _CORETYPE and "OPENBLAS_CORETYPE" not in os.environ:
    os.environ["OPENBLAS_CORETYPE"] = _CORETYPE

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "test", "model"))

from fm_model import Expert, LowRankExpert, Model  # noqa: E402
import safetensors_io  # noqa: E402

DOMAINS = ["danish", "legal", "code"]
CORPORA = ["public"] + DOMAINS
SEQ = 128
BATCH = 16
RANK_SWEEP = [1, 4, 16, 64]
RANK_TOLERANCE = 0.02
EVAL_TOKENS = 32000          # held-out tokens per corpus (whole chunks)
CHUNK_TOKENS = 128           # a held-out chunk is whole lines up to this many tokens
MAX_CHUNK_TOKENS = 1024      # chunks of one longer line are left out
VALID_FRACTION = 0.05        # tail of each train stream kept for the rank sweep
EVAL_BATCH = 16
ROUTER_STEPS = 100           # router tuning steps over mixed windows of all corpora
SAMPLE_CHUNKS = 12           # held-out chunks per corpus shipped for the test

ARCH = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "rope_theta": 500000.0,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=os.path.join(ROOT, "build", "train"),
                   help="folder with corpora/ and tokenizer/; outputs go to WORK/export")
    p.add_argument("--seed", type=int, default=20261204)
    p.add_argument("--public-steps", type=int, default=1200)
    p.add_argument("--expert-steps", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume-merged", action="store_true",
                   help="load the merged model from WORK/export/flexolmo instead of training "
                        "steps 1-3 again; gives the same result as a full run")
    return p.parse_args()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------- tokenization (Hugging Face tokenizers, through node) ----------

def hf_encode(tokenizer_path, texts, scratch):
    src = scratch + ".jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    out = subprocess.run(["node", os.path.join(HERE, "hf_tokenizer.js"), "encode",
                          tokenizer_path, src], check=True, capture_output=True,
                         text=True).stdout
    os.unlink(src)
    return [json.loads(line) for line in out.splitlines()]


def documents(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [d for d in text.split("\n\n") if d.strip()]


def heldout_chunks(docs, tokenizer_path, scratch):
    """Cut test documents into chunks of whole lines of at most CHUNK_TOKENS
    tokens, stopping after EVAL_TOKENS.  A longer single line is a chunk of
    its own, left out when over MAX_CHUNK_TOKENS."""
    lines_per_doc = [d.split("\n") for d in docs]
    flat = [line for lines in lines_per_doc for line in lines]
    counts = iter([len(x) for x in hf_encode(tokenizer_path, flat, scratch)])
    chunks, total = [], 0
    for lines in lines_per_doc:
        current, size = [], 0
        for line in lines:
            n = next(counts) + 1
            if current and size + n > CHUNK_TOKENS:
                chunks.append("\n".join(current))
                current, size = [], 0
            current.append(line)
            size += n
        if current:
            chunks.append("\n".join(current))
    ids = hf_encode(tokenizer_path, chunks, scratch)
    selected = []
    for text, chunk_ids in zip(chunks, ids):
        if total >= EVAL_TOKENS:
            break
        if len(chunk_ids) > MAX_CHUNK_TOKENS:
            continue
        selected.append({"text": text, "ids": chunk_ids})
        total += len(chunk_ids)
    return selected


# ---------- training ----------

def batches(stream, steps, rng):
    """steps batches of BATCH windows of SEQ + 1 ids at seeded offsets."""
    top = len(stream) - SEQ - 1
    for _ in range(steps):
        starts = rng.integers(0, top, size=BATCH)
        yield torch.from_numpy(np.stack([stream[s:s + SEQ + 1] for s in starts]).astype(np.int64))


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_loss(model, batch):
    """Next-token cross-entropy of a batch of windows; products in bfloat16,
    the loss itself in float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                           batch[:, 1:].reshape(-1))


def train(model, params, stream, steps, peak, rng, label, keep=()):
    """AdamW over params; those in keep get no weight decay, so rows whose
    gradient is zeroed stay exactly as they are."""
    keep_ids = {id(p) for p in keep}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in keep_ids]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in keep_ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak, betas=(0.9, 0.95))
    warmup = max(1, steps // 15)
    start = time.time()
    for step, batch in enumerate(batches(stream, steps, rng)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak, warmup)
        loss = step_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            rate = (step + 1) * BATCH * SEQ / (time.time() - start)
            log(f"{label} step {step + 1}/{steps} loss {loss.item():.3f} ({rate:.0f} tok/s)")


def round_bf16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())


# ---------- evaluation ----------

def padded(group, eos):
    """Chunks as one batch of eos + chunk ids, padded with eos after each
    chunk, and the chunks' lengths.  Padding sits after a chunk, so the
    causal mask keeps it out of every position of the chunk itself."""
    width = max(len(c["ids"]) for c in group) + 1
    ids = torch.full((len(group), width), eos, dtype=torch.long)
    for i, c in enumerate(group):
        ids[i, 1:len(c["ids"]) + 1] = torch.tensor(c["ids"])
    return ids, torch.tensor([len(c["ids"]) for c in group])


@torch.no_grad()
def nll(model, chunks, eos, allowed=None):
    """Summed negative log-likelihood and token count over chunks, each
    scored after a leading eos id (the document boundary flexmore uses).
    Chunks run in padded batches (see padded())."""
    total, count = 0.0, 0
    for start in range(0, len(chunks), EVAL_BATCH):
        ids, lengths = padded(chunks[start:start + EVAL_BATCH], eos)
        # Prediction i is of the chunk's token i.
        valid = torch.arange(ids.shape[1] - 1) < lengths[:, None]
        lp = torch.log_softmax(model(ids[:, :-1], allowed), -1)
        picked = lp.gather(2, ids[:, 1:, None])[..., 0].double()
        total -= picked[valid].sum().item()
        count += int(valid.sum())
    return total, count


def ppl(model, chunks, eos, allowed=None):
    total, count = nll(model, chunks, eos, allowed)
    return math.exp(total / count)


@torch.no_grad()
def routing_share(model, chunks, eos, expert):
    """Share of (token, layer) routing decisions that include expert.
    Chunks run in padded batches (see padded())."""
    hits, total = 0, 0
    for start in range(0, len(chunks), EVAL_BATCH):
        ids, lengths = padded(chunks[start:start + EVAL_BATCH], eos)
        # Input position i + 1 is the chunk's token i.  Position 0 is the
        # eos, which is not part of the text, and the last token is never
        # an input.
        pos = torch.arange(ids.shape[1] - 1)
        text = (pos >= 1) & (pos < lengths[:, None])
        for layer in model.layers:
            layer.mlp.record = []
        model(ids[:, :-1])
        for layer in model.layers:
            chosen = layer.mlp.record[0]
            hits += int((chosen == expert).any(-1)[text].sum())
            total += int(text.sum())
            layer.mlp.record = None
    return hits / total


# ---------- export ----------

def export(model, ranks, names, tokenizer_path, outdir, eos):
    os.makedirs(outdir, exist_ok=True)
    factorised = any(r > 0 for r in ranks)
    cfg = model.cfg
    config = {
        "architectures": ["FlexMoREForCausalLM" if factorised else "FlexOlmoForCausalLM"],
        "model_type": "flexmore" if factorised else "flex_olmo",
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "rms_norm_eps": cfg["rms_norm_eps"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "num_experts": len(names),
        "num_experts_per_tok": cfg["num_experts_per_tok"],
        "norm_topk_prob": False,
        "tie_word_embeddings": True,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "bos_token_id": None,
        "torch_dtype": "bfloat16",
        "rope_scaling": None,
        "attention_bias": False,
        "rope_theta": cfg["rope_theta"],
        "expert_names": names,
    }
    if factorised:
        config["expert_ranks"] = ranks
    tensors = [("model.embed_tokens.weight", model.embed_tokens.weight),
               ("model.norm.weight", model.norm.weight)]
    for n, layer in enumerate(model.layers):
        pre = f"model.layers.{n}."
        att = layer.self_attn
        for p in ("q", "k", "v", "o"):
            tensors.append((pre + f"self_attn.{p}_proj.weight", getattr(att, p + "_proj").weight))
        tensors.append((pre + "self_attn.q_norm.weight", att.q_norm.weight))
        tensors.append((pre + "self_attn.k_norm.weight", att.k_norm.weight))
        tensors.append((pre + "post_attention_layernorm.weight",
                        layer.post_attention_layernorm.weight))
        tensors.append((pre + "post_feedforward_layernorm.weight",
                        layer.post_feedforward_layernorm.weight))
        tensors.append((pre + "mlp.gate.weight", layer.mlp.gate.weight))
        for e, expert in enumerate(layer.mlp.experts):
            base = pre + f"mlp.experts.{e}."
            if isinstance(expert, LowRankExpert):
                for p in ("gate", "up", "down"):
                    tensors.append((base + f"{p}_proj_a.weight", expert.a[p]))
                    tensors.append((base + f"{p}_proj_b.weight", expert.b[p]))
            else:
                for p, w in expert.matrices().items():
                    tensors.append((base + f"{p}_proj.weight", w))
    safetensors_io.save_file([(name, t.detach().numpy().astype(np.float32), "BF16")
                              for name, t in tensors],
                             os.path.join(outdir, "model.safetensors"))
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    with open(tokenizer_path, "rb") as src, open(os.path.join(outdir, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())


def svd_factors(delta, rank):
    u, s, vt = torch.linalg.svd(delta.double(), full_matrices=False)
    b = (u[:, :rank] * s[:rank]).float()
    a = vt[:rank].float()
    return a.bfloat16().float(), b.bfloat16().float()


def low_rank_model(merged, ranks):
    """Build a copy of merged whose expert e (e > 0, ranks[e] > 0) is a
    rank ranks[e] adapter on expert 0."""
    cfg = merged.cfg
    model = Model(cfg, len(ranks), cfg["max_position_embeddings"])
    model.load_state_dict(merged.state_dict())
    for layer in model.layers:
        public = layer.mlp.experts[0]
        for e, rank in enumerate(ranks):
            if rank == 0:
                continue
            full = layer.mlp.experts[e]
            factors = {p: svd_factors(full.matrices()[p] - public.matrices()[p], rank)
                       for p in ("gate", "up", "down")}
            layer.mlp.experts[e] = LowRankExpert(public, factors)
    return model


def mixed_batches(streams, steps, rng):
    """steps batches with BATCH // len(streams) windows from each stream."""
    per = BATCH // len(streams)
    for _ in range(steps):
        rows = []
        for stream in streams:
            starts = rng.integers(0, len(stream) - SEQ - 1, size=per)
            rows.extend(stream[s:s + SEQ + 1] for s in starts)
        yield torch.from_numpy(np.stack(rows).astype(np.int64))


def tune_router(model, streams, steps, rng):
    """Train only the router rows of every layer on mixed windows, so that
    each domain's rows learn to beat the other domains' rows on its text."""
    for p in model.parameters():
        p.requires_grad_(False)
    gates = [layer.mlp.gate.weight for layer in model.layers]
    for g in gates:
        g.requires_grad_(True)
    opt = torch.optim.AdamW(gates, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95))
    for step, batch in enumerate(mixed_batches(streams, steps, rng)):
        loss = step_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"router step {step + 1}/{steps} loss {loss.item():.3f}")
    for g in gates:
        g.requires_grad_(False)


def train_merged(cfg, names, streams, args, rng):
    """Steps 1-3 of the recipe: the public model, the experts and their merge."""
    # 1. public model: a dense model is an MoE with one expert (weight 1).
    public = Model(cfg, 1, cfg["max_position_embeddings"])
    with torch.no_grad():
        for name, p in public.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    train(public, list(public.parameters()), streams["public"], args.public_steps, 3e-3,
          rng, "public")
    round_bf16(public)

    # Mean hidden state (the MoE input) per layer and corpus, from the public model.
    @torch.no_grad()
    def mean_hidden(stream):
        capture = []
        sample = torch.from_numpy(stream[:4 * BATCH * SEQ].astype(np.int64)).view(-1, SEQ)
        public(sample, capture=capture)
        rows = []
        for h in capture:
            m = h.reshape(-1, h.shape[-1]).mean(0)
            rows.append(m / m.norm())
        return rows

    public_rows = mean_hidden(streams["public"])

    # 2. experts, each trained alone from the public model.
    experts = {}
    for d in DOMAINS:
        model = Model(cfg, 2, cfg["max_position_embeddings"])
        state = public.state_dict()
        rows = mean_hidden(streams[d])
        for n, layer in enumerate(model.layers):
            pre = f"layers.{n}.mlp."
            for p in ("gate", "up", "down"):
                w = state[pre + f"experts.0.{p}_proj.weight"]
                state_e = {pre + f"experts.{e}.{p}_proj.weight": w.clone() for e in (0, 1)}
                state.update(state_e)
            state[pre + "gate.weight"] = torch.stack([public_rows[n], rows[n]])
        model.load_state_dict(state)
        trainable = []
        for name, p in model.named_parameters():
            train_it = ".mlp.experts.1." in name
            p.requires_grad_(train_it)
            if train_it:
                trainable.append(p)
        # The router row of the new expert trains; the public row stays.
        gates = [layer.mlp.gate.weight for layer in model.layers]
        for g in gates:
            g.requires_grad_(True)
            g.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:1]), grad[1:]]))
        train(model, trainable + gates, streams[d], args.expert_steps, 2e-3, rng, d, keep=gates)
        round_bf16(model)
        experts[d] = model

    # 3. merge: public expert 0, then one expert per domain.
    merged = Model(cfg, len(names), cfg["max_position_embeddings"])
    state = public.state_dict()
    for n in range(cfg["num_hidden_layers"]):
        pre = f"layers.{n}.mlp."
        rows = [public_rows[n]]
        for e, d in enumerate(DOMAINS, start=1):
            ds = experts[d].state_dict()
            for p in ("gate", "up", "down"):
                state[pre + f"experts.{e}.{p}_proj.weight"] = ds[pre + f"experts.1.{p}_proj.weight"]
            rows.append(ds[pre + "gate.weight"][1])
        state[pre + "gate.weight"] = torch.stack(rows)
    merged.load_state_dict(state)
    round_bf16(merged)
    return merged



def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    tokenizer_path = os.path.join(args.work, "tokenizer", "tokenizer.json")
    with open(tokenizer_path, encoding="utf-8") as f:
        tok = json.load(f)
    eos = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|endoftext|>")
    n_ids = max(t["id"] for t in tok["added_tokens"]) + 1
    cfg = dict(ARCH, vocab_size=(n_ids + 63) // 64 * 64)
    scratch = os.path.join(args.work, "scratch")

    streams, valid, heldout = {}, {}, {}
    for name in CORPORA:
        docs = documents(os.path.join(args.work, "corpora", name, "train.txt"))
        ids = hf_encode(tokenizer_path, docs, scratch)
        stream = np.array([eos] + [i for d in ids for i in d + [eos]], dtype=np.int32)
        cut = int(len(stream) * (1 - VALID_FRACTION))
        streams[name], valid[name] = stream[:cut], stream[cut:]
        test_docs = documents(os.path.join(args.work, "corpora", name, "test.txt"))
        heldout[name] = heldout_chunks(test_docs, tokenizer_path, scratch)
        log(f"{name}: {len(stream)} train ids, {sum(len(c['ids']) for c in heldout[name])} "
            f"held-out ids in {len(heldout[name])} chunks")

    names = ["public"] + DOMAINS
    checkpoint = os.path.join(args.work, "checkpoint", "merged.pt")
    if args.resume_merged:
        merged = Model(cfg, len(names), cfg["max_position_embeddings"])
        merged.load_state_dict(torch.load(checkpoint))
        log(f"merged model loaded from {checkpoint}")
    else:
        merged = train_merged(cfg, names, streams, args, rng)
        os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
        torch.save(merged.state_dict(), checkpoint)

    # Router tuning draws its windows from its own generator, so a resumed
    # run tunes exactly as a full run does.
    tune_router(merged, [streams[c] for c in CORPORA], ROUTER_STEPS,
                np.random.default_rng(args.seed + 1))
    round_bf16(merged)

    # 4. rank sweep on validation ids (tail of each train stream, unseen).
    def valid_chunks(d):
        s = valid[d][:64 * SEQ]
        return [{"ids": s[i + 1:i + SEQ].tolist()} for i in range(0, len(s) - SEQ, SEQ)]

    sweep, ranks = {}, [0]
    for e, d in enumerate(DOMAINS, start=1):
        chunks = valid_chunks(d)
        full = ppl(merged, chunks, eos)
        sweep[d] = {"full": full}
        chosen = 0
        for r in RANK_SWEEP:
            trial = [0] * len(names)
            trial[e] = r
            value = ppl(low_rank_model(merged, trial), chunks, eos)
            sweep[d][str(r)] = value
            if chosen == 0 and value <= full * (1 + RANK_TOLERANCE):
                chosen = r
        ranks.append(chosen or RANK_SWEEP[-1])
        log(f"rank sweep {d}: {sweep[d]} -> rank {ranks[-1]}")
    flexmore = low_rank_model(merged, ranks)

    # 5. export and evaluate.
    out = os.path.join(args.work, "export")
    export(merged, [0] * len(names), names, tokenizer_path, os.path.join(out, "flexolmo"), eos)
    export(flexmore, ranks, names, tokenizer_path, os.path.join(out, "flexmore"), eos)

    def allowed_without(e):
        mask = torch.ones(len(names), dtype=torch.bool)
        mask[e] = False
        return mask

    only_public = torch.zeros(len(names), dtype=torch.bool)
    only_public[0] = True
    def table(chunks):
        row = {"public": ppl(merged, chunks, eos, only_public),
               "flexolmo": ppl(merged, chunks, eos),
               "flexmore": ppl(flexmore, chunks, eos)}
        # Opt-out is measured on the shipped (FlexMoRE) model only.
        for e, d in enumerate(DOMAINS, start=1):
            row[f"flexmore_without_{d}"] = ppl(flexmore, chunks, eos, allowed_without(e))
        row["tokens"] = sum(len(x["ids"]) for x in chunks)
        return row

    results, sample = {}, {}
    for name in CORPORA:
        c = heldout[name]
        row = table(c)
        if name in DOMAINS:
            row["own_expert_share"] = routing_share(flexmore, c, eos, names.index(name))
        results[name] = row
        sample[name] = table(c[:SAMPLE_CHUNKS])
        log(f"held-out {name}: {row}")

    evaluation = {
        "generator": "tools/train/train.py",
        "seed": args.seed,
        "steps": {"public": args.public_steps, "expert": args.expert_steps,
                  "batch": BATCH, "sequence": SEQ},
        "architecture": cfg,
        "expert_names": names,
        "expert_ranks": ranks,
        "rank_sweep": sweep,
        "perplexity": results,
        "sample_chunks": SAMPLE_CHUNKS,
        "sample_perplexity": sample,
        "seconds": round(time.time() - t0),
    }
    with open(os.path.join(out, "evaluation.json"), "w") as f:
        json.dump(evaluation, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "heldout.jsonl"), "w", encoding="utf-8") as f:
        for name in CORPORA:
            for i, c in enumerate(heldout[name]):
                f.write(json.dumps({"corpus": name, "chunk": i, "text": c["text"],
                                    "tokens": len(c["ids"])}, ensure_ascii=False) + "\n")
    log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
