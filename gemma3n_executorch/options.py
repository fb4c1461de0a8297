"""The export options, their vocabulary and which combinations work: one place, importable
without any ML library."""

from __future__ import annotations

from dataclasses import dataclass

FIXED, KV = "fixed", "kv"
MODES = (FIXED, KV)
DTYPES = ("fp32", "bf16", "fp16")
# int8: weight-only int8 (portable kernels). 8da4w: int8 dynamic activations x int4 grouped weights
# (XNNPACK kernels).
LINEAR_SCHEMES = ("none", "int8", "8da4w")
# Weight-only int8 / int4 with one scale per row, for the token embedding and the per-layer table;
# the tied lm_head gets the same bit width (see quantize.py).
EMBEDDING_SCHEMES = ("none", "8w", "4w")
BACKENDS = ("portable", "xnnpack")
# The KV cache's precision (kv mode; tasks.KV_CACHE_DTYPES has one cache class for each).
KV_CACHE_DTYPES = ("fp32", "fp16", "int8")
# What runs the full-attention layers' attention (kv mode): ExecuTorch's llama::custom_sdpa, which any
# ExecuTorch 1.4.1 runtime has, or this project's gemma3n::gqa_attention (gemma3n_executorch/kernel),
# which reads each KV head once for the query heads sharing it and which the runtime must load.
ATTENTION_KERNELS = ("executorch", "gemma3n")
DEFAULT_GROUP_SIZE = 128  # measured: faster on XNNPACK than 32 (docs/benchmarks.md), and smaller
PER_CHANNEL = 0  # --group-size 0: one int4 scale per output channel (XNNPACK's fastest 4-bit kernels)
# XNNPACK's grouped 4-bit kernels take groups of a multiple of 32 weights (a group of 16 lowers,
# then fails inside XNNPACK); so does its dynamically quantized per-channel matmul for the inputs.
XNNPACK_GROUP_MULTIPLE = 32

# --mode fixed keeps the original project's contract; --mode kv defaults are the phone recipe,
# chosen by measurement (docs/benchmarks.md).
MODE_DEFAULTS = {
    FIXED: dict(dtype="bf16", quantize="none", embeddings="none", backend="portable"),
    KV: dict(dtype="fp32", quantize="8da4w", embeddings="4w", backend="xnnpack", kv_cache="fp32"),
}
DEFAULT_SEQ_LEN = 32  # fixed: the window
# kv: tokens one call takes (ExecuTorch's max_seq_length and its default; longer prompts are fed in
# chunks of it) and positions the cache holds (max_context_length): LiteRT-LM's Gemma 3n context,
# 109 MB of fp32 cache for E2B; docs/benchmarks.md says why not 32768 by default.
DEFAULT_MAX_SEQ_LENGTH = 128
DEFAULT_MAX_CONTEXT_LENGTH = 4096


@dataclass(frozen=True)
class ExportOptions:
    model: str
    mode: str
    dtype: str
    quantize: str
    embeddings: str
    group_size: int
    backend: str
    seq_len: int  # fixed: window length; kv: tokens per call (max_seq_length)
    context_len: int  # kv: positions the cache holds (max_context_length); fixed: the window
    kv_cache: str  # kv: KV_CACHE_DTYPES; fixed: "none"
    attention_kernel: str = ATTENTION_KERNELS[0]  # kv: ATTENTION_KERNELS; fixed: "none"
    # kv: no --max-context-length / --max-seq-length was given: a model with fewer positions lowers them
    context_is_default: bool = False
    seq_len_is_default: bool = False
    matformer_slice: object = None  # slicing.Slice: the part of the checkpoint to export; None: all of it

    @property
    def needs_xnnpack(self) -> bool:
        return self.quantize == "8da4w" or self.embeddings != "none"


def resolve(mode: str, dtype: str | None, quantize: str | None, embeddings: str | None, backend: str | None,
            group_size: int, model: str, seq_len: int | None, context_len: int | None = None,
            kv_cache: str | None = None, attention_kernel: str | None = None) -> ExportOptions:
    """Fill what was not given from the mode's defaults, so that an explicit choice pulls in what
    it needs (``--quantize 8da4w`` alone means XNNPACK and fp32); refuse combinations that have no
    kernels, with a message that says what to pass instead (ValueError)."""
    defaults = MODE_DEFAULTS[mode]
    quantize = quantize or defaults["quantize"]
    embeddings = embeddings or defaults["embeddings"]
    dynamic = quantize == "8da4w" or embeddings != "none"
    backend = backend or ("xnnpack" if dynamic else defaults["backend"])
    dtype = dtype or ("fp32" if dynamic else defaults["dtype"])
    if dynamic and backend != "xnnpack":
        raise ValueError("--quantize 8da4w and --quantize-embeddings 8w/4w run on XNNPACK kernels only: "
                         "add --backend xnnpack")
    if dynamic and dtype != "fp32":
        raise ValueError("--quantize 8da4w and --quantize-embeddings 8w/4w quantize fp32 activations: "
                         "use --dtype fp32")
    if quantize == "int8" and backend == "xnnpack":
        raise ValueError("--quantize int8 (weight-only) has no XNNPACK kernel: use --quantize 8da4w with "
                         "--backend xnnpack, or int8 with --backend portable")
    if group_size != PER_CHANNEL and (group_size < XNNPACK_GROUP_MULTIPLE or group_size % XNNPACK_GROUP_MULTIPLE):
        raise ValueError(f"--group-size must be a multiple of {XNNPACK_GROUP_MULTIPLE} (XNNPACK's 4-bit kernels need it; "
                         f"{DEFAULT_GROUP_SIZE} is the default), or {PER_CHANNEL} for one scale per output channel")
    context_is_default = False
    seq_len_is_default = mode == KV and seq_len is None
    seq_len = seq_len or (DEFAULT_MAX_SEQ_LENGTH if mode == KV else DEFAULT_SEQ_LEN)
    if mode == FIXED:
        context_len, kv_cache, attention_kernel = seq_len, "none", "none"
    else:
        context_is_default = context_len is None
        context_len = context_len or DEFAULT_MAX_CONTEXT_LENGTH
        kv_cache = kv_cache or defaults["kv_cache"]
        attention_kernel = attention_kernel or ATTENTION_KERNELS[0]
        if attention_kernel == "gemma3n" and dtype != "fp32":
            raise ValueError("--attention-kernel gemma3n attends with fp32 queries: use --dtype fp32")
        if kv_cache == "fp16" and attention_kernel != "gemma3n":
            raise ValueError("--kv-cache fp16 is read by this project's attention kernel only (ExecuTorch's would "
                             "widen the whole cache every token): add --attention-kernel gemma3n")
        if seq_len_is_default:
            seq_len = min(seq_len, context_len)
        if seq_len > context_len:
            raise ValueError(f"--max-seq-length {seq_len} (tokens per call) exceeds --max-context-length {context_len} "
                             "(positions the cache holds): lower it or raise the context")
    return ExportOptions(model=model, mode=mode, dtype=dtype, quantize=quantize, embeddings=embeddings,
                         group_size=group_size, backend=backend, seq_len=seq_len, context_len=context_len,
                         kv_cache=kv_cache, context_is_default=context_is_default,
                         seq_len_is_default=seq_len_is_default, attention_kernel=attention_kernel)
