"""KV-cache programs: token-exact greedy parity with Hugging Face generate() through ring caches
and chunked prefill, multi-turn chat over one cache, memory that stays linear in the context, and
ExecuTorch's stock LLM runner."""

from __future__ import annotations

import pytest

from gemma3n_executorch import parity, tasks
from gemma3n_executorch.exporter import tokenizer_path_for
from gemma3n_executorch.generation import ChatSession, Generator, load_tokenizer
from gemma3n_executorch.runtime import Program
from gemma3n_executorch.variants import BOS_ID
from tests.conftest import run

CONTEXT = 160
CHUNK = 12  # tokens per call: the tiny model's sliding window is 16, so chunks straddle its edges
LENGTHS = ("--max-context-length", str(CONTEXT), "--max-seq-length", str(CHUNK))
# Unquantized fp32 on portable kernels: the program must match Hugging Face token for token.
FP32 = ("--dtype", "fp32", "--quantize", "none", "--quantize-embeddings", "none", "--backend", "portable",
        "--kv-cache", "fp32")
KV_FLAGS = ("--mode", "kv", *LENGTHS, *FP32)
NEW_TOKENS = 64
# 40 tokens: four calls of 12, 12, 12 and 4, whose boundaries fall inside the windows of 16.
PROMPT = [BOS_ID] + parity.probe_tokens(40, 512, BOS_ID)[1:]


@pytest.mark.parametrize("variant", ["e2b", "e4b"])
def test_greedy_tokens_equal_hugging_face_generate(programs, tiny_models, variant):
    model = tiny_models(variant)
    window = model.config.sliding_window
    assert len(PROMPT) > CHUNK and len(PROMPT) + NEW_TOKENS > 4 * window  # chunked, and the window slides
    program = Program(programs.get(variant, *KV_FLAGS))
    assert tasks.ring_size(window, CHUNK, CONTEXT) < len(PROMPT) + NEW_TOKENS  # the ring wraps around
    logits = program.step(PROMPT)
    tokens = []
    for _ in range(NEW_TOKENS):
        tokens.append(int(logits.argmax()))
        logits = program.step(tokens[-1:])
    assert tokens == parity.eager_greedy(model, PROMPT, NEW_TOKENS)
    assert len(set(tokens)) > 10  # a model stuck on one token would make this test vacuous


def test_one_call_chunked_and_token_by_token_prefill_agree(programs):
    one_call = Program(programs.get("e2b", "--mode", "kv", "--max-context-length", str(CONTEXT),
                                    "--max-seq-length", str(len(PROMPT)), *FP32))
    assert one_call.info.seq_len == len(PROMPT)
    whole = one_call.step(PROMPT)
    path = programs.get("e2b", *KV_FLAGS)
    chunked = Program(path).step(PROMPT)  # calls of 12, 12, 12, 4
    uneven = Program(path)
    for start, end in ((0, 7), (7, 19), (19, 20), (20, 32), (32, 40)):
        ragged = uneven.step(PROMPT[start:end])
    one_by_one = Program(path)
    for token in PROMPT:
        last = one_by_one.step([token])
    for other in (chunked, ragged, last):
        assert (whole - other).abs().max().item() <= 1e-4


def test_planned_memory_grows_only_by_the_full_attention_caches(programs, tiny_models):
    """Doubling the context twice adds exactly the full-attention owners' cache positions to the
    program's memory plan: activations are sized for one call, and sliding layers keep rings."""
    config = tiny_models("e2b").config
    full_owners = sum(1 for i, kind in enumerate(config.layer_types)
                      if kind == "full_attention" and i < config.num_hidden_layers - config.num_kv_shared_layers)
    bytes_per_position = full_owners * 2 * config.num_key_value_heads * config.head_dim * 4  # keys and values, fp32
    planned = {context: Program(programs.get("e2b", "--mode", "kv", "--max-context-length", str(context),
                                             "--max-seq-length", str(CHUNK), *FP32)).planned_bytes()
               for context in (CONTEXT, 4 * CONTEXT)}
    growth = planned[4 * CONTEXT] - planned[CONTEXT]
    # Alignment moves the plan by up to a few hundred bytes per buffer; a [chunk, context] mask
    # per layer, as before the rings, grew it by 23 kB here.
    assert abs(growth - 3 * CONTEXT * bytes_per_position) <= 4096, (planned, bytes_per_position)


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
PHONE_FLAGS = ("--mode", "kv", *LENGTHS, "--group-size", "32", "--verbose")


def chat_prompt(text: str) -> str:
    return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


def runner_text(path, prompt: str, max_new_tokens: int) -> str:
    """What ExecuTorch's stock runner streams for ``prompt`` (BOS added by the runner), stop token removed."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    pieces = []
    runner = TextLLMRunner(str(path), str(tokenizer_path_for(path)))
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0, num_bos=1),
                    token_callback=pieces.append)
    text = "".join(pieces)
    for stop in ("<end_of_turn>", "<eos>"):  # the runner also emits the stop token's text
        text = text.removesuffix(stop)
    return text


@pytest.mark.parametrize("flags", [KV_FLAGS, PHONE_FLAGS], ids=["portable-fp32", "phone"])
def test_stock_runner_produces_the_same_text(programs, flags):
    path = programs.get("e2b", *flags)
    tokenizer = load_tokenizer(tokenizer_path_for(path))
    prompt = chat_prompt("What is a phone? Say it in a few words.")
    ids = [BOS_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids
    assert len(ids) > CHUNK  # the runner prefills it in chunks of the program's max_seq_length
    ours = Generator(Program(path), tokenizer).generate(ids, max_new_tokens=40)
    expected = tokenizer.decode(ours.tokens, skip_special_tokens=False)
    assert runner_text(path, prompt, 40) == expected and len(expected) > 20


def test_stock_runner_stops_at_the_end_of_the_context(programs):
    path = programs.get("e2b", *KV_FLAGS)
    tokenizer = load_tokenizer(tokenizer_path_for(path))
    prompt = chat_prompt("Tell me everything about phones, " * 4)
    ids = [BOS_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids
    ours = Generator(Program(path), tokenizer).generate(ids, max_new_tokens=1000)
    assert ours.stop_reason == "context_full" and len(ids) + len(ours.tokens) == CONTEXT
    # The program answers <eos> at its last position, where ExecuTorch 1.4.1's runner would
    # otherwise feed one more token than the cache holds (tasks.KVCacheLM).
    assert runner_text(path, prompt, 1000) == tokenizer.decode(ours.tokens, skip_special_tokens=False)


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


def test_prompt_longer_than_the_context(programs):
    result = run("generate.py", str(programs.get("e2b", *KV_FLAGS)), "--prompt", "word " * 400)
    assert result.returncode == 2 and "--max-context-length" in result.stderr and "Traceback" not in result.stderr


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
