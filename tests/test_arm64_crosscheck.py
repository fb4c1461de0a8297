"""The ARM64 check's judgement and its guest plumbing, on x86 (tools/arm64/; the emulated run
itself is on demand: tools/arm64/check.sh). The x86 runs of real programs are judged as if an ARM
guest had returned them: unchanged they must pass, and each kind of deliberate difference an ARM
kernel could make must fail its check."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO, run

sys.path.insert(0, str(REPO / "tools" / "arm64"))

import crosscheck  # noqa: E402
import cuda_stubs  # noqa: E402
import emulated_cpu  # noqa: E402
import instruction_log  # noqa: E402

VARIANT = ("e2b",)


@pytest.fixture(scope="module")
def references(programs):
    """The x86 runs, made once per test run and shared by the xdist workers like the programs (each
    worker that got a test of this module ran them all again, 170 s each)."""
    paths = {f"e2b-{kind}": programs.get("e2b", *flags) for kind, flags in crosscheck.PROGRAM_FLAGS.items()}
    jobs = crosscheck.jobs_for(paths, VARIANT)
    return crosscheck.References(jobs, x86=programs.shared("arm64-x86-results", lambda: crosscheck.References(jobs).x86))


def as_if_from_arm(references, **changes) -> dict:
    """The x86 results, with the named jobs' results replaced."""
    arm = {name: dict(result) for name, result in references.x86.items()}
    for name, change in changes.items():
        arm[name.replace("_", "-")].update(change)
    return arm


def failed(checks) -> set[str]:
    return {check.name for check in checks if not check.passed}


def test_x86_results_pass_every_check(references):
    checks = crosscheck.judge(as_if_from_arm(references), references, VARIANT)
    assert len(checks) == 5 and failed(checks) == set(), [c for c in checks if not c.passed]


def test_one_greedy_token_off_fails_the_fp32_check(references):
    tokens = list(references.x86["e2b-kv-fp32-greedy"]["tokens"])
    tokens[40] = (tokens[40] + 1) % 512
    checks = crosscheck.judge(as_if_from_arm(references, e2b_kv_fp32_greedy={"tokens": tokens}), references, VARIANT)
    assert failed(checks) == {"e2b-kv-fp32-greedy"}


def test_diverging_phone_tokens_with_wrong_logits_fail(references):
    """Tokens that leave the x86 path are accepted only when the logits along them agree with
    torchao's eager quantization; here they are noise of the logits' own scale."""
    import torch

    x86 = references.x86["e2b-phone-greedy"]
    tokens = list(x86["tokens"])
    tokens[10] = (tokens[10] + 1) % 512
    logits = x86["logits"] + torch.randn(x86["logits"].shape, generator=torch.Generator().manual_seed(0)) \
        * x86["logits"].std()
    arm = as_if_from_arm(references, e2b_phone_greedy={"tokens": tokens, "logits": logits})
    assert failed(crosscheck.judge(arm, references, VARIANT)) == {"e2b-phone-greedy"}


def test_diverging_phone_tokens_with_right_logits_pass(references):
    """Where ARM's int8 rounding picks another token at a near-tie, the check follows ARM's own
    tokens: logits that are torchao's eager quantization's along those tokens pass."""
    tokens = list(references.x86["e2b-phone-greedy"]["tokens"])
    tokens[10] = (tokens[10] + 1) % 512
    logits = references.eager_quantized_logits("e2b")(tokens)
    arm = as_if_from_arm(references, e2b_phone_greedy={"tokens": tokens, "logits": logits})
    checks = {c.name: c for c in crosscheck.judge(arm, references, VARIANT)}
    assert checks["e2b-phone-greedy"].passed and "differ from x86" in checks["e2b-phone-greedy"].detail


def test_runner_text_one_character_off_fails(references):
    text = references.x86["e2b-phone-runner"]["text"]
    arm = as_if_from_arm(references, e2b_phone_runner={"text": text[:-1] + ("x" if text[-1] != "x" else "y")})
    assert failed(crosscheck.judge(arm, references, VARIANT)) == {"e2b-phone-runner"}


def runner_that_left_x86(references, matches_own_loop: bool, right_logits: bool) -> dict:
    """The phone runner's results as if ARM's rounding had broken a near-tie at new token 10."""
    import torch

    x86 = references.x86["e2b-phone-runner"]
    tokens = list(x86["own_tokens"])
    tokens[10] = (tokens[10] + 1) % 512
    logits = references.x86_program_logits("e2b-phone-runner")(x86["prompt_ids"], tokens)
    if not right_logits:
        logits = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)) * logits.std()
    text = x86["text"][:15] + " another reply, after the near-tie"
    return as_if_from_arm(references, e2b_phone_runner={
        "text": text, "own_text": text if matches_own_loop else x86["own_text"], "own_tokens": tokens,
        "own_logits": logits})


def test_runner_text_off_x86_passes_only_as_our_own_loop_with_right_logits(references):
    """A phone runner whose text leaves x86's is accepted only when it printed what our own greedy
    loop did on the same CPU and that loop's logits are the x86 program's along its tokens."""
    def runner_check(**case):
        checks = {c.name: c for c in crosscheck.judge(runner_that_left_x86(references, **case), references, VARIANT)}
        return checks["e2b-phone-runner"]

    accepted = runner_check(matches_own_loop=True, right_logits=True)
    assert accepted.passed and "differs from x86" in accepted.detail
    assert not runner_check(matches_own_loop=False, right_logits=True).passed
    assert not runner_check(matches_own_loop=True, right_logits=False).passed


def test_fp32_runner_text_off_x86_fails(references):
    text = references.x86["e2b-kv-fp32-runner"]["text"]
    arm = as_if_from_arm(references, e2b_kv_fp32_runner={"text": text[:15] + " another reply", "own_text":
                                                         text[:15] + " another reply"})
    assert failed(crosscheck.judge(arm, references, VARIANT)) == {"e2b-kv-fp32-runner"}


def test_fixed_logit_off_by_twice_the_fp32_tolerance_fails(references):
    logits = references.x86["e2b-fixed-fp32-logits"]["logits"].clone()
    logits[100, 7] += 2e-3  # the fp32 bound is 1e-3 (parity.py)
    arm = as_if_from_arm(references, e2b_fixed_fp32_logits={"logits": logits})
    assert failed(crosscheck.judge(arm, references, VARIANT)) == {"e2b-fixed-fp32-logits"}


def test_kernel_families_are_told_by_their_encodings():
    assert instruction_log.family(0x4E829420) == "dotprod"  # sdot v0.4s, v1.16b, v2.16b
    assert instruction_log.family(0x4F82E020) == "dotprod"  # sdot v0.4s, v1.16b, v2.4b[0]
    assert instruction_log.family(0x4E82A420) == "i8mm"  # smmla v0.4s, v1.16b, v2.16b
    assert instruction_log.family(0xA400A000) == "sve"  # ld1b {z0.b}, p0/z, [x0]
    assert instruction_log.family(0xD503477F) == "sme"  # smstart
    assert instruction_log.family(0xA0800000) == "sme"  # smopa za0.s, p0/m, p0/m, z0.b, z0.b
    assert instruction_log.family(0x4E21CC00) is None  # fmla v0.4s, v0.4s, v1.4s: plain NEON
    maps = ("5500000000-5500100000 r-xp 00000000 fe:00 1 /env/site/executorch/extension/pybindings/"
            "_portable_lib.cpython-311-aarch64-linux-gnu.so\n5600000000-5600100000 r-xp 00000000 fe:00 2 /x/libtorch_cpu.so")
    found = {0x5500000010: "i8mm", 0x5500000020: "i8mm", 0x5600000010: "sve"}  # torch's SVE is not XNNPACK's
    assert instruction_log.summarize(found, maps) == {"sme": 0, "sve": 0, "i8mm": 2, "dotprod": 0, "bf16": 0}


def test_guest_features_and_cpuinfo_from_hwcaps():
    """The HWCAP words qemu 7.2 gives -cpu cortex-a76 (measured): dot product and fp16, no i8mm, no SVE."""
    features = emulated_cpu.feature_names(0x119FFB, 0)
    assert {"asimddp", "fphp", "asimdhp"} <= set(features) and not {"i8mm", "sve", "sme"} & set(features)
    cpuinfo = emulated_cpu.proc_cpuinfo("cortex-a76", 0x119FFB, 0, 2)
    assert cpuinfo.count("processor\t:") == 2 and "CPU implementer\t: 0x41" in cpuinfo and "CPU part\t: 0xd0b" in cpuinfo
    assert emulated_cpu.feature_names(0, 1 << 13) == ["i8mm"]


def test_unversioned_cuda_imports_go_to_the_library_they_name():
    missing = {"libcusparse.so.12", "libcusparseLt.so.0", "libcudart.so.13", "libnccl.so.2"}
    assert cuda_stubs.owner_by_prefix("cusparseLtMatmulPlanDestroy", missing) == "libcusparseLt.so.0"
    assert cuda_stubs.owner_by_prefix("cudaGetDeviceCount", missing) == "libcudart.so.13"
    assert cuda_stubs.owner_by_prefix("ncclCommDestroy", missing) == "libnccl.so.2"
    assert cuda_stubs.owner_by_prefix("PyList_New", missing) is None  # the interpreter's, not CUDA's


@pytest.mark.parametrize("args, message", [
    (["--env", "/nonexistent"], "build it with tools/arm64/check.sh"),
    (["--env", "/tmp", "--cpus", "cortex-x9"], "unknown qemu CPU model cortex-x9"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run("tools/arm64/crosscheck.py", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
