"""MatFormer slicing (e4b/export.py --slice, --slice-ffn/--skip-layers, --save-slice): the slice is
the model Google's rule defines, its programs compute what Hugging Face computes for it, every
published configuration exports, and an invalid slice is refused in one line with nothing written."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

from gemma3n_executorch import checkpoint, parity, slicing
from gemma3n_executorch.checkpoint import LoadedModel
from gemma3n_executorch.runtime import Program
from gemma3n_executorch.variants import BOS_ID, VARIANTS, tiny_config
from tests.checkpoints import write_text_only
from tests.conftest import run
from tests.test_kv_generation import FP32, LENGTHS, NEW_TOKENS, PROMPT, program_greedy

TINY_HIDDEN = 64


def e4b_structure(**changes) -> dict:
    """E4B's layer structure (35 layers, the last 15 sharing KV, its attention and sparsity pattern)
    at tiny widths, its MLPs 8 hidden sizes wide as in E4B (16384 = 8 x 2048)."""
    real = VARIANTS["e4b"].real_text_config()
    return dict(tiny_config(35, 15, 8 * TINY_HIDDEN), layer_types=real["layer_types"],
                activation_sparsity_pattern=real["activation_sparsity_pattern"], **changes)


def random_model(config: dict) -> Gemma3nForCausalLM:
    """Random weights as the tiny models have them, with logits of std about 1 instead of 4: over 35
    layers fp32 rounding grows to about 1e-3 at std 4 (eager fp32 against fp64), the fp32 bound."""
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**config))
    checkpoint.randomize_(model, seed=3)
    with torch.no_grad():
        model.model.norm.weight.div_(4.0)
    model.set_attn_implementation(checkpoint.ATTENTION)
    return model.eval()


@pytest.fixture(scope="module")
def e4b_shaped_checkpoint(tmp_path_factory):
    return write_text_only(random_model(e4b_structure()), tmp_path_factory.mktemp("e4b-structure"))


def test_official_e2b_rule_gives_an_e2b_shaped_model():
    full = random_model(e4b_structure())
    loaded = LoadedModel(random_model(e4b_structure()), "test", None)
    slicing.apply(loaded, slicing.published_slices()["E2B"].slice)
    sliced = loaded.model

    # The config: E2B's published structure (architectures/e2b-text-config.json) at tiny widths.
    e2b = VARIANTS["e2b"].real_text_config()
    assert e2b["intermediate_size"] == [4 * e2b["hidden_size"]] * 30
    e2b_config = Gemma3nTextConfig(**dict(e4b_structure(), num_hidden_layers=30, intermediate_size=[4 * TINY_HIDDEN] * 30,
                                          num_kv_shared_layers=e2b["num_kv_shared_layers"], layer_types=e2b["layer_types"],
                                          activation_sparsity_pattern=e2b["activation_sparsity_pattern"]))
    for key in ("num_hidden_layers", "intermediate_size", "num_kv_shared_layers", "layer_types",
                "activation_sparsity_pattern", "kv_sharing_modes"):
        assert getattr(sliced.config, key) == getattr(e2b_config, key), key

    # The tensors: layers 20-24 dropped, every MLP cut to its first 256 neurons, the per-layer
    # inputs' 16-wide slots of the kept layers, everything else untouched.
    kept = [*range(20), *range(25, 35)]
    width, per_layer = 4 * TINY_HIDDEN, full.config.hidden_size_per_layer_input
    for new, old in enumerate(kept):
        ours, theirs = sliced.model.layers[new].state_dict(), full.model.layers[old].state_dict()
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            expected = theirs[name]
            if name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                expected = expected[:width]
            elif name == "mlp.down_proj.weight":
                expected = expected[:, :width]
            assert torch.equal(tensor, expected), (new, name)
        table = sliced.model.embed_tokens_per_layer.weight[:, new * per_layer:(new + 1) * per_layer]
        assert torch.equal(table, full.model.embed_tokens_per_layer.weight[:, old * per_layer:(old + 1) * per_layer])
        rows = sliced.model.per_layer_model_projection.weight[new * per_layer:(new + 1) * per_layer]
        assert torch.equal(rows, full.model.per_layer_model_projection.weight[old * per_layer:(old + 1) * per_layer])
    for name in ("embed_tokens.weight", "norm.weight", "altup_projections.0.weight", "per_layer_projection_norm.weight"):
        assert torch.equal(sliced.model.get_parameter(name), full.model.get_parameter(name))

    # An E2B-shaped model built from those tensors computes what the slice computes.
    e2b_model = Gemma3nForCausalLM(e2b_config).eval()
    e2b_model.set_attn_implementation(checkpoint.ATTENTION)
    e2b_model.load_state_dict(sliced.state_dict(), strict=True)
    ids = torch.tensor([parity.probe_tokens(40, 512, BOS_ID)])
    with torch.no_grad():
        assert torch.equal(e2b_model(input_ids=ids).logits, sliced(input_ids=ids).logits)
        assert not torch.allclose(full(input_ids=ids).logits, sliced(input_ids=ids).logits, atol=1e-2)


# Tiny E4B: 7 layers, 4-6 share the KV of 2 (full) and 3 (sliding). Drop two sharing layers, and cut
# each kept MLP (256 wide) to a different width.
CUSTOM = ("--skip-layers", "4,6", "--slice-ffn", "64,128,192,256,100")


def test_sliced_program_computes_what_hugging_face_computes_for_the_slice(programs, tmp_path):
    saved = tmp_path / "slice"
    result = run("e4b/export.py", "--model", "tiny", *CUSTOM, "--save-slice", str(saved), check=True)
    assert "wrote the custom slice" in result.stderr
    reference = Gemma3nForCausalLM.from_pretrained(saved, dtype=torch.float32, attn_implementation="eager").eval()
    assert reference.config.num_hidden_layers == 5 and reference.config.intermediate_size == [64, 128, 192, 256, 100]

    program = Program(programs.get("e4b", "--mode", "kv", *LENGTHS, *FP32, *CUSTOM))
    assert slicing.from_spec(program.info.matformer_slice) == slicing.Slice("custom", (4, 6), (64, 128, 192, 256, 100))
    logits = program.step(PROMPT)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    assert (logits - expected).abs().max() < 1e-3
    tokens = program_greedy(Program(program.path), PROMPT, NEW_TOKENS)
    assert tokens == parity.eager_greedy(reference, PROMPT, NEW_TOKENS)
    assert len(set(tokens)) > 10

    # validate.py cuts the same slice of the checkpoint from the program's metadata.
    check = run("validate.py", str(program.path), "--model", "tiny", check=True)
    assert "slice custom" in check.stdout and "identical to eager generate()" in check.stdout


@pytest.mark.parametrize("name", list(slicing.published_slices()))
def test_every_published_slice_cuts_a_model_transformers_builds(name):
    published = slicing.published_slices()[name]
    loaded = LoadedModel(random_model(e4b_structure()), "test", None)
    slicing.apply(loaded, published.slice)
    config = loaded.model.config
    assert config.num_hidden_layers == published.layers
    assert config.intermediate_size == [m * TINY_HIDDEN for m in published.slice.ffn_multiples]
    assert config.num_kv_shared_layers == 15 - len(published.slice.skipped)
    # A model transformers builds from the sliced config takes exactly the sliced tensors.
    rebuilt = Gemma3nForCausalLM(Gemma3nTextConfig.from_dict(config.to_dict()))
    rebuilt.load_state_dict(loaded.model.state_dict(), strict=True)


# One published configuration through the whole path (each takes about a minute on two cores): the
# official E2B, which drops layers as well as narrowing every MLP.
def test_published_slice_exports_and_validates(e4b_shaped_checkpoint, tmp_path):
    output = tmp_path / "slice.pte"
    run("e4b/export.py", "--model", str(e4b_shaped_checkpoint), "--slice", "E2B", "--dtype", "fp32", "--seq-len", "8",
        "--output", str(output), check=True)
    assert slicing.from_spec(Program(output).info.matformer_slice) == slicing.Slice("E2B", (20, 21, 22, 23, 24),
                                                                                    (4 * TINY_HIDDEN,) * 30)
    check = run("validate.py", str(output), "--model", str(e4b_shaped_checkpoint), check=True)
    assert "slice E2B" in check.stdout and "all checks passed" in check.stdout


@pytest.mark.parametrize("flags, message", [
    (("--slice", "E2B"), "--slice E2B is defined for E4B's 35 layers, and this model has 7"),
    (("--skip-layers", "3", "--slice-ffn", "64"), "--skip-layers: layer 3 cannot be skipped"),
    (("--skip-layers", "9", "--slice-ffn", "64"), "--skip-layers: layer 9 does not exist"),
    (("--skip-layers", "5", "--slice-ffn", "64,64"), "--slice-ffn has 2 widths for 6 kept layers"),
    (("--slice-ffn", "300"), "--slice-ffn: MLP width 300 for layer 0"),
    (("--slice", "E9B"), "--slice E9B: not a published configuration"),
    (("--skip-layers", "5"), "--skip-layers needs --slice-ffn"),
    (("--slice-ffn", "a,b"), "--slice-ffn takes a comma-separated list"),
    (("--slice", "E2B", "--slice-ffn", "64"), "pass one or the other"),
], ids=["published-on-7-layers", "kv-producer", "no-such-layer", "wrong-length", "too-wide", "unknown-name",
        "skip-without-widths", "not-numbers", "both-kinds"])
def test_invalid_slices_fail_in_one_line_with_nothing_written(tmp_path, flags, message):
    result = run("e4b/export.py", "--model", "tiny", *flags, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].count("error") == 1
    assert list(tmp_path.iterdir()) == []
