"""gemma3n::gqa_attention in the ExecuTorch runtime against torch's SDPA (fp32, fp16 and int8 caches)."""

from __future__ import annotations

import pytest
import torch

from gemma3n_executorch import kernel, lowering

HEADS, KV_HEADS, HEAD_DIM, SLOTS, MAX_TOKENS = 8, 2, 32, 2200, 8
DEPTHS = (0, 1, 7, 100, 1000, 2190)  # 2190: beyond the kernel's 512-position split, several parts


class FloatAttention(torch.nn.Module):
    def forward(self, query, k_cache, v_cache, input_pos):
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + query.shape[1] <= k_cache.shape[1])
        return torch.ops.gemma3n.gqa_attention(query, k_cache, v_cache, start)


class Int8Attention(torch.nn.Module):
    def forward(self, query, k_cache, v_cache, k_scales, k_zero_points, v_scales, v_zero_points, input_pos):
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + query.shape[1] <= k_cache.shape[1])
        return torch.ops.gemma3n.gqa_attention_int8(query, k_cache, v_cache, k_scales, k_zero_points, v_scales,
                                                    v_zero_points, start)


def float_caches(dtype):
    generator = torch.Generator().manual_seed(1)
    shape = (1, SLOTS, KV_HEADS, HEAD_DIM)
    # Scores of a few units, as Gemma 3n's normed queries and keys give (scale 1).
    return tuple((torch.randn(shape, generator=generator) * 0.4).to(dtype) for _ in range(2))


def int8_caches():
    generator = torch.Generator().manual_seed(2)
    shape, per_row = (1, SLOTS, KV_HEADS, HEAD_DIM), (1, SLOTS, KV_HEADS, 1)
    caches = []
    for _ in range(2):
        caches += [torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8),
                   torch.rand(per_row, generator=generator) * 0.01 + 0.001,
                   torch.randint(-20, 20, per_row, generator=generator, dtype=torch.int8)]
    k, ks, kz, v, vs, vz = caches
    return k, v, ks, kz, vs, vz


def lower(module, example_inputs, tmp_path, name):
    from executorch.runtime import Runtime

    tokens = torch.export.Dim("tokens", min=1, max=MAX_TOKENS)
    dynamic = ({1: tokens},) + (None,) * (len(example_inputs) - 1)
    program, _ = lowering.lower(lowering.export(module, example_inputs, dynamic), "portable", {})
    path = tmp_path / f"{name}.pte"
    lowering.write_atomically(program, path)
    kernel.load_runtime_kernel()
    return Runtime.get().load_program(path).load_method("forward")


def queries(tokens):
    return torch.randn(1, tokens, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(tokens)) * 0.4


def close(actual, expected, rtol):
    error = (actual - expected).abs().max().item()
    assert error <= rtol * expected.abs().max().item(), f"max abs error {error:.3g} vs max {expected.abs().max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float_cache(tmp_path, dtype):
    k, v = float_caches(dtype)
    method = lower(FloatAttention(), (queries(5), k, v, torch.tensor([3])), tmp_path, str(dtype))
    for tokens in (1, 5):
        for depth in DEPTHS:
            query = queries(tokens)
            if depth + tokens > SLOTS:
                continue
            actual = method.execute([query, k, v, torch.tensor([depth])])[0]
            expected = kernel.reference(query, k, v, depth)
            assert actual.shape == (1, tokens, HEADS, HEAD_DIM)
            close(actual, expected, 1e-5)
            # The eager op is the reference itself.
            torch.testing.assert_close(torch.ops.gemma3n.gqa_attention(query, k, v, depth), expected)


def test_int8_cache(tmp_path):
    k, v, ks, kz, vs, vz = int8_caches()
    method = lower(Int8Attention(), (queries(5), k, v, ks, kz, vs, vz, torch.tensor([3])), tmp_path, "int8")
    for tokens in (1, 5):
        for depth in DEPTHS:
            query = queries(tokens)
            if depth + tokens > SLOTS:
                continue
            actual = method.execute([query, k, v, ks, kz, vs, vz, torch.tensor([depth])])[0]
            expected = kernel.reference_int8(query, k, v, ks, kz, vs, vz, depth)
            close(actual, expected, 1e-5)


def test_matches_torch_sdpa_directly():
    """The reference is causal SDPA over the visible prefix: check it against a plain loop."""
    k, v = float_caches(torch.float32)
    query, depth = queries(3), 10
    expected = torch.empty_like(query)
    for t in range(3):
        for h in range(HEADS):
            g = h // (HEADS // KV_HEADS)
            scores = k[0, :depth + t + 1, g] @ query[0, t, h]
            expected[0, t, h] = torch.softmax(scores, 0) @ v[0, :depth + t + 1, g]
    torch.testing.assert_close(kernel.reference(query, k, v, depth), expected, rtol=1e-5, atol=1e-6)
