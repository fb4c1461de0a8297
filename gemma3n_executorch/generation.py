"""Text generation over an exported program: sampling, the Gemma chat format, streaming, timing.

A KV program prefills a prompt in calls of up to its max_seq_length tokens, then takes one token
per call; the chat session
keeps its cache between turns, so a new turn prefills only the new text. A fixed-window program
is driven by re-running its window over the last ``seq_len`` tokens for every new token.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from .chat import ChatFormat
from .options import KV
from .progress import UserError
from .runtime import Program
from .variants import BOS_ID, PAD_ID, SPECIAL_TOKEN_IDS, STOP_IDS

GEMMA_RULES = ChatFormat(None)
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # byte fallback's pieces, as in Gemma's vocabulary


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


class TextStream:
    """Streams the decode of a growing token list so that the streamed text always adds up to the
    decode of the whole list. A character the vocabulary lacks is spelled in byte tokens, and
    Gemma's decoder turns each run of byte tokens into text as a whole: until the run ends, its
    bytes may be an incomplete character (U+FFFD, which would stay on screen once printed) or may
    still become one with the next byte (even ASCII bytes turn into U+FFFD when a later byte of the
    run makes it invalid UTF-8). So a trailing run of byte tokens is held back until a token that
    is not a byte, or the end of the reply, settles it."""

    def __init__(self, tokenizer: Tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.streamed = ""

    def _is_byte(self, token: int) -> bool:
        return BYTE_TOKEN.fullmatch(self.tokenizer.id_to_token(token) or "") is not None

    def _emit(self, tokens: list[int]) -> None:
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        if text.startswith(self.streamed) and len(text) > len(self.streamed):
            self.on_text(text[len(self.streamed):])
            self.streamed = text

    def update(self, tokens: list[int]) -> None:
        if self.on_text is not None:
            settled = len(tokens)
            while settled and self._is_byte(tokens[settled - 1]):
                settled -= 1
            self._emit(tokens[:settled])

    def finish(self, tokens: list[int]) -> None:
        if self.on_text is not None:
            self._emit(tokens)


def load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise UserError(f"no tokenizer at {path}; pass --tokenizer PATH/tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"{path}: not a tokenizer.json the tokenizers library can read ({error})") from None


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> None:
    """A tokenizer of another model gives ids the program reads as other tokens (garbage text) or
    past its vocabulary; Gemma's has its special tokens at fixed ids."""
    wrong = [name for name, expected in SPECIAL_TOKEN_IDS.items() if tokenizer.token_to_id(name) != expected]
    if wrong or tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        reason = (f"{wrong[0]} is id {tokenizer.token_to_id(wrong[0])}, Gemma's is {SPECIAL_TOKEN_IDS[wrong[0]]}" if wrong
                  else f"{tokenizer.get_vocab_size(with_added_tokens=True)} tokens, the program's vocabulary {vocab_size}")
        raise UserError(f"the tokenizer is not this program's Gemma tokenizer ({reason}); "
                        "pass the tokenizer.json exported beside the program")


class Generator:
    """Feeds prompts and samples replies; the decoder's cache position is the conversation so far."""

    def __init__(self, program: Program, tokenizer: Tokenizer, sampling: Sampling = Sampling()):
        self.program = program
        self.decoder = program if program.info.mode == KV else FixedWindowDecoder(program)
        self.capacity = program.info.context_len if program.info.mode == KV else None
        check_tokenizer(tokenizer, program.info.vocab_size)
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
        stream = TextStream(self.tokenizer, on_text)
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
            stream.update(reply.tokens)
            if len(reply.tokens) >= max_new_tokens:
                reply.stop_reason = "max_new_tokens"
                break
            decode_started = time.perf_counter()
            logits = self.decoder.step([token])
            reply.timing.decode_seconds += time.perf_counter() - decode_started
        stream.finish(reply.tokens)
        reply.timing.generated_tokens = len(reply.tokens) + (reply.stop_reason == "eos")
        return reply


class ChatSession:
    """Multi-turn Gemma chat over one KV cache: each turn prefills only its own new tokens.

    ``chat_format`` None feeds the text raw (after one <bos>), with no turn markers."""

    def __init__(self, generator: Generator, chat_format: ChatFormat | None = GEMMA_RULES, system: str | None = None):
        self.generator = generator
        self.chat_format = chat_format
        self.system = system
        self.transcript: list[int] = []  # every token the cache holds, in order
        self.unfed: list[int] = []  # the previous reply's last token, when it was cut short

    def reset(self) -> None:
        self.generator.reset()
        self.transcript, self.unfed = [], []

    def turn(self, text: str, max_new_tokens: int, on_text: Callable[[str], None] | None = None) -> Reply:
        pending = list(self.unfed)
        if self.chat_format is None:
            pending += ([BOS_ID] if not self.transcript else []) + self.generator.encode(text)
        elif not self.transcript:
            pending += self.generator.encode(self.chat_format.first_turn(text, self.system))
        else:
            # Close the previous model turn (its <end_of_turn> was sampled but never fed back), then the new one.
            close, new_turn = self.chat_format.next_turn(text)
            pending += self.generator.encode(close) + self.generator.encode(new_turn)
        capacity = self.generator.capacity
        if self.transcript and capacity is not None and self.generator.position + len(pending) >= capacity:
            raise UserError(f"the conversation is full: it holds {self.generator.position} of the program's {capacity} "
                            f"positions and this turn needs {len(pending)} more; type /reset to start a new one")
        reply = self.generator.generate(pending, max_new_tokens, on_text)
        self.transcript += pending + reply.tokens[:len(reply.tokens) - len(reply.unfed)]
        self.unfed = reply.unfed
        return reply
