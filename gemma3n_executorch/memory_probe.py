"""The resident memory of a program as a phone app pays it: ExecuTorch's stock LLM runner
(``TextLLMRunner``), or this project's runtime for comparison, in a child process that cannot
mlock, as an Android app cannot (no CAP_IPC_LOCK, a 64 KiB memlock limit). Both load the program
with ``MmapUseMlockIgnoreErrors``: where mlock works (root on Linux) every mapped page of the file
is pinned, which is not what a phone sees; where it fails the runtime maps the file and reads it
on demand.

What is recorded at each phase (after constructing, after loading ``forward``, after every
``step`` tokens of prompt, after decoding, and sampled during decode): resident, allocated
(anon), file-backed and proportional (PSS) memory of the process minus the interpreter's own
before anything was loaded (reported apart); how much of the program file's mappings is
resident, of the gathered tables' byte ranges in it and of the weights XNNPACK packs from
(program_file.Layout); and the allocations of 1 MiB or more made since the interpreter's
snapshot, by size, which is how the large blocks are told apart (docs/benchmarks.md).

The prompt is uniform random token ids over the whole vocabulary (parity.probe_tokens): every
token a different row of the tables, the most pages a prompt of that length can touch. The stock
runner takes text, so it is given a tokenizer made for the probe whose every id is one character
(``probe_tokenizer_json``); the tiny tokenizer exported beside random-weight programs only has 512.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import program_file
from .program_file import PAGE
from .progress import UserError, peak_rss_bytes

MEMLOCK_LIMIT_BYTES = 64 * 1024  # RLIMIT_MEMLOCK: Linux's default before 5.16; any segment of a real model is larger
CAP_IPC_LOCK = 14  # linux/capability.h
PAGEMAP_PRESENT = 1 << 63
LARGE_MAPPING_BYTES = 1 << 20  # allocations listed one by one in a snapshot
SAMPLE_SECONDS = 0.05
FIRST_PROBE_CHARACTER = 0x10000  # id i is chr(0x10000 + i): plane 1 up, no surrogates, no spaces
STATUS_FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
ROLLUP_FIELDS = {"Pss": "pss", "Pss_Anon": "pss_anon", "Pss_File": "pss_file", "Locked": "locked"}


# ---- the process an app runs in ----

def holds_cap_ipc_lock() -> bool:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return any(int(fields[name], 16) >> CAP_IPC_LOCK & 1 for name in ("CapEff", "CapPrm", "CapBnd"))


def without_mlock(command: list[str]) -> tuple[list[str], callable]:
    """``command`` as a phone app runs it: CAP_IPC_LOCK dropped (util-linux's setpriv, when this
    process has it), and a 64 KiB memlock limit, set by the returned preexec_fn."""
    if holds_cap_ipc_lock():
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise UserError("the memory probe needs util-linux's setpriv to drop CAP_IPC_LOCK "
                            "(apt-get install util-linux), or run it as a user without that capability")
        command = [setpriv, "--inh-caps=-ipc_lock", "--ambient-caps=-ipc_lock", "--bounding-set=-ipc_lock", *command]
    return command, lambda: resource.setrlimit(resource.RLIMIT_MEMLOCK, (MEMLOCK_LIMIT_BYTES, MEMLOCK_LIMIT_BYTES))


def mlock_refusal() -> str:
    """Why mlock of 1 MiB fails in this process; raises when it succeeds (the probe would then
    measure pinned pages, not what a phone keeps)."""
    libc = ctypes.CDLL(None, use_errno=True)
    region = mmap.mmap(-1, 1 << 20)
    start = ctypes.c_char.from_buffer(region)
    address, size = ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(len(region))
    try:
        if libc.mlock(address, size) == 0:
            libc.munlock(address, size)
            raise RuntimeError("mlock works in this process: run the probe through memory_probe.without_mlock")
        return os.strerror(ctypes.get_errno())
    finally:
        del start
        region.close()


def environment(directory: Path) -> dict:
    """What decides how much one page fault in a mapped file makes resident, where the programs are
    written: the kernel, the file system (large folios: ext4 maps whole ones), and the read-ahead
    of its device (a fault outside MADV_RANDOM reads around it; Linux's default is 128 KiB)."""
    import platform

    device = os.stat(directory).st_dev
    queue = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    read_ahead = next((q / "queue/read_ahead_kb" for q in (queue, queue / "..") if (q / "queue/read_ahead_kb").exists()),
                      None)
    file_system = max(((line.split()[1], line.split()[2]) for line in Path("/proc/self/mounts").read_text().splitlines()
                       if str(directory.resolve()).startswith(line.split()[1])), key=lambda m: len(m[0]), default=(None, None))
    return {"kernel": platform.release(), "file_system": file_system[1],
            "read_ahead_kb": int(read_ahead.read_text()) if read_ahead else None}


# ---- what is resident ----

def process_memory() -> dict[str, int]:
    """Bytes: rss, anon, file (/proc/self/status), pss, pss_anon, pss_file, locked
    (/proc/self/smaps_rollup)."""
    values = {}
    for path, fields in (("/proc/self/status", STATUS_FIELDS), ("/proc/self/smaps_rollup", ROLLUP_FIELDS)):
        with open(path) as source:
            for line in source:
                name, _, rest = line.partition(":")
                if name in fields:
                    values[fields[name]] = int(rest.split()[0]) * 1024
    return values


def anonymous_mappings() -> dict[int, dict[str, int]]:
    """Anonymous mappings of at least 1 MiB by start address, with their size and resident bytes:
    glibc serves every allocation above its mmap threshold (at most 32 MiB) as one of these."""
    mappings, current = {}, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = None
                if len(fields) == 5 and end - start >= LARGE_MAPPING_BYTES:
                    current = mappings[start] = {"bytes": end - start, "rss": 0}
            elif current is not None and fields[0] == "Rss:":
                current["rss"] = int(fields[1]) * 1024
    return mappings


def resident_pages(path: Path) -> set[int]:
    """Indices of the file's pages resident in any of this process's mappings of it
    (/proc/self/pagemap: the present bits need no privilege)."""
    pages = set()
    with open("/proc/self/pagemap", "rb") as pagemap:
        for start, end, offset in program_file.mappings(path):
            pagemap.seek(start // PAGE * 8)
            entries = memoryview(pagemap.read((end - start) // PAGE * 8)).cast("Q")
            first = offset // PAGE
            pages.update(first + i for i, entry in enumerate(entries) if entry & PAGEMAP_PRESENT)
    return pages


def bytes_in(pages: set[int], ranges: list[program_file.ByteRange]) -> int:
    """Bytes of ``ranges`` that lie in resident pages."""
    total = 0
    for byte_range in ranges:
        for page in range(byte_range.start // PAGE, (byte_range.end + PAGE - 1) // PAGE):
            if page in pages:
                total += min(byte_range.end, (page + 1) * PAGE) - max(byte_range.start, page * PAGE)
    return total


class Recorder:
    """Snapshots of this process's memory against the interpreter's own, taken at construction."""

    def __init__(self, program: Path, layout: program_file.Layout):
        self.program, self.layout = program, layout
        self.interpreter = process_memory()
        self.interpreter_mappings = set(anonymous_mappings())
        self.phases: list[dict] = []

    def above_interpreter(self, memory: dict[str, int]) -> dict[str, int]:
        return {key: value - self.interpreter.get(key, 0) for key, value in memory.items()}

    def snapshot(self, phase: str, tokens_seen: int) -> dict:
        pages = resident_pages(self.program)
        record = dict(phase=phase, tokens_seen=tokens_seen, **self.above_interpreter(process_memory()),
                      program_file_resident=len(pages) * PAGE,
                      tables_resident={name: bytes_in(pages, table.ranges) for name, table in self.layout.tables.items()},
                      packing_sources_resident=bytes_in(pages, self.layout.named_data + self.layout.delegate_blobs),
                      new_anonymous_mappings=sorted((m for start, m in anonymous_mappings().items()
                                                     if start not in self.interpreter_mappings),
                                                    key=lambda m: -m["bytes"]))
        self.phases.append(record)
        return record


class Sampler:
    """The process's memory every 50 ms on a thread, while the stock runner works without the GIL:
    the highest resident, anon and PSS figures it saw (above the interpreter)."""

    def __init__(self, recorder: Recorder):
        self.recorder, self.peaks = recorder, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        for key, value in self.recorder.above_interpreter(process_memory()).items():
            self.peaks[key] = max(self.peaks.get(key, value), value)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ---- a tokenizer whose every id is one character ----

def probe_piece(token: int) -> str:
    from .tiny_tokenizer import SPECIAL_TOKENS

    return SPECIAL_TOKENS[token] if token < len(SPECIAL_TOKENS) else chr(FIRST_PROBE_CHARACTER + token)


def probe_tokenizer_json(vocab_size: int) -> str:
    """Gemma's tokenizer structure (the tiny tokenizer's: special tokens at Gemma's ids, BOS added
    by the post-processor) with a vocabulary of ``vocab_size`` single characters and no merges, so
    the text of any id sequence encodes back to exactly those ids."""
    from .tiny_tokenizer import build_tiny_tokenizer

    spec = json.loads(build_tiny_tokenizer().to_str())
    spec["model"]["vocab"] = {probe_piece(token): token for token in range(vocab_size)}
    spec["model"]["merges"] = []
    return json.dumps(spec, ensure_ascii=False)


def probe_text(tokens: list[int]) -> str:
    return "".join(probe_piece(token) for token in tokens)


# ---- the two runners ----

def chunks(prompt: list[int], step: int) -> list[list[int]]:
    """The prompt after its BOS (which the runner adds), in pieces of ``step`` tokens."""
    body = prompt[1:]
    return [body[start:start + step] for start in range(0, len(body), step)]


@dataclass(frozen=True)
class Probe:
    program: Path
    prompt: list[int]  # starting with BOS
    new_tokens: int
    step: int  # tokens of prompt between snapshots
    advise_random: bool  # stock runner: advise random access on the file's mappings once loaded, as an app may


def probe_stock_runner(probe: Probe, work: Path) -> dict:
    """ExecuTorch's TextLLMRunner: constructed (program and metadata loaded), ``forward`` loaded by
    a one-token prefill (the runner loads it on first use) and reset, the prompt prefilled
    ``step`` tokens at a time, then ``new_tokens`` decoded greedily."""
    import executorch.kernels.quantized  # noqa: F401  the quantized embedding kernels
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  llama:: kernels
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    layout = program_file.layout(probe.program)
    tokenizer = work / "probe.tokenizer.json"
    tokenizer.write_text(probe_tokenizer_json(layout.tables["token_embedding"].rows))
    refusal = mlock_refusal()
    recorder = Recorder(probe.program, layout)
    from . import kernel

    kernel.load_for_program(probe.program)
    runner = TextLLMRunner(str(probe.program), str(tokenizer))
    if probe.advise_random:
        program_file.advise_random_access(probe.program)
    recorder.snapshot("constructed", 0)
    runner.prefill("", GenerationConfig(num_bos=1, num_eos=0))
    runner.reset()
    program_file.evict_from_page_cache(probe.program)  # what loading cached around the weights (measure)
    recorder.snapshot("loaded", 0)
    seen, prefill_s = 0, 0.0
    for index, piece in enumerate(chunks(probe.prompt, probe.step)):
        began = time.perf_counter()
        runner.prefill(probe_text(piece), GenerationConfig(num_bos=1 if index == 0 else 0, num_eos=0))
        prefill_s += time.perf_counter() - began
        seen += len(piece) + (index == 0)
        recorder.snapshot("prefill", seen)
    stats = {}
    with Sampler(recorder) as sampler:
        began = time.perf_counter()
        runner.generate("", GenerationConfig(echo=False, max_new_tokens=probe.new_tokens, temperature=0.0),
                        stats_callback=lambda s: stats.update(generated=s.num_generated_tokens))
        decode_s = time.perf_counter() - began
    recorder.snapshot("decoded", seen + stats["generated"])
    return result(recorder, refusal, layout, prompt_tokens=seen, generated_tokens=stats["generated"],
                  advised=probe.advise_random, prefill_s=prefill_s, decode_peaks=sampler.peaks,
                  decode_tok_s=stats["generated"] / decode_s)


def probe_runtime(probe: Probe) -> dict:
    """This project's runtime (runtime.Program, executorch.runtime's mmap loader), the same phases;
    it holds the GIL while it runs, so decode is sampled after every token."""
    from .runtime import Program

    layout = program_file.layout(probe.program)
    refusal = mlock_refusal()
    recorder = Recorder(probe.program, layout)
    loaded = Program(probe.program)  # loads forward, reads the metadata methods, advises random access
    program_file.evict_from_page_cache(probe.program)  # what loading cached around the weights (measure)
    recorder.snapshot("loaded", 0)
    pieces = chunks(probe.prompt, probe.step)
    prefill_s = 0.0
    for piece in [probe.prompt[:1] + pieces[0]] + pieces[1:]:
        began = time.perf_counter()
        logits = loaded.step(piece)
        prefill_s += time.perf_counter() - began
        recorder.snapshot("prefill", loaded.position)
    sampler, decode_s = Sampler(recorder), 0.0
    for _ in range(probe.new_tokens - 1):
        began = time.perf_counter()
        logits = loaded.step([int(logits.argmax())])
        decode_s += time.perf_counter() - began
        sampler.sample()
    recorder.snapshot("decoded", loaded.position)
    return result(recorder, refusal, layout, prompt_tokens=len(probe.prompt), generated_tokens=probe.new_tokens,
                  advised=True, prefill_s=prefill_s, decode_peaks=sampler.peaks,
                  decode_tok_s=(probe.new_tokens - 1) / decode_s)


def result(recorder: Recorder, refusal: str, layout: program_file.Layout, decode_peaks: dict, **figures) -> dict:
    return dict(figures, mlock=f"refused ({refusal})", interpreter=recorder.interpreter, layout=layout.record(),
                phases=recorder.phases, decode_peaks=decode_peaks,
                peak_rss_bytes=peak_rss_bytes() - recorder.interpreter["rss"],
                prefill_tok_s=figures["prompt_tokens"] / figures["prefill_s"])


# What each probe runs: the stock runner as ExecuTorch loads the program, the same with the
# advice the README gives an app (program_file.advise_random_access), and this project's runtime,
# which advises it itself.
PROBES = {"stock": ("stock", False), "stock-advised": ("stock", True), "runtime": ("runtime", False)}


def measure(probe: str, program: Path, prompt_tokens: int, new_tokens: int, step: int, work: Path) -> dict:
    """One of PROBES in a child process that cannot mlock; the runner's printed text is discarded
    and its log kept in ``work`` (its tail is the error when the child fails).

    The program file is evicted from the page cache before loading, as after a reboot, and again
    once loaded: what is cached, and in what folio sizes, decides how much one page fault maps
    (fault-around maps cached neighbours, ext4 whole large folios), and with this VM's 8 MiB
    read-ahead (Linux's default is 128 KiB) loading leaves megabytes cached around every weight
    XNNPACK read, which would then be mapped by the prompt's first faults anywhere near them."""
    runner, advise = PROBES[probe]
    work.mkdir(parents=True, exist_ok=True)
    out, log_path = work / f"memory-{probe}.json", work / f"memory-{probe}.log"
    command, limit_memlock = without_mlock([sys.executable, "-m", __name__, runner, str(program), str(prompt_tokens),
                                            str(new_tokens), str(step), str(int(advise)), str(out)])
    with log_path.open("wb") as log:
        completed = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                   preexec_fn=limit_memlock, cwd=Path(__file__).resolve().parent.parent)
    if completed.returncode != 0:
        tail = log_path.read_bytes()[-2000:].decode(errors="replace")
        raise RuntimeError(f"memory probe {probe} of {program} failed (exit {completed.returncode}): {tail}")
    return json.loads(out.read_text())


def main(argv: list[str]) -> int:
    """The child: RUNNER PROGRAM.pte PROMPT_TOKENS NEW_TOKENS STEP ADVISE_RANDOM(0/1) OUT.json"""
    from .parity import probe_tokens
    from .variants import BOS_ID

    runner, program, prompt_len, new_tokens, step, advise, out = argv
    program = Path(program)
    prompt = probe_tokens(int(prompt_len), program_file.layout(program).tables["token_embedding"].rows, BOS_ID)
    probe = Probe(program, prompt, int(new_tokens), int(step), advise == "1")
    program_file.evict_from_page_cache(program)
    record = probe_stock_runner(probe, Path(out).parent) if runner == "stock" else probe_runtime(probe)
    Path(out).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
