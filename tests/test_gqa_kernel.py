"""gemma3n::gqa_attention and its sliding (ring) form in the ExecuTorch runtime against torch's SDPA
(fp32, fp16 and int8 caches)."""

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


class SlidingAttention(torch.nn.Module):
    def forward(self, query, k_cache, v_cache, input_pos):
        start = input_pos[0].item()
        torch._check(start >= 0)
        return torch.ops.gemma3n.sliding_gqa_attention(query, k_cache, v_cache, start, WINDOW)


class SlidingInt8Attention(torch.nn.Module):
    def forward(self, query, k_cache, v_cache, k_scales, k_zero_points, v_scales, v_zero_points, input_pos):
        start = input_pos[0].item()
        torch._check(start >= 0)
        return torch.ops.gemma3n.sliding_gqa_attention_int8(query, k_cache, v_cache, k_scales, k_zero_points,
                                                            v_scales, v_zero_points, start, WINDOW)


# A ring as Gemma 3n's sliding layers keep it: the window plus one call's tokens.
WINDOW = 600  # beyond the 512-position split: a token's window is read in parts
RING = WINDOW + MAX_TOKENS
RING_DEPTHS = (0, 3, 599, 600, 1234, 5000)  # before, at and far past the first wrap


def float_caches(dtype, slots=SLOTS):
    generator = torch.Generator().manual_seed(1)
    shape = (1, slots, KV_HEADS, HEAD_DIM)
    # Scores of a few units, as Gemma 3n's normed queries and keys give (scale 1).
    return tuple((torch.randn(shape, generator=generator) * 0.4).to(dtype) for _ in range(2))


def int8_caches(slots=SLOTS):
    generator = torch.Generator().manual_seed(2)
    shape, per_row = (1, slots, KV_HEADS, HEAD_DIM), (1, slots, KV_HEADS, 1)
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


def unwritten_as_nan(cache, depth, tokens):
    """The ring as it is before position depth + tokens - 1 has been written: slots no position
    reached hold NaN, which any read of them would spread to the output."""
    cache = cache.clone()
    written = depth + tokens
    if written < cache.shape[1]:
        cache[:, written:] = float("nan") if cache.is_floating_point() else 0
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sliding_float_cache(tmp_path, dtype):
    k, v = float_caches(dtype, RING)
    method = lower(SlidingAttention(), (queries(5), k, v, torch.tensor([3])), tmp_path, f"sliding-{dtype}")
    for tokens in (1, 5, MAX_TOKENS):
        for depth in RING_DEPTHS:
            query = queries(tokens)
            ring_k, ring_v = unwritten_as_nan(k, depth, tokens), unwritten_as_nan(v, depth, tokens)
            actual = method.execute([query, ring_k, ring_v, torch.tensor([depth])])[0]
            expected = kernel.reference(query, k, v, depth, WINDOW)
            assert torch.isfinite(actual).all(), f"an unwritten slot was read at depth {depth}"
            close(actual, expected, 1e-5)


def test_sliding_int8_cache(tmp_path):
    k, v, ks, kz, vs, vz = int8_caches(RING)
    method = lower(SlidingInt8Attention(), (queries(5), k, v, ks, kz, vs, vz, torch.tensor([3])), tmp_path,
                   "sliding-int8")
    for tokens in (1, 5):
        for depth in RING_DEPTHS:
            query = queries(tokens)
            scales = [unwritten_as_nan(scale, depth, tokens) for scale in (ks, vs)]
            actual = method.execute([query, k, v, scales[0], kz, scales[1], vz, torch.tensor([depth])])[0]
            assert torch.isfinite(actual).all(), f"an unwritten slot was read at depth {depth}"
            close(actual, kernel.reference_int8(query, k, v, ks, kz, vs, vz, depth, WINDOW), 1e-5)


def test_sliding_reference_is_a_ring():
    """Position p is in slot p % RING and token t sees the WINDOW positions up to its own: a plain
    loop over a full-length cache, written as a ring, gives the same output."""
    positions = 1500
    full_k, full_v = (cache[:, :positions] for cache in float_caches(torch.float32, positions))
    ring_k, ring_v = torch.empty(1, RING, KV_HEADS, HEAD_DIM), torch.empty(1, RING, KV_HEADS, HEAD_DIM)
    for p in range(positions):
        ring_k[:, p % RING], ring_v[:, p % RING] = full_k[:, p], full_v[:, p]
    query, depth = queries(3), positions - 3
    expected = torch.empty_like(query)
    for t in range(3):
        seen = slice(depth + t + 1 - WINDOW, depth + t + 1)
        for h in range(HEADS):
            g = h // (HEADS // KV_HEADS)
            weights = torch.softmax(full_k[0, seen, g] @ query[0, t, h], 0)
            expected[0, t, h] = weights @ full_v[0, seen, g]
    torch.testing.assert_close(kernel.reference(query, ring_k, ring_v, depth, WINDOW), expected, rtol=1e-5, atol=1e-6)
