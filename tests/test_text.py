"""Text as Gemma sees and says it: the tiny tokenizer's structure against the real one's, streaming
that adds up to the whole decode, and chat turns formatted as Gemma's chat template formats them.

Set GEMMA_TOKENIZER_JSON to a real Gemma tokenizer.json (262,144 pieces) to run the streaming and
chat checks on it too; CI does without (the tiny tokenizer copies its structure)."""

from __future__ import annotations

import json
import os
import random

import pytest
from tokenizers import Tokenizer

from gemma3n_executorch.chat import GEMMA_CHAT_TEMPLATE, ChatFormat, gemma_rules
from gemma3n_executorch.generation import TextStream
from gemma3n_executorch.tiny_tokenizer import build_tiny_tokenizer, write_tiny_tokenizer

# From Gemma 3's tokenizer.json (262,144 pieces), as the tokenizers library saves it.
GEMMA_NORMALIZER = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
GEMMA_PRE_TOKENIZER = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
GEMMA_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]}
GEMMA_MODEL = {"type": "BPE", "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True}
RARE = "rare 𠀋 then 𝔘𝔫𝔦 then 😀"  # came out as "rare ��� then ���������𝔦 then 😀"


def tokenizers_under_test():
    yield build_tiny_tokenizer()
    if os.environ.get("GEMMA_TOKENIZER_JSON"):
        yield Tokenizer.from_file(os.environ["GEMMA_TOKENIZER_JSON"])


def test_tiny_tokenizer_has_the_real_ones_structure():
    saved = json.loads(build_tiny_tokenizer().to_str())
    assert saved["normalizer"] == GEMMA_NORMALIZER
    assert saved["pre_tokenizer"] == GEMMA_PRE_TOKENIZER
    assert saved["decoder"] == GEMMA_DECODER
    assert {k: saved["model"][k] for k in GEMMA_MODEL} == GEMMA_MODEL
    vocab = saved["model"]["vocab"]
    assert all(f"<0x{b:02X}>" in vocab for b in range(256))
    # As in Gemma's, byte tokens are vocabulary, not added special tokens (skip_special_tokens keeps them).
    assert not any(token["content"].startswith("<0x") for token in saved["added_tokens"])


def test_special_tokens_are_never_merged_with_text():
    tokenizer = build_tiny_tokenizer()
    chat = "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    tokens = tokenizer.encode(chat, add_special_tokens=False).tokens
    assert tokens[0] == "<start_of_turn>" and tokens.count("<end_of_turn>") == 1 and tokens.count("<start_of_turn>") == 2
    pieces = [piece for piece in tokenizer.get_vocab() if not piece.startswith("<")]
    assert not [piece for piece in pieces if "turn" in piece or "<" in piece or ">" in piece]


@pytest.mark.parametrize("tokenizer", list(tokenizers_under_test()), ids=lambda t: f"vocab{t.get_vocab_size()}")
def test_streamed_text_equals_the_whole_decode(tokenizer):
    """Including characters spelled byte by byte, a byte sequence that never completes, and
    random token sequences."""
    rare = tokenizer.encode(RARE, add_special_tokens=False).ids
    assert len(rare) > len(RARE.split())  # byte fallback really spells some characters
    never_completes = rare + [tokenizer.token_to_id("<0xF0>"), tokenizer.token_to_id("<0x9F>")]
    generator = random.Random(0)
    random_ids = [[generator.randrange(tokenizer.get_vocab_size()) for _ in range(40)] for _ in range(20)]
    for ids in [rare, never_completes, *random_ids]:
        pieces = []
        stream = TextStream(tokenizer, pieces.append)
        for n in range(1, len(ids) + 1):
            stream.update(ids[:n])
        stream.finish(ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=False)
    assert tokenizer.decode(rare, skip_special_tokens=False) == RARE


MESSAGES = [
    [{"role": "user", "content": "  padded  "}],
    [{"role": "user", "content": "a prompt ending in a newline\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": " two\n"}, {"role": "user", "content": "three"}],
]


@pytest.mark.parametrize("messages", MESSAGES, ids=["padded", "newline", "system", "three-turns"])
def test_chat_turns_are_the_ids_apply_chat_template_gives(tmp_path, messages):
    """Against transformers' apply_chat_template on a checkpoint directory that ships Gemma's
    template, both through that template and through the fallback rules."""
    from transformers import AutoTokenizer

    write_tiny_tokenizer(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    tokenizer = build_tiny_tokenizer()
    for chat_format in (ChatFormat(GEMMA_CHAT_TEMPLATE), ChatFormat(None)):
        text = chat_format.render(messages, add_generation_prompt=True)
        assert tokenizer.encode(text, add_special_tokens=False).ids == list(expected)
    assert gemma_rules(messages, True) == ChatFormat(GEMMA_CHAT_TEMPLATE).render(messages, True)


def test_later_turns_add_what_the_template_adds():
    """A chat session prefills only a new turn; the turn must be what re-rendering the whole
    conversation with the template would add."""
    chat_format = ChatFormat(GEMMA_CHAT_TEMPLATE)
    first = chat_format.first_turn("  Hello ", system="Be brief.")
    close, second = chat_format.next_turn("  more  ")
    whole = chat_format.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                                {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "more"}], True)
    assert first + "Hi" + close + second == whole
