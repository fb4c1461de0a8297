"""The runtime fixes: needed by the installed transformers, harmless to the math, idempotent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from executorch.exir import to_edge

import patches
from gemma3n_executorch import checkpoint, tasks
from gemma3n_executorch.variants import VARIANTS
from tests.conftest import EXPORT_HASH_SEED, REPO


@pytest.fixture
def unpatched():
    patches.revert()
    yield
    patches.apply()


def _to_edge(model):
    wrapper = tasks.FixedWindowLM(model, 8)
    exported = torch.export.export(wrapper, (torch.arange(8).unsqueeze(0),), strict=False)
    return to_edge(exported)


def test_installed_transformers_needs_only_the_erfinv_fix(unpatched):
    assert patches.gaussian_topk_needs_fix()
    assert not patches.altup_clamp_needs_fix()  # upstream since 5.x: guarded by self.training


def test_export_fails_on_erfinv_without_the_fix(unpatched):
    model = checkpoint.build_tiny(VARIANTS["e2b"])
    with pytest.raises(Exception, match="erfinv"):
        _to_edge(model)


@pytest.mark.parametrize("variant", ["e2b", "e4b"])
def test_fix_keeps_logits_and_makes_export_pass(unpatched, variant):
    model = checkpoint.build_tiny(VARIANTS[variant])
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        assert "gaussian-topk-icdf-at-init" in patches.apply(model)
        after = model(ids).logits
    assert (after - before).abs().max().item() <= 1e-5
    if variant == "e2b":  # every exported program proves it too; once here, explicitly
        _to_edge(model)  # raises if erfinv were still in the graph


def test_apply_is_idempotent():
    first = patches.apply()
    method = transformers.models.gemma3n.modeling_gemma3n.Gemma3nTextMLP._gaussian_topk
    assert patches.apply() == first
    assert transformers.models.gemma3n.modeling_gemma3n.Gemma3nTextMLP._gaussian_topk is method
    fresh = checkpoint.build_tiny(VARIANTS["e2b"])  # built after patching: buffer made at init
    assert hasattr(fresh.model.layers[0].mlp, patches.STD_MULTIPLIER)


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the patch(1) tool")
def test_unified_diff_applies_to_installed_source(tmp_path):
    site = Path(transformers.__file__).parent
    copy = tmp_path / "transformers" / "models" / "gemma3n"
    copy.mkdir(parents=True)
    shutil.copy(site / "models" / "gemma3n" / "modeling_gemma3n.py", copy)
    subprocess.run(["patch", "-p1", "-d", str(tmp_path), "-i", str(REPO / "patches" / "modeling_gemma3n.diff")],
                   check=True, capture_output=True)
    patched = (copy / "modeling_gemma3n.py").read_text()
    topk = patched[patched.index("def _gaussian_topk"):patched.index("class Gemma3nTextAltUp")]
    assert "icdf" not in topk and "self.std_multiplier" in topk


def test_same_checkpoint_and_options_give_the_same_bytes(programs, tmp_path):
    """A cached export (made from inside e2b/, conftest.ProgramCache) and a second one from the
    repository's root, under a string-hash seed that orders set(layer_types) differently (checked
    here, so the test cannot pass vacuously), must write identical programs."""
    flags = ("--dtype", "fp32")
    orders = set()
    for seed in (EXPORT_HASH_SEED, "1"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        orders.add(subprocess.run([sys.executable, "-c", "print(list(set(['sliding_attention', 'full_attention'])))"],
                                  env=env, capture_output=True, text=True).stdout)
    assert len(orders) == 2
    again = tmp_path / "again.pte"
    subprocess.run([sys.executable, str(REPO / "e2b" / "export.py"), "--model", "tiny", *flags,
                    "--output", str(again)],
                   env=dict(os.environ, PYTHONHASHSEED="1"), cwd=REPO, check=True, capture_output=True)
    assert again.read_bytes() == programs.get("e2b", *flags).read_bytes()
