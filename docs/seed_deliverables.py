"""The original project's four programs at real size: export, check, and set beside its published sizes.

    python docs/seed_deliverables.py --json docs/seed-deliverables.json [--only e2b-bf16,e2b-int8,...]
    python docs/seed_deliverables.py --json docs/seed-deliverables.json --table   (print it again)

Each program is the fixed 32-token window (`e2b/export.py`, `e2b/export.py --quantize int8`, and
the same for E4B) of a random-weight model of the published architecture (what an export costs
does not depend on the weights), exported in a process of its own (its peak memory is its own),
then checked by validate.py's own checks without an eager model (shape, dtype, finite logits:
the eager model at this size is what the tests compare on the tiny one). The JSON is rewritten
after each program, so a run cut short keeps what it finished; a program that cannot be exported
here is recorded with the reason; programs not in --only keep the records an earlier run left in
--json (one long run a session). Prints the markdown table docs/benchmarks.md carries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> (variant, --quantize, the original project's published file size in GB)
PROGRAMS = {
    "e2b-bf16": ("e2b", "none", 8.4),
    "e2b-int8": ("e2b", "int8", 7.0),
    "e4b-int8": ("e4b", "int8", 9.6),
    "e4b-bf16": ("e4b", "none", 13.1),
}


def child(variant_name: str, quantize: str, output: str, layers: str) -> None:
    """Export one program; print its summary as JSON on the last line."""
    from gemma3n_executorch import exporter, stored_weights
    from gemma3n_executorch.options import DEFAULT_GROUP_SIZE, FIXED, resolve
    from gemma3n_executorch.variants import VARIANTS

    variant = VARIANTS[variant_name]
    options = resolve(FIXED, dtype=None, quantize=quantize, embeddings=None, backend=None,
                      group_size=DEFAULT_GROUP_SIZE, model=f"random {variant_name}", seq_len=None)
    # From files, as a user's checkpoint: the export reads each weight as it quantizes or casts it.
    with stored_weights.random_model_from_files(Path(output).with_suffix(".checkpoint"), variant,
                                                variant.real_text_config(int(layers) or None), None,
                                                f"random {variant_name}") as loaded:
        summary = exporter.export_program(variant, options, Path(output), loaded=loaded)
    print(json.dumps({"pte_bytes": summary["bytes"], "export_s": summary["total_seconds"],
                      "export_peak_rss_bytes": summary["peak_rss_bytes"], "export_stages_s": summary["seconds"]}))


def run(name: str, work: Path, layers: int | None) -> dict:
    variant, quantize, published_gb = PROGRAMS[name]
    output = work / f"{name}.pte"
    record = {"program": name, "variant": variant, "quantize": quantize, "published_gb": published_gb}
    exported = subprocess.run([sys.executable, __file__, "--child", variant, quantize, str(output), str(layers or 0)],
                              stdout=subprocess.PIPE, text=True)
    if exported.returncode:
        return dict(record, error=f"export exited with {exported.returncode} (see its log above)")
    record.update(json.loads(exported.stdout.strip().splitlines()[-1]))
    began = time.perf_counter()
    checked = subprocess.run([sys.executable, str(ROOT / "validate.py"), str(output)], stdout=subprocess.PIPE, text=True)
    record.update(validate_s=time.perf_counter() - began, validate_exit=checked.returncode,
                  checks=[line for line in checked.stdout.splitlines() if line.startswith(("PASS", "FAIL"))])
    output.unlink()
    return record


def table(report: dict) -> str:
    lines = ["| program | the original's file | file: GB (GiB) | export (s) | export peak (GiB) | validate.py | machine, commit |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(report["records"], key=lambda r: list(PROGRAMS).index(r["program"])):
        if "error" in r:
            lines.append(f"| `{r['program']}` | {r['published_gb']} | not exported: {r['error']} | | | | {r['run']} |")
            continue
        verdict = ("all checks passed" if r["validate_exit"] == 0 else "; ".join(c for c in r["checks"] if c.startswith("FAIL"))) \
            + f" ({r['validate_s']:.0f} s)"
        lines.append(f"| `{r['program']}` | {r['published_gb']} | {r['pte_bytes'] / 1e9:.2f} ({r['pte_bytes'] / 2**30:.2f}) "
                     f"| {r['export_s']:.0f} | {r['export_peak_rss_bytes'] / 2**30:.1f} | {verdict} | {r['run']} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--only", default=",".join(PROGRAMS), help="comma-separated, of " + ", ".join(PROGRAMS))
    parser.add_argument("--layers", type=int, default=None, help="cut the architecture to N layers (smoke runs)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the programs are written (default: temp)")
    parser.add_argument("--table", action="store_true", help="print the table of --json and stop")
    args = parser.parse_args()
    report = json.loads(args.json.read_text()) if args.json.exists() else {"records": []}
    if args.table:
        print(table(report))
        return
    from gemma3n_executorch.benchmark.machine import machine, source_commit

    this_run = f"{machine()}, {source_commit()}"
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        for name in args.only.split(","):
            record = dict(run(name, Path(work), args.layers), layers=args.layers, run=this_run)
            report["records"] = [r for r in report["records"] if r["program"] != name] + [record]
            args.json.write_text(json.dumps(report, indent=1) + "\n")
            print(table(report), flush=True)


if __name__ == "__main__":
    main()
