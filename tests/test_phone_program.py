"""The phone recipe (the --mode kv defaults: XNNPACK, 8da4w linears, 4-bit embeddings and lm_head)
against Hugging Face eager: the same torchao quantization run eagerly, and unquantized fp32."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gemma3n_executorch import checkpoint, exporter, lowering, memory_probe, options, parity, program_file, quantize
from gemma3n_executorch.options import PER_CHANNEL
from gemma3n_executorch.runtime import Program
from gemma3n_executorch.variants import BOS_ID, VARIANTS
from tests.conftest import run
from tests.test_kv_generation import CHUNK, CONTEXT, FP32_WEIGHTS, KV_FLAGS, LENGTHS, PHONE_FLAGS

SEQUENCE = parity.probe_tokens(96, 512, BOS_ID)  # 96 > 2 x the sliding window of 16


def teacher_forced(path) -> torch.Tensor:
    """The program's logits at every position of SEQUENCE, one decode step at a time after a
    one-call prefill of the first 8 tokens."""
    program = Program(path)
    rows = [program.step(SEQUENCE[:8])]
    rows += [program.step([token]) for token in SEQUENCE[8:]]
    return torch.stack(rows)


def eager(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([SEQUENCE]), use_cache=False).logits[0, 7:]


@pytest.fixture(scope="module")
def phone_logits(programs):
    return teacher_forced(programs.get("e2b", *PHONE_FLAGS))


@pytest.fixture(scope="module")
def eager_quantized_logits():
    model = checkpoint.build_tiny(VARIANTS["e2b"])
    quantize.apply(model, "8da4w", "4w", 32, torch.float32)
    return eager(model)


def test_phone_program_agrees_with_the_same_quantization_run_eagerly(phone_logits, eager_quantized_logits):
    agreement = parity.compare(phone_logits, eager_quantized_logits)
    assert agreement.within(parity.tolerance_for("fp32", "8da4w", "4w")), agreement


@pytest.mark.parametrize("kernel", ["executorch", "gemma3n"])
def test_int8_kv_cache_program_stays_within_its_tolerance(programs, tiny_models, kernel):
    """An int8 KV cache on unquantized fp32 weights (portable kernels: the cache's ops run outside
    XNNPACK in the phone program too, and lowering the tiny phone program twice would cost the suite
    minutes), against eager fp32 attending in fp32; and the cache really is quantized (it differs
    from the fp32-cache program). With either attention kernel: both quantize the queries to int8
    too, per head and token (ExecuTorch asymmetrically, ours symmetrically, for integer dot products)."""
    kernel_flags = ("--attention-kernel", kernel) if kernel != "executorch" else ()
    int8 = teacher_forced(programs.get("e2b", "--mode", "kv", *LENGTHS, *FP32_WEIGHTS, "--kv-cache", "int8",
                                       *kernel_flags))
    agreement = parity.compare(int8, eager(tiny_models("e2b")))
    assert agreement.within(parity.tolerance_for("fp32", "none", "none", "int8")), agreement
    assert parity.compare(int8, teacher_forced(programs.get("e2b", *KV_FLAGS))).relative_l2 > 0.01


def test_fp16_kv_cache_program_stays_within_its_tolerance(programs, tiny_models):
    """A 16-bit cache (read by this project's kernel in the full layers, widened for the rings),
    on unquantized fp32 weights, against eager fp32; and the cache really is rounded."""
    fp16 = teacher_forced(programs.get("e2b", "--mode", "kv", *LENGTHS, *FP32_WEIGHTS, "--kv-cache", "fp16",
                                       "--attention-kernel", "gemma3n"))
    agreement = parity.compare(fp16, eager(tiny_models("e2b")))
    assert agreement.within(parity.tolerance_for("fp32", "none", "none", "fp16")), agreement
    assert parity.compare(fp16, teacher_forced(programs.get("e2b", *KV_FLAGS))).max_abs > 1e-5


def test_phone_program_error_against_fp32_is_no_worse_than_eager_quantization(
        phone_logits, eager_quantized_logits, tiny_models):
    fp32 = eager(tiny_models("e2b"))
    program, peer = parity.compare(phone_logits, fp32), parity.compare(eager_quantized_logits, fp32)
    assert program.relative_l2 <= peer.relative_l2 + parity.PEER_MARGIN, (program, peer)
    assert program.top1 >= peer.top1 - parity.PEER_MARGIN, (program, peer)
    assert program.relative_l2 > 0.05  # the weights really are quantized


def test_phone_program_loads_its_largest_delegate_first(programs, tiny_models):
    """The runtime packs delegates in the plan's order, each while its source pages are mapped: the
    largest first, when nothing else is packed yet (lowering.largest_delegates_first). In graph
    order the lm_head, the real model's largest, is computed, and was loaded, last."""
    sizes = program_file.delegate_weights_in_load_order(programs.get("e2b", *PHONE_FLAGS))
    config = tiny_models("e2b").config
    assert len(sizes) > 2 and sizes == sorted(sizes, reverse=True)
    assert sizes[0] >= config.vocab_size * config.hidden_size // 2  # the sizes are real: the 4-bit lm_head's, at least


def wide_per_layer_variant():
    """The tiny E2B with per-layer inputs as wide in all as the real E2B's (7680 columns: 3840 bytes a
    row at 4 bits), so its per-layer table's rows are padded to whole pages (quantize.page_row_columns)."""
    variant = VARIANTS["e2b"]
    layers = variant.tiny_config["num_hidden_layers"]
    return dataclasses.replace(variant, tiny_config=dict(variant.tiny_config,
                                                         hidden_size_per_layer_input=7680 // layers))


def test_per_layer_table_rows_padded_to_pages_keep_their_values():
    """Zero columns after the quantized rows change no value: the eager model quantized with and
    without them gives the same logits, bit for bit."""
    variant = wide_per_layer_variant()
    padded, plain = checkpoint.build_tiny(variant), checkpoint.build_tiny(variant)
    quantize.apply(padded, "8da4w", "4w", 32, torch.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "MAX_ROW_PADDING", -1.0)  # never pad
        quantize.apply(plain, "8da4w", "4w", 32, torch.float32)
    assert isinstance(padded.model.embed_tokens_per_layer, quantize.PageRowEmbedding)
    assert padded.model.embed_tokens_per_layer.weight.shape[1] == 2 * program_file.FILE_PAGE
    assert not isinstance(plain.model.embed_tokens_per_layer, quantize.PageRowEmbedding)
    assert torch.equal(eager(padded), eager(plain))


def test_per_layer_table_rows_lie_on_whole_pages_of_the_program(tmp_path):
    """The program stores each padded row on one page of its file (the table first in a page-aligned
    constant segment: lowering.gathered_tables_first), and computes what the same quantization run
    eagerly does."""
    variant = wide_per_layer_variant()
    path = tmp_path / "wide.pte"
    recipe = options.resolve(options.KV, None, None, None, None, 32, "tiny", CHUNK, CONTEXT)
    exporter.export_program(variant, recipe, path,
                            loaded=checkpoint.LoadedModel(checkpoint.build_tiny(variant), "tiny", None))
    tables = program_file.layout(path).tables
    assert tables["per_layer_embedding"].row_bytes == program_file.FILE_PAGE
    assert tables["per_layer_embedding"].weight.start % program_file.FILE_PAGE == 0
    assert tables["token_embedding"].row_bytes == variant.tiny_config["hidden_size"] // 2  # not padded
    reference = checkpoint.build_tiny(variant)
    quantize.apply(reference, "8da4w", "4w", 32, torch.float32)
    agreement = parity.compare(teacher_forced(path), eager(reference))
    assert agreement.within(parity.tolerance_for("fp32", "8da4w", "4w")), agreement


def test_phone_program_is_delegated_and_under_half_the_fp32_size(programs):
    log = programs.log("e2b", *PHONE_FLAGS)
    assert "xnnpack:" in log
    # Reshapes that name the token count are rewritten with -1 so XNNPACK takes them; any left
    # outside splits a delegate (lowering.infer_token_dimension_of_reshapes).
    assert "view_copy" not in log
    # AltUp's predict is a bmm, not torch.matmul, whose expand XNNPACK does not take (lowering.py).
    assert "expand_copy" not in log
    fp32 = programs.get("e2b", *KV_FLAGS)
    phone = programs.get("e2b", *PHONE_FLAGS)
    # Tiny widths keep the floating-point layers (norm scales, AltUp's small matrices) a large
    # share, so the ratio is far from the real model's 7x; any unquantized table would undo it.
    # Stored bytes: the tiny phone program's ~100 segments start on pages, padding a few hundred KB.
    assert program_file.layout(phone).stored_bytes < program_file.layout(fp32).stored_bytes / 2


def test_phone_program_leaves_the_logits_to_xnnpack(programs):
    """No portable kernel touches the vocabulary-wide logits: those run on one thread, element by
    element. The context-full <eos> was a masked_fill (a select copy, then !=, & and a broadcasting
    where over the vocabulary, every call); it is a scalar subtraction and a concatenation inside a
    delegate now (tasks.KVCacheLM.forward)."""
    path = programs.get("e2b", *PHONE_FLAGS)
    vocab_size = Program(path).info.vocab_size
    on_logits = [(name, shapes) for name, shapes in program_file.kernel_calls(path)
                 if name != "quantized_decomposed::embedding_4bit"  # the gathers: a [vocab, width] table
                 and any(shape and shape[-1] == vocab_size for shape in shapes)]
    assert on_logits == []


@pytest.mark.parametrize("method", ["predict", "correct"])
def test_altup_in_xnnpack_form_computes_what_hugging_face_does(method):
    """lowering.prepare_for_backend rewrites AltUp's predict and correct into operators XNNPACK
    takes; on the tiny model's first layer, with 5 tokens, they must give Hugging Face's numbers."""
    model = checkpoint.build_tiny(VARIANTS["e2b"])
    reference = model.model.layers[0].altup
    rewritten = checkpoint.build_tiny(VARIANTS["e2b"])
    lowering.prepare_for_backend(rewritten, "xnnpack")
    altup = rewritten.model.layers[0].altup
    assert getattr(altup, method).__func__ is not getattr(type(altup), method)  # really rewritten
    streams = torch.randn(model.config.altup_num_inputs, 1, 5, model.config.hidden_size,
                          generator=torch.Generator().manual_seed(0))
    arguments = (streams,) if method == "predict" else (streams, streams[0] * 2)
    with torch.no_grad():
        expected, actual = getattr(reference, method)(*arguments), getattr(altup, method)(*arguments)
    assert actual.shape == expected.shape and torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(expected, streams)  # the mixing does something


@pytest.mark.parametrize("flags, advice", [
    (("--quantize", "8da4w", "--backend", "portable"), "--backend xnnpack"),
    (("--quantize", "int8", "--backend", "xnnpack"), "--quantize 8da4w"),
    (("--quantize-embeddings", "4w", "--dtype", "bf16"), "--dtype fp32"),
    (("--quantize", "8da4w", "--group-size", "7"), "--group-size"),
    (("--mode", "kv", "--kv-cache", "fp16"), "--attention-kernel gemma3n"),
    (("--mode", "kv", "--attention-kernel", "gemma3n", "--dtype", "bf16", "--quantize", "none",
      "--quantize-embeddings", "none", "--backend", "portable"), "--dtype fp32"),
])
def test_combinations_without_kernels_are_refused(tmp_path, flags, advice):
    output = tmp_path / "refused.pte"
    result = run("e2b/export.py", "--model", "tiny", "--output", str(output), *flags)
    assert result.returncode == 2 and advice in result.stderr and "Traceback" not in result.stderr
    assert not output.exists()


def test_bench_smoke_records_match_the_contract(tmp_path):
    """bench.py on the tiny model: every record has the contract's keys, and its error column is
    right (the portable fp32 program is the fp32 model; Hugging Face SDPA is eager attention). The
    logits come from decoding after the repeated prefills, so they also check that a re-used cache
    needs no clearing. The memory probes ran with mlock refused and saw the whole prompt."""
    out = tmp_path / "bench.json"
    result = run("bench.py", "--variant", "e2b", "--model", "tiny", "--configs", "eager-fp32,portable-fp32",
                 "--prompt-len", "16", "--new-tokens", "8", "--repeats", "2", "--memory-probe", "--probe-prompt", "40",
                 "--probe-step", "20", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["config"]: r for r in json.loads(out.read_text())["records"]}
    keys = {"config", "pte_bytes", "prefill_tok_s", "decode_tok_s", "ttft_s", "run_peak_rss_bytes",
            "export_peak_rss_bytes", "export_s", "prefill_first_tok_s"}
    assert set(records) == {"eager-fp32", "portable-fp32"} and all(keys <= set(r) for r in records.values())
    program = records["portable-fp32"]
    assert program["pte_bytes"] > 0 and program["export_s"] > 0 and program["decode_tok_s"] > 0
    assert len(program["prefill_warm_samples_tok_s"]) == 2
    assert program["relative_l2_vs_fp32"] < 1e-5 and program["top1_vs_fp32"] == 1.0
    assert records["eager-fp32"]["relative_l2_vs_fp32"] < 1e-5 and records["eager-fp32"]["pte_bytes"] is None
    memory = program["memory"]
    assert set(memory) == set(memory_probe.PROBES) and all(m["mlock"].startswith("refused") for m in memory.values())
    assert [p["tokens_seen"] for p in memory["stock"]["phases"] if p["phase"] == "prefill"] == [21, 40]
    assert memory["stock"]["generated_tokens"] > 0 and "memory" not in records["eager-fp32"]


@pytest.mark.parametrize("kind", ["embedding", "linear"])
def test_row_block_quantization_equals_whole_matrix(kind):
    """Big tables are quantized in row blocks cast from the stored bf16 one at a time, to bound
    memory; the result must equal quantizing the whole matrix in fp32."""
    rows = 2 * quantize.ROWS_PER_BLOCK + 123
    weight = torch.randn(rows, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float()

    def module(dtype):
        if kind == "embedding":
            return torch.nn.Embedding(rows, 64, _weight=weight.to(dtype))
        linear = torch.nn.Linear(64, rows, bias=False)
        linear.weight = torch.nn.Parameter(weight.to(dtype))
        return linear

    def quantize_one(m):
        if kind == "embedding":
            quantize.quantize_model(m, qembedding_config="4w", qembedding_group_size=0)
        else:
            quantize.quantize_linear(m, "8da4w", 32)

    whole, blocks = module(torch.float32), module(torch.bfloat16)
    quantize_one(whole)
    quantize.in_row_blocks(blocks, torch.float32, quantize_one)
    for name in type(whole.weight).tensor_data_names:  # qdata, scale, zero_point
        assert torch.equal(getattr(whole.weight, name), getattr(blocks.weight, name)), name
    for name in type(whole.weight).tensor_attribute_names:  # bit width, block size, dtype, activations
        assert getattr(whole.weight, name) == getattr(blocks.weight, name), name
    assert not torch.equal(whole.weight.dequantize(), weight)  # it really is quantized


def test_lm_head_holds_exactly_the_quantized_embedding_and_altup_mixers_stay_float():
    """The tied lm_head is quantized as the embedding is (int4, one scale per row): the program's
    input and output sides see the same matrix. Per channel, only AltUp's 4-input stream mixers
    (and Laurel's narrow up-projection) stay in floating point."""
    model = checkpoint.build_tiny(VARIANTS["e2b"])
    quantize.apply(model, "8da4w", "4w", PER_CHANNEL, torch.float32)
    head, table = model.lm_head.weight, model.model.embed_tokens.weight
    assert head.block_size == table.block_size == (1, head.shape[1])
    assert torch.equal(head.qdata, table.qdata) and torch.equal(head.scale, table.scale)
    layer = model.model.layers[0]
    assert type(layer.altup.correction_coefs.weight.data) is torch.Tensor
    assert layer.mlp.gate_proj.weight.block_size == (1, layer.mlp.gate_proj.in_features)


def test_lm_head_narrower_than_a_group_stays_float_like_any_such_linear():
    """With embeddings unquantized the lm_head follows --quantize; on a model 64 wide, groups of
    128 cannot cover its rows, so it stays in floating point (it used to abort the export) while
    the layers wide enough are still quantized."""
    model = checkpoint.build_tiny(VARIANTS["e2b"])
    quantize.apply(model, "8da4w", "none", 128, torch.float32)
    assert type(model.lm_head.weight.data) is torch.Tensor
    down = model.model.layers[0].mlp.down_proj
    assert down.in_features % 128 == 0 and type(down.weight.data) is not torch.Tensor
