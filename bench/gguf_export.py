#!/usr/bin/python3
"""Write a one-expert flex_olmo checkpoint as a GGUF file of an OLMo-2 model.

llama.cpp runs OLMo-2 (architecture "olmo2"): post-norm blocks, RMSNorm of
the whole q and k vectors, rotate-half RoPE.  With one expert and the
router's softmax weight of exactly 1, a flex_olmo model is that model, so
llama.cpp and flexmore compute the same function and their speeds compare.

The file is GGUF version 3, as ggml/include/gguf.h of the llama.cpp source
describes it.  It starts with the magic "GGUF", the version, the tensor and
key-value counts and the key-value pairs.  One record per tensor follows
(name, dimensions innermost first, ggml type, offset into the data area),
then the data area, aligned to 32 bytes.  Matrices are
written as F32, BF16 (round to nearest even) or Q8_0 (blocks of 32 values:
an fp16 scale d = max|x| / 127, then 32 int8 values round(x / d), ties away
from zero); the norm weights stay F32.  The vocabulary is the "no_vocab"
kind with olmo2.vocab_size dummy tokens, so llama.cpp takes token ids.

    gguf_export.py CHECKPOINT_DIR OUT.gguf --type f32|bf16|q8_0
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "model"))
import safetensors_io  # noqa: E402

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32

# gguf value types
UINT32, FLOAT32, STRING = 4, 6, 8

# ggml tensor types, and the llama_ftype stored in general.file_type
GGML_TYPES = {"f32": 0, "bf16": 30, "q8_0": 8}
FILE_TYPES = {"f32": 0, "bf16": 32, "q8_0": 7}
Q8_BLOCK = 32


def tensor_names(layers):
    """Map checkpoint tensor names to llama.cpp's olmo2 tensor names."""
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_norm.weight": "attn_q_norm.weight",
                 "self_attn.k_norm.weight": "attn_k_norm.weight",
                 "post_attention_layernorm.weight": "post_attention_norm.weight",
                 "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
                 "mlp.experts.0.gate_proj.weight": "ffn_gate.weight",
                 "mlp.experts.0.up_proj.weight": "ffn_up.weight",
                 "mlp.experts.0.down_proj.weight": "ffn_down.weight"}
    for i in range(layers):
        for hf, gguf in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gguf}"
    return names


def open_tensors(directory):
    """Map each tensor name of a checkpoint to (file map, begin, end, dtype, shape) without reading data."""
    index_path = os.path.join(directory, safetensors_io.INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [safetensors_io.SINGLE_NAME]
    arrays = {}
    for file in files:
        path = os.path.join(directory, file)
        header, _, start = safetensors_io.read_header(path)
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in header.items():
            begin, end = info["data_offsets"]
            arrays[name] = (raw, start + begin, start + end, info["dtype"], info["shape"])
    return arrays


def load(entry):
    raw, begin, end, dtype, shape = entry
    return safetensors_io.decode_tensor(bytes(raw[begin:end]), dtype, shape)


def quantize_q8_0(values):
    """Encode a float32 matrix as Q8_0 blocks along its rows."""
    blocks = values.reshape(-1, Q8_BLOCK)
    amax = np.abs(blocks).max(axis=1)
    d = amax / np.float32(127.0)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)
    scaled = blocks * inv[:, None]
    q = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int8)
    out = np.empty(blocks.shape[0], dtype=[("d", "<f2"), ("qs", "i1", Q8_BLOCK)])
    out["d"] = d.astype(np.float16)
    out["qs"] = q
    return out.tobytes()


def encode(values, kind):
    """Return the bytes of one tensor and its ggml type.  1-D tensors stay F32."""
    if values.ndim == 1 or kind == "f32":
        return np.ascontiguousarray(values, dtype="<f4").tobytes(), GGML_TYPES["f32"]
    if kind == "bf16":
        return safetensors_io.float32_to_bf16_bits(values).tobytes(), GGML_TYPES["bf16"]
    if values.shape[-1] % Q8_BLOCK != 0:
        raise SystemExit(f"a row of {values.shape[-1]} values is not a whole number of "
                         f"Q8_0 blocks of {Q8_BLOCK}")
    # one row block at a time keeps the temporaries small
    step = max(1, (1 << 22) // values.shape[-1])
    parts = [quantize_q8_0(np.asarray(values[i:i + step], dtype=np.float32))
             for i in range(0, values.shape[0], step)]
    return b"".join(parts), GGML_TYPES["q8_0"]


def encoded_size(shape, kind):
    """Bytes of one tensor as encode() writes it."""
    count = int(np.prod(shape))
    if len(shape) == 1 or kind == "f32":
        return 4 * count
    if kind == "bf16":
        return 2 * count
    return count // Q8_BLOCK * (2 + Q8_BLOCK)


def gguf_string(text):
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def gguf_kv(key, value_type, value):
    out = gguf_string(key) + struct.pack("<I", value_type)
    if value_type == UINT32:
        return out + struct.pack("<I", value)
    if value_type == FLOAT32:
        return out + struct.pack("<f", value)
    return out + gguf_string(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--type", choices=sorted(GGML_TYPES), required=True)
    args = parser.parse_args(argv)

    with open(os.path.join(args.checkpoint, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    n_experts = config.get("num_experts", config.get("num_local_experts"))
    if n_experts != 1 or config.get("tie_word_embeddings"):
        raise SystemExit("gguf_export.py needs a checkpoint with one expert and an untied lm_head")
    layers = config["num_hidden_layers"]
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    if head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise SystemExit("llama.cpp's olmo2 needs heads * head_dim == hidden_size")

    arrays = open_tensors(args.checkpoint)
    names = tensor_names(layers)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise SystemExit(f"checkpoint lacks {missing[0]} and {len(missing) - 1} more tensors")

    kvs = [("general.architecture", STRING, "olmo2"),
           ("general.name", STRING, os.path.basename(os.path.normpath(args.checkpoint))),
           ("general.alignment", UINT32, ALIGNMENT),
           ("general.file_type", UINT32, FILE_TYPES[args.type]),
           ("olmo2.context_length", UINT32, config["max_position_embeddings"]),
           ("olmo2.embedding_length", UINT32, config["hidden_size"]),
           ("olmo2.feed_forward_length", UINT32, config["intermediate_size"]),
           ("olmo2.block_count", UINT32, layers),
           ("olmo2.attention.head_count", UINT32, config["num_attention_heads"]),
           ("olmo2.attention.head_count_kv", UINT32,
            config.get("num_key_value_heads", config["num_attention_heads"])),
           ("olmo2.rope.freq_base", FLOAT32, float(config["rope_theta"])),
           ("olmo2.attention.layer_norm_rms_epsilon", FLOAT32, float(config["rms_norm_eps"])),
           ("olmo2.vocab_size", UINT32, config["vocab_size"]),
           ("tokenizer.ggml.model", STRING, "no_vocab")]

    records = []
    offset = 0
    for hf_name, gguf_name in names.items():
        shape = tuple(arrays[hf_name][4])
        size = encoded_size(shape, args.type)
        kind = "f32" if len(shape) == 1 else args.type
        records.append((hf_name, gguf_name, shape, GGML_TYPES[kind], offset, size))
        offset += size + (-size % ALIGNMENT)

    header = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(records), len(kvs))
    header += b"".join(gguf_kv(k, t, v) for k, t, v in kvs)
    for _, name, shape, ggml_type, tensor_offset, _ in records:
        header += gguf_string(name) + struct.pack("<I", len(shape))
        header += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        header += struct.pack("<IQ", ggml_type, tensor_offset)
    header += b"\0" * (-len(header) % ALIGNMENT)

    with open(args.output, "wb") as out:
        out.write(header)
        for hf_name, name, _, ggml_type, _, size in records:
            blob, written_type = encode(load(arrays[hf_name]), args.type)
            if len(blob) != size or written_type != ggml_type:
                raise AssertionError(f"{name}: encoded {len(blob)} bytes, expected {size}")
            out.write(blob)
            out.write(b"\0" * (-size % ALIGNMENT))
    print(f"gguf_export: {args.output}: {args.type}, {len(records)} tensors, "
          f"{(len(header) + offset) / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
