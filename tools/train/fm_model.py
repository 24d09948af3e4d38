"""OLMo-2 style mixture-of-experts model in PyTorch, for training the
miniature default model.

The forward pass is the one flexmore computes.  Blocks are post-norm: the
attention and the MoE read the raw residual stream, and their outputs are
normalised before they are added.  QK-norm covers the whole projected
vector, RoPE pairs rotate halves, and experts are SwiGLU FFNs.  The
bias-free router takes a softmax over all available experts before the top
k are kept, and the kept weights are not renormalised.  A low-rank expert computes its
projections as W_0 x + B (A x), where W_0 is the public expert's matrix.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        # In float32 even when autocast hands over bfloat16 activations.
        x = x.float()
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * scale * self.weight


def rope_tables(length, head_dim, theta):
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x, cos, sin):
    # x: [batch, heads, time, head_dim]; halves are rotated as one pair per i.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = torch.cat([cos, cos], -1)
    sin = torch.cat([sin, sin], -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.head_dim = hidden // self.heads
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.heads * self.head_dim, cfg["rms_norm_eps"])
        self.k_norm = RMSNorm(self.kv_heads * self.head_dim, cfg["rms_norm_eps"])

    def forward(self, h, cos, sin):
        b, t, _ = h.shape
        q = self.q_norm(self.q_proj(h)).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(h)).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos[:t], sin[:t])
        k = apply_rope(k, cos[:t], sin[:t])
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        out = torch.softmax(scores, -1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Expert(nn.Module):
    """A full-size SwiGLU expert."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def matrices(self):
        return {"gate": self.gate_proj.weight, "up": self.up_proj.weight,
                "down": self.down_proj.weight}

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LowRankExpert(nn.Module):
    """W_P = W_P,0 + B_P A_P for each projection P, with W_P,0 taken from
    the public expert at call time (never materialised)."""

    def __init__(self, public, factors):
        super().__init__()
        self.public = [public]          # a list keeps it out of the parameters
        self.a = nn.ParameterDict({p: nn.Parameter(factors[p][0]) for p in factors})
        self.b = nn.ParameterDict({p: nn.Parameter(factors[p][1]) for p in factors})

    def proj(self, name, x):
        w0 = self.public[0].matrices()[name]
        return F.linear(x, w0) + F.linear(F.linear(x, self.a[name]), self.b[name])

    def forward(self, x):
        return self.proj("down", F.silu(self.proj("gate", x)) * self.proj("up", x))


class MoE(nn.Module):
    def __init__(self, cfg, num_experts):
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        self.top_k = cfg["num_experts_per_tok"]
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, inter) for _ in range(num_experts))
        self.record = None              # set to a list to collect routing

    def forward(self, h, allowed=None):
        logits = self.gate(h).float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, -1)
        available = len(self.experts) if allowed is None else int(allowed.sum())
        k = min(self.top_k, available)
        # torch.topk keeps the lower index first among equal values on CPU,
        # which is the tie rule; exact ties do not occur in trained weights.
        weights, chosen = torch.topk(probs, k, dim=-1)
        if self.record is not None:
            self.record.append(chosen.detach())
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            sel = (chosen == e)
            if not sel.any():
                continue
            w = (weights * sel).sum(-1, keepdim=True)
            rows = sel.any(-1)
            out[rows] += w[rows] * expert(h[rows])
        return out


class Block(nn.Module):
    def __init__(self, cfg, num_experts):
        super().__init__()
        eps = cfg["rms_norm_eps"]
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = MoE(cfg, num_experts)
        self.post_feedforward_layernorm = RMSNorm(cfg["hidden_size"], eps)

    def forward(self, h, cos, sin, allowed, capture=None):
        h = h + self.post_attention_layernorm(self.self_attn(h, cos, sin))
        if capture is not None:
            capture.append(h.detach())
        return h + self.post_feedforward_layernorm(self.mlp(h, allowed))


class Model(nn.Module):
    def __init__(self, cfg, num_experts, context):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Block(cfg, num_experts)
                                    for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        cos, sin = rope_tables(context, head_dim, cfg["rope_theta"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ids, allowed=None, capture=None):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h, self.cos, self.sin, allowed, capture)
        # Tied embeddings: the lm_head is the embedding matrix.
        return F.linear(self.norm(h), self.embed_tokens.weight)
