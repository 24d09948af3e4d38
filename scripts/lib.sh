# Shared shell functions for the demo and test scripts.  Source it; it
# expects to run as root on Debian 12 (the scripts install packages and run
# PostgreSQL as the postgres user, since the server refuses to run as root).

set -euo pipefail

FLEXMORE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

# Debian packages the build, the demo and the tests need.
FLEXMORE_PACKAGES=(
	build-essential pkg-config
	postgresql-15 postgresql-server-dev-15 postgresql-client-15
	libopenblas-dev libzstd-dev libpcre2-dev libpq-dev
	python3 python3-numpy
	gettext valgrind
	# the libFuzzer targets in test/fuzz
	clang libclang-rt-14-dev
)

log() { printf '\n=== %s\n' "$*"; }

# Installs whatever of FLEXMORE_PACKAGES is missing (apt-get update only then).
install_packages() {
	local missing=()
	for p in "${FLEXMORE_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	# Node.js may come from elsewhere than Debian (its npm then conflicts
	# with Debian's), so only the missing commands are installed.
	command -v node >/dev/null || missing+=(nodejs)
	command -v npm >/dev/null || missing+=(npm)
	if [ ${#missing[@]} -gt 0 ]; then
		log "installing ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
	fi
}

# Builds and installs the extension into the system PostgreSQL 15.
build_install() {
	log "building flexmore"
	make -C "$FLEXMORE_ROOT" -s -j2 PG_CONFIG=/usr/bin/pg_config
	make -C "$FLEXMORE_ROOT" -s install PG_CONFIG=/usr/bin/pg_config
}

# cluster_start DIR PORT [ENCODING [LOCALE [SERVER_OPTIONS]]]: a throwaway
# cluster in DIR, owned by postgres, listening only on a unix socket in DIR
# and on loopback.  SERVER_OPTIONS are extra postgres options ("-c a=b").
cluster_start() {
	local dir=$1 port=$2 encoding=${3:-UTF8} locale=${4:-C.UTF-8} options=${5:-}
	cluster_stop "$dir" || true
	rm -rf "$dir"
	mkdir -p "$dir"
	chown postgres:postgres "$dir"
	chmod 755 "$dir"
	su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$dir/data' -E $encoding --locale=$locale -A trust -U postgres" >"$dir/initdb.log" 2>&1 ||
		{ cat "$dir/initdb.log"; return 1; }
	su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$dir/data' -w -l '$dir/server.log' \
		-o \"-p $port -k '$dir' -c listen_addresses=127.0.0.1 -c max_parallel_workers_per_gather=2 $options\" start" >/dev/null ||
		{ cat "$dir/server.log"; return 1; }
	export PGHOST=$dir PGPORT=$port PGUSER=postgres PGDATABASE=postgres
}

cluster_stop() {
	local dir=$1
	[ -f "$dir/data/postmaster.pid" ] || return 0
	su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$dir/data' -m fast -w stop" >/dev/null
}

# A folder the postgres user can read: the server reads checkpoints itself.
readable_dir() {
	mkdir -p "$1"
	chmod 755 "$1"
}
