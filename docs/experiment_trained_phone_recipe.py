"""What the phone recipe costs the small trained model (--model tiny-trained), by perplexity over
the first 2,000 tokens of its held-out text: the exported program, torchao's same quantization run
eagerly, and fp32 eagerly (the figures the README and parity.TRAINED_PHONE_PERPLEXITY_CHANGE cite).

    python e2b/export.py --model tiny-trained --mode kv --max-context-length 384 --max-seq-length 48 --output /tmp/p.pte
    python docs/experiment_trained_phone_recipe.py /tmp/p.pte

The windows are the program's (context - 1 tokens each after a <bos>), scored as validate.py
--perplexity scores them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma3n_executorch import checkpoint, quantize  # noqa: E402
from gemma3n_executorch.generation import load_tokenizer  # noqa: E402
from gemma3n_executorch.options import DEFAULT_GROUP_SIZE  # noqa: E402
from gemma3n_executorch.perplexity import score_eager, score_program, split_windows, window_length  # noqa: E402
from gemma3n_executorch.progress import Progress  # noqa: E402
from gemma3n_executorch.runtime import Program  # noqa: E402
from gemma3n_executorch.variants import HELD_OUT_FILE, TRAINED_DIRECTORY, TRAINED_MODEL, VARIANTS  # noqa: E402

SCORED_TOKENS = 2000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("program", type=Path, help="the trained model's phone program")
    args = parser.parse_args()
    tokenizer = load_tokenizer(TRAINED_DIRECTORY / "tokenizer.json")
    text = tokenizer.decode(tokenizer.encode((TRAINED_DIRECTORY / HELD_OUT_FILE).read_text(),
                                             add_special_tokens=False).ids[:SCORED_TOKENS])
    tokens = tokenizer.encode(text, add_special_tokens=False).ids
    program = Program(args.program)
    windows = split_windows(tokens, window_length(program.info))
    progress = lambda what: Progress(what, len(tokens), "tokens")  # noqa: E731
    fp32 = checkpoint.load(TRAINED_MODEL, VARIANTS["e2b"], torch.float32).model
    quantized = checkpoint.load(TRAINED_MODEL, VARIANTS["e2b"], torch.float32).model
    quantize.apply(quantized, "8da4w", "4w", DEFAULT_GROUP_SIZE, torch.float32)
    results = {"program": score_program(program, windows, progress("program")).perplexity,
               "eager 8da4w-emb4w": score_eager(quantized, windows, progress("eager quantized")).perplexity,
               "eager fp32": score_eager(fp32, windows, progress("eager fp32")).perplexity}
    for name, value in results.items():
        print(f"{name} perplexity {value:.3f} over {len(tokens)} tokens")
    print(f"program vs eager quantization {results['program'] / results['eager 8da4w-emb4w'] - 1:+.2%}, "
          f"eager quantization vs fp32 {results['eager 8da4w-emb4w'] / results['eager fp32'] - 1:+.2%}")


if __name__ == "__main__":
    main()
