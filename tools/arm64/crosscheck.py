"""The ARM64 check: the tiny E2B and E4B programs run on emulated ARM64 CPUs against x86.

    python tools/arm64/crosscheck.py --env DIR [--cpus 'max;cortex-a76;...'] [--work DIR]
                                     [--no-instructions] [--json OUT.json]

(tools/arm64/check.sh builds DIR, the ARM64 environment, and then runs this.) x86 is the
reference side: it exports the programs with the project's CLI, runs Hugging Face eager and the
same programs on x86, then runs the programs inside the emulated guest (program_runs.py under
qemu-aarch64, once per CPU) and judges the guest's results with the tolerances of
gemma3n_executorch/parity.py:

  kv fp32      the unquantized KV program's greedy tokens equal Hugging Face generate()'s
  phone        the phone program's greedy tokens equal the x86 program's; where they differ, its
               logits along its own tokens are within the phone tolerance of torchao's eager
               quantization run on the same tokens
  runner       TextLLMRunner's text (phone and fp32 KV programs) equals the x86 runner's
  fixed fp32   the fixed program's logits are within the fp32 tolerance of Hugging Face eager

Exit status: 0 every check passed on every CPU, 1 a check failed, 2 unusable input or
environment.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TOOLS))

import emulated_cpu  # noqa: E402
import program_runs  # noqa: E402
from gemma3n_executorch.progress import StageTimer, UserError, log  # noqa: E402
from gemma3n_executorch.variants import BOS_ID  # noqa: E402

VARIANTS = ("e2b", "e4b")
LENGTHS = ("--max-context-length", "160", "--max-seq-length", "12")  # prompts past one call, as in the tests
# Programs as the tests export them (tests/test_kv_generation.py): the unquantized fp32 KV program
# on portable kernels, the phone recipe (the --mode kv defaults; 32-weight groups, because the tiny
# model is 64 wide), and a fixed fp32 window.
PROGRAM_FLAGS = {
    "kv-fp32": ("--mode", "kv", *LENGTHS, "--dtype", "fp32", "--quantize", "none",
                "--quantize-embeddings", "none", "--backend", "portable", "--kv-cache", "fp32"),
    "phone": ("--mode", "kv", *LENGTHS, "--group-size", "32", "--verbose"),
    "fixed-fp32": ("--dtype", "fp32"),
}
PHONE_GROUP_SIZE = 32
PROMPT = [BOS_ID, 10, 200, 33, 47, 300, 12, 9, 100, 101]
NEW_TOKENS = 64  # with the prompt, past 2 x the tiny sliding window of 16: the window really slides
RUNNER_PROMPT = "<start_of_turn>user\nWhat is a phone?<end_of_turn>\n<start_of_turn>model\n"
RUNNER_TOKENS = 40

# Emulated CPUs, from everything qemu has to what older and mid-range phones have, so that
# XNNPACK's int8 kernel families are each picked somewhere: SME (KleidiAI), i8mm, dot product,
# plain NEON.
CPUS = {
    "max": "Armv9-A and later: SVE2, SME, i8mm, dot product, bf16, fp16 (qemu's everything)",
    "max,sme=off": "Armv9-A phone cores without SME (Cortex-X2..X4, A710..A720): SVE2, i8mm, dot product, bf16",
    "max,sve=off,sme=off": "i8mm and dot product without SVE (Armv8.6-A without SVE)",
    "cortex-a76": "mid-range phones (Cortex-A76..A78 class): dot product and fp16, no i8mm, no SVE",
    # PyPI's aarch64 wheels die on it (SIGILL on an LSE atomic, Armv8.1-A): kept to show that.
    "cortex-a53": "low-end phones and little cores (Armv8.0-A): NEON only, no dot product",
}
# Not cortex-a53: PyPI's aarch64 wheels die on it (an Armv8.1 atomic), so a default run would
# always fail; --cpus cortex-a53 still shows that.
DEFAULT_CPUS = ("max", "max,sme=off", "cortex-a76")


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


# --- what is run --------------------------------------------------------------------------------

def jobs_for(programs: dict[str, Path], variants: tuple[str, ...] = VARIANTS) -> list[dict]:
    """The runs of every program, both sides alike; names are "<variant>-<program>-<what>"."""
    from gemma3n_executorch.exporter import tokenizer_path_for
    from gemma3n_executorch import parity
    from gemma3n_executorch.variants import VARIANTS as VARIANT_TABLE

    jobs = []
    for variant in variants:
        vocab = VARIANT_TABLE[variant].tiny_config["vocab_size"]
        for kind in ("kv-fp32", "phone"):
            path = str(programs[f"{variant}-{kind}"])
            jobs.append({"name": f"{variant}-{kind}-greedy", "kind": program_runs.GREEDY, "program": path,
                         "prompt": PROMPT, "steps": NEW_TOKENS})
            jobs.append({"name": f"{variant}-{kind}-runner", "kind": program_runs.RUNNER, "program": path,
                         "tokenizer": str(tokenizer_path_for(Path(path))), "prompt": RUNNER_PROMPT,
                         "max_new_tokens": RUNNER_TOKENS})
        windows = [parity.probe_tokens(32, vocab, BOS_ID, seed) for seed in range(parity.PROBE_WINDOWS)]
        jobs.append({"name": f"{variant}-fixed-fp32-logits", "kind": program_runs.FIXED_LOGITS,
                     "program": str(programs[f"{variant}-fixed-fp32"]), "windows": windows})
    return jobs


# --- how the guest's results are judged ---------------------------------------------------------

def check_fp32_greedy(name: str, arm: dict, hugging_face_tokens: list[int]) -> Check:
    where = next((i for i, (a, b) in enumerate(zip(arm["tokens"], hugging_face_tokens)) if a != b), None)
    same = where is None and len(arm["tokens"]) == len(hugging_face_tokens)
    detail = (f"{len(arm['tokens'])} greedy tokens identical to Hugging Face generate()" if same else
              f"differs from Hugging Face generate() at new token {where}")
    return Check(name, same, detail)


def check_phone_greedy(name: str, arm: dict, x86: dict, eager_quantized_logits) -> Check:
    """``eager_quantized_logits(tokens)``: torchao's eager quantization, teacher-forced on PROMPT
    followed by ``tokens``, one row of logits per token predicted."""
    from gemma3n_executorch import parity

    agreement = parity.compare(arm["logits"], eager_quantized_logits(arm["tokens"]))
    tolerance = parity.tolerance_for("fp32", "8da4w", "4w")
    if arm["tokens"] == x86["tokens"]:
        return Check(name, True, f"{len(arm['tokens'])} greedy tokens identical to the x86 program's "
                                 f"(against eager torchao quantization: {agreement})")
    where = next((i for i, (a, b) in enumerate(zip(arm["tokens"], x86["tokens"])) if a != b), len(x86["tokens"]))
    return Check(name, agreement.within(tolerance),
                 f"tokens differ from x86 from new token {where}; along its own tokens against eager torchao "
                 f"quantization: {agreement} (tolerance: top-1 >= {tolerance.min_top1}, "
                 f"relative L2 <= {tolerance.max_relative_l2})")


def check_runner(name: str, arm: dict, x86: dict, x86_program_logits=None) -> Check:
    """The runner's text must equal x86's. For a phone program (``x86_program_logits(prompt,
    tokens)`` given: the x86 program teacher-forced) another text is accepted where ARM's int8
    rounding broke a near-tie the other way: the runner printed what our own greedy loop does on
    the same CPU, and that loop's logits along its own tokens are the x86 program's along them,
    within the phone tolerance. (Not torchao's eager quantization, as in the greedy check: on the
    runner's 40 tokens the x86 program itself has a top-1 agreement of 0.875 with it on E2B,
    below that tolerance's 0.90.) An fp32 program has no such ties to break: its text must be x86's."""
    from gemma3n_executorch import parity

    if arm["text"] == x86["text"] and len(x86["text"]) > 20:  # an empty reply would match vacuously
        return Check(name, True, f"TextLLMRunner text ({len(arm['text'])} characters) identical to x86")
    differs = f"TextLLMRunner text differs from x86: {arm['text'][:60]!r} vs {x86['text'][:60]!r}"
    if x86_program_logits is None:
        return Check(name, False, differs)
    own = arm["text"] == arm["own_text"] and len(arm["text"]) > 20
    agreement = parity.compare(arm["own_logits"], x86_program_logits(arm["prompt_ids"], arm["own_tokens"]))
    tolerance = parity.tolerance_for("fp32", "8da4w", "4w")
    return Check(name, own and agreement.within(tolerance),
                 f"{differs}; {'equal to' if own else 'not'} our greedy loop's on this CPU, whose logits against "
                 f"the x86 program's along its own tokens: {agreement} (tolerance: top-1 >= "
                 f"{tolerance.min_top1}, relative L2 <= {tolerance.max_relative_l2})")


def check_fixed(name: str, arm: dict, hugging_face_logits) -> Check:
    from gemma3n_executorch import parity

    agreement = parity.compare(arm["logits"], hugging_face_logits)
    tolerance = parity.tolerance_for("fp32", "none")
    return Check(name, agreement.within(tolerance),
                 f"against Hugging Face eager fp32: {agreement} (tolerance: top-1 >= {tolerance.min_top1}, "
                 f"max |diff| <= {tolerance.max_abs})")


class References:
    """Everything x86 says: Hugging Face eager, torchao's eager quantization, the programs' own
    runs on x86. Eager models are built once, exactly as ``--model tiny`` builds them."""

    def __init__(self, jobs: list[dict], x86: dict | None = None):
        """x86: the jobs' results if they have been run already (the tests share one run)."""
        self.jobs = {job["name"]: job for job in jobs}
        self.x86 = x86 if x86 is not None else {job["name"]: program_runs.run_job(job) for job in jobs}
        self._models: dict = {}

    def model(self, variant: str, quantized: bool):
        import torch

        from gemma3n_executorch import checkpoint, quantize
        from gemma3n_executorch.variants import VARIANTS as VARIANT_TABLE

        if (variant, quantized) not in self._models:
            model = checkpoint.build_tiny(VARIANT_TABLE[variant])
            if quantized:
                quantize.apply(model, "8da4w", "4w", PHONE_GROUP_SIZE, torch.float32)
            self._models[(variant, quantized)] = model
        return self._models[(variant, quantized)]

    def hugging_face_greedy(self, variant: str) -> list[int]:
        from gemma3n_executorch import parity

        return parity.eager_greedy(self.model(variant, quantized=False), PROMPT, NEW_TOKENS)

    def eager_quantized_logits(self, variant: str):
        import torch

        def logits(tokens: list[int]) -> torch.Tensor:
            with torch.no_grad():
                ids = torch.tensor([PROMPT + tokens[:-1]])
                return self.model(variant, quantized=True)(input_ids=ids, use_cache=False).logits[0, len(PROMPT) - 1:]
        return logits

    def x86_program_logits(self, name: str):
        """The x86 run of job ``name``'s program, teacher-forced: logits(prompt, tokens)."""
        return lambda prompt, tokens: program_runs.teacher_forced(self.jobs[name]["program"], prompt, tokens)

    def hugging_face_fixed_logits(self, variant: str):
        import torch

        windows = self.jobs[f"{variant}-fixed-fp32-logits"]["windows"]
        with torch.no_grad():
            return torch.cat([self.model(variant, quantized=False)(input_ids=torch.tensor([w])).logits[0]
                              for w in windows])


def judge(arm: dict[str, dict], references: References, variants: tuple[str, ...] = VARIANTS) -> list[Check]:
    """Every check for one CPU, from the guest's results keyed by job name."""
    checks = []
    for variant in variants:
        name = f"{variant}-kv-fp32-greedy"
        checks.append(check_fp32_greedy(name, arm[name], references.hugging_face_greedy(variant)))
        name = f"{variant}-phone-greedy"
        checks.append(check_phone_greedy(name, arm[name], references.x86[name],
                                         references.eager_quantized_logits(variant)))
        name = f"{variant}-phone-runner"
        checks.append(check_runner(name, arm[name], references.x86[name], references.x86_program_logits(name)))
        name = f"{variant}-kv-fp32-runner"
        checks.append(check_runner(name, arm[name], references.x86[name]))
        name = f"{variant}-fixed-fp32-logits"
        checks.append(check_fixed(name, arm[name], references.hugging_face_fixed_logits(variant)))
    return checks


# --- running the guest --------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm64Environment:
    """The directory tools/arm64/check.sh builds: a Debian arm64 root filesystem, the aarch64
    wheels installed for it, and the stand-in CUDA libraries (cuda_stubs.py)."""
    root: Path

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def python(self) -> Path:
        return self.rootfs / "usr/bin/python3.11"

    def check(self) -> None:
        for path in (self.python, self.root / "site/torch", self.root / "site/executorch", self.root / "cuda-stubs"):
            if not path.exists():
                raise UserError(f"--env {self.root}: no {path.relative_to(self.root)}; build it with tools/arm64/check.sh")

    def command(self, cpu: str, *args: str, instruction_log: Path | None = None) -> list[str]:
        # -L: the guest's ld.so, libc and python come from the root filesystem; any path not in it
        # (the repository, the programs) is the host's, so nothing is copied in.
        log_options = ["-d", "in_asm", "-D", str(instruction_log)] if instruction_log else []
        return ["qemu-aarch64-static", "-cpu", cpu, *log_options, "-L", str(self.rootfs), str(self.python), *args]

    def environment(self) -> dict:
        return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": str(self.root / "site"),
                "LD_LIBRARY_PATH": str(self.root / "cuda-stubs"), "PYTHONWARNINGS": "ignore",
                "OMP_NUM_THREADS": "1"}

    def write_proc_cpuinfo(self, cpu: str) -> None:
        """The guest reads /proc/cpuinfo from the root filesystem (-L), so it gets this one."""
        result = subprocess.run(self.command(cpu, str(TOOLS / "emulated_cpu.py")), env=self.environment(),
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"qemu-aarch64-static -cpu {cpu} does not run the guest: {result.stderr.strip()[-300:]}")
        hwcap, hwcap2 = map(int, result.stdout.split())
        (self.rootfs / "proc").mkdir(exist_ok=True)
        (self.rootfs / "proc/cpuinfo").write_text(emulated_cpu.proc_cpuinfo(cpu, hwcap, hwcap2, os.cpu_count() or 1))

    def run(self, cpu: str, jobs: list[dict], work: Path, instructions: bool) -> dict:
        import torch

        tag = cpu.replace(",", "_").replace("=", "-")
        jobs_path, results_path = work / f"jobs-{tag}.json", work / f"arm64-{tag}.pt"
        jobs_path.write_text(json.dumps(jobs))
        self.write_proc_cpuinfo(cpu)
        log_fifo = work / f"instructions-{tag}.fifo" if instructions else None
        if log_fifo is not None:
            import instruction_log as instruction_classes

            log_fifo.unlink(missing_ok=True)
            os.mkfifo(log_fifo)  # gigabytes of disassembly: filtered as written, never stored
            reader, found = instruction_classes.collect(log_fifo)
        command = self.command(cpu, str(TOOLS / "program_runs.py"), str(jobs_path), str(results_path),
                               instruction_log=log_fifo)
        result = subprocess.run(command, env=self.environment(), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        if log_fifo is not None:
            try:  # a guest that never opened the log would leave the reader waiting for a writer
                os.close(os.open(log_fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            reader.join()
            log_fifo.unlink()
        if result.returncode != 0:
            return {"error": f"the guest exited {result.returncode}: {result.stderr.strip()[-2000:]}"}
        outcome = torch.load(results_path, weights_only=False)
        if log_fifo is not None:
            outcome["instructions"] = instruction_classes.summarize(found, outcome["cpu"]["maps"])
        return outcome


# --- the run ------------------------------------------------------------------------------------

def export_programs(work: Path, python: str, timer: StageTimer) -> dict[str, Path]:
    programs = {}
    for variant in VARIANTS:
        for kind, flags in PROGRAM_FLAGS.items():
            output = work / f"{variant}-{kind}.pte"
            programs[f"{variant}-{kind}"] = output
            with timer.stage(f"export {variant} {kind}"):
                result = subprocess.run([python, str(REPO / variant / "export.py"), "--model", "tiny", "--output",
                                         str(output), *flags], capture_output=True, text=True)
                if result.returncode != 0:
                    raise UserError(f"{variant}/export.py {' '.join(flags)} failed: {result.stderr.strip()[-500:]}",
                                    exit_code=1)
    return programs


def report(cpu: str, outcome: dict, checks: list[Check]) -> None:
    guest = outcome["cpu"]
    features = [f for f in emulated_cpu.KERNEL_FEATURES if f in guest["features"]]
    print(f"\n== -cpu {cpu}: {CPUS.get(cpu, '')}")
    print(f"   guest features that select kernels: {', '.join(features) or 'none (NEON only)'}; "
          f"torch CPU capability {guest['torch_cpu_capability']}; guest run {outcome['seconds']:.0f} s")
    if "instructions" in outcome:
        print(f"   instructions translated from ExecuTorch's library: {outcome['instructions']}")
    for check in checks:
        print(f"   {'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", type=Path, required=True, help="the ARM64 environment tools/arm64/check.sh built")
    parser.add_argument("--cpus", default=";".join(DEFAULT_CPUS),
                        help=f"qemu -cpu values separated by ';' (default {';'.join(DEFAULT_CPUS)}); "
                             f"known: {'; '.join(CPUS)}")
    parser.add_argument("--work", type=Path,
                        help="the programs and the guest's results go here (default: ENV/work)")
    parser.add_argument("--no-instructions", dest="instructions", action="store_false",
                        help="skip counting the kernel families ExecuTorch's library ran (from qemu's log of "
                             "every instruction it translates; that log costs time)")
    parser.add_argument("--json", type=Path, help="write the checks and timings here")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each CPU's report as it comes, also into a log file
    cpus = [cpu.strip() for cpu in args.cpus.split(";") if cpu.strip()]
    try:
        unknown = [cpu for cpu in cpus if emulated_cpu.model_of(cpu) not in emulated_cpu.MIDR]
        if unknown or not cpus:
            raise UserError(f"--cpus {args.cpus}: unknown qemu CPU model {unknown[0] if unknown else '(none)'}; "
                            f"known: {', '.join(emulated_cpu.MIDR)}")
        environment = Arm64Environment(args.env.resolve())
        environment.check()
        work = (args.work or environment.root / "work").resolve()
        work.mkdir(parents=True, exist_ok=True)
        lock = open(environment.root / ".lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)  # the guest's /proc/cpuinfo is one file: one check at a time
        return run_check(environment, cpus, work, args.instructions, args.json)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


def run_check(environment: Arm64Environment, cpus: list[str], work: Path, instructions: bool,
              json_path: Path | None) -> int:
    timer = StageTimer()
    programs = export_programs(work, sys.executable, timer)
    jobs = jobs_for(programs)
    with timer.stage("x86 references (Hugging Face eager, torchao eager, the programs on x86)"):
        references = References(jobs)
    summary = {"cpus": {}, "seconds": {}}
    failed = 0
    for cpu in cpus:
        with timer.stage(f"arm64 -cpu {cpu} (emulated)"):
            outcome = environment.run(cpu, jobs, work, instructions)
        if "error" in outcome:
            print(f"\n== -cpu {cpu}\n   FAIL  {outcome['error']}")
            failed += 1
            summary["cpus"][cpu] = {"error": outcome["error"]}
            continue
        arm = {job["name"]: result for job, result in zip(jobs, outcome["results"])}
        checks = judge(arm, references)
        report(cpu, outcome, checks)
        failed += sum(not check.passed for check in checks)
        summary["cpus"][cpu] = {
            "features": outcome["cpu"]["features"], "torch_cpu_capability": outcome["cpu"]["torch_cpu_capability"],
            "guest_seconds": outcome["seconds"], "job_seconds": {j["name"]: r["seconds"] for j, r in
                                                                 zip(jobs, outcome["results"])},
            "instructions": outcome.get("instructions"),
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]}
    summary["seconds"] = dict(timer.seconds, total=timer.total)
    if json_path:
        json_path.write_text(json.dumps(summary, indent=1))
    log(f"\n{'all ARM64 checks passed' if not failed else f'{failed} ARM64 check(s) failed'} on "
        f"{len(cpus)} emulated CPU(s) in {timer.total:.0f} s")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
