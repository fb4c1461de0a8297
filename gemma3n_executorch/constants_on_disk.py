"""The emitter's copies of a program's large constants, kept in a scratch file until the program is
written, so that an export never holds its whole program in memory.

ExecuTorch 1.4.1's emitter copies each constant into a ``bytes`` object and its serializer writes
them all at the end: a portable program was held whole (E4B in bf16: 12.7 GiB) until its file was
written. Here the constant's bytes go to an unlinked scratch file beside the output as they are
copied, and the emitter is handed a stand-in of the same length: a fresh ``bytes(n)``, whose pages
the C library leaves untouched (zero pages, not resident), and the SHA-256 of the real bytes, which
the emitter uses to find a constant it has already stored. When the program is written, each
stand-in is replaced in the stream by its bytes from the scratch file, so the file is the same,
byte for byte; a stand-in that was not written exactly once is an error, never a file of zeros.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .progress import UserError

COPY_BLOCK_BYTES = 1 << 26  # what is read back from the scratch file at a time


class ConstantsOnDisk:
    def __init__(self, directory: Path, min_bytes: int):
        self.directory, self.min_bytes = directory, min_bytes
        self.file = tempfile.TemporaryFile(dir=directory, prefix=".constants-")  # unlinked: gone with the process
        self.end, self.latest = 0, None
        self.stand_ins: dict[int, tuple[bytes, int, int, object]] = {}  # id -> (stand-in, offset, length, sha256)

    def close(self) -> None:
        self.file.close()
        self.stand_ins.clear()

    def begin(self, size: int) -> "Spilling":
        return Spilling(self, size)

    def sha256(self, data):
        """The emitter's hash of ``data``: of the real bytes for a stand-in, else hashlib's."""
        entry = self.stand_ins.get(id(data))
        if entry is not None and entry[0] is data:
            return entry[3].copy()
        return hashlib.sha256(data)

    def forget_latest(self) -> None:
        """The emitter kept an earlier copy of the same bytes: the latest stand-in is in no program."""
        if self.latest is not None:
            self.stand_ins.pop(self.latest, None)
            self.latest = None

    def writing(self, write: Callable[[BinaryIO], None]) -> Callable[[BinaryIO], None]:
        """``write`` (a program's ``write_to_file``), its stand-ins replaced by their bytes."""
        def write_with_constants(file: BinaryIO) -> None:
            stream = _Stream(self, file)
            write(stream)
            missing = self.stand_ins.keys() - stream.written
            if missing:
                raise RuntimeError(f"{len(missing)} constants kept on disk were not written into the program")
        return write_with_constants

    def _fail(self, error: OSError):
        return UserError(f"cannot keep the program's constants in {self.directory} while exporting: "
                         f"{error.strerror or error}; the export needs about the program's size free there "
                         "besides the program itself: free some space or choose another --output")


class Spilling:
    """One constant on its way to the scratch file, a block at a time."""

    def __init__(self, disk: ConstantsOnDisk, size: int):
        self.disk, self.size, self.offset, self.written = disk, size, disk.end, 0
        self.hash = hashlib.sha256()
        disk.end += size

    def write(self, block) -> None:
        self.hash.update(block)
        view = memoryview(block).cast("B")
        try:
            while view.nbytes:
                written = os.pwrite(self.disk.file.fileno(), view, self.offset + self.written)
                view = view[written:]
                self.written += written
        except OSError as error:
            raise self.disk._fail(error) from None

    def stand_in(self) -> bytes:
        assert self.written == self.size, (self.written, self.size)
        stand_in = bytes(self.size)  # calloc'd: its pages stay untouched
        self.disk.stand_ins[id(stand_in)] = (stand_in, self.offset, self.size, self.hash)
        self.disk.latest = id(stand_in)
        return stand_in


class _Stream:
    """The output file as the serializer sees it."""

    def __init__(self, disk: ConstantsOnDisk, file: BinaryIO):
        self.disk, self.file, self.written = disk, file, set()

    def write(self, data) -> int:
        entry = self.disk.stand_ins.get(id(data))
        if entry is None or entry[0] is not data:
            return self.file.write(data)
        if id(data) in self.written:
            raise RuntimeError("a constant kept on disk was written into the program twice")
        self.written.add(id(data))
        _, offset, length, _ = entry
        done = 0
        while done < length:
            block = os.pread(self.disk.file.fileno(), min(COPY_BLOCK_BYTES, length - done), offset + done)
            if not block:
                raise RuntimeError("the scratch file of the program's constants is shorter than written")
            self.file.write(block)
            done += len(block)
        return length
