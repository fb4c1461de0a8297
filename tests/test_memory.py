"""What a phone keeps resident of a program: ExecuTorch's stock runner in a process that cannot
mlock (gemma3n_executorch/memory_probe.py), on a tiny phone program whose vocabulary is large
enough for its gathered tables to span hundreds of pages; and what the export of that program lets
go of before it emits it."""

from __future__ import annotations

import weakref

import pytest
import torch
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

from gemma3n_executorch import checkpoint, exporter, memory_probe, parity, program_file
from gemma3n_executorch.variants import BOS_ID, VARIANTS, tiny_config
from tests.checkpoints import write_text_only
from tests.test_kv_generation import PHONE_FLAGS

# 65536 x 64 values at 4 bits: a 2 MiB token embedding and a 2 MiB per-layer table (the tiny
# model's own 512 rows fit in a few pages, which any prompt touches).
VOCAB, PER_LAYER_VOCAB = 65536, 65280
# Four layers, the fewest with a sliding, a full and a KV-sharing layer: the tables are what is
# measured, and lowering to XNNPACK, this test's cost, grows with depth (setup 131 -> 107 s in
# the suite on a Xeon with AMX, against the tiny model's six).
LAYERS, SHARED_LAYERS = 4, 1
PROMPT_TOKENS, NEW_TOKENS = 41, 8


@pytest.fixture(scope="module")
def wide_vocabulary_export(tmp_path_factory):
    """The phone program of a wide-vocabulary checkpoint, exported in this process with the CLI's
    options (to see what the export lets go of), and whether its model was alive after the export."""
    config = dict(tiny_config(LAYERS, SHARED_LAYERS, 128), vocab_size=VOCAB, vocab_size_per_layer_input=PER_LAYER_VOCAB)
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**config))
    checkpoint.randomize_(model, 0)
    directory = tmp_path_factory.mktemp("wide-vocabulary")
    write_text_only(model.to(torch.float32).eval(), directory / "checkpoint")
    del model
    output = directory / "phone.pte"
    variant = VARIANTS["e2b"]
    options, _, _, _ = exporter.parse_args(variant, ["--model", str(directory / "checkpoint"), *PHONE_FLAGS])
    loaded = checkpoint.load(options.model, variant)
    linear = weakref.ref(loaded.model.model.layers[0].mlp.gate_proj)  # its weight is replaced when quantized
    summary = exporter.export_program(variant, options, output, loaded=loaded)
    return output, summary, loaded.model is not None or linear() is not None, options


@pytest.fixture(scope="module")
def wide_vocabulary_program(wide_vocabulary_export):
    return wide_vocabulary_export[0]


def test_stock_runner_keeps_the_gathered_tables_in_the_file_and_maps_only_the_rows_read(
        wide_vocabulary_program, tmp_path):
    """Through TextLLMRunner with mlock refused (as on Android) and random access advised as the
    README tells an app: after a prompt, the tables' byte ranges in the file are resident for at
    least the rows the prompt gathered (so they are read from the file's mapping, not from a copy),
    mostly not resident otherwise, and allocated memory did not grow by their size."""
    layout = program_file.layout(wide_vocabulary_program)
    tables = layout.tables
    assert tables["token_embedding"].rows == VOCAB and tables["per_layer_embedding"].rows == PER_LAYER_VOCAB
    assert layout.constant_segment.size > memory_probe.MEMLOCK_LIMIT_BYTES  # mlock fails as on a phone

    record = memory_probe.measure("stock-advised", wide_vocabulary_program, PROMPT_TOKENS, NEW_TOKENS, 20, tmp_path)
    assert record["mlock"].startswith("refused")
    phases = {phase["phase"]: phase for phase in record["phases"]}
    loaded, prompted = phases["loaded"], [p for p in record["phases"] if p["phase"] == "prefill"][-1]
    assert prompted["tokens_seen"] == PROMPT_TOKENS
    prompt = parity.probe_tokens(PROMPT_TOKENS, VOCAB, BOS_ID)  # the probe's prompt
    for name, table in tables.items():
        resident = prompted["tables_resident"][name]
        # Every page holding a row the prompt gathered was read from the file's mapping.
        gathered = {(table.weight.start + token * table.row_bytes) // program_file.PAGE
                    for token in prompt if token < table.rows}
        assert resident >= (len(gathered) - 1) * program_file.PAGE, (name, resident, len(gathered))
        assert resident < table.bytes / 4, (name, resident, table.bytes)
    table_bytes = sum(table.bytes for table in tables.values())
    assert prompted["anon"] - loaded["anon"] < table_bytes / 4, (prompted["anon"], loaded["anon"], table_bytes)


def test_an_export_frees_the_model_once_the_delegates_hold_its_weights(wide_vocabulary_export):
    """export_program lets go of the eager model (and of the exported program) between delegation
    and emission, so that an export never holds the weights twice over (E2B's phone export: 5 GB
    of quantized weights beside the delegates' repacked copy). A reference kept by mistake anywhere
    would keep them all alive without a word."""
    output, summary, model_alive, _ = wide_vocabulary_export
    assert not model_alive
    assert summary["delegation"]["delegated"] > 0 and summary["bytes"] == output.stat().st_size


def test_the_phone_program_read_weight_by_weight_from_the_files_is_the_same(wide_vocabulary_export, tmp_path):
    """The exporter's own loading (stored_weights.py: each weight read from the checkpoint as it is
    quantized, the tables in row blocks, and freed once the program holds it) gives the program
    Hugging Face's loader gave, byte for byte (the fixed recipe and slices: tests/test_loading.py)."""
    output, _, _, options = wide_vocabulary_export
    lean = tmp_path / "lean.pte"
    summary = exporter.export_program(VARIANTS["e2b"], options, lean)
    assert lean.read_bytes() == output.read_bytes()
    # And it frees each weight as soon as the program holds it in its own form (lowering_shortcuts.
    # releasing): as quantized, one byte a 4-bit value, the weights are about twice the program.
    assert summary["released_bytes"] > 1.5 * lean.stat().st_size, (summary["released_bytes"], lean.stat().st_size)
