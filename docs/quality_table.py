"""What every export configuration costs the small trained model (--model tiny-trained): for each,
the program's perplexity over the first 2,000 tokens of the held-out text, its top-1 agreement with
eager fp32 at every scored position, the same quantization run eagerly by torchao (so that what
quantization costs and what the export adds are apart), file size and speed.

    python docs/quality_table.py --json docs/quality-tiny-trained.json     # exports and scores (~30 min)
    python docs/quality_table.py --report docs/quality-tiny-trained.json   # table, and docs/quality.png

Every program holds the same windows: kv programs 384 positions (windows of 383 tokens after a
<bos>, one token per call), fixed programs a 383-token window (--seq-len 383), so all rows score
the same tokens from the same context. The chart needs matplotlib (pip install matplotlib==3.10.7).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemma3n_executorch import checkpoint, quantize  # noqa: E402
from gemma3n_executorch.benchmark.machine import cpu, source_commit  # noqa: E402
from gemma3n_executorch.generation import load_tokenizer  # noqa: E402
from gemma3n_executorch.perplexity import score_eager, score_program, split_windows  # noqa: E402
from gemma3n_executorch.progress import Progress  # noqa: E402
from gemma3n_executorch.runtime import Program  # noqa: E402
from gemma3n_executorch.variants import HELD_OUT_FILE, TRAINED_DIRECTORY, TRAINED_MODEL, VARIANTS  # noqa: E402

SCORED_TOKENS = 2000
CONTEXT = 384
WINDOW = CONTEXT - 1
KV = ("--mode", "kv", "--max-context-length", str(CONTEXT), "--max-seq-length", "48")
FLOAT = ("--quantize", "none", "--quantize-embeddings", "none", "--backend", "portable")
PHONE = (*KV, "--group-size", "128")  # the phone recipe's defaults: 8da4w g128, 4-bit embeddings, XNNPACK
# name -> (export flags, the eager reference's (linear, embeddings, group size, dtype))
CONFIGS = {
    "kv fp32": ((*KV, "--dtype", "fp32", *FLOAT), ("none", "none", 128, "fp32")),
    "kv bf16": ((*KV, "--dtype", "bf16", *FLOAT), ("none", "none", 128, "bf16")),
    "kv fp16": ((*KV, "--dtype", "fp16", *FLOAT), ("none", "none", 128, "fp16")),
    "kv int8 weights": ((*KV, "--dtype", "fp32", "--quantize", "int8", "--quantize-embeddings", "none",
                         "--backend", "portable"), ("int8", "none", 128, "fp32")),
    **{f"kv 8da4w g{group or 'channel'}": ((*KV, "--quantize", "8da4w", "--group-size", str(group),
                                            "--quantize-embeddings", "none"), ("8da4w", "none", group, "fp32"))
       for group in (32, 64, 128, 256, 0)},
    "kv embeddings 8w": ((*KV, "--quantize", "none", "--quantize-embeddings", "8w"), ("none", "8w", 128, "fp32")),
    "kv embeddings 4w": ((*KV, "--quantize", "none", "--quantize-embeddings", "4w"), ("none", "4w", 128, "fp32")),
    "phone (8da4w g128, emb 8w)": ((*PHONE, "--quantize-embeddings", "8w"), ("8da4w", "8w", 128, "fp32")),
    "phone (8da4w g128, emb 4w)": (PHONE, ("8da4w", "4w", 128, "fp32")),
    "phone, kv int8": ((*PHONE, "--kv-cache", "int8"), ("8da4w", "4w", 128, "fp32")),
    "phone, kv fp16 (gemma3n kernel)": ((*PHONE, "--kv-cache", "fp16", "--attention-kernel", "gemma3n"),
                                        ("8da4w", "4w", 128, "fp32")),
    "phone, kv int8 (gemma3n kernel)": ((*PHONE, "--kv-cache", "int8", "--attention-kernel", "gemma3n"),
                                        ("8da4w", "4w", 128, "fp32")),
    "fixed bf16": (("--mode", "fixed", "--seq-len", str(WINDOW)), ("none", "none", 128, "bf16")),
    "fixed int8 weights": (("--mode", "fixed", "--seq-len", str(WINDOW), "--quantize", "int8"),
                           ("int8", "none", 128, "bf16")),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def held_out_tokens() -> list[int]:
    tokenizer = load_tokenizer(TRAINED_DIRECTORY / "tokenizer.json")
    return tokenizer.encode((TRAINED_DIRECTORY / HELD_OUT_FILE).read_text(), add_special_tokens=False).ids[:SCORED_TOKENS]


def eager_tally(reference: tuple, windows):
    linear, embeddings, group, dtype = reference
    model = checkpoint.load(TRAINED_MODEL, VARIANTS["e2b"], torch.float32).model
    quantize.apply(model, linear, embeddings, group, DTYPES[dtype])
    return score_eager(model, windows, Progress(f"eager {reference}", SCORED_TOKENS, "tokens"))


def measure(out: Path) -> None:
    windows = split_windows(held_out_tokens(), WINDOW)
    eager = {}  # reference -> Tally
    fp32 = eager_tally(("none", "none", 128, "fp32"), windows)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, (flags, reference) in CONFIGS.items():
            path = Path(work) / "program.pte"
            started = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "e2b" / "export.py"), "--model", TRAINED_MODEL, *flags,
                            "--output", str(path)], check=True, stdout=subprocess.DEVNULL)
            export_seconds = time.perf_counter() - started
            program = Program(path)
            started = time.perf_counter()
            tally = score_program(program, windows, Progress(name, SCORED_TOKENS, "tokens"))
            calls_per_second = tally.tokens / (time.perf_counter() - started)
            del program
            if reference not in eager:
                eager[reference] = eager_tally(reference, windows)
            rows.append(dict(config=name, flags=list(flags), pte_bytes=path.stat().st_size,
                             export_seconds=round(export_seconds, 1), perplexity=tally.perplexity,
                             top1_vs_fp32=tally.top1_agreement(fp32),
                             eager_perplexity=eager[reference].perplexity, eager_reference=list(reference),
                             scoring_calls_per_second=round(calls_per_second, 1)))
            print(json.dumps(rows[-1]), flush=True)
    out.write_text(json.dumps(dict(commit=source_commit(), cpu=cpu(), machine=platform.machine(),
                                   date=time.strftime("%Y-%m-%d"), scored_tokens=fp32.tokens,
                                   fp32_perplexity=fp32.perplexity, rows=rows), indent=1) + "\n")


def report(path: Path) -> None:
    data = json.loads(path.read_text())
    fp32 = data["fp32_perplexity"]
    print(f"Held-out perplexity of the small trained model over {data['scored_tokens']:,} tokens "
          f"(eager fp32: {fp32:.3f}); commit {data['commit']}, {data['cpu']}, {data['date']}:\n")
    print("| config | file MB | perplexity | vs eager fp32 | quantization alone (eager) | export adds | "
          "top-1 = fp32 | one-token calls/s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in data["rows"]:
        print(f"| {row['config']} | {row['pte_bytes'] / 1e6:.2f} | {row['perplexity']:.3f} | "
              f"{row['perplexity'] / fp32 - 1:+.2%} | {row['eager_perplexity'] / fp32 - 1:+.2%} | "
              f"{row['perplexity'] / row['eager_perplexity'] - 1:+.2%} | {row['top1_vs_fp32']:.3f} | "
              f"{row['scoring_calls_per_second']:.0f} |")
    try:
        import matplotlib
    except ImportError:
        print("\n(no chart: pip install matplotlib==3.10.7)")
        return
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 5))
    for row in data["rows"]:
        axes.scatter(row["pte_bytes"] / 1e6, row["perplexity"], color="C1" if "fixed" in row["config"] else "C0")
        axes.annotate(row["config"], (row["pte_bytes"] / 1e6, row["perplexity"]), fontsize=6,
                      xytext=(3, 2), textcoords="offset points")
    axes.axhline(fp32, color="grey", linewidth=0.8, linestyle="--", label=f"eager fp32 {fp32:.2f}")
    axes.set_xlabel("program file (MB)")
    axes.set_ylabel(f"held-out perplexity ({data['scored_tokens']:,} tokens)")
    axes.set_title(f"Small trained Gemma 3n: quality against size (commit {data['commit']})")
    axes.legend()
    figure.tight_layout()
    chart = path.parent / "quality.png"
    figure.savefig(chart, dpi=120)
    print(f"\nchart: {chart}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--json", type=Path, help="export and score every configuration, write the figures here")
    group.add_argument("--report", type=Path, help="print the table (and draw the chart) of a --json run")
    args = parser.parse_args()
    if args.json:
        measure(args.json)
        report(args.json)
    else:
        report(args.report)


if __name__ == "__main__":
    main()
