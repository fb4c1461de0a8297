"""Checks of user input that need no ML library, so bad input fails in a fraction of a second."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

from .progress import UserError
from .variants import PROVENANCE_FILE, TRAINED_DIRECTORY, TRAINED_MODEL

MULTIMODAL_MODEL_TYPE = "gemma3n"
TEXT_MODEL_TYPE = "gemma3n_text"
ET_MAGIC = b"ET"  # flatbuffer file identifier "ETxx" at bytes 4..8
EXTENDED_HEADER_MAGIC = b"eh00"
EXTENDED_HEADER_END = 40  # magic, length, program size, segment base offset, segment data size


def looks_like_hub_id(model: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) is not None


def local_checkpoint(model: str) -> Path | None:
    """The checkpoint directory ``model`` names, or None when it is a hub id to download."""
    if model == TRAINED_MODEL:
        return trained_checkpoint()
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {model}: not a directory; pass a checkpoint directory or a hub id")
        if not (path / "config.json").is_file():
            raise UserError(f"--model {model}: no config.json in that directory; pass a Hugging Face checkpoint directory")
        text_config(path)
        return path
    if not looks_like_hub_id(model):
        raise UserError(f"--model {model}: no such directory; pass a checkpoint directory, a hub id, 'tiny' or "
                        f"'{TRAINED_MODEL}'")
    return None


def trained_checkpoint() -> Path:
    """The built-in trained model's directory, each file checked against the sha256 its provenance
    records: weights that were changed, or a clone that did not bring them whole, would otherwise
    export something else under the trained model's name."""
    provenance = TRAINED_DIRECTORY / PROVENANCE_FILE
    if not provenance.is_file():
        raise UserError(f"--model {TRAINED_MODEL}: {provenance} is missing; the clone is incomplete: check it out "
                        "again (or make the model with: python tools/train_tiny.py)")
    for name, digest in json.loads(provenance.read_text())["sha256"].items():
        path = TRAINED_DIRECTORY / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise UserError(f"--model {TRAINED_MODEL}: {path} is missing or not the file {PROVENANCE_FILE} names "
                            "(sha256 differs); check the clone out again (or remake it: python tools/train_tiny.py)")
    return TRAINED_DIRECTORY


def text_config(directory: Path) -> dict:
    """The text decoder's config from either layout's config.json."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}); is it a config.json?") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: a JSON {type(config).__name__}, not an object; is it a Hugging Face config.json?")
    model_type = config.get("model_type")
    if model_type == MULTIMODAL_MODEL_TYPE:
        if not isinstance(config.get("text_config"), dict):
            raise UserError(f"{path}: model_type gemma3n without a text_config object; is the config.json complete?")
        config = config["text_config"]
    elif model_type != TEXT_MODEL_TYPE:
        raise UserError(
            f"{path}: model_type {model_type!r} is not Gemma 3n "
            f"(expected {MULTIMODAL_MODEL_TYPE!r} or {TEXT_MODEL_TYPE!r}); pass a Gemma 3n checkpoint"
        )
    return {key: value for key, value in config.items() if key != "model_type"}


def check_output(output: Path, suffix: str = ".pte", flag: str = "--output") -> None:
    directory = output.parent if str(output.parent) else Path(".")
    if output.suffix != suffix:
        raise UserError(f"{flag} {output}: the file name must end in {suffix}")
    if output.is_dir():
        raise UserError(f"{flag} {output} is a directory; give a file name ending in {suffix}")
    if not directory.is_dir():
        raise UserError(f"{flag} {output}: directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {output}: cannot write to {directory}; choose a writable location")


def check_program_file(path: Path) -> None:
    """Reject what is plainly not a complete .pte before the runtime sees it."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    if path.suffix != ".pte":
        raise UserError(f"{path}: not a .pte file; pass a program written by e2b/export.py or e4b/export.py")
    with path.open("rb") as file:
        head = file.read(EXTENDED_HEADER_END)
    if len(head) < 8 or head[4:6] != ET_MAGIC:
        raise UserError(f"{path}: not an ExecuTorch program (bad header); re-export it")
    if head[8:12] == EXTENDED_HEADER_MAGIC:
        if len(head) < EXTENDED_HEADER_END:
            raise UserError(f"{path}: truncated ({len(head)} bytes, shorter than its header); re-export it")
        program_size, segment_base, segment_size = struct.unpack_from("<QQQ", head, 16)
        expected = max(program_size, segment_base + segment_size)
        if path.stat().st_size < expected:
            raise UserError(f"{path}: truncated ({path.stat().st_size} of {expected} bytes); re-export it")


def read_text(path: Path, flag: str) -> str:
    """A UTF-8 text file with something in it."""
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise UserError(f"{flag} {path}: not a file; pass a UTF-8 text file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{flag} {path}: not UTF-8 text (byte {error.start}); pass a UTF-8 text file") from None
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot read it ({error.strerror})") from None
    if not text.strip():
        raise UserError(f"{flag} {path}: the file is empty; pass a text of at least 2 tokens")
    return text


def flatbuffer_size(head: bytes) -> int | None:
    """Bytes of the program's flatbuffer (the segments follow it), from the extended header."""
    return struct.unpack_from("<Q", head, 16)[0] if head[8:12] == EXTENDED_HEADER_MAGIC else None


def segment_base_offset(head: bytes) -> int:
    """Where the segments start in the file (their offsets count from here); 0 without segments."""
    return struct.unpack_from("<Q", head, 24)[0] if head[8:12] == EXTENDED_HEADER_MAGIC else 0
