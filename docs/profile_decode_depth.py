"""Where a decode step's time goes deep in the cache: one-token calls of a kv program at each depth,
timed, and sampled by ``perf`` while they run (not while the program loads), its samples summed
by shared object and by symbol, per token. Behind "Where decode time goes at depth" in
docs/benchmarks.md:

    python docs/profile_decode_depth.py PROGRAM --depths 128,32000 --seconds 30 --perf-dir /tmp/prof
    python docs/profile_decode_depth.py PROGRAM --depths 128,32000 --torch-threads 1   (timed only)
    python docs/profile_decode_depth.py PROGRAM --depths 128,32000 --seconds 10 --rounds 5
        (timed only, the depths alternated: the speed ratio of each round, on a machine whose speed drifts)
    python docs/profile_decode_depth.py PROGRAM --depths 128 --seconds 10 --rounds 3 --omp-wait-policy passive
        (torch's OpenMP workers block after each parallel region instead of spinning; run alternately
        with and without it, each a process of its own)
    python docs/profile_decode_depth.py PROGRAM --prompts 128,4096 --rounds 5
        (prefill instead: a prompt of each length from position 0, alternated, as bench.py's --long-prompt
        ratio; the first round's 128-token prompt also warms the program up)

A call's cost does not depend on what the cache holds (every kernel reads the positions up to the
token's own, whatever their values), so each depth is reached by setting the position, without
prefilling thousands of tokens first.
"""
import argparse
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKEN = 9
WARM_UP_CALLS = 5


def decode_at(program, depth: int, seconds: float) -> tuple[int, float]:
    """Calls made and seconds taken, each call one token at position ``depth``."""
    calls, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        program.position = depth
        program.step([TOKEN])
        calls += 1
    return calls, time.perf_counter() - began


def prefill(program, length: int) -> float:
    """Tokens a second of one prompt of ``length`` tokens from position 0 (in the program's calls):
    bench.py's probe tokens, so that the tables are read a row per token as in its --long-prompt."""
    from gemma3n_executorch.parity import probe_tokens
    from gemma3n_executorch.variants import BOS_ID

    tokens = probe_tokens(length, program.info.vocab_size, BOS_ID)
    program.position = 0
    began = time.perf_counter()
    program.step(tokens)
    return length / (time.perf_counter() - began)


def sampled(perf_data: Path, key: str) -> collections.Counter:
    """perf samples by ``key`` (dso or sym), from ``perf report``'s flat listing."""
    listing = subprocess.run(["perf", "report", "-i", str(perf_data), "--no-children", "--sort", key, "-F",
                              f"sample,{key}", "--stdio", "-q"], capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    for line in listing.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():
            counts[parts[1].strip().removeprefix("[.] ").removeprefix("[k] ")] += int(parts[0])
    return counts


def profile(program, depth: int, seconds: float, perf_dir: Path, frequency: int) -> dict:
    perf_data = perf_dir / f"depth{depth}.data"
    recorder = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", str(frequency), "-p", str(os.getpid()),
                                 "-o", str(perf_data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # perf attaches to every thread before the timed calls
    calls, taken = decode_at(program, depth, seconds)
    recorder.send_signal(signal.SIGINT)
    recorder.wait()
    return {"calls": calls, "ms_per_token": taken / calls * 1e3,
            "dso": sampled(perf_data, "dso"), "sym": sampled(perf_data, "sym")}


def report(results: dict, frequency: int, rows: int) -> None:
    """Per token, ms of CPU time (both threads) by shared object and by symbol, each depth side by side."""
    depths = sorted(results)
    print("ms per token: " + ", ".join(f"depth {d} {results[d]['ms_per_token']:.2f}" for d in depths))
    for key in ("dso", "sym"):
        per_token = {d: {name: count / frequency * 1e3 / results[d]["calls"] for name, count in results[d][key].items()}
                     for d in depths}
        names = sorted({n for d in depths for n in per_token[d]}, key=lambda n: -max(per_token[d].get(n, 0) for d in depths))
        print(f"\nCPU ms per token by {key} (" + " | ".join(f"depth {d}" for d in depths) + "):")
        for name in names[:rows]:
            print("  " + " | ".join(f"{per_token[d].get(name, 0):7.2f}" for d in depths) + f"  {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("program", type=Path)
    parser.add_argument("--depths", default="128,32000")
    parser.add_argument("--seconds", type=float, default=30, help="of calls at each depth")
    parser.add_argument("--perf-dir", type=Path, help="sample with perf and keep its data here")
    parser.add_argument("--frequency", type=int, default=999, help="perf samples a second, per thread")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=1, help="timed only: time the depths in turn this many times")
    parser.add_argument("--prompts", help="prompt lengths to prefill in turn instead (timed only), e.g. 128,4096")
    parser.add_argument("--fill", action="store_true",
                        help="first prefill probe tokens up to the deepest depth, so that the calls attend to real "
                             "keys and values (without it they attend to a cache never written: equal weights)")
    parser.add_argument("--torch-threads", type=int,
                        help="torch's own threads beside the program (default: torch's); a program on this "
                             "project's kernel makes its calls with one all the same (runtime.torch_threads)")
    parser.add_argument("--omp-wait-policy", choices=["active", "passive"],
                        help="torch's OpenMP workers: spin for the next parallel region, or block at once after "
                             "one (default: libgomp's, which spins a while)")
    args = parser.parse_args()
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # read once, when torch loads libgomp
    import torch

    from gemma3n_executorch.runtime import Program

    program = Program(args.program)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    if args.prompts:
        lengths = [int(n) for n in args.prompts.split(",")]
        prefill(program, lengths[0])  # warm-up
        for round_ in range(args.rounds):
            rates = {n: prefill(program, n) for n in lengths}
            print(f"round {round_ + 1}: " + ", ".join(f"{n} tokens {rate:.1f} tok/s" for n, rate in rates.items())
                  + "; against the first: " + ", ".join(f"{n} tokens {rates[n] / rates[lengths[0]]:.3f}x"
                                                        for n in lengths[1:]), flush=True)
        return
    depths = [int(d) for d in args.depths.split(",")]
    if args.fill:
        print(f"filled to depth {max(depths)} at {prefill(program, max(depths)):.1f} tok/s", flush=True)
    for depth in depths:
        for _ in range(WARM_UP_CALLS):
            program.position = depth
            program.step([TOKEN])
    if args.perf_dir is None:
        for round_ in range(args.rounds):
            ms = {}
            for depth in depths:
                calls, taken = decode_at(program, depth, args.seconds)
                ms[depth] = taken / calls * 1e3
                print(f"depth {depth}: {ms[depth]:.2f} ms per token ({calls} calls)")
            if args.rounds > 1:
                print(f"round {round_ + 1}: speed against depth {depths[0]}: "
                      + ", ".join(f"depth {d} {ms[depths[0]] / ms[d]:.3f}x" for d in depths[1:]), flush=True)
        return
    args.perf_dir.mkdir(parents=True, exist_ok=True)
    report({depth: profile(program, depth, args.seconds, args.perf_dir, args.frequency) for depth in depths},
           args.frequency, args.rows)


if __name__ == "__main__":
    main()
