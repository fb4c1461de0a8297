"""The variant table: the one place that says what E2B and E4B are.

Each variant names its Hugging Face checkpoint, its output file stem, the real text-decoder
architecture (for random-weight benchmarks) and a tiny architecture of the same shape (for the
offline demo and the tests). The tiny shapes keep what distinguishes the variants: E4B is deeper,
shares the KV of more layers and has a wider MLP. E2B also has a small trained model, built in
(``--model tiny-trained``, trained by tools/train_tiny.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# The text_config of each published checkpoint, shipped with the package so that random-weight
# models of the real size (bench.py) need nothing outside the clone.
ARCHITECTURES = Path(__file__).resolve().parent / "architectures"

TINY_MODEL = "tiny"  # the --model value that selects the built-in random-weight demo model
TRAINED_MODEL = "tiny-trained"  # the --model value of the small trained E2B-shaped model in TRAINED_DIRECTORY
TRAINED_DIRECTORY = Path(__file__).resolve().parent / "tiny_trained"  # a Hugging Face checkpoint directory
WEIGHTS_FILE = "model.safetensors"
PROVENANCE_FILE = "provenance.json"  # beside the trained weights: how they were made, the sha256 of each file
HELD_OUT_FILE = "heldout.txt"  # beside the trained weights: text of the corpus it was never trained on
BUILT_IN_MODELS = (TINY_MODEL, TRAINED_MODEL)  # --model values that need no download
OUTPUT_TAGS = {TINY_MODEL: "-tiny-random", TRAINED_MODEL: "-tiny-trained"}  # in the output file names

# Token ids of the real Gemma 3n tokenizer; the tiny tokenizer keeps them.
PAD_ID, EOS_ID, BOS_ID, START_OF_TURN_ID, END_OF_TURN_ID = 0, 1, 2, 105, 106
STOP_IDS = (EOS_ID, END_OF_TURN_ID)  # an -it model ends its turn with either
SPECIAL_TOKEN_IDS = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<bos>": BOS_ID,
                     "<start_of_turn>": START_OF_TURN_ID, "<end_of_turn>": END_OF_TURN_ID}


def _tiny_layer_types(num_layers: int, full_every: int) -> list[str]:
    return ["full_attention" if (i + 1) % full_every == 0 else "sliding_attention" for i in range(num_layers)]


@dataclass(frozen=True)
class Variant:
    name: str  # "E2B"
    hub_id: str
    architecture_file: str  # text_config of the published checkpoint, in ARCHITECTURES
    tiny_config: dict = field(repr=False)
    trained_layers: int | None = None  # depth of this variant's small trained model, if it has one
    matformer: bool = False  # smaller models nest in it and can be cut out (slicing.py)

    @property
    def trained_config(self) -> dict | None:
        """The architecture of the built-in trained model (see ``trained_config``)."""
        return None if self.trained_layers is None else trained_config(self.real_text_config(self.trained_layers))

    @property
    def key(self) -> str:
        return self.name.lower()

    def output_stem(self, model: str) -> str:
        return f"Gemma3n-{self.name}-IT{OUTPUT_TAGS.get(model, '')}-text-only"

    def real_text_config(self, layers: int | None = None) -> dict:
        """The published text config; with ``layers``, cut to that depth (see ``cut_to_layers``)."""
        config = json.loads((ARCHITECTURES / self.architecture_file).read_text())
        return config if layers is None else cut_to_layers(config, layers)


def cut_to_layers(config: dict, layers: int) -> dict:
    """A shallower model of the same widths, for machines that cannot hold the real one.

    Keeps the proportion of KV-sharing layers (rounded) and of sparse-MLP layers, the leading
    attention pattern for the layers that own KV, and the trailing one for the sharing layers;
    a sharing layer needs an owner of its attention type, so the last owner takes the type a
    sharing layer would otherwise lack.
    """
    total = config["num_hidden_layers"]
    if not 2 <= layers <= total:
        raise ValueError(f"--layers must be between 2 and {total}")
    shared = round(layers * config["num_kv_shared_layers"] / total)
    owners = layers - shared
    types = config["layer_types"][:owners] + config["layer_types"][total - shared:]
    for layer_type in set(types[owners:]) - set(types[:owners]):
        types[owners - 1] = layer_type
    sparsity = config["activation_sparsity_pattern"]
    sparse = round(layers * sum(1 for s in sparsity if s > 0) / total)
    return dict(
        config, num_hidden_layers=layers, num_kv_shared_layers=shared, layer_types=types,
        intermediate_size=config["intermediate_size"][:layers],
        activation_sparsity_pattern=[max(sparsity)] * sparse + [0.0] * (layers - sparse),
    )


def tiny_config(num_layers: int, num_kv_shared: int, intermediate: int) -> dict:
    """A few-hundred-kilobyte Gemma 3n text decoder with every feature of the real one.

    Sliding window 16 is far below the prompt + generated lengths the tests use, so the
    window really slides; the per-layer-embedding vocabulary is smaller than the token
    vocabulary, as in the real model, so out-of-table ids take the real code path.
    """
    return dict(
        vocab_size=512,
        vocab_size_per_layer_input=480,
        hidden_size=64,
        intermediate_size=[intermediate] * num_layers,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_size_per_layer_input=16,
        laurel_rank=8,
        altup_num_inputs=4,
        sliding_window=16,
        layer_types=_tiny_layer_types(num_layers, full_every=3),
        num_kv_shared_layers=num_kv_shared,
        activation_sparsity_pattern=[0.95] * 2 + [0.0] * (num_layers - 2),
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        final_logit_softcapping=30.0,
        max_position_embeddings=32768,
        pad_token_id=PAD_ID,
        eos_token_id=[EOS_ID, END_OF_TURN_ID],
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
    )


def trained_config(shape: dict) -> dict:
    """The small Gemma 3n tools/train_tiny.py trains: the attention pattern, KV sharing and sparse
    layers of ``shape`` (a published config cut to a depth), at widths that train in about half an
    hour on two cores and stay below 10 MB in bf16.

    Widths are multiples of 128 where the published ones are (hidden, MLP, attention), so the
    phone recipe's int4 groups of 128 quantize the same matrices as in the real model. As there,
    the per-layer table covers the tokenizer's 2048 pieces and the token table has ids beyond
    them (the real one: 256, for images and audio), which text never uses. Sliding window 64 of
    the 256-token training windows.
    """
    layers = shape["num_hidden_layers"]
    return dict(
        tiny_config(layers, shape["num_kv_shared_layers"], intermediate=512),
        vocab_size=2112,
        vocab_size_per_layer_input=2048,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,  # 4 query heads per KV head, as in E2B (8 and 2)
        head_dim=32,
        hidden_size_per_layer_input=32,
        laurel_rank=16,
        sliding_window=64,
        layer_types=shape["layer_types"],
        activation_sparsity_pattern=shape["activation_sparsity_pattern"],
    )


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        # E2B: 30 layers, the last 10 share KV  -> tiny: 6 layers, last 2 share; trained: 12, last 4 share.
        Variant("E2B", "google/gemma-3n-E2B-it", "e2b-text-config.json", tiny_config(6, 2, 128), trained_layers=12),
        # E4B: 35 layers, the last 15 share KV  -> tiny: 7 layers, last 3 share; MLP twice as wide.
        Variant("E4B", "google/gemma-3n-E4B-it", "e4b-text-config.json", tiny_config(7, 3, 256), matformer=True),
    )
}


def _shape(config: dict) -> tuple:
    """What tells the variants apart: depth, KV-sharing depth, widest MLP."""
    intermediate = config.get("intermediate_size")
    widest = max(intermediate) if isinstance(intermediate, list) and intermediate else intermediate
    return config.get("num_hidden_layers"), config.get("num_kv_shared_layers"), widest


def identify_variant(config: dict) -> Variant | None:
    """The variant whose published, tiny or trained architecture ``config`` has; None for any other
    shape (a custom Gemma 3n exports under the variant it was asked for)."""
    shape = _shape(config)
    return next((v for v in VARIANTS.values()
                 if shape in (_shape(v.real_text_config()), _shape(v.tiny_config), _shape(v.trained_config or {}))), None)
