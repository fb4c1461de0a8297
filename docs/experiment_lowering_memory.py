"""The lowering-memory cut in docs/benchmarks.md ("Export memory"), reproduced: one export of a
checkpoint directory with this project's lowering and one with ExecuTorch 1.4.1's own (every
partition deep-copied with its weights, nothing freed until the export ends), each in a process of
its own so that each peak is its own; prints their stage lines, and whether the programs are the
same bytes:

    python tools/write_random_checkpoint.py --variant e4b --layers 4 W/e4b-l4
    python docs/experiment_lowering_memory.py W/e4b-l4 W --variant e4b [export flags, default --mode kv]
"""
import argparse
import contextlib
import copy
import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def executorch_lowering() -> None:
    """Undo lowering_shortcuts' memory cuts (its time shortcuts stay: they change no memory)."""
    from executorch.exir.backend import backend_api

    from gemma3n_executorch import lowering_shortcuts

    lowering_shortcuts._install()
    backend_api.copy = copy
    lowering_shortcuts.releasing = lambda program: contextlib.nullcontext()


def child(lowering: str, variant: str, checkpoint: str, output: str, flags: list[str]) -> int:
    from gemma3n_executorch.exporter import main
    from gemma3n_executorch.variants import VARIANTS

    if lowering == "executorch":
        executorch_lowering()
    sys.argv = ["export", "--model", checkpoint, "--output", output, *flags]
    return main(VARIANTS[variant])


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("work", type=Path)
    parser.add_argument("--variant", choices=["e2b", "e4b"], required=True)
    args, flags = parser.parse_known_args()
    flags = flags or ["--mode", "kv"]
    programs = {}
    for lowering in ("executorch", "project"):
        programs[lowering] = args.work / f"{lowering}.pte"
        print(f"== {lowering}'s lowering", flush=True)
        subprocess.run([sys.executable, __file__, "--child", lowering, args.variant, args.checkpoint,
                        str(programs[lowering]), *flags], check=True)
    same = filecmp.cmp(programs["executorch"], programs["project"], shallow=False)
    print(f"programs {'byte-identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(*sys.argv[2:6], sys.argv[6:]))
    run()
