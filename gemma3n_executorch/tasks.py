"""What to export: the program's signature around the Hugging Face text decoder.

* ``FixedWindowLM``: ``forward(input_ids[1, seq_len]) -> logits[1, seq_len, vocab]`` — the
  original design, stateless, Hugging Face's own forward including the final soft-cap.
* ``KVCacheLM``: ``forward(tokens[1, n], input_pos[n]) -> logits[1, vocab]`` for the last
  position, with static KV caches inside the program. ``n`` is dynamic up to ``max_seq_len``
  (the tokens of one call: a prompt longer than that is fed chunk by chunk) and the caches hold
  ``max_context_len`` positions. Only the attention modules are replaced; AltUp, Laurel,
  per-layer embeddings, activation sparsity, RoPE tables and the soft-cap still run Hugging
  Face's code.

The caches follow Gemma 3n's attention pattern. A full-attention layer that owns KV keeps every
position of the context. A sliding layer only ever sees its last ``sliding_window`` positions,
so it keeps a ring of ``sliding_window + max_seq_len`` slots (a chunk's first query still needs
the window before the chunk): the ring's size does not depend on the context, and neither does
its mask, ``[n * r, ring]`` (a row per query head of a KV head's r, see fold_query_heads), built
once per call and shared by every sliding layer. KV-shared layers read the cache of the last owner
of their attention type, ring or full, with the same mask. Attention runs on ExecuTorch's kernel
(attend_ring, attend_full) or, with ``--attention-kernel gemma3n``, on this project's (kernel/),
which reads a ring's window by position and needs no mask.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401  quantized_decomposed.*
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextAttention, apply_rotary_pos_emb

import executorch.kernels.quantized  # noqa: F401  out variants of quantized_decomposed.* (the int8 cache)
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers torch.ops.llama.*

from . import kernel  # noqa: F401  defines torch.ops.gemma3n.* (the kernel itself is built only to run)
from .options import ATTENTION_KERNELS, KV_CACHE_DTYPES
from .variants import EOS_ID

SLIDING, FULL = "sliding_attention", "full_attention"
RING_CACHE = "ring_cache"


class FixedWindowLM(nn.Module):
    initialized_buffers = ()  # stateless

    def __init__(self, model: nn.Module, seq_len: int):
        super().__init__()
        self.model = model
        self.seq_len = seq_len

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def example_inputs(self) -> tuple:
        return (torch.zeros(1, self.seq_len, dtype=torch.long),)

    def dynamic_shapes(self):
        return None


class FloatCache(nn.Module):
    """Keys and values as computed, in the layout ExecuTorch's SDPA kernels read ([1, slots, heads, dim])."""

    def __init__(self, slots: int, heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (1, slots, heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def write(self, key, value, start_pos, slots=None) -> None:
        _write(key, self.k_cache, start_pos, slots)
        _write(value, self.v_cache, start_pos, slots)

    def attend(self, query, start_pos, mask, causal=True):
        # With a mask the kernel attends over every slot (the mask says which are visible); without
        # one over positions [0, start_pos + n), causally unless told not to (every query row then
        # sees all of them). Gemma 3n's query norm replaces the 1/sqrt(head_dim) scaling, hence scale 1.
        return torch.ops.llama.custom_sdpa(query, self.k_cache, self.v_cache, start_pos, mask, 0.0,
                                           mask is None and causal, 1.0)

    def attend_gqa(self, query, start_pos, window):
        """This project's kernel: causal over the whole cache (window 0) or over a ring's window."""
        if window:
            return torch.ops.gemma3n.sliding_gqa_attention(query, self.k_cache, self.v_cache, start_pos, window)
        return torch.ops.gemma3n.gqa_attention(query, self.k_cache, self.v_cache, start_pos)


class HalfCache(FloatCache):
    """Keys and values rounded to fp16 (half fp32's bytes), which only this project's kernel reads
    (ExecuTorch's takes a cache only in the query's dtype): options.resolve gives it that kernel."""

    def __init__(self, slots: int, heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__(slots, heads, head_dim, torch.float16)

    def write(self, key, value, start_pos, slots=None) -> None:
        super().write(key.to(torch.float16), value.to(torch.float16), start_pos, slots)


class Int8Cache(nn.Module):
    """Keys and values quantized to int8 with one scale and zero point per position and head (a
    quarter of fp32's bytes, read by ExecuTorch's quantized SDPA kernel); queries are quantized
    the same way at attention time, as that kernel requires."""

    def __init__(self, slots: int, heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape, scales = (1, slots, heads, head_dim), (1, slots, heads, 1)
        for name in ("k", "v"):
            self.register_buffer(f"{name}_cache", torch.zeros(shape, dtype=torch.int8), persistent=False)
            self.register_buffer(f"{name}_scales", torch.ones(scales, dtype=torch.float32), persistent=False)
            self.register_buffer(f"{name}_zero_points", torch.zeros(scales, dtype=torch.int8), persistent=False)

    def write(self, key, value, start_pos, slots=None) -> None:
        for values, cache, scales, zero_points in ((key, self.k_cache, self.k_scales, self.k_zero_points),
                                                    (value, self.v_cache, self.v_scales, self.v_zero_points)):
            quantized, scale, zero_point = _quantize_per_token(values)
            _write(quantized, cache, start_pos, slots)
            _write(scale, scales, start_pos, slots)
            _write(zero_point, zero_points, start_pos, slots)

    def attend(self, query, start_pos, mask, causal=True):
        quantized, scale, zero_point = _quantize_per_token(query)
        output = torch.ops.llama.custom_quantized_sdpa(
            quantized, self.k_cache, self.v_cache, start_pos, mask, 0.0, mask is None and causal, 1.0,
            zero_point, scale, self.k_zero_points, self.k_scales, self.v_zero_points, self.v_scales)
        return output.to(query.dtype)

    def attend_gqa(self, query, start_pos, window):
        caches = (self.k_cache, self.v_cache, self.k_scales, self.k_zero_points, self.v_scales, self.v_zero_points)
        if window:
            return torch.ops.gemma3n.sliding_gqa_attention_int8(query, *caches, start_pos, window)
        return torch.ops.gemma3n.gqa_attention_int8(query, *caches, start_pos)


CACHE_CLASSES = dict(zip(KV_CACHE_DTYPES, (FloatCache, HalfCache, Int8Cache)))


def _quantize_per_token(values: torch.Tensor):
    """int8 values, fp32 scales and int8 zero points over the last dimension (one head's vector)."""
    scale, zero_point = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(values, torch.int8)
    quantized = torch.ops.quantized_decomposed.quantize_per_token(values, scale, zero_point, -128, 127, torch.int8)
    return quantized, scale.to(torch.float32), zero_point.to(torch.int8)


def _write(values, cache, start_pos, slots) -> None:
    if slots is None:  # a full-length cache: positions are slots
        torch.ops.llama.update_cache(values, cache, start_pos)
    else:
        torch.ops.llama.update_cache_with_indices(values, cache, start_pos, slots)


class CachedAttention(nn.Module):
    """Gemma 3n attention over a static cache: owners write their new keys and values, then every
    layer attends over the cache of its attention type (its own, or the one it shares)."""

    def __init__(self, source: Gemma3nTextAttention, slots: int, cache_class, gqa_kernel: bool):
        super().__init__()
        self.gqa_kernel = gqa_kernel
        config = source.config
        self.layer_type = source.layer_type
        self.ring = self.layer_type == SLIDING
        self.sliding_window = config.sliding_window
        self.owns_cache = not source.is_kv_shared_layer
        self.shares_cache = source.store_full_length_kv
        self.head_dim = config.head_dim
        self.kv_heads = config.num_key_value_heads
        self.q_proj, self.q_norm, self.o_proj = source.q_proj, source.q_norm, source.o_proj
        if self.owns_cache:
            self.k_proj, self.k_norm = source.k_proj, source.k_norm
            self.v_proj, self.v_norm = source.v_proj, source.v_norm
            cache = cache_class(slots, config.num_key_value_heads, config.head_dim, source.q_proj.weight.dtype)
            setattr(self, RING_CACHE if self.ring else "full_cache", cache)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, shared_kv_states=None,
                position_ids=None, start_pos=None, later_start_pos=None, ring_slots=None, **kwargs):
        batch, length, _ = hidden_states.shape
        per_head = (batch, length, -1, self.head_dim)
        cos, sin = position_embeddings

        query = apply_rotary_pos_emb(self.q_norm(self.q_proj(hidden_states).view(per_head)), cos, sin, unsqueeze_dim=2)
        if self.owns_cache:
            key = apply_rotary_pos_emb(self.k_norm(self.k_proj(hidden_states).view(per_head)), cos, sin, unsqueeze_dim=2)
            value = self.v_norm(self.v_proj(hidden_states).view(per_head))
            cache = getattr(self, RING_CACHE) if self.ring else self.full_cache
            cache.write(key, value, start_pos, ring_slots if self.ring else None)
            if self.shares_cache:
                shared_kv_states[self.layer_type] = cache
        else:
            cache = shared_kv_states[self.layer_type]
        # attention_mask: the ring's visibility mask for sliding layers on ExecuTorch's kernel, else None.
        if self.gqa_kernel:
            output = cache.attend_gqa(query, start_pos, self.sliding_window if self.ring else 0)
        elif self.ring:
            output = attend_ring(cache, query, attention_mask, self.kv_heads)
        else:
            output = attend_full(cache, query, start_pos, later_start_pos, self.kv_heads)
        return self.o_proj(output.reshape(batch, length, -1)), None


# ExecuTorch 1.4.1's attention kernel reads a KV head's keys and values once per query head (4
# times per KV head in Gemma 3n) but once per block of query rows. Folding the query heads that
# share a KV head into rows of one head makes it read each KV head once: decode deep in a full
# cache is bound by those reads.

def fold_query_heads(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[1, n, kv * r, d] -> [1, n * r, kv, d]: row t * r + g is query head kv_head * r + g of token t."""
    batch, length, heads, dim = query.shape
    grouped = query.view(batch, length, kv_heads, heads // kv_heads, dim).transpose(2, 3)
    return grouped.reshape(batch, length * (heads // kv_heads), kv_heads, dim)


def unfold_query_heads(rows: torch.Tensor, length: int) -> torch.Tensor:
    batch, folded, kv_heads, dim = rows.shape
    grouped = rows.view(batch, length, folded // length, kv_heads, dim).transpose(2, 3)
    return grouped.reshape(batch, length, -1, dim)


def attend_ring(cache, query, mask, kv_heads):
    """With a mask every row is independent: the mask has a row per folded query row."""
    output = cache.attend(fold_query_heads(query, kv_heads), 0, mask)
    return unfold_query_heads(output, query.shape[1])


def attend_full(cache, query, start_pos, later_start_pos, kv_heads):
    """Causal attention over positions [0, start_pos + n), the first token's query heads folded.

    Without a mask the kernel attends over [0, start + rows); not causal, every row sees all of
    them, so the first token's r folded rows at start = start_pos - (r - 1) see exactly
    [0, start_pos] (start may be negative: only start + rows is used). The causal call for the
    other tokens can't fold (each row would need its own end); its start is later_start_pos,
    which KVCacheLM makes 0 for a one-token call (a decode step): it then reads one position and
    its output is not used."""
    repeats = query.shape[2] // kv_heads
    first = cache.attend(fold_query_heads(query[:, :1], kv_heads), start_pos - (repeats - 1), None, causal=False)
    later = cache.attend(query, later_start_pos, None)
    # Written over the first row, not cat after a [:, 1:] slice, which makes export specialise
    # the token count.
    return later.slice_scatter(unfold_query_heads(first, 1), dim=1, start=0, end=1)


def ring_size(sliding_window: int, max_seq_len: int, max_context_len: int) -> int:
    """Slots a sliding layer keeps: its window plus one call's tokens, or the whole context if smaller."""
    return min(max_context_len, sliding_window + max_seq_len)


class KVCacheLM(nn.Module):
    def __init__(self, model: nn.Module, max_seq_len: int, max_context_len: int, kv_cache: str = "fp32",
                 attention_kernel: str = ATTENTION_KERNELS[0]):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.max_context_len = max_context_len
        self.sliding_window = model.config.sliding_window
        self.ring_slots = ring_size(self.sliding_window, max_seq_len, max_context_len)
        self.query_rows_per_token = model.config.num_attention_heads // model.config.num_key_value_heads
        cache_class = CACHE_CLASSES[kv_cache]
        self.gqa_kernel = attention_kernel == "gemma3n"
        # ExecuTorch's kernel reads every slot of a ring (masked), so a ring must start zeroed (a NaN
        # times a zero attention weight is still NaN): the program stores it (E2B int8: 10.5 MB).
        # This project's kernel reads only the slots a token sees, all written before.
        self.initialized_buffers = () if self.gqa_kernel else (RING_CACHE,)
        for layer in model.model.layers:
            attention = layer.self_attn
            slots = self.ring_slots if attention.layer_type == SLIDING else max_context_len
            layer.self_attn = CachedAttention(attention, slots, cache_class, self.gqa_kernel)

    def ring_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """[n * r, ring] additive mask: which slot each folded query row (r per token, see
        fold_query_heads) may see once this call's tokens are written.

        Positions arrive in order, so after the write slot ``s`` holds the latest position ``p``
        with ``p % ring == s`` and ``p <= last`` (negative: never written since position 0).
        """
        last = positions[-1]
        # Positions are consecutive (the caches write each call at its start); an arange of the
        # rows rather than a reshape of the positions, which XNNPACK would not take for int64.
        rows = torch.arange(positions.shape[0] * self.query_rows_per_token, device=positions.device)
        positions = positions[0] + torch.div(rows, self.query_rows_per_token, rounding_mode="floor")
        slots = torch.arange(self.ring_slots, device=positions.device)
        held = last - torch.remainder(last - slots, self.ring_slots)
        age = positions.unsqueeze(-1) - held
        visible = (held >= 0) & (age >= 0) & (age < self.sliding_window)
        return torch.where(visible, 0.0, float("-inf")).to(torch.float32)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        # Two symbolic start positions for every layer (each .item() is another unbacked symbol
        # that export and lowering must reason about): the call's, and the one attend_full gives
        # the tokens after the first, 0 for a one-token call. That one comes from the positions,
        # not from the token count: export takes a dynamic size to be at least 2.
        start_pos = input_pos[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos + tokens.shape[1] <= self.max_context_len)
        later_start_pos = (input_pos[0] * (input_pos[-1] > input_pos[0])).item()
        torch._check(later_start_pos >= 0)
        torch._check(later_start_pos + tokens.shape[1] <= self.max_context_len)
        output = self.model(
            input_ids=tokens,
            position_ids=input_pos.unsqueeze(0),
            # Hugging Face passes each layer the mask of its type; ours are the ring's and causal.
            attention_mask={SLIDING: None if self.gqa_kernel else self.ring_mask(input_pos), FULL: None},
            use_cache=False,
            logits_to_keep=1,
            # Extra keyword arguments reach the attention modules.
            start_pos=start_pos,
            later_start_pos=later_start_pos,
            ring_slots=torch.remainder(input_pos, self.ring_slots).unsqueeze(0),
        )
        logits = output.logits.reshape(1, -1)  # logits_to_keep=1: one row, viewed, not copied by a select
        # The next token would not fit: answer <eos>. ExecuTorch 1.4.1's runner takes any program
        # whose max_seq_len is below its max_context_len for one whose positions never run out
        # (ring caches only) and would feed the next token anyway; this way it stops cleanly. The
        # token replaced could never have been fed back.
        # A subtraction of one scalar and a concatenation, not a masked_fill over the vocabulary: both
        # are XNNPACK's, where the mask was portable kernels over the whole vocabulary, every call.
        context_full = (input_pos[-1:] + 1 >= self.max_context_len).unsqueeze(0)
        masked = logits - torch.where(context_full, float("inf"), 0.0)
        return torch.cat([masked[:, :EOS_ID], logits[:, EOS_ID:EOS_ID + 1], masked[:, EOS_ID + 1:]], dim=-1)

    def kv_cache_bytes(self) -> int:
        caches = [module for module in self.modules() if isinstance(module, (FloatCache, Int8Cache))]
        return sum(b.numel() * b.element_size() for cache in caches for b in cache.buffers())

    def example_inputs(self) -> tuple:
        return (torch.zeros(1, 2, dtype=torch.long), torch.arange(2, dtype=torch.long))

    def dynamic_shapes(self):
        length = torch.export.Dim("num_tokens", min=1, max=self.max_seq_len)
        return ({1: length}, {0: length})
