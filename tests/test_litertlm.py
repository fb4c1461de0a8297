"""What bench.py's LiteRT-LM peer does in our own environment (LiteRT itself stays out of the
tests): the checkpoint it hands litert-torch and the placeholder tokenizer that spells tokens."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from gemma3n_executorch import checkpoint, litertlm
from gemma3n_executorch.variants import BOS_ID, END_OF_TURN_ID, EOS_ID, VARIANTS


def test_saved_checkpoint_is_the_published_layout_with_the_same_weights(tmp_path):
    variant = VARIANTS["e2b"]
    model = checkpoint.build_tiny(variant)
    litertlm.save_checkpoint(model, tmp_path / "checkpoint")
    # Our loader takes the published multimodal layout and refuses missing or foreign tensors.
    loaded = checkpoint.load(str(tmp_path / "checkpoint"), variant).model
    tokens = torch.tensor([[BOS_ID, 7, 300, 45, 99, 12]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_placeholder_tokenizer_spells_every_token_sequence(tmp_path):
    litertlm.save_placeholder_tokenizer(tmp_path, 512)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 512
    ids = [BOS_ID, 3, 17, END_OF_TURN_ID, 511, EOS_ID, 17]
    assert tokenizer.encode(litertlm.token_text(ids)).ids == ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == litertlm.token_text(ids)
