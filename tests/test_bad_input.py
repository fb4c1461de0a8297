"""Bad input: a one-line reason, the documented exit code, no traceback and no partial file."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemma3n_executorch import lowering, progress
from gemma3n_executorch.constants_on_disk import ConstantsOnDisk
from gemma3n_executorch.progress import UserError
from tests.conftest import REPO, run


def assert_clean_error(result, code: int, fragment: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_directory(tmp_path):
    result = run("e2b/export.py", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.pte"))
    assert_clean_error(result, 2, "no such directory")
    assert not (tmp_path / "x.pte").exists()


def test_wrong_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    result = run("e4b/export.py", "--model", str(tmp_path), "--output", str(tmp_path / "x.pte"))
    assert_clean_error(result, 2, "is not Gemma 3n")
    assert not (tmp_path / "x.pte").exists()


def test_unwritable_output(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        # root ignores permission bits; /proc/sys is refused to root as well (Linux).
        target = next((d for d in (locked, Path("/proc/sys")) if d.is_dir() and not os.access(d, os.W_OK)), None)
        if target is None:
            pytest.skip("no directory here is unwritable for this user")
        result = run("e2b/export.py", "--model", "tiny", "--output", str(target / "x.pte"))
        assert_clean_error(result, 2, "cannot write")
    finally:
        locked.chmod(0o700)


def test_output_in_missing_directory(tmp_path):
    result = run("e2b/export.py", "--model", "tiny", "--output", str(tmp_path / "no" / "x.pte"))
    assert_clean_error(result, 2, "does not exist")


def test_output_must_be_pte(tmp_path):
    result = run("e2b/export.py", "--model", "tiny", "--output", str(tmp_path / "x.bin"))
    assert result.returncode == 2 and "must end in .pte" in result.stderr


def test_validate_missing_file(tmp_path):
    assert_clean_error(run("validate.py", str(tmp_path / "missing.pte")), 2, "no such file")


def test_validate_non_pte_file(tmp_path):
    other = tmp_path / "model.bin"
    other.write_bytes(b"\0" * 100)
    assert_clean_error(run("validate.py", str(other)), 2, "not a .pte file")


def test_validate_garbage_with_pte_suffix(tmp_path):
    garbage = tmp_path / "garbage.pte"
    garbage.write_text("this is not a program")
    assert_clean_error(run("validate.py", str(garbage)), 2, "not an ExecuTorch program")


def test_validate_truncated_program(programs, tmp_path):
    whole = programs.get("e2b").read_bytes()
    truncated = tmp_path / "truncated.pte"
    truncated.write_bytes(whole[: len(whole) // 2])
    assert_clean_error(run("validate.py", str(truncated)), 2, "truncated")


def test_validate_wrong_arguments():
    result = run("validate.py")
    assert result.returncode == 2 and "usage:" in result.stderr


class _FailingProgram:
    """Writes half a program, then fails: what an interrupted serialization looks like."""

    def write_to_file(self, file) -> None:
        file.write(b"\0" * 1000)
        raise KeyboardInterrupt


def test_failed_write_leaves_no_file(tmp_path):
    output = tmp_path / "model.pte"
    with pytest.raises(KeyboardInterrupt):
        lowering.write_atomically(_FailingProgram(), output)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path):
    output = tmp_path / "model.pte"
    output.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        lowering.write_atomically(_FailingProgram(), output)
    assert output.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [output]


def test_written_file_has_normal_permissions(tmp_path):
    class Program:
        def write_to_file(self, file) -> None:
            file.write(b"data")

    output = tmp_path / "model.pte"
    lowering.write_atomically(Program(), output)
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask
    assert Path(output).read_bytes() == b"data"


@pytest.mark.parametrize("extra, fragment", [
    ([], "needs --llama-cpp DIR"),
    (["--layers", "5", "--llama-cpp", "TREE"], "needs the full-depth random model"),
    (["--llama-cpp", "TREE"], "convert_hf_to_gguf.py; build it"),
], ids=["no-tree", "cut-depth", "unbuilt-tree"])
def test_bench_llama_cpp_baseline_needs_a_built_tree_and_the_full_model(tmp_path, extra, fragment):
    extra = [str(tmp_path) if part == "TREE" else part for part in extra]
    result = run("bench.py", "--variant", "e2b", "--configs", "llamacpp-q4_0", "--json", str(tmp_path / "b.json"), *extra)
    assert_clean_error(result, 2, fragment)
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("extra, fragment", [
    ([], "need --litert-lm VENV"),
    (["--litert-lm", "EMPTY"], "bin/python; make the environment"),
    (["--litert-lm", sys.prefix], "no litert_torch, litert_lm, tensorflow"),
], ids=["no-venv", "not-a-venv", "venv-without-litert"])
def test_bench_litert_lm_peer_needs_a_venv_with_its_tools(tmp_path, extra, fragment):
    extra = [str(tmp_path) if part == "EMPTY" else part for part in extra]
    result = run("bench.py", "--variant", "e2b", "--layers", "3", "--configs", "litertlm-int8",
                 "--json", str(tmp_path / "b.json"), *extra)
    assert_clean_error(result, 2, fragment)
    assert not (tmp_path / "b.json").exists()


def test_validate_program_shorter_than_its_header(programs, tmp_path):
    stub = tmp_path / "stub.pte"
    stub.write_bytes(programs.get("e2b").read_bytes()[:30])
    assert_clean_error(run("validate.py", str(stub)), 2, "shorter than its header")


def test_group_size_xnnpack_cannot_run_is_refused_before_loading(tmp_path):
    """XNNPACK's 4-bit kernels need groups of a multiple of 32; 16 used to fail deep in lowering."""
    result = run("e2b/export.py", "--model", str(tmp_path / "not-loaded"), "--mode", "kv", "--group-size", "16")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "e2b/export.py: error: --group-size must be a multiple of 32" in result.stderr
    assert "multiple of 32" in run("e2b/export.py", "--help").stdout


def _write(data: bytes):
    return lambda file: file.write(data)


def _disk_full(file) -> None:
    file.write(b"half a tokenizer")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_program_and_tokenizer_are_written_together_or_not_at_all(tmp_path):
    """Disk full while writing the tokenizer used to leave a complete new .pte beside a truncated
    tokenizer.json (written in place after the program)."""
    program, tokenizer = tmp_path / "m.pte", tmp_path / "m.tokenizer.json"
    program.write_bytes(b"old program")
    tokenizer.write_bytes(b"old tokenizer")
    with pytest.raises(UserError, match="cannot write .*m.tokenizer.json: No space left on device"):
        lowering.write_together({program: _write(b"new program"), tokenizer: _disk_full})
    assert program.read_bytes() == b"old program" and tokenizer.read_bytes() == b"old tokenizer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pte", "m.tokenizer.json"]  # no .partial


def test_stale_tokenizer_goes_when_the_checkpoint_has_none(tmp_path):
    from gemma3n_executorch.checkpoint import LoadedModel
    from gemma3n_executorch.exporter import companion_files, tokenizer_path_for, writer

    program = tmp_path / "m.pte"
    tokenizer_path_for(program).write_text("from an earlier export")
    checkpoint_directory = tmp_path / "checkpoint"
    checkpoint_directory.mkdir()
    tokenizer, template = companion_files(LoadedModel(None, str(checkpoint_directory), checkpoint_directory))
    assert tokenizer is None and template is None
    lowering.write_together({program: _write(b"program"), tokenizer_path_for(program): writer(tokenizer)})
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["m.pte"]


def test_sigterm_during_the_write_leaves_nothing(tmp_path):
    def terminated_midway(file) -> None:
        file.write(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, progress._terminate)
    try:
        with pytest.raises(progress.Terminated):
            lowering.write_together({tmp_path / "m.pte": terminated_midway})
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []


def ctrl_c_reaches_it() -> None:
    """In the child, before Python starts: SIGINT handled as in a terminal. A shell without job
    control starts background commands (`pytest ... &`) with SIGINT ignored, and Python keeps that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_lowering_exits_130_with_one_line_and_no_file(tmp_path):
    output = tmp_path / "m.pte"
    process = subprocess.Popen([sys.executable, str(REPO / "e2b" / "export.py"), "--model", "tiny", "--seq-len", "8",
                                "--output", str(output)], stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_it)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("[lower] ..."):
            time.sleep(1)
            process.send_signal(signal.SIGINT)
            break
    lines += process.stderr.readlines()
    stderr = "".join(lines)
    assert process.wait() == 130, stderr
    assert "Traceback" not in stderr and [l for l in lines if l.startswith("error:")] == [
        "error: interrupted (Ctrl-C); no partial file was left\n"]
    assert list(tmp_path.iterdir()) == []


DROPPED_CTRL_C = """
import os, signal, sys, time
from gemma3n_executorch.progress import StageTimer, run_cli

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the KeyboardInterrupt is raised here, where Python prints and drops it

def body():
    timer = StageTimer()
    with timer.stage("lower"):
        Finalized()
    with timer.stage("serialize"):
        print("serialized")
    return 0

sys.exit(run_cli(body))
"""


def test_ctrl_c_in_a_finalizer_still_stops_the_command_at_the_end_of_its_stage():
    """Lowering runs many finalizers and weakref callbacks; a Ctrl-C landing in one must not be lost
    (the command ran to its end with exit 0 under a loaded CI machine)."""
    result = subprocess.run([sys.executable, "-c", DROPPED_CTRL_C], cwd=REPO, capture_output=True, text=True,
                            preexec_fn=ctrl_c_reaches_it)
    assert result.returncode == 130 and result.stdout == "", result.stderr
    assert "Traceback" not in result.stderr and "[serialize]" not in result.stderr
    assert result.stderr.splitlines()[-1] == "error: interrupted (Ctrl-C); no partial file was left"


def test_validate_tokens_zero_is_a_usage_error(programs):
    result = run("validate.py", str(programs.get("e2b")), "--tokens", "0")
    assert result.returncode == 2 and "--tokens must be at least 1" in result.stderr and "FAIL" not in result.stdout


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_refuses_a_temperature_that_is_not_a_finite_number(programs, value):
    result = run("generate.py", str(programs.get("e2b")), "--prompt", "Hi", "--temperature", value)
    assert result.returncode == 2 and "finite --temperature" in result.stderr and "Traceback" not in result.stderr


def test_sigint_during_generation_exits_130_with_one_line(programs):
    """Ctrl-C while tokens stream: the fixed program slides its window with no end in sight (its
    greedy text runs past 1500 tokens without a stop token), so the signal lands mid-generation."""
    process = subprocess.Popen([sys.executable, str(REPO / "generate.py"), str(programs.get("e2b", "--dtype", "fp32")),
                                "--prompt", "Hello", "--max-new-tokens", "100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONWARNINGS="ignore"),
                               preexec_fn=ctrl_c_reaches_it)
    streamed = process.stdout.read(1)  # the first token's text has been printed
    process.send_signal(signal.SIGINT)
    streamed += process.stdout.read()
    stderr = process.stderr.read().decode()
    assert process.wait() == 130 and streamed, stderr
    assert "Traceback" not in stderr and "[prefill" not in stderr  # it did not end by itself
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "error: interrupted (Ctrl-C); no partial file was left"]


def _replayed_load_failure(monkeypatch, where: str, failure: BaseException, log_lines: tuple[str, ...] = ()):
    """Make loading fail as ExecuTorch 1.4.1 does (measured: out of memory under a lowered
    RLIMIT_AS, a kernel missing from the runtime): it writes its log lines to sys.stderr (its
    bindings route the runtime's log there), then raises. ``where``: the executorch.runtime
    method that fails."""
    import executorch.runtime

    owner = executorch.runtime.Runtime if where == "load_program" else executorch.runtime.Program
    original = getattr(owner, where)

    def failing(self, name, *args, **kwargs):
        if where == "load_program" or name == "forward":
            sys.stderr.write("".join(line + "\n" for line in log_lines))
            raise failure
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(owner, where, failing)


@pytest.mark.parametrize("where, failure, log_lines, fragment", [
    ("load_program", MemoryError(), (), "not enough memory to load it ({size}); close other programs"),
    ("load_program", RuntimeError("Failed to load program, error: 0x:22"),
     ("[mmap_data_loader.cpp:211] Failed to map m.pte: mmap(..., size=4096, ..., fd=3, offset=0x0)",),
     "not enough memory to load it ({size}; Failed to map m.pte: mmap("),
    ("load_method", RuntimeError("Failed to load method forward, error: 0x:1"),
     ("[XNNCompiler.cpp:2230] XNN Runtime creation failed with code: xnn_status_out_of_memory",
      "[XNNPACKBackend.cpp:143] XNNCompiler::compileModel failed: 0x1",
      "[method.cpp:128] Init failed for backend XnnpackBackend: 0x1"),
     "not enough memory to load it ({size}; XNN Runtime creation failed with code: xnn_status_out_of_memory)"),
    ("load_method", RuntimeError("Failed to load method forward, error: 0x:14"),
     ("[operator_registry.cpp:277] kernel 'quantized_decomposed::embedding_4bit.out' not found.",
      "[operator_registry.cpp:278] dtype: 0 | dim order: [",
      "[method.cpp:819] Missing operator: [9] quantized_decomposed::embedding_4bit.out",
      "[method.cpp:1125] There are 16 instructions don't have corresponding operator registered. See logs for details"),
     "the ExecuTorch runtime cannot load it (Failed to load method forward, error: 0x:14: kernel "
     "'quantized_decomposed::embedding_4bit.out' not found.); re-export it"),
], ids=["bad-alloc", "mmap", "xnnpack", "missing-kernel"])
def test_a_program_that_cannot_be_loaded_is_one_line(programs, monkeypatch, capsys, where, failure, log_lines,
                                                      fragment):
    """Loading the forward method (XNNPACK out of memory, a missing kernel) raised a bare
    RuntimeError, a traceback; a program that could not be mapped was to be re-exported; the
    runtime's own lines went out beside the error."""
    from gemma3n_executorch.progress import human_bytes
    from gemma3n_executorch.runtime import Program

    path = programs.get("e2b", "--dtype", "fp32")
    _replayed_load_failure(monkeypatch, where, failure, log_lines)
    with pytest.raises(UserError) as raised:
        Program(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and fragment.format(size=human_bytes(path.stat().st_size)) in message
    assert capsys.readouterr().err == ""  # folded into the one line, not printed beside it


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 64 KiB filesystem (tmpfs; mounting needs root)."""
    directory = tmp_path / "small"
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); "
                    "test_program_and_tokenizer_are_written_together_or_not_at_all simulates the full disk instead")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_disk_full_while_writing_the_program_keeps_the_previous_files(programs, small_filesystem):
    """A real program (1.6 MB) written to a filesystem of 64 KiB: the kernel's ENOSPC, not a
    simulated one. The previous export stays whole and its space is not taken by a temporary."""
    program, tokenizer = small_filesystem / "m.pte", small_filesystem / "m.tokenizer.json"
    program.write_bytes(b"previous program")
    tokenizer.write_bytes(b"previous tokenizer")
    free = os.statvfs(small_filesystem).f_bfree
    new = programs.get("e2b", "--dtype", "fp32")
    with pytest.raises(UserError) as raised:
        lowering.write_together({program: _write(new.read_bytes()), tokenizer: _write(b"new tokenizer")})
    assert str(raised.value) == (f"cannot write {program}: No space left on device; free some space or choose "
                                 "another --output (nothing was written)")
    assert program.read_bytes() == b"previous program" and tokenizer.read_bytes() == b"previous tokenizer"
    assert sorted(p.name for p in small_filesystem.iterdir()) == ["m.pte", "m.tokenizer.json"]
    assert os.statvfs(small_filesystem).f_bfree == free


def test_disk_full_while_the_constants_wait_on_disk_is_one_line_and_leaves_nothing(small_filesystem):
    """The emitter's copies of the constants go to a scratch file beside the output (as large as
    the program): a disk that fills up is the user's to fix, said in one line."""
    free = os.statvfs(small_filesystem).f_bfree
    disk = ConstantsOnDisk(small_filesystem, min_bytes=1)
    with pytest.raises(UserError) as raised:
        disk.begin(1 << 20).write(bytes(1 << 20))
    assert str(raised.value) == (
        f"cannot keep the program's constants in {small_filesystem} while exporting: No space left on device; the "
        "export needs about the program's size free there besides the program itself: free some space or choose "
        "another --output")
    disk.close()
    assert list(small_filesystem.iterdir()) == [] and os.statvfs(small_filesystem).f_bfree == free
