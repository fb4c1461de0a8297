"""The experiment behind "tried and left out" in docs/benchmarks.md ("Why lowering is slow"):
XNNPACK runs its whole pass list on every delegate subgraph, each pass a full re-trace; does
skipping the passes that cannot match this decoder (convolution, batch norm, PReLU, bilinear
upsampling) make lowering cheaper? Lowers the tiny E2B kv phone program cut to N layers and
prints lowering wall and CPU seconds; run both variants and compare the programs' bytes:

    python docs/experiment_skip_xnnpack_passes.py all  /tmp/all.pte  &
    python docs/experiment_skip_xnnpack_passes.py skip /tmp/skip.pte &
    wait; cmp /tmp/all.pte /tmp/skip.pte

Measured on 2026-11-23 (2 layers, both variants side by side on the 2-core machine): lowering CPU
time 197.5 s (all passes) vs 183.9 s (skipping), programs byte-identical. Not kept in the exporter.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def skip_passes_that_cannot_match() -> None:
    from executorch.backends.xnnpack import _passes, xnnpack_preprocess
    from executorch.backends.xnnpack._passes.convert_to_upsample_bilinear2d import bilinear_2d
    from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

    class Pruned(_passes.XNNPACKPassManager):
        def __init__(self, exported_program, passes=None):
            super().__init__(exported_program, passes)
            if passes:
                return
            graph = exported_program.graph_module.graph
            targets = " ".join(getattr(n.target, "__name__", "") for n in graph.nodes if n.op == "call_function")
            skip = set()
            if "batch_norm" not in targets:
                skip |= {_passes.FuseBatchNormPass, _passes.DecomposeBatchNorm}
            if "convolution" not in targets:
                skip.add(_passes.Conv1dUnsqueezePass)
            if "prelu" not in targets:
                skip.add(_passes.PReLUReshapePass)
            if not any(list(SubgraphMatcher(p.graph, ignore_literals=True).match(graph))
                       for p in bilinear_2d.get_graphs_dict()):
                skip.add(_passes.ConvertToUpsampleBilinear2d)
            self.passes = [p for p in self.passes if p not in skip]

    xnnpack_preprocess.XNNPACKPassManager = Pruned


def tiny_model(layers: int):
    from gemma3n_executorch import checkpoint
    from gemma3n_executorch.variants import VARIANTS, tiny_config

    return checkpoint.build_tiny(dataclasses.replace(VARIANTS["e2b"], tiny_config=tiny_config(layers, 1, 128)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("passes", choices=["all", "skip"])
    parser.add_argument("program", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()

    from gemma3n_executorch import exporter, lowering, options
    from gemma3n_executorch.progress import StageTimer

    recipe = options.resolve(options.KV, None, None, None, None, 32, "tiny", 160)
    module = exporter.prepare(tiny_model(args.layers), recipe, StageTimer())
    exported = lowering.export(module, module.example_inputs(), module.dynamic_shapes())
    if args.passes == "skip":
        skip_passes_that_cannot_match()
    wall, cpu = time.perf_counter(), time.process_time()
    program, report = lowering.lower(exported, "xnnpack", {}, quantized_embeddings=True)
    print(f"lowering: {time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU; "
          f"{report['subgraphs']} delegate subgraphs")
    lowering.write_atomically(program, args.program)


if __name__ == "__main__":
    main()
