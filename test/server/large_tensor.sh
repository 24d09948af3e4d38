#!/bin/bash
# A weight tensor over 1 GiB once widened to fp32, past palloc's limit:
# the large_embedding checkpoint's tied embedding is 100352 x 2880, so
# 578,027,520 bytes stored as BF16 and 1,156,055,040 bytes in fp32.  It
# imports in 64 MB chunks, loads, and its logits match the float64
# reference within compare.py's bound.  Generates the checkpoint into
# $FLEXMORE_TEST_MODELS/large when absent (about 20 s and 3.5 GB of memory).
set -u
. "$(dirname "$0")/common.sh"
root=$(cd "$(dirname "$0")/../.." && pwd)

db=flexmore_large
dir=$MODELS/large
tensor=model.embed_tokens.weight
vocab=100352
hidden=2880
chunk_bytes=$((64 * 1024 * 1024))
gib=$((1024 * 1024 * 1024))

if [ ! -f "$dir/model.safetensors" ]; then
	/usr/bin/python3 "$root/test/model/gen_checkpoint.py" "$dir" --preset large_embedding
	chmod -R a+rX "$dir"
fi

# The sizes the test relies on, from the shape alone.
bf16_bytes=$((vocab * hidden * 2))
fp32_bytes=$((vocab * hidden * 4))
check "fp32 embedding exceeds 1 GiB" "t" "$([ $fp32_bytes -gt $gib ] && echo t || echo f)"

psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
psql -X -q -d postgres -c "CREATE DATABASE $db"
q $db "CREATE EXTENSION flexmore" >/dev/null
check "import" "t" "$(q $db "SELECT flexmore_import('large', '$dir') > 0")"

check "stored raw bytes" "$bf16_bytes" \
	"$(q $db "SELECT t.raw_bytes FROM flexmore.tensors t JOIN flexmore.models m ON m.id = t.model_id WHERE m.name = 'large' AND t.name = '$tensor'")"
check "stored in 64 MB chunks" "$(((bf16_bytes + chunk_bytes - 1) / chunk_bytes))" \
	"$(q $db "SELECT count(*) FROM flexmore.tensor_chunks c JOIN flexmore.tensors t ON t.id = c.tensor_id JOIN flexmore.models m ON m.id = t.model_id WHERE m.name = 'large' AND t.name = '$tensor'")"

# One session: the first call loads the weights, and the model's memory
# context then contains the fp32 embedding.
out=$(psql -X -q -t -A -v ON_ERROR_STOP=1 -d $db 2>&1 <<'SQL'
SET client_min_messages = warning;
SELECT array_length(flexmore_logits('large', ARRAY[1, 2, 3]), 1);
SELECT sum(total_bytes) FROM pg_backend_memory_contexts WHERE name = 'flexmore model' AND ident = 'large';
SQL
)
check "one logit per vocabulary row" "$vocab" "$(sed -n 1p <<<"$out")"
loaded=$(sed -n 2p <<<"$out")
check "model context contains fp32 embedding" "t" \
	"$([ "${loaded:-0}" -gt $fp32_bytes ] 2>/dev/null && echo t || echo f)"
check "generation" "t" "$(q $db "SELECT flexmore_generate('large', 'hello', 4) IS NOT NULL")"

# The six logits checks of compare.py through psql.  Its teacher-forcing
# steps are skipped: each psql call is a new backend that loads the model
# again, about 5 s here.
export PGDATABASE=$db
compared=$(/usr/bin/python3 - "$root/test/model" "$dir" 2>&1 <<'PY'
import sys

sys.path.insert(0, sys.argv[1])
import compare  # noqa: E402
import reference  # noqa: E402

model = reference.Model.load(sys.argv[2])
report = compare.Report()
compare.check_logits(model, compare.PsqlBackend("large"), report, "")
print(f"{report.passed} passed, {report.failed} failed")
PY
)
echo "$compared" | sed 's/^/  compare: /'
check "logits match the float64 reference" "6 passed, 0 failed" "$(tail -n 1 <<<"$compared")"

q $db "SELECT flexmore_drop_model('large')" >/dev/null
check "chunks dropped" "0" "$(q $db "SELECT count(*) FROM flexmore.tensor_chunks")"
psql -X -q -d postgres -c "DROP DATABASE $db"
finish
