"""ExecuTorch's stock LLM runner (``TextLLMRunner``, behind the demo apps) on an exported program,
and what it prints: the reference our text is compared with.

Its Python ``token_callback`` cannot be used on Gemma's vocabulary: the binding decodes each
piece to ``str`` and raises UnicodeDecodeError on a lone byte token. So the runner is run as an
app runs it, printing to standard output, and the bytes it printed are read back.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from pathlib import Path

import executorch.kernels.quantized  # noqa: F401  kernels for the quantized embeddings and int8 cache
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  llama:: kernels

from .generation import BYTE_TOKEN

STATISTICS = b"\nPyTorchObserver "  # the runner's report line follows the generated text
STOP_TEXTS = (b"<end_of_turn>", b"<eos>")  # the runner also prints the stop token it ends on


def printed(program: Path, tokenizer: Path, prompt: str, max_new_tokens: int) -> bytes:
    """What the runner prints for ``prompt`` (BOS added by the runner), greedy, without the
    statistics line and the stop token."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from . import kernel

    kernel.load_for_program(program)  # an app links it; here, the same process's registry
    runner = TextLLMRunner(str(program), str(tokenizer))
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 1)
        try:
            runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0,
                                                     num_bos=1))
        finally:
            ctypes.CDLL(None).fflush(None)  # the runner's last lines may still sit in C's stdout buffer
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        text = capture.read().split(STATISTICS)[0]
    text = text.removesuffix(b"\n")  # printed after the last token (text_llm_runner.cpp)
    for stop in STOP_TEXTS:
        text = text.removesuffix(stop)
    return text


def printed_for(tokenizer, tokens: list[int]) -> bytes:
    """What the runner prints for these tokens (ExecuTorch 1.4.1's ``safe_printf``): each piece's
    text, but for a byte token only a printable or white-space ASCII byte (C's isprint or
    isspace); any other byte, so every byte of a character spelled in byte tokens, is dropped."""
    pieces = []
    for token in tokens:
        piece = tokenizer.id_to_token(token)
        if BYTE_TOKEN.fullmatch(piece):
            value = bytes([int(piece[3:5], 16)])
            pieces.append(value if value.isascii() and (value.isspace() or 0x20 <= value[0] < 0x7F) else b"")
        else:
            pieces.append(tokenizer.decode([token], skip_special_tokens=False).encode())
    return b"".join(pieces)
