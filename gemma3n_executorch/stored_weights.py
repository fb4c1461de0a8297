"""Loading for export in bounded memory: each weight is read from the checkpoint when quantization
reaches it.

Hugging Face's loader holds the whole model as stored (E4B in bf16: 13.6 GB) before the first
layer is quantized. Here the model is built on the meta device (no memory for its weights), and
``quantize.apply`` asks this module for each weight in turn: a linear layer's matrix whole, the
big tables (token embedding, per-layer table, the lm_head tied to the embedding) a block of rows
at a time. Each is quantized (or cast) and its stored copy freed before the next is read, so the
export never holds more of the checkpoint than one matrix or one row block.

The files are read with plain reads, not mapped: pages of a mapped checkpoint stay in the
process's resident set until it is unmapped, which would count the whole file against the peak.
Except for a weight kept whole as stored (a bf16 program's): that one is a private mapping of its
file, resident only as read, and lowering gives its pages back once its bytes are in the program
(they would be read from the file again; lowering_shortcuts.releasing), while the program's copy
waits on disk (constants_on_disk.py): a portable bf16 export never holds its weights in memory.
A MatFormer slice (slicing.py) is cut from each tensor as it is read: no copy of the full model
exists either. The result is the same program, byte for byte, as Hugging Face's loader gives
(tests/test_loading.py), and the same checks refuse a checkpoint that does not fit its config.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, slicing
from .checkpoint import LoadedModel
from .progress import UserError
from .slicing import Slice
from .variants import TINY_MODEL, Variant

# https://huggingface.co/docs/safetensors: an 8-byte little-endian header length, a JSON header
# {name: {dtype, shape, data_offsets}}, then the data, each tensor row-major and contiguous.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file


def read_header(model: str, path: Path) -> dict[str, StoredTensor]:
    """The tensors one safetensors file holds; UserError when the file is cut short or is not one."""
    def corrupt(reason: str) -> UserError:
        return UserError(f"--model {model}: cannot read the weights in {path.parent} ({path.name}: {reason}); "
                         "the download is incomplete or corrupt: download the checkpoint again")

    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise corrupt("shorter than its header")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise corrupt("shorter than its header")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise corrupt("its header is not JSON") from None
    tensors = {}
    try:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry.get("dtype") not in SAFETENSORS_DTYPES:
                raise corrupt(f"tensor {name} has dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            if 8 + length + end > size:
                raise corrupt("shorter than its header says")
            tensors[name] = StoredTensor(path, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + length + begin)
    except (AttributeError, KeyError, TypeError, ValueError):  # an entry that is not {dtype, shape, data_offsets}
        raise corrupt("its header is not a safetensors header") from None
    return tensors


def read_rows(stored: StoredTensor, start: int | None = None, stop: int | None = None) -> torch.Tensor:
    """The stored tensor, or its rows ``start:stop``, read straight into a new tensor."""
    shape = stored.shape if start is None else (stop - start, *stored.shape[1:])
    tensor = torch.empty(shape, dtype=stored.dtype)
    if tensor.numel():
        row_bytes = math.prod(stored.shape[1:]) * tensor.element_size()
        # Through ctypes, not .numpy(): a tensor numpy has seen keeps its memory for good (its
        # storage is no longer resizable), and lowering frees each weight once serialized.
        view = memoryview((ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())).cast("B")
        with stored.path.open("rb") as file:
            file.seek(stored.offset + (start or 0) * row_bytes)
            if file.readinto(view) != view.nbytes:
                raise UserError(f"cannot read {stored.path}: the file changed while it was read")
    return tensor


def mapped_rows(stored: StoredTensor) -> torch.Tensor:
    """The stored tensor as a private (copy-on-write) mapping of its file."""
    count = math.prod(stored.shape)
    start = stored.offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    with stored.path.open("rb") as file:
        mapping = mmap.mmap(file.fileno(), stored.offset - start + count * stored.dtype.itemsize, offset=start,
                            access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapping, dtype=stored.dtype, count=count, offset=stored.offset - start).view(stored.shape)


def stored_tensors(model: str, directory: Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint, under the text model's names (both layouts)."""
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        for name, stored in read_header(model, path).items():
            for pattern, replacement in checkpoint.TEXT_KEY_MAPPING.items():
                name = re.sub(pattern, replacement, name)
            found[name] = stored
    return found


def meta_model(config, dtype: torch.dtype):
    """The model with no memory for its weights (on the meta device); its buffers, computed at
    construction, made as Hugging Face's loader makes them."""
    from transformers import Gemma3nForCausalLM
    from transformers.modeling_utils import local_torch_dtype

    with local_torch_dtype(dtype), torch.device("meta"):
        model = Gemma3nForCausalLM(config)
    for name, buffer in checkpoint.constructed_buffers(config, dtype).items():
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner)._buffers[attribute] = buffer
    model.set_attn_implementation(checkpoint.ATTENTION)
    return model.eval()


def load_dtype(config, stored: dict[str, StoredTensor]) -> torch.dtype:
    """The dtype Hugging Face's loader gives the model for dtype="auto": the config's, else the
    first floating-point tensor's."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        return dtype
    return next((s.dtype for s in stored.values() if s.dtype.is_floating_point), torch.get_default_dtype())


class StoredWeights:
    """The weights of a meta-device model, read from the checkpoint on demand (in the dtype
    Hugging Face's loader would have given them), sliced as they are read when the model is a slice."""

    def __init__(self, model: nn.Module, stored: dict[str, StoredTensor], dtype: torch.dtype,
                 full_config, cut: Slice | None):
        self.stored, self.dtype = stored, dtype
        layers = full_config.num_hidden_layers
        self.kept = [i for i in range(layers) if cut is None or i not in cut.skipped]
        self.ffn = list(model.config.intermediate_size) if cut is not None else None
        self.per_layer = model.config.hidden_size_per_layer_input
        self.sliced = cut is not None
        self.mapped: set[int] = set()  # addresses of the weights read as mappings of their files
        # By identity: lm_head.weight is embed_tokens.weight (named so, first) until one of them is replaced.
        self.names = {id(p): self.full_name(name) for name, p in model.named_parameters()}

    def full_name(self, name: str) -> str:
        match = slicing.LAYER_KEY.fullmatch(name)
        return f"model.layers.{self.kept[int(match[1])]}.{match[2]}" if match else name

    def pending(self, parameter: torch.Tensor) -> bool:
        return parameter.is_meta and id(parameter) in self.names

    def read(self, parameter: torch.Tensor, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The parameter's value (rows ``start:stop`` if given: only for tensors a slice cuts by
        columns or not at all, the tables read in row blocks)."""
        name = self.names[id(parameter)]
        stored = self.stored[name]
        if start is None and not self.sliced and stored.dtype == self.dtype and math.prod(stored.shape):
            tensor = mapped_rows(stored)  # kept as stored, whole
            self.mapped.add(tensor.untyped_storage().data_ptr())
            return tensor
        tensor = read_rows(stored, start, stop)
        if self.sliced:
            if start is not None and name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "per_layer_model_projection.weight")):
                raise ValueError(f"{name}: a slice cuts its rows; read it whole")
            tensor = slicing.sliced_tensor(name, tensor, self.kept, self.ffn, self.per_layer)
        return tensor.to(self.dtype)

    def rows(self, parameter: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return self.read(parameter, start, stop) if self.pending(parameter) else parameter.detach()[start:stop]

    def fill_(self, module: nn.Module, dtype: torch.dtype | None = None) -> None:
        """Give every parameter of ``module`` still on the meta device its value (cast to
        ``dtype`` if given), one at a time; a parameter shared by two modules stays shared."""
        filled = {}
        for owner in module.modules():
            for attribute, parameter in list(owner._parameters.items()):
                if parameter is None or not self.pending(parameter):
                    continue
                if id(parameter) not in filled:
                    value = self.read(parameter)
                    filled[id(parameter)] = nn.Parameter(value.to(dtype) if dtype is not None else value,
                                                         requires_grad=parameter.requires_grad)  # the program records it
                owner._parameters[attribute] = filled[id(parameter)]


def check_against_config(model: str, full: nn.Module, stored: dict[str, StoredTensor]) -> None:
    """What Hugging Face's loader reports (a missing tensor, a wrong shape, a foreign one), found
    from the files' headers before anything is read, refused as checkpoint.load refuses it."""
    expected = {name: tuple(p.shape) for name, p in full.named_parameters()}
    ignored = [re.compile(pattern) for pattern in full.model._keys_to_ignore_on_load_unexpected or []]
    checkpoint.check_loading_report(model, {
        "mismatched_keys": [(name, s.shape, expected[name]) for name, s in stored.items()
                            if name in expected and s.shape != expected[name]],
        "missing_keys": [name for name in expected if name not in stored],
        "unexpected_keys": [name for name in stored if name not in expected and name != "lm_head.weight"
                            and not any(p.search(name.removeprefix("model.")) for p in ignored)],
    })


def load(model: str, variant: Variant, cut: Slice | None = None) -> LoadedModel:
    """The text decoder (``cut``'s slice of it, if given) with its weights still in the files:
    ``loaded.weights`` reads them (quantize.apply does, as it reaches each). The tiny model,
    built in memory, comes whole."""
    if model == TINY_MODEL:
        return checkpoint.load(model, variant, cut=cut)
    from transformers import Gemma3nTextConfig

    directory, full_config = checkpoint.read_config(model, variant, cut)
    if not any(directory.glob("*.safetensors")):
        raise UserError(f"--model {model}: no *.safetensors weights in {directory}")
    stored = stored_tensors(model, directory)
    dtype = load_dtype(full_config, stored)
    full = meta_model(full_config, dtype)
    check_against_config(model, full, stored)
    if cut is None:
        text = full
    else:
        text = meta_model(Gemma3nTextConfig.from_dict(slicing.sliced_config(full_config.to_dict(), cut)), dtype)
    del full
    return LoadedModel(text, model, directory, StoredWeights(text, stored, dtype, full_config, cut))


def write_random(directory: Path, config: dict, dtype: torch.dtype = checkpoint.STORED_DTYPE, seed: int = 0) -> Path:
    """A text-only checkpoint of ``config`` holding checkpoint.randomize_'s weights, written one
    row block at a time: a real-size checkpoint (E4B: 13.6 GB) without the model in memory, for
    measuring an export from files as a user runs it."""
    from transformers import Gemma3nTextConfig

    # The architecture files' config.json keys that are not the text config's own arguments.
    text_config = Gemma3nTextConfig(**{k: v for k, v in config.items() if k not in ("model_type", "torch_dtype")})
    model = meta_model(text_config, dtype)
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offsets, end = {"__metadata__": {"format": "pt"}}, {}, 0
    for name, parameter in model.named_parameters():  # lm_head is tied: stored once, as published
        size = parameter.numel() * parameter.element_size()
        header[name] = {"dtype": names[parameter.dtype], "shape": list(parameter.shape), "data_offsets": [end, end + size]}
        offsets[name], end = end, end + size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(text_config.to_dict(), model_type="gemma3n_text",
                                                          dtype=str(dtype).removeprefix("torch.")), indent=1))
    path = directory / "model.safetensors"
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        data = file.tell()
        for name, start, value in checkpoint.random_blocks(model, seed):
            row_bytes = value[0].numel() * value.element_size()
            file.seek(data + offsets[name] + start * row_bytes)
            file.write(value.contiguous().view(-1).view(torch.uint8).numpy())
    return path


@contextlib.contextmanager
def random_model_from_files(directory: Path, variant: Variant, config: dict, cut: Slice | None, label: str):
    """The random model of ``config`` as an export from a user's checkpoint gets it: written to
    ``directory`` (removed afterwards), then loaded from there to be read as it is quantized, so
    that what an export of it costs is what a user's costs. Labelled ``label`` in the program, with
    no tokenizer directory (random weights speak no language: the exporter writes the tiny one)."""
    try:
        write_random(directory, config)
        loaded = load(str(directory), variant, cut)
        loaded.source, loaded.directory = label, None
        yield loaded
    finally:
        shutil.rmtree(directory, ignore_errors=True)
