"""The logit error of each KV cache precision on the tiny models, against the fp32 cache and
against Hugging Face eager (the figures docs/benchmarks.md and parity.py cite).

    python docs/experiment_kv_cache_error.py

The KV-cache module (tasks.KVCacheLM) runs eagerly here, on ExecuTorch's own kernels for the
cache ops and, for each precision, each attention kernel the exporter allows with it (this
project's as its reference implementation, which computes what the kernel does: the int8 cache
dequantized, the query rounded to int8 per head and token), teacher-forced over 96 tokens (a prefill of 8, then one token per call: the window of
16 slides, the ring of 28 slots wraps); unquantized weights, and the phone recipe's 8da4w with
4-bit embeddings in groups of 32 (the tiny model is 64 wide).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import patches  # noqa: E402
from gemma3n_executorch import checkpoint, parity, quantize, tasks  # noqa: E402
from gemma3n_executorch.options import ATTENTION_KERNELS, DEFAULT_GROUP_SIZE, KV, KV_CACHE_DTYPES, resolve  # noqa: E402
from gemma3n_executorch.variants import BOS_ID, VARIANTS  # noqa: E402

SEQUENCE = parity.probe_tokens(96, 512, BOS_ID)
PREFILL, CHUNK, CONTEXT = 8, 12, 160


def model(variant: str, weights: str):
    built = checkpoint.build_tiny(VARIANTS[variant])
    if weights == "8da4w":
        quantize.apply(built, "8da4w", "4w", 32, torch.float32)
    return built


def allowed(kv_cache: str, kernel: str) -> bool:
    try:
        resolve(KV, None, None, None, None, DEFAULT_GROUP_SIZE, "tiny", CHUNK, CONTEXT, kv_cache, kernel)
    except ValueError:
        return False
    return True


CACHES = [(kv_cache, kernel) for kv_cache in KV_CACHE_DTYPES for kernel in ATTENTION_KERNELS if allowed(kv_cache, kernel)]


def cached_logits(variant: str, weights: str, kv_cache: str, kernel: str) -> torch.Tensor:
    built = model(variant, weights)
    patches.apply(built)
    module = tasks.KVCacheLM(built, CHUNK, CONTEXT, kv_cache, kernel).eval()
    with torch.no_grad():
        rows = [module(torch.tensor([SEQUENCE[:PREFILL]]), torch.arange(PREFILL))[0]]
        rows += [module(torch.tensor([[token]]), torch.tensor([position]))[0]
                 for position, token in enumerate(SEQUENCE[PREFILL:], start=PREFILL)]
    return torch.stack(rows)


def main() -> None:
    for variant in ("e2b", "e4b"):
        for weights in ("none", "8da4w"):
            with torch.no_grad():
                eager = model(variant, weights)(input_ids=torch.tensor([SEQUENCE]), use_cache=False).logits[0, PREFILL - 1:]
            logits = {cache: cached_logits(variant, weights, *cache) for cache in CACHES}
            for (kv_cache, kernel), rows in logits.items():
                cells = [variant.upper(), weights, kv_cache, kernel, parity.compare(rows, eager),
                         parity.compare(rows, logits["fp32", ATTENTION_KERNELS[0]])]
                print("| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |")  # a Markdown row


if __name__ == "__main__":
    main()
