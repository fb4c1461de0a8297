"""The lowering shortcuts (gemma3n_executorch/lowering_shortcuts.py) change how long lowering takes,
never what it makes: the same program bytes with and without them, while they are taken."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gemma3n_executorch import lowering, lowering_shortcuts, quantize


class Block(nn.Module):
    """Dynamically quantized linears around the elementwise and reduction operators a decoder
    layer has, with a dynamic token count, as the kv program is exported."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(64, 128, bias=False)
        self.down = nn.Linear(128, 64, bias=False)

    def forward(self, hidden):
        normed = hidden * torch.rsqrt((hidden * hidden).mean(-1, keepdim=True) + 1e-6)
        return hidden + self.down(nn.functional.gelu(self.up(normed), approximate="tanh"))


def program_bytes(shortcuts: bool) -> tuple[bytes, dict]:
    block = Block()
    quantize.quantize_linears(block, "8da4w", 32, torch.float32)
    tokens = torch.export.Dim("tokens", min=1, max=16)
    program = lowering.export(block, (torch.randn(1, 4, 64),), ({1: tokens},))
    lower = lowering.lower if shortcuts else lowering._lower  # _lower: the same stages, no shortcuts
    with lowering_shortcuts.enabled() if shortcuts else contextlib.nullcontext({}) as counts:
        lowered, _ = lower(program, "xnnpack", {}, False, False, ())
    return lowered.buffer, dict(counts)


def test_shortcuts_leave_the_program_byte_for_byte_the_same():
    plain, _ = program_bytes(shortcuts=False)
    shortcut, counts = program_bytes(shortcuts=True)
    assert counts["shapes reused"] > 0 and counts["passes skipped"] > 0, counts  # taken, not bypassed
    assert shortcut == plain
