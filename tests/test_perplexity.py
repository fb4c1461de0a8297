"""validate.py --perplexity, run as a user runs it, against perplexities computed here from
Hugging Face eager directly: each window of the text fed after <bos> in one forward, every token
scored once."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import pytest
import torch

from gemma3n_executorch import checkpoint, parity, quantize
from gemma3n_executorch.exporter import tokenizer_path_for
from gemma3n_executorch.generation import load_tokenizer
from gemma3n_executorch.variants import BOS_ID, VARIANTS
from tests.conftest import run
from tests.test_bad_input import assert_clean_error
from tests.test_kv_generation import CONTEXT, KV_FLAGS, PHONE_FLAGS

# Python source every machine has offline: about 500 tiny-tokenizer tokens, four windows of a
# 160-position kv program (159 tokens each) and sixteen of a 32-token fixed one, the last ones short.
TEXT = Path(textwrap.__file__).read_text()[:640]
FIXED_FP32 = ("--dtype", "fp32")  # a 32-token window
PERPLEXITY_LINE = re.compile(r"^(program|eager fp32) perplexity ([0-9.]+)", re.MULTILINE)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "textwrap.txt"
    path.write_text(TEXT)
    return path


def reference_perplexity(model, tokens: list[int], window: int) -> float:
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens), window):
            targets = tokens[start:start + window]
            logits = model(input_ids=torch.tensor([[BOS_ID] + targets[:-1]]), use_cache=False).logits[0]
            nll += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum").item()
    return math.exp(nll / len(tokens))


def measured(program: Path, text_file: Path, flags: tuple = ("--model", "tiny")) -> tuple[dict[str, float], str]:
    result = run("validate.py", str(program), *flags, "--perplexity", str(text_file))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return {name: float(value) for name, value in PERPLEXITY_LINE.findall(result.stdout)}, result.stdout


def tokens_of(program: Path) -> list[int]:
    return load_tokenizer(tokenizer_path_for(program)).encode(TEXT, add_special_tokens=False).ids


def relative_change(value: float, reference: float) -> float:
    return abs(value / reference - 1)


@pytest.mark.parametrize("variant", ["e2b", "e4b"])
def test_unquantized_fp32_kv_program_has_eager_perplexity(programs, tiny_models, text_file, variant):
    path = programs.get(variant, *KV_FLAGS)
    tokens = tokens_of(path)
    window = CONTEXT - 1
    assert len(tokens) > 2 * window  # more than one window: the cache really restarts
    reference = reference_perplexity(tiny_models(variant), tokens, window)
    perplexities, stdout = measured(path, text_file)
    assert relative_change(perplexities["program"], reference) <= parity.tolerance_for("fp32", "none").max_perplexity_change
    # validate.py's own eager side, fed in calls of 128 through Hugging Face's cache (two for each
    # window of 159), is the same reference.
    assert relative_change(perplexities["eager fp32"], reference) <= 1e-5
    assert f"over {len(tokens):,} tokens (kv cache, {math.ceil(len(tokens) / window)} windows of up to {window}" in stdout
    assert "PASS  an unquantized fp32 program's perplexity is eager fp32's within 0.1%" in stdout


def test_fixed_program_is_scored_window_by_window_and_alone_without_a_checkpoint(programs, tiny_models, text_file):
    path = programs.get("e2b", *FIXED_FP32)
    tokens = tokens_of(path)
    reference = reference_perplexity(tiny_models("e2b"), tokens, 32)
    perplexities, stdout = measured(path, text_file, ("--tokenizer", str(tokenizer_path_for(path))))
    assert set(perplexities) == {"program"} and "ratio" not in stdout
    assert relative_change(perplexities["program"], reference) <= parity.tolerance_for("fp32", "none").max_perplexity_change
    assert f"(fixed window, {math.ceil(len(tokens) / 32)} windows of up to 32" in stdout


def test_phone_program_has_the_perplexity_of_its_quantization_run_eagerly(programs, tiny_models, text_file):
    """Tiny E2B only: an E4B phone program would be this file's one export of its own (minutes
    of XNNPACK lowering); docs/experiment_perplexity_noise.py measures both."""
    path = programs.get("e2b", *PHONE_FLAGS)
    tokens = tokens_of(path)
    eager_quantized = checkpoint.build_tiny(VARIANTS["e2b"])
    quantize.apply(eager_quantized, "8da4w", "4w", 32, torch.float32)  # the exporter's own quantization
    quantized = reference_perplexity(eager_quantized, tokens, CONTEXT - 1)
    fp32 = reference_perplexity(tiny_models("e2b"), tokens, CONTEXT - 1)
    perplexities, stdout = measured(path, text_file)
    bound = parity.phone_perplexity_bound(len(tokens))
    assert relative_change(perplexities["program"], quantized) <= bound, (perplexities, quantized, bound)
    # The eager side stays fp32 for a quantized program, and the quantization moves the perplexity
    # far more than the bound: a program that skipped any of it would fail.
    assert relative_change(perplexities["eager fp32"], fp32) <= 1e-5
    assert relative_change(quantized, fp32) > bound
    assert "no bound is enforced" in stdout


@pytest.mark.parametrize("content, fragment", [
    (None, "no such file"),
    (b"", "the file is empty"),
    (b"caf\xe9 au lait", "not UTF-8 text (byte 3)"),
    (b"a", "1 token; a perplexity needs at least 2"),
], ids=["missing", "empty", "not-utf8", "one-token"])
def test_unusable_text_is_refused_in_one_line(programs, tmp_path, content, fragment):
    text = tmp_path / "text.txt"
    if content is not None:
        text.write_bytes(content)
    result = run("validate.py", str(programs.get("e2b", *KV_FLAGS)), "--model", "tiny", "--perplexity", str(text))
    assert_clean_error(result, 2, fragment)
    assert result.stdout == ""


def test_tokens_and_perplexity_together_are_a_usage_error(programs, text_file):
    result = run("validate.py", str(programs.get("e2b", *KV_FLAGS)), "--perplexity", str(text_file), "--tokens", "4")
    assert result.returncode == 2 and "which --perplexity replaces" in result.stderr and result.stdout == ""
