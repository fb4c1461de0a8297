"""Write a random-weight checkpoint of the real E2B or E4B text architecture, block by block (no
model in memory), to measure exports from files as a user runs them:

    python tools/write_random_checkpoint.py --variant e4b /work/e4b-random   # 13.6 GB of bf16
    python e4b/export.py --model /work/e4b-random --mode kv                  # the phone program's export

The weights are bench.py's (checkpoint.randomize_, seed 0): the same model bench.py builds in memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma3n_executorch.progress import gib, log, peak_rss_bytes, run_cli  # noqa: E402
from gemma3n_executorch.variants import VARIANTS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--layers", type=int, help="cut the architecture to N layers (default: full depth)")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    try:
        config = VARIANTS[args.variant].real_text_config(args.layers)
    except ValueError as error:
        parser.error(str(error))

    def write() -> int:
        from gemma3n_executorch import stored_weights

        began = time.perf_counter()
        path = stored_weights.write_random(args.directory, config)
        log(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - began:.0f} s; "
            f"peak memory {gib(peak_rss_bytes())}")
        return 0

    return run_cli(write)


if __name__ == "__main__":
    sys.exit(main())
