#!/bin/bash
# Benchmarks of the shared weight cache; not part of the test suite.  Run
# as root after `bash scripts/test.sh` (which builds, installs and
# generates the checkpoints); it starts its own cluster with flexmore in
# shared_preload_libraries and prints medians:
#   1. a new connection's first call against a warm cache, against the
#      same call warm in the same connection (ratio);
#   2. loading the 1.16 GB "large" model from the tables into the cache,
#      against decompressing the same stored chunks with the zstd command.
# Usage: bench/cache.sh [RUNS]   (default 20)
# FLEXMORE_BENCH_PORT and FLEXMORE_BENCH_DIR set the cluster's port
# (default 55472) and directory (default /tmp/flexmore-cache-bench).
set -euo pipefail
runs=${1:-20}
root=$(cd "$(dirname "$0")/.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
models=${FLEXMORE_TEST_MODELS:-/tmp/flexmore-test/models}
base=${FLEXMORE_BENCH_DIR:-/tmp/flexmore-cache-bench}
port=${FLEXMORE_BENCH_PORT:-55472}
export PGHOST=$base PGPORT=$port PGUSER=postgres PGDATABASE=postgres

server() { su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$base/data' -w -l '$base/server.log' $*" >/dev/null; }
trap 'server -m fast stop 2>/dev/null || true' EXIT
server -m immediate stop 2>/dev/null || true
rm -rf "$base"
mkdir -p "$base"
chown postgres:postgres "$base"
su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$base/data' -A trust -U postgres" >/dev/null
cat >>"$base/data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$base'
port = $port
shared_preload_libraries = 'flexmore'
flexmore.cache_size = '2GB'
CONF
server start

# median of the numbers on stdin
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# ms of the SQL statement (server side: clock_timestamp around it)
psql -X -q -c "CREATE EXTENSION flexmore"
psql -X -q -c "SELECT flexmore_import('default', '$models/default')" >/dev/null
psql -X -q -c "SELECT flexmore_import('large', '$models/large')" >/dev/null

echo "== new connection, warm cache: flexmore_generate('default', ..., 16 tokens)"
psql -X -q -c "SELECT flexmore_cache_load('default')" >/dev/null
: >"$base/first"
: >"$base/warm"
for _ in $(seq "$runs"); do
	out=$(psql -X -q -t -A <<'SQL'
SELECT clock_timestamp() AS t0 \gset
SELECT flexmore_generate('default', 'The quick brown fox jumps over', 16) \g /dev/null
SELECT extract(epoch FROM clock_timestamp() - :'t0') * 1000;
SELECT clock_timestamp() AS t0 \gset
SELECT flexmore_generate('default', 'The quick brown fox jumps over', 16) \g /dev/null
SELECT extract(epoch FROM clock_timestamp() - :'t0') * 1000;
SQL
)
	sed -n 1p <<<"$out" >>"$base/first"
	sed -n 2p <<<"$out" >>"$base/warm"
done
first=$(median <"$base/first")
warm=$(median <"$base/warm")
echo "first call in a new connection: median $first ms; warm call: median $warm ms; ratio $(awk -v a="$first" -v b="$warm" 'BEGIN {printf "%.2f", a / b}')"

echo "== load of 'large' from the tables vs zstd decompression of its stored chunks"
: >"$base/load"
for _ in $(seq 5); do
	psql -X -q -c "SELECT flexmore_cache_evict('large')" >/dev/null
	psql -X -q -t -A <<'SQL' >>"$base/load"
SELECT clock_timestamp() AS t0 \gset
SELECT flexmore_cache_load('large') \g /dev/null
SELECT extract(epoch FROM clock_timestamp() - :'t0') * 1000;
SQL
done
load=$(median <"$base/load")
bytes=$(psql -X -q -t -A -c "SELECT sum(bytes) FROM flexmore_cache WHERE model = 'large'")
stored=$(psql -X -q -t -A -c "SELECT stored_bytes FROM flexmore.models WHERE name = 'large'")
compressed=$(psql -X -q -t -A -c "SELECT count(*) FILTER (WHERE compressed) || ' of ' || count(*) FROM flexmore.tensor_chunks c JOIN flexmore.tensors t ON t.id = c.tensor_id JOIN flexmore.models m ON m.id = t.model_id WHERE m.name = 'large'")
echo "load from tables: median $load ms for $bytes fp32 bytes ($stored stored bytes; $compressed chunks compressed)"

# The compressed chunks' zstd frames (payload after the 16-byte header),
# concatenated into one file: zstd decompresses concatenated frames.
psql -X -q -t -A -c "SELECT encode(substr(c.data, 17), 'hex') FROM flexmore.tensor_chunks c JOIN flexmore.tensors t ON t.id = c.tensor_id JOIN flexmore.models m ON m.id = t.model_id WHERE m.name = 'large' AND c.compressed ORDER BY t.name, c.seq" |
	xxd -r -p >"$base/frames.zst"
if [ -s "$base/frames.zst" ]; then
	: >"$base/zstd"
	for _ in $(seq 5); do
		s=$(date +%s%N)
		zstd -q -d -c "$base/frames.zst" >/dev/null
		echo $((($(date +%s%N) - s) / 1000000)) >>"$base/zstd"
	done
	raw=$(zstd -q -d -c "$base/frames.zst" | wc -c)
	echo "zstd -d of the same compressed chunks: median $(median <"$base/zstd") ms for $raw raw bytes"
else
	echo "no chunk of 'large' is compressed (random weights do not compress), so there is nothing to decompress"
fi
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/Mem:/ {print $2}') GB"
