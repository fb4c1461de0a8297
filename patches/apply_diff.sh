#!/usr/bin/env bash
# Apply modeling_gemma3n.diff to the transformers installed for PYTHON (default: python3).
# Only for people who patch the source by hand: the exporter patches the imported classes at
# run time and never needs this. The diff is against transformers 5.23.0. Re-running is safe.
set -euo pipefail
python=${PYTHON:-python3}
site=$("$python" -c 'import pathlib, transformers; print(pathlib.Path(transformers.__file__).parent.parent)')
diff="$(cd "$(dirname "$0")" && pwd)/modeling_gemma3n.diff"
if patch --dry-run --reverse --force --silent -p1 -d "$site" < "$diff" >/dev/null 2>&1; then
  echo "already applied to $site/transformers/models/gemma3n/modeling_gemma3n.py"
  exit 0
fi
patch --forward -p1 -d "$site" < "$diff"
