"""Write the memory tables and the picture of docs/benchmarks.md from bench.py --memory-probe JSON.

    python docs/make_memory.py docs/bench-e2b-layers2-memory.json [...] --chart docs/memory.png

For every program measured: what each probe (gemma3n_executorch/memory_probe.PROBES) kept
resident above the interpreter, the gathered tables' resident bytes as the prompt goes on, then
the large resident blocks of the stock runner after decoding, one by one, and a bar of them per
probe. Needs matplotlib for the picture (pip install matplotlib==3.10.7, as make_benchmarks.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from make_benchmarks import title  # noqa: E402

MB, GIB = 1e6, 2**30
# Issue 29's targets for a full-depth 4096-position phone program, above the interpreter, through the
# stock runner with mlock refused: the peak while loading and running, the highest resident memory
# while decoding, and the per-layer table's resident bytes after the whole context, advised.
TARGETS = {"e2b": {"peak_gib": 1.5, "decode_gib": 1.4, "per_layer_mb": 16.0},
           "e4b": {"peak_gib": 2.4, "per_layer_mb": 16.0}}


def prompted(probe: dict) -> dict:
    """The snapshot after the whole prompt."""
    return [phase for phase in probe["phases"] if phase["phase"] == "prefill"][-1]


def phase(probe: dict, name: str) -> dict:
    return next(p for p in probe["phases"] if p["phase"] == name)


def probe_table(record: dict) -> str:
    probes = record["memory"]
    first = next(iter(probes.values()))
    lines = [
        f"`{record['config']}`, {first['layout']['file_bytes'] / 1e9:.3f} GB file, prompt of {first['prompt_tokens']} "
        f"random token ids, then {first['generated_tokens']} greedy tokens; MB above the interpreter, whose own "
        "resident memory is given apart; the gathered tables' resident MB after the prompt, and per 1000 tokens:",
        "",
        "| probe | interpreter | after load: anon / file | after prompt: anon / file / PSS | during decode, highest: "
        "anon / file / PSS | peak RSS | token embedding after prompt (per 1000 tokens) | per-layer table (per 1000) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, probe in probes.items():
        loaded, prompt, peaks = phase(probe, "loaded"), prompted(probe), probe["decode_peaks"]
        tables = [prompt["tables_resident"][table] for table in ("token_embedding", "per_layer_embedding")]
        lines.append(
            f"| {name} | {probe['interpreter']['rss'] / MB:.0f} | {loaded['anon'] / MB:.0f} / {loaded['file'] / MB:.0f} "
            f"| {prompt['anon'] / MB:.0f} / {prompt['file'] / MB:.0f} / {prompt['pss'] / MB:.0f} "
            f"| {peaks['anon'] / MB:.0f} / {peaks['file'] / MB:.0f} / {peaks['pss'] / MB:.0f} "
            f"| {probe['peak_rss_bytes'] / MB:.0f} | "
            + " | ".join(f"{value / MB:.1f} ({value / MB * 1000 / prompt['tokens_seen']:.2f})" for value in tables) + " |")
    return "\n".join(lines)


def growth_table(record: dict) -> str:
    """The tables' resident MB as the prompt goes on, then after decoding."""
    probes = record["memory"]
    steps = [p["tokens_seen"] for p in next(iter(probes.values()))["phases"] if p["phase"] in ("prefill", "decoded")]
    lines = [
        f"`{record['config']}`: token embedding / per-layer table resident, MB, after so many tokens "
        f"({', '.join(str(s) for s in steps[:-1])} of prompt, then {steps[-1]} with the generated ones):",
        "",
        "| probe | " + " | ".join(str(s) for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for name, probe in probes.items():
        cells = [f"{p['tables_resident']['token_embedding'] / MB:.1f} / {p['tables_resident']['per_layer_embedding'] / MB:.1f}"
                 for p in probe["phases"] if p["phase"] in ("prefill", "decoded")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def blocks(record: dict, probe_name: str) -> list[tuple[str, float, str]]:
    """The resident blocks of one probe after decoding: (block, bytes, how it is known). The packed
    weights are measured in the project's runtime, where nothing else is allocated while forward
    loads; the stock runner reuses the heap its tokenizer freed, so its phases cannot separate them."""
    probe, runtime = record["memory"][probe_name], record["memory"]["runtime"]
    decoded = phase(probe, "decoded")
    loaded_runtime = phase(runtime, "loaded")
    planned = record["planned_bytes"]
    packed = loaded_runtime["anon"] - planned
    lm_head = max(m["bytes"] for m in loaded_runtime["new_anonymous_mappings"])
    tables = sum(decoded["tables_resident"].values())
    program_file = decoded["program_file_resident"]
    return [
        ("XNNPACK's packed weights: the tied lm_head (the token embedding again, in XNNPACK's layout)", lm_head,
         "the largest allocation made while the runtime loads forward"),
        ("XNNPACK's packed weights: every other delegated matrix", packed - lm_head,
         "the runtime's allocated memory after loading forward, less the above and the planned memory"),
        (f"planned memory: KV cache ({record['kv_cache_bytes'] / MB:.1f} MB) and activations", planned,
         "the program's memory plan (one allocation of that size)"),
        ("other allocations: tokenizer, metadata, XNNPACK's workspace, the runner's buffers",
         decoded["anon"] - packed - planned, "allocated memory after decoding, less the above"),
        ("gathered tables (token embedding, per-layer table), mapped from the file", tables,
         "resident pages of their byte ranges (/proc/self/pagemap)"),
        ("rest of the program file: flatbuffer, other constants", program_file - tables,
         "resident pages of the file's mappings, less the tables"),
        ("XNNPACK's source weights and delegate blobs, once packed", decoded["packing_sources_resident"],
         "resident pages of their byte ranges: unmapped after loading"),
        ("libraries' code and data touched since the interpreter's snapshot", decoded["file"] - program_file,
         "file-backed memory outside the program file"),
    ]


def breakdown_table(record: dict) -> str:
    probes = [name for name in record["memory"] if name != "runtime"]  # its packed weights are measured there
    lines = [
        f"`{record['config']}`: resident blocks after decoding, MB above the interpreter (peak RSS less this total, "
        "the part of the load peak that was gone by then, chiefly the weights XNNPACK packs from while it packs them: "
        + ", ".join(f"{name} {max(0, record['memory'][name]['peak_rss_bytes'] - phase(record['memory'][name], 'decoded')['rss']) / MB:.0f}"
                    for name in probes) + "):",
        "",
        "| block | " + " | ".join(probes) + " | how it is known |",
        "|---|" + "---|" * len(probes) + "---|",
    ]
    columns = [blocks(record, name) for name in probes]
    for row, (block, _, how) in enumerate(columns[0]):
        lines.append(f"| {block} | " + " | ".join(f"{column[row][1] / MB:.1f}" for column in columns) + f" | {how} |")
    lines.append("| **total above the interpreter** | "
                 + " | ".join(f"**{phase(record['memory'][name], 'decoded')['rss'] / MB:.1f}**" for name in probes)
                 + " | VmRSS |")
    return "\n".join(lines)


def targets_table(report: dict, record: dict) -> str:
    """Each target of the variant against the stock runner, as loaded and with the advice."""
    targets = TARGETS.get(report["variant"], {}) if report.get("layers") is None else {}
    if not targets:
        return ""
    lines = ["| target | " + " | ".join(name for name in record["memory"] if name != "runtime") + " |",
             "|---|" + "---|" * (len(record["memory"]) - 1)]
    measured = {
        "peak_gib": ("peak resident, GiB", lambda probe: probe["peak_rss_bytes"] / GIB),
        "decode_gib": ("highest resident while decoding, GiB", lambda probe: probe["decode_peaks"]["rss"] / GIB),
        "per_layer_mb": ("per-layer table resident after the context, MB",
                         lambda probe: phase(probe, "decoded")["tables_resident"]["per_layer_embedding"] / MB),
    }
    for key, limit in targets.items():
        label, value = measured[key]
        cells = [f"{value(probe):.2f} ({'met' if value(probe) <= limit else 'missed'})"
                 for name, probe in record["memory"].items() if name != "runtime"]
        lines.append(f"| {label} <= {limit} | " + " | ".join(cells) + " |")
    return f"`{record['config']}` against the issue's targets:\n\n" + "\n".join(lines)


def chart(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [(report, r) for report in reports for r in report["records"] if "memory" in r]
    figure, axes = plt.subplots(len(records), 1, figsize=(11, 1.0 + 1.2 * len(records[0][1]["memory"]) * len(records)),
                                squeeze=False)
    for axis, (report, record) in zip(axes[:, 0], records):
        probes = [name for name in record["memory"] if name != "runtime"]
        for y, name in enumerate(probes):
            left = 0.0
            for index, (block, value, _) in enumerate(blocks(record, name)):
                axis.barh(y, value / MB, left=left, color=plt.cm.tab10(index), label=block if y == 0 else None)
                left += value / MB
            peak = record["memory"][name]["peak_rss_bytes"] / MB
            axis.plot([peak, peak], [y - 0.4, y + 0.4], color="black")
            axis.text(peak, y, f" peak {peak:.0f}", va="center", fontsize=8)
        axis.set_yticks(range(len(probes)), probes)
        axis.invert_yaxis()
        axis.set_xlabel("MB resident above the interpreter, after decoding")
        axis.set_title(f"{title(report)}, {record['config']}", fontsize=9)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2)
    figure.suptitle(reports[0]["machine"], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--chart", type=Path, required=True)
    args = parser.parse_args()
    reports = [json.loads(path.read_text()) for path in args.reports]
    for report in reports:
        environment = report["memory_probe"]
        print(f"**{title(report)}**; {report['machine']}; kernel {environment['kernel']}, "
              f"{environment['file_system']}, read-ahead {environment['read_ahead_kb']} KiB.\n")
        for record in report["records"]:
            if "memory" in record:
                for table in (probe_table(record), growth_table(record), breakdown_table(record),
                              targets_table(report, record)):
                    if table:
                        print(table, end="\n\n")
    chart(reports, args.chart)


if __name__ == "__main__":
    main()
