"""Load the Gemma 3n text decoder (language model + tied lm_head), and nothing else.

Accepts the published multimodal layout (``model_type: gemma3n``, weights under
``model.language_model.*`` beside the vision and audio towers) and a text-only layout
(``model_type: gemma3n_text``). The towers are never built: only the text config is
instantiated and only text weights are read, so ``timm`` is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
from transformers.modeling_utils import local_torch_dtype
from transformers.utils import logging as hf_logging

from . import preflight, slicing
from .progress import UserError
from .slicing import Slice
from .variants import TINY_MODEL, Variant, identify_variant

# Multimodal checkpoints nest the decoder one level deeper than Gemma3nForCausalLM expects.
TEXT_KEY_MAPPING = {r"^model\.language_model\.": "model."}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # keys: options.DTYPES
STORED_DTYPE = torch.bfloat16  # how the published Gemma 3n checkpoints store their weights
# Hugging Face's own attention code (softmax in fp32), not torch SDPA: it exports as plain ops, and
# the exported program's reference is then the same math. Measured on tiny E4B in bf16: argmax
# agreement of the program with eager rises from 0.94 (SDPA) to 0.965.
ATTENTION = "eager"
# What the published multimodal checkpoints carry beyond the text decoder; the KV-shared layers'
# k/v projections are dropped by transformers itself (_keys_to_ignore_on_load_unexpected).
NON_TEXT_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json"]


@dataclass
class LoadedModel:
    model: Gemma3nForCausalLM
    source: str  # "tiny", a hub id or a directory
    directory: Path | None  # where tokenizer files can be found; None for the tiny model
    # Where the weights still on the meta device are read from (stored_weights.StoredWeights);
    # None: the model holds all of them.
    weights: object = None

    @property
    def config(self) -> Gemma3nTextConfig:
        return self.model.config

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


RANDOM_BLOCK_VALUES = 1 << 26


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights with peaked logits, varied greedy text and no dead paths.

    Fresh Hugging Face initialisation zeroes AltUp's output scale (so the per-layer-input path
    contributes nothing) and gives near-uniform logits; a model whose residual stream drowns its
    layers decodes one token forever; one whose layers are too strong amplifies rounding so much
    that bf16 flips a tenth of its argmaxes. Either way tests would prove little. The scales below
    were chosen by measurement: matrices 0.5/sqrt(fan_in), norm scales 1 +- 0.1, embeddings std
    0.125, final norm 4x (logits of std about 4, so fp32 rounding stays far below 1e-4). Tiny E2B
    then greedily decodes about 40 distinct tokens in 64.
    """
    with torch.no_grad():
        for name, start, value in random_blocks(model, seed):
            model.get_parameter(name)[start:start + len(value)].copy_(value)


def random_blocks(model: torch.nn.Module, seed: int = 0):
    """randomize_'s values, parameter by parameter (as named_parameters lists them) in blocks of
    rows: (name, first row, values in the parameter's dtype). The model may be on the meta device:
    a checkpoint of them can be written without the model ever being in memory."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, parameter in model.named_parameters():
        # Row blocks, so the real per-layer table (2 B values) never has an fp32 twin in memory.
        rows = max(1, RANDOM_BLOCK_VALUES // max(1, parameter[0].numel()))
        for start in range(0, len(parameter), rows):
            noise = torch.randn((min(rows, len(parameter) - start), *parameter.shape[1:]), generator=generator,
                                dtype=torch.float32)
            if id(parameter) in embeddings:
                value = noise * 0.125
            elif parameter.dim() >= 2:
                value = noise * 0.5 * parameter.shape[-1] ** -0.5
            else:
                value = 1.0 + 0.1 * noise
            value = value.to(parameter.dtype)
            yield name, start, value * 4.0 if name == "model.norm.weight" else value


def constructed_buffers(config: Gemma3nTextConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The buffers a model built in ``dtype`` computes at construction, got as transformers gets
    them when it loads a checkpoint: the model is built on the meta device (no memory for the
    weights), then only its buffers get storage, filled by the model's own initialisation."""
    with local_torch_dtype(dtype), torch.device("meta"):
        reference = Gemma3nForCausalLM(config)
    for name, buffer in list(reference.named_buffers()):
        owner, _, attribute = name.rpartition(".")
        reference.get_submodule(owner)._buffers[attribute] = torch.empty_like(buffer, device="cpu")
    reference.initialize_weights()  # on the meta parameters it writes nothing
    return dict(reference.named_buffers())


def cast_(model: Gemma3nForCausalLM, dtype: torch.dtype) -> None:
    """Every floating-point tensor not yet quantized to ``dtype``, in place (tied weights stay tied).

    Buffers computed at construction (embedding and per-layer scales, the AltUp router scale, RoPE
    frequencies) are recomputed as a model built in ``dtype`` has them: a bf16 checkpoint cast to
    fp32 would otherwise keep them rounded to bf16 (about 1e-4 off Hugging Face's fp32 model).
    """
    for parameter in model.parameters():
        if type(parameter.data) is torch.Tensor and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
    constructed = constructed_buffers(model.config, dtype)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_floating_point():
            owner, _, attribute = name.rpartition(".")
            model.get_submodule(owner)._buffers[attribute] = constructed[name].to(dtype)


def build_tiny(variant: Variant, dtype: torch.dtype = torch.float32, seed: int = 0) -> Gemma3nForCausalLM:
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**variant.tiny_config))
    randomize_(model, seed)
    model.set_attn_implementation(ATTENTION)
    return model.to(dtype).eval()


def build_random(variant: Variant, layers: int | None = None, dtype: torch.dtype | None = None,
                 attention: str = ATTENTION, seed: int = 0, vocab_size: int | None = None) -> Gemma3nForCausalLM:
    """A random-weight model of the real architecture (optionally cut to ``layers``): what it
    costs to run does not depend on the weights' values. Generated in bf16, as the published
    checkpoints are stored (E4B in fp32 would not fit in 24 GB), then cast to ``dtype`` if given."""
    config = variant.real_text_config(layers)
    config.pop("model_type", None), config.pop("torch_dtype", None)
    if vocab_size is not None:  # profiling runs: per-layer costs without the huge tables
        config.update(vocab_size=vocab_size, vocab_size_per_layer_input=vocab_size)
    model = Gemma3nForCausalLM._from_config(Gemma3nTextConfig(**config), dtype=STORED_DTYPE)
    randomize_(model, seed)
    model.set_attn_implementation(attention)
    if dtype is not None:
        cast_(model, dtype)
    return model.eval()


def resolve_directory(model: str) -> Path:
    """A local checkpoint directory, downloading from the hub when ``model`` is a hub id."""
    directory = preflight.local_checkpoint(model)
    if directory is not None:
        return directory
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=HUB_FILES))
    except Exception as error:  # the hub client raises many types; all mean "cannot get it"
        reason = one_line(error)
        raise UserError(
            f"--model {model}: no such local directory, and the Hugging Face hub download failed ({reason}). "
            "Gemma checkpoints are gated: accept the license on the model page, run `hf auth login`, "
            "or pass a local directory"
        ) from None


def read_config(model: str, variant: Variant, cut: Slice | None = None) -> tuple[Path | None, Gemma3nTextConfig]:
    """The checkpoint's directory (downloaded when ``model`` is a hub id; None for the tiny model)
    and its text config, checked against ``variant`` and, given one, the slice ``cut`` (the config
    returned is the whole model's): what can be refused before any weight is read."""
    if model == TINY_MODEL:
        config = Gemma3nTextConfig(**variant.tiny_config)
        if cut is not None:
            slicing.sliced_config(config.to_dict(), cut)
        return None, config
    directory = resolve_directory(model)
    config = preflight.text_config(directory)
    check_variant(model, config, variant)
    if cut is not None:
        slicing.sliced_config(config, cut)
    try:
        return directory, Gemma3nTextConfig.from_dict(config)
    except (TypeError, ValueError, KeyError) as error:
        raise UserError(f"--model {model}: config.json is not a valid Gemma 3n text config ({error})") from None


def load(model: str, variant: Variant, dtype: torch.dtype | None = None, cut: Slice | None = None) -> LoadedModel:
    """The text decoder in ``dtype``, or with None as its checkpoint stores it (the published ones:
    bf16), for ``quantize.apply`` to bring to the export dtype one module at a time, so that the
    wider copy (fp32 E4B: 27.5 GB) never exists whole; with ``cut``, that slice of it (slicing.py)."""
    loaded = load_whole(model, variant, dtype, cut)
    if cut is not None:
        slicing.apply(loaded, cut)
    return loaded


def load_whole(model: str, variant: Variant, dtype: torch.dtype | None, cut: Slice | None) -> LoadedModel:
    if model == TINY_MODEL:
        read_config(model, variant, cut)
        return LoadedModel(build_tiny(variant, dtype or torch.float32), TINY_MODEL, None)
    directory, text_config = read_config(model, variant, cut)
    if not any(directory.glob("*.safetensors")):
        raise UserError(f"--model {model}: no *.safetensors weights in {directory}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # our own check below reports what matters, in one line
    hf_logging.disable_progress_bar()
    try:
        text_model, report = Gemma3nForCausalLM.from_pretrained(
            directory, config=text_config, dtype=dtype or "auto", key_mapping=TEXT_KEY_MAPPING,
            attn_implementation=ATTENTION, output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported by name below instead of as a RuntimeError
        )
    except (SafetensorError, OSError) as error:
        raise UserError(f"--model {model}: cannot read the weights in {directory} ({one_line(error)}); "
                        "the download is incomplete or corrupt: download the checkpoint again") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    check_loading_report(model, report)
    return LoadedModel(text_model.eval(), model, directory)


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_variant(model: str, config: dict, variant: Variant) -> None:
    """A checkpoint of the other variant's shape would be exported under this variant's name."""
    found = identify_variant(config)
    if found is not None and found is not variant:
        raise UserError(f"--model {model}: a Gemma 3n {found.name} checkpoint ({config['num_hidden_layers']} layers), "
                        f"not {variant.name}; pass a {variant.name} checkpoint, or export it with {found.key}/export.py")


def check_loading_report(model: str, report: dict) -> None:
    """Refuse a checkpoint that lacks a tensor (transformers would initialise it at random and
    the program would compute something else without a word), has one of the wrong shape, or
    carries tensors the published checkpoints do not."""
    if report["mismatched_keys"]:
        name, stored, expected = sorted(report["mismatched_keys"])[0]
        raise UserError(f"--model {model}: tensor {name} has shape {list(stored)} in the checkpoint but the config "
                        f"needs {list(expected)}; the weights do not belong to this config.json")
    if report["missing_keys"]:
        missing = sorted(report["missing_keys"])
        raise UserError(f"--model {model}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]}; "
                        "the download is incomplete or the checkpoint is not a whole Gemma 3n: download it again")
    unknown = sorted(key for key in report["unexpected_keys"] if not key.startswith(NON_TEXT_PREFIXES))
    if unknown:
        raise UserError(f"--model {model}: {len(unknown)} tensor(s) that are not part of Gemma 3n, e.g. {unknown[0]}; "
                        "pass an unmodified Gemma 3n checkpoint")
