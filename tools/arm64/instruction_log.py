"""Which kernel families ExecuTorch's library ran, from the instructions qemu translated.

XNNPACK picks its int8 matrix kernels at run time from the CPU's features (SME through KleidiAI,
i8mm, dot product, plain NEON) and neither it nor ExecuTorch says which it picked; the kernels'
symbols are stripped from the wheel. What can be observed is the code itself: qemu's ``-d in_asm``
prints every instruction it translates, once, as it first runs, so an instruction of a family
that appears inside ExecuTorch's library (which holds XNNPACK) shows that a kernel of that family
ran. Instructions are classified by their encoding, not their disassembly, because the
disassembler qemu 7.2 links does not know the newer extensions.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from pathlib import Path

# (family, mask, value): an instruction word w is in the family when w & mask == value (Arm ARM).
ENCODINGS = (
    ("sme", 0x9E000000, 0x80000000),      # SME: outer products, ZA loads and stores (op0 1, op1 0000)
    ("sme", 0xFFFFF8FF, 0xD503407F),      # SMSTART / SMSTOP (MSR SVCR*)
    ("sve", 0x1E000000, 0x04000000),      # the whole SVE / SVE2 encoding space
    ("i8mm", 0xFFE0FC00, 0x4E80A400),     # SMMLA
    ("i8mm", 0xFFE0FC00, 0x6E80A400),     # UMMLA
    ("i8mm", 0xFFE0FC00, 0x4E80AC00),     # USMMLA
    ("i8mm", 0xBFE0FC00, 0x0E809C00),     # USDOT (vector)
    ("i8mm", 0xBF40F400, 0x0F00F000),     # SUDOT / USDOT (by element)
    ("dotprod", 0x9FE0FC00, 0x0E809400),  # SDOT / UDOT (vector)
    ("dotprod", 0x9FC0F400, 0x0F80E000),  # SDOT / UDOT (by element)
    ("bf16", 0xFFE0FC00, 0x6E40EC00),     # BFMMLA
    ("bf16", 0xBFE0FC00, 0x2E40FC00),     # BFDOT (vector)
)
FAMILIES = ("sme", "sve", "i8mm", "dotprod", "bf16")
LINE = re.compile(r"^0x([0-9a-f]+):\s+([0-9a-f]{8})\s")
EXECUTORCH_LIBRARY = "_portable_lib"  # ExecuTorch's runtime, with XNNPACK linked in


def family(word: int) -> str | None:
    return next((name for name, mask, value in ENCODINGS if word & mask == value), None)


def collect(log_path: Path) -> tuple[threading.Thread, dict[int, str]]:
    """Read qemu's log (a FIFO) as it is written: {address: family} of the instructions that
    belong to a family; everything else (most of it) is dropped at once."""
    found: dict[int, str] = {}

    def read() -> None:
        with open(log_path, errors="replace") as log:
            for line in log:
                match = LINE.match(line)
                if match and (name := family(int(match.group(2), 16))):
                    found[int(match.group(1), 16)] = name

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, found


def library_ranges(maps: str, name: str) -> list[tuple[int, int]]:
    """Address ranges of a mapped file, from the guest's /proc/self/maps."""
    ranges = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) >= 6 and name in fields[5]:
            start, end = (int(part, 16) for part in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def summarize(found: dict[int, str], maps: str) -> dict[str, int]:
    """Distinct instructions of each family translated from ExecuTorch's library."""
    ranges = library_ranges(maps, EXECUTORCH_LIBRARY)
    counts = Counter(name for address, name in found.items() if any(a <= address < b for a, b in ranges))
    return {name: counts.get(name, 0) for name in FAMILIES}
