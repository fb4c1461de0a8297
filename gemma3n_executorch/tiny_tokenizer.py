"""A tiny, deterministic, locally trained tokenizer for the random-weight demo model.

SentencePiece-style BPE laid out like Gemma's real tokenizer.json: the normalizer
turns " " into "\u2581" (``▁``), there is no pre-tokenizer, and the decoder turns
``▁`` back into " ".  The base alphabet is printable ASCII + ``▁`` + "\n" + "\t"
(no byte tokens, no byte fallback), so EVERY id decodes on its own to valid UTF-8.
That matters because ExecuTorch's TextLLMRunner decodes one id at a time and hands
each piece to a Python token_callback as `str`; a lone UTF-8 continuation byte
(as byte-level BPE produces) raises UnicodeDecodeError and aborts generation.
Characters outside the alphabet (non-ASCII, control chars) encode to <unk> (id 3).
No decoder step strips or adds spaces, so the concatenation of per-id pieces equals
the decode of the whole sequence (keep special tokens: the C++ runner prints them).

Total vocab is exactly 512, special tokens at Gemma's real ids:

    0 <pad>  1 <eos>  2 <bos>  3 <unk>  4 <mask>  5 [multimodal]
    6..104 <unused0>..<unused98>  105 <start_of_turn>  106 <end_of_turn>
    107..203 the 97 alphabet characters, 204..511 learned merges.

BOS handling (mirrors Gemma's own tokenizer.json): a TemplateProcessing
post-processor adds a single `<bos>` (id 2) when encoding *with special tokens*:
  * Python: `tok.encode(text)` (add_special_tokens=True default) -> [2, ...];
    `tok.encode(text, add_special_tokens=False)` -> no BOS.
  * ExecuTorch TextLLMRunner / pytorch_tokenizers HFTokenizer: BOS is added only
    when GenerationConfig(num_bos=1) (C++ encode(bos>0) runs the post-processor);
    with num_bos=0 nothing is added.  So pass a prompt WITHOUT a literal "<bos>"
    and num_bos=1 (or a prompt starting with "<bos>" and num_bos=0; never both).
Special tokens in the text ("<start_of_turn>", ...) always map to single ids.

write_tiny_tokenizer(dir) writes tokenizer.json, tokenizer_config.json (with a
Gemma chat template, eos "<eos>") and special_tokens_map.json.  Both
`transformers.AutoTokenizer.from_pretrained(dir)` and
`PreTrainedTokenizerFast(tokenizer_file=dir/"tokenizer.json")` load it (the latter
needs bos/eos/pad passed explicitly).  For TextLLMRunner pass the directory (then
bos=2, eos=1 come from tokenizer_config.json) or the tokenizer.json file (then eos
is guessed; harmless if the .pte exports get_eos_ids, which overrides it).

Usage: python -m gemma3n_executorch.tiny_tokenizer OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

VOCAB_SIZE = 512
PAD_ID, EOS_ID, BOS_ID, UNK_ID, START_OF_TURN_ID, END_OF_TURN_ID = 0, 1, 2, 3, 105, 106
SPACE = "\u2581"  # "▁", SentencePiece's visible space
# Sorted so the trainer assigns the same ids in every process.
ALPHABET = sorted([chr(c) for c in range(0x21, 0x7F)] + [SPACE, "\n", "\t"])

SPECIAL_TOKENS = (
    ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]"]
    + [f"<unused{i}>" for i in range(99)]
    + ["<start_of_turn>", "<end_of_turn>"]
)
assert len(SPECIAL_TOKENS) == 107 and SPECIAL_TOKENS[105] == "<start_of_turn>"

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
    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    # Repeat so that frequent pairs clearly outrank rare ones; add chat turns.
    chat = [
        "<start_of_turn>user\n" + ln + "<end_of_turn>\n<start_of_turn>model\n"
        for ln in lines[-6:]
    ]
    return lines * 3 + chat


def build_tiny_tokenizer() -> Tokenizer:
    """Train the deterministic 512-token SentencePiece-style BPE tokenizer (no download)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    # Training only: split into "▁word" pieces so merges stay within words and never
    # end in "▁" (so merges can never join across a word boundary).  The saved
    # tokenizer has no pre-tokenizer (like Gemma): pytorch_tokenizers' C++ HFTokenizer
    # has no Metaspace, and without pre-tokenizer both sides agree exactly.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=ALPHABET,
        limit_alphabet=len(ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    tok.pre_tokenizer = None
    # Plain per-token replace, no Strip: decoding id by id and concatenating equals
    # decoding the whole sequence.
    tok.decoder = decoders.Replace(SPACE, " ")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A $B",
        special_tokens=[("<bos>", BOS_ID)],
    )
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    for i, t in enumerate(SPECIAL_TOKENS + ALPHABET):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    return tok


# Gemma-style chat template (system prompt is folded into the first user turn).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def write_tiny_tokenizer(path: str) -> str:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json into
    directory `path` (created if needed).  Returns the tokenizer.json path."""
    os.makedirs(path, exist_ok=True)
    tok = build_tiny_tokenizer()
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
