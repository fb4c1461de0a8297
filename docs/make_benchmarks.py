"""Write the tables and the chart of docs/benchmarks.md from bench.py's JSON output.

    pip install matplotlib==3.10.7      # only this script needs it
    python docs/make_benchmarks.py docs/bench-e2b-layers5.json [...] --chart docs/benchmarks.png

Prints one Markdown table per JSON file (to paste into docs/benchmarks.md; for the tiny test model
only size and logit error), a depth-scaling table for each configuration measured at two depths
of one variant, a long-context table for each run with --depths, and draws prefill and decode
tokens/s per configuration of the real-size runs, eager baselines included (against depth and
prompt length for the long-context runs), into the PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gemma3n_executorch.variants import BUILT_IN_MODELS, TRAINED_MODEL, VARIANTS  # noqa: E402


def warm_prefill(record: dict) -> float | None:
    """bench.py's prefill tok/s, the mean of its warm prefills (as llama-bench times them); None
    for runs from before it repeated the prefill, whose prefill_tok_s is the first one after loading."""
    return record["prefill_tok_s"] if "prefill_first_tok_s" in record else None


def first_prefill(record: dict) -> float:
    return record.get("prefill_first_tok_s", record["prefill_tok_s"])


def prefill(record: dict) -> float:
    return warm_prefill(record) or first_prefill(record)


def is_warm(report: dict) -> bool:
    return all(warm_prefill(r) is not None for r in report["records"])


def in_units(value, unit: float):
    """``value / unit``, or None for a figure the record does not have (eager runs export nothing)."""
    return None if value is None else value / unit


# What a program costs, as a function of one bench record, and how to print it; all grow with depth.
SCALED_COSTS = {
    "file GB": (lambda r: in_units(r["pte_bytes"], 1e9), ".3f"),
    "prefill ms/token": (lambda r: None if warm_prefill(r) is None else 1e3 / warm_prefill(r), ".2f"),
    "decode ms/token": (lambda r: 1e3 / r["decode_tok_s"], ".1f"),
    "run peak GiB": (lambda r: in_units(r["run_peak_rss_bytes"], 2**30), ".2f"),
    "export s": (lambda r: r["export_s"], ".0f"),
    "export peak GiB": (lambda r: in_units(r["export_peak_rss_bytes"], 2**30), ".2f"),
}


# Bars of the baselines, beside the exported programs' blue.
PEER_COLORS = {"eager": "#999999", "llamacpp": "#ff7f0e"}


def gb(value) -> str:
    return number(in_units(value, 1e9), ".3f")


def gib(value) -> str:
    return number(in_units(value, 2**30), ".2f")


def seconds(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def number(value, form: str) -> str:
    return "-" if value is None else format(value, form)


def ratios(record: dict, baseline: dict | None) -> str:
    if baseline is None:
        return "(no eager fp32 run)"
    return (f"{prefill(record) / prefill(baseline):.2f}x / "
            f"{record['decode_tok_s'] / baseline['decode_tok_s']:.2f}x")


def title(report: dict) -> str:
    if report["model"] in BUILT_IN_MODELS:
        what = "the small trained model" if report["model"] == TRAINED_MODEL else "the tiny test model, random weights"
        return f"{report['variant'].upper()} ({what})"
    depth = f"{report['layers']} layers" if report["layers"] else "full depth"
    return f"{report['variant'].upper()} ({report['model']} weights, {depth})"


def quality_table(report: dict) -> str:
    """Size and logit error only: the tiny model's speeds say nothing about a phone."""
    lines = [
        f"**{title(report)}**, prompt {report['prompt_len']} tokens, {report['new_tokens']} new tokens, "
        f"error at every generated position against eager fp32 on the same tokens; {report['machine']}.",
        "",
        "| config | .pte MB | rel. L2 vs fp32 | top-1 vs fp32 |",
        "|---|---|---|---|",
    ]
    for r in report["records"]:
        size = "-" if r["pte_bytes"] is None else f"{r['pte_bytes'] / 1e6:.2f}"
        lines.append(f"| {r['config']} | {size} | {number(r.get('relative_l2_vs_fp32'), '.3g')} "
                     f"| {number(r['top1_vs_fp32'], '.3f')} |")
    return "\n".join(lines)


def table(report: dict) -> str:
    baseline = next((r for r in report["records"] if r["config"] == "eager-fp32"), None)
    lines = [
        f"**{title(report)}**, prompt {report['prompt_len']} tokens, {report['new_tokens']} new tokens; "
        f"{report['machine']}; bench run took {report['seconds'] / 60:.1f} min. Prefill tok/s: "
        + (f"the mean of {len(report['records'][0]['prefill_warm_samples_tok_s'])} warm prefills after the first one after loading." if is_warm(report)
           else "only the first prefill after loading was timed (a run from before bench.py repeated it)."),
        "",
        "| config | file GB | load s | prefill tok/s | first prefill tok/s | decode tok/s | vs eager fp32 (prefill / decode) "
        "| ttft s | run peak GiB | resident after decode: file / anon GiB | export s | export peak GiB | rel. L2 vs fp32 "
        "| top-1 vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["records"]:
        lines.append(
            f"| {r['config']} | {gb(r['pte_bytes'])} | {number(r['load_s'], '.1f')} | {number(warm_prefill(r), '.1f')} "
            f"| {first_prefill(r):.1f} "
            f"| {r['decode_tok_s']:.2f} | {ratios(r, baseline)} | {r['ttft_s']:.2f} | {gib(r['run_peak_rss_bytes'])} "
            f"| {gib(r.get('run_rss_file_bytes'))} / {gib(r.get('run_rss_anon_bytes'))} "
            f"| {seconds(r['export_s'])} | {gib(r['export_peak_rss_bytes'])} | {number(r.get('relative_l2_vs_fp32'), '.3g')} "
            f"| {number(r.get('top1_vs_fp32'), '.3f')} |")  # a run cut short has no error columns
    return "\n".join(lines)


# Bytes of one cached value and of its per-(position, head) quantization parameters (int8: an fp32
# scale and an int8 zero point), by --kv-cache; tasks.py's cache classes store them so.
CACHE_VALUE_BYTES = {"fp32": (4, 0), "fp16": (2, 0), "int8": (1, 5)}
TABLE_BITS = {"4w": 4, "8w": 8, "none": 32}  # the token and per-layer embedding tables, by --quantize-embeddings


def bytes_read_per_token(report: dict, record: dict, depth: int) -> float:
    """What one decode step of one of our programs reads at ``depth``: the whole file but the two
    embedding tables (a step gathers one row of each; the lm_head's own copy is read whole), and
    the caches: every full-attention layer (KV-shared ones read their owner's again) ``depth``
    positions, every sliding layer its ring."""
    config = VARIANTS[report["variant"]].real_text_config(report["layers"])
    options = record["options"]
    layers = config["num_hidden_layers"]
    tables = (config["vocab_size"] * config["hidden_size"]
              + config["vocab_size_per_layer_input"] * layers * config["hidden_size_per_layer_input"])
    value, per_head = CACHE_VALUE_BYTES[options["kv_cache"]]
    per_position = 2 * config["num_key_value_heads"] * (config["head_dim"] * value + per_head)  # keys and values
    full = config["layer_types"].count("full_attention")
    ring = config["sliding_window"] + options["seq_len"]
    cache = per_position * (full * depth + (layers - full) * min(ring, depth))
    return record["pte_bytes"] - tables * TABLE_BITS[options["embeddings"]] / 8 + cache


def long_context_table(report: dict) -> str:
    """Prefill of a long prompt and decode at each depth, each against the same program's short
    figure, and our programs' decode as a fraction of the bandwidth floor (bytes read per token
    over the run's measured read bandwidth)."""
    depths = [d for d in report["depths"]]
    bandwidth = report["read_bandwidth_bytes_s"]
    lines = [
        f"**{title(report)}**, {report['machine']}, memory read bandwidth {bandwidth / 1e9:.1f} GB/s (bench.py's probe, "
        f"same run); commit {report['commit']}; bench run took {report['seconds'] / 60:.1f} min.",
        "",
        f"| config | prefill tok/s, {report['prompt_len']}-token prompt | {report['long_prompt']}-token prompt (ratio) | "
        + " | ".join(f"decode tok/s, depth {d}" for d in depths)
        + f" | depth {depths[-1]} / depth {depths[0]} | decode / bandwidth floor, depth {depths[0]} / {depths[-1]} |",
        "|---|---|---|" + "---|" * len(depths) + "---|---|",
    ]
    for r in report["records"]:
        decode = {int(k): v for k, v in r["decode_at_depth_tok_s"].items()}
        long = r.get("prefill_long_tok_s")
        ours = "options" in r
        floor = " / ".join(f"{decode[d] * bytes_read_per_token(report, r, d) / bandwidth:.2f}"
                           for d in (depths[0], depths[-1])) if ours else "-"
        lines.append(
            f"| {r['config']} | {prefill(r):.1f} | {number(long, '.1f')} ({number(long and long / prefill(r), '.2f')}x) | "
            + " | ".join(number(decode[d], ".2f") for d in depths)
            + f" | {decode[depths[-1]] / decode[depths[0]]:.2f}x | {floor} |")
    return "\n".join(lines)


def depth(report: dict) -> int:
    return report["layers"] or VARIANTS[report["variant"]].real_text_config()["num_hidden_layers"]


def depth_scaling(reports: list[dict]) -> str:
    """Fits cost(N) = fixed + per_layer * N through the two depths at which a configuration was measured.

    Every layer brings the same weights and work, and the rest (token embedding, lm_head,
    runtime) does not depend on N, so two depths determine any other; a user whose machine cannot
    hold the full model measures a cut one and reads the full-depth figure off this line.
    """
    lines = []
    for variant in sorted({report["variant"] for report in reports}):
        runs = sorted((r for r in reports if r["variant"] == variant and r["model"] == "random"), key=depth)
        if len(runs) < 2:
            continue
        shallow, deep = runs[0], runs[-1]
        n1, n2 = depth(shallow), depth(deep)
        lines += [
            f"**{variant.upper()}: cost(N layers) = fixed + per layer x N**, through the {n1}-layer and "
            f"{n2}-layer runs above.",
            "",
            f"| config | cost | {n1} layers | {n2} layers | per layer | fixed (N = 0) |",
            "|---|---|---|---|---|---|",
        ]
        deep_records = {r["config"]: r for r in deep["records"]}
        for record in shallow["records"]:
            if record["config"] not in deep_records:
                continue
            for name, (cost, form) in SCALED_COSTS.items():
                a, b = cost(record), cost(deep_records[record["config"]])
                if a is None or b is None:
                    continue
                per_layer = (b - a) / (n2 - n1)
                fixed = a - per_layer * n1
                lines.append(f"| {record['config']} | {name} | {a:{form}} | {b:{form}} | {per_layer:{form}} "
                             f"| {fixed:{form}} |")
        lines.append("")
    return "\n".join(lines)


def chart(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(reports), 2, figsize=(11, 3.2 * len(reports)), squeeze=False)
    for row, report in zip(axes, reports):
        if report.get("depths"):
            depth_chart(row, report)
            continue
        names = [r["config"] for r in report["records"]]
        colors = [PEER_COLORS.get(name.split("-")[0], "#1f77b4") for name in names]
        prefill_label = "prefill tok/s" if is_warm(report) else "first prefill tok/s"
        for axis, rate, label in zip(row, (prefill, lambda r: r["decode_tok_s"]), (prefill_label, "decode tok/s")):
            values = [rate(r) for r in report["records"]]
            axis.barh(names, values, color=colors)
            for y, value in enumerate(values):
                axis.text(value, y, f" {value:.1f}", va="center", fontsize=8)
            axis.set_title(f"{title(report)}: {label}", fontsize=9)
            axis.invert_yaxis()
            axis.set_xlim(0, max(values) * 1.2)
    figure.suptitle(reports[0]["machine"], fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def depth_chart(row, report: dict) -> None:
    """Decode tok/s against the tokens already in the cache, and prefill tok/s of a short and a
    long prompt, one line per configuration."""
    for r in report["records"]:
        color = PEER_COLORS.get(r["config"].split("-")[0], "#1f77b4")
        decode = sorted((int(k), v) for k, v in r["decode_at_depth_tok_s"].items() if v is not None)
        row[0].plot([d for d, _ in decode], [v for _, v in decode], marker="o", color=color, label=r["config"])
        row[1].plot([report["prompt_len"], report["long_prompt"]], [prefill(r), r["prefill_long_tok_s"]],
                    marker="o", color=color, label=r["config"])
    for axis, label, x_label in ((row[0], "decode tok/s", "tokens in the cache"),
                                 (row[1], "prefill tok/s", "prompt tokens")):
        axis.set_xscale("log", base=2)
        axis.set_ylim(bottom=0)
        axis.set_xlabel(x_label, fontsize=8)
        axis.set_title(f"{title(report)}: {label}", fontsize=9)
        axis.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--chart", type=Path, required=True)
    args = parser.parse_args()
    reports = [json.loads(path.read_text()) for path in args.reports]
    for report in reports:
        print(quality_table(report) if report["model"] in BUILT_IN_MODELS else table(report), end="\n\n")
        if report.get("depths"):
            print(long_context_table(report), end="\n\n")
    print(depth_scaling(reports))
    real_size = [report for report in reports if report["model"] not in BUILT_IN_MODELS]
    if real_size:
        chart(real_size, args.chart)


if __name__ == "__main__":
    main()
