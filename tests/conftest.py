"""Shared fixtures: exported programs are built once per session, through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The suite runs two workers on two cores: OpenMP teams of two in each (torch's, and the ones
# ExecuTorch's portable operators use) wait on each other's busy cores, which made a one-token call
# of the trained model's portable program 7x slower (0.48 s against 0.067 s with one thread, measured
# under the suite's load). Set before torch loads OpenMP; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gemma3n_executorch import checkpoint, parity  # noqa: E402
from gemma3n_executorch.variants import BOS_ID, TINY_MODEL, VARIANTS  # noqa: E402


# The string-hash seed of every cached export: test_patches.py exports again under another seed and
# compares the bytes.
EXPORT_HASH_SEED = "0"


def run(script: str, *args: str, cwd: Path = REPO, check: bool = False,
        env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


class ProgramCache:
    """Exports each distinct configuration once per test run, shared by all pytest-xdist workers:
    the first worker to ask exports under a file lock, the others wait and reuse the file. Each
    export runs from inside its variant's folder with an --output relative to it, as a user may:
    every test of a cached program also checks that the program landed where the path said."""

    def __init__(self, directory: Path):
        self.directory = directory

    def get(self, variant: str, *flags: str, model: str = TINY_MODEL) -> Path:
        name = "-".join([variant, *([model] if model != TINY_MODEL else []), *(f.lstrip("-") for f in flags)])
        output = self.directory / f"{name}.pte"
        with FileLock(str(output) + ".lock"):
            if not output.exists():
                folder = REPO / variant
                result = run(f"{variant}/export.py", "--model", model, "--output", os.path.relpath(output, folder),
                             *flags, cwd=folder, check=True, env={"PYTHONHASHSEED": EXPORT_HASH_SEED})
                output.with_suffix(".log").write_text(result.stderr)
        return output

    def shared(self, name: str, compute):
        """``compute()``'s result (anything torch.save takes), computed by the first worker to ask
        and reused by the others, as the programs are."""
        import torch

        path = self.directory / f"{name}.pt"
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                torch.save(compute(), path)
        return torch.load(path, weights_only=False)

    def log(self, variant: str, *flags: str, model: str = TINY_MODEL) -> str:
        """What the exporter printed while making that program."""
        return self.get(variant, *flags, model=model).with_suffix(".log").read_text()


@pytest.fixture(scope="session")
def programs(tmp_path_factory, worker_id) -> ProgramCache:
    # getbasetemp() is per worker under xdist; its parent is shared by the whole run.
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if worker_id != "master" else root
    directory = shared / "programs"
    directory.mkdir(exist_ok=True)
    return ProgramCache(directory)


@pytest.fixture(scope="session")
def tiny_models():
    """Eager references, built exactly as ``--model tiny`` builds them."""
    cache = {}

    def get(variant: str, dtype: torch.dtype = torch.float32):
        if (variant, dtype) not in cache:
            cache[(variant, dtype)] = checkpoint.build_tiny(VARIANTS[variant], dtype)
        return cache[(variant, dtype)]

    return get


def probe_batches(seq_len: int, vocab_size: int, windows: int = parity.PROBE_WINDOWS) -> list[torch.Tensor]:
    return [torch.tensor([parity.probe_tokens(seq_len, vocab_size, BOS_ID, seed)]) for seed in range(windows)]
