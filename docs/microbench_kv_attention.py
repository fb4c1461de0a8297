"""Decode attention over one full-attention cache of E2B's shape, in the ExecuTorch runtime: the
time of one call at each depth, for each KV cache precision (the figures docs/benchmarks.md
gives for choosing the default cache and context).

    python docs/microbench_kv_attention.py [--context 32768] [--repeats 10]

One query token with E2B's 8 query heads over 2 KV heads of 256, the cache class the kv program
uses (tasks.FloatCache / tasks.Int8Cache), exported and lowered alone on portable kernels (the
attention runs on ExecuTorch's llama:: ops in the phone recipe too).

Each cache is timed twice: as the kv program attends (tasks.attend_full: the query heads that
share a KV head folded into one call's rows, so the kernel reads each KV head once), and as one
causal call with the query heads apart, as the program did before (the kernel then reads each KV
head once per query head).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma3n_executorch import lowering, tasks  # noqa: E402
from gemma3n_executorch.options import KV_CACHE_DTYPES  # noqa: E402

QUERY_HEADS, KV_HEADS, HEAD_DIM = 8, 2, 256  # E2B and E4B
DEPTHS = (128, 4096, 16384, 32000)


class OneAttention(torch.nn.Module):
    def __init__(self, cache_class, context: int, fold: bool):
        super().__init__()
        self.cache = cache_class(context, KV_HEADS, HEAD_DIM, torch.float32)
        self.context = context
        self.fold = fold

    def forward(self, query, position):
        start = position[0].item()
        torch._check(start >= 0)
        torch._check(start < self.context)
        if self.fold:
            return tasks.attend_full(self.cache, query, start, 0, KV_HEADS)  # one token: the later call reads from 0
        return self.cache.attend(query, start, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    from executorch.runtime import Runtime

    query = torch.randn(1, 1, QUERY_HEADS, HEAD_DIM)
    with tempfile.TemporaryDirectory() as work:
        for kv_cache, fold in ((kv, fold) for kv in KV_CACHE_DTYPES for fold in (False, True)):
            module = OneAttention(tasks.CACHE_CLASSES[kv_cache], args.context, fold).eval()
            program, _ = lowering.lower(lowering.export(module, (query, torch.tensor([5])), None), "portable", {})
            path = Path(work) / f"{kv_cache}-{fold}.pte"
            lowering.write_atomically(program, path)
            method = Runtime.get().load_program(path).load_method("forward")
            for depth in (d for d in DEPTHS if d < args.context):
                method.execute([query, torch.tensor([depth])])
                began = time.perf_counter()
                for _ in range(args.repeats):
                    method.execute([query, torch.tensor([depth])])
                milliseconds = (time.perf_counter() - began) / args.repeats * 1e3
                read = depth * KV_HEADS * HEAD_DIM * 2 * (4 if kv_cache == "fp32" else 1)
                print(f"{kv_cache} cache, {'query heads folded' if fold else 'query heads apart '}, depth {depth:6d}: {milliseconds:8.3f} ms per call "
                      f"({read / milliseconds / 1e6:.2f} GB/s of cache read once)")


if __name__ == "__main__":
    main()
