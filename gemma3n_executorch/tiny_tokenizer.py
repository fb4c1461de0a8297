"""The project's small, deterministic, locally trained tokenizers: small copies of the structure of
Gemma's real tokenizer.json, so the tests exercise what the real one does. ``build_tiny_tokenizer``
is the 512-token one of the random-weight demo model; ``build_tokenizer`` makes one of any size
from any text, the same way (tools/train_tiny.py trains the trained small model's with it).

As in Gemma's (262,144 pieces): a BPE model with byte fallback (a character the vocabulary lacks
is spelled as its UTF-8 bytes, ``<0x00>``..``<0xFF>``, so one character can take several tokens
and one token can be part of a character), a normalizer that turns " " into "\u2581" (``▁``), a
``Split`` pre-tokenizer on " " (after the normalizer there is none left to split on), the decoder
``Replace(▁ -> " ")``, ``ByteFallback``, ``Fuse``, and a post-processor that adds one ``<bos>``
when encoding with special tokens. Special tokens sit at Gemma's ids and are never merged with
text: the merges are learned from plain text only.

Every one starts with the same ids (the tiny one has 512 in all, the tiny model's vocab):

    0 <pad>  1 <eos>  2 <bos>  3 <unk>  4 <mask>  5 [multimodal]
    6..104 <unused0>..<unused98>  105 <start_of_turn>  106 <end_of_turn>
    107..362 the byte tokens <0x00>..<0xFF>, then the alphabet and the learned merges.

Merges are learned within words (with the spaces before them: "▁word", or an indentation and a
word) and runs of newlines; the saved tokenizer applies them to the whole text, as Gemma's does.

``write_tokenizer(tokenizer, dir)`` (and ``write_tiny_tokenizer(dir)``) writes tokenizer.json, tokenizer_config.json (with Gemma's chat
template) and special_tokens_map.json, which ``transformers.AutoTokenizer`` loads.

Usage: python -m gemma3n_executorch.tiny_tokenizer OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .chat import GEMMA_CHAT_TEMPLATE
from .variants import BOS_ID, SPECIAL_TOKEN_IDS

VOCAB_SIZE = 512
SPACE = "\u2581"  # "▁", SentencePiece's visible space
SPECIAL_TOKENS = (
    ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]"]
    + [f"<unused{i}>" for i in range(99)]
    + ["<start_of_turn>", "<end_of_turn>"]
)
assert all(SPECIAL_TOKENS[i] == name for name, i in SPECIAL_TOKEN_IDS.items())
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
# Sorted so the trainer assigns the same ids in every process. Anything else (accents, CJK,
# emoji, most punctuation) falls back to bytes, as rare characters do in the real vocabulary.
ALPHABET = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:" + SPACE + "\n"))
CHAT_TEMPLATE = GEMMA_CHAT_TEMPLATE

_CORPUS = """\
The morning was quiet in the small town by the river. People walked to the market,
talked with their friends, and bought fresh bread, apples, and cheese. The children
played in the park while the old men sat on the bench and read the newspaper.
When the sun was high, the town became busy and the streets were full of noise.

A language model is a program that reads text and tries to predict the next word.
It learns from many examples, and the more it reads, the better it becomes. Small
models are fast and can run on a phone or a laptop, while large models need more
memory and time. This model is only a tiny test, so its answers may not be good.

Yesterday I wrote a short story about a cat who wanted to fly. The cat watched the
birds every day and wondered how they could move so freely in the sky. In the end,
the cat learned that it could climb the highest tree and see the whole world from there.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 also appear in text, and so do questions!

Hello! How are you today? I am fine, thank you. What can I do for you?
Can you help me write a poem about the sea? Sure, here is a short poem for you.
Please tell me a story. Could you explain how this works? Thanks for your help.
Good morning. Good night. Have a nice day. What is the weather like today?
I think that is a great idea. Let me know if you have any other questions.
user: Who are you? model: I am a helpful assistant. user: What time is it?
"""


def _corpus_lines() -> list[str]:
    # Repeated so that frequent pairs clearly outrank rare ones. Plain text only: special tokens in
    # the training text let merges span them (they once joined "<end_of_turn>\n<start_of_turn>").
    return [line for line in _CORPUS.splitlines() if line.strip()] * 3


# Training only: the pieces merges are learned within, a word with the spaces before it, a run of
# newlines, trailing spaces (spaces are "▁" by then). The saved tokenizer applies the merges to the
# whole text, and since none was learned across a piece boundary, it finds the same pieces.
TRAINING_PIECES = Regex(f"\n+|{SPACE}*[^{SPACE}\n]+|{SPACE}+")


def build_tokenizer(lines: list[str], vocab_size: int, alphabet: list[str]) -> Tokenizer:
    """Train a Gemma-structured BPE tokenizer of exactly ``vocab_size`` pieces on ``lines`` (no
    download). ``alphabet``, sorted, is every character that gets a piece of its own; the trainer
    then assigns the same ids in every process."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    # Training only: merges stay within pieces. Saved: Gemma's Split on " " (after the normalizer there is none).
    tok.pre_tokenizer = pre_tokenizers.Split(TRAINING_PIECES, behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
        initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    # The trainer made the byte tokens added "special" tokens only to give them their ids; in
    # Gemma's they are plain vocabulary entries (so decoding with skip_special_tokens keeps them).
    trained = json.loads(tok.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in trained["merges"]]
    tok = Tokenizer(models.BPE(trained["vocab"], merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)],
    )
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the tokenizer has {tok.get_vocab_size()} tokens, not {vocab_size}: too little text")
    for i, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token), i)
    return tok


def build_tiny_tokenizer() -> Tokenizer:
    """The deterministic 512-token tokenizer of the tiny model."""
    return build_tokenizer(_corpus_lines(), VOCAB_SIZE, ALPHABET)


def write_tiny_tokenizer(path: str) -> str:
    """``write_tokenizer`` of the tiny tokenizer."""
    return write_tokenizer(build_tiny_tokenizer(), path)


def write_tokenizer(tok: Tokenizer, path: str) -> str:
    """Write tokenizer.json, tokenizer_config.json (with Gemma's chat template) and
    special_tokens_map.json into directory ``path`` (created if needed), laid out as a Hugging Face
    checkpoint ships them; returns the tokenizer.json path."""
    os.makedirs(path, exist_ok=True)
    tok_json = os.path.join(path, "tokenizer.json")
    tok.save(tok_json)
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "model_max_length": 1000000000,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    return tok_json


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m gemma3n_executorch.tiny_tokenizer OUT_DIR")
    out = write_tiny_tokenizer(sys.argv[1])
    print(f"wrote {out} (vocab {VOCAB_SIZE})")
