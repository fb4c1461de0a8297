"""Load a .pte through the ExecuTorch runtime and drive it: metadata, fixed forward, KV steps."""

from __future__ import annotations

from pathlib import Path

import torch
import executorch.kernels.quantized  # noqa: F401  kernels for the quantized embeddings
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  kernels for llama::update_cache, custom_sdpa

from . import preflight, program_file
from .options import KV
from .metadata import PREFIX, ProgramInfo
from .progress import UserError


class Program:
    """An exported Gemma 3n program loaded through ``executorch.runtime``."""

    def __init__(self, path: Path | str):
        from executorch.runtime import Runtime, Verification

        self.path = Path(path)
        preflight.check_program_file(self.path)
        try:
            self._program = Runtime.get().load_program(self.path, verification=Verification.InternalConsistency)
        except MemoryError:
            raise UserError(f"{self.path}: not enough memory to load it ({self.path.stat().st_size / 1e9:.2f} GB); "
                            "close other programs or export a smaller one (--quantize 8da4w)") from None
        except RuntimeError as error:
            raise UserError(f"{self.path}: the ExecuTorch runtime cannot load it ({error}); re-export it") from None
        # The gathered tables are read one row per token: without this advice the kernel reads
        # and maps around every row (program_file.advise_random_access).
        program_file.advise_random_access(self.path)
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

    def check_token_ids(self, ids: torch.Tensor) -> None:
        """The program gathers embedding rows by id without a bounds check: an id past its vocabulary
        reads other memory (finite, wrong logits) or crashes the process."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.info.vocab_size):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise UserError(f"token id {bad} is outside the program's vocabulary (0..{self.info.vocab_size - 1}); "
                            "use the tokenizer exported with this program")

    def forward_fixed(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.check_token_ids(input_ids)
        return self._forward.execute([input_ids])[0]

    def reset(self) -> None:
        """Start a new sequence. The cache needs no clearing: every position is written before it is read."""
        self.position = 0

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Append ``tokens`` at the current position, in calls of at most the program's
        max_seq_length tokens; logits of the last one, [vocab]."""
        self.require_mode(KV)
        self.check_token_ids(torch.tensor(tokens, dtype=torch.long))
        if self.position + len(tokens) > self.info.context_len:
            raise UserError(
                f"{self.position + len(tokens)} tokens do not fit the program's context of {self.info.context_len} "
                "positions; shorten the prompt or re-export with a larger --max-context-length"
            )
        for start in range(0, len(tokens), self.info.seq_len):
            chunk = tokens[start:start + self.info.seq_len]
            ids = torch.tensor([chunk], dtype=torch.long)
            positions = torch.arange(self.position, self.position + len(chunk), dtype=torch.long)
            logits = self._forward.execute([ids, positions])[0]
            self.position += len(chunk)
        return logits.reshape(-1)

    def planned_bytes(self) -> int:
        """The memory the runtime reserves for ``forward`` (activations and KV caches), as the
        program's own memory plan states it (the Python bindings do not expose it)."""
        return program_file.planned_bytes(program_file.read_program(self.path)[0])
