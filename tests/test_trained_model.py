"""The small trained Gemma 3n that comes with the project (--model tiny-trained): its files are the
ones its provenance records, it has learned its corpus, and its programs compute what Hugging Face
computes from it, fp32 exactly and the phone recipe as torchao's eager quantization does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

from gemma3n_executorch import checkpoint, parity, preflight, quantize
from gemma3n_executorch.generation import Generator, load_tokenizer
from gemma3n_executorch.options import DEFAULT_GROUP_SIZE
from gemma3n_executorch.progress import UserError
from gemma3n_executorch.runtime import Program
from gemma3n_executorch.variants import (BOS_ID, HELD_OUT_FILE, PROVENANCE_FILE, TRAINED_DIRECTORY, TRAINED_MODEL,
                                         VARIANTS, WEIGHTS_FILE)
from tests.conftest import REPO, run
from tests.test_kv_generation import FP32, program_greedy
from tests.test_perplexity import PERPLEXITY_LINE, reference_perplexity, relative_change

E2B = VARIANTS["e2b"]
WINDOW = E2B.trained_config["sliding_window"]  # 64
CONTEXT, CHUNK = 384, 48
LENGTHS = ("--max-context-length", str(CONTEXT), "--max-seq-length", str(CHUNK))
FP32_FLAGS = ("--mode", "kv", *LENGTHS, *FP32)
PHONE_FLAGS = ("--mode", "kv", *LENGTHS)  # the phone recipe, at its own defaults (groups of 128)
PROMPT_TOKENS = 100  # past two chunks
NEW_TOKENS = 200  # with the prompt, past four sliding windows
SCORED_TOKENS = 1000  # of the held-out text, for the perplexity checks: three windows of the program
README_PROMPT = "def "  # what the README's first command asks the trained model to continue
GENERATED_TOKENS = 60
NEAR_TIE = 0.1  # logits; measured: 0 (the same 60 tokens as eager quantization)


@pytest.fixture(scope="module")
def trained():
    return checkpoint.load(TRAINED_MODEL, E2B, torch.float32).model


@pytest.fixture(scope="module")
def eager_quantized():
    """torchao's quantization of the phone recipe, run eagerly: the phone program's reference."""
    model = checkpoint.load(TRAINED_MODEL, E2B, torch.float32).model
    quantize.apply(model, "8da4w", "4w", DEFAULT_GROUP_SIZE, torch.float32)
    return model


@pytest.fixture(scope="module")
def held_out_ids() -> list[int]:
    tokenizer = load_tokenizer(TRAINED_DIRECTORY / "tokenizer.json")
    text = (TRAINED_DIRECTORY / HELD_OUT_FILE).read_text()
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_the_files_are_the_ones_the_provenance_records_and_a_changed_byte_is_refused(tmp_path, monkeypatch):
    recorded = json.loads((TRAINED_DIRECTORY / PROVENANCE_FILE).read_text())["sha256"]
    assert WEIGHTS_FILE in recorded and (TRAINED_DIRECTORY / WEIGHTS_FILE).stat().st_size <= 10 * 2**20
    assert preflight.local_checkpoint(TRAINED_MODEL) == TRAINED_DIRECTORY
    copy = shutil.copytree(TRAINED_DIRECTORY, tmp_path / "tiny_trained")
    weights = bytearray((copy / WEIGHTS_FILE).read_bytes())
    weights[-1] ^= 1  # one bit of the last weight
    (copy / WEIGHTS_FILE).write_bytes(weights)
    monkeypatch.setattr(preflight, "TRAINED_DIRECTORY", copy)
    with pytest.raises(UserError, match="sha256 differs"):
        preflight.local_checkpoint(TRAINED_MODEL)


def test_it_predicts_held_out_text_far_better_than_the_same_model_with_random_weights(trained, held_out_ids):
    tokens = held_out_ids[:SCORED_TOKENS]
    untrained = Gemma3nForCausalLM(Gemma3nTextConfig(**E2B.trained_config))
    checkpoint.randomize_(untrained)
    untrained.set_attn_implementation(checkpoint.ATTENTION)
    learned = reference_perplexity(trained, tokens, 255)
    chance = reference_perplexity(untrained.eval(), tokens, 255)
    assert learned < chance / 50, (learned, chance)


def test_fp32_kv_program_is_token_exact_with_hugging_face_generate(programs, trained, held_out_ids):
    prompt = [BOS_ID] + held_out_ids[:PROMPT_TOKENS - 1]
    assert PROMPT_TOKENS > 2 * CHUNK and PROMPT_TOKENS + NEW_TOKENS > 4 * WINDOW
    tokens = program_greedy(Program(programs.get("e2b", *FP32_FLAGS, model=TRAINED_MODEL)), prompt, NEW_TOKENS)
    assert tokens == parity.eager_greedy(trained, prompt, NEW_TOKENS)
    assert len(set(tokens)) > 10  # it repeats itself, as small models do, but not one token


@pytest.fixture(scope="module")
def scored_text(tmp_path_factory, held_out_ids) -> tuple[str, list[int]]:
    """The first SCORED_TOKENS of the held-out text, as a file validate.py reads."""
    tokenizer = load_tokenizer(TRAINED_DIRECTORY / "tokenizer.json")
    text = tokenizer.decode(held_out_ids[:SCORED_TOKENS])
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text(text)
    return path, tokenizer.encode(text, add_special_tokens=False).ids


def perplexities_of(program, text_path) -> dict[str, float]:
    result = run("validate.py", str(program), "--model", TRAINED_MODEL, "--perplexity", str(text_path))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return {name: float(value) for name, value in PERPLEXITY_LINE.findall(result.stdout)}


def test_perplexity_of_the_fp32_program_is_eagers(programs, trained, scored_text):
    path, tokens = scored_text
    reference = reference_perplexity(trained, tokens, CONTEXT - 1)
    measured = perplexities_of(programs.get("e2b", *FP32_FLAGS, model=TRAINED_MODEL), path)
    assert relative_change(measured["program"], reference) <= parity.tolerance_for("fp32", "none").max_perplexity_change
    assert relative_change(measured["eager fp32"], reference) <= 1e-5


def test_perplexity_of_the_phone_program_is_its_quantization_run_eagerly(programs, scored_text, eager_quantized):
    path, tokens = scored_text
    quantized = reference_perplexity(eager_quantized, tokens, CONTEXT - 1)
    measured = perplexities_of(programs.get("e2b", *PHONE_FLAGS, model=TRAINED_MODEL), path)
    assert relative_change(measured["program"], quantized) <= parity.TRAINED_PHONE_PERPLEXITY_CHANGE, (measured, quantized)


def test_generate_prints_the_greedy_text_of_torchaos_eager_quantization(programs, eager_quantized):
    """generate.py on the trained phone program, as the README runs it: its text is the program's
    greedy tokens, and those are eager torchao quantization's, except at near-ties: teacher-forced
    along the program's tokens, eager quantization's best logit is never more than NEAR_TIE above
    the logit of the token the program chose."""
    path = programs.get("e2b", *PHONE_FLAGS, model=TRAINED_MODEL)
    tokenizer = load_tokenizer(TRAINED_DIRECTORY / "tokenizer.json")
    prompt = README_PROMPT
    assert f'--no-chat-template --prompt "{prompt}" --max-new-tokens {GENERATED_TOKENS}' in (REPO / "README.md").read_text()
    printed = run("generate.py", str(path), "--prompt", prompt, "--no-chat-template", "--max-new-tokens",
                  str(GENERATED_TOKENS), check=True).stdout
    ours = Generator(Program(path), tokenizer).generate([BOS_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids,
                                                        max_new_tokens=GENERATED_TOKENS)
    assert printed.startswith(tokenizer.decode(ours.tokens)) and len(ours.tokens) == GENERATED_TOKENS
    sequence = [BOS_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids + ours.tokens
    with torch.no_grad():
        logits = eager_quantized(input_ids=torch.tensor([sequence[:-1]]), use_cache=False).logits[0, -GENERATED_TOKENS:]
    chosen = logits.gather(1, torch.tensor(ours.tokens)[:, None])[:, 0]
    margins = logits.max(dim=1).values - chosen
    assert margins.max().item() <= NEAR_TIE, [(i, m) for i, m in enumerate(margins.tolist()) if m > 0]
