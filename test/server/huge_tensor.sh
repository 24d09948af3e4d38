#!/bin/bash
# One tensor over 1 GiB as stored: the huge_f32_embedding checkpoint's tied
# F32 embedding is 100352 x 2752, 1,104,674,816 bytes.  It must import in
# chunks of 64 MiB.  Its stored SHA-256 must equal the SHA-256 of its bytes
# in the file, computed here in Python with no flexmore code.  The logits
# of the reassembled model must match the float64 reference within
# compare.py's bound.  Generates the checkpoint into
# $FLEXMORE_TEST_MODELS/huge_f32 when absent (about 15 s and 3.3 GB of
# memory).  The rest takes about 50 s on 2 cores.
set -u
. "$(dirname "$0")/common.sh"
root=$(cd "$(dirname "$0")/../.." && pwd)

db=flexmore_huge
dir=$MODELS/huge_f32
tensor=model.embed_tokens.weight
vocab=100352
hidden=2752
chunk_bytes=$((64 * 1024 * 1024))
gib=$((1024 * 1024 * 1024))

if [ ! -f "$dir/model.safetensors" ]; then
	/usr/bin/python3 "$root/test/model/gen_checkpoint.py" "$dir" --preset huge_f32_embedding
	chmod -R a+rX "$dir"
fi

raw_bytes=$((vocab * hidden * 4))
check "F32 embedding exceeds 1 GiB" "t" "$([ $raw_bytes -gt $gib ] && echo t || echo f)"

# The tensor's bytes and SHA-256, read from the safetensors header here.
file_sha=$(/usr/bin/python3 - "$dir/model.safetensors" "$tensor" <<'PY'
import hashlib
import json
import struct
import sys

path, name = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
    begin, end = header[name]["data_offsets"]
    f.seek(8 + header_len + begin)
    digest = hashlib.sha256()
    left = end - begin
    while left > 0:
        block = f.read(min(left, 1 << 24))
        digest.update(block)
        left -= len(block)
print(end - begin, digest.hexdigest())
PY
)
check "tensor bytes in the file" "$raw_bytes" "${file_sha% *}"

psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
psql -X -q -d postgres -c "CREATE DATABASE $db"
q $db "CREATE EXTENSION flexmore" >/dev/null
start=$(date +%s)
check "import" "t" "$(q $db "SELECT flexmore_import('huge', '$dir') > 0")"
echo "  import took $(($(date +%s) - start)) s"

stored=$(q $db "SELECT t.raw_bytes, encode(t.checksum, 'hex'), t.dtype,
		(SELECT count(*) FROM flexmore.tensor_chunks c WHERE c.tensor_id = t.id),
		(SELECT max(seq) FROM flexmore.tensor_chunks c WHERE c.tensor_id = t.id)
	FROM flexmore.tensors t JOIN flexmore.models m ON m.id = t.model_id
	WHERE m.name = 'huge' AND t.name = '$tensor'")
IFS='|' read -r stored_raw stored_sha stored_dtype stored_chunks max_seq <<<"$stored"
check "stored raw bytes" "$raw_bytes" "$stored_raw"
check "stored dtype" "F32" "$stored_dtype"
check "chunk count is ceil(raw / 64 MiB)" "$(((raw_bytes + chunk_bytes - 1) / chunk_bytes))" "$stored_chunks"
check "chunks numbered from 0" "$((stored_chunks - 1))" "$max_seq"
check "stored SHA-256 equals the file's" "${file_sha#* }" "$stored_sha"

# The logits checks of compare.py through psql, which reassembles the
# chunks and checks the SHA-256 on load.
export PGDATABASE=$db
start=$(date +%s)
compared=$(/usr/bin/python3 - "$root/test/model" "$dir" 2>&1 <<'PY'
import sys

sys.path.insert(0, sys.argv[1])
import compare  # noqa: E402
import reference  # noqa: E402

model = reference.Model.load(sys.argv[2])
report = compare.Report()
compare.check_logits(model, compare.PsqlBackend("huge"), report, "")
print(f"{report.passed} passed, {report.failed} failed")
PY
)
echo "$compared" | sed 's/^/  compare: /'
echo "  logits checks took $(($(date +%s) - start)) s"
check "logits match the float64 reference" "6 passed, 0 failed" "$(tail -n 1 <<<"$compared")"

q $db "SELECT flexmore_drop_model('huge')" >/dev/null
check "chunks dropped" "0" "$(q $db "SELECT count(*) FROM flexmore.tensor_chunks")"
psql -X -q -d postgres -c "DROP DATABASE $db"
finish
