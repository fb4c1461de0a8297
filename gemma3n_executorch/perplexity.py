"""Perplexity of a program, and of the eager fp32 model of its checkpoint, over the same text.

The text's tokens are cut into windows the program holds. Each window is fed after a <bos>, as
Gemma is trained, and each of its tokens is scored once, predicted from the <bos> and the window's
tokens before it. Both sides score the same tokens from the same context at the same positions,
so their perplexities compare directly.

* A kv program takes windows of ``context_len - 1`` tokens, fed one token per call from a
  restarted cache: it returns the logits of a call's last token only, so one call per scored
  token is the fewest its interface allows, and a one-token call (a decode step) is the cheapest.
  Its last position stays unused: there the program answers <eos> (tasks.KVCacheLM).
* A fixed program takes windows of ``seq_len`` tokens, one forward each (the last right-padded:
  the model is causal, padding cannot change the positions before it).
* The eager model takes each window in calls of ``EAGER_CALL_TOKENS`` through Hugging Face's own
  cache, so that its memory is one call's logits however long the window.

The program is scored and released before the eager model is loaded: they never share memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import parity, validation
from .exporter import tokenizer_path_for
from .generation import check_tokenizer, load_tokenizer
from .metadata import ProgramInfo
from .options import KV
from .progress import Progress, StageTimer, UserError
from .runtime import Program
from .variants import BOS_ID, PAD_ID


# E2B's logits for 128 tokens take 134 MB in fp32; for a whole 4096-token window they would take 4.3 GB.
EAGER_CALL_TOKENS = 128


@dataclass(frozen=True)
class Window:
    fed: list[int]  # <bos>, then the window's tokens but its last
    targets: list[int]  # the window's tokens: what each position of ``fed`` predicts


def window_length(info: ProgramInfo) -> int:
    return info.context_len - 1 if info.mode == KV else info.seq_len


def split_windows(tokens: list[int], length: int) -> list[Window]:
    return [Window([BOS_ID] + tokens[start:start + length - 1], tokens[start:start + length])
            for start in range(0, len(tokens), length)]


class Tally:
    """Negative log-likelihood summed over scored tokens, and the top-1 token at each (to compare
    two scorings of the same windows position by position)."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0
        self.top1: list[int] = []

    def add(self, logits: torch.Tensor, targets: list[int]) -> None:
        """``logits`` [len(targets) or more, vocab]: row i predicts targets[i]; rows past the
        targets (a last window's last fed token predicts nothing) are left out."""
        log_probabilities = logits[:len(targets)].float().log_softmax(-1)
        picked = log_probabilities.gather(-1, torch.tensor(targets, dtype=torch.long).unsqueeze(-1))
        self.nll -= picked.double().sum().item()
        self.tokens += len(targets)
        self.top1 += log_probabilities.argmax(-1).tolist()

    def top1_agreement(self, other: "Tally") -> float:
        assert len(self.top1) == len(other.top1)
        return sum(a == b for a, b in zip(self.top1, other.top1)) / len(self.top1)

    @property
    def perplexity(self) -> float:
        try:
            return math.exp(self.nll / self.tokens)
        except OverflowError:
            return math.inf


def score_program(program: Program, windows: list[Window], progress: Progress) -> Tally:
    info, tally = program.info, Tally()
    for window in windows:
        if info.mode == KV:
            program.reset()
            for token, target in zip(window.fed, window.targets):
                tally.add(program.step([token]).unsqueeze(0), [target])
                progress.advance(1)
        else:
            padded = window.fed + [PAD_ID] * (info.seq_len - len(window.fed))
            logits = program.forward_fixed(torch.tensor([padded], dtype=torch.long))[0]
            tally.add(logits[:len(window.targets)], window.targets)
            progress.advance(len(window.targets))
    return tally


def score_eager(model: torch.nn.Module, windows: list[Window], progress: Progress) -> Tally:
    from transformers import DynamicCache

    tally = Tally()
    with torch.no_grad():
        for window in windows:
            cache = DynamicCache(config=model.config)
            for start in range(0, len(window.fed), EAGER_CALL_TOKENS):
                ids = torch.tensor([window.fed[start:start + EAGER_CALL_TOKENS]], dtype=torch.long)
                logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0]
                tally.add(logits, window.targets[start:start + EAGER_CALL_TOKENS])
                progress.advance(ids.shape[1])
    return tally


def measure(path: Path, model: str | None, text: str, text_name: Path, tokenizer_path: Path | None) -> int:
    """Print the program's perplexity over ``text`` and, given ``model``, eager fp32's and their
    ratio; 0 when every check passed, 1 otherwise."""
    tokenizer = load_tokenizer(tokenizer_path or tokenizer_path_for(path))
    tokens = tokenizer.encode(text, add_special_tokens=False).ids
    if len(tokens) < 2:
        raise UserError(f"--perplexity {text_name}: {len(tokens)} token{'s' * (len(tokens) != 1)}; "
                        "a perplexity needs at least 2")
    program = Program(path)
    info = program.info
    check_tokenizer(tokenizer, info.vocab_size)
    if model is not None:
        validation.check_checkpoint(model, info)
    windows = split_windows(tokens, window_length(info))
    timer = StageTimer()
    with timer.stage("program"):
        program_tally = score_program(program, windows, Progress("program", len(tokens), "tokens"))
    del program
    kind = "kv cache" if info.mode == KV else "fixed window"
    print(f"program perplexity {program_tally.perplexity:.4f} over {len(tokens):,} tokens "
          f"({kind}, {len(windows):,} window{'s' * (len(windows) > 1)} of up to {window_length(info):,}, each after <bos>)")
    ratio = None
    if model is not None:
        with timer.stage("load eager fp32"):
            reference = validation.eager_model(model, info)
        with timer.stage("eager fp32"):
            eager_tally = score_eager(reference, windows, Progress("eager fp32", len(tokens), "tokens"))
        ratio = program_tally.perplexity / eager_tally.perplexity
        print(f"eager fp32 perplexity {eager_tally.perplexity:.4f} ({model}, the same tokens and windows)")
        print(f"ratio {ratio:.5f} (program / eager fp32)")
    checks = validation.Checks()
    checks.check(math.isfinite(program_tally.perplexity), "the program's perplexity is finite")
    # Only an unquantized fp32 program has a bound, and eager fp32 is its own configuration.
    bound = parity.tolerance_for(info.dtype, info.quantize, info.embeddings, info.kv_cache).max_perplexity_change
    if ratio is not None and bound is not None:
        checks.check(abs(ratio - 1) <= bound, f"an unquantized fp32 program's perplexity is eager fp32's within {bound:.1%}")
    elif ratio is not None:
        cache = f", {info.kv_cache} KV cache" if info.mode == KV else ""
        print(f"(a {info.dtype} program with quantize {info.quantize}, embeddings {info.embeddings}{cache}: "
              "the ratio is what these cost on this text; no bound is enforced)")
    print(f"{'all checks passed' if not checks.failed else f'{checks.failed} check(s) failed'}")
    return 0 if not checks.failed else 1
