"""What a run's figures were measured on and from: the CPU and its memory, the memory settings
the probes ran under, and the source commit."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

# The instruction sets that decide which kernels run: int8 GEMMs without VNNI, with it, bf16 with
# AVX-512 BF16, XNNPACK's AMX int8 kernels. The same 2-core VM type has come as CPUs with and without them.
CPU_FEATURES = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm")


def cpu() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    present = " ".join(feature for feature in CPU_FEATURES if feature in flags)
    return f"{fields.get('model name', 'unknown CPU')} ({present or 'none of ' + ', '.join(CPU_FEATURES)})"


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine() -> str:
    memory = physical_memory_bytes() / 2**30
    return (f"{platform.machine()}, {cpu()}, {os.cpu_count()} cores, {memory:.0f} GiB, "
            f"{platform.python_implementation()} {platform.python_version()}")


def read_bandwidth_bytes_s(size: int = 1 << 30, repeats: int = 5) -> float:
    """This machine's memory read bandwidth, with every core reading: the best of a few sums over
    a buffer far larger than any cache (decode's floor is the bytes it reads per token over this)."""
    import torch

    buffer = torch.ones(size // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - began)
    return size / best


def memory_environment(args) -> dict:
    from .. import memory_probe

    return dict(memory_probe.environment(Path(args.work_dir or tempfile.gettempdir())), step=args.probe_step)


def source_commit() -> str:
    """The commit the figures come from, '+changes' when the tree differs from it."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+changes" if dirty else "")
