#!/bin/sh
# Install what tools/train/corpora.py and trim_vocab.py need on Debian 12:
# msgunfmt (gettext), groff (groff-base), the Danish man pages (manpages-da),
# node, and the tokenizers npm package in test/tokenizer/.  With
# --training it also installs python3-torch and python3-numpy, which
# train.py needs, and OpenBLAS: Debian's torch calls the system BLAS, and
# without OpenBLAS that is the reference BLAS, about ten times slower.  Packages that are already installed are left alone.
set -eu

packages="gettext groff-base man-db manpages-da"
[ "${1:-}" = --training ] && packages="$packages python3-torch python3-numpy libopenblas0-pthread"

root=$(cd "$(dirname "$0")/../.." && pwd)
missing=""
for package in $packages; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
        missing="$missing $package"
    fi
done
# Some machines have node and npm from another source (one nodejs package
# that contains npm, which conflicts with Debian's npm), so check commands.
if ! command -v node >/dev/null 2>&1; then
    missing="$missing nodejs"
fi
if ! command -v npm >/dev/null 2>&1; then
    missing="$missing npm"
fi

if [ -n "$missing" ]; then
    echo "installing:$missing"
    apt-get update
    # $missing is a space-separated list of package names, split on purpose.
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y $missing
fi

if [ ! -d "$root/test/tokenizer/node_modules/tokenizers" ]; then
    (cd "$root/test/tokenizer" && npm install)
fi
