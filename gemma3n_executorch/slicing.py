"""MatFormer slicing (Mix-n-Match): a smaller Gemma 3n cut out of E4B's nested weights.

E4B was trained so that smaller models nest in it: each layer's MLP works on its first k neurons
alone, and some of the layers that reuse other layers' KV can be dropped. Google publishes 16 such
configurations between "official E2B" (1.91 B effective parameters) and E4B itself (3.98 B), with
their MMLU accuracy: architectures/e4b-slicing-configs.csv, the dataset google/gemma3n-slicing-configs
(configs.csv) as mistral.rs carries it (matformer_configs/gemma3n.csv). Its FFN widths are written
as multiples of E4B's hidden size (``2_048 * 4``), which is how they are read here, so the same
table slices the tiny E4B-shaped test models.

What a slice changes, checked against transformers 5.23's Gemma 3n (tests/test_slicing.py):
- skipped layers' tensors go and the kept ones are renumbered. The last layer of each attention
  type before the KV-sharing layers (E4B: 18 and 19) computes the KV those layers read, so it
  cannot be skipped; num_kv_shared_layers drops by the sharing layers skipped;
- each kept layer's MLP keeps its first k neurons: gate_proj and up_proj rows, down_proj columns;
  intermediate_size becomes the list of the kept layers' k;
- the per-layer inputs keep the kept layers' 256-wide slots: columns of embed_tokens_per_layer,
  rows of per_layer_model_projection;
- layer_types and activation_sparsity_pattern keep the kept layers' own entries (Google's notebook
  and mistral.rs rebuild the pattern as 0.95 on the first 10 minus the skipped among them, the
  same thing for E4B, whose sparse layers are a prefix; Google's notebook forgets layer_types,
  which transformers 5.23 then refuses).
The slice is taken after the checkpoint is read, one tensor at a time, freeing each full tensor
as its slice is made: no second copy of the model exists.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .progress import UserError

TABLE = Path(__file__).resolve().parent / "architectures" / "e4b-slicing-configs.csv"
CUSTOM = "custom"


@dataclass(frozen=True)
class Slice:
    """Which layers to drop (indices in the full model) and the MLP width of each kept layer."""

    name: str  # a key of published_slices(), or CUSTOM
    skipped: tuple[int, ...]
    ffn: tuple[int, ...] | None  # absolute widths; None: the table's multiples of the hidden size
    ffn_multiples: tuple[int, ...] | None = None

    def widths(self, hidden_size: int) -> list[int]:
        return list(self.ffn) if self.ffn is not None else [m * hidden_size for m in self.ffn_multiples]

    def spec(self, sliced_config) -> str:
        """What the metadata of a program of this slice (whose config is ``sliced_config``) records:
        enough to cut the same slice again, each kept layer's width spelled out."""
        return json.dumps({"name": self.name, "skipped": list(self.skipped),
                           "ffn": list(sliced_config.intermediate_size)}, separators=(",", ":"))


@dataclass(frozen=True)
class PublishedSlice:
    title: str  # as Google names it
    layers: int
    effective_params_b: float
    mmlu_pt: float  # percent, Google's figure for the pretrained model
    slice: Slice


def key_for(title: str) -> str:
    """Short names for the command line: E4B, E2B, E2.49B-block, E1.96B-layer..."""
    if title == "Main model":
        return "E4B"
    if title == "Config for official E2B Model":
        return "E2B"
    match = re.fullmatch(r"Config for (E[\d.]+B) \((block|layer)-level\)", title)
    if match is None:
        raise ValueError(f"{TABLE.name}: unexpected configuration name {title!r}")
    return f"{match[1]}-{match[2]}"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", text or ""))


def published_slices() -> dict[str, PublishedSlice]:
    slices = {}
    with TABLE.open(newline="") as table:
        for row in csv.DictReader(table):
            key = key_for(row["name"])
            multiples = tuple(int(m) for m in re.findall(r"2_048 \* (\d+)", row["FFN Hidden Dims"]))
            slices[key] = PublishedSlice(row["name"], int(row["# Layers"]), float(row["# Effective Params (B)"]),
                                         float(row["MMLU PT accuracy"].rstrip("%")),
                                         Slice(key, _ints(row["Layers Skipped"]), None, multiples))
    return slices


def parse_list(flag: str, text: str) -> tuple[int, ...]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        raise ValueError(f"{flag} takes a comma-separated list of non-negative integers, e.g. 8192,8192,16384")
    return tuple(int(item) for item in items)


def request(name: str | None, ffn: str | None, skip: str | None) -> Slice | None:
    """The slice the flags ask for, checked for what needs no model (ValueError)."""
    if name is not None:
        if ffn is not None or skip is not None:
            raise ValueError("--slice names a published configuration; --slice-ffn and --skip-layers make a custom "
                             "one: pass one or the other")
        slices = published_slices()
        if name not in slices:
            raise ValueError(f"--slice {name}: not a published configuration; choose from {', '.join(slices)}")
        return slices[name].slice
    if ffn is None and skip is None:
        return None
    if ffn is None:
        raise ValueError("--skip-layers needs --slice-ffn: the MLP width of each kept layer (one value for all)")
    return Slice(CUSTOM, tuple(sorted(set(parse_list("--skip-layers", skip)))) if skip else (),
                 parse_list("--slice-ffn", ffn))


def from_spec(spec: str) -> Slice | None:
    """The slice a program's metadata records ("none": the whole model)."""
    if spec in ("", "none"):
        return None
    fields = json.loads(spec)
    return Slice(fields["name"], tuple(fields["skipped"]), tuple(fields["ffn"]))


def producers(config: dict) -> list[int]:
    """The layers whose KV the sharing layers read: the last layer of each attention type before them."""
    first_shared = config["num_hidden_layers"] - config["num_kv_shared_layers"]
    if config["num_kv_shared_layers"] == 0:
        return []
    owners = config["layer_types"][:first_shared]
    return sorted(first_shared - 1 - owners[::-1].index(kind) for kind in set(owners))


def sliced_config(config: dict, cut: Slice) -> dict:
    """The text config of ``cut`` taken from a model of ``config``; UserError for an invalid slice."""
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    named = cut.name != CUSTOM
    label = skip_label = width_label = f"--slice {cut.name}"
    if not named:
        skip_label, width_label = "--skip-layers", "--slice-ffn"
    widths = config["intermediate_size"]
    widths = widths if isinstance(widths, list) else [widths] * layers
    if cut.ffn_multiples is not None and layers - len(cut.skipped) != len(cut.ffn_multiples):
        raise UserError(f"{label} is defined for E4B's 35 layers, and this model has {layers}: "
                        "pass --slice-ffn and --skip-layers for a custom slice")
    outside = [i for i in cut.skipped if i >= layers]
    if outside:
        raise UserError(f"{skip_label}: layer {outside[0]} does not exist (the model has layers 0-{layers - 1})")
    reserved = sorted(set(cut.skipped) & set(producers(config)))
    if reserved:
        raise UserError(f"{skip_label}: layer {reserved[0]} cannot be skipped: the KV-sharing layers read its KV "
                        f"(such layers here: {', '.join(map(str, producers(config)))})")
    kept = [i for i in range(layers) if i not in cut.skipped]
    ffn = cut.widths(hidden)
    if len(ffn) == 1:
        ffn = ffn * len(kept)
    if len(ffn) != len(kept):
        raise UserError(f"--slice-ffn has {len(ffn)} widths for {len(kept)} kept layers: give one per kept layer, "
                        "or one for all")
    for index, (layer, width) in enumerate(zip(kept, ffn)):
        if not 0 < width <= widths[layer]:
            raise UserError(f"{width_label}: MLP width {width} for layer {layer} (kept layer {index}); the model's is "
                            f"{widths[layer]}: pass a width between 1 and {widths[layer]}")
    first_shared = layers - config["num_kv_shared_layers"]
    return dict(
        config, num_hidden_layers=len(kept), intermediate_size=ffn,
        num_kv_shared_layers=config["num_kv_shared_layers"] - sum(1 for i in cut.skipped if i >= first_shared),
        layer_types=[config["layer_types"][i] for i in kept],
        activation_sparsity_pattern=[config["activation_sparsity_pattern"][i] for i in kept],
    )


LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def sliced_name(name: str, kept: list[int]) -> str | None:
    """``name`` in the sliced model; None for a skipped layer's tensor."""
    match = LAYER_KEY.fullmatch(name)
    if match is None:
        return name
    layer = int(match[1])
    return f"model.layers.{kept.index(layer)}.{match[2]}" if layer in kept else None


def sliced_tensor(name: str, tensor, kept: list[int], ffn: list[int], per_layer: int):
    """What the sliced model holds of tensor ``name`` of the full model (a copy when cut, so the
    full tensor can be freed)."""
    match = LAYER_KEY.fullmatch(name)
    if match is not None:
        width = ffn[kept.index(int(match[1]))]
        if match[2] in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            return tensor[:width].clone()
        if match[2] == "mlp.down_proj.weight":
            return tensor[:, :width].contiguous()
    if name == "model.embed_tokens_per_layer.weight":  # [vocab, layers * per_layer]
        return tensor.unflatten(1, (-1, per_layer))[:, kept].flatten(1)
    if name == "model.per_layer_model_projection.weight":  # [layers * per_layer, hidden]
        return tensor.unflatten(0, (-1, per_layer))[kept].flatten(0, 1)
    return tensor


def apply(loaded, cut: Slice) -> None:
    """Replace ``loaded.model`` by its slice ``cut``, in the same dtype, one tensor at a time."""
    import torch
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
    from transformers.modeling_utils import local_torch_dtype

    source = loaded.model
    full = source.config.to_dict()
    config = Gemma3nTextConfig.from_dict(sliced_config(full, cut))
    kept = [i for i in range(full["num_hidden_layers"]) if i not in cut.skipped]
    dtype = source.model.embed_tokens.weight.dtype
    attention = source.config._attn_implementation
    buffers = {sliced_name(name, kept): buffer for name, buffer in source.named_buffers()}
    state = source.state_dict()
    loaded.model = source = None  # from here the state dict holds the only reference to each tensor
    sliced = {}
    for name in list(state):
        tensor = state.pop(name)
        if sliced_name(name, kept) is not None:
            sliced[sliced_name(name, kept)] = sliced_tensor(name, tensor, kept, config.intermediate_size,
                                                            config.hidden_size_per_layer_input)
        del tensor
    with local_torch_dtype(dtype), torch.device("meta"):
        model = Gemma3nForCausalLM(config)
    model.load_state_dict(sliced, strict=True, assign=True)
    for name, _ in list(model.named_buffers()):  # computed at construction, as the full model has them
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner)._buffers[attribute] = buffers[name]
    model.tie_weights()
    model.set_attn_implementation(attention)
    loaded.model = model.eval()


def markdown_table() -> str:
    """The published configurations as the README shows them (``python -m gemma3n_executorch.slicing``)."""
    lines = ["| `--slice` | Google's name | layers | effective parameters (B) | MMLU, pretrained (Google) | "
             "MLP widths, in E4B hidden sizes (width x layers) |", "|---|---|---|---|---|---|"]
    for key, published in published_slices().items():
        runs: list[list[int]] = []
        for multiple in published.slice.ffn_multiples:
            if runs and runs[-1][0] == multiple:
                runs[-1][1] += 1
            else:
                runs.append([multiple, 1])
        skipped = f" (drops {', '.join(map(str, published.slice.skipped))})" if published.slice.skipped else ""
        lines.append(f"| `{key}` | {published.title} | {published.layers}{skipped} | {published.effective_params_b:.2f} | "
                     f"{published.mmlu_pt:.1f}% | {' '.join(f'{m}x{n}' for m, n in runs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
