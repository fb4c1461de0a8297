#!/usr/bin/env bash
# The ARM64 check, on an x86 Linux machine with root: build (once, cached) an emulated ARM64
# environment from Debian's and PyPI's packages, then run the exported programs in it against x86
# (tools/arm64/crosscheck.py; its arguments are passed on).
#
#   sudo tools/arm64/check.sh [--cpus 'max;cortex-a76'] [--work DIR] [--no-instructions] [--json OUT]
#
# Environment: PYTHON        the project's x86 venv python (default: .venv/bin/python)
#              GEMMA3N_ARM64_HOME  where the ARM64 environment is cached
#                            (default: ~/.cache/gemma3n-executorch/arm64)
#              DEBIAN_MIRROR (default: http://deb.debian.org/debian)
# Exit status: 0 all checks passed, 1 a check failed, 2 the environment cannot be built or bad input.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
ARM64_HOME="${GEMMA3N_ARM64_HOME:-$HOME/.cache/gemma3n-executorch/arm64}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
START=$SECONDS

stage() { echo "[arm64 setup: $1] (${SECONDS}s since start)" >&2; }
fail() { echo "error: $1" >&2; exit 2; }

[ "$(id -u)" = 0 ] || fail "run as root: debootstrap and binfmt_misc need it"
[ "$(uname -m)" = x86_64 ] || fail "this check emulates ARM64 on x86_64; this machine is $(uname -m)"
[ -x "$PYTHON" ] || fail "no x86 python at $PYTHON; create the venv (README) or set PYTHON"

# 1. Host tools: qemu's user-mode emulator, debootstrap, and an aarch64 assembler and linker
#    for the stand-in CUDA libraries (cuda_stubs.py).
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
   || ! command -v aarch64-linux-gnu-ld >/dev/null; then
  stage "apt-get install qemu-user-static debootstrap binutils-aarch64-linux-gnu"
  apt-get update -qq >/dev/null && apt-get install -y -qq qemu-user-static debootstrap binutils-aarch64-linux-gnu >/dev/null \
    || fail "apt-get could not install qemu-user-static, debootstrap and binutils-aarch64-linux-gnu"
fi

mkdir -p "$ARM64_HOME"
cd "$ARM64_HOME"

# 2. A Debian bookworm arm64 root filesystem with python3.11 (the cp311 wheels' interpreter).
#    debootstrap's second stage runs arm64 programs in a chroot, which takes binfmt_misc; the
#    check itself calls qemu directly and does not.
if [ ! -e rootfs/.complete ]; then
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
      || fail "cannot mount binfmt_misc, which debootstrap's arm64 second stage needs"
    /usr/lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf 2>/dev/null \
      || tr -d '\n' < /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register \
      || fail "cannot register qemu-aarch64 with binfmt_misc"
  fi
  stage "debootstrap --arch arm64 bookworm (about 3 minutes)"
  rm -rf rootfs.partial
  debootstrap --arch arm64 --variant=minbase --include=python3.11,libatomic1 bookworm rootfs.partial "$MIRROR" \
    > debootstrap.log 2>&1 || fail "debootstrap failed; see $ARM64_HOME/debootstrap.log"
  touch rootfs.partial/.complete
  rm -rf rootfs && mv rootfs.partial rootfs
fi

# 3. The aarch64 wheels, installed for the guest by the host's pip (pip under emulation is slow):
#    torch, executorch and transformers at the pins of requirements.txt, plus what they import.
REQUIREMENTS="$(grep -E '^(torch|executorch|transformers)==' "$REPO/requirements.txt"; grep -vE '^\s*(#|$)' "$REPO/tools/arm64/requirements-aarch64.txt")"
WANTED="$(echo "$REQUIREMENTS" | sha256sum | cut -c1-16)"
if [ "$(cat site/.complete 2>/dev/null)" != "$WANTED" ]; then
  stage "pip install the manylinux_2_28_aarch64 wheels (torch's is 427 MB)"
  rm -rf site.partial
  echo "$REQUIREMENTS" > requirements.txt
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --python-version 3.11 --implementation cp --abi cp311 --target site.partial -r requirements.txt \
    || fail "pip could not install the aarch64 wheels listed in $ARM64_HOME/requirements.txt"
  echo "$WANTED" > site.partial/.complete
  rm -rf site cuda-stubs && mv site.partial site
fi

# 4. Stand-ins for the CUDA libraries PyPI's aarch64 torch (a CUDA build) links (cuda_stubs.py).
if [ ! -e cuda-stubs/.complete ]; then
  stage "link the stand-in CUDA libraries"
  rm -rf cuda-stubs.partial
  python3 "$REPO/tools/arm64/cuda_stubs.py" site/torch/lib rootfs/usr/lib/aarch64-linux-gnu cuda-stubs.partial >&2 \
    || fail "could not link the stand-in CUDA libraries"
  rm -rf cuda-stubs.partial/build && touch cuda-stubs.partial/.complete
  mv cuda-stubs.partial cuda-stubs
fi
stage "environment ready in $ARM64_HOME ($((SECONDS - START))s)"

cd - >/dev/null
exec "$PYTHON" "$REPO/tools/arm64/crosscheck.py" --env "$ARM64_HOME" "$@"
