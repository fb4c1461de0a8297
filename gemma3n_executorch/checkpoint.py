"""Load the Gemma 3n text decoder (language model + tied lm_head), and nothing else.

Accepts the published multimodal layout (``model_type: gemma3n``, weights under
``model.language_model.*`` beside the vision and audio towers) and a text-only layout
(``model_type: gemma3n_text``). The towers are never built: only the text config is
instantiated and only text weights are read, so ``timm`` is not needed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
from transformers.utils import logging as hf_logging

from .progress import UserError
from .variants import TINY_MODEL, Variant

MULTIMODAL_MODEL_TYPE = "gemma3n"
TEXT_MODEL_TYPE = "gemma3n_text"
# Multimodal checkpoints nest the decoder one level deeper than Gemma3nForCausalLM expects.
TEXT_KEY_MAPPING = {r"^model\.language_model\.": "model."}
# Hugging Face's own attention code (softmax in fp32), not torch SDPA: it exports as plain ops, and
# the exported program's reference is then the same math. Measured on tiny E4B in bf16: argmax
# agreement of the program with eager rises from 0.94 (SDPA) to 0.965.
ATTENTION = "eager"
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json"]


@dataclass
class LoadedModel:
    model: Gemma3nForCausalLM
    source: str  # "tiny", a hub id or a directory
    directory: Path | None  # where tokenizer files can be found; None for the tiny model

    @property
    def config(self) -> Gemma3nTextConfig:
        return self.model.config

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights with peaked logits, varied greedy text and no dead paths.

    Fresh Hugging Face initialisation zeroes AltUp's output scale (so the per-layer-input path
    contributes nothing) and gives near-uniform logits; a model whose residual stream drowns its
    layers decodes one token forever; one whose layers are too strong amplifies rounding so much
    that bf16 flips a tenth of its argmaxes. Either way tests would prove little. The scales below
    (matrices 0.5/sqrt(fan_in), norm scales 1 +- 0.1, embeddings std 0.125, final norm 8x) were
    chosen by measurement: tiny E2B greedily decodes 40 distinct tokens in 64, and eager bf16
    agrees with eager fp32 on the argmax at about 0.95-0.97 of positions.
    """
    generator = torch.Generator().manual_seed(seed)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if id(parameter) in embeddings:
                value = noise * 0.125
            elif parameter.dim() >= 2:
                value = noise * 0.5 * parameter.shape[-1] ** -0.5
            else:
                value = 1.0 + 0.1 * noise
            parameter.copy_(value.to(parameter.dtype))
        model.model.norm.weight.mul_(8.0)


def build_tiny(variant: Variant, dtype: torch.dtype = torch.float32, seed: int = 0) -> Gemma3nForCausalLM:
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**variant.tiny_config))
    randomize_(model, seed)
    model.set_attn_implementation(ATTENTION)
    return model.to(dtype).eval()


def text_config_from(config: dict, where: str) -> Gemma3nTextConfig:
    model_type = config.get("model_type")
    if model_type == MULTIMODAL_MODEL_TYPE:
        if "text_config" not in config:
            raise UserError(f"{where}: model_type gemma3n without a text_config; is the config.json complete?")
        config = config["text_config"]
    elif model_type != TEXT_MODEL_TYPE:
        raise UserError(
            f"{where}: model_type {model_type!r} is not Gemma 3n "
            f"(expected {MULTIMODAL_MODEL_TYPE!r} or {TEXT_MODEL_TYPE!r}); pass a Gemma 3n checkpoint"
        )
    return Gemma3nTextConfig.from_dict({k: v for k, v in config.items() if k != "model_type"})


def _looks_like_hub_id(model: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) is not None


def resolve_directory(model: str) -> Path:
    """A local checkpoint directory, downloading from the hub when ``model`` is a hub id."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {model}: not a directory; pass a checkpoint directory or a hub id")
        if not (path / "config.json").is_file():
            raise UserError(f"--model {model}: no config.json in that directory; pass a Hugging Face checkpoint directory")
        return path
    if not _looks_like_hub_id(model):
        raise UserError(f"--model {model}: no such directory; pass a checkpoint directory, a hub id, or 'tiny'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=HUB_FILES))
    except Exception as error:  # the hub client raises many types; all mean "cannot get it"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--model {model}: no such local directory, and the Hugging Face hub download failed ({reason}). "
            "Gemma checkpoints are gated: accept the license on the model page, run `hf auth login`, "
            "or pass a local directory"
        ) from None


def load(model: str, variant: Variant, dtype: torch.dtype) -> LoadedModel:
    if model == TINY_MODEL:
        return LoadedModel(build_tiny(variant, dtype), TINY_MODEL, None)
    directory = resolve_directory(model)
    config_path = directory / "config.json"
    try:
        raw_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from None
    text_config = text_config_from(raw_config, str(config_path))
    if not any(directory.glob("*.safetensors")):
        raise UserError(f"--model {model}: no *.safetensors weights in {directory}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the towers' weights are "unexpected" by design
    try:
        text_model = Gemma3nForCausalLM.from_pretrained(
            directory, config=text_config, dtype=dtype, key_mapping=TEXT_KEY_MAPPING, attn_implementation=ATTENTION
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return LoadedModel(text_model.eval(), model, directory)
