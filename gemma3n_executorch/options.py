"""The export options and their vocabulary: one place, importable without any ML library."""

from __future__ import annotations

from dataclasses import dataclass

FIXED, KV = "fixed", "kv"
MODES = (FIXED, KV)
DTYPES = ("fp32", "bf16", "fp16")
LINEAR_SCHEMES = ("none", "int8")
BACKENDS = ("portable",)

# --mode fixed keeps the original project's contract; --mode kv defaults are chosen for phones.
MODE_DEFAULTS = {
    FIXED: dict(dtype="bf16", quantize="none", backend="portable"),
    KV: dict(dtype="fp32", quantize="none", backend="portable"),
}
DEFAULT_SEQ_LEN = 32
DEFAULT_MAX_SEQ_LEN = 2048


@dataclass(frozen=True)
class ExportOptions:
    model: str
    mode: str
    dtype: str
    quantize: str
    backend: str
    seq_len: int  # fixed: window length; kv: max_seq_len
