"""Progress lines for long steps: stage name, elapsed seconds, current and peak memory."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager


class UserError(Exception):
    """Expected failure caused by the user's input: printed as one line, no traceback."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_status(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (VmRSS: resident; RssFile: of it, pages of mapped
    files such as a memory-mapped program; RssAnon: allocated memory)."""
    values = dict.fromkeys(fields, 0)
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in values:
                values[name] = int(rest.split()[0]) * 1024
    return values


def current_rss_bytes() -> int:
    return memory_status("VmRSS")["VmRSS"]


def gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def human_bytes(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class StageTimer:
    """Times named stages and keeps the record for the final summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        log(f"[{name}] ...")
        began = time.perf_counter()
        yield
        elapsed = time.perf_counter() - began
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        log(f"[{name}] done in {elapsed:.1f} s (rss {gib(current_rss_bytes())}, peak {gib(peak_rss_bytes())})")

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start
