"""Load a .pte through the ExecuTorch runtime and drive it: metadata, fixed forward, KV steps."""

from __future__ import annotations

import io
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import executorch.kernels.quantized  # noqa: F401  kernels for the quantized embeddings
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  kernels for llama::update_cache, custom_sdpa

from . import preflight, program_file
from .options import KV
from .metadata import PREFIX, ProgramInfo
from .progress import UserError, human_bytes

# ExecuTorch's Python bindings send the runtime's log to sys.stderr while each of their calls runs
# (pybind11's stream redirect), with no level switch: the minimum level (Info) is fixed when the
# library is built. The thread pool, created by the first call that needs it (loading an XNNPACK
# method, or the first run of a portable one), probes for performance cores
# (extension/threadpool/cpuinfo_utils.cpp) and reports at Info level the ARM identification files
# it could not read: five lines on any x86 machine. Those are dropped; any other line is kept.
THREAD_POOL_NOTES = re.compile(r"\[cpuinfo_utils\.cpp:\d+\] (Reading file |Failed to open midr file |CPU info and manual "
                               r"query|Number of efficient cores|Total number of cores must be larger)")
# How the runtime says it ran out of memory (measured under a lowered RLIMIT_AS): XNNPACK cannot
# allocate its packed weights, the program cannot be mapped, an allocation failed.
OUT_OF_MEMORY = re.compile(r"xnn_status_out_of_memory|Failed to map|MemoryAllocationFailed")
LOG_LINE_PREFIX = re.compile(r"^\[[\w.]+:\d+\] ")
# The Python bindings copy each output with torch's clone, a parallel copy for the logits, after which
# torch's OpenMP worker spins for the next parallel region on a core the program's own thread pool
# needs (7.5 CPU ms a token, docs/benchmarks.md, "Where decode time goes at depth"). This project's
# attention kernel and XNNPACK run on ExecuTorch's thread pool, so a program using the kernel makes
# its calls with one torch thread: 4-layer E2B-width program, AMD Zen 4, decode 1.3x (at full depth,
# whose calls are three times longer, within the noise). ExecuTorch's
# own attention kernel runs on torch's threads (one thread: decode 0.53x), so those programs keep them.
TORCH_THREADS_BY_ATTENTION_KERNEL = {"gemma3n": 1}


class RuntimeLog(io.TextIOBase):
    """What the runtime writes to sys.stderr during a call, shown when the call returns."""

    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def take_lines(self) -> list[str]:
        """The lines worth showing; taken, they are not shown again."""
        lines = [line for line in self.text.splitlines() if line.strip() and not THREAD_POOL_NOTES.match(line)]
        self.text = ""
        return lines


@contextmanager
def runtime_log():
    log, shown = RuntimeLog(), sys.stderr
    try:
        sys.stderr = log
        yield log
    finally:
        sys.stderr = shown
        for line in log.take_lines():
            print(line, file=shown)


@contextmanager
def torch_threads(count: int | None):
    """torch's intra-op threads set to ``count`` while the context lasts (None: left alone)."""
    if count is None:
        yield
        return
    kept = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(kept)


class Program:
    """An exported Gemma 3n program loaded through ``executorch.runtime``."""

    def __init__(self, path: Path | str):
        from executorch.runtime import Runtime, Verification

        self.path = Path(path)
        preflight.check_program_file(self.path)
        with runtime_log() as log:
            try:
                self._program = Runtime.get().load_program(self.path, verification=Verification.InternalConsistency)
                # The gathered tables are read one row per token: without this advice the kernel reads
                # and maps around every row (program_file.advise_random_access).
                program_file.advise_random_access(self.path)
                self.method_names = sorted(self._program.method_names)
                missing = [name for name in ProgramInfo.required_method_names() if name not in self.method_names]
                if missing:
                    raise UserError(f"{self.path}: no {missing[0]} metadata; it was not exported by this tool")
                self.info = ProgramInfo(**{name[len(PREFIX):]: self.constant(name)
                                           for name in ProgramInfo.method_names() if name in self.method_names})
                if self.info.attention_kernel == "gemma3n":
                    from . import kernel

                    kernel.load_runtime_kernel()
                self.torch_threads = TORCH_THREADS_BY_ATTENTION_KERNEL.get(self.info.attention_kernel)
                self._forward = self._program.load_method("forward")  # XNNPACK packs its weights here
            except (MemoryError, RuntimeError) as error:
                raise self.load_error(error, log.take_lines()) from None
        self.position = 0  # kv mode: tokens already in the cache

    def load_error(self, error: Exception, runtime_log: list[str]) -> UserError:
        """One line for a failed load: the runtime's first line says why, the rest how it propagated."""
        cause = LOG_LINE_PREFIX.sub("", runtime_log[0]) if runtime_log else ""
        if isinstance(error, MemoryError) or any(OUT_OF_MEMORY.search(line) for line in runtime_log):
            return UserError(f"{self.path}: not enough memory to load it ({human_bytes(self.path.stat().st_size)}"
                             f"{'; ' + cause if cause else ''}); close other programs, or export a smaller one "
                             "(--quantize 8da4w, a shorter --max-context-length)")
        return UserError(f"{self.path}: the ExecuTorch runtime cannot load it ({error}{': ' + cause if cause else ''}); "
                         "re-export it")

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

    def execute(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with runtime_log(), torch_threads(self.torch_threads):
            return self._forward.execute(inputs)

    def forward_fixed(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.check_token_ids(input_ids)
        return self.execute([input_ids])[0]

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
            logits = self.execute([ids, positions])[0]
            self.position += len(chunk)
        return logits.reshape(-1)

    def planned_bytes(self) -> int:
        """The memory the runtime reserves for ``forward`` (activations and KV caches), as the
        program's own memory plan states it (the Python bindings do not expose it)."""
        return program_file.planned_bytes(program_file.read_program(self.path)[0])
