"""KV-cache programs: token-exact greedy parity with Hugging Face generate() through ring caches
and chunked prefill, multi-turn chat over one cache, memory that stays linear in the context, and
ExecuTorch's stock LLM runner."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch

from gemma3n_executorch import parity, stock_runner, tasks
from gemma3n_executorch.exporter import tokenizer_path_for
from gemma3n_executorch.generation import ChatSession, Generator, load_tokenizer
from gemma3n_executorch.progress import UserError
from gemma3n_executorch.runtime import Program
from gemma3n_executorch.variants import BOS_ID, EOS_ID, STOP_IDS
from tests.conftest import REPO, run

CONTEXT = 160
CHUNK = 12  # tokens per call: the tiny model's sliding window is 16, so chunks straddle its edges
LENGTHS = ("--max-context-length", str(CONTEXT), "--max-seq-length", str(CHUNK))
# Unquantized fp32 on portable kernels: the program must match Hugging Face token for token.
FP32_WEIGHTS = ("--dtype", "fp32", "--quantize", "none", "--quantize-embeddings", "none", "--backend", "portable")
FP32 = (*FP32_WEIGHTS, "--kv-cache", "fp32")
KV_FLAGS = ("--mode", "kv", *LENGTHS, *FP32)
# The same with this project's attention kernel in the full-attention layers (gemma3n_executorch/kernel).
GQA_KV_FLAGS = (*KV_FLAGS, "--attention-kernel", "gemma3n")
NEW_TOKENS = 64
# 40 tokens: four calls of 12, 12, 12 and 4, whose boundaries fall inside the windows of 16.
PROMPT = [BOS_ID] + parity.probe_tokens(40, 512, BOS_ID)[1:]


def program_greedy(program: Program, prompt: list[int], new_tokens: int) -> list[int]:
    """The program's greedy tokens after ``prompt`` (fed in calls of its max_seq_length)."""
    logits = program.step(prompt)
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(logits.argmax()))
        logits = program.step(tokens[-1:])
    return tokens


@pytest.mark.parametrize("variant, flags", [("e2b", KV_FLAGS), ("e4b", KV_FLAGS), ("e2b", GQA_KV_FLAGS)],
                         ids=["e2b", "e4b", "e2b-gemma3n-kernel"])
def test_greedy_tokens_equal_hugging_face_generate(programs, tiny_models, variant, flags):
    model = tiny_models(variant)
    window = model.config.sliding_window
    assert len(PROMPT) > CHUNK and len(PROMPT) + NEW_TOKENS > 4 * window  # chunked, and the window slides
    program = Program(programs.get(variant, *flags))
    assert tasks.ring_size(window, CHUNK, CONTEXT) < len(PROMPT) + NEW_TOKENS  # the ring wraps around
    tokens = program_greedy(program, PROMPT, NEW_TOKENS)
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


def test_gemma3n_kernel_gives_the_executorch_kernels_logits(programs):
    """The same program with this project's attention kernel in the full-attention layers: the
    logits of a chunked prefill and of every decode step after it agree within 1e-4."""
    programs_by_kernel = [Program(programs.get("e2b", *flags)) for flags in (KV_FLAGS, GQA_KV_FLAGS)]
    rows = [[program.step(PROMPT)] + [program.step([token]) for token in PROMPT[:NEW_TOKENS]]
            for program in programs_by_kernel]
    executorch_kernel, gemma3n_kernel = (torch.stack(r) for r in rows)
    assert programs_by_kernel[1].info.attention_kernel == "gemma3n"
    assert (executorch_kernel - gemma3n_kernel).abs().max().item() <= 1e-4


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
    # per layer, as before the rings, would grow it by about 23 kB here (computed).
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


def runner_text(path, prompt: str, max_new_tokens: int) -> bytes:
    return stock_runner.printed(path, tokenizer_path_for(path), prompt, max_new_tokens)


@pytest.mark.parametrize("flags", [KV_FLAGS, PHONE_FLAGS, GQA_KV_FLAGS], ids=["portable-fp32", "phone", "gemma3n-kernel"])
def test_stock_runner_produces_the_same_text(programs, flags):
    path = programs.get("e2b", *flags)
    tokenizer = load_tokenizer(tokenizer_path_for(path))
    prompt = chat_prompt("What is a phone? Say it in a few words.")
    ids = [BOS_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids
    assert len(ids) > CHUNK  # the runner prefills it in chunks of the program's max_seq_length
    ours = Generator(Program(path), tokenizer).generate(ids, max_new_tokens=40)
    expected = stock_runner.printed_for(tokenizer, ours.tokens)
    assert runner_text(path, prompt, 40) == expected and len(expected) > 20


def test_generation_stops_at_the_end_of_the_context(programs):
    """The program answers <eos> at its last position (tasks.KVCacheLM), where ExecuTorch 1.4.1's
    runner would otherwise feed one token more than the cache holds; ours stops there, and the
    stock runner, asked for more tokens than fit, prints the same text and stops there too."""
    path = programs.get("e2b", *KV_FLAGS)
    tokenizer = load_tokenizer(tokenizer_path_for(path))
    prompt = chat_prompt("Tell me everything about phones, " * 4)
    ids = [BOS_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids
    assert len(ids) > CHUNK
    program = Program(path)
    ours = Generator(program, tokenizer).generate(ids, max_new_tokens=1000)
    assert ours.stop_reason == "context_full" and len(ids) + len(ours.tokens) == CONTEXT == program.position
    program.reset()
    last = program.step(ids + ours.tokens)
    assert int(last.argmax()) == EOS_ID and torch.isinf(last).sum() == last.numel() - 1
    assert runner_text(path, prompt, 1000) == stock_runner.printed_for(tokenizer, ours.tokens)


def readme_runner_snippet() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Deploy with ExecuTorch's stock runner"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]


@pytest.mark.parametrize("flags", [KV_FLAGS, PHONE_FLAGS], ids=["portable-fp32", "phone"])
def test_readme_stock_runner_snippet_runs_verbatim_and_produces_our_tokens(programs, tmp_path, flags):
    """The README's TextLLMRunner code, run as written in a fresh interpreter (so nothing of ours
    has registered the custom ops), beside the two files it names: it must print the bytes of
    the tokens this project's runtime generates for the same prompt (which tests above hold to
    Hugging Face's)."""
    path = programs.get("e2b", *flags)
    (tmp_path / "model-kv.pte").symlink_to(path)
    (tmp_path / "model-kv.tokenizer.json").symlink_to(tokenizer_path_for(path))
    (tmp_path / "snippet.py").write_text(readme_runner_snippet())
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]

    tokenizer = load_tokenizer(tokenizer_path_for(path))
    prompt = gemma_prompt_ids(tokenizer, "Hello")
    ours = Generator(Program(path), tokenizer).generate(prompt, max_new_tokens=64)
    expected = stock_runner.printed_for(tokenizer, ours.tokens)
    printed = result.stdout.split(stock_runner.STATISTICS)[0]
    for stop in stock_runner.STOP_TEXTS:
        printed = printed.removesuffix(stop)
    assert printed == expected and len(ours.tokens) > 10


def gemma_prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n").ids  # <bos> first


def until_stop(tokens: list[int], limit: int) -> list[int]:
    stop = next((i for i, token in enumerate(tokens) if token in STOP_IDS), len(tokens))
    return tokens[:min(stop, limit)]


TIMING = re.compile(r"\n\[prefill (\d+) tokens at ([\d.]+) tok/s, decode (\d+) tokens at ([\d.]+) tok/s, "
                    r"time to first token ([\d.]+) s\]\n")


def test_generate_cli_streams_text_and_timing(programs, tiny_models):
    """The streamed text is the decode of Hugging Face's own greedy tokens for the chat prompt, and
    stderr holds the timing line alone: the prompt's token count, one decode step per token after
    the first (one more when a stop token ended the reply), rates and a first-token time that the
    run's own duration bounds."""
    path = programs.get("e2b", *KV_FLAGS)
    tokenizer = load_tokenizer(tokenizer_path_for(path))
    prompt = gemma_prompt_ids(tokenizer, "Hello")
    limit = 20
    expected = until_stop(parity.eager_greedy(tiny_models("e2b"), prompt, limit), limit)
    started = time.perf_counter()
    result = run("generate.py", str(path), "--prompt", "  Hello\n", "--max-new-tokens", str(limit))  # trimmed as Gemma does
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == tokenizer.decode(expected, skip_special_tokens=False) and len(expected) > 3
    timing = TIMING.fullmatch(result.stderr)
    assert timing, result.stderr
    prefill_tokens, prefill_rate, decode_steps, decode_rate, first_token = timing.groups()
    assert int(prefill_tokens) == len(prompt)
    assert int(decode_steps) == (len(expected) - 1 if len(expected) == limit else len(expected))
    assert float(prefill_rate) > 0 and float(decode_rate) > 0 and 0 < float(first_token) < elapsed


def test_generate_prints_nothing_of_the_runtime_on_stderr(programs):
    """ExecuTorch's thread pool reported five Info lines about ARM registers on every XNNPACK run
    ([cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version, ...)."""
    result = run("generate.py", str(programs.get("e2b", *PHONE_FLAGS)), "--prompt", "Hello", "--max-new-tokens", "4")
    assert result.returncode == 0 and TIMING.fullmatch(result.stderr), result.stderr


def test_generate_cli_system_prompt_is_folded_into_the_first_turn(programs, tiny_models):
    path = programs.get("e2b", *KV_FLAGS)
    tokenizer = load_tokenizer(tokenizer_path_for(path))
    prompt = gemma_prompt_ids(tokenizer, "Be brief.\n\nHello")
    expected = until_stop(parity.eager_greedy(tiny_models("e2b"), prompt, 12), 12)
    result = run("generate.py", str(path), "--system", "Be brief.", "--prompt", "Hello", "--max-new-tokens", "12")
    assert result.returncode == 0 and result.stdout == tokenizer.decode(expected, skip_special_tokens=False)
    assert f"prefill {len(prompt)} tokens" in result.stderr


def chat(path, stdin: bytes, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "generate.py"), str(path), *flags], input=stdin,
                          capture_output=True)


def test_chat_survives_a_line_that_is_not_utf8(programs):
    result = chat(programs.get("e2b", *KV_FLAGS), b"caf\xe9\nHello\n", "--max-new-tokens", "4")
    stderr = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in stderr
    assert "error: that line is not UTF-8 text; type it again" in stderr and stderr.count("prefill") == 1


def test_chat_says_when_the_conversation_is_full(programs):
    """The cache holds 160 positions; the third long turn cannot fit."""
    turn = b"word " * 25 + b"\n"
    result = chat(programs.get("e2b", *KV_FLAGS), turn * 3 + b"/reset\n" + turn, "--max-new-tokens", "8")
    stderr = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in stderr
    assert "error: the conversation is full" in stderr and "type /reset to start a new one" in stderr
    assert stderr.count("prefill") == 3  # two turns, then one more after /reset


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


def test_generate_runs_fixed_programs_by_sliding_the_window(programs, tiny_models):
    """40 new tokens after the prompt overflow the 32-token window: each must be Hugging Face's
    greedy token for the last 32 tokens."""
    path = programs.get("e2b", "--dtype", "fp32")
    tokenizer = load_tokenizer(tokenizer_path_for(path))
    history = gemma_prompt_ids(tokenizer, "Hello")
    model, new = tiny_models("e2b"), []
    with torch.no_grad():
        while len(new) < 40:
            token = int(model(input_ids=torch.tensor([history[-32:]])).logits[0, -1].argmax())
            if token in STOP_IDS:
                break
            new.append(token)
            history.append(token)
    assert len(history) > 32 + 8  # the window really slid
    result = run("generate.py", str(path), "--prompt", "Hello", "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == tokenizer.decode(new, skip_special_tokens=False)


def test_validate_kv_program_against_eager(programs):
    result = run("validate.py", str(programs.get("e2b", *KV_FLAGS)), "--model", "tiny", "--tokens", "64")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical to eager generate()" in result.stdout


def test_program_refuses_token_ids_outside_its_vocabulary(programs, tiny_models):
    """The program gathers embedding rows unchecked: id 512 of a 512-token vocabulary returned
    finite logits read from other memory, id 10**9 crashed the process."""
    vocab = tiny_models("e2b").config.vocab_size
    kv, fixed = Program(programs.get("e2b", *KV_FLAGS)), Program(programs.get("e2b"))
    for bad in (vocab, 10**9, -1):
        with pytest.raises(UserError, match=f"token id {bad} is outside the program's vocabulary"):
            kv.step([BOS_ID, bad])
        with pytest.raises(UserError, match="outside the program's vocabulary"):
            fixed.forward_fixed(torch.tensor([[BOS_ID] + [bad] * 31]))
    assert kv.position == 0
    assert torch.isfinite(kv.step([BOS_ID, vocab - 1])).all()  # the last id is still in range


def test_generate_refuses_a_tokenizer_of_another_model(programs, tmp_path):
    from tokenizers import Tokenizer, models

    other = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    other.save(str(tmp_path / "other.json"))
    result = run("generate.py", str(programs.get("e2b", *KV_FLAGS)), "--tokenizer", str(tmp_path / "other.json"),
                 "--prompt", "hello")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: the tokenizer is not this program's Gemma tokenizer (<pad> is id None" in result.stderr
    assert result.stdout == ""


def test_validate_kv_program_with_a_context_shorter_than_the_probe(programs):
    """A valid kv program holding 8 positions failed its own shape check (expected (-4, 512))."""
    result = run("validate.py", str(programs.get("e2b", "--mode", "kv", "--max-context-length", "8", "--max-seq-length", "8", "--dtype", "fp32",
                                                 "--quantize", "none", "--quantize-embeddings", "none",
                                                 "--backend", "portable")), "--model", "tiny")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  logits shape (1, 512)" in result.stdout and "PASS  greedy decoding of 1 tokens" in result.stdout


def test_validate_enforces_greedy_parity_and_states_every_bound(programs, tmp_path):
    from gemma3n_executorch import checkpoint
    from gemma3n_executorch.variants import VARIANTS
    from tests.checkpoints import write_text_only

    other = write_text_only(checkpoint.build_tiny(VARIANTS["e2b"], seed=7), tmp_path / "other")
    result = run("validate.py", str(programs.get("e2b", *KV_FLAGS)), "--model", str(other))
    assert result.returncode == 1
    assert "FAIL  greedy decoding of 16 tokens: first differs from eager generate()" in result.stdout
    phone = run("validate.py", str(programs.get("e2b", *PHONE_FLAGS)), "--model", "tiny")
    assert "tolerance: top-1 >= 0.9, relative L2 <= 0.15" in phone.stdout
