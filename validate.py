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

import torch  # noqa: E402

from gemma3n_executorch import checkpoint, parity, quantize, tasks  # noqa: E402
from gemma3n_executorch.exporter import DTYPES  # noqa: E402
from gemma3n_executorch.progress import UserError  # noqa: E402
from gemma3n_executorch.runtime import Program  # noqa: E402
from gemma3n_executorch.variants import BOS_ID, VARIANTS  # noqa: E402

KV_PROMPT_TOKENS = 12


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, ok: bool, what: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
        self.failed += not ok


def run_program(program: Program, num_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Fixed: one forward over the probe window. KV: prefill a probe prompt, then greedy steps.
    Returns the tokens fed and the logits, one row per predicted position."""
    info = program.info
    if info.mode == tasks.FIXED:
        tokens = parity.probe_tokens(info.seq_len, info.vocab_size, BOS_ID)
        return tokens, program.forward_fixed(torch.tensor([tokens], dtype=torch.long))[0]
    tokens = parity.probe_tokens(min(KV_PROMPT_TOKENS, info.seq_len - 1), info.vocab_size, BOS_ID)
    steps = min(num_tokens, info.seq_len - len(tokens))
    rows = [program.step(tokens)]
    for _ in range(steps - 1):
        tokens.append(int(rows[-1].argmax()))
        rows.append(program.step([tokens[-1]]))
    return tokens, torch.stack(rows)


def eager_reference(program: Program, model: str) -> torch.nn.Module:
    """The same checkpoint as the program, eagerly, in the program's dtype and quantization."""
    import patches

    info = program.info
    loaded = checkpoint.load(model, VARIANTS[info.variant.lower()], DTYPES[info.dtype])
    if loaded.config.vocab_size != info.vocab_size:
        raise UserError(f"--model {model}: vocab {loaded.config.vocab_size} but the program's is {info.vocab_size}; "
                        "pass the checkpoint the program was exported from")
    patches.apply(loaded.model)
    quantize.apply(loaded.model, info.quantize, info.quantize_embeddings, info.group_size)
    return loaded.model


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def validate(path: Path, model: str | None, num_tokens: int) -> int:
    program = Program(path)
    info = program.info
    print(f"{path}: Gemma 3n {info.variant} from {info.source}, mode {info.mode}, {info.dtype}, "
          f"quantize {info.quantize}, embeddings {info.quantize_embeddings}, backend {info.backend}, "
          f"{'max_seq_len' if info.mode == tasks.KV else 'seq_len'} {info.seq_len}, vocab {info.vocab_size}")
    print(f"methods: {', '.join(program.method_names)}")
    checks = Checks()
    tokens, logits = run_program(program, num_tokens)
    rows = info.seq_len if info.mode == tasks.FIXED else min(num_tokens, info.seq_len - KV_PROMPT_TOKENS)
    checks.check(tuple(logits.shape) == (rows, info.vocab_size),
                 f"logits shape {tuple(logits.shape)} (expected {(rows, info.vocab_size)})")
    checks.check(logits.dtype == DTYPES[info.dtype], f"logits dtype {logits.dtype} (expected {DTYPES[info.dtype]})")
    checks.check(bool(torch.isfinite(logits).all()), "logits are finite (no NaN/Inf)")

    if model is not None:
        reference = eager_reference(program, model)
        prompt_length = len(tokens) - len(logits) + 1 if info.mode == tasks.KV else 1
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([tokens], dtype=torch.long), use_cache=False).logits[0]
        expected = expected[prompt_length - 1:] if info.mode == tasks.KV else expected
        agreement = parity.compare(logits, expected)
        tolerance = parity.tolerance_for(info.dtype, info.quantize, info.quantize_embeddings)
        checks.check(agreement.within(tolerance), f"against eager PyTorch ({model}): {agreement} "
                     f"(tolerance: top-1 >= {tolerance.min_top1}"
                     + (f", max |diff| <= {tolerance.max_abs})" if tolerance.max_abs else ")"))
        if info.mode == tasks.KV:
            prompt = torch.tensor([tokens[:prompt_length]], dtype=torch.long)
            with torch.no_grad():
                eager_tokens = reference.generate(prompt, max_new_tokens=len(logits), min_new_tokens=len(logits),
                                                  do_sample=False)[0, prompt_length:].tolist()
            program_tokens = tokens[prompt_length:] + [int(logits[-1].argmax())]
            where = first_difference(program_tokens, eager_tokens)
            print(f"greedy decoding of {len(eager_tokens)} tokens: "
                  + ("identical to eager generate()" if where is None else f"first differs from eager generate() at "
                     f"new token {where} (program {program_tokens[where]}, eager {eager_tokens[where]})"))
    print(f"{'all checks passed' if not checks.failed else f'{checks.failed} check(s) failed'}")
    return 0 if not checks.failed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("program", type=Path, help="the .pte to check")
    parser.add_argument("--model", help="hub id, checkpoint directory or 'tiny': compare with it run eagerly")
    parser.add_argument("--tokens", type=int, default=16, help="kv programs: greedy steps to run (default 16)")
    args = parser.parse_args(argv)
    try:
        return validate(args.program, args.model, args.tokens)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
