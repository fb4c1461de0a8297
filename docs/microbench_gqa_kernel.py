"""Full attention over one E2B-shaped cache in the ExecuTorch runtime: the prototype kernel
gemma3n::gqa_attention (gemma3n_executorch/kernel) against the kv program's current path
(tasks.attend_full on ExecuTorch's llama::custom_sdpa / custom_quantized_sdpa).

    python docs/microbench_gqa_kernel.py [--context 32768] [--repeats 10] [--chunk 128]
                                         [--caches fp32,int8] [--paths executorch,gemma3n] [--no-chunks] [--cold]

E2B's 8 query heads over 2 KV heads of 256, the caches of tasks.FloatCache / tasks.Int8Cache
(filled with random values), each variant exported and lowered alone on portable kernels with a
dynamic token count; one decode token at each depth, then one chunk of --chunk tokens. GB/s is
the cache read once (keys and values up to the depth, int8 with its scales and zero points) per
millisecond; ExecuTorch's thread pool runs with its default thread count. CPU ms is the process's
CPU time per call, all threads: beside other jobs it moves less than the wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma3n_executorch import kernel, lowering, tasks  # noqa: E402

QUERY_HEADS, KV_HEADS, HEAD_DIM = 8, 2, 256  # E2B and E4B
DECODE_DEPTHS = (128, 4096, 16384, 32000)
CHUNK_DEPTHS = (4096, 16384, 32000)


class OneAttention(torch.nn.Module):
    def __init__(self, kv_cache: str, context: int, kernel_path: bool):
        super().__init__()
        self.cache = tasks.CACHE_CLASSES[kv_cache](context, KV_HEADS, HEAD_DIM, torch.float32)
        generator = torch.Generator().manual_seed(0)
        for name, buffer in self.cache.named_buffers():
            if buffer.dtype == torch.int8:
                buffer.copy_(torch.randint(-128, 128, buffer.shape, generator=generator, dtype=torch.int8)
                             if "cache" in name else torch.randint(-20, 20, buffer.shape, generator=generator,
                                                                   dtype=torch.int8))
            elif "scales" in name:
                buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.01 + 0.001)
            else:
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.4)
        self.kv_cache, self.context, self.kernel_path = kv_cache, context, kernel_path

    def forward(self, query, input_pos):
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + query.shape[1] <= self.context)
        if self.kernel_path:
            c = self.cache
            if self.kv_cache != "int8":
                return torch.ops.gemma3n.gqa_attention(query, c.k_cache, c.v_cache, start)
            return torch.ops.gemma3n.gqa_attention_int8(query, c.k_cache, c.v_cache, c.k_scales, c.k_zero_points,
                                                        c.v_scales, c.v_zero_points, start)
        later = (input_pos[0] * (input_pos[-1] > input_pos[0])).item()  # as KVCacheLM gives it
        torch._check(later >= 0)
        torch._check(later + query.shape[1] <= self.context)
        return tasks.attend_full(self.cache, query, start, later, KV_HEADS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--caches", default="fp32,int8", help="of fp32, fp16 (gemma3n path only), int8")
    parser.add_argument("--paths", default="executorch,gemma3n",
                        help="executorch: tasks.attend_full on ExecuTorch's kernels; gemma3n: this project's kernel")
    parser.add_argument("--no-chunks", dest="chunks", action="store_false", help="decode tokens only")
    parser.add_argument("--cold", action="store_true",
                        help="read 256 MB before each (timed) call, so the cache starts out of the CPU's caches, "
                             "as in a program whose other layers pass between two reads of it")
    args = parser.parse_args()
    flush = torch.ones(64 * 2**20) if args.cold else None
    if args.cold:
        torch.set_num_threads(1)  # torch's idle workers would spin beside ExecuTorch's threads
    from executorch.runtime import Runtime

    kernel.load_runtime_kernel()
    tokens = torch.export.Dim("tokens", min=1, max=args.chunk)
    example = (torch.randn(1, args.chunk, QUERY_HEADS, HEAD_DIM), torch.arange(args.chunk))
    with tempfile.TemporaryDirectory() as work:
        for kv_cache in args.caches.split(","):
            for kernel_path in [path == "gemma3n" for path in args.paths.split(",")]:
                module = OneAttention(kv_cache, args.context, kernel_path).eval()
                program, _ = lowering.lower(lowering.export(module, example, ({1: tokens}, {0: tokens})),
                                            "portable", {})
                del module
                path = Path(work) / f"{kv_cache}-{kernel_path}.pte"
                lowering.write_atomically(program, path)
                del program
                method = Runtime.get().load_program(path).load_method("forward")
                name = f"{kv_cache} {'gqa_attention ' if kernel_path else 'attend_full   '}"
                per_position = KV_HEADS * 2 * {"fp32": HEAD_DIM * 4, "fp16": HEAD_DIM * 2, "int8": HEAD_DIM + 5}[kv_cache]
                for n, depths in ((1, DECODE_DEPTHS), (args.chunk, CHUNK_DEPTHS if args.chunks else ())):
                    query = torch.randn(1, n, QUERY_HEADS, HEAD_DIM)
                    for depth in (d for d in depths if d + n <= args.context):
                        inputs = [query, torch.arange(depth, depth + n)]
                        method.execute(inputs)
                        seconds = cpu_seconds = 0.0
                        for _ in range(args.repeats):
                            if flush is not None:
                                flush.sum()
                            began, cpu_began = time.perf_counter(), time.process_time()
                            method.execute(inputs)
                            seconds += time.perf_counter() - began
                            cpu_seconds += time.process_time() - cpu_began
                        milliseconds = seconds / args.repeats * 1e3
                        read = (depth + n) * per_position
                        print(f"{name} {n:3d} token{'s' if n > 1 else ' '} at depth {depth:6d}: {milliseconds:9.3f} ms "
                              f"per call ({read / milliseconds / 1e6:6.2f} GB/s of cache read once), "
                              f"{cpu_seconds / args.repeats * 1e3:8.3f} CPU ms", flush=True)
                del method


if __name__ == "__main__":
    main()
