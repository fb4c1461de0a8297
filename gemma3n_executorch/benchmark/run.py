"""A whole run: the command line, the checks that refuse it before anything is measured, then each
configuration exported and measured in child processes, and the report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from .. import benchmark
from ..options import DEFAULT_MAX_CONTEXT_LENGTH, DEFAULT_MAX_SEQ_LENGTH, KV, MODE_DEFAULTS
from ..progress import UserError, log
from ..variants import BUILT_IN_MODELS, TINY_MODEL, TRAINED_MODEL, VARIANTS
from .children import CHILDREN, spawn
from .configs import DEFAULT_CONFIGS, EAGER, LITERT_LM_CONFIGS, LLAMA_CPP, PHONE, parameter_count, parse_config
from .machine import machine, memory_environment, physical_memory_bytes, read_bandwidth_bytes_s, source_commit
from .peers import check_litert_lm, check_llama_cpp


def depth_list(text: str) -> list[int]:
    depths = [int(d) for d in text.split(",") if d.strip()]
    if any(d < 1 for d in depths):
        raise argparse.ArgumentTypeError("depths must be positive")
    return depths


def probe_prompt_tokens(args, context_len: int) -> int:
    """--probe-prompt, or what the context leaves after --new-tokens; refused if they do not fit."""
    tokens = args.probe_prompt or context_len - args.new_tokens
    if tokens + args.new_tokens > context_len:
        raise UserError(f"--probe-prompt {tokens} and --new-tokens {args.new_tokens} need {tokens + args.new_tokens} "
                        f"positions; the program holds {context_len}: lower them or raise --max-context-length")
    return tokens


def fp32_reference_fits(args) -> bool:
    """Whether the eager fp32 model (baseline and error reference) fits in this machine's memory:
    full-depth E4B (27.5 GB) does not on a 24 GB machine."""
    return args.model in BUILT_IN_MODELS or 4 * parameter_count(args) < 0.9 * physical_memory_bytes()


def memory_probes(args, program: Path, context_len: int, work: Path) -> dict:
    from .. import memory_probe

    tokens = probe_prompt_tokens(args, context_len)
    figures = {}
    for probe in memory_probe.PROBES:
        log(f"   memory probe {probe}: {tokens}-token prompt, {args.new_tokens} new tokens, mlock unavailable")
        figures[probe] = memory_probe.measure(probe, program, tokens, args.new_tokens, args.probe_step, work)
        last = figures[probe]["phases"][-1]
        log(f"   {probe}: peak {figures[probe]['peak_rss_bytes'] / 2**30:.2f} GiB above the interpreter; after decode "
            f"anon {last['anon'] / 2**30:.2f}, file {last['file'] / 2**30:.2f} GiB; tables resident "
            + ", ".join(f"{name} {value / 1e6:.1f} MB" for name, value in last["tables_resident"].items()))
    return figures


def exported(args, name: str, output: Path) -> dict:
    """Export ``name`` to ``output``, or with --keep-programs reuse the program an earlier run left
    there from the same commit and arguments (its export record is kept beside it): exports can
    then run while the machine is busy, and the timing later, on a quiet machine."""
    record_path = output.with_suffix(".export.json")
    key = {"commit": source_commit(), "variant": args.variant, "model": args.model, "layers": args.layers,
           "max_seq_length": args.max_seq_length, "max_context_length": args.max_context_length}
    if args.keep_programs and output.exists() and record_path.exists():
        kept = json.loads(record_path.read_text())
        if kept.pop("key") == key and not key["commit"].endswith("+changes"):
            log(f"   reusing {output} (exported earlier from the same commit and arguments)")
            return kept
    record = spawn("export", args, config=name, output=output)
    if args.keep_programs:
        record_path.write_text(json.dumps(dict(record, key=key)))
    return record


def summary_line(record: dict) -> str:
    size = f"{record['pte_bytes'] / 1e9:.3f} GB, " if record.get("pte_bytes") else ""
    return (f"{size}prefill {record['prefill_tok_s']:.1f} tok/s, decode {record['decode_tok_s']:.2f} tok/s, "
            f"ttft {record['ttft_s']:.2f} s, run peak {record['run_peak_rss_bytes'] / 2**30:.2f} GiB")


def program_options(args, name: str):
    """A program config's export options; a slice is refused beside the logit error, whose
    reference is the whole model."""
    options = parse_config(name, args.model, args.max_seq_length, args.max_context_length)
    if options.matformer_slice is not None and args.logit_error:
        raise UserError(f"--configs {name}: a slice computes another function than eager {args.variant}, "
                        "which the logit error compares with: add --no-logit-error")
    return options


def run_all(args, finished) -> list[dict]:
    """Every config's record; ``finished(records)`` after each one."""
    records, logits = [], {}
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gemma3n-bench-", dir=args.work_dir) as work:
        for name in args.configs:
            log(f"== {name}")
            saved = str(Path(work) / f"{name}.logits.pt")
            if args.export_only and (name in EAGER or name == LLAMA_CPP or name in LITERT_LM_CONFIGS):
                log("   not one of our programs: converted, if at all, in the timing run")
                continue
            if name in EAGER:
                record = spawn("run-eager", args, config=name, logits=saved)
                record.update(pte_bytes=None, export_s=None, export_peak_rss_bytes=None)
                logits[name] = saved
            elif name == LLAMA_CPP:  # llama-bench reads no logits out: no error columns
                output = Path(work) / f"{name}.gguf"
                record = spawn("export-llamacpp", args, output=output, llama_cpp=args.llama_cpp)
                record.update(spawn("run-llamacpp", args, output=output, llama_cpp=args.llama_cpp))
                output.unlink()
            elif name in LITERT_LM_CONFIGS:
                output = Path(work) / f"{name}.litertlm"
                record = spawn("export-litertlm", args, config=name, output=output, litert_lm=args.litert_lm)
                record.update(spawn("run-litertlm", args, output=output, litert_lm=args.litert_lm, logits=saved))
                logits[name] = saved
                for written in output.parent.glob(output.name + "*"):  # and the XNNPACK cache LiteRT-LM left
                    written.unlink()
            else:
                options = program_options(args, name)
                output = Path(args.work_dir if args.keep_programs else work) / f"{name}.pte"
                record = exported(args, name, output)
                if not args.export_only:
                    record.update(spawn("run-program", args, config=name, output=output, logits=saved))
                    logits[name] = saved
                    if args.memory_probe:
                        record["memory"] = memory_probes(args, output, options.context_len, Path(work) / name)
                record["options"] = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v  # a slice
                                     for k, v in vars(options).items() if k not in ("model", "mode")}
                if not args.keep_programs:
                    output.unlink()
            records.append(dict(config=name, **record))
            finished(records)
            if not args.export_only:
                log(f"   {summary_line(records[-1])}")
        if args.fp32_fits and logits and args.logit_error:
            log("== logit error against eager fp32")
            errors = spawn("quality", args, logits=json.dumps(logits))
        else:
            errors = {}
    for record in records:
        record.update(errors.get(record["config"], {"relative_l2_vs_fp32": None, "top1_vs_fp32": None}))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=benchmark.__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--layers", type=int, help="cut the real architecture to N layers (default: full depth)")
    parser.add_argument("--model", default="random", choices=["random", *BUILT_IN_MODELS],
                        help=f"random: the real architecture with random weights; {TINY_MODEL}: the test model (smoke "
                             f"runs); {TRAINED_MODEL}: the small trained model (E2B)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated (default {','.join(DEFAULT_CONFIGS)}); '{PHONE}' is "
                             f"{'-'.join(v for k, v in MODE_DEFAULTS[KV].items() if k != 'embeddings')}-emb{MODE_DEFAULTS[KV]['embeddings']}")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3,
                        help="after the first prefill (ttft), time it this many times more, warm; prefill tok/s is "
                             "their mean, as llama-bench -r times it (default 3)")
    parser.add_argument("--max-seq-length", type=int, default=DEFAULT_MAX_SEQ_LENGTH,
                        help=f"programs: tokens per call, unless a config says chunkN (default {DEFAULT_MAX_SEQ_LENGTH})")
    parser.add_argument("--max-context-length", type=int, default=DEFAULT_MAX_CONTEXT_LENGTH,
                        help=f"programs: cache positions, unless a config says ctxN (default {DEFAULT_MAX_CONTEXT_LENGTH})")
    parser.add_argument("--long-prompt", type=int, help="also time one prefill of this many tokens (e.g. 4096)")
    parser.add_argument("--depths", type=depth_list, default=[],
                        help="also time decode after this many tokens in the cache, e.g. 128,4096,16384,32000")
    parser.add_argument("--no-logit-error", dest="logit_error", action="store_false",
                        help="skip the error columns: their reference is eager fp32 in memory (18 GB for full-depth "
                             "E2B), and at full depth random weights make them meaningless anyway")
    parser.add_argument("--memory-probe", action="store_true",
                        help="also measure each program's resident memory through ExecuTorch's stock runner and this "
                             "project's runtime with mlock unavailable, as on a phone")
    parser.add_argument("--probe-prompt", type=int,
                        help="--memory-probe: prompt tokens (default: the context less --new-tokens)")
    parser.add_argument("--probe-step", type=int, default=1000,
                        help="--memory-probe: prompt tokens between snapshots (default 1000)")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--work-dir", help="where the programs are written while measured, created if missing "
                                           "(default: the temp dir)")
    parser.add_argument("--keep-programs", action="store_true",
                        help="keep the programs in --work-dir, and reuse the ones an earlier run of the same commit "
                             "and arguments left there (export while the machine is busy, time them when it is quiet)")
    parser.add_argument("--export-only", action="store_true", help="export the programs, time nothing")
    parser.add_argument("--llama-cpp", type=Path, help=f"a llama.cpp source tree with its tools built, for {LLAMA_CPP}")
    parser.add_argument("--litert-lm", type=Path,
                        help=f"a virtual environment with litert-torch, litert-lm and tensorflow-cpu, for "
                             f"{', '.join(LITERT_LM_CONFIGS)}")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prompt_len < 2 or args.new_tokens < 2:
        parser.error("--prompt-len and --new-tokens must be at least 2")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if (args.probe_prompt is not None and args.probe_prompt < 2) or args.probe_step < 1:
        parser.error("--probe-prompt must be at least 2 and --probe-step at least 1")
    if args.child:
        Path(args.result).write_text(json.dumps(CHILDREN[args.child](args)))
        return 0
    if args.keep_programs and not args.work_dir:
        parser.error("--keep-programs needs --work-dir")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    try:
        for name in args.configs:
            if name == LLAMA_CPP:
                check_llama_cpp(args)
            elif name in LITERT_LM_CONFIGS:
                check_litert_lm(args)
            elif name not in EAGER:
                options = program_options(args, name)
                if args.memory_probe:
                    probe_prompt_tokens(args, options.context_len)
        if args.memory_probe:
            from ..memory_probe import without_mlock

            without_mlock([])  # refuses at once where CAP_IPC_LOCK cannot be dropped
        if args.json:
            from ..preflight import check_output

            check_output(args.json, ".json", "--json")
        if args.model == TRAINED_MODEL and VARIANTS[args.variant].trained_layers is None:
            raise UserError(f"--model {TRAINED_MODEL} is an E2B-shaped model: pass --variant e2b")
        if args.model not in BUILT_IN_MODELS:
            VARIANTS[args.variant].real_text_config(args.layers)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.fp32_fits = fp32_reference_fits(args)
    if not args.fp32_fits:
        log(f"eager fp32 {args.variant} does not fit in this machine's memory: no eager-fp32 baseline, "
            "no logit error columns")
        args.configs = [name for name in args.configs if name != "eager-fp32"]
    began = time.perf_counter()
    bandwidth = read_bandwidth_bytes_s()
    log(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    commit = source_commit()  # of the code the run starts with: the children import it as they start

    def report(records: list[dict], complete: bool) -> dict:
        return {"variant": args.variant, "model": args.model, "layers": args.layers, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "long_prompt": args.long_prompt, "depths": args.depths,
                "memory_probe": args.memory_probe and memory_environment(args),
                "read_bandwidth_bytes_s": bandwidth, "machine": machine(), "commit": commit,
                "seconds": time.perf_counter() - began, "complete": complete, "records": records}

    def write(records: list[dict], complete: bool = False) -> None:
        """Also after each config: a long run cut short (a session's end) keeps what it measured."""
        if args.json:
            args.json.write_text(json.dumps(report(records, complete), indent=1))

    records = run_all(args, write)
    if args.json:
        write(records, complete=True)
        log(f"wrote {args.json}")
    else:
        print(json.dumps(report(records, True), indent=1))
    return 0
