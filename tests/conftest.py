"""Shared fixtures: exported programs are built once per session, through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gemma3n_executorch import checkpoint  # noqa: E402
from gemma3n_executorch.variants import VARIANTS  # noqa: E402

PROBE_WINDOWS = 8  # fixed programs are judged on 8 windows of random tokens (256 positions)


def run(script: str, *args: str, cwd: Path = REPO, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


class ProgramCache:
    """Exports each distinct configuration once for the whole session."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.paths: dict[tuple, Path] = {}

    def get(self, variant: str, *flags: str) -> Path:
        key = (variant, *flags)
        if key not in self.paths:
            name = "-".join([variant, *(f.lstrip("-") for f in flags)]) or variant
            output = self.directory / f"{name}.pte"
            run(f"{variant}/export.py", "--model", "tiny", "--output", str(output), *flags, check=True)
            self.paths[key] = output
        return self.paths[key]


@pytest.fixture(scope="session")
def programs(tmp_path_factory) -> ProgramCache:
    return ProgramCache(tmp_path_factory.mktemp("programs"))


@pytest.fixture(scope="session")
def tiny_models():
    """Eager references, built exactly as ``--model tiny`` builds them."""
    cache = {}

    def get(variant: str, dtype: torch.dtype = torch.float32):
        if (variant, dtype) not in cache:
            cache[(variant, dtype)] = checkpoint.build_tiny(VARIANTS[variant], dtype)
        return cache[(variant, dtype)]

    return get


def probe_batches(seq_len: int, vocab_size: int, windows: int = PROBE_WINDOWS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.cat([torch.tensor([[2]]), torch.randint(3, vocab_size, (1, seq_len - 1), generator=generator)], 1)
            for _ in range(windows)]
