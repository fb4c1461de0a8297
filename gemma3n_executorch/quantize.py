"""How to quantize: torchao configurations applied in place before export."""

from __future__ import annotations

from torch import nn



def _is_linear(module: nn.Module, _fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def quantize_linears(model: nn.Module, scheme: str) -> None:
    """``int8``: torchao int8 weight-only, per output channel, on every linear layer."""
    from torchao.quantization import quantize_

    if scheme == "none":
        return
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=_is_linear)
        return
    raise ValueError(f"unknown linear quantization {scheme!r}")


def apply(model: nn.Module, linear: str) -> None:
    """Quantize ``model`` in place; the exporter and the eager references both come through here."""
    quantize_linears(model, linear)
