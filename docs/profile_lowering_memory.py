"""Where an export's lower stage peaks: e4b/export.py (or e2b's) with the process's resident memory
sampled every 20 ms and its peak printed per phase of lowering, as each phase begins:

    python docs/profile_lowering_memory.py --variant e4b W/e4b-l4 W/profiled.pte [export flags, default --mode kv]

Phases: edge dialect and partitioning; the partitions' copies and XNNPACK's preprocessing of each;
after delegation; quantization fusion and constant folding (the tables packed); ExecuTorch's passes,
memory planning and emission. At the end, for each phase, where the main thread was (its innermost
frames) when the phase's peak was sampled.
"""
import argparse
import os
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

phase = ["load, quantize, export"]
peaks: dict[str, float] = {}
peak_stacks: dict[str, list[str]] = {}
MAIN_THREAD = threading.get_ident()


def resident_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def where_main_thread_is(frames: int = 8) -> list[str]:
    stack = traceback.extract_stack(sys._current_frames()[MAIN_THREAD])[-frames:]
    return [f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in stack]


def sample() -> None:
    while True:
        resident, name = resident_gib(), phase[0]
        if resident > peaks.get(name, 0.0):
            peak_stacks[name], peaks[name] = where_main_thread_is(), resident
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
    for name, stack in peak_stacks.items():
        print(f"  -- {name}: peak {peaks[name]:.2f} GiB while in\n" + "\n".join(f"       {line}" for line in stack))
    return status


if __name__ == "__main__":
    sys.exit(main())
