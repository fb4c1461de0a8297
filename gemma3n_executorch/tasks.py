"""What to export: the program's signature around the Hugging Face text decoder.

* ``FixedWindowLM``: ``forward(input_ids[1, seq_len]) -> logits[1, seq_len, vocab]`` — the
  original design, stateless, Hugging Face's own forward including the final soft-cap.
* ``KVCacheLM``: ``forward(tokens[1, n], input_pos[n]) -> logits[1, vocab]`` for the last
  position, with static KV caches inside the program, ``n`` dynamic so a prompt prefills in
  one call. Only the attention modules are replaced; AltUp, Laurel, per-layer embeddings,
  activation sparsity, RoPE tables and the soft-cap still run Hugging Face's code.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextAttention, apply_rotary_pos_emb

from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers torch.ops.llama.*


class FixedWindowLM(nn.Module):
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


class CachedAttention(nn.Module):
    """Gemma 3n attention over a static cache, in the layout ExecuTorch's SDPA kernels use.

    Layers that own KV write their new keys/values at ``input_pos`` with ``llama::update_cache``.
    The last layer of each attention type before the shared block publishes its cache in
    ``shared_kv_states``; the KV-shared layers attend over that cache instead of their own.
    Sliding layers mask keys older than ``sliding_window`` positions; full layers are causal.
    """

    def __init__(self, source: Gemma3nTextAttention, max_seq_len: int):
        super().__init__()
        config = source.config
        self.layer_type = source.layer_type
        self.sliding_window = source.sliding_window
        self.owns_cache = not source.is_kv_shared_layer
        self.shares_cache = source.store_full_length_kv
        self.head_dim = config.head_dim
        self.max_seq_len = max_seq_len
        self.q_proj, self.q_norm, self.o_proj = source.q_proj, source.q_norm, source.o_proj
        if self.owns_cache:
            self.k_proj, self.k_norm = source.k_proj, source.k_norm
            self.v_proj, self.v_norm = source.v_proj, source.v_norm
            shape = (1, max_seq_len, config.num_key_value_heads, config.head_dim)
            dtype = source.q_proj.weight.dtype
            self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def sliding_mask(self, positions: torch.Tensor) -> torch.Tensor:
        keys = torch.arange(self.max_seq_len, device=positions.device)
        queries = positions.unsqueeze(-1)
        visible = (keys <= queries) & (keys > queries - self.sliding_window)
        return torch.where(visible, 0.0, float("-inf")).to(torch.float32)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, shared_kv_states=None,
                position_ids=None, start_pos=None, **kwargs):
        batch, length, _ = hidden_states.shape
        per_head = (batch, length, -1, self.head_dim)
        cos, sin = position_embeddings

        query = apply_rotary_pos_emb(self.q_norm(self.q_proj(hidden_states).view(per_head)), cos, sin, unsqueeze_dim=2)
        if self.owns_cache:
            key = apply_rotary_pos_emb(self.k_norm(self.k_proj(hidden_states).view(per_head)), cos, sin, unsqueeze_dim=2)
            value = self.v_norm(self.v_proj(hidden_states).view(per_head))
            torch.ops.llama.update_cache(key, self.k_cache, start_pos)
            torch.ops.llama.update_cache(value, self.v_cache, start_pos)
            key_cache, value_cache = self.k_cache, self.v_cache
            if self.shares_cache:
                shared_kv_states[self.layer_type] = (key_cache, value_cache)
        else:
            key_cache, value_cache = shared_kv_states[self.layer_type]

        if self.sliding_window is not None:
            mask = self.sliding_mask(position_ids[0])
            output = torch.ops.llama.custom_sdpa(query, key_cache, value_cache, start_pos, mask, 0.0, False, 1.0)
        else:
            output = torch.ops.llama.custom_sdpa(query, key_cache, value_cache, start_pos, None, 0.0, True, 1.0)
        return self.o_proj(output.reshape(batch, length, -1)), None


class KVCacheLM(nn.Module):
    def __init__(self, model: nn.Module, max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        for layer in model.model.layers:
            layer.self_attn = CachedAttention(layer.self_attn, max_seq_len)
        # Hugging Face builds masks when none are given; the cached attention makes its own.
        self._no_masks = {layer_type: None for layer_type in set(model.config.layer_types)}

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        # One symbolic start position for every layer: each extra .item() is another unbacked
        # symbol that export and lowering must reason about.
        start_pos = input_pos[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos + tokens.shape[1] <= self.max_seq_len)
        output = self.model(
            input_ids=tokens,
            position_ids=input_pos.unsqueeze(0),
            attention_mask=self._no_masks,
            use_cache=False,
            logits_to_keep=1,
            start_pos=start_pos,  # Hugging Face passes extra keyword arguments down to attention
        )
        return output.logits[:, -1, :]

    def kv_cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name.endswith("_cache"))

    def example_inputs(self) -> tuple:
        return (torch.zeros(1, 2, dtype=torch.long), torch.arange(2, dtype=torch.long))

    def dynamic_shapes(self):
        length = torch.export.Dim("num_tokens", min=1, max=self.max_seq_len)
        return ({1: length}, {0: length})
