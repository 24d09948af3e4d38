#!/usr/bin/python3
"""Build training corpora from text that ships with a Debian 12 system.

Four corpora are built, each from real files found on the machine (no text
is generated):

  public  English README files from /usr/share/doc, English man pages and
          Danish man pages (/usr/share/man/da, package manpages-da)
  danish  Danish translations (msgstr of /usr/share/locale/da/LC_MESSAGES/*.mo)

The Danish man pages are public text, so the public model (whose token
embeddings every expert shares frozen) learns Danish words.  They are taken
first, up to a fifth of the public corpus (DANISH_PUBLIC_SHARE).
  legal   /usr/share/common-licenses and /usr/share/doc/*/copyright
  code    C headers under /usr/include and Python modules of Debian packages

Each corpus is written as OUT/NAME/train.txt and OUT/NAME/test.txt, and
OUT/manifest.json records the source file, Debian package and line range of
every document.  A source file goes wholly to one split, chosen by a hash of
its resolved path.  Run tools/train/install-deps.sh first to install the
Debian packages this script calls (gettext, groff-base, manpages-da).
"""

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

CORPUS_NAMES = ("public", "danish", "legal", "code")

DESCRIPTIONS = {
    "public": "English README files from /usr/share/doc, and English and "
              "Danish man pages rendered to text with groff",
    "danish": "Danish msgstr translations from /usr/share/locale/da/LC_MESSAGES",
    "legal": "Licence texts in /usr/share/common-licenses and package copyright "
             "files /usr/share/doc/*/copyright",
    "code": "C headers under /usr/include and Python modules under "
            "/usr/lib/python3/dist-packages and /usr/lib/python3.11",
}

# Code files larger than this are mostly generated tables, which would
# dominate a corpus of a few megabytes.
MAX_CODE_FILE_BYTES = 256 * 1024

DPKG_BATCH = 500

# Share of the public corpus given to the Danish man pages, which are taken
# before any other public file and are exempt from --max-package-share (they
# all come from one package).  Without them the public model would see no
# Danish, and the Danish tokens' embeddings, which every expert shares and
# none may change, would stay untrained.
DANISH_MAN_PREFIX = "/usr/share/man/da/"
DANISH_PUBLIC_SHARE = 0.2


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="build/train/corpora",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--target-mb", type=float, default=3.0,
                        help="stop adding files to a corpus once its train and "
                             "test text together reach this many megabytes "
                             "(10^6 bytes; default: %(default)s)")
    parser.add_argument("--test-percent", type=int, default=10,
                        help="percentage of source files that go to the test "
                             "split (default: %(default)s)")
    parser.add_argument("--max-package-share", type=float, default=0.1,
                        help="maximum fraction of --target-mb that text from "
                             "one Debian package may fill; a document that "
                             "would pass it is cut short (default: "
                             "%(default)s)")
    parser.add_argument("--corpus", action="append", choices=CORPUS_NAMES,
                        help="build only this corpus (repeatable; default: all)")
    return parser.parse_args()


# ---------------------------------------------------------------------------
# Finding source files


def list_files(patterns, recursive=False):
    """Return the resolved paths of regular files matching the glob patterns."""
    found = set()
    for pattern in patterns:
        for path in glob.glob(pattern, recursive=recursive):
            real = os.path.realpath(path)
            if os.path.isfile(real):
                found.add(real)
    return found


def find_sources(name):
    """Return (path, kind) pairs for corpus NAME; kind selects the extractor."""
    if name == "public":
        readmes = list_files(["/usr/share/doc/*/README*"])
        manpages = list_files(["/usr/share/man/man[1-8]/*",
                               "/usr/share/man/da/man*/*"])
        return ([(p, "text") for p in readmes] +
                [(p, "man") for p in manpages])
    if name == "danish":
        catalogs = list_files(["/usr/share/locale/da/LC_MESSAGES/*.mo"])
        return [(p, "mo") for p in catalogs]
    if name == "legal":
        licences = list_files(["/usr/share/common-licenses/*"])
        copyrights = list_files(["/usr/share/doc/*/copyright"])
        return [(p, "text") for p in sorted(licences | copyrights)]
    if name == "code":
        headers = list_files(["/usr/include/**/*.h"], recursive=True)
        modules = list_files(["/usr/lib/python3/dist-packages/**/*.py",
                              "/usr/lib/python3.11/**/*.py"], recursive=True)
        return [(p, "code") for p in sorted(headers | modules)
                if os.path.getsize(p) <= MAX_CODE_FILE_BYTES]
    raise ValueError(f"unknown corpus {name!r}")


def path_hash(path, salt):
    return hashlib.sha256((salt + "\0" + path).encode("utf-8")).hexdigest()


def split_of(path, test_percent):
    """Return "test" or "train" for a source file, from a hash of its path."""
    bucket = int(path_hash(path, "split")[:8], 16) % 100
    return "test" if bucket < test_percent else "train"


# ---------------------------------------------------------------------------
# Extracting text


def read_bytes(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return handle.read()


def decode_text(data):
    """Decode UTF-8 text, or return None for binary or non-UTF-8 data."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def extract_text(path):
    try:
        return decode_text(read_bytes(path))
    except (OSError, EOFError, gzip.BadGzipFile):
        return None


def extract_man(path):
    """Render a man page to plain UTF-8 text with groff.

    Hyphenation is off (-rHY=0) so that no split words appear, and the line
    length is very long (-rLL) so that each paragraph becomes one line.
    Pages that only redirect to another page (.so) return None.
    """
    source = extract_text(path)
    if source is None or source.lstrip().startswith(".so "):
        return None
    result = subprocess.run(
        ["groff", "-k", "-K", "utf-8", "-t", "-man", "-Tutf8", "-P-cbou",
         "-rHY=0", "-rLL=2000n"],
        input=source.encode("utf-8"), capture_output=True, check=False)
    if result.returncode != 0:
        return None
    return decode_text(result.stdout)


PO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\",
              "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def unquote_po(literal):
    """Decode one C-quoted PO string such as "a\\tb"."""
    body = literal.strip()[1:-1]
    return re.sub(r"\\(.)", lambda m: PO_ESCAPES.get(m.group(1), m.group(1)),
                  body)


def extract_mo(path):
    """Return the translated strings (msgstr) of a compiled message catalog.

    msgunfmt (package gettext) turns the catalog back into PO text.  The
    header entry, whose msgid is empty, is metadata and is skipped.
    """
    result = subprocess.run(["msgunfmt", "--no-wrap", path],
                            capture_output=True, check=False)
    if result.returncode != 0:
        return None
    po_text = decode_text(result.stdout)
    if po_text is None:
        return None

    translations = []
    msgid, msgstrs, field = [], [], None

    def flush():
        if msgid and "".join(msgid) != "":
            translations.extend("".join(parts) for parts in msgstrs)

    for line in po_text.splitlines():
        if line.startswith("msgctxt ") or line.startswith("msgid "):
            if line.startswith("msgctxt ") or field != "msgctxt":
                flush()
                msgid, msgstrs = [], []
            if line.startswith("msgid "):
                field = "msgid"
                msgid = [unquote_po(line.split(" ", 1)[1])]
            else:
                field = "msgctxt"
        elif line.startswith("msgid_plural "):
            field = "msgid_plural"
        elif line.startswith("msgstr"):
            field = "msgstr"
            msgstrs.append([unquote_po(line.split(" ", 1)[1])])
        elif line.startswith('"'):
            if field == "msgid":
                msgid.append(unquote_po(line))
            elif field == "msgstr":
                msgstrs[-1].append(unquote_po(line))
    flush()
    return "\n".join(translations)


EXTRACTORS = {"text": extract_text, "man": extract_man, "mo": extract_mo,
              "code": extract_text}


# ---------------------------------------------------------------------------
# Normalising and deduplicating

HAS_LETTER = re.compile(r"[^\W\d_]")
SPACE_RUN = re.compile(r"\s+")


def prose_lines(text, seen):
    """Normalise prose to one line per paragraph or line, dropping repeats.

    Runs of whitespace become one space, lines without a letter are dropped,
    and a line already in SEEN (the corpus so far, both splits) or earlier in
    this text is dropped.  The caller adds the lines it writes to SEEN.
    """
    lines = []
    in_text = set()
    for raw in text.splitlines():
        line = SPACE_RUN.sub(" ", raw).strip()
        if not line or not HAS_LETTER.search(line):
            continue
        if line in seen or line in in_text:
            continue
        in_text.add(line)
        lines.append(line)
    return lines


def code_lines(text, seen):
    """Normalise source code, keeping indentation and line order.

    Lines keep their leading whitespace and lose trailing whitespace, and
    runs of blank lines become one.  Deduplication is per file (SEEN holds
    content hashes) because dropping repeated lines such as "}" or "return"
    would break the code.
    """
    lines = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line and (not lines or not lines[-1]):
            continue
        lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    if not lines or digest in seen:
        return []
    seen.add(digest)
    return lines


# ---------------------------------------------------------------------------
# Packages and licences


def find_packages(paths):
    """Map each path to the package that owns it, via dpkg -S."""
    owners = {}
    paths = sorted(paths)
    for start in range(0, len(paths), DPKG_BATCH):
        batch = paths[start:start + DPKG_BATCH]
        result = subprocess.run(["dpkg", "-S", *batch], capture_output=True,
                                text=True, check=False)
        for line in result.stdout.splitlines():
            if line.startswith("diversion by") or ": " not in line:
                continue
            packages, path = line.split(": ", 1)
            if path in owners:
                continue
            owners[path] = packages.split(", ")[0]
    return {path: owners.get(path, "unknown") for path in paths}


LICENSE_FIELD = re.compile(r"^License:[ \t]*(\S.*?)\s*$", re.MULTILINE)


def package_licences(package):
    """Return the License: fields of a package's copyright file.

    Returns ["unknown"] when the file is missing or is not in the
    machine-readable (DEP-5) format, which has no License: fields.
    """
    name = package.split(":")[0]
    path = f"/usr/share/doc/{name}/copyright"
    text = extract_text(path) if os.path.exists(path) else None
    if text is None:
        return path if os.path.exists(path) else None, ["unknown"]
    licences = []
    for match in LICENSE_FIELD.finditer(text):
        if match.group(1) not in licences:
            licences.append(match.group(1))
    return path, licences or ["unknown"]


# ---------------------------------------------------------------------------
# Building


def fit_lines(lines, separator, budget):
    """Return the leading LINES whose block, with SEPARATOR, fits in BUDGET bytes."""
    size = len(separator.encode("utf-8"))
    for count, line in enumerate(lines):
        size += len(line.encode("utf-8")) + 1
        if size > budget:
            return lines[:count]
    return lines


def build_corpus(name, out_dir, target_bytes, test_percent, package_bytes):
    """Write NAME/train.txt and NAME/test.txt and return the manifest entry.

    Files are taken in the order of a salted hash of their path, a fixed
    shuffle that spreads a corpus over many packages, until the written
    text reaches TARGET_BYTES.  No package contributes more than
    PACKAGE_BYTES, so that one large package (thousands of generated man
    pages, or a megabyte-long copyright file) cannot fill a corpus.
    Documents are separated by one empty line.
    """
    sources = find_sources(name)
    # The leading False sorts the Danish man pages first.
    sources.sort(key=lambda source: (not source[0].startswith(DANISH_MAN_PREFIX),
                                     path_hash(source[0], "order")))
    owners = find_packages(path for path, _ in sources)
    corpus_dir = os.path.join(out_dir, name)
    os.makedirs(corpus_dir, exist_ok=True)

    handles = {split: open(os.path.join(corpus_dir, f"{split}.txt"), "w",
                           encoding="utf-8", newline="\n")
               for split in ("train", "test")}
    stats = {split: {"file": f"{name}/{split}.txt", "bytes": 0, "lines": 0,
                     "documents": 0} for split in handles}
    pieces = []
    seen = set()
    package_used = {}
    written = 0

    for path, kind in sources:
        if written >= target_bytes:
            break
        package = owners[path]
        cap = package_bytes
        if path.startswith(DANISH_MAN_PREFIX):
            cap = int(target_bytes * DANISH_PUBLIC_SHARE)
        budget = cap - package_used.get(package, 0)
        if budget <= 0:
            continue
        text = EXTRACTORS[kind](path)
        if text is None:
            continue
        lines = code_lines(text, seen) if name == "code" else prose_lines(text, seen)

        split = split_of(path, test_percent)
        split_stats = stats[split]
        separator = "\n" if split_stats["documents"] else ""
        kept_lines = fit_lines(lines, separator, budget)
        if not kept_lines:
            continue
        if name != "code":
            seen.update(kept_lines)
        block = separator + "\n".join(kept_lines) + "\n"
        handles[split].write(block)
        size = len(block.encode("utf-8"))

        pieces.append({
            "split": split,
            "path": path,
            "package": package,
            "extractor": kind,
            "first_line": split_stats["lines"] + (1 if separator else 0) + 1,
            "lines": len(kept_lines),
            "bytes": size - len(separator),
            "truncated": len(kept_lines) < len(lines),
        })
        split_stats["lines"] += len(kept_lines) + (1 if separator else 0)
        split_stats["bytes"] += size
        split_stats["documents"] += 1
        package_used[package] = package_used.get(package, 0) + size
        written += size

    for handle in handles.values():
        handle.close()
    if written < target_bytes:
        print(f"corpora.py: corpus {name} has only {written} bytes of the "
              f"{target_bytes} requested: its source files ran out, with at "
              f"most {package_bytes} bytes from each package",
              file=sys.stderr)
    return {"description": DESCRIPTIONS[name], "splits": stats,
            "pieces": pieces}


def main():
    args = parse_args()
    if not 0 <= args.test_percent <= 100:
        sys.exit(f"corpora.py: --test-percent {args.test_percent} is invalid: "
                 "use 0 to 100")
    names = args.corpus or list(CORPUS_NAMES)
    target_bytes = int(args.target_mb * 1_000_000)
    package_bytes = int(target_bytes * args.max_package_share)
    os.makedirs(args.out, exist_ok=True)

    corpora = {}
    for name in names:
        corpora[name] = build_corpus(name, args.out, target_bytes,
                                     args.test_percent, package_bytes)
        splits = corpora[name]["splits"]
        print(f"{name}: train {splits['train']['bytes']} bytes, "
              f"test {splits['test']['bytes']} bytes, "
              f"{len(corpora[name]['pieces'])} documents")

    used_packages = {piece["package"] for corpus in corpora.values()
                     for piece in corpus["pieces"]}
    packages = {}
    for package in sorted(used_packages - {"unknown"}):
        copyright_file, licences = package_licences(package)
        packages[package] = {"copyright_file": copyright_file,
                             "licenses": licences}

    manifest = {
        "generator": "tools/train/corpora.py",
        "settings": {"target_bytes": target_bytes,
                     "max_package_bytes": package_bytes,
                     "test_percent": args.test_percent,
                     "split_rule": "sha256('split\\0' + resolved path), first "
                                   "8 hex digits as an integer, mod 100; "
                                   "values below test_percent go to test"},
        "corpora": corpora,
        "packages": packages,
    }
    with open(os.path.join(args.out, "manifest.json"), "w",
              encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, ensure_ascii=False)
        handle.write("\n")


if __name__ == "__main__":
    main()
