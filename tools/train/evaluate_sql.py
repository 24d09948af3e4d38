#!/usr/bin/python3
"""Held-out perplexity and routing of the trained models, computed by
flexmore inside PostgreSQL and compared with the training framework's own
figures in evaluation.json (written by train.py).

The connection comes from the PG* environment variables; the server must
be able to read the model folders.  The script creates DATABASE (dropping
an old one), imports each --model NAME=DIR, loads the held-out chunks and
scores them with flexmore_score_batch under every expert restriction that
evaluation.json lists:

  public                 experts => ARRAY['public'] (the public model alone)
  NAME                   all experts
  NAME_without_DOMAIN    every expert but DOMAIN (the owner opted out)

Modes:
  --report   print a Markdown table of PostgreSQL's figures next to the
             framework's and the relative difference, the share of each
             domain's tokens routed to its own expert, and where the tokens
             of three passages go;
  --check    print TAP results: every figure within --tolerance of the
             framework's (0.5% by default), the merged model below the
             public model on every domain, and each domain's own expert
             among the chosen experts for most (token, layer) pairs.
--sample scores only the first sample_chunks chunks of each corpus and
compares with evaluation.json's sample_perplexity; the routing share always
uses every chunk of --routing-heldout.
"""

import argparse
import csv
import io
import json
import os
import subprocess
import sys

DOMAINS = ["danish", "legal", "code"]


def psql(database, sql, stdin=None):
    out = subprocess.run(["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
                          "-d", database, "-c", sql],
                         input=stdin, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"psql failed: {out.stderr.strip()}\nSQL: {sql[:200]}")
    return out.stdout.strip()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--evaluation", required=True, help="evaluation.json from train.py")
    p.add_argument("--heldout", required=True, help="held-out chunks, JSON lines")
    p.add_argument("--routing-heldout",
                   help="held-out chunks for the routing share (default: --heldout, all chunks)")
    p.add_argument("--model", action="append", required=True,
                   help="NAME=DIR; NAME is flexmore or flexolmo")
    p.add_argument("--database", default="flexmore_trained")
    p.add_argument("--sample", action="store_true")
    p.add_argument("--tolerance", type=float, default=0.005)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--report", action="store_true")
    mode.add_argument("--check", action="store_true")
    return p.parse_args()


def load(args, evaluation):
    db = args.database
    psql("postgres", f"DROP DATABASE IF EXISTS {db}")
    psql("postgres", f"CREATE DATABASE {db}")
    psql(db, "SET client_min_messages = warning; CREATE EXTENSION flexmore")
    for spec in args.model:
        name, path = spec.split("=", 1)
        # flexmore_import rejects relative paths: the server's working folder is not ours.
        path = os.path.abspath(path)
        psql(db, "SET client_min_messages = warning; "
             f"SELECT flexmore_import('{name}', '{path}')")
    limit = evaluation["sample_chunks"] if args.sample else None
    load_chunks(db, "heldout", args.heldout, limit)
    load_chunks(db, "routing_chunks", args.routing_heldout or args.heldout, None)


def load_chunks(db, table, path, limit):
    """Loads the chunks of a JSON-lines file, the first limit of each corpus
    when limit is set, into a new table."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if limit is None or row["chunk"] < limit:
                writer.writerow([row["corpus"], row["chunk"], row["text"], row["tokens"]])
    psql(db, f"CREATE TABLE {table} (corpus text, chunk int, body text, tokens int, "
         "PRIMARY KEY (corpus, chunk))")
    psql(db, f"\\copy {table} FROM STDIN WITH (FORMAT csv)", stdin=buf.getvalue())


def perplexities(db, model, experts):
    """{corpus: (perplexity, scored tokens)} under an experts restriction."""
    arg = "NULL" if experts is None else "ARRAY[" + ",".join(f"'{e}'" for e in experts) + "]"
    out = psql(db, f"""
        SELECT h.corpus, exp(-sum(r.score) / sum(r.tokens)), sum(r.tokens)
        FROM (SELECT corpus, array_agg(chunk::bigint ORDER BY chunk) AS ids,
                     array_agg(body ORDER BY chunk) AS bodies
              FROM heldout GROUP BY corpus) h,
             LATERAL flexmore_score_batch('{model}', h.ids, h.bodies, {arg}) r
        GROUP BY h.corpus""")
    result = {}
    for line in out.splitlines():
        corpus, value, tokens = line.split("|")
        result[corpus] = (float(value), int(tokens))
    return result


def own_expert_share(db, model):
    out = psql(db, f"""
        SELECT h.corpus, avg((h.corpus = ANY (r.experts))::int)
        FROM routing_chunks h, LATERAL flexmore_route('{model}', h.body) r
        WHERE h.corpus <> 'public'
        GROUP BY h.corpus""")
    return {c: float(v) for c, v in (line.split("|") for line in out.splitlines())}


PASSAGES = {
    "danish": "Filen kunne ikke åbnes, fordi du ikke har adgang til mappen.",
    "legal": "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND.",
    "code": "static int read_header(FILE *f, struct header *h)\n{\n\treturn fread(h, sizeof(*h), 1, f) == 1 ? 0 : -1;\n}",
}


def routing_picture(db, model):
    """Per passage: each token with the experts chosen in every layer."""
    lines = []
    for domain, text in PASSAGES.items():
        literal = text.replace("'", "''")
        out = psql(db, f"""
            SELECT json_build_array(token, string_agg(experts[1] || '+' || experts[2], ' '
                                                       ORDER BY layer))
            FROM flexmore_route('{model}', E'{literal}')
            GROUP BY position, token ORDER BY position""")
        lines.append(f"{domain} passage (top-2 experts in layers 0-3, highest weight first):")
        lines.append("")
        lines.append("| token | layer 0 | layer 1 | layer 2 | layer 3 |")
        lines.append("| --- | --- | --- | --- | --- |")
        for row in out.splitlines():
            token, picks = json.loads(row)
            escaped = json.dumps(token, ensure_ascii=False)[1:-1].replace("|", "\\|")
            lines.append(f"| `{escaped}` | " + " | ".join(picks.split(" ")) + " |")
        lines.append("")
    return lines


def main():
    args = parse_args()
    with open(args.evaluation) as f:
        evaluation = json.load(f)
    load(args, evaluation)
    db = args.database
    expected = evaluation["sample_perplexity" if args.sample else "perplexity"]
    names = evaluation["expert_names"]
    models = [spec.split("=", 1)[0] for spec in args.model]

    measured = {}
    for model in models:
        measured["public"] = perplexities(db, model, ["public"])
        measured[model] = perplexities(db, model, None)
        for d in DOMAINS:
            if f"{model}_without_{d}" not in next(iter(expected.values())):
                continue
            measured[f"{model}_without_{d}"] = perplexities(
                db, model, [n for n in names if n != d])

    if args.check:
        count = failed = 0

        def check(name, ok, detail):
            nonlocal count, failed
            count += 1
            failed += 0 if ok else 1
            print(f"{'ok' if ok else 'not ok'} {count} - {name}")
            if not ok:
                print(f"# {detail}")

        for variant, rows in measured.items():
            for corpus, (value, tokens) in sorted(rows.items()):
                ref = expected[corpus][variant]
                rel = abs(value - ref) / ref
                check(f"{variant} perplexity on {corpus} within {args.tolerance:.1%} "
                      f"of the framework's", rel <= args.tolerance,
                      f"PostgreSQL {value:.4f}, framework {ref:.4f}, relative {rel:.2e}")
                check(f"{variant} on {corpus} scores the framework's token count",
                      tokens == expected[corpus]["tokens"],
                      f"{tokens} vs {expected[corpus]['tokens']}")
        for model in models:
            for d in DOMAINS:
                merged, public = measured[model][d][0], measured["public"][d][0]
                check(f"{model} beats the public model on {d}", merged < public,
                      f"{merged:.3f} vs {public:.3f}")
        for model in models:
            for d, share in sorted(own_expert_share(db, model).items()):
                check(f"{model}: {d} expert chosen for most {d} tokens", share > 0.5,
                      f"share {share:.3f}")
        print(f"1..{count}")
        print(f"{count - failed} passed, {failed} failed")
        return 1 if failed else 0

    variants = list(measured)
    print("| variant | " + " | ".join(evaluation["perplexity"]) + " |")
    print("| --- |" + " --- |" * len(evaluation["perplexity"]))
    worst = 0.0
    for variant in variants:
        cells = []
        for corpus in evaluation["perplexity"]:
            value = measured[variant][corpus][0]
            ref = expected[corpus][variant]
            worst = max(worst, abs(value - ref) / ref)
            cells.append(f"{value:.2f} ({ref:.2f})")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    print()
    print(f"largest relative difference from the framework: {worst:.2e}")
    print()
    for model in models:
        shares = own_expert_share(db, model)
        print(f"{model}: share of (token, layer) pairs routed to the domain's own expert: "
              + ", ".join(f"{d} {shares[d]:.1%}" for d in DOMAINS))
    print()
    print("\n".join(routing_picture(db, models[-1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
