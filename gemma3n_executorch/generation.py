"""Text generation over an exported program: sampling, the Gemma chat format, streaming, timing.

A KV program prefills a prompt in calls of up to its max_seq_length tokens, then takes one token
per call; the chat session
keeps its cache between turns, so a new turn prefills only the new text. A fixed-window program
is driven by re-running its window over the last ``seq_len`` tokens for every new token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from .options import KV
from .progress import UserError
from .runtime import Program
from .variants import BOS_ID, PAD_ID, STOP_IDS

USER_TURN = "<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"
END_OF_TURN = "<end_of_turn>\n"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0


class Sampler:
    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.sampling.temperature <= 0:
            return int(logits.argmax())
        scores = logits.float() / self.sampling.temperature
        if self.sampling.top_k > 0:
            kth = torch.topk(scores, min(self.sampling.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        if self.sampling.top_p < 1.0:
            sorted_probabilities, order = torch.sort(probabilities, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            outside = sorted_probabilities.cumsum(-1) - sorted_probabilities >= self.sampling.top_p
            probabilities = probabilities.scatter(0, order, sorted_probabilities.masked_fill(outside, 0.0))
        return int(torch.multinomial(probabilities, 1, generator=self.generator))


class FixedWindowDecoder:
    """Gives a fixed-window program the KV program's ``step`` interface.

    Every step re-runs the window: tokens past the window fall out of the context. Short
    histories are right-padded; the model is causal, so padding after a position cannot change
    that position's logits.
    """

    def __init__(self, program: Program):
        self.program = program
        self.window = program.info.seq_len
        self.history: list[int] = []
        self.position = 0

    def reset(self) -> None:
        self.history, self.position = [], 0

    def step(self, tokens: list[int]) -> torch.Tensor:
        self.history.extend(tokens)
        self.position = len(self.history)
        context = self.history[-self.window:]
        padded = context + [PAD_ID] * (self.window - len(context))
        logits = self.program.forward_fixed(torch.tensor([padded], dtype=torch.long))[0]
        return logits[len(context) - 1]


@dataclass
class Timing:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_token_seconds: float = 0.0

    def summary(self) -> str:
        prefill = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0
        decode_steps = max(self.generated_tokens - 1, 0)
        decode = decode_steps / self.decode_seconds if self.decode_seconds else 0.0
        return (f"prefill {self.prompt_tokens} tokens at {prefill:.1f} tok/s, decode {decode_steps} tokens at "
                f"{decode:.1f} tok/s, time to first token {self.first_token_seconds:.3f} s")


@dataclass
class Reply:
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = ""  # "eos", "max_new_tokens" or "context_full"
    timing: Timing = field(default_factory=Timing)

    @property
    def unfed(self) -> list[int]:
        """Sampled tokens the decoder has not consumed: the last one, unless a stop id or the full
        context ended the reply."""
        return [] if self.stop_reason in ("eos", "context_full") or not self.tokens else self.tokens[-1:]


def load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise UserError(f"no tokenizer at {path}; pass --tokenizer PATH/tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"{path}: not a tokenizer.json the tokenizers library can read ({error})") from None


class Generator:
    """Feeds prompts and samples replies; the decoder's cache position is the conversation so far."""

    def __init__(self, program: Program, tokenizer: Tokenizer, sampling: Sampling = Sampling()):
        self.program = program
        self.decoder = program if program.info.mode == KV else FixedWindowDecoder(program)
        self.capacity = program.info.context_len if program.info.mode == KV else None
        self.tokenizer = tokenizer
        self.sample = Sampler(sampling)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def position(self) -> int:
        return self.decoder.position

    def reset(self) -> None:
        self.decoder.reset()

    def generate(self, prompt_ids: list[int], max_new_tokens: int,
                 on_text: Callable[[str], None] | None = None) -> Reply:
        """Append ``prompt_ids`` after what the decoder holds, then sample up to ``max_new_tokens``."""
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if self.capacity is not None and self.position + len(prompt_ids) >= self.capacity:
            raise UserError(
                f"the prompt needs {self.position + len(prompt_ids)} of the program's {self.capacity} positions "
                "and leaves none to generate; shorten it or re-export with a larger --max-context-length"
            )
        reply = Reply()
        reply.timing.prompt_tokens = len(prompt_ids)
        started = time.perf_counter()
        logits = self.decoder.step(prompt_ids)
        reply.timing.prefill_seconds = time.perf_counter() - started
        streamed = ""
        while True:
            if self.capacity is not None and self.position >= self.capacity:
                # The program answers <eos> at its last position (tasks.KVCacheLM): nothing to sample.
                reply.stop_reason = "context_full"
                break
            token = self.sample(logits)
            if not reply.tokens:
                reply.timing.first_token_seconds = time.perf_counter() - started
            if token in STOP_IDS:
                reply.stop_reason = "eos"
                break
            reply.tokens.append(token)
            if on_text is not None:
                text = self.tokenizer.decode(reply.tokens, skip_special_tokens=False)
                on_text(text[len(streamed):])
                streamed = text
            if len(reply.tokens) >= max_new_tokens:
                reply.stop_reason = "max_new_tokens"
                break
            decode_started = time.perf_counter()
            logits = self.decoder.step([token])
            reply.timing.decode_seconds += time.perf_counter() - decode_started
        reply.timing.generated_tokens = len(reply.tokens) + (reply.stop_reason == "eos")
        return reply


class ChatSession:
    """Multi-turn Gemma chat over one KV cache: each turn prefills only its own new tokens."""

    def __init__(self, generator: Generator, use_template: bool = True):
        self.generator = generator
        self.use_template = use_template
        self.transcript: list[int] = []  # every token the cache holds, in order
        self.unfed: list[int] = []  # the previous reply's last token, when it was cut short

    def reset(self) -> None:
        self.generator.reset()
        self.transcript, self.unfed = [], []

    def turn(self, text: str, max_new_tokens: int, on_text: Callable[[str], None] | None = None) -> Reply:
        pending = list(self.unfed)
        if not self.transcript:
            pending.append(BOS_ID)
        elif self.use_template:
            # Close the previous model turn: its <end_of_turn> was sampled but never fed back.
            pending += self.generator.encode(END_OF_TURN)
        pending += self.generator.encode(USER_TURN.format(text=text) if self.use_template else text)
        reply = self.generator.generate(pending, max_new_tokens, on_text)
        self.transcript += pending + reply.tokens[:len(reply.tokens) - len(reply.unfed)]
        self.unfed = reply.unfed
        return reply
