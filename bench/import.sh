#!/usr/bin/env bash
# Benchmark of getting a checkpoint into the database and into memory.  It
# times flexmore_import from server files and the client command
# flexmore-import through large objects.  It also times the load of the
# weights from the tables: a new connection's first flexmore_logits call
# minus a warm call.  For comparison, it runs the zstd command's own
# benchmark on the same file in 64 MiB blocks, in the same run.  Prints a
# table of medians of RUNS runs.
#
# Run as root from the repository, after `make install` (or through
# `make bench-import`).  It starts a throwaway cluster in
# /tmp/flexmore-import-bench on port 55492, without
# shared_preload_libraries, so each backend loads its own copy.  The
# checkpoint is gen_checkpoint.py's large_embedding preset: 578 MB of
# BF16 weights, generated into the work folder (about 20 s, 3.5 GB of
# memory).
#   RUNS=3 bash bench/import.sh
source "$(dirname "$0")/../scripts/lib.sh"

runs=${RUNS:-3}
work=/tmp/flexmore-import-bench
client=$(pg_config --bindir)/flexmore-import
checkpoint=$work/large_embedding

cluster_start "$work/cluster" 55492 UTF8 C.UTF-8
trap 'cluster_stop "$work/cluster"' EXIT
readable_dir "$work"
if [ ! -f "$checkpoint/model.safetensors" ]; then
	/usr/bin/python3 "$FLEXMORE_ROOT/test/model/gen_checkpoint.py" "$checkpoint" --preset large_embedding >/dev/null
fi
chmod -R a+rX "$checkpoint"
bytes=$(cat "$checkpoint"/* | wc -c)
psql -X -q -c "CREATE EXTENSION flexmore"

# median VALUES...: the middle value (the lower middle for an even count).
median() {
	printf '%s\n' "$@" | sort -g | sed -n "$((($# + 1) / 2))p"
}

# seconds_of_timing OUTPUT: the "Time: N ms" lines of psql's \timing, in seconds.
seconds_of_timing() {
	sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' <<<"$1" | awk '{ printf "%.3f\n", $1 / 1000 }'
}

server_s=()
client_s=()
load_s=()
warm_s=()
for run in $(seq "$runs"); do
	# Server files: the function's own time, without connection setup.
	out=$(psql -X -q -t -A -c '\timing on' \
		-c "SELECT flexmore_import('bench', '$checkpoint', replace => true)")
	server_s+=("$(seconds_of_timing "$out")")

	# The client command: the wall-clock time of the whole command,
	# connection and large-object transfer included.
	start=$(date +%s%N)
	"$client" -q -r bench_client "$checkpoint" >/dev/null
	client_s+=("$(awk -v ns=$(($(date +%s%N) - start)) 'BEGIN { printf "%.3f\n", ns / 1e9 }')")

	# Load: a new connection's first call reads, checks and widens every
	# tensor; the second call in the same connection is the warm call.
	out=$(psql -X -q -t -A -c 'SET client_min_messages = warning' -c '\timing on' \
		-c "SELECT array_length(flexmore_logits('bench', ARRAY[1, 2, 3]), 1)" \
		-c "SELECT array_length(flexmore_logits('bench', ARRAY[1, 2, 3]), 1)")
	times=($(seconds_of_timing "$out"))
	load_s+=("$(awk -v a="${times[0]}" -v b="${times[1]}" 'BEGIN { printf "%.3f\n", a - b }')")
	warm_s+=("${times[1]}")
done

stored=$(psql -X -q -t -A -c "SELECT bytes_stored FROM flexmore_models WHERE name = 'bench'")

# zstd level 3, as the import uses, on 64 MiB blocks like the chunks.
zstd_out=$(zstd -b3 -B64MiB -i3 "$checkpoint/model.safetensors" 2>&1 | tr '\r' '\n' | grep 'MB/s' | tail -n 1)
zstd_compress=$(sed -E 's/.*\), *([0-9.]+) MB\/s.*/\1/' <<<"$zstd_out")
zstd_decompress=$(sed -E 's/.*MB\/s *, *([0-9.]+) MB\/s.*/\1/' <<<"$zstd_out")

mb=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1e6 }')
rate() { awk -v b="$bytes" -v s="$1" 'BEGIN { printf "%.0f", b / 1e6 / s }'; }
server=$(median "${server_s[@]}")
client_t=$(median "${client_s[@]}")
load=$(median "${load_s[@]}")
warm=$(median "${warm_s[@]}")

echo
echo "checkpoint: large_embedding, $mb MB in $(ls "$checkpoint" | wc -l) files, stored as $(awk -v b="$stored" 'BEGIN { printf "%.1f", b / 1e6 }') MB; medians of $runs runs"
printf '%-44s %10s %10s\n' "step" "seconds" "MB/s"
printf '%-44s %10s %10s\n' "flexmore_import (server files)" "$server" "$(rate "$server")"
printf '%-44s %10s %10s\n' "flexmore-import (client, large objects)" "$client_t" "$(rate "$client_t")"
printf '%-44s %10s %10s\n' "load into a backend (first call - warm call)" "$load" "$(rate "$load")"
printf '%-44s %10s %10s\n' "warm flexmore_logits call, 3 ids" "$warm" ""
printf '%-44s %10s %10s\n' "zstd -b3 -B64MiB compression" "" "$zstd_compress"
printf '%-44s %10s %10s\n' "zstd -b3 -B64MiB decompression" "" "$zstd_decompress"
