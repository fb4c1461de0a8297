"""quantize_shortcuts.hqq_scale_only gives torchao's scale-only HQQ bit for bit: the matrices and
schemes the exporter quantizes (groups of 32, one scale per row, 4 and 8 bits, bf16 and fp32), over
several blocks of rows, with rounds that stop early and rounds that run out, and all-zero groups."""

from __future__ import annotations

import pytest
import torch
from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq as torchao_hqq

from gemma3n_executorch import quantize_shortcuts
from gemma3n_executorch.quantize_shortcuts import hqq_scale_only


@pytest.mark.parametrize("rows, columns, group, bits, dtype, iters", [
    (1200, 256, 32, 4, torch.float32, 20),     # 3 blocks of rows, groups of 32 (the linears)
    (700, 512, 512, 4, torch.bfloat16, 20),    # one scale per row (the lm_head), bf16 input
    (300, 1280, 1280, 8, torch.float32, 20),   # 8 bits per row (the embeddings' 8w)
    (1200, 256, 32, 4, torch.float32, 2),      # the rounds run out before converging
])
def test_same_bits_as_torchao(rows, columns, group, bits, dtype, iters):
    generator = torch.Generator().manual_seed(rows + columns + bits)
    weight = (torch.randn(rows, columns, generator=generator) * 0.02).to(dtype)
    weight[5, :group] = 0  # an all-zero group: its scale is eps, its least squares undefined
    weight = torch.nn.Parameter(weight)  # as torchao gets a linear's weight
    assert rows > 2 * (quantize_shortcuts.BLOCK_ELEMENTS // columns)  # three blocks of rows or more
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    expected_q, expected_scale = torchao_hqq(weight, [1, group], qmin, qmax, iters=iters)
    threads = torch.get_num_threads()
    q, scale = hqq_scale_only(weight, [1, group], qmin, qmax, iters=iters)
    assert torch.get_num_threads() == threads
    assert q.dtype == torch.int8 and scale.dtype == dtype
    assert torch.equal(q, expected_q.to(torch.int8))
    assert torch.equal(scale, expected_scale)
    assert q.max() == qmax or q.min() == qmin  # the range is used: not a trivial case


def test_torchao_uses_it_only_inside_the_context():
    from torchao.quantization.quantize_.workflows.intx import intx_unpacked_to_int8_tensor as intx

    original = intx._choose_qparams_and_quantize_scale_only_hqq
    with quantize_shortcuts.faster_hqq():
        assert intx._choose_qparams_and_quantize_scale_only_hqq is hqq_scale_only
    assert intx._choose_qparams_and_quantize_scale_only_hqq is original is torchao_hqq
