"""How to quantize: torchao configurations applied in place before export."""

from __future__ import annotations

from torch import nn



def _is_linear(module: nn.Module, _fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def quantize_linears(model: nn.Module, scheme: str, group_size: int) -> None:
    """``int8``: int8 weight-only, per channel. ``8da4w``: int8 dynamic activations, int4 weights
    in groups of ``group_size`` (linears whose input width is not a multiple are left alone)."""
    from torchao.quantization import quantize_

    if scheme == "none":
        return
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=_is_linear)
        return
    raise ValueError(f"unknown linear quantization {scheme!r}")


def apply(model: nn.Module, linear: str, embeddings: str, group_size: int) -> None:
    """Quantize ``model`` in place; the exporter and the eager references both come through here."""
    quantize_linears(model, linear, group_size)
    if embeddings != "none":
        raise ValueError(f"embedding quantization {embeddings!r} is not available yet")
