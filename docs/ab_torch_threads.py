"""Decode and prefill of one program with torch's own threads left alone, set to one, or told to
sleep as soon as their work is done, in a fresh process each (run it alternately, several times):

    python docs/ab_torch_threads.py PROGRAM.pte default
    python docs/ab_torch_threads.py PROGRAM.pte one
    python docs/ab_torch_threads.py PROGRAM.pte passive

``passive`` sets OMP_WAIT_POLICY=PASSIVE before torch is loaded: its OpenMP workers block at once
after a parallel region instead of spinning for the next one (libgomp's default spins about
300,000 rounds). The figures of docs/benchmarks.md ("Where decode time goes at depth", the CPU
thief) on a 4-layer E2B-width phone program: tools/write_random_checkpoint.py --variant e2b
--layers 4 DIR, then e2b/export.py --model DIR --mode kv. Prints torch's threads, decode tok/s for
--tokens tokens after a 128-token prompt, and that prompt's prefill tok/s (the second prefill after
loading).
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT_TOKENS = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("program", type=Path)
    parser.add_argument("threads", choices=["default", "one", "passive"])
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if args.threads == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read once, when libgomp is loaded with torch
    import torch

    from gemma3n_executorch.parity import probe_tokens
    from gemma3n_executorch.runtime import Program
    from gemma3n_executorch.variants import BOS_ID

    if args.threads == "one":
        torch.set_num_threads(1)
    program = Program(args.program)
    prompt = probe_tokens(PROMPT_TOKENS, program.info.vocab_size, BOS_ID)
    program.step(prompt)
    program.reset()
    began = time.perf_counter()
    token = int(program.step(prompt).argmax())
    prefill = PROMPT_TOKENS / (time.perf_counter() - began)
    began = time.perf_counter()
    for _ in range(args.tokens):
        token = int(program.step([token]).argmax())
    decode = args.tokens / (time.perf_counter() - began)
    print(f"{args.threads}: torch threads {torch.get_num_threads()}, decode {decode:.2f} tok/s, prefill {prefill:.1f} tok/s")


if __name__ == "__main__":
    main()
