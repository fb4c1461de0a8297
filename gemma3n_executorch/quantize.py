"""How to quantize: torchao configurations, applied in place before export through ExecuTorch's
own LLM quantizer (``quantize_model_``).

* ``--quantize`` covers the decoder's linear layers, in groups of ``--group-size`` weights along
  the input, or with one scale per output channel (group size 0). Layers whose input width is not
  a multiple of the group size stay in floating point (AltUp's 4->4 and 4->16 stream mixers,
  Laurel's rank-64 up-projection: a few thousand parameters per layer); per channel, those with
  fewer than ``MIN_PER_CHANNEL_INPUTS`` inputs do.
* ``--quantize-embeddings`` covers the token embedding and the per-layer embedding table, which are
  only gathered, one row per token. Their rows get one scale each. A table whose quantized rows fall
  a little short of whole file pages is stored with zero columns up to them and gathered through
  ``PageRowEmbedding``, which keeps the real columns: the values are the same, and each row is read
  from the fewest pages (E2B's per-layer table at 4 bits: 3840 -> 4096 bytes a row).
* The lm_head is tied to the token embedding: when embeddings are quantized it gets the same
  quantization, bit width and one scale per row, so the one matrix is not int4 at the input and
  float at the output; otherwise it follows ``--quantize``.

The model comes as its checkpoint stores it (bf16) and reaches the export dtype one module at a
time, each cast just before it is quantized: the fp32 copy of the whole model (E4B: 27.5 GB)
never exists. The exporter's model holds no weights at all until then (stored_weights.py): each
is read from the checkpoint as it is reached, so not even the bf16 model exists whole.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn

from .options import PER_CHANNEL, XNNPACK_GROUP_MULTIPLE
from .program_file import FILE_PAGE
from .progress import log, release_freed_memory

EMBEDDING_GROUP_SIZE = PER_CHANNEL  # one scale per row: the per-layer table's rows are 7680 wide (E2B)
LM_HEAD_SCHEME = {"8w": "8da8w", "4w": "8da4w"}  # per row, as the embedding it is tied to
MIN_PER_CHANNEL_INPUTS = 32  # AltUp's stream mixers have 4 inputs, each a whole stream: keep them float
# Quantization works on fp32 copies of the whole matrix (about 20 GB of temporaries for E2B's
# 2 B-value per-layer table); every scale covers part of one row, so row blocks give the same
# result in bounded memory.
ROWS_PER_BLOCK = 16384
# A gathered row that starts a page is read from ceil(bytes / page) pages; one of 3840 bytes at any
# 16-byte offset, from two pages 7 times in 8. Rows are padded to whole pages where that stores at
# most an eighth more (E2B's per-layer table at 4 bits; not E4B's 4480-byte rows, which would nearly double).
MAX_ROW_PADDING = 1 / 8
EMBEDDING_BITS = {"4w": 4, "8w": 8}


def page_row_columns(columns: int, bits: int) -> int:
    """The columns a quantized table's row is stored with: ``columns``, or padded to whole pages."""
    row_bytes = columns * bits // 8
    padded = -(-row_bytes // FILE_PAGE) * FILE_PAGE
    return padded * 8 // bits if padded - row_bytes <= row_bytes * MAX_ROW_PADDING else columns


class PageRowEmbedding(nn.Module):
    """Gemma 3n's scaled embedding over rows stored with zero columns after the real ones (see
    page_row_columns): gathers whole stored rows, keeps the first ``columns``, then scales, as
    Gemma3nTextScaledWordEmbedding does."""

    def __init__(self, table: nn.Embedding, columns: int):
        super().__init__()
        self.weight = table.weight
        self.columns = columns
        self.register_buffer("embed_scale", table.embed_scale, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.weight)[..., :self.columns]
        return rows * self.embed_scale.to(self.weight.dtype)


def quantize_model(module: nn.Module, **config) -> None:
    """ExecuTorch's quantize_model_, its per-layer prints silenced (the caller chose the layers)."""
    from executorch.extension.llm.export.quantize import quantize_model_

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="quantize_model_ is experimental")
        quantize_model_(module, **config)


class HeldWeights:
    """The weights as the model holds them (stored_weights.StoredWeights reads those of a model
    built without them from its checkpoint instead, through the same two calls)."""

    @staticmethod
    def rows(parameter: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return parameter.detach()[start:stop]

    @staticmethod
    def fill_(module: nn.Module, dtype: torch.dtype | None = None) -> None:
        pass


def in_row_blocks(module: nn.Module, dtype: torch.dtype, quantize_one, weights=HeldWeights,
                  stored_columns: int | None = None) -> None:
    """Quantize a large nn.Embedding / nn.Linear block by block of rows, each cast to ``dtype``,
    and reassemble torchao's tensor; ``quantize_one(module)`` quantizes a module in place.
    ``stored_columns``: the quantized rows get zero columns up to that width (each row has its own
    scales, so the real columns quantize as without them)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    rows, columns = module.weight.shape
    stored_columns = stored_columns or columns
    joined, template = {}, None
    for start in range(0, rows, ROWS_PER_BLOCK):
        block = weights.rows(module.weight, start, min(rows, start + ROWS_PER_BLOCK)).to(dtype)
        if isinstance(module, nn.Embedding):
            piece = nn.Embedding(*block.shape, _weight=block)
        else:  # uninitialised: a random init of a block of E4B's lm_head took longer than reading it
            piece = torch.nn.utils.skip_init(nn.Linear, block.shape[1], block.shape[0], bias=False)
            piece.weight = nn.Parameter(block, requires_grad=False)
        quantize_one(piece)
        quantized = piece.weight
        if template is None:
            if len(block) == rows and stored_columns == columns:
                module.weight = nn.Parameter(quantized.data, requires_grad=False)
                return
            template = quantized
        # Each block's rows written into the whole table's tensors as it comes: joining the blocks
        # at the end (torch.cat) held the table's quantized data twice (E2B's per-layer table: 2 GB).
        for name in type(quantized).tensor_data_names:  # qdata, scale, zero_point
            part = getattr(quantized, name)
            if name == "qdata":
                if name not in joined:
                    joined[name] = part.new_zeros((rows, stored_columns))
                joined[name][start:start + len(block), :columns] = part
                continue
            if name not in joined:
                joined[name] = part.new_empty((rows, *part.shape[1:]))  # one row of scales a row
            joined[name][start:start + len(block)] = part
        del quantized, piece
        release_freed_memory()  # each block's freed temporaries, before the next block's
    # torchao 0.18 implements no torch.cat for its tensor: its constructor, by keyword as its from_hp calls it.
    block_size = template.block_size
    if stored_columns != columns:
        assert block_size[1] == columns, "zero columns need one scale a row"
        block_size = (block_size[0], stored_columns)
    module.weight = nn.Parameter(IntxUnpackedToInt8Tensor(
        **joined, target_dtype=template.target_dtype, block_size=block_size, dtype=template.dtype,
        activation_quantization=template.activation_quantization), requires_grad=False)


def quantizable(linear: nn.Linear, scheme: str, group_size: int) -> bool:
    if scheme == "int8":
        return True
    if group_size == PER_CHANNEL:
        # XNNPACK runs a 4-bit row as one group of the whole input, which must be a multiple of 32:
        # a custom Gemma 3n 48 wide keeps its lm_head in floating point rather than failing to lower.
        return linear.in_features >= MIN_PER_CHANNEL_INPUTS and (
            scheme != "8da4w" or linear.in_features % XNNPACK_GROUP_MULTIPLE == 0)
    return linear.in_features % group_size == 0


def quantize_linear(linear: nn.Linear, scheme: str, group_size: int) -> None:
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(linear, Int8WeightOnlyConfig())
    elif scheme in ("8da4w", "8da8w"):
        quantize_model(linear, qlinear_config=scheme, qlinear_group_size=group_size)
    else:
        raise ValueError(f"unknown linear quantization {scheme!r}")


def quantize_linears(module: nn.Module, scheme: str, group_size: int, dtype: torch.dtype,
                     weights=HeldWeights) -> list[str]:
    """Every nn.Linear in ``module`` that the scheme can take, cast to ``dtype`` then quantized;
    returns the names of those left as they were."""
    skipped = []
    for name, linear in list(module.named_modules()):
        if isinstance(linear, nn.Linear):
            if quantizable(linear, scheme, group_size):
                weights.fill_(linear)
                quantize_linear(linear.to(dtype), scheme, group_size)
            else:
                skipped.append(name)
    return skipped


def apply(model: nn.Module, linear: str, embeddings: str, group_size: int, dtype: torch.dtype,
          weights=HeldWeights) -> None:
    """Bring a Gemma3nForCausalLM, as loaded, to ``dtype`` and the given quantization, in place;
    the exporter and the eager references both come through here, so they quantize identically.
    ``weights``: where the model's weights come from (``loaded.weights`` when the model was
    built without them)."""
    from .checkpoint import cast_
    from .quantize_shortcuts import faster_hqq

    with faster_hqq():
        skipped = _quantize(model, linear, embeddings, group_size, dtype, weights)
    cast_(model, dtype)
    if skipped:
        grouping = "one scale per channel" if group_size == PER_CHANNEL else f"group size {group_size}"
        log(f"  {len(skipped)} linear layers kept in floating point (input too narrow for {grouping}), "
            f"e.g. {skipped[0]}")


def _quantize(model: nn.Module, linear: str, embeddings: str, group_size: int, dtype: torch.dtype,
              weights) -> list[str]:
    """``apply``'s quantization; returns the names of the linear layers left in floating point."""
    decoder = model.model
    skipped = []
    if linear != "none":  # first: it frees most of the weights before the big tables
        skipped = quantize_linears(decoder, linear, group_size, dtype, weights)
    if embeddings != "none":
        for name in ("embed_tokens", "embed_tokens_per_layer"):
            table = getattr(decoder, name)
            # padding_idx only matters for training, but ExecuTorch's pass that turns torchao's
            # dequantize + embedding into its quantized embedding kernels only matches embeddings
            # without one; Gemma 3n's have padding_idx 0.
            table.padding_idx = None
            columns = table.weight.shape[1]
            stored = page_row_columns(columns, EMBEDDING_BITS[embeddings])
            in_row_blocks(table, dtype, lambda piece: quantize_model(
                piece, qembedding_config=embeddings, qembedding_group_size=EMBEDDING_GROUP_SIZE), weights, stored)
            if stored != columns:
                setattr(decoder, name, PageRowEmbedding(table, columns))
        head_scheme, head_group = LM_HEAD_SCHEME[embeddings], EMBEDDING_GROUP_SIZE
    else:
        head_scheme, head_group = linear, group_size
    if head_scheme != "none" and not quantizable(model.lm_head, head_scheme, head_group):
        skipped.append("lm_head")
        head_scheme = "none"
    if head_scheme == "int8":  # weight-only int8 quantizes in place, with no fp32 temporaries to bound
        weights.fill_(model.lm_head)
        quantize_linear(model.lm_head.to(dtype), head_scheme, head_group)
    elif head_scheme != "none":
        in_row_blocks(model.lm_head, dtype, lambda piece: quantize_linear(piece, head_scheme, head_group), weights)
    weights.fill_(model, dtype)  # what is left in floating point, one tensor at a time
    return skipped
