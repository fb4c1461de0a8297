"""Benchmark exported KV-cache programs against eager PyTorch on one machine:
``python bench.py --help``; gemma3n_executorch/benchmark/ is the benchmark, and its __init__ documents
the configurations, the long-context and memory runs and every record's columns."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemma3n_executorch.benchmark.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
