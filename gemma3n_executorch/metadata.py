"""The metadata embedded in every program as ExecuTorch constant methods: the one list of keys.

The runner keys are the names ExecuTorch's stock LLM runner (``TextLLMRunner``) reads; the
``gemma3n_*`` keys are ours, so ``validate.py`` and ``generate.py`` know what to expect without
flags.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from .variants import BOS_ID, STOP_IDS

# Read by executorch.extension.llm.runner.TextLLMRunner.
RUNNER_MAX_SEQ_LEN = "get_max_seq_len"
RUNNER_MAX_CONTEXT_LEN = "get_max_context_len"
RUNNER_VOCAB_SIZE = "get_vocab_size"
RUNNER_BOS_ID = "get_bos_id"
RUNNER_EOS_IDS = "get_eos_ids"
RUNNER_USE_KV_CACHE = "use_kv_cache"
RUNNER_DYNAMIC_SHAPE = "enable_dynamic_shape"

PREFIX = "gemma3n_"


@dataclass(frozen=True)
class ProgramInfo:
    """What a program is; stored under ``gemma3n_<field>`` constant methods."""

    variant: str  # "E2B" / "E4B"
    source: str  # "tiny", a hub id or a directory
    mode: str  # "fixed" / "kv"
    seq_len: int  # fixed: the window; kv: max_seq_length, the most tokens one call takes
    context_len: int  # kv: max_context_length, the positions the cache holds; fixed: the window
    kv_cache: str  # kv: the cache's precision (options.KV_CACHE_DTYPES); fixed: "none"
    attention_kernel: str  # kv: what runs full attention (options.ATTENTION_KERNELS); fixed: "none"
    vocab_size: int
    dtype: str  # "fp32" / "bf16" / "fp16"
    quantize: str  # linear layers: options.LINEAR_SCHEMES
    embeddings: str  # embeddings and tied lm_head: options.EMBEDDING_SCHEMES
    group_size: int  # weights per int4 scale
    backend: str  # options.BACKENDS
    # slicing.Slice.spec() of the MatFormer slice taken from the checkpoint; "none": all of it. Absent
    # from programs exported before slicing existed, hence the default.
    matformer_slice: str = "none"

    def constant_methods(self) -> dict:
        methods = {PREFIX + name: value for name, value in asdict(self).items()}
        if self.mode == "kv":
            methods.update({
                RUNNER_MAX_SEQ_LEN: self.seq_len,
                RUNNER_MAX_CONTEXT_LEN: self.context_len,
                RUNNER_VOCAB_SIZE: self.vocab_size,
                RUNNER_BOS_ID: BOS_ID,
                RUNNER_EOS_IDS: list(STOP_IDS),
                RUNNER_USE_KV_CACHE: True,
                RUNNER_DYNAMIC_SHAPE: True,
            })
        return methods

    @classmethod
    def method_names(cls) -> list[str]:
        return [PREFIX + f.name for f in fields(cls)]

    @classmethod
    def required_method_names(cls) -> list[str]:
        return [PREFIX + f.name for f in fields(cls) if f.default is MISSING]
