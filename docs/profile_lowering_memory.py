"""Where an export's lower stage peaks: e4b/export.py (or e2b's) with the process's resident memory
sampled every 20 ms and its peak printed per phase of lowering, as each phase begins:

    python docs/profile_lowering_memory.py --variant e4b W/e4b-l4 W/profiled.pte [export flags, default --mode kv]

Phases: edge dialect and partitioning; the partitions' copies and XNNPACK's preprocessing of each;
after delegation; quantization fusion and constant folding (the tables packed); ExecuTorch's passes,
memory planning and emission.
"""
import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

phase = ["load, quantize, export"]
peaks: dict[str, float] = {}


def resident_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def sample() -> None:
    while True:
        peaks[phase[0]] = max(peaks.get(phase[0], 0.0), resident_gib())
        time.sleep(0.02)


def enter(name: str) -> None:
    phase[0] = name
    print(f"  -- {name}: resident {resident_gib():.2f} GiB; peaks so far: "
          + ", ".join(f"{label} {value:.2f}" for label, value in peaks.items()), flush=True)


def marking(name: str, function, after: str):
    def marked(*args, **kwargs):
        enter(name)
        result = function(*args, **kwargs)
        enter(after)
        return result
    return marked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--variant", choices=["e2b", "e4b"], required=True)
    args, flags = parser.parse_known_args()

    from executorch.exir.backend import backend_api
    from executorch.exir.program import _program

    from gemma3n_executorch import exporter, lowering, lowering_shortcuts
    from gemma3n_executorch.variants import VARIANTS

    lowering_shortcuts._install()  # its wrappers first, so that these wrap them
    backend_api.lower_all_submodules_to_backend = marking(
        "partitions copied and preprocessed", backend_api.lower_all_submodules_to_backend, "after delegation")
    _program.quant_fusion_and_const_prop_pass = marking(
        "quantization fusion, constant folding", _program.quant_fusion_and_const_prop_pass,
        "passes, memory planning, emission")
    lowering.delegate = marking("edge dialect, partitioning", lowering.delegate, "between")
    threading.Thread(target=sample, daemon=True).start()
    sys.argv = ["export", "--model", args.checkpoint, "--output", args.output, *(flags or ["--mode", "kv"])]
    status = exporter.main(VARIANTS[args.variant])
    enter("end")
    return status


if __name__ == "__main__":
    sys.exit(main())
