"""torchao 0.18's scale-only HQQ, computed bit for bit the same in a fraction of its time
(tests/test_quantize_shortcuts.py).

ExecuTorch's LLM quantizer picks HQQ for every scheme the phone recipe uses (8da4w, 8da8w, 4w and
8w): up to 20 rounds of quantize, least-squares scale, compare, each over the whole matrix at once.
In an E4B phone export it took about 90% of the quantize stage (py-spy), which was itself most of the
export (E4B: 1849 of 2504 s, Intel Xeon), because each of those rounds allocates fresh
matrix-sized temporaries a dozen times. Here the rounds run over blocks of rows small enough for the
CPU's caches, every block once per round (the rounds stop when the whole matrix has converged, as
torchao's do, so the blocks cannot stop on their own), with the same operators on each block, one
torch thread (OpenMP's hand-offs cost more than such blocks take), and int8 out instead of the
int32 that torchao's only caller converts to int8.
"""

from __future__ import annotations

import contextlib

import torch

# Elements of a block of rows: its temporaries (512 KB each in fp32) stay in the caches; 2^16 to
# 2^18 measured alike, 2^20 and up slower (4096x2048 and 1024x8960 matrices, one thread).
BLOCK_ELEMENTS = 1 << 17


@torch.no_grad()
def hqq_scale_only(hp_tensor: torch.Tensor, block_size, qmin: int, qmax: int, *, iters: int = 20,
                   stochastic: bool = False, early_stop_tol: float = 1e-5):
    """torchao's ``_choose_qparams_and_quantize_scale_only_hqq``: (int8 qdata [n, k], scale
    [n, k / group] in the input's dtype)."""
    assert hp_tensor.ndim == 2 and len(block_size) == 2 and block_size[0] == 1 and qmin < qmax
    assert not stochastic, "the exporter never asks for stochastic rounding"
    eps = torch.finfo(torch.float32).eps
    n, k = hp_tensor.shape
    group = int(block_size[1])
    assert k % group == 0
    groups = k // group
    rows = max(1, BLOCK_ELEMENTS // k)
    blocks = [slice(start, start + rows) for start in range(0, n, rows)]
    weights = hp_tensor.to(torch.float32).contiguous().view(n, groups, group)
    qabs = max(abs(qmin), abs(qmax)) or 1
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scale = torch.empty(n, groups)
        for b in blocks:
            torch.div(weights[b].abs().amax(dim=2), qabs, out=scale[b])
        scale.clamp_min_(eps)
        new_scale = torch.empty_like(scale)
        quantized = torch.empty(min(rows, n), groups, group)
        for _ in range(max(1, iters)):
            change = torch.zeros(())
            for b in blocks:
                w, s = weights[b], scale[b]
                q = quantized[:len(w)]
                torch.div(w, s.unsqueeze(-1), out=q).round_().clamp_(qmin, qmax)
                num = (w * q).sum(dim=2, dtype=torch.float32)
                den = (q * q).sum(dim=2, dtype=torch.float32)
                fitted = torch.where(den > 0, num / den, s).clamp_min(eps).abs()
                change = torch.maximum(change, ((fitted - s).abs() / s.clamp_min(eps)).max())
                new_scale[b] = fitted
            scale, new_scale = new_scale, scale
            if change < early_stop_tol:
                break
        qdata = torch.empty(n, k, dtype=torch.int8)
        grouped = qdata.view(n, groups, group)
        for b in blocks:
            w = weights[b]
            grouped[b] = torch.div(w, scale[b].unsqueeze(-1), out=quantized[:len(w)]).round_().clamp_(qmin, qmax)
    finally:
        torch.set_num_threads(previous_threads)
    return qdata, scale.to(hp_tensor.dtype)


@contextlib.contextmanager
def faster_hqq():
    """torchao's intx quantization (IntxUnpackedToInt8Tensor.from_hp, its one HQQ caller) uses
    ``hqq_scale_only`` while the context lasts."""
    from torchao.quantization.quantize_.workflows.intx import intx_unpacked_to_int8_tensor as intx

    original = intx._choose_qparams_and_quantize_scale_only_hqq
    intx._choose_qparams_and_quantize_scale_only_hqq = hqq_scale_only
    try:
        yield
    finally:
        intx._choose_qparams_and_quantize_scale_only_hqq = original
