"""Both checkpoint layouts load the text decoder only, with the same weights and logits."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma3n_executorch import checkpoint, exporter, lowering_shortcuts, program_file, quantize, stored_weights
from gemma3n_executorch.progress import UserError
from gemma3n_executorch.variants import VARIANTS
from tests.checkpoints import write_multimodal, write_text_only
from tests.test_slicing import CUSTOM

REPO = Path(__file__).resolve().parent.parent
# Both loaders refuse what does not fit: Hugging Face's (the eager references) and the exporter's,
# which reads each weight only when it quantizes it.
LOADERS = {"hugging-face": lambda model, variant: checkpoint.load(model, variant, torch.float32),
           "exporter": stored_weights.load}


@pytest.mark.parametrize("variant", ["e2b", "e4b"])
@pytest.mark.parametrize("writer", [write_text_only, write_multimodal], ids=["text-only", "multimodal"])
def test_layouts_load_same_logits(tmp_path, tiny_models, variant, writer):
    reference = tiny_models(variant)
    directory = writer(reference, tmp_path / "checkpoint")
    loaded = checkpoint.load(str(directory), VARIANTS[variant], torch.float32)
    assert loaded.num_parameters == reference.num_parameters()
    assert loaded.config.num_hidden_layers == reference.config.num_hidden_layers
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)


def test_multimodal_layout_loads_without_timm(tmp_path, tiny_models):
    directory = write_multimodal(tiny_models("e2b"), tmp_path / "checkpoint")
    # timm (needed by the vision tower) must not be imported, even if it were installed.
    code = ("import sys, torch; sys.modules['timm'] = None; sys.path.insert(0, sys.argv[2]);"
            "from gemma3n_executorch import checkpoint; from gemma3n_executorch.variants import VARIANTS;"
            "m = checkpoint.load(sys.argv[1], VARIANTS['e2b'], torch.float32); print(m.num_parameters)")
    result = subprocess.run([sys.executable, "-c", code, str(directory), str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == tiny_models("e2b").num_parameters()


def test_wrong_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="not Gemma 3n"):
        checkpoint.load(str(tmp_path), VARIANTS["e2b"], torch.float32)


@pytest.mark.parametrize("recipe", [("none", "none"), ("8da4w", "4w")], ids=["fp32", "phone"])
def test_bf16_checkpoint_brought_to_fp32_module_by_module_equals_loading_it_in_fp32(tmp_path, tiny_models, recipe):
    """The exporter loads a checkpoint as stored (bf16) and casts module by module while quantizing,
    so fp32 E4B never exists whole; the result must be Hugging Face's fp32 load of the same file,
    scales computed at construction included (bf16-rounded, they are 1e-4 off)."""
    stored = checkpoint.build_tiny(VARIANTS["e2b"], torch.bfloat16)
    directory = write_text_only(stored, tmp_path / "checkpoint")
    as_stored = checkpoint.load(str(directory), VARIANTS["e2b"]).model
    in_fp32 = checkpoint.load(str(directory), VARIANTS["e2b"], torch.float32).model
    assert next(as_stored.parameters()).dtype == torch.bfloat16
    for model in (as_stored, in_fp32):
        quantize.apply(model, *recipe, 32, torch.float32)
    assert {b.dtype for b in as_stored.buffers() if b.is_floating_point()} == {torch.float32}
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(as_stored(ids).logits, in_fp32(ids).logits)


def test_kv_projections_of_the_shared_layers_are_stored_as_published_and_ignored_on_load(tmp_path, tiny_models):
    """The published checkpoints store K/V projections for the layers that reuse another layer's
    cache; Hugging Face builds none, llama.cpp's loader needs them, and the llama.cpp baseline
    writes zeros in their place. Loading such a checkpoint gives the same model."""
    from safetensors import safe_open

    from gemma3n_executorch import llamacpp

    reference = tiny_models("e2b")
    llamacpp.save_checkpoint(reference, tmp_path)
    config = reference.config
    with safe_open(tmp_path / "model-shared-kv.safetensors", "pt") as stand_ins:
        layers = {int(name.split(".")[2]) for name in stand_ins.keys()}
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        built = {int(name.split(".")[2]) for name in saved.keys() if name.endswith("self_attn.k_proj.weight")}
    assert layers == set(range(config.num_hidden_layers - config.num_kv_shared_layers, config.num_hidden_layers))
    assert layers.isdisjoint(built) and layers | built == set(range(config.num_hidden_layers))
    loaded = checkpoint.load(str(tmp_path), VARIANTS["e2b"], torch.float32)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)


def test_llama_cpp_checkpoint_written_without_the_model_is_the_saved_model(tmp_path):
    """bench.py's llama.cpp baseline writes the random model's checkpoint a row block at a time (E4B's
    13.6 GB in memory beside llama.cpp's converter were killed for want of memory): the same tensors,
    stand-ins included, and the config key the converter picks its model class by."""
    from safetensors.torch import load_file

    from gemma3n_executorch import llamacpp

    config = VARIANTS["e2b"].tiny_config
    llamacpp.save_checkpoint(checkpoint.build_tiny(VARIANTS["e2b"], torch.bfloat16), tmp_path / "saved")
    llamacpp.write_random_checkpoint(tmp_path / "written", dict(config))
    for name in ("model.safetensors", "model-shared-kv.safetensors"):
        saved, written = load_file(tmp_path / "saved" / name), load_file(tmp_path / "written" / name)
        assert saved.keys() == written.keys() and all(torch.equal(saved[k], written[k]) for k in saved), name
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("saved", "written")]
    assert configs[0]["architectures"] == configs[1]["architectures"] == ["Gemma3nForCausalLM"]


def test_real_architectures_ship_with_the_package(tmp_path):
    """A user's clone has no ../shared/ beside it: the package alone must give the published
    architectures (E2B: 30 layers, MLP 8192; E4B: 35 layers, MLP 16384, as on the model cards)."""
    shutil.copytree(REPO / "gemma3n_executorch", tmp_path / "clone" / "gemma3n_executorch")
    code = ("import json; from gemma3n_executorch.variants import VARIANTS;"
            "print(json.dumps({k: [v.real_text_config()[f] for f in ('num_hidden_layers', 'num_kv_shared_layers')]"
            " + [v.real_text_config()['intermediate_size'][0]] for k, v in VARIANTS.items()}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "clone", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == {"e2b": [30, 10, 8192], "e4b": [35, 15, 16384]}


def _edit_weights(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.pop("model.layers.0.mlp.gate_proj.weight"), "missing from the checkpoint, e.g. model.layers.0.mlp.gate_proj.weight"),
    (lambda t: t.update({"model.layers.0.mlp.gate_proj.weight": torch.zeros(3, 64)}),
     "tensor model.layers.0.mlp.gate_proj.weight has shape [3, 64] in the checkpoint but the config needs [128, 64]"),
    (lambda t: t.update({"model.extra.weight": torch.zeros(2)}), "not part of Gemma 3n, e.g. model.extra.weight"),
], ids=["missing", "wrong-shape", "foreign"])
@pytest.mark.parametrize("loader", LOADERS)
def test_checkpoint_that_does_not_match_its_config_is_refused(loader, tmp_path, tiny_models, edit, fragment):
    """transformers initialises a missing tensor at random and says so only in a log line (the
    program then computes something else, logits off by up to 14); a wrong shape raised a bare
    RuntimeError that named no tensor."""
    directory = write_text_only(tiny_models("e2b"), tmp_path / "checkpoint")
    _edit_weights(directory, edit)
    with pytest.raises(UserError, match=re.escape(fragment)):
        checkpoint.load(str(directory), VARIANTS["e2b"], torch.float32)


@pytest.mark.parametrize("loader", LOADERS)
def test_truncated_weights_are_refused(loader, tmp_path, tiny_models):
    directory = write_text_only(tiny_models("e2b"), tmp_path / "checkpoint")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="download the checkpoint again"):
        LOADERS[loader](str(directory), VARIANTS["e2b"])


@pytest.mark.parametrize("content, fragment", [
    (b"[1, 2]", "a JSON list, not an object"),
    (b'{"model_type": "gemma3n_text", "name": "\xff"}', "not UTF-8"),
    (b'{"model_type": "gemma3n", "text_config": null}', "without a text_config object"),
], ids=["list", "not-utf8", "null-text-config"])
def test_malformed_config_is_refused(tmp_path, content, fragment):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(UserError, match=fragment):
        checkpoint.load(str(tmp_path), VARIANTS["e2b"], torch.float32)


@pytest.mark.parametrize("loader", LOADERS)
def test_checkpoint_of_the_other_variant_is_refused(loader, tmp_path, tiny_models):
    """e4b/export.py --model <an E2B checkpoint> wrote a program labelled E4B."""
    directory = write_text_only(tiny_models("e2b"), tmp_path / "checkpoint")
    with pytest.raises(UserError, match="a Gemma 3n E2B checkpoint .* export it with e2b/export.py"):
        LOADERS[loader](str(directory), VARIANTS["e4b"])


@pytest.mark.parametrize("variant, flags", [
    ("e2b", ("--quantize", "int8")),
    ("e4b", ("--seq-len", "8", *CUSTOM)),
    ("e4b", ("--seq-len", "8")),
], ids=["fixed-int8", "fixed-slice", "fixed-bf16"])
def test_export_reading_each_weight_as_it_quantizes_writes_the_same_program(tmp_path, monkeypatch, variant, flags):
    """The exporter builds the model without weights and reads each from the files only when it
    quantizes or casts it (a slice cut as it is read; a weight kept as stored is mapped, not read),
    and the emitter's copies of the constants wait on disk (here every one), so that not even the
    bf16 model is held whole (E4B: 13.6 GB): the program must be the one Hugging Face's loader
    gives, byte for byte. A bf16 checkpoint in the published layout: towers, and K/V projections for
    the sharing layers. (The phone recipe: tests/test_memory.py, on the export it makes anyway.)"""
    directory = write_multimodal(checkpoint.build_tiny(VARIANTS[variant], torch.bfloat16), tmp_path / "checkpoint")
    options, _, _, _ = exporter.parse_args(VARIANTS[variant], ["--model", str(directory), *flags])
    lean = stored_weights.load(options.model, VARIANTS[variant], options.matformer_slice)
    assert all(p.is_meta for p in lean.model.parameters())
    monkeypatch.setattr(lowering_shortcuts, "SPILL_MIN_BYTES", 1)
    summary = exporter.export_program(VARIANTS[variant], options, tmp_path / "lean.pte", loaded=lean)
    monkeypatch.setattr(lowering_shortcuts, "SPILL_MIN_BYTES", 1 << 62)  # the whole program in memory
    assert summary["constant_bytes_on_disk"] > 0.9 * program_file.layout(tmp_path / "lean.pte").constant_segment.size
    if options.quantize == "none" and options.matformer_slice is None:
        assert lean.weights.mapped  # kept as stored: read from the file as the emitter copies them
    whole = checkpoint.load(options.model, VARIANTS[variant], cut=options.matformer_slice)
    # In bf16, as exported: every weight once (the lm_head is the token embedding's).
    weights = {id(p): p.numel() * 2 for p in whole.model.parameters()}
    tied = whole.model.model.embed_tokens.weight.numel() * 2
    exporter.export_program(VARIANTS[variant], options, tmp_path / "whole.pte", loaded=whole)
    assert (tmp_path / "lean.pte").read_bytes() == (tmp_path / "whole.pte").read_bytes()
    if options.quantize == "none":
        # Every weight but the tied one was freed once the program held it (lowering_shortcuts.releasing),
        # those read as stored and never cast or quantized too: the memory read into is the program's to free.
        assert summary["released_bytes"] >= sum(weights.values()) - tied, (summary["released_bytes"], weights)
