"""The lowering cut in docs/benchmarks.md, reproduced: one 4-layer tiny kv program (the phone
recipe, groups of 32) exported through the project's pipeline twice, lowered the way it is now and
the way it was before, one after the other; then both programs run on the same tokens.

* now: one ``XnnpackPartitioner`` (dynamically quantized linears and floating point together),
  straight into ``to_edge_transform_and_lower``;
* before: ExecuTorch's usual ``XnnpackDynamicallyQuantizedPartitioner`` then ``XnnpackPartitioner``,
  after a ``run_decompositions({})`` of our own.

Everything else (the reshape rewrite of commit 045656c included) is the same in both, so a run
today compares the partitioner cut alone; the figures in docs/benchmarks.md were measured at
commit e438c5f, before the reshape rewrite.

    python docs/experiment_lowering.py
"""
import contextlib
import dataclasses
import sys
import tempfile
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYERS = 4
POSITIONS = 61


@contextlib.contextmanager
def lowering_before():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner, XnnpackPartitioner)

    from gemma3n_executorch import lowering

    lower = lowering.lower
    two_partitioners = [XnnpackDynamicallyQuantizedPartitioner(), XnnpackPartitioner()]
    with mock.patch.object(lowering, "partitioners", lambda backend: two_partitioners), \
            mock.patch.object(lowering, "lower", lambda program, *args, **kwargs:
                              lower(program.run_decompositions({}), *args, **kwargs)):
        yield


def export(path: Path) -> dict:
    from gemma3n_executorch import checkpoint, exporter, options
    from gemma3n_executorch.variants import VARIANTS, tiny_config

    variant = dataclasses.replace(VARIANTS["e2b"], tiny_config=tiny_config(LAYERS, 1, 128))
    recipe = options.resolve(options.KV, None, None, None, None, 32, "tiny", 64)
    loaded = checkpoint.LoadedModel(checkpoint.build_tiny(variant), f"tiny e2b ({LAYERS} layers)", None)
    return exporter.export_program(variant, recipe, path, loaded=loaded)


def logits(path: Path):
    import torch

    from gemma3n_executorch.runtime import Program

    program = Program(path)
    tokens = [2] + [(i * 37) % 500 + 3 for i in range(POSITIONS - 1)]
    return torch.stack([program.step(tokens[:8])] + [program.step([token]) for token in tokens[8:]])


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        results = {}
        for name, how in (("before", lowering_before), ("now", contextlib.nullcontext)):
            path = Path(work) / f"{name}.pte"
            with how():
                summary = export(path)
            results[name] = logits(path)
            delegation = summary["delegation"]
            print(f"{name}: lowering {summary['seconds']['lower']:.1f} s; {delegation['subgraphs']} delegate subgraphs, "
                  f"{delegation['delegated']} operators inside, {delegation['outside']} outside; "
                  f"{summary['bytes']} bytes", flush=True)
        difference = (results["now"] - results["before"]).abs().max().item()
        print(f"largest logit difference between the two programs over {POSITIONS} positions: {difference}")


if __name__ == "__main__":
    main()
