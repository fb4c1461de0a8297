"""Write tiny random-weight checkpoints in the two layouts users have on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gemma3n_executorch.tiny_tokenizer import write_tiny_tokenizer


def _text_state_dict(model) -> dict[str, torch.Tensor]:
    # lm_head is tied to embed_tokens; the published checkpoints store it once.
    return {k: v.contiguous().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def write_text_only(model, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["model_type"] = "gemma3n_text"
    (directory / "config.json").write_text(json.dumps(config))
    save_file(_text_state_dict(model), str(directory / "model.safetensors"))
    write_tiny_tokenizer(directory)
    return directory


def write_multimodal(model, directory: Path) -> Path:
    """The published layout: decoder under model.language_model.*, towers beside it, and
    k_proj/v_proj/k_norm for the KV-shared layers, which transformers 5.23 no longer builds."""
    directory.mkdir(parents=True, exist_ok=True)
    text_config = model.config.to_dict()
    text_config["model_type"] = "gemma3n_text"
    config = {
        "model_type": "gemma3n",
        "architectures": ["Gemma3nForConditionalGeneration"],
        "text_config": text_config,
        "vision_config": {"model_type": "gemma3n_vision", "architecture": "mobilenetv5_300m_enc"},
        "audio_config": {"model_type": "gemma3n_audio"},
    }
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in _text_state_dict(model).items()}
    generator = torch.Generator().manual_seed(1)
    hidden, kv_width = model.config.hidden_size, model.config.num_key_value_heads * model.config.head_dim
    for index, layer in enumerate(model.model.layers):
        if layer.self_attn.is_kv_shared_layer:
            prefix = f"model.language_model.layers.{index}.self_attn."
            tensors[prefix + "k_proj.weight"] = torch.randn(kv_width, hidden, generator=generator)
            tensors[prefix + "v_proj.weight"] = torch.randn(kv_width, hidden, generator=generator)
            tensors[prefix + "k_norm.weight"] = torch.randn(model.config.head_dim, generator=generator)
    for name in ("vision_tower.timm_model.conv_stem.conv.weight", "audio_tower.conformer.0.ffw.weight",
                 "embed_vision.embedding.weight", "embed_audio.embedding.weight"):
        tensors[f"model.{name}"] = torch.randn(8, 8, generator=generator)
    half = len(tensors) // 2
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k].to(model.dtype) for k in keys}, str(directory / shard))
        weight_map.update({k: shard for k in keys})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tiny_tokenizer(directory)
    return directory
