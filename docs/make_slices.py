"""Write the "choosing a size" table and picture of docs/benchmarks.md from a bench.py run over
slices of E4B (MatFormer):

    python bench.py --variant e4b --configs phone-sliceE2B,phone-sliceE2.49B_block,phone --memory-probe \
        --no-logit-error --json docs/bench-e4b-slices-1.json
    python docs/make_slices.py docs/bench-e4b-slices-1.json --chart docs/slices.png

One row per program: Google's figures for the slice (effective parameters, MMLU of the pretrained
model: the table in gemma3n_executorch/architectures/e4b-slicing-configs.csv) beside what this run
measured of its phone program (file size, speed, what ExecuTorch's stock runner keeps resident with
mlock refused, as on a phone, and the export's own cost). Decode is timed twice: after the
128-token prompt, and by the memory probe in this project's runtime after its much longer prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gemma3n_executorch import slicing  # noqa: E402

GIB = 2**30
STOCK_PROBE = "stock-advised"  # the runner as the README tells an app to use it


def slice_key(record: dict) -> str:
    chosen = record["options"].get("matformer_slice")
    return chosen["name"] if chosen else "E4B"


def rows(report: dict) -> list[dict]:
    published = slicing.published_slices()
    found = []
    for record in report["records"]:
        key = slice_key(record)
        probe = record.get("memory", {}).get(STOCK_PROBE)
        found.append({
            "key": key, "config": record["config"], "published": published[key],
            "file_gb": record["pte_bytes"] / 1e9, "prefill": record["prefill_tok_s"], "decode": record["decode_tok_s"],
            "peak_gib": probe["peak_rss_bytes"] / GIB if probe else None,
            "decode_gib": probe["decode_peaks"]["rss"] / GIB if probe else None,
            "deep_decode": record["memory"]["runtime"]["decode_tok_s"] if probe else None,
            "export_peak_gib": record["export_peak_rss_bytes"] / GIB, "export_min": record["export_s"] / 60,
        })
    return sorted(found, key=lambda row: row["published"].effective_params_b)


def cell(value, form: str) -> str:
    return "-" if value is None else format(value, form)


def table(report: dict) -> str:
    lines = [
        f"Full-depth random-weight E4B cut to each slice, phone recipe, {report['prompt_len']}-token prompt, "
        f"{report['new_tokens']} new tokens; resident memory through ExecuTorch's stock runner with mlock refused and "
        f"random access advised, above the interpreter; {report['machine']}; commit {report['commit']}; "
        f"bench run took {report['seconds'] / 60:.0f} min.",
        "",
        "| `--slice` | layers | effective params (B, Google) | MMLU PT (Google) | file GB | prefill tok/s | decode tok/s "
        "| decode tok/s after the probe's prompt | resident peak GiB | resident while decoding GiB | export peak GiB "
        "| export min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows(report):
        published = row["published"]
        lines.append(
            f"| `{row['key']}` | {published.layers} | {published.effective_params_b:.2f} | {published.mmlu_pt:.1f}% "
            f"| {row['file_gb']:.3f} | {row['prefill']:.1f} | {row['decode']:.2f} | {cell(row['deep_decode'], '.2f')} "
            f"| {cell(row['peak_gib'], '.2f')} "
            f"| {cell(row['decode_gib'], '.2f')} | {row['export_peak_gib']:.2f} | {row['export_min']:.0f} |")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = rows(report)
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    panels = ((axes[0], "deep_decode", "decode tok/s after the memory probe's prompt (higher is faster)"),
              (axes[1], "peak_gib", "stock runner's resident peak, GiB"))
    for axis, key, label in panels:
        points = [(row[key], row["published"].mmlu_pt, row["key"]) for row in found if row[key] is not None]
        axis.plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o")
        for x, y, name in points:
            axis.annotate(f" {name}", (x, y), fontsize=8)
        axis.set_xlabel(label, fontsize=8)
        axis.set_ylabel("MMLU, pretrained (Google), %", fontsize=8)
    figure.suptitle(f"E4B slices, phone programs: quality (Google's figure) against speed and memory\n"
                    f"{report['machine']}, commit {report['commit']}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--chart", type=Path, required=True)
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    print(table(report))
    chart(report, args.chart)


if __name__ == "__main__":
    main()
