"""The export options and their vocabulary: one place, importable without any ML library."""

from __future__ import annotations

from dataclasses import dataclass

FIXED, KV = "fixed", "kv"
MODES = (FIXED, KV)
DTYPES = ("fp32", "bf16", "fp16")
LINEAR_SCHEMES = ("none", "int8", "8da4w")
EMBEDDING_SCHEMES = ("none", "8w", "4w")
BACKENDS = ("portable", "xnnpack")

# --mode fixed keeps the original project's contract; --mode kv defaults are chosen for phones.
MODE_DEFAULTS = {
    FIXED: dict(dtype="bf16", quantize="none", quantize_embeddings="none", backend="portable"),
    KV: dict(dtype="fp32", quantize="none", quantize_embeddings="none", backend="portable"),
}
DEFAULT_SEQ_LEN = 32
DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_GROUP_SIZE = 32


@dataclass(frozen=True)
class ExportOptions:
    model: str
    mode: str
    dtype: str
    quantize: str
    quantize_embeddings: str
    group_size: int
    backend: str
    seq_len: int  # fixed: window length; kv: max_seq_len
