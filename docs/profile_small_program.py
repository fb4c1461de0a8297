"""A phone-recipe program at E2B's real widths with few layers and the vocabulary cut to 16384, so
it exports in minutes; then prefill (128 tokens) and decode timed in a loop, for a profiler to
sample; and prefill timed at prompt lengths the program has and has not run before. Behind the
prefill breakdown in docs/benchmarks.md:

    python docs/profile_small_program.py export /tmp/small.pte --layers 2
    py-spy record --native --format raw -o prefill.txt -- python docs/profile_small_program.py prefill /tmp/small.pte
    python docs/profile_small_program.py lengths /tmp/small.pte
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 16384


def export(path: Path, layers: int, group_size: int) -> None:
    from gemma3n_executorch import checkpoint, exporter, options
    from gemma3n_executorch.variants import VARIANTS

    model = checkpoint.build_random(VARIANTS["e2b"], layers, vocab_size=VOCAB)
    recipe = options.resolve(options.KV, None, None, None, None, group_size, "random", 256)
    exporter.export_program(VARIANTS["e2b"], recipe, path, verbose=True,
                            loaded=checkpoint.LoadedModel(model, f"random e2b ({layers} layers)", None))


def loop(path: Path, seconds: float, decode: bool) -> None:
    from gemma3n_executorch.runtime import Program

    program, began, calls = Program(path), time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        program.reset()
        program.step(list(range(2, 130)))
        for _ in range(64 if decode else 0):
            program.step([9])
        calls += 1
    print(f"{(time.perf_counter() - began) / calls * 1e3:.0f} ms per {'prefill + 64 decode steps' if decode else 'prefill'}")


def lengths(path: Path) -> None:
    from gemma3n_executorch.runtime import Program

    program = Program(path)

    def prefill_ms(length: int) -> float:
        program.reset()
        began = time.perf_counter()
        program.step(list(range(2, 2 + length)))
        return (time.perf_counter() - began) * 1e3

    def row(label: str, prompt_lengths: list) -> None:
        print(f"{label}: " + ", ".join(f"{n} {prefill_ms(n):.1f}" for n in prompt_lengths) + " (tokens ms)")

    row("first call after loading", [128])
    row("the same length again", [128] * 4)
    row("lengths not run before", list(range(120, 128)))
    row("lengths run before", list(range(120, 128)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", choices=["export", "prefill", "decode", "lengths"])
    parser.add_argument("program", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=40)
    args = parser.parse_args()
    if args.job == "export":
        export(args.program, args.layers, args.group_size)
    elif args.job == "lengths":
        lengths(args.program)
    else:
        loop(args.program, args.seconds, decode=args.job == "decode")
