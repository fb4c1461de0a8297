"""How to quantize: torchao configurations, applied in place before export through ExecuTorch's
own LLM quantizer (``quantize_model_``).

* ``--quantize`` covers the decoder's linear layers. Layers whose input width is not a multiple of
  the group size (AltUp's 4->4 router and 4->16 coefficients, Laurel's rank-64 up-projection) stay
  in floating point: they are a few thousand parameters per layer.
* ``--quantize-embeddings`` covers the token embedding and the per-layer embedding table, which are
  only gathered, one row per token. Their rows get one scale each.
* The lm_head is tied to the token embedding: when embeddings are quantized it gets the same bit
  width (8w: int8 per row; 4w: int4 in groups), so the one matrix is not int4 at the input and
  float at the output; otherwise it follows ``--quantize``.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn

from .progress import log

EMBEDDING_GROUP_SIZE = 0  # one scale per row: the per-layer table's rows are 7680 wide (E2B)
LM_HEAD_SCHEME = {"8w": ("8da8w", 0), "4w": ("8da4w", None)}  # None: the --group-size
# Quantization works on fp32 copies of the whole matrix (about 20 GB of temporaries for E2B's
# 2 B-value per-layer table); every scale covers part of one row, so row blocks give the same
# result in bounded memory.
ROWS_PER_BLOCK = 16384


def quantize_model(module: nn.Module, **config) -> list[str]:
    """ExecuTorch's quantize_model_, its per-layer prints gathered; returns the layers it skipped."""
    from executorch.extension.llm.export.quantize import quantize_model_

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="quantize_model_ is experimental")
        quantize_model_(module, skip_incompatible_shapes=True, **config)
    return [line.split()[1].rstrip(":") for line in printed.getvalue().splitlines() if line.strip().startswith("Skipping")]


def in_row_blocks(module: nn.Module, quantize_one) -> None:
    """Quantize a large nn.Embedding / nn.Linear block by block of rows and reassemble torchao's
    tensor; ``quantize_one(module)`` quantizes a module in place."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    weight = module.weight.detach()
    if weight.shape[0] <= ROWS_PER_BLOCK:
        quantize_one(module)
        return
    pieces = []
    for block in weight.split(ROWS_PER_BLOCK):
        piece = nn.Embedding(*block.shape, _weight=block) if isinstance(module, nn.Embedding) else \
            nn.Linear(block.shape[1], block.shape[0], bias=False)
        if isinstance(piece, nn.Linear):
            piece.weight = nn.Parameter(block, requires_grad=False)
        quantize_one(piece)
        pieces.append(piece.weight)
    first = pieces[0]
    joined = IntxUnpackedToInt8Tensor(
        torch.cat([p.qdata for p in pieces]), torch.cat([p.scale for p in pieces]),
        torch.cat([p.zero_point for p in pieces]), first.target_dtype, first.block_size, first.dtype,
        first.activation_quantization)
    module.weight = nn.Parameter(joined, requires_grad=False)


def _int8_weight_only(module: nn.Module) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(module, Int8WeightOnlyConfig(), filter_fn=lambda m, _fqn: isinstance(m, nn.Linear))


def quantize_linears(module: nn.Module, scheme: str, group_size: int) -> list[str]:
    if scheme == "int8":
        _int8_weight_only(module)
        return []
    if scheme in ("8da4w", "8da8w"):
        return quantize_model(module, qlinear_config=scheme, qlinear_group_size=group_size)
    raise ValueError(f"unknown linear quantization {scheme!r}")


def apply(model: nn.Module, linear: str, embeddings: str, group_size: int) -> None:
    """Quantize a Gemma3nForCausalLM in place; the exporter and the eager references both come
    through here, so they quantize identically."""
    decoder = model.model
    skipped = []
    if linear != "none":  # first: it frees most of the float weights before the big tables
        skipped = quantize_linears(decoder, linear, group_size)
    if embeddings != "none":
        for table in (decoder.embed_tokens, decoder.embed_tokens_per_layer):
            # padding_idx only matters for training, but ExecuTorch's pass that turns torchao's
            # dequantize + embedding into its quantized embedding kernels only matches embeddings
            # without one; Gemma 3n's have padding_idx 0.
            table.padding_idx = None
            in_row_blocks(table, lambda piece: quantize_model(
                piece, qembedding_config=embeddings, qembedding_group_size=EMBEDDING_GROUP_SIZE))
    head_scheme, head_group = LM_HEAD_SCHEME.get(embeddings, (linear, None))
    if head_scheme == "int8":
        _int8_weight_only(model.lm_head)
    elif head_scheme != "none":
        head_group = group_size if head_group is None else head_group
        in_row_blocks(model.lm_head, lambda piece: quantize_linears(piece, head_scheme, head_group))
    if skipped:
        log(f"  {len(skipped)} linear layers kept in floating point (input width not a multiple of "
            f"{group_size}), e.g. {skipped[0]}")
