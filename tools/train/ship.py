#!/usr/bin/python3
"""Copy the trained FlexMoRE export into models/default.

Writes config.json, model.safetensors and tokenizer.json from
WORK/export/flexmore, evaluation.json, heldout.jsonl (every held-out chunk),
heldout-sample.jsonl (the first sample_chunks chunks of each corpus, which
the test suite scores)
and sources.json: for each corpus and split, the source files with their
Debian package, and each package's licences, taken from the corpora
manifest.
"""

import argparse
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=os.path.join(ROOT, "build", "train"))
    p.add_argument("--dest", default=os.path.join(ROOT, "models", "default"))
    args = p.parse_args()
    export = os.path.join(args.work, "export")

    os.makedirs(args.dest, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copyfile(os.path.join(export, "flexmore", name), os.path.join(args.dest, name))
    for name in ("evaluation.json", "heldout.jsonl"):
        shutil.copyfile(os.path.join(export, name), os.path.join(args.dest, name))

    with open(os.path.join(export, "evaluation.json")) as f:
        limit = json.load(f)["sample_chunks"]
    with open(os.path.join(export, "heldout.jsonl"), encoding="utf-8") as src, \
            open(os.path.join(args.dest, "heldout-sample.jsonl"), "w", encoding="utf-8") as dst:
        for line in src:
            if json.loads(line)["chunk"] < limit:
                dst.write(line)

    with open(os.path.join(args.work, "corpora", "manifest.json")) as f:
        manifest = json.load(f)
    sources = {"settings": manifest["settings"], "corpora": {}, "licences": {}}
    used = set()
    for corpus, info in manifest["corpora"].items():
        files = {"train": [], "test": []}
        for piece in info["pieces"]:
            files[piece["split"]].append([piece["path"], piece["package"]])
            used.add(piece["package"])
        sources["corpora"][corpus] = {"description": info["description"], "files": files}
    for package in sorted(used):
        entry = manifest["packages"].get(package, {})
        sources["licences"][package] = entry.get("licenses", entry.get("licences", ["unknown"]))
    with open(os.path.join(args.dest, "sources.json"), "w", encoding="utf-8") as f:
        json.dump(sources, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
