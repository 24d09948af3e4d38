#!/usr/bin/python3
"""Compare an engine's next-token logits with the float64 reference.

For one checkpoint the harness checks:
  - logits for several id sequences (one id, a short one, one with eos
    ids, one longer than the engine's 64-row prompt chunk, and two
    expert-restricted ones): error max|engine - ref| / max|ref| <= 1e-4;
  - greedy teacher forcing over 32 steps: the reference's greedy
    continuation is fed back one prefix at a time, and at every step where
    the reference's two best sampleable logits differ by more than 1e-3
    of max|ref|, the engine's argmax must equal the reference's.
It prints one line per check and "N passed, N failed", and exits non-zero
on any failure.

Backends return the engine's logits after an id list:
  cli        Runs a command template once per call and reads the JSON list
             of floats it prints.  {dir} and {ids} are substituted, and
             "--experts a,b" is appended for expert-restricted calls.
  psql       Runs SELECT flexmore_logits(model, ids[, experts]) through
             psql, with connection settings from the PG* variables.
  reference  A second reference instance, which must pass.
  float32    The reference computed in float32 as an fp32 engine would.
             It must pass, which shows that the tolerance is reachable.
  perturbed  The reference with one deliberate mistake, which must fail.

    compare.py DIR --backend cli --command 'build/tools/flexmore-run logits {dir} --ids {ids}'
    compare.py DIR --backend psql --model mymodel [--import]
    compare.py --all-presets WORKDIR --backend cli|psql|reference [--tokenizer PATH]
    compare.py --self-test WORKDIR
"""

import argparse
import json
import os
import shlex
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_checkpoint  # noqa: E402
import reference  # noqa: E402

LOGITS_TOLERANCE = 1e-4
ARGMAX_MARGIN = 1e-3
TEACHER_STEPS = 32
PROMPT_CHUNK = 64
LONG_SEQUENCE = 150
DEFAULT_COMMAND = "build/tools/flexmore-run logits {dir} --ids {ids}"
CALL_TIMEOUT_SECONDS = 300


class BackendError(RuntimeError):
    """The engine under test failed to return logits."""


# ---------------------------------------------------------------- backends


class ReferenceBackend:
    """Logits from a separately loaded reference model (or a mutant of it)."""

    def __init__(self, directory, model_class=reference.Model):
        self.model = model_class.load(directory)

    def logits(self, ids, experts):
        return self.model.logits_all(ids, self.model.expert_mask(experts))[-1]


class NoiseBackend(ReferenceBackend):
    """Reference logits plus Gaussian noise of 1e-3 of max|logit|: above the tolerance."""

    def __init__(self, directory):
        super().__init__(directory)
        self.rng = np.random.default_rng(1)

    def logits(self, ids, experts):
        exact = super().logits(ids, experts)
        return exact + self.rng.standard_normal(exact.shape) * 1e-3 * np.max(np.abs(exact))


class CliBackend:
    """Runs a command per call and parses the JSON list of logits it prints."""

    def __init__(self, directory, template):
        self.directory = directory
        self.template = shlex.split(template)

    def logits(self, ids, experts):
        fields = {"dir": self.directory, "ids": ",".join(str(i) for i in ids)}
        argv = [part.format(**fields) for part in self.template]
        if experts is not None:
            argv += ["--experts", ",".join(experts)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=CALL_TIMEOUT_SECONDS, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"{argv[0]}: {exc}") from exc
        if done.returncode != 0:
            raise BackendError(f"{shlex.join(argv[:3])} ... exited with {done.returncode}: "
                               f"{done.stderr.strip()[-400:]}")
        try:
            value = json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise BackendError(f"output is not JSON: {exc}: {done.stdout[:200]!r}") from exc
        if isinstance(value, dict):
            value = value.get("logits")
        if not isinstance(value, list):
            raise BackendError("output is neither a JSON list nor an object with 'logits'")
        return np.array(value, dtype=np.float64)


def sql_literal(text):
    """Quote text as an SQL string literal (standard_conforming_strings on)."""
    return "'" + text.replace("'", "''") + "'"


class PsqlBackend:
    """Calls flexmore_logits through psql, which reads connection settings from PG* variables."""

    def __init__(self, model_name, psql="psql"):
        self.model_name = model_name
        self.psql = psql

    def query(self, sql):
        argv = [self.psql, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql]
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=CALL_TIMEOUT_SECONDS, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"{self.psql}: {exc}") from exc
        if done.returncode != 0:
            raise BackendError(f"psql exited with {done.returncode}: {done.stderr.strip()[-400:]}")
        return done.stdout.strip()

    def import_model(self, directory):
        """Import directory as this backend's model, replacing an older import.

        The server reads the directory, so it must be on the server's host.
        """
        self.query(f"SELECT flexmore_import({sql_literal(self.model_name)}, "
                   f"{sql_literal(os.path.abspath(directory))}, true)")

    def logits(self, ids, experts):
        args = [sql_literal(self.model_name), f"ARRAY[{','.join(str(i) for i in ids)}]::int[]"]
        if experts is not None:
            args.append("ARRAY[" + ",".join(sql_literal(e) for e in experts) + "]::text[]")
        text = self.query(f"SELECT flexmore_logits({', '.join(args)})")
        if not (text.startswith("{") and text.endswith("}")):
            raise BackendError(f"flexmore_logits returned {text[:200]!r}, not a real[]")
        body = text[1:-1]
        # float() accepts PostgreSQL's NaN, Infinity and -Infinity spellings.
        return np.array([float(x) for x in body.split(",")] if body else [], dtype=np.float64)


# ---------------------------------------------------------------- mutants


class EpsMutant(reference.Model):
    """RMSNorm with eps hard-coded to 1e-5 instead of rms_norm_eps."""

    def rms_norm(self, x, weight):
        return reference.rms_norm(x, weight, 1e-5)


class InterleavedRopeMutant(reference.Model):
    """RoPE pairing dimensions (2i, 2i+1) instead of (i, i + d/2)."""

    def rope(self, x, positions):
        d = x.shape[-1]
        order = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
        inverse = np.argsort(order)
        return super().rope(x[..., order], positions)[..., inverse]


class SoftmaxAfterTopkMutant(reference.Model):
    """Router taking the top k logits first and the softmax over those only."""

    def route(self, router_logits, allowed):
        chosen, _ = super().route(router_logits, allowed)
        z = np.asarray(router_logits, dtype=np.float64)[chosen]
        weights = np.exp(z - z.max())
        return chosen, weights / weights.sum()


class GqaModuloMutant(reference.Model):
    """Query head h reading kv head h mod kv_heads instead of h // group."""

    def kv_head_of(self, head):
        return head % self.config["num_key_value_heads"]


class LatePositionMutant(reference.Model):
    """RoPE positions off by one from position PROMPT_CHUNK on (a chunking bug)."""

    def rope(self, x, positions):
        shifted = np.where(positions >= PROMPT_CHUNK, positions + 1, positions)
        return super().rope(x, shifted)


class Float32Model(reference.Model):
    """The reference computed in float32, as an fp32 engine would compute it (must pass)."""

    @classmethod
    def load(cls, directory):
        model = super().load(directory)
        w = model.weights
        for key in ("embed", "lm_head", "final_norm"):
            w[key] = w[key].astype(np.float32)
        for layer in w["layers"]:
            for key, value in layer.items():
                if key == "experts":
                    layer[key] = [tuple(m.astype(np.float32) for m in e) for e in value]
                else:
                    layer[key] = value.astype(np.float32)
        return model


MUTANTS = {
    "noise": None,
    "eps": EpsMutant,
    "rope-interleaved": InterleavedRopeMutant,
    "softmax-after-topk": SoftmaxAfterTopkMutant,
    "gqa-modulo": GqaModuloMutant,
    "late-position": LatePositionMutant,
}


def make_perturbed(directory, mutation):
    if mutation == "noise":
        return NoiseBackend(directory)
    return ReferenceBackend(directory, MUTANTS[mutation])


# ---------------------------------------------------------------- checks


class Report:
    """Counts and prints check results."""

    def __init__(self, quiet=False):
        self.passed = 0
        self.failed = 0
        self.quiet = quiet

    def add(self, label, ok, detail):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        if not self.quiet:
            print(f"{'ok  ' if ok else 'FAIL'} {label}: {detail}", flush=True)


def relative_error(engine, ref):
    """max|engine - ref| / max|ref|, or inf when the lengths differ."""
    if engine.shape != ref.shape:
        return float("inf")
    err = np.max(np.abs(engine - ref)) / np.max(np.abs(ref))
    return float("inf") if np.isnan(err) else float(err)


def sample_ids(model, n, rng):
    """n ids drawn from the ids the tokenizer defines."""
    known = np.flatnonzero(model.sampleable)
    return [int(i) for i in rng.choice(known, size=n)]


def comparison_sequences(model):
    """Return [(label, ids, expert names or None)] for the logits checks."""
    rng = np.random.default_rng(12345)
    c = model.config
    names = c["expert_names"]
    eos = c["eos_token_ids"][0] if c["eos_token_ids"] else 0
    long_n = min(LONG_SEQUENCE, c["max_position_embeddings"])
    with_eos = sample_ids(model, 5, rng) + [eos] + sample_ids(model, 4, rng) + [eos]
    return [
        ("one id", sample_ids(model, 1, rng), None),
        ("8 ids", sample_ids(model, 8, rng), None),
        ("ids with eos", with_eos, None),
        (f"{long_n} ids (past the {PROMPT_CHUNK}-row chunk)", sample_ids(model, long_n, rng),
         None),
        (f"experts {names[0]},{names[2]}", sample_ids(model, 20, rng), [names[0], names[2]]),
        (f"expert {names[-1]} alone", sample_ids(model, 12, rng), [names[-1]]),
    ]


def check_logits(model, backend, report, prefix):
    for label, ids, experts in comparison_sequences(model):
        ref = model.logits_all(ids, model.expert_mask(experts))[-1]
        try:
            got = backend.logits(ids, experts)
        except BackendError as exc:
            report.add(f"{prefix}logits {label}", False, str(exc))
            continue
        err = relative_error(got, ref)
        if got.shape == ref.shape:
            detail = f"error {err:.2e}"
        else:
            detail = f"{got.shape[0]} logits, expected {ref.shape[0]}"
        report.add(f"{prefix}logits {label}", err <= LOGITS_TOLERANCE, detail)


def check_teacher_forcing(model, backend, report, prefix):
    """Feed the reference's greedy continuation and compare argmax step by step."""
    rng = np.random.default_rng(54321)
    steps = min(TEACHER_STEPS, model.config["max_position_embeddings"] - 6)
    prompt = sample_ids(model, 6, rng)
    continuation, ref_rows = model.teacher_forced(prompt, steps)

    decided = mismatches = 0
    worst = 0.0
    first_bad = None
    for step in range(steps):
        ref = ref_rows[step]
        try:
            got = backend.logits(prompt + continuation[:step], None)
        except BackendError as exc:
            report.add(f"{prefix}teacher forcing", False, f"step {step}: {exc}")
            return
        worst = max(worst, relative_error(got, ref))
        if got.shape != ref.shape:
            mismatches += 1
            first_bad = first_bad if first_bad is not None else step
            continue
        masked = np.where(model.sampleable, ref, -np.inf)
        top2 = np.sort(masked)[-2:]
        if top2[1] - top2[0] <= ARGMAX_MARGIN * np.max(np.abs(ref)):
            continue
        decided += 1
        if model.argmax_sampleable(got) != continuation[step]:
            mismatches += 1
            first_bad = first_bad if first_bad is not None else step

    detail = f"{steps} steps, {decided} decided, {mismatches} argmax mismatches"
    if first_bad is not None:
        detail += f" (first at step {first_bad})"
    report.add(f"{prefix}teacher forcing argmax", mismatches == 0, detail)
    report.add(f"{prefix}teacher forcing logits", worst <= LOGITS_TOLERANCE,
               f"max error {worst:.2e} over {steps} steps")


def compare(directory, backend, report, prefix=""):
    """Run every check of one checkpoint against backend."""
    model = reference.Model.load(directory)
    check_logits(model, backend, report, prefix)
    check_teacher_forcing(model, backend, report, prefix)


# ---------------------------------------------------------------- driver


def preset_names(tokenizer):
    """Presets to run: all of them, except default without a cl100k tokenizer."""
    names = []
    for name, preset in gen_checkpoint.PRESETS.items():
        if preset.get("tokenizer") == "cl100k" and tokenizer is None:
            print(f"skipping preset {name}: it needs --tokenizer", file=sys.stderr)
            continue
        names.append(name)
    return names


def make_backend(args, directory, model_name):
    if args.backend == "cli":
        return CliBackend(directory, args.command)
    if args.backend == "psql":
        backend = PsqlBackend(model_name, args.psql)
        if args.import_model:
            backend.import_model(directory)
        return backend
    if args.backend == "reference":
        return ReferenceBackend(directory)
    if args.backend == "float32":
        return ReferenceBackend(directory, Float32Model)
    return make_perturbed(directory, args.mutation)


def run_self_test(workdir, tokenizer):
    """Check the harness: the reference must pass and every mutant must fail somewhere."""
    names = preset_names(tokenizer)
    for name in names:
        gen_checkpoint.generate_preset(name, os.path.join(workdir, name), tokenizer)

    outcome = Report()
    for mutation in ["reference", "float32"] + list(MUTANTS):
        caught = []
        for name in names:
            directory = os.path.join(workdir, name)
            report = Report(quiet=True)
            if mutation == "reference":
                backend = ReferenceBackend(directory)
            elif mutation == "float32":
                backend = ReferenceBackend(directory, Float32Model)
            else:
                backend = make_perturbed(directory, mutation)
            compare(directory, backend, report)
            if report.failed:
                caught.append(name)
        if mutation in ("reference", "float32"):
            outcome.add(f"{mutation} backend passes", not caught,
                        f"failed on {', '.join(caught)}" if caught else f"{len(names)} presets")
        elif mutation == "noise":
            outcome.add("noise mutant fails everywhere", len(caught) == len(names),
                        f"caught on {len(caught)}/{len(names)} presets")
        else:
            outcome.add(f"{mutation} mutant fails", bool(caught),
                        f"caught on {', '.join(caught) or 'no preset'}")
    return outcome


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Compare an engine's logits with the float64 reference.")
    parser.add_argument("directory", nargs="?", help="checkpoint directory")
    parser.add_argument("--all-presets", metavar="WORKDIR",
                        help="generate every preset into WORKDIR/NAME and compare each")
    parser.add_argument("--self-test", metavar="WORKDIR",
                        help="check the harness itself with the reference and its mutants")
    parser.add_argument("--backend", choices=["cli", "psql", "reference", "float32", "perturbed"],
                        default="reference", help="engine under test (default: reference)")
    parser.add_argument("--command", default=DEFAULT_COMMAND,
                        help="cli backend command template with {dir} and {ids} "
                             f"(default: {DEFAULT_COMMAND!r})")
    parser.add_argument("--model", help="psql backend: model name (with --all-presets each "
                        "preset is imported under its own name)")
    parser.add_argument("--import", dest="import_model", action="store_true",
                        help="psql backend: run flexmore_import(model, DIR, true) first")
    parser.add_argument("--psql", default="psql", help="psql executable (default: psql)")
    parser.add_argument("--mutation", choices=list(MUTANTS), default="noise",
                        help="perturbed backend: which mistake to make (default: noise)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="cl100k tokenizer.json, needed for the default preset")
    args = parser.parse_args(argv)

    try:
        if args.self_test:
            report = run_self_test(args.self_test, args.tokenizer)
        elif args.all_presets:
            report = Report()
            if args.backend == "psql":
                args.import_model = True
            for name in preset_names(args.tokenizer):
                directory = os.path.join(args.all_presets, name)
                gen_checkpoint.generate_preset(name, directory, args.tokenizer)
                try:
                    backend = make_backend(args, directory, name)
                except BackendError as exc:
                    report.add(f"{name}: import", False, str(exc))
                    continue
                compare(directory, backend, report, f"{name}: ")
        elif args.directory:
            if args.backend == "psql" and not args.model:
                parser.error("the psql backend needs --model")
            report = Report()
            compare(args.directory, make_backend(args, args.directory, args.model), report)
        else:
            parser.error("give a checkpoint DIR, --all-presets WORKDIR or --self-test WORKDIR")
    except (BackendError, reference.CheckpointError, OSError) as exc:
        print(f"compare.py: {exc}", file=sys.stderr)
        return 2

    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
