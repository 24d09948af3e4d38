#!/usr/bin/python3
"""Print the tables of `make bench` from the results bench/run.sh wrote.

    report.py RESULTS.jsonl MODEL_DIR

Every figure is a median over the runs.  The bounds:

- decode: a step reads every weight it uses once, so it cannot be faster
  than the memory read bandwidth divided by the weight bytes per token.
  "of bound" is tok/s x bytes/token / bandwidth, where bandwidth is the mean
  of the readings just before and just after the measurement.
- prompt: almost all the work is matrix products of 64-row chunks, so it
  cannot be faster than OpenBLAS sgemm at the model's shapes.  "of bound"
  is tok/s x flops/token / that rate, the rate being the flop-weighted
  harmonic mean over the products of one layer.

llama.cpp's bytes and flops per token are computed from the model's shapes
and the GGUF encodings: F32 4 bytes, BF16 2 and Q8_0 34 per 32 values, with
the norm weights in F32.  The engine reports its own.
"""

import json
import os
import statistics
import sys

BYTES_PER_VALUE = {"f32": 4.0, "bf16": 2.0, "q8": 34.0 / 32.0}
RANK_OF = {"public": 0, "r1024": 1024, "r256": 256, "r64": 64, "r16": 16, "r4": 4, "r1": 1}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def shapes(config):
    h = config["hidden_size"]
    i = config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim", h // heads)
    kv = config.get("num_key_value_heads", heads) * head_dim
    return h, i, heads * head_dim, kv, config["num_hidden_layers"], config["vocab_size"]


def dense_decode_bytes(config, fmt):
    """Weight bytes one decode step of the dense model reads in a GGUF encoding."""
    h, i, q, kv, layers, vocab = shapes(config)
    matrices = layers * (2 * h * q + 2 * h * kv + 3 * h * i) + vocab * h + h
    norms = layers * (q + kv + 2 * h) + h
    return matrices * BYTES_PER_VALUE[fmt] + norms * 4.0


def dense_prompt_flops(config, prompt):
    """Flops per prompt token of the dense model: products, attention, the last lm_head row."""
    h, i, q, kv, layers, vocab = shapes(config)
    products = 2.0 * layers * (2 * h * q + 2 * h * kv + 3 * h * i)
    attention = 2.0 * layers * 2.0 * q * (prompt + 1) / 2.0
    return products + attention + 2.0 * vocab * h / prompt


def sgemm_bound(config, shape_rates):
    """Flop-weighted harmonic mean of the sgemm rates over one layer's products, GFLOP/s."""
    h, i, q, kv, _, _ = shapes(config)
    rate = {(n, k): r for _, n, k, r in shape_rates}
    work = [((h, h), 2 * h * q + 2 * h * kv), ((i, h), 2 * h * i), ((h, i), h * i)]
    total = sum(w for _, w in work)
    return total / sum(w / rate[s] for s, w in work)


def bandwidth(entry):
    return (entry["bandwidth_before"]["read_gb_s"] + entry["bandwidth_after"]["read_gb_s"]) / 2


def fmt(value, spec, missing="n/a"):
    return missing if value is None else format(value, spec)


def llama_figures(rows):
    """(decode tok/s, prompt tok/s) medians from llama-bench's jsonl rows."""
    decode = prompt = None
    for row in rows:
        rate = median(row.get("samples_ts") or [row.get("avg_ts")])
        if row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            decode = rate
        elif row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            prompt = rate
    return decode, prompt


def print_machine(records):
    m = records["machine"][0]
    end = records.get("end", [{}])[0]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB; load average "
          f"{m['load']} at the start, {end.get('load', '?')} at the end; "
          f"{end.get('seconds', '?')} s in all")
    print(f"engine: {m['engine_bench']}; comparison: {m['llama']}")
    print(f"runs per figure: {m['runs']} (median); decode {m['decode']} steps; "
          f"prompt {m['prompt']} ids")


def print_checks(records):
    print("\nsame model check: next-token logits of 8 ids, flexmore f32 against llama.cpp")
    print(f"{'format':8}{'argmax':>16}{'max |diff|':>12}{'max |logit|':>13}{'top-5 shared':>14}")
    for c in records.get("check", []):
        if "error" in c:
            print(f"{c['format']:8}  {c['error']}")
            continue
        argmax = f"{c['argmax_flexmore']}/{c['argmax_llama']}"
        print(f"{c['format']:8}{argmax:>16}{c['max_abs_diff']:>12.4g}"
              f"{c['max_abs_logit']:>13.4g}{c['top5_shared']:>14}")


def print_speed(records, config, prompt_len):
    sgemm = {s["threads"]: sgemm_bound(config, s["shapes"]) for s in records.get("sgemm", [])}
    print("\ndecode, dense model: tok/s, weight GB per token, fraction of the memory bound")
    print(f"{'format':7}{'thr':>4}{'GB/s before/after':>19}"
          f"{'flexmore':>10}{'GB/tok':>8}{'of bound':>9}"
          f"{'llama.cpp':>11}{'GB/tok':>8}{'of bound':>9}{'flexmore/llama':>16}")
    rows = []
    for cell in records.get("cell", []):
        f, t = cell["format"], cell["threads"]
        bw = bandwidth(cell)
        engine = cell["engine"]
        e_dec = median(r["decode_tok_s"] for r in engine)
        e_pre = median(r["prompt_tok_s"] for r in engine)
        e_bytes = median(r["weight_bytes_per_token"] for r in engine)
        e_flops = median(r["prompt_flops_per_token"] for r in engine)
        l_dec, l_pre = llama_figures(cell["llama"])
        l_bytes = dense_decode_bytes(config, f)
        l_flops = dense_prompt_flops(config, prompt_len)
        rows.append((f, t, e_pre, e_flops, l_pre, l_flops))
        e_bound = e_dec * e_bytes / 1e9 / bw if e_dec and e_bytes else None
        l_bound = l_dec * l_bytes / 1e9 / bw if l_dec else None
        ratio = e_dec / l_dec if e_dec and l_dec else None
        readings = (f"{cell['bandwidth_before']['read_gb_s']:.1f}/"
                    f"{cell['bandwidth_after']['read_gb_s']:.1f}")
        print(f"{f:7}{t:>4}{readings:>19}"
              f"{fmt(e_dec, '.3f'):>10}{fmt(e_bytes and e_bytes / 1e9, '.2f'):>8}"
              f"{fmt(e_bound, '.0%'):>9}"
              f"{fmt(l_dec, '.3f'):>11}{l_bytes / 1e9:>8.2f}{fmt(l_bound, '.0%'):>9}"
              f"{fmt(ratio, '.2f'):>16}")

    buffers = {c["format"]: c["bandwidth_before"]["mib"] for c in records.get("cell", [])}
    isas = {r.get("isa") for c in records.get("cell", []) for r in c["engine"]}
    print("bandwidth buffer per format: " +
          ", ".join(f"{f} {mib} MiB" for f, mib in buffers.items()) +
          "; engine kernels: " + (", ".join(sorted(str(i) for i in isas)) or "n/a"))

    print("\nprompt, dense model: tok/s, GFLOP per token, fraction of the sgemm bound")
    print(f"{'format':7}{'thr':>4}{'sgemm GFLOP/s':>15}"
          f"{'flexmore':>10}{'GFLOP/tok':>11}{'of bound':>9}"
          f"{'llama.cpp':>11}{'of bound':>9}{'flexmore/llama':>16}")
    for f, t, e_pre, e_flops, l_pre, l_flops in rows:
        rate = sgemm.get(t)
        e_bound = e_pre * e_flops / 1e9 / rate if e_pre and e_flops and rate else None
        l_bound = l_pre * l_flops / 1e9 / rate if l_pre and rate else None
        ratio = e_pre / l_pre if e_pre and l_pre else None
        print(f"{f:7}{t:>4}{fmt(rate, '.1f'):>15}"
              f"{fmt(e_pre, '.2f'):>10}{fmt((e_flops or l_flops) / 1e9, '.3f'):>11}"
              f"{fmt(e_bound, '.0%'):>9}"
              f"{fmt(l_pre, '.2f'):>11}{fmt(l_bound, '.0%'):>9}{fmt(ratio, '.2f'):>16}")


def print_moe(records, config):
    h, i, _, _, layers, _ = shapes(config)
    per_rank = (h + i) / (h * i)   # adapter of rank r: 3 r (h + i) weights, dense FFN: 3 h i
    print(f"\nMoE decode cost, FlexMoRE model: an adapter of rank r costs "
          f"r x {per_rank:.3g} of a dense FFN at these shapes")
    print("  FFN cost = measured time per token - the public-only time + the public-only FFN "
          "time,\n  the FFN time estimated from its share of the public-only weight bytes")
    groups = {}
    for entry in records.get("moe", []):
        groups.setdefault((entry.get("format", "f32"), entry["threads"]), []).append(entry)
    for (format_name, threads), entries in groups.items():
        base = None
        print(f"{format_name}, {threads} thread(s), bandwidth {bandwidth(entries[0]):.1f} GB/s")
        print(f"{'adapters':>9}{'ranks':>24}{'computed FFNs':>15}{'tok/s':>8}{'GB/tok':>8}"
              f"{'FFN cost ratio':>16}{'token ratio':>13}")
        for entry in entries:
            names = entry["experts"].split(",")
            ranks = [RANK_OF.get(n, 0) for n in names if n != "public"]
            computed = 1.0 + per_rank * sum(ranks)
            tok_s = median(r["decode_tok_s"] for r in entry["engine"])
            gb = median(r["weight_bytes_per_token"] for r in entry["engine"])
            if tok_s is None:
                print(f"{len(ranks):>9}{'n/a':>24}")
                continue
            seconds = 1.0 / tok_s
            if base is None and not ranks:
                # FFN share of the weights read, the same in every encoding
                ffn_share = layers * 3.0 * h * i * 4.0 / dense_decode_bytes(config, "f32")
                base = (seconds, seconds * ffn_share, gb)
            ffn_ratio = token_ratio = None
            if base is not None:
                ffn_measured = seconds - base[0] + base[1]
                ffn_ratio = ffn_measured / (base[1] * computed)
                token_ratio = seconds / (base[0] * gb / base[2])
            rank_text = ",".join(str(r) for r in ranks) or "-"
            print(f"{len(ranks):>9}{rank_text:>24}{computed:>15.4f}{tok_s:>8.3f}{gb / 1e9:>8.3f}"
                  f"{fmt(ffn_ratio, '.3f'):>16}{fmt(token_ratio, '.3f'):>13}")


def print_demo(records):
    demos = records.get("demo", [])
    if not demos:
        print("\ndemo model: not measured (no checkpoint, or DEMO_FORMATS empty)")
        return
    c = demos[0]["config"]
    print(f"\ndemo model {demos[0]['model']}: hidden {c['hidden_size']}, "
          f"{c['num_hidden_layers']} layers, {c['num_experts']} experts (ranks "
          f"{c.get('expert_ranks')}), top-{c['num_experts_per_tok']}, vocab {c['vocab_size']}")
    print(f"{'format':7}{'thr':>4}{'decode tok/s':>14}{'MB/tok':>9}{'prompt tok/s':>14}"
          f"{'MFLOP/tok':>11}")
    for d in demos:
        runs = d["engine"]
        mbytes = median(r["weight_bytes_per_token"] for r in runs)
        mflops = median(r["prompt_flops_per_token"] for r in runs)
        print(f"{d.get('format', 'f32'):7}{d['threads']:>4}"
              f"{fmt(median(r['decode_tok_s'] for r in runs), '.1f'):>14}"
              f"{fmt(mbytes and mbytes / 1e6, '.1f'):>9}"
              f"{fmt(median(r['prompt_tok_s'] for r in runs), '.1f'):>14}"
              f"{fmt(mflops and mflops / 1e6, '.1f'):>11}")


def main(argv):
    if len(argv) != 3:
        print("usage: report.py RESULTS.jsonl MODEL_DIR", file=sys.stderr)
        return 2
    records = {}
    with open(argv[1], encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            records.setdefault(entry["kind"], []).append(entry)
    with open(os.path.join(argv[2], "dense", "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    prompt_len = records["machine"][0]["prompt"]

    h, i, _, _, layers, vocab = shapes(config)
    print(f"synthetic model: hidden {h}, intermediate {i}, {config['num_attention_heads']} heads, "
          f"{layers} layers, vocab {vocab} (FlexOlmo: 32 layers, vocab 100352)")
    print_machine(records)
    print_checks(records)
    print_speed(records, config, prompt_len)
    print_moe(records, config)
    print_demo(records)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
