#!/usr/bin/python3
"""Compare flexmore's scoring SQL functions with the float64 reference.

For each checkpoint preset the script imports the model, then checks
through psql, against reference.Model:
  - flexmore_score: the sum of log-probabilities of the input's ids after
    the boundary id (the first eos id), relative error <= 1e-4;
  - flexmore_classify_scores and flexmore_classify_batch: each label's
    summed log-probability (prompt ids, then ' ' + label tokenized on its
    own), relative error <= 1e-4, probabilities within 1e-3, and the same
    best label unless the reference's two best lie within 1e-4;
  - flexmore_embed: the mean final-normed hidden state, error
    max|sql - ref| / max|ref| <= 1e-4;
  - a template that ends in a space: the SQL result must match the prompt
    and ' ' + label tokenized apart;
  - that those ids equal prompt + ' ' + label tokenized as one string, so
    the rule agrees with whole-string tokenization for these pre-tokenizers.
Log-probabilities are normalised over the ids the tokenizer defines.
Token ids come from Hugging Face's tokenizers library (test/tokenizer/
reference.js), not from flexmore.  Prints "N passed, N failed".

    classify_reference.py MODELS_DIR
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference  # noqa: E402

TOKENIZER_JS = os.path.join(HERE, "..", "tokenizer", "reference.js")
TOLERANCE = 1e-4
PROBABILITY_TOLERANCE = 1e-3
DEFAULT_TEMPLATE = "Text: {input}\nLabel:"

PRESETS = ["default", "flex_olmo_f32", "flexmore_ranks_f32", "padded_vocab"]

INPUTS = [
    "Alle mennesker er født frie og lige i værdighed og rettigheder.",
    "Rødgrød med fløde smager godt.",
    "All human beings are born free and equal in dignity and rights.",
    "The program is distributed in the hope that it will be useful.",
]
LABELS = ["positiv", "negativ", "neutral discussion"]
SPLIT_TEMPLATE = "Tekst: {input} "
SPLIT_LABELS = ["ja", "nej"]


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def add(self, label, ok, detail):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print(f"{'ok  ' if ok else 'FAIL'} {label}: {detail}", flush=True)


def sql_literal(text):
    return "'" + text.replace("'", "''") + "'"


def sql_array(items, kind="text"):
    return "ARRAY[" + ",".join(sql_literal(i) for i in items) + f"]::{kind}[]"


def psql(sql):
    done = subprocess.run(["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"psql failed: {done.stderr.strip()[-400:]}")
    return done.stdout.rstrip("\n")


def hf_tokenize(tokenizer_json, texts):
    """Token ids of each text from Hugging Face's tokenizers library."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for t in texts:
            f.write(json.dumps(t) + "\n")
        path = f.name
    try:
        out = subprocess.run(["node", TOKENIZER_JS, tokenizer_json, path],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    lines = out.split("\n")[:len(texts)]
    return [[int(x) for x in line.split()] for line in lines]


class Scorer:
    """Float64 scores of a reference model, normalised over the tokenizer's ids."""

    def __init__(self, directory):
        self.model = reference.Model.load(directory)
        eos = self.model.config["eos_token_ids"]
        self.boundary = eos[0] if eos else None

    def log_softmax(self, logits):
        masked = np.where(self.model.sampleable, logits, -np.inf)
        top = np.max(masked)
        return logits - (top + np.log(np.sum(np.exp(masked - top))))

    def continuation(self, prefix, ids, allowed=None):
        """Sum of log p(ids[i] | prefix + ids[:i])."""
        seq = list(prefix) + list(ids)
        logits = self.model.logits_all(seq[:-1], allowed)
        total = 0.0
        for i, token in enumerate(ids):
            total += self.log_softmax(logits[len(prefix) - 1 + i])[token]
        return total

    def score(self, ids, allowed=None):
        return self.continuation([self.boundary], ids, allowed) if ids else 0.0

    def embed(self, ids, allowed=None):
        return self.model.hidden_states(ids, allowed).mean(axis=0)


def relative(got, want):
    return abs(got - want) / max(abs(want), 1e-30)


def check_classification(report, scorer, name, sql_scores, prompt_ids, label_ids, labels):
    want = np.array([scorer.continuation([scorer.boundary] + prompt_ids, ids)
                     for ids in label_ids])
    got = np.array([sql_scores[label]["logprob"] for label in labels])
    err = max(relative(g, w) for g, w in zip(got, want))
    report.add(f"{name} label log-probs", err <= TOLERANCE, f"max relative error {err:.2e}")

    p_want = np.exp(want - want.max())
    p_want /= p_want.sum()
    p_got = np.array([sql_scores[label]["probability"] for label in labels])
    perr = float(np.max(np.abs(p_got - p_want)))
    report.add(f"{name} probabilities", perr <= PROBABILITY_TOLERANCE,
               f"max error {perr:.2e}")

    top2 = np.sort(want)[-2:]
    decided = top2[1] - top2[0] > TOLERANCE * abs(top2[1])
    best_got = labels[int(np.argmax(got))]
    best_want = labels[int(np.argmax(want))]
    report.add(f"{name} best label", best_got == best_want or not decided,
               f"sql {best_got!r}, reference {best_want!r}")
    tokens = [sql_scores[label]["tokens"] for label in labels]
    report.add(f"{name} label token counts", tokens == [len(i) for i in label_ids],
               f"sql {tokens}, reference {[len(i) for i in label_ids]}")


def check_preset(report, models_dir, preset):
    directory = os.path.join(models_dir, preset)
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    model_name = f"cls_{preset}"
    psql(f"SELECT flexmore_import({sql_literal(model_name)}, "
         f"{sql_literal(os.path.abspath(directory))}, true)")
    scorer = Scorer(directory)
    names = scorer.model.config["expert_names"]
    experts = [names[0], names[-1]]
    allowed = scorer.model.expert_mask(experts)

    prompts = [DEFAULT_TEMPLATE.replace("{input}", t) for t in INPUTS]
    split_prompt = SPLIT_TEMPLATE.replace("{input}", INPUTS[1])
    texts = (INPUTS + prompts + [" " + label for label in LABELS] + [split_prompt]
             + [" " + label for label in SPLIT_LABELS]
             + [split_prompt + " " + label for label in SPLIT_LABELS])
    ids = hf_tokenize(tokenizer_json, texts)
    n = len(INPUTS)
    input_ids, prompt_ids = ids[:n], ids[n:2 * n]
    label_ids = ids[2 * n:2 * n + len(LABELS)]
    rest = ids[2 * n + len(LABELS):]
    split_prompt_ids, split_label_ids, joint_ids = rest[0], rest[1:3], rest[3:5]

    for i, text in enumerate(INPUTS):
        tag = f"{preset} input {i + 1}"
        got = float(psql(f"SELECT flexmore_score({sql_literal(model_name)}, "
                         f"{sql_literal(text)})"))
        want = scorer.score(input_ids[i])
        report.add(f"{tag} score", relative(got, want) <= TOLERANCE,
                   f"sql {got:.6f}, reference {want:.6f}")

        sql_scores = json.loads(psql(
            f"SELECT flexmore_classify_scores({sql_literal(model_name)}, {sql_literal(text)}, "
            f"{sql_array(LABELS)})"))
        check_classification(report, scorer, f"{tag} classify", sql_scores, prompt_ids[i],
                             label_ids, LABELS)

        got_e = np.array(json.loads(psql(
            f"SELECT array_to_json(flexmore_embed({sql_literal(model_name)}, "
            f"{sql_literal(text)}))")))
        want_e = scorer.embed(input_ids[i])
        err = float(np.max(np.abs(got_e - want_e)) / np.max(np.abs(want_e)))
        report.add(f"{tag} embed", got_e.shape == want_e.shape and err <= TOLERANCE,
                   f"error {err:.2e}")

    # batched classification and scoring against the same reference
    batch = psql(
        f"SELECT json_agg(json_build_object('id', id, 'scores', scores) ORDER BY id) "
        f"FROM flexmore_classify_batch({sql_literal(model_name)}, "
        f"ARRAY[{','.join(str(i + 1) for i in range(n))}]::bigint[], {sql_array(INPUTS)}, "
        f"{sql_array(LABELS)})")
    for row in json.loads(batch):
        i = row["id"] - 1
        check_classification(report, scorer, f"{preset} batch row {i + 1}", row["scores"],
                             prompt_ids[i], label_ids, LABELS)
    batch = json.loads(psql(
        f"SELECT json_agg(json_build_object('id', id, 'score', score, 'tokens', tokens) "
        f"ORDER BY id) FROM flexmore_score_batch({sql_literal(model_name)}, "
        f"ARRAY[{','.join(str(i + 1) for i in range(n))}]::bigint[], {sql_array(INPUTS)})"))
    for row in batch:
        i = row["id"] - 1
        want = scorer.score(input_ids[i])
        report.add(f"{preset} score batch row {i + 1}",
                   relative(row["score"], want) <= TOLERANCE and
                   row["tokens"] == len(input_ids[i]),
                   f"sql {row['score']:.6f} over {row['tokens']} tokens, reference "
                   f"{want:.6f} over {len(input_ids[i])}")

    # expert restriction
    got = float(psql(f"SELECT flexmore_score({sql_literal(model_name)}, {sql_literal(INPUTS[2])}, "
                     f"{sql_array(experts)})"))
    want = scorer.score(input_ids[2], allowed)
    report.add(f"{preset} score with experts {','.join(experts)}",
               relative(got, want) <= TOLERANCE, f"sql {got:.6f}, reference {want:.6f}")

    # a template ending in a space: the label is tokenized on its own
    sql_scores = json.loads(psql(
        f"SELECT flexmore_classify_scores({sql_literal(model_name)}, {sql_literal(INPUTS[1])}, "
        f"{sql_array(SPLIT_LABELS)}, {sql_literal(SPLIT_TEMPLATE)})"))
    check_classification(report, scorer, f"{preset} template ending in a space", sql_scores,
                         split_prompt_ids, split_label_ids, SPLIT_LABELS)
    for k, label in enumerate(SPLIT_LABELS):
        same = split_prompt_ids + split_label_ids[k] == joint_ids[k]
        report.add(f"{preset} label {label!r} after a trailing space tokenizes as one string",
                   same, "same ids" if same else f"apart {split_prompt_ids + split_label_ids[k]}, "
                   f"joint {joint_ids[k]}")


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    report = Report()
    for preset in PRESETS:
        if not os.path.isdir(os.path.join(argv[1], preset)):
            report.add(f"{preset}: checkpoint", False, "not generated")
            continue
        check_preset(report, argv[1], preset)
    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
