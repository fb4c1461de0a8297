"""The lowering cut in docs/benchmarks.md, reproduced: one 4-layer tiny kv program (the phone
recipe, groups of 32) lowered the way this project does now and the way it did before, one after
the other in this process, then both programs run on the same tokens.

* now: one ``XnnpackPartitioner`` (dynamically quantized linears and floating point together),
  straight into ``to_edge_transform_and_lower``;
* before: ExecuTorch's usual ``XnnpackDynamicallyQuantizedPartitioner`` then ``XnnpackPartitioner``,
  after a ``run_decompositions({})`` of our own.

    python docs/experiment_lowering.py
"""
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

POSITIONS = 61


def build_exported_program():
    from gemma3n_executorch import checkpoint, exporter, lowering, options
    from gemma3n_executorch.progress import StageTimer
    from gemma3n_executorch.variants import VARIANTS, _tiny

    variant = dataclasses.replace(VARIANTS["e2b"], tiny_config=_tiny(4, 1, 128))
    recipe = options.resolve(options.KV, None, None, None, None, 32, "tiny", 64)
    module = exporter.prepare(checkpoint.build_tiny(variant), recipe, StageTimer())
    return lowering.export(module, module.example_inputs(), module.dynamic_shapes())


def lower_now(program):
    from gemma3n_executorch import lowering

    return lowering.lower(program, "xnnpack", {}, quantized_embeddings=True)


def lower_before(program):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner, XnnpackPartitioner)

    from gemma3n_executorch import lowering

    two_partitioners = [XnnpackDynamicallyQuantizedPartitioner(), XnnpackPartitioner()]
    with mock.patch.object(lowering, "partitioners", lambda backend: two_partitioners):
        return lowering.lower(program.run_decompositions({}), "xnnpack", {}, quantized_embeddings=True)


def logits(path: Path):
    import torch
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    tokens = [2] + [(i * 37) % 500 + 3 for i in range(POSITIONS - 1)]
    rows = [method.execute([torch.tensor([tokens[:8]]), torch.arange(8)])[0].reshape(-1)]
    rows += [method.execute([torch.tensor([[token]]), torch.tensor([position])])[0].reshape(-1)
             for position, token in enumerate(tokens[8:], start=8)]
    return torch.stack(rows)


def main() -> None:
    from gemma3n_executorch import lowering

    with tempfile.TemporaryDirectory() as work:
        results = {}
        for name, lower in (("before", lower_before), ("now", lower_now)):
            program = build_exported_program()
            began = time.process_time()
            executorch_program, report = lower(program)
            seconds = time.process_time() - began
            path = Path(work) / f"{name}.pte"
            size = lowering.write_atomically(executorch_program, path)
            results[name] = logits(path)
            print(f"{name}: lowering {seconds:.1f} s CPU; {report['table'][0].strip()}; {size} bytes", flush=True)
        difference = (results["now"] - results["before"]).abs().max().item()
        print(f"largest logit difference between the two programs over {POSITIONS} positions: {difference}")


if __name__ == "__main__":
    main()
