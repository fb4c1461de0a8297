"""Check an exported Gemma 3n program through the ExecuTorch runtime.

    python validate.py MODEL.pte [--model ID_OR_DIR] [--tokens N]
    python validate.py MODEL.pte [--model ID_OR_DIR] --perplexity TEXT_FILE [--tokenizer PATH]

Without --model: loads the program, lists its methods, runs it on a deterministic input and
checks output shape, dtype and finiteness against the metadata embedded at export.
With --model: also runs the same checkpoint eagerly in PyTorch, in the program's dtype and
quantization, and fails past the tolerance in gemma3n_executorch/parity.py.
With --perplexity, instead: the program's perplexity over the text and, with --model, eager fp32's
and their ratio (an unquantized fp32 program fails past parity.py's bound).
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

DEFAULT_TOKENS = 16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("program", type=Path, help="the .pte to check")
    parser.add_argument("--model", help="hub id, checkpoint directory, 'tiny' or 'tiny-trained': compare with it run eagerly")
    parser.add_argument("--tokens", type=int,
                        help=f"kv programs: greedy steps to run (default {DEFAULT_TOKENS})")
    parser.add_argument("--perplexity", type=Path, metavar="TEXT_FILE",
                        help="measure perplexity over this UTF-8 text instead, chunked to the program's context")
    parser.add_argument("--tokenizer", type=Path,
                        help="--perplexity: tokenizer.json (default: the one exported beside the program)")
    args = parser.parse_args(argv)
    if args.perplexity is not None and args.tokens is not None:
        parser.error("--tokens sets the greedy check, which --perplexity replaces; drop one")
    if args.perplexity is None and args.tokenizer is not None:
        parser.error("--tokenizer is for --perplexity")
    if args.tokens is not None and args.tokens < 1:
        parser.error("--tokens must be at least 1")
    return run_cli(lambda: run(args))


def run(args) -> int:
    preflight.check_program_file(args.program)
    text = preflight.read_text(args.perplexity, "--perplexity") if args.perplexity is not None else None
    if args.model not in (None, TINY_MODEL):
        preflight.local_checkpoint(args.model)
    if text is not None:
        from gemma3n_executorch.perplexity import measure

        return measure(args.program, args.model, text, args.perplexity, args.tokenizer)
    from gemma3n_executorch.validation import validate

    return validate(args.program, args.model, args.tokens or DEFAULT_TOKENS)


if __name__ == "__main__":
    sys.exit(main())
