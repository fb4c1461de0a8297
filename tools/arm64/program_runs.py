"""The runs the ARM64 check makes of each program, identical on both sides of the comparison.

The same functions run on x86 (the reference runs of the programs) and inside the emulated ARM64
guest, where this file is also the entry point:

    python program_runs.py JOBS.json RESULTS.pt

JOBS.json is a list of jobs (see ``run_job``); RESULTS.pt gets one result per job, in order, and
the guest's view of its CPU (HWCAP features, /proc/cpuinfo as it read it, torch's CPU capability),
because the check must say what the ARM kernels were run on. Only the ExecuTorch runtime, torch
and tokenizers are needed here: no transformers model, no export code.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GREEDY, RUNNER, FIXED_LOGITS = "greedy", "runner", "fixed_logits"


def greedy(program_path: str, prompt: list[int], steps: int) -> dict:
    """Raw greedy decoding, stop ids included (as parity.eager_greedy): the tokens and the logits
    each was chosen from, [steps, vocab]."""
    import torch

    from gemma3n_executorch.runtime import Program

    program = Program(program_path)
    logits = program.step(prompt)
    tokens, rows = [], []
    for _ in range(steps):
        rows.append(logits)
        tokens.append(int(logits.argmax()))
        if len(tokens) < steps:
            logits = program.step(tokens[-1:])
    return {"tokens": tokens, "logits": torch.stack(rows)}


def teacher_forced(program_path: str, prompt: list[int], tokens: list[int]):
    """The logits a program gives for each of ``tokens`` after ``prompt`` and the tokens before
    it, [len(tokens), vocab]: greedy's rows, along tokens it did not choose."""
    import torch

    from gemma3n_executorch.runtime import Program

    program = Program(program_path)
    rows = [program.step(prompt)]
    rows += [program.step([token]) for token in tokens[:-1]]
    return torch.stack(rows)


def runner_text(program_path: str, tokenizer_path: str, prompt: str, max_new_tokens: int) -> dict:
    """ExecuTorch's stock TextLLMRunner, greedy, as the demo apps drive it: the bytes it prints
    (its Python token_callback fails on Gemma's byte tokens), escaped where they are not UTF-8.
    Beside it, what judges a runner whose text leaves x86's: our own greedy loop on the same
    prompt on the same CPU, its text as the runner prints it and the logits its tokens came from."""
    from gemma3n_executorch import stock_runner
    from gemma3n_executorch.generation import Generator, load_tokenizer
    from gemma3n_executorch.runtime import Program
    from gemma3n_executorch.variants import BOS_ID

    printed = stock_runner.printed(program_path, tokenizer_path, prompt, max_new_tokens)
    tokenizer = load_tokenizer(Path(tokenizer_path))
    ids = [BOS_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids  # the runner adds BOS
    ours = Generator(Program(program_path), tokenizer).generate(ids, max_new_tokens=max_new_tokens)
    return {"text": printed.decode("utf-8", "backslashreplace"), "prompt_ids": ids,
            "own_text": stock_runner.printed_for(tokenizer, ours.tokens).decode("utf-8", "backslashreplace"),
            "own_tokens": ours.tokens, "own_logits": teacher_forced(program_path, ids, ours.tokens)}


def fixed_logits(program_path: str, windows: list[list[int]]) -> dict:
    import torch

    from gemma3n_executorch.runtime import Program

    program = Program(program_path)
    return {"logits": torch.cat([program.forward_fixed(torch.tensor([w], dtype=torch.long))[0] for w in windows])}


def run_job(job: dict) -> dict:
    started = time.perf_counter()
    if job["kind"] == GREEDY:
        result = greedy(job["program"], job["prompt"], job["steps"])
    elif job["kind"] == RUNNER:
        result = runner_text(job["program"], job["tokenizer"], job["prompt"], job["max_new_tokens"])
    elif job["kind"] == FIXED_LOGITS:
        result = fixed_logits(job["program"], job["windows"])
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}")
    return dict(result, seconds=time.perf_counter() - started)


def guest_cpu() -> dict:
    import torch

    import emulated_cpu

    hwcap, hwcap2 = emulated_cpu.guest_hwcaps()
    return {"features": emulated_cpu.feature_names(hwcap, hwcap2), "hwcap": hwcap, "hwcap2": hwcap2,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "proc_cpuinfo": Path("/proc/cpuinfo").read_text()}


def main(jobs_path: str, results_path: str) -> int:
    started = time.perf_counter()
    import torch  # the first import is most of an emulated run's time: say when it is over

    print(f"  [guest] torch and executorch imported in {time.perf_counter() - started:.0f} s", flush=True)
    jobs = json.loads(Path(jobs_path).read_text())
    results = []
    for number, job in enumerate(jobs, 1):
        results.append(run_job(job))
        print(f"  [guest] job {number}/{len(jobs)} {job['name']} done in {results[-1]['seconds']:.1f} s", flush=True)
    cpu = guest_cpu()
    cpu["maps"] = Path("/proc/self/maps").read_text()  # where the libraries were, for the instruction log
    torch.save({"results": results, "cpu": cpu, "seconds": time.perf_counter() - started}, results_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
