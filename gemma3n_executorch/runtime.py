"""Load a .pte through the ExecuTorch runtime and drive it: metadata, fixed forward, KV steps."""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from . import tasks
from .metadata import PREFIX, ProgramInfo
from .progress import UserError

ET_MAGIC = b"ET"  # flatbuffer file identifier "ETxx" at bytes 4..8
EXTENDED_HEADER_MAGIC = b"eh00"


def check_file(path: Path) -> None:
    """Reject what is plainly not a complete .pte before the runtime sees it."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    if path.suffix != ".pte":
        raise UserError(f"{path}: not a .pte file; pass a program written by e2b/export.py or e4b/export.py")
    with path.open("rb") as file:
        head = file.read(40)
    if len(head) < 8 or head[4:6] != ET_MAGIC:
        raise UserError(f"{path}: not an ExecuTorch program (bad header); re-export it")
    if head[8:12] == EXTENDED_HEADER_MAGIC:
        program_size, segment_base, segment_size = struct.unpack_from("<QQQ", head, 16)
        expected = max(program_size, segment_base + segment_size)
        if path.stat().st_size < expected:
            raise UserError(f"{path}: truncated ({path.stat().st_size} of {expected} bytes); re-export it")


class Program:
    """An exported Gemma 3n program loaded through ``executorch.runtime``."""

    def __init__(self, path: Path | str):
        from executorch.runtime import Runtime, Verification

        self.path = Path(path)
        check_file(self.path)
        try:
            self._program = Runtime.get().load_program(self.path, verification=Verification.InternalConsistency)
        except RuntimeError as error:
            raise UserError(f"{self.path}: the ExecuTorch runtime cannot load it ({error}); re-export it") from None
        self.method_names = sorted(self._program.method_names)
        missing = [name for name in ProgramInfo.method_names() if name not in self.method_names]
        if missing:
            raise UserError(f"{self.path}: no {missing[0]} metadata; it was not exported by this tool")
        self.info = ProgramInfo(**{name[len(PREFIX):]: self.constant(name) for name in ProgramInfo.method_names()})
        self._forward = self._program.load_method("forward")
        self.position = 0  # kv mode: tokens already in the cache

    def constant(self, name: str):
        values = self._program.load_method(name).execute([])
        return values[0] if len(values) == 1 else list(values)

    def require_mode(self, mode: str) -> None:
        if self.info.mode != mode:
            raise UserError(f"{self.path}: a --mode {self.info.mode} program; this needs a --mode {mode} program")

    def forward_fixed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._forward.execute([input_ids])[0]

    def reset(self) -> None:
        """Start a new sequence. The cache needs no clearing: every position is written before it is read."""
        self.position = 0

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Append ``tokens`` at the current position in one call; logits of the last one, [vocab]."""
        self.require_mode(tasks.KV)
        if self.position + len(tokens) > self.info.seq_len:
            raise UserError(
                f"{self.position + len(tokens)} tokens do not fit the program's max_seq_len {self.info.seq_len}; "
                "shorten the prompt or re-export with a larger --max-seq-len"
            )
        ids = torch.tensor([tokens], dtype=torch.long)
        positions = torch.arange(self.position, self.position + len(tokens), dtype=torch.long)
        logits = self._forward.execute([ids, positions])[0]
        self.position += len(tokens)
        return logits.reshape(-1)
