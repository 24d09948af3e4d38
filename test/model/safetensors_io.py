"""Read and write safetensors files with numpy alone.

A safetensors file is an 8-byte little-endian header length n, n bytes of
JSON mapping each tensor name to {dtype, shape, data_offsets [begin, end)}
(offsets relative to the end of the header, plus an optional __metadata__
map of strings), then the raw little-endian tensor data.

numpy has no bfloat16, so BF16 tensors are handled as uint16 bit patterns:
the top half of a float32, rounded to nearest even on the way in and
widened exactly on the way out.  Readers here reject what a loader must
reject: unknown dtypes, out-of-range or overlapping offsets, byte counts
that do not match dtype and shape, and header lengths beyond the file.
"""

import json
import os
import struct

import numpy as np

# Storage dtype of each supported safetensors dtype name.
STORAGE_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}

# Element sizes of dtypes that may appear in files but that flexmore does
# not load.  The hostile-checkpoint generator writes F64 and I64.
OTHER_DTYPE_SIZES = {"F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsError(ValueError):
    """A safetensors file or shard index is malformed."""


# Elements rounded per step by float32_to_bf16_bits.  Each step makes
# five uint64 temporaries, 40 bytes per element, so rounding a 1 GiB
# float32 tensor in one step would take about 10.7 GB more.
BF16_BLOCK_ELEMENTS = 1 << 22


def float32_to_bf16_bits(values):
    """Round float32 values to bfloat16 (nearest, ties to even) as uint16 bits.

    NaN stays NaN, made quiet so that truncation cannot turn it into
    infinity.  Values past the largest bfloat16 round to infinity.
    """
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint16)
    for start in range(0, flat.size, BF16_BLOCK_ELEMENTS):
        block = flat[start:start + BF16_BLOCK_ELEMENTS]
        bits = block.view(np.uint32).astype(np.uint64)
        lsb = (bits >> np.uint64(16)) & np.uint64(1)
        rounded = (bits + np.uint64(0x7FFF) + lsb) >> np.uint64(16)
        quiet_nan = (bits >> np.uint64(16)) | np.uint64(0x0040)
        out[start:start + block.size] = np.where(np.isnan(block), quiet_nan, rounded)
    return out.reshape(np.shape(values))


def bf16_bits_to_float32(bits):
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    wide = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32)


def encode_tensor(values, dtype):
    """Return the little-endian bytes of values stored as dtype ("F32", "BF16", "F16")."""
    if dtype == "BF16":
        stored = float32_to_bf16_bits(np.asarray(values, dtype=np.float32))
    elif dtype in STORAGE_DTYPES:
        stored = np.asarray(values).astype(STORAGE_DTYPES[dtype])
    else:
        raise SafetensorsError(f"cannot encode dtype {dtype!r}; use F32, BF16 or F16")
    return np.ascontiguousarray(stored).tobytes()


def decode_tensor(data, dtype, shape):
    """Widen the bytes of one tensor to a float32 array of the given shape."""
    if dtype not in STORAGE_DTYPES:
        raise SafetensorsError(f"unsupported dtype {dtype!r}; expected F32, BF16 or F16")
    stored = np.frombuffer(data, dtype=STORAGE_DTYPES[dtype])
    if dtype == "BF16":
        wide = bf16_bits_to_float32(stored)
    else:
        wide = stored.astype(np.float32)
    return wide.reshape(shape)


def build_header(entries, metadata=None):
    """Return the padded header bytes for entries [(name, dtype, shape, begin, end)].

    The JSON is padded with spaces to a multiple of 8 bytes so that tensor
    data starts 8-byte aligned.
    """
    header = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape],
                        "data_offsets": [int(begin), int(end)]}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return text


def write_raw(path, header_bytes, data, declared_length=None):
    """Write a file from header bytes and data, optionally lying about the header length."""
    length = len(header_bytes) if declared_length is None else declared_length
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", length))
        f.write(header_bytes)
        f.write(data)


def save_file(tensors, path, metadata=None):
    """Write tensors, a list of (name, float array, dtype), to one safetensors file.

    Tensors are laid out contiguously in the given order, so the same
    input always gives the same bytes.
    """
    entries = []
    chunks = []
    offset = 0
    for name, values, dtype in tensors:
        blob = encode_tensor(values, dtype)
        entries.append((name, dtype, np.shape(values), offset, offset + len(blob)))
        chunks.append(blob)
        offset += len(blob)
    write_raw(path, build_header(entries, metadata), b"".join(chunks))
    return offset


def save_sharded(tensors, directory, n_shards, metadata=None):
    """Write tensors as n_shards files plus model.safetensors.index.json.

    Tensors keep their order and are split into runs of roughly equal byte
    size.  Shards get the usual names model-00001-of-00003.safetensors and
    so on.  Returns the shard file names.
    """
    sizes = [len(encode_tensor(v, d)) for _, v, d in tensors]
    total = sum(sizes)
    if n_shards < 1 or n_shards > len(tensors):
        raise SafetensorsError(f"cannot split {len(tensors)} tensors into {n_shards} shards")

    groups = [[] for _ in range(n_shards)]
    running = 0
    shard = 0
    for i, (item, size) in enumerate(zip(tensors, sizes)):
        by_size = min(n_shards - 1, running * n_shards // max(total, 1))
        # Skip no shard, and leave at least one tensor for each remaining one.
        shard = max(min(by_size, shard + 1), n_shards - (len(tensors) - i))
        groups[shard].append(item)
        running += size

    names = []
    weight_map = {}
    for i, group in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, os.path.join(directory, file_name), metadata)
        names.append(file_name)
        for name, _, _ in group:
            weight_map[name] = file_name
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return names


def read_header(path):
    """Parse and validate the header of a safetensors file.

    Returns (header dict without __metadata__, metadata or None, data start
    offset).  Raises SafetensorsError for a malformed file.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: file of {file_size} bytes is too short for a header")
        (length,) = struct.unpack("<Q", prefix)
        if length > file_size - 8:
            raise SafetensorsError(
                f"{path}: header length {length} exceeds the file size {file_size}")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")

    metadata = header.pop("__metadata__", None)
    data_size = file_size - 8 - length
    spans = []
    for name, info in header.items():
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if dtype in STORAGE_DTYPES:
            item_size = STORAGE_DTYPES[dtype].itemsize
        elif dtype in OTHER_DTYPE_SIZES:
            raise SafetensorsError(
                f"{path}: tensor {name} has unsupported dtype {dtype}; expected F32, BF16 or F16")
        else:
            raise SafetensorsError(f"{path}: tensor {name} has unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SafetensorsError(f"{path}: tensor {name} has invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise SafetensorsError(f"{path}: tensor {name} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise SafetensorsError(
                f"{path}: tensor {name} data_offsets [{begin}, {end}) lie outside "
                f"the {data_size} data bytes")
        expected = item_size * int(np.prod(shape, dtype=np.int64))
        if end - begin != expected:
            raise SafetensorsError(
                f"{path}: tensor {name} spans {end - begin} bytes but {dtype} {shape} "
                f"needs {expected}")
        spans.append((begin, end, name))

    spans.sort()
    for (b1, e1, n1), (b2, e2, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise SafetensorsError(f"{path}: tensors {n1} and {n2} have overlapping data_offsets")
    return header, metadata, 8 + length


def load_file(path):
    """Load every tensor of one safetensors file as float32 arrays.

    Returns (dict name -> float32 array, dict name -> stored dtype).
    """
    header, _, start = read_header(path)
    with open(path, "rb") as f:
        blob = f.read()
    arrays = {}
    dtypes = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        arrays[name] = decode_tensor(blob[start + begin:start + end], info["dtype"], info["shape"])
        dtypes[name] = info["dtype"]
    return arrays, dtypes


def load_checkpoint_tensors(directory):
    """Load all tensors of a checkpoint directory, single-file or sharded.

    A model.safetensors.index.json, when present, decides which shards are
    read.  Every tensor it names must be in the shard it names, and no
    tensor may appear twice.
    """
    index_path = os.path.join(directory, INDEX_NAME)
    if not os.path.exists(index_path):
        single = os.path.join(directory, SINGLE_NAME)
        if not os.path.exists(single):
            raise SafetensorsError(f"{directory}: neither {SINGLE_NAME} nor {INDEX_NAME} found")
        return load_file(single)

    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SafetensorsError(f"{index_path}: missing or empty weight_map")

    arrays = {}
    dtypes = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard:
            raise SafetensorsError(f"{index_path}: shard name {shard!r} is not a plain file name")
        shard_path = os.path.join(directory, shard)
        if not os.path.exists(shard_path):
            raise SafetensorsError(f"{index_path}: shard {shard} not found")
        shard_arrays, shard_dtypes = load_file(shard_path)
        for name, values in shard_arrays.items():
            if name in arrays:
                raise SafetensorsError(f"{directory}: tensor {name} appears in two shards")
            if weight_map.get(name) != shard:
                raise SafetensorsError(
                    f"{directory}: tensor {name} is in {shard} but the index maps it to "
                    f"{weight_map.get(name)}")
            arrays[name] = values
            dtypes[name] = shard_dtypes[name]
    for name, shard in weight_map.items():
        if name not in arrays:
            raise SafetensorsError(f"{index_path}: tensor {name} is not in shard {shard}")
    return arrays, dtypes
