"""Fixed 32-token programs against Hugging Face eager, through the export and validate CLIs."""

from __future__ import annotations

import pytest
import torch

from gemma3n_executorch import parity, quantize
from gemma3n_executorch.runtime import Program
from tests.conftest import probe_batches, run

BF16_PEER_TOP1 = parity.tolerance_for("bf16", "none").min_top1  # why 0.90: see parity.py


def program_and_reference_logits(program_path, reference):
    program = Program(program_path)
    batches = probe_batches(program.info.seq_len, program.info.vocab_size)
    actual = torch.cat([program.forward_fixed(ids)[0] for ids in batches])
    with torch.no_grad():
        expected = torch.cat([reference(input_ids=ids).logits[0] for ids in batches])
    return actual, expected


@pytest.mark.parametrize("variant", ["e2b", "e4b"])
def test_fp32_matches_hugging_face_including_softcap(programs, tiny_models, variant):
    path = programs.get(variant, "--dtype", "fp32")
    actual, expected = program_and_reference_logits(path, tiny_models(variant))
    assert actual.dtype == torch.float32 and actual.shape == (parity.PROBE_WINDOWS * 32, 512)
    assert parity.compare(actual, expected).max_abs <= 1e-4
    # The final soft-cap is in the program: the logits it skips would differ by far more than that.
    cap = tiny_models(variant).config.final_logit_softcapping
    uncapped = torch.atanh(expected / cap) * cap
    assert parity.compare(actual, uncapped).max_abs > 0.1


@pytest.mark.parametrize("variant", ["e2b", "e4b"])
def test_bf16_agrees_with_eager_bf16(programs, tiny_models, variant):
    path = programs.get(variant)  # the CLI default: bf16
    actual, eager_bf16 = program_and_reference_logits(path, tiny_models(variant, torch.bfloat16))
    _, eager_fp32 = program_and_reference_logits(path, tiny_models(variant))
    assert actual.dtype == torch.bfloat16
    assert parity.compare(actual, eager_bf16).top1 >= BF16_PEER_TOP1
    # Against fp32, no worse than eager bf16 itself (minus 0.05): judge a precision by its peer.
    assert parity.compare(actual, eager_fp32).top1 >= parity.compare(eager_bf16, eager_fp32).top1 - 0.05


def test_int8_agrees_with_eager_int8(programs, tiny_models):
    """fp32 activations, so what is compared is the int8 weights alone, not bf16 rounding too."""
    from gemma3n_executorch import checkpoint
    from gemma3n_executorch.variants import VARIANTS

    path = programs.get("e2b", "--dtype", "fp32", "--quantize", "int8")
    eager_int8 = checkpoint.build_tiny(VARIANTS["e2b"], torch.float32)
    quantize.apply(eager_int8, "int8", "none", 32, torch.float32)
    actual, expected = program_and_reference_logits(path, eager_int8)
    _, unquantized = program_and_reference_logits(path, tiny_models("e2b"))
    assert parity.compare(actual, expected).top1 >= BF16_PEER_TOP1  # at least as close as bf16 to its peer
    assert parity.compare(actual, expected).relative_l2 < parity.compare(actual, unquantized).relative_l2 / 10
    assert parity.compare(actual, unquantized).max_abs > 1e-3  # the weights really are quantized


def test_program_is_smaller_when_int8(programs):
    int8 = programs.get("e2b", "--dtype", "fp32", "--quantize", "int8")
    assert int8.stat().st_size < programs.get("e2b", "--dtype", "fp32").stat().st_size


@pytest.mark.parametrize("variant", ["e2b", "e4b"])
def test_validate_cli_passes_against_same_checkpoint(programs, variant):
    result = run("validate.py", str(programs.get(variant)), "--model", "tiny")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout and "top-1 agreement" in result.stdout


def test_validate_cli_fails_against_other_weights(programs, tmp_path):
    from gemma3n_executorch import checkpoint
    from gemma3n_executorch.variants import VARIANTS
    from tests.checkpoints import write_text_only

    other = write_text_only(checkpoint.build_tiny(VARIANTS["e2b"], seed=7), tmp_path / "other")
    result = run("validate.py", str(programs.get("e2b", "--dtype", "fp32")), "--model", str(other))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  against eager PyTorch" in result.stdout


def test_export_cli_defaults_and_progress(programs):
    """The default program (bf16, seq_len 32, no quantization) and the stage lines of its export."""
    info = Program(programs.get("e2b")).info
    assert (info.variant, info.mode, info.seq_len, info.dtype, info.quantize) == ("E2B", "fixed", 32, "bf16", "none")
    log = programs.log("e2b")
    for stage in ("[load]", "[patch]", "[quantize]", "[export]", "[lower]", "[serialize]", "peak memory"):
        assert stage in log


def test_the_reported_peak_memory_is_the_process_s_own_peak_as_proc_sees_it(tmp_path):
    """Each stage line gives that stage's own peak (the kernel's high-water mark restarted at the
    stage), which also resets what getrusage reports: the final "peak memory" must still be the
    whole process's, as /proc shows it to a watcher sampling the export from outside."""
    import re
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    export = subprocess.Popen([sys.executable, str(REPO / "e2b" / "export.py"), "--model", "tiny", "--dtype", "fp32",
                               "--output", str(tmp_path / "fixed.pte")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    highest = 0
    while export.poll() is None:
        try:
            resident = re.search(r"VmRSS:\s+(\d+) kB", open(f"/proc/{export.pid}/status").read())
        except OSError:  # exited between the poll and the read
            break
        if resident is None:  # exited, not yet reaped: no memory left to see
            break
        highest = max(highest, int(resident.group(1)) * 1024)
        time.sleep(0.005)
    _, log = export.communicate()
    assert export.returncode == 0, log[-2000:]
    reported = float(re.search(r"peak memory ([\d.]+) GiB", log).group(1)) * 2**30
    stage_peaks = [float(p) * 2**30 for p in re.findall(r"stage peak ([\d.]+) GiB", log)]
    assert len(stage_peaks) == 6 and reported >= max(stage_peaks) - 0.01 * 2**30
    # Each stage line is its own: the early stages (a tiny model, before lowering's copies) peak lower than the run.
    assert min(stage_peaks) < reported
    assert highest - 0.01 * 2**30 <= reported <= highest * 1.1, (reported, highest)


def test_a_stage_s_restart_of_the_peak_does_not_lose_an_earlier_stage_s_peak():
    """The tiny export's memory only grows, so the test above cannot tell; here the first stage
    holds 512 MiB for a moment and the second nothing."""
    from gemma3n_executorch.progress import StageTimer, current_rss_bytes, peak_rss_bytes

    before, timer = current_rss_bytes(), StageTimer()
    with timer.stage("holds"):
        block = bytearray(512 * 2**20)
        block[::4096] = b"\1" * len(block[::4096])  # resident, page by page
        del block
    with timer.stage("frees"):
        pass
    assert peak_rss_bytes() >= before + 500 * 2**20


def test_a_small_gemma_3n_exports_with_the_phone_recipe_and_no_flags(tmp_path):
    """A valid Gemma 3n 48 wide and 32 positions long, exported with nothing but --mode kv.
    XNNPACK's 4-bit kernels need rows of a multiple of 32, so its lm_head (4-bit, one group per
    row under the default recipe) stays in floating point instead of failing in lowering
    (AssertionError ... group_size ... 48). The default context (4096) does not fit its
    max_position_embeddings: the program holds the model's 32 positions instead, while an explicit
    --max-context-length above them is refused in one line."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    from gemma3n_executorch import checkpoint
    from gemma3n_executorch.options import DEFAULT_MAX_CONTEXT_LENGTH
    from gemma3n_executorch.runtime import Program
    from gemma3n_executorch.variants import tiny_config
    from tests.checkpoints import write_text_only

    positions = 32
    assert positions < DEFAULT_MAX_CONTEXT_LENGTH
    config = dict(tiny_config(4, 1, 96), hidden_size=48, max_position_embeddings=positions)
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**config))
    checkpoint.randomize_(model)
    directory = write_text_only(model.eval(), tmp_path / "narrow")
    output = tmp_path / "narrow.pte"
    refused = run("e2b/export.py", "--model", str(directory), "--mode", "kv", "--max-context-length",
                  str(2 * positions), "--output", str(output))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and not output.exists()
    assert f"--max-context-length {2 * positions} exceeds the model's max_position_embeddings {positions}" \
        in refused.stderr.strip().splitlines()[-1]
    result = run("e2b/export.py", "--model", str(directory), "--mode", "kv", "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    info = Program(output).info
    assert (info.context_len, info.seq_len) == (positions, positions)  # the default call of 128 tokens too
    validated = run("validate.py", str(output), "--model", str(directory))
    assert validated.returncode == 0 and "PASS  against eager PyTorch" in validated.stdout, validated.stdout


def test_default_output_names():
    from gemma3n_executorch.exporter import parse_args
    from gemma3n_executorch.variants import VARIANTS

    assert str(parse_args(VARIANTS["e2b"], [])[1]) == "Gemma3n-E2B-IT-text-only.pte"
    assert str(parse_args(VARIANTS["e4b"], ["--quantize", "int8"])[1]) == "Gemma3n-E4B-IT-text-only-int8.pte"
    assert str(parse_args(VARIANTS["e2b"], ["--model", "tiny", "--mode", "kv"])[1]) == \
        "Gemma3n-E2B-IT-tiny-random-text-only-kv-8da4w-emb4w-xnnpack.pte"
    assert str(parse_args(VARIANTS["e2b"], ["--mode", "kv", "--backend", "portable", "--quantize", "none",
                                            "--quantize-embeddings", "none"])[1]) == "Gemma3n-E2B-IT-text-only-kv.pte"
    assert str(parse_args(VARIANTS["e2b"], ["--mode", "kv", "--group-size", "0"])[1]) == \
        "Gemma3n-E2B-IT-text-only-kv-8da4w-g0-emb4w-xnnpack.pte"
