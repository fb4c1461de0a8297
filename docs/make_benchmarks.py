"""Write the tables and the chart of docs/benchmarks.md from bench.py's JSON output.

    pip install matplotlib==3.10.7      # only this script needs it
    python docs/make_benchmarks.py docs/bench-e2b-layers5.json [...] --chart docs/benchmarks.png

Prints one Markdown table per JSON file (to paste into docs/benchmarks.md) and draws prefill and
decode tokens/s per configuration, eager baselines included, into the PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.3f}"


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def seconds(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def number(value, form: str) -> str:
    return "-" if value is None else format(value, form)


def ratios(record: dict, baseline: dict | None) -> str:
    if baseline is None:
        return "(no eager fp32 run)"
    return (f"{record['prefill_tok_s'] / baseline['prefill_tok_s']:.2f}x / "
            f"{record['decode_tok_s'] / baseline['decode_tok_s']:.2f}x")


def title(report: dict) -> str:
    depth = f"{report['layers']} layers" if report["layers"] else "full depth"
    return f"{report['variant'].upper()} ({report['model']} weights, {depth})"


def table(report: dict) -> str:
    baseline = next((r for r in report["records"] if r["config"] == "eager-fp32"), None)
    lines = [
        f"**{title(report)}**, prompt {report['prompt_len']} tokens, {report['new_tokens']} new tokens; "
        f"{report['machine']}; bench run took {report['seconds'] / 60:.1f} min.",
        "",
        "| config | .pte GB | load s | prefill tok/s | decode tok/s | vs eager fp32 (prefill / decode) | ttft s "
        "| run peak GiB | resident after decode: file / anon GiB | export s | export peak GiB | rel. L2 vs fp32 | top-1 vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["records"]:
        lines.append(
            f"| {r['config']} | {gb(r['pte_bytes'])} | {r['load_s']:.1f} | {r['prefill_tok_s']:.1f} "
            f"| {r['decode_tok_s']:.2f} | {ratios(r, baseline)} | {r['ttft_s']:.2f} | {gib(r['run_peak_rss_bytes'])} "
            f"| {gib(r.get('run_rss_file_bytes'))} / {gib(r.get('run_rss_anon_bytes'))} "
            f"| {seconds(r['export_s'])} | {gib(r['export_peak_rss_bytes'])} | {number(r['relative_l2_vs_fp32'], '.3g')} "
            f"| {number(r['top1_vs_fp32'], '.3f')} |")
    return "\n".join(lines)


def chart(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(reports), 2, figsize=(11, 3.2 * len(reports)), squeeze=False)
    for row, report in zip(axes, reports):
        names = [r["config"] for r in report["records"]]
        colors = ["#999999" if name.startswith("eager") else "#1f77b4" for name in names]
        for axis, key, label in zip(row, ("prefill_tok_s", "decode_tok_s"), ("prefill tok/s", "decode tok/s")):
            values = [r[key] for r in report["records"]]
            axis.barh(names, values, color=colors)
            for y, value in enumerate(values):
                axis.text(value, y, f" {value:.1f}", va="center", fontsize=8)
            axis.set_title(f"{title(report)}: {label}", fontsize=9)
            axis.invert_yaxis()
            axis.set_xlim(0, max(values) * 1.2)
    figure.suptitle(reports[0]["machine"], fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--chart", type=Path, required=True)
    args = parser.parse_args()
    reports = [json.loads(path.read_text()) for path in args.reports]
    for report in reports:
        print(table(report), end="\n\n")
    chart(reports, args.chart)


if __name__ == "__main__":
    main()
