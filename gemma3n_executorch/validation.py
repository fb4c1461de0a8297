"""What validate.py checks: a program run through the ExecuTorch runtime, against its metadata
and, given the checkpoint, against the same model run eagerly in PyTorch."""

from __future__ import annotations

from pathlib import Path

import torch

import patches

from . import checkpoint, parity, quantize, slicing
from .checkpoint import TORCH_DTYPES
from .metadata import ProgramInfo
from .options import FIXED, KV
from .progress import UserError
from .runtime import Program
from .variants import BOS_ID, VARIANTS

KV_PROMPT_TOKENS = 12


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, ok: bool, what: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
        self.failed += not ok


def kv_probe_lengths(context_len: int, num_tokens: int) -> tuple[int, int]:
    """A kv probe's prompt length and the steps that fit after it (a program with a context
    shorter than KV_PROMPT_TOKENS gets a shorter prompt)."""
    prompt = min(KV_PROMPT_TOKENS, context_len - 1)
    return prompt, min(num_tokens, context_len - prompt)


def run_program(program: Program, num_tokens: int, windows: int) -> tuple[list[int], torch.Tensor]:
    """Fixed: ``windows`` probe windows, one forward each. KV: prefill a probe prompt, then greedy
    steps. Returns the tokens fed (fixed: a list of windows) and the logits, one row per position."""
    info = program.info
    if info.mode == FIXED:
        windows = [parity.probe_tokens(info.seq_len, info.vocab_size, BOS_ID, seed) for seed in range(windows)]
        logits = [program.forward_fixed(torch.tensor([window], dtype=torch.long))[0] for window in windows]
        return windows, torch.cat(logits)
    prompt, steps = kv_probe_lengths(info.context_len, num_tokens)
    tokens = parity.probe_tokens(prompt, info.vocab_size, BOS_ID)
    rows = [program.step(tokens)]
    for _ in range(steps - 1):
        tokens.append(int(rows[-1].argmax()))
        rows.append(program.step([tokens[-1]]))
    return tokens, torch.stack(rows)


def check_checkpoint(model: str, info: ProgramInfo) -> None:
    """Refuse a checkpoint that cannot be the program's from its config alone, before any weight
    is read (a long run should not end in this error)."""
    config = checkpoint.read_config(model, VARIANTS[info.variant.lower()], slicing.from_spec(info.matformer_slice))[1]
    check_vocabulary(model, config.vocab_size, info)


def check_vocabulary(model: str, vocab_size: int, info: ProgramInfo) -> None:
    if vocab_size != info.vocab_size:
        raise UserError(f"--model {model}: vocab {vocab_size} but the program's is {info.vocab_size}; "
                        "pass the checkpoint the program was exported from")


def eager_model(model: str, info: ProgramInfo, linear: str = "none", embeddings: str = "none",
                dtype: str = "fp32") -> torch.nn.Module:
    """The checkpoint ``model`` of the program's variant, eagerly, in ``dtype`` with the given
    torchao quantization (in the program's group size)."""
    loaded = checkpoint.load(model, VARIANTS[info.variant.lower()], cut=slicing.from_spec(info.matformer_slice))
    check_vocabulary(model, loaded.config.vocab_size, info)
    patches.apply(loaded.model)
    quantize.apply(loaded.model, linear, embeddings, info.group_size, TORCH_DTYPES[dtype])
    return loaded.model


def eager_reference(program: Program, model: str) -> torch.nn.Module:
    """The same checkpoint as the program, eagerly, in the program's dtype and quantization."""
    info = program.info
    return eager_model(model, info, info.quantize, info.embeddings, info.dtype)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def validate(path: Path, model: str | None, num_tokens: int) -> int:
    program = Program(path)
    info = program.info
    cut = slicing.from_spec(info.matformer_slice)
    print(f"{path}: Gemma 3n {info.variant} from {info.source}" + (f", slice {cut.name}" if cut else "")
          + f", mode {info.mode}, {info.dtype}, "
          f"quantize {info.quantize}, embeddings {info.embeddings}, backend {info.backend}, "
          + (f"max_seq_length {info.seq_len}, max_context_length {info.context_len}, {info.kv_cache} KV cache"
             if info.mode == KV else f"seq_len {info.seq_len}") + f", vocab {info.vocab_size}")
    print(f"methods: {', '.join(program.method_names)}")
    checks = Checks()
    # Without an eager model the checks are shape, dtype and finiteness, which one window shows: on
    # portable kernels a real-size window takes minutes.
    windows = parity.PROBE_WINDOWS if model is not None else 1
    tokens, logits = run_program(program, num_tokens, windows)
    rows = info.seq_len * windows if info.mode == FIXED else kv_probe_lengths(info.context_len, num_tokens)[1]
    checks.check(tuple(logits.shape) == (rows, info.vocab_size),
                 f"logits shape {tuple(logits.shape)} (expected {(rows, info.vocab_size)})")
    checks.check(logits.dtype == TORCH_DTYPES[info.dtype], f"logits dtype {logits.dtype} (expected {TORCH_DTYPES[info.dtype]})")
    checks.check(bool(torch.isfinite(logits).all()), "logits are finite (no NaN/Inf)")

    if model is not None:
        reference = eager_reference(program, model)
        windows = tokens if info.mode == FIXED else [tokens]
        with torch.no_grad():
            expected = torch.cat([reference(input_ids=torch.tensor([window], dtype=torch.long), use_cache=False)
                                  .logits[0] for window in windows])
        prompt_length = len(tokens) - len(logits) + 1
        expected = expected[prompt_length - 1:] if info.mode == KV else expected
        agreement = parity.compare(logits, expected)
        tolerance = parity.tolerance_for(info.dtype, info.quantize, info.embeddings, info.kv_cache)
        checks.check(agreement.within(tolerance), f"against eager PyTorch ({model}): {agreement} (tolerance: {tolerance})")
        if info.mode == KV:
            eager_tokens = parity.eager_greedy(reference, tokens[:prompt_length], len(logits))
            program_tokens = tokens[prompt_length:] + [int(logits[-1].argmax())]
            where = first_difference(program_tokens, eager_tokens)
            result = f"greedy decoding of {len(eager_tokens)} tokens: " + (
                "identical to eager generate()" if where is None else f"first differs from eager generate() at "
                f"new token {where} (program {program_tokens[where]}, eager {eager_tokens[where]})")
            if tolerance.greedy_identical:
                checks.check(where is None, result)
            else:
                print(f"{result} (not enforced in {info.dtype} with quantize {info.quantize}: near-ties may flip)")
    print(f"{'all checks passed' if not checks.failed else f'{checks.failed} check(s) failed'}")
    return 0 if not checks.failed else 1
