"""KV-cache programs: token-exact greedy parity with Hugging Face generate(), one-call prefill,
multi-turn chat over one cache, and ExecuTorch's stock LLM runner."""

from __future__ import annotations

import pytest

from gemma3n_executorch import parity
from gemma3n_executorch.exporter import tokenizer_path_for
from gemma3n_executorch.generation import ChatSession, Generator, load_tokenizer
from gemma3n_executorch.runtime import Program
from gemma3n_executorch.variants import BOS_ID
from tests.conftest import run

MAX_SEQ_LEN = 160
# Unquantized fp32 on portable kernels: the program must match Hugging Face token for token.
KV_FLAGS = ("--mode", "kv", "--max-seq-len", str(MAX_SEQ_LEN), "--dtype", "fp32", "--quantize", "none",
            "--quantize-embeddings", "none", "--backend", "portable")
NEW_TOKENS = 64
PROMPT = [BOS_ID, 10, 200, 33, 47, 300, 12, 9, 100, 101]


@pytest.mark.parametrize("variant", ["e2b", "e4b"])
def test_greedy_tokens_equal_hugging_face_generate(programs, tiny_models, variant):
    model = tiny_models(variant)
    assert len(PROMPT) + NEW_TOKENS > 2 * model.config.sliding_window  # the window really slides
    program = Program(programs.get(variant, *KV_FLAGS))
    logits = program.step(PROMPT)
    tokens = []
    for _ in range(NEW_TOKENS):
        tokens.append(int(logits.argmax()))
        logits = program.step(tokens[-1:])
    assert tokens == parity.eager_greedy(model, PROMPT, NEW_TOKENS)
    assert len(set(tokens)) > 10  # a model stuck on one token would make this test vacuous


def test_one_call_prefill_equals_token_by_token(programs):
    path = programs.get("e2b", *KV_FLAGS)
    whole = Program(path).step(PROMPT)
    one_by_one = Program(path)
    for token in PROMPT:
        last = one_by_one.step([token])
    assert (whole - last).abs().max().item() <= 1e-4


def test_chat_second_turn_reuses_cache_and_equals_fresh_run(programs):
    path = programs.get("e2b", *KV_FLAGS)
    tokenizer = load_tokenizer(tokenizer_path_for(path))
    session = ChatSession(Generator(Program(path), tokenizer))
    session.turn("Hello there", max_new_tokens=12)
    cached, unfed = len(session.transcript), list(session.unfed)
    second = session.turn("Tell me more", max_new_tokens=12)
    new_turn = tokenizer.encode("<end_of_turn>\n<start_of_turn>user\nTell me more<end_of_turn>\n"
                                "<start_of_turn>model\n", add_special_tokens=False).ids
    # Only the new turn (and a token the first reply left unfed) is prefilled, not the history.
    assert second.timing.prompt_tokens == len(unfed) + len(new_turn) < cached

    history = session.transcript[:cached + second.timing.prompt_tokens]
    assert history[0] == BOS_ID and history[-len(new_turn):] == new_turn
    again = Generator(Program(path), tokenizer).generate(history, max_new_tokens=12)
    assert again.tokens == second.tokens and len(second.tokens) > 0


# The --mode kv defaults: XNNPACK, 8da4w linears, 4-bit embeddings (tests/test_phone_program.py).
# The tiny model is 64 wide: 32-weight groups, so its linear layers really are quantized.
PHONE_FLAGS = ("--mode", "kv", "--max-seq-len", str(MAX_SEQ_LEN), "--group-size", "32", "--verbose")


@pytest.mark.parametrize("flags", [KV_FLAGS, PHONE_FLAGS], ids=["portable-fp32", "phone"])
def test_stock_runner_produces_the_same_text(programs, flags):
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    path = programs.get("e2b", *flags)
    tokenizer_path = tokenizer_path_for(path)
    prompt = "<start_of_turn>user\nWhat is a phone?<end_of_turn>\n<start_of_turn>model\n"
    ours = Generator(Program(path), load_tokenizer(tokenizer_path)).generate(
        [BOS_ID] + load_tokenizer(tokenizer_path).encode(prompt, add_special_tokens=False).ids, max_new_tokens=40)
    expected = load_tokenizer(tokenizer_path).decode(ours.tokens, skip_special_tokens=False)

    pieces = []
    runner = TextLLMRunner(str(path), str(tokenizer_path))
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=40, temperature=0.0, num_bos=1),
                    token_callback=pieces.append)
    text = "".join(pieces)
    for stop in ("<end_of_turn>", "<eos>"):  # the runner also emits the stop token's text
        text = text.removesuffix(stop)
    assert text == expected and len(expected) > 20


def test_generate_cli_streams_text_and_timing(programs):
    path = programs.get("e2b", *KV_FLAGS)
    result = run("generate.py", str(path), "--prompt", "Hello", "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() and "prefill" in result.stderr and "tok/s" in result.stderr
    assert "time to first token" in result.stderr


def test_generate_cli_sampling_is_seeded(programs):
    path = programs.get("e2b", *KV_FLAGS)
    args = (str(path), "--prompt", "Hello", "--max-new-tokens", "20", "--temperature", "1.0", "--top-p", "0.9")
    first, second = run("generate.py", *args, "--seed", "3"), run("generate.py", *args, "--seed", "3")
    other = run("generate.py", *args, "--seed", "4")
    assert first.stdout == second.stdout and first.stdout != other.stdout


def test_prompt_longer_than_max_seq_len(programs):
    result = run("generate.py", str(programs.get("e2b", *KV_FLAGS)), "--prompt", "word " * 400)
    assert result.returncode == 2 and "max-seq-len" in result.stderr and "Traceback" not in result.stderr


def test_missing_tokenizer(programs, tmp_path):
    result = run("generate.py", str(programs.get("e2b", *KV_FLAGS)), "--tokenizer", str(tmp_path / "none.json"),
                 "--prompt", "Hi")
    assert result.returncode == 2 and "no tokenizer" in result.stderr and "Traceback" not in result.stderr


def test_fixed_program_where_kv_is_required(programs):
    program = Program(programs.get("e2b"))
    with pytest.raises(Exception, match="--mode fixed program; this needs a --mode kv program"):
        program.step([BOS_ID])


def test_generate_runs_fixed_programs_by_sliding_the_window(programs):
    result = run("generate.py", str(programs.get("e2b", "--dtype", "fp32")), "--prompt", "Hello",
                 "--max-new-tokens", "40")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]


def test_validate_kv_program_against_eager(programs):
    result = run("validate.py", str(programs.get("e2b", *KV_FLAGS)), "--model", "tiny", "--tokens", "64")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical to eager generate()" in result.stdout
