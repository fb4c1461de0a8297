"""Progress lines for long steps: stage name, elapsed seconds, current and peak memory."""

from __future__ import annotations

import ctypes
import gc
import resource
import signal
import sys
import time
from contextlib import contextmanager
from typing import Callable


class UserError(Exception):
    """Expected failure caused by the user's input: printed as one line, no traceback."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that cleanup (no half-written file) runs."""


INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
TERMINATED_EXIT = 143  # 128 + SIGTERM


def _terminate(signum, frame):
    raise Terminated


_dropped_interrupt: BaseException | None = None


def _keep_dropped_interrupts(unraisable) -> None:
    """Python prints and drops an exception raised in a finalizer or a weakref callback: a Ctrl-C
    landing in one (lowering runs many) would be lost and the export run to its end. Keep it for
    the end of the stage instead; anything else is reported as Python would."""
    global _dropped_interrupt
    if isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)):
        _dropped_interrupt = unraisable.exc_value
    else:
        sys.__unraisablehook__(unraisable)


def raise_dropped_interrupt() -> None:
    """Raise the Ctrl-C or SIGTERM that Python dropped since the last call, if any."""
    global _dropped_interrupt
    if _dropped_interrupt is not None:
        interrupt, _dropped_interrupt = _dropped_interrupt, None
        raise interrupt.with_traceback(None)


def run_cli(body: Callable[[], int]) -> int:
    """A command's body with its one-line endings: a UserError prints ``error: ...`` and exits with
    its code; Ctrl-C exits 130 and SIGTERM 143, each with one line instead of a traceback."""
    signal.signal(signal.SIGTERM, _terminate)
    sys.unraisablehook = _keep_dropped_interrupts
    try:
        return body()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("\nerror: interrupted (Ctrl-C); no partial file was left", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Terminated:
        print("\nerror: terminated (SIGTERM); no partial file was left", file=sys.stderr)
        return TERMINATED_EXIT


_peak_before_restart = 0  # the process's high-water mark when restart_peak_rss last reset the kernel's


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return max(_peak_before_restart, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def release_freed_memory() -> None:
    """Collect what is unreachable and hand the heap's free pages back to the system. glibc keeps
    freed blocks below its (self-raising) mmap threshold, 32 MB on 64-bit, in the heap: a freed
    model's matrices stay resident (and counted) until trimmed."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, or it returns memory itself
        pass


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


def restart_peak_rss() -> bool:
    """Start /proc's resident high-water mark (VmHWM) again from the current size, so that it
    gives the peak of what follows. The kernel resets the process's maximum with it (getrusage
    reads the same mark), so peak_rss_bytes keeps the earlier one. False where not allowed."""
    global _peak_before_restart
    _peak_before_restart = peak_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


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
        own_peak = restart_peak_rss()
        began = time.perf_counter()
        yield
        raise_dropped_interrupt()
        elapsed = time.perf_counter() - began
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        stage_peak = f"stage peak {gib(memory_status('VmHWM')['VmHWM'])}, " if own_peak else ""
        log(f"[{name}] done in {elapsed:.1f} s (rss {gib(current_rss_bytes())}, {stage_peak}peak {gib(peak_rss_bytes())})")

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


class Progress:
    """Counts what a long loop has done and logs it at most every ``interval`` seconds, so that a
    run of minutes says how far it is and how fast it goes."""

    def __init__(self, what: str, total: int, unit: str, interval: float = 10.0):
        self.what, self.total, self.unit, self.interval = what, total, unit, interval
        self.done = 0
        self.start = self.logged = time.perf_counter()

    def advance(self, amount: int) -> None:
        self.done += amount
        now = time.perf_counter()
        if now - self.logged >= self.interval and self.done < self.total:
            rate = self.done / (now - self.start)
            log(f"  {self.what}: {self.done:,} of {self.total:,} {self.unit} ({rate:.1f}/s, "
                f"about {(self.total - self.done) / rate:.0f} s left)")
            self.logged = now
