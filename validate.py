"""Check an exported Gemma 3n program through the ExecuTorch runtime.

    python validate.py MODEL.pte [--model ID_OR_DIR] [--tokens N]

Without --model: loads the program, lists its methods, runs it on a deterministic input and
checks output shape, dtype and finiteness against the metadata embedded at export.
With --model: also runs the same checkpoint eagerly in PyTorch, in the program's dtype and
quantization, and fails past the tolerance in gemma3n_executorch/parity.py.
Exit status: 0 every check passed, 1 a check failed, 2 unusable input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemma3n_executorch import preflight  # noqa: E402
from gemma3n_executorch.progress import run_cli  # noqa: E402
from gemma3n_executorch.variants import TINY_MODEL  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("program", type=Path, help="the .pte to check")
    parser.add_argument("--model", help="hub id, checkpoint directory or 'tiny': compare with it run eagerly")
    parser.add_argument("--tokens", type=int, default=16, help="kv programs: greedy steps to run (default 16)")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error("--tokens must be at least 1")
    return run_cli(lambda: run(args))


def run(args) -> int:
    preflight.check_program_file(args.program)
    if args.model not in (None, TINY_MODEL):
        preflight.local_checkpoint(args.model)
    from gemma3n_executorch.validation import validate

    return validate(args.program, args.model, args.tokens)


if __name__ == "__main__":
    sys.exit(main())
