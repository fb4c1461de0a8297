"""Export the Gemma 3n E2B text decoder to ExecuTorch: `python e2b/export.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma3n_executorch.exporter import main  # noqa: E402
from gemma3n_executorch.variants import VARIANTS  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(VARIANTS["e2b"]))
