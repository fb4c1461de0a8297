"""The configurations a run compares: the names --configs takes, the export options each stands
for, and the random-weight model and prompt every one of them is measured on."""

from __future__ import annotations

import dataclasses

from .. import litertlm, slicing
from ..options import (ATTENTION_KERNELS, BACKENDS, DEFAULT_GROUP_SIZE, DTYPES, EMBEDDING_SCHEMES, KV, KV_CACHE_DTYPES, LINEAR_SCHEMES,
                       resolve)
from ..progress import UserError
from ..variants import BOS_ID, TINY_MODEL, TRAINED_MODEL, VARIANTS

EAGER = {"eager-fp32": "fp32", "eager-bf16": "bf16"}
PHONE = "phone"  # the --mode kv defaults
LLAMA_CPP = "llamacpp-q4_0"
LITERT_LM_CONFIGS = litertlm.RECIPES  # named after the litert-torch recipe each converts with
DEFAULT_CONFIGS = ["eager-fp32", "eager-bf16", PHONE]


def parse_config(name: str, model: str, max_seq_length: int, max_context_length: int):
    """'xnnpack-8da4w-emb4w-g64' -> ExportOptions; 'phone' -> the --mode kv defaults;
    'phone-kvint8-attngemma3n-ctx2048' -> those with the named parts changed."""
    parts = name.split("-")
    if parts[0] == PHONE:
        chosen = dict(dtype=None, quantize=None, embeddings=None, backend=None, kv_cache=None)
        parts = parts[1:]
    else:
        chosen = dict(dtype=None, quantize="none", embeddings="none", backend=None, kv_cache="fp32")
    chosen.update(group_size=DEFAULT_GROUP_SIZE, seq_len=max_seq_length, context_len=max_context_length)
    matformer_slice = None
    for part in parts:
        if part in BACKENDS:
            chosen["backend"] = part
        elif part in DTYPES:
            chosen["dtype"] = part
        elif part in LINEAR_SCHEMES:
            chosen["quantize"] = part
        elif part.startswith("emb") and part[3:] in EMBEDDING_SCHEMES:
            chosen["embeddings"] = part[3:]
        elif part.startswith("kv") and part[2:] in KV_CACHE_DTYPES:
            chosen["kv_cache"] = part[2:]
        elif part.startswith("attn") and part[4:] in ATTENTION_KERNELS:
            chosen["attention_kernel"] = part[4:]
        elif part.startswith("g") and part[1:].isdigit():
            chosen["group_size"] = int(part[1:])
        elif part.startswith("ctx") and part[3:].isdigit():
            chosen["context_len"] = int(part[3:])
        elif part.startswith("chunk") and part[5:].isdigit():
            chosen["seq_len"] = int(part[5:])
        elif part.startswith("slice"):  # sliceE2.49B_block: --slice E2.49B-block ("-" separates the parts)
            cut = part[5:].replace("_", "-")
            try:
                matformer_slice = slicing.request(cut, None, None)
            except ValueError as error:
                raise UserError(f"--configs {name}: {error}") from None
        else:
            raise UserError(f"--configs: {part!r} in {name!r} is not a backend {BACKENDS}, dtype {DTYPES}, "
                            f"linear scheme {LINEAR_SCHEMES}, emb{{8w,4w}}, kv{{fp32,int8}}, "
                            f"attn{{{','.join(ATTENTION_KERNELS)}}}, gN, ctxN, chunkN or sliceNAME (E4B: "
                            "a --slice name, '_' for '-')")
    phone = name.split("-")[0] == PHONE
    if not phone and chosen["backend"] is None and chosen["quantize"] != "8da4w" and chosen["embeddings"] == "none":
        chosen["backend"] = "portable"
    if not phone:
        chosen["dtype"] = chosen["dtype"] or "fp32"
    try:
        return dataclasses.replace(resolve(KV, model=model, **chosen), matformer_slice=matformer_slice)
    except ValueError as error:
        raise UserError(f"--configs {name}: {error}") from None


def build_model(args, dtype: str | None, attention: str | None = None):
    """The model --model names (the real architecture with random weights, or a built-in one) in
    ``dtype``, or with None as a checkpoint would store it (the exporter casts it while quantizing,
    as it does a real checkpoint)."""
    import torch

    from .. import checkpoint

    variant = VARIANTS[args.variant]
    torch_dtype = dtype and checkpoint.TORCH_DTYPES[dtype]
    if args.model == TINY_MODEL:
        model = checkpoint.build_tiny(variant, torch_dtype or torch.float32)
    elif args.model == TRAINED_MODEL:
        model = checkpoint.load(TRAINED_MODEL, variant, torch_dtype).model
    else:
        model = checkpoint.build_random(variant, args.layers, torch_dtype, attention or checkpoint.ATTENTION)
    if attention:
        model.set_attn_implementation(attention)
    return model


def model_config(args) -> dict:
    """The architecture --model names, without building it."""
    variant = VARIANTS[args.variant]
    return {TINY_MODEL: variant.tiny_config, TRAINED_MODEL: variant.trained_config}.get(
        args.model) or variant.real_text_config(args.layers)


def prompt_tokens(args, vocab_size: int) -> list[int]:
    from ..parity import probe_tokens

    return probe_tokens(args.prompt_len, vocab_size, BOS_ID)


def parameter_count(args) -> int:
    """Of the random model of the real architecture at --layers (counted without building it)."""
    import torch
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    config = VARIANTS[args.variant].real_text_config(args.layers)
    config.pop("model_type", None), config.pop("torch_dtype", None)
    with torch.device("meta"):
        return sum(p.numel() for p in Gemma3nForCausalLM(Gemma3nTextConfig(**config)).parameters())
