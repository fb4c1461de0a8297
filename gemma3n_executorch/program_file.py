"""Where things lie in a .pte file, and how this process maps it.

The layout is read from the program's own flatbuffer: the segments after it, and the byte ranges
of what the runtime maps from the file (the constant segment and, in it, the gathered tables; the
delegates' blobs; the named data XNNPACK packs its weights from), whose resident pages the memory
probe counts. ExecuTorch's loader maps the file (``MmapDataLoader``); ``advise_random_access``
tells the kernel how the gathered tables are read.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from . import preflight

# The decoder gathers from two tables, one row per token: the token embedding, then (in
# Gemma3nTextModel.get_per_layer_inputs) the per-layer embedding table; the program keeps that order.
TABLE_NAMES = ("token_embedding", "per_layer_embedding")
PAGE = os.sysconf("SC_PAGE_SIZE")
# The page the file's layout is made for: its segments start on one, the gathered tables first in
# the constant segment, and a table's rows padded to whole ones where that is cheap (quantize.py).
# Android's and x86 Linux's 4 KiB; a row aligned to it lies in one 16 KiB page too.
FILE_PAGE = 4096
MADV_RANDOM = mmap.MADV_RANDOM
PROC_MAPS = "/proc/self/maps"
# The kernels of --quantize-embeddings 4w, 8w and none.
GATHER_KERNELS = ("quantized_decomposed::embedding_4bit", "quantized_decomposed::embedding_byte", "aten::embedding")


@dataclass(frozen=True)
class ByteRange:
    start: int  # offset in the file
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Table:
    rows: int
    row_bytes: int
    weight: ByteRange
    scales: ByteRange | None  # quantized tables: one scale per row

    @property
    def ranges(self) -> list[ByteRange]:
        return [self.weight] + ([self.scales] if self.scales else [])

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self.ranges)


@dataclass(frozen=True)
class Layout:
    file_bytes: int
    flatbuffer: ByteRange
    constant_segment: ByteRange | None  # the tensors the program's own kernels read, mapped at load
    delegate_blobs: list[ByteRange]  # XNNPACK's serialized graphs, freed after init
    named_data: list[ByteRange]  # the weights XNNPACK packs at init (then unmapped)
    tables: dict[str, Table]
    initialized_state_bytes: int  # initial values of mutable buffers, copied into planned memory at load
    segment_alignment: int  # the largest power of two every segment's file offset is a multiple of

    @property
    def stored_bytes(self) -> int:
        """What the file holds less the padding that starts each segment on a page."""
        return (self.flatbuffer.size + (self.constant_segment.size if self.constant_segment else 0)
                + sum(r.size for r in self.delegate_blobs + self.named_data))

    def record(self) -> dict:
        """The layout as JSON-ready figures."""
        return {
            "file_bytes": self.file_bytes, "flatbuffer_bytes": self.flatbuffer.size,
            "constant_segment_bytes": self.constant_segment.size if self.constant_segment else 0,
            "delegate_blob_bytes": sum(r.size for r in self.delegate_blobs),
            "named_data_bytes": sum(r.size for r in self.named_data),
            "table_bytes": {name: table.bytes for name, table in self.tables.items()},
            "initialized_state_bytes": self.initialized_state_bytes, "segment_alignment": self.segment_alignment,
        }


def read_program(path: Path):
    """The program's flatbuffer as ExecuTorch's schema objects, its size, and the file offset its
    segments are counted from."""
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program

    with Path(path).open("rb") as file:
        head = file.read(preflight.EXTENDED_HEADER_END)
        file.seek(0)
        size = preflight.flatbuffer_size(head)
        program = _flatbuffer_to_program(file.read(size) if size else file.read())
    return program, size or Path(path).stat().st_size, preflight.segment_base_offset(head)


def delegate_weight_bytes(blobs: list[bytes], named_sizes: dict[str, int]) -> list[int]:
    """For each delegate blob, the bytes of the named weights it uses (XNNPACK's serialized graph
    names each weight it packs by its key in the program's named data)."""
    keys = {key.encode(): size for key, size in named_sizes.items()}
    return [sum(size for key, size in keys.items() if key in blob) for blob in blobs]


def delegate_weights_in_load_order(path: Path) -> list[int]:
    """``delegate_weight_bytes`` of forward's delegates, in the order the runtime initializes them."""
    from executorch.exir.schema import DataLocation

    program, _, base = read_program(path)
    with Path(path).open("rb") as file:
        def segment(index: int) -> bytes:
            file.seek(base + program.segments[index].offset)
            return file.read(program.segments[index].size)

        blobs = [segment(d.processed.index) if d.processed.location == DataLocation.SEGMENT
                 else program.backend_delegate_data[d.processed.index].data for d in forward_plan(program).delegates]
    named = {entry.key: program.segments[entry.segment_index].size for entry in program.named_data or []}
    return delegate_weight_bytes(blobs, named)


def forward_plan(program):
    return next(plan for plan in program.execution_plan if plan.name == "forward")


def kernel_calls(path: Path) -> list[tuple[str, list[tuple[int, ...]]]]:
    """forward's operators outside its delegates, in the order they run: each one's name and the
    (planned, largest) shapes of its tensor arguments."""
    from executorch.exir.schema import KernelCall, Tensor

    plan = forward_plan(read_program(path)[0])
    calls = []
    for chain in plan.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            if isinstance(call, KernelCall):
                values = [plan.values[index].val for index in call.args]
                calls.append((plan.operators[call.op_index].name,
                              [tuple(value.sizes) for value in values if isinstance(value, Tensor)]))
    return calls


def planned_bytes(program) -> int:
    """The memory ExecuTorch's planner reserves for ``forward``: activations and the KV caches (the
    runtime allocates it at load time; buffer 0 is reserved and empty)."""
    return sum(forward_plan(program).non_const_buffer_sizes)


def _tensor_bytes(tensor) -> int:
    from executorch.exir.tensor import get_scalar_type

    count = 1
    for size in tensor.sizes:
        count *= size
    return count * get_scalar_type(tensor.scalar_type).itemsize


def _alignment(offsets: list[int]) -> int:
    alignment = 1 << 30
    for offset in offsets:
        while offset % alignment:
            alignment //= 2
    return alignment


def layout(path: Path) -> Layout:
    from executorch.exir.schema import DataLocation, KernelCall, Tensor

    program, flatbuffer_bytes, base = read_program(path)
    segments = [ByteRange(base + s.offset, s.size) for s in program.segments]
    plan = forward_plan(program)
    constant = None
    if program.constant_segment.offsets:
        constant = segments[program.constant_segment.segment_index]

    def constant_range(tensor) -> ByteRange:
        return ByteRange(constant.start + program.constant_segment.offsets[tensor.data_buffer_idx],
                         _tensor_bytes(tensor))

    tables = []
    for chain in plan.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            if isinstance(call, KernelCall) and plan.operators[call.op_index].name in GATHER_KERNELS:
                weight = plan.values[call.args[0]].val
                scales = plan.values[call.args[1]].val if plan.operators[call.op_index].name.startswith(
                    "quantized_decomposed") else None
                tables.append(Table(rows=weight.sizes[0], row_bytes=_tensor_bytes(weight) // weight.sizes[0],
                                    weight=constant_range(weight),
                                    scales=constant_range(scales) if isinstance(scales, Tensor) else None))
    if len(tables) != len(TABLE_NAMES):
        raise ValueError(f"{path}: {len(tables)} gathered tables in forward, not Gemma 3n's {len(TABLE_NAMES)}")
    initialized = sum(_tensor_bytes(value.val) for value in plan.values
                      if isinstance(value.val, Tensor) and value.val.allocation_info is not None
                      and value.val.data_buffer_idx > 0)
    blobs = [segments[d.processed.index] for d in plan.delegates if d.processed.location == DataLocation.SEGMENT]
    return Layout(
        file_bytes=Path(path).stat().st_size, flatbuffer=ByteRange(0, flatbuffer_bytes), constant_segment=constant,
        delegate_blobs=blobs, named_data=[segments[n.segment_index] for n in program.named_data or []],
        tables=dict(zip(TABLE_NAMES, tables)), initialized_state_bytes=initialized,
        segment_alignment=_alignment([s.start for s in segments]),
    )


# ---- the file as this process maps it ----

def mappings(path: Path) -> list[tuple[int, int, int]]:
    """(start address, end address, file offset) of each of this process's mappings of ``path``
    (/proc/self/maps, matched by device and inode)."""
    if not os.path.exists(PROC_MAPS):  # not Linux: nothing to advise or to measure
        return []
    stat = os.stat(path)
    found = []
    with open(PROC_MAPS) as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 6:
                continue
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            if (os.makedev(major, minor), int(fields[4])) == (stat.st_dev, stat.st_ino):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end, int(fields[2], 16)))
    return found


def advise_random_access(path: Path) -> None:
    """madvise(MADV_RANDOM) on every mapping of the file in this process.

    Once a program is loaded, what stays mapped is its flatbuffer (already read) and its constant
    segment, almost all of it the gathered tables, read one row per token anywhere in them.
    Without the advice the kernel reads ahead and around every fault there (Linux's default is
    128 KiB, this VM's disk 8 MiB) and later faults map what that cached, so a prompt of a few
    thousand tokens makes most of the tables resident (docs/benchmarks.md, Memory)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for start, end, _ in mappings(path):
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_RANDOM):
            error = ctypes.get_errno()
            raise OSError(error, f"madvise(MADV_RANDOM) on a mapping of {path}: {os.strerror(error)}")


def evict_from_page_cache(path: Path) -> None:
    """Drop the file's clean pages that no process maps from the page cache, so the next reads come
    from storage as after a reboot (what is cached, and in what folio sizes, decides how much a
    page fault maps)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)
