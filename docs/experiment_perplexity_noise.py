"""How far chance alone moves the phone program's perplexity from the same torchao quantization
run eagerly, on the tiny random-weight models (the figure parity.PHONE_NLL_NOISE cites).

    python docs/experiment_perplexity_noise.py [--chars 26000] [--programs DIR]

Scores the first CHARS characters of the Python standard library's textwrap.py and difflib.py
sources (about 0.8 tiny-tokenizer tokens a character) as validate.py --perplexity does: windows
of 159 tokens, each after <bos>, the program fed one token per call. For each variant it prints
the mean negative log-likelihood per token of eager fp32, eager torchao quantization and the
program, and the per-token change from eager quantization to the program: its mean (the
perplexity ratio's logarithm), its standard deviation and the mean's standard error. The phone
programs (the test suite's flags) are exported into DIR, or taken from it as e2b.pte and e4b.pte.
"""

from __future__ import annotations

import argparse
import difflib
import math
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gemma3n_executorch import checkpoint, quantize  # noqa: E402
from gemma3n_executorch.exporter import tokenizer_path_for  # noqa: E402
from gemma3n_executorch.generation import load_tokenizer  # noqa: E402
from gemma3n_executorch.perplexity import split_windows  # noqa: E402
from gemma3n_executorch.runtime import Program  # noqa: E402
from gemma3n_executorch.variants import VARIANTS  # noqa: E402

CONTEXT, CHUNK, GROUP_SIZE = 160, 12, 32  # tests/test_kv_generation.py's PHONE_FLAGS
PHONE_FLAGS = ("--mode", "kv", "--max-context-length", str(CONTEXT), "--max-seq-length", str(CHUNK),
               "--group-size", str(GROUP_SIZE))


def token_nll(log_probabilities: torch.Tensor, targets: list[int]) -> torch.Tensor:
    return -log_probabilities.gather(-1, torch.tensor(targets).unsqueeze(-1)).squeeze(-1).double()


def per_token(variant: str, program_path: Path, chars: int) -> dict[str, torch.Tensor]:
    text = (Path(textwrap.__file__).read_text() + Path(difflib.__file__).read_text())[:chars]
    tokens = load_tokenizer(tokenizer_path_for(program_path)).encode(text, add_special_tokens=False).ids
    fp32 = checkpoint.build_tiny(VARIANTS[variant])
    quantized = checkpoint.build_tiny(VARIANTS[variant])
    quantize.apply(quantized, "8da4w", "4w", GROUP_SIZE, torch.float32)
    program = Program(program_path)
    nll = {"fp32": [], "quantized": [], "program": []}
    for window in split_windows(tokens, CONTEXT - 1):
        with torch.no_grad():
            for name, model in (("fp32", fp32), ("quantized", quantized)):
                logits = model(input_ids=torch.tensor([window.fed]), use_cache=False).logits[0]
                nll[name].append(token_nll(logits.float().log_softmax(-1), window.targets))
        program.reset()
        rows = torch.stack([program.step([token]) for token in window.fed])
        nll["program"].append(token_nll(rows.float().log_softmax(-1), window.targets))
    return {name: torch.cat(values) for name, values in nll.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chars", type=int, default=26000)
    parser.add_argument("--programs", type=Path, help="where the phone programs are or go (default: a temporary directory)")
    args = parser.parse_args()
    directory = args.programs or Path(tempfile.mkdtemp())
    for variant in ("e2b", "e4b"):
        path = directory / f"{variant}.pte"
        if not path.exists():
            subprocess.run([sys.executable, str(REPO / variant / "export.py"), "--model", "tiny", "--output", str(path),
                            *PHONE_FLAGS], check=True, capture_output=True)
        nll = per_token(variant, path, args.chars)
        change = nll["program"] - nll["quantized"]
        print(f"{variant}: {len(change):,} tokens; mean nll fp32 {nll['fp32'].mean():.4f}, quantized "
              f"{nll['quantized'].mean():.4f}, program {nll['program'].mean():.4f}; program - quantized per token: "
              f"mean {change.mean():+.4f} (perplexity ratio {math.exp(change.mean()):.4f}), std {change.std():.4f}, "
              f"standard error {change.std() / math.sqrt(len(change)):.4f}", flush=True)


if __name__ == "__main__":
    main()
