#!/usr/bin/env bash
# Benchmark of classification over a table of real Danish and English
# text: per-row flexmore_classify serially and with two parallel workers,
# and flexmore_classify_batch over arrays.  Prints rows per second and
# prompt tokens per second (medians of RUNS runs), and compares the
# batched run's matrix-product rate with OpenBLAS sgemm measured in the
# same run by bench/sgemm_timer.c.
#
# Run as root from the repository, after `make install` (or through
# `make bench-classify`).  It starts a throwaway cluster in
# /tmp/flexmore-bench on port 55461 and imports the bundled default model.
#   ROWS=10000 RUNS=3 bash bench/classify.sh
source "$(dirname "$0")/../scripts/lib.sh"

rows=${ROWS:-10000}
runs=${RUNS:-3}
work=/tmp/flexmore-bench
labels="ARRAY['Danish', 'English']"
model_dir=$(pg_config --sharedir)/flexmore/models/default

cluster_start "$work/cluster" 55461 UTF8 C.UTF-8
trap 'cluster_stop "$work/cluster"' EXIT
gcc -O2 -o "$work/sgemm_timer" "$FLEXMORE_ROOT/bench/sgemm_timer.c" $(pkg-config --cflags --libs openblas)

# Danish translations and their English originals from the message
# catalogues, and lines of the licence texts, 20 to 200 characters each.
mkdir -p "$work/po"
for mo in /usr/share/locale/da/LC_MESSAGES/*.mo; do
	msgunfmt "$mo" >"$work/po/$(basename "$mo" .mo).po" 2>/dev/null || true
done
/usr/bin/python3 - "$work/po" "$rows" >"$work/texts.tsv" <<'PY'
import glob, re, sys
po_dir, rows = sys.argv[1], int(sys.argv[2])
def unquote(s):
    return bytes(s, "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")
danish, english = [], []
for path in sorted(glob.glob(po_dir + "/*.po")):
    text = open(path, encoding="utf-8", errors="replace").read()
    for m in re.finditer(r'^msgid "(.+)"\nmsgstr "(.+)"$', text, re.M):
        english.append(unquote(m.group(1)))
        danish.append(unquote(m.group(2)))
for path in sorted(glob.glob("/usr/share/common-licenses/*")):
    try:
        english += open(path, encoding="utf-8").read().splitlines()
    except (UnicodeDecodeError, IsADirectoryError):
        pass
def clean(lines):
    seen, out = set(), []
    for line in lines:
        line = " ".join(line.replace("\\", " ").split())
        if 20 <= len(line) <= 200 and line not in seen:
            seen.add(line)
            out.append(line)
    return out
danish, english = clean(danish), clean(english)
n = 0
while n < rows:
    lang, pool = ("da", danish) if n % 2 == 0 else ("en", english)
    print(f"{n + 1}\t{lang}\t{pool[(n // 2) % len(pool)]}")
    n += 1
print(f"{len(danish)} Danish and {len(english)} English lines", file=sys.stderr)
PY

psql -X -q -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE EXTENSION flexmore;
SELECT flexmore_import('default', '$model_dir');
CREATE TABLE texts (id bigint PRIMARY KEY, lang text NOT NULL, body text NOT NULL);
\copy texts FROM '$work/texts.tsv'
VACUUM ANALYZE texts;
SQL
prompt_tokens=$(psql -X -q -t -A -c "SELECT sum(array_length(flexmore_tokenize('default', 'Text: ' || body || E'\nLabel:'), 1) + 1) FROM texts")

serial="SET max_parallel_workers_per_gather = 0;
	SELECT count(flexmore_classify('default', body, $labels)) FROM texts;"
parallel="SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0;
	SET min_parallel_table_scan_size = 0; SET max_parallel_workers_per_gather = 2;
	SELECT count(flexmore_classify('default', body, $labels)) FROM texts;"
batched="SELECT count(*) FROM flexmore_classify_batch('default',
	(SELECT array_agg(id ORDER BY id) FROM texts), (SELECT array_agg(body ORDER BY id) FROM texts), $labels);"

# seconds SQL: wall time of one psql run of SQL, model load included
seconds() {
	local start end
	start=$(date +%s.%N)
	psql -X -q -t -A -v ON_ERROR_STOP=1 -c "$1" >/dev/null
	end=$(date +%s.%N)
	echo "$end - $start" | bc -l
}
median() { sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

echo "rows: $rows, prompt tokens: $prompt_tokens, runs per mode: $runs"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
printf '%-9s %10s %10s %14s\n' mode seconds rows/s "prompt tok/s"
declare -A median_seconds
for mode in serial parallel batched; do
	times=$(for _ in $(seq "$runs"); do seconds "${!mode}"; done)
	median_seconds[$mode]=$(echo "$times" | median)
	printf '%-9s %10.2f %10.1f %14.0f\n' $mode "${median_seconds[$mode]}" \
		"$(echo "$rows / ${median_seconds[$mode]}" | bc -l)" \
		"$(echo "$prompt_tokens / ${median_seconds[$mode]}" | bc -l)"
done

# Matrix-product work of the batched run, from the model's dimensions:
# per prompt token the attention projections, the router and num_experts_per_tok
# full-size experts (an upper estimate, since low-rank experts cost less),
# and per row one lm_head product for the labels' single tokens.
flops=$(/usr/bin/python3 - "$model_dir/config.json" "$prompt_tokens" "$rows" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
tokens, rows = int(sys.argv[2]), int(sys.argv[3])
h, inter = c["hidden_size"], c["intermediate_size"]
hd = c.get("head_dim") or h // c["num_attention_heads"]
q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
per_layer = h * (2 * q + 2 * kv) + h * c["num_experts"] + c["num_experts_per_tok"] * 3 * h * inter
print(2 * (tokens * c["num_hidden_layers"] * per_layer + rows * c["vocab_size"] * h))
PY
)
achieved=$(echo "$flops / ${median_seconds[batched]} / 1000000000" | bc -l)
"$work/sgemm_timer" 512,512,512 64,128,64 16,"$(python3 -c "import json;print(json.load(open('$model_dir/config.json'))['vocab_size'])")",64 | tee "$work/sgemm.txt"
peak=$(awk 'NR == 1 {print $5}' "$work/sgemm.txt")
printf 'batched: %.2f GFLOP/s of matrix products (estimate), %.1f%% of sgemm 512x512x512 (%.2f GFLOP/s)\n' \
	"$achieved" "$(echo "100 * $achieved / $peak" | bc -l)" "$peak"
