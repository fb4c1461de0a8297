"""Stand-in CUDA libraries for PyPI's aarch64 torch, which is a CUDA build.

torch 2.13.0's only manylinux aarch64 wheel on PyPI links the CUDA runtime, cuBLAS, cuDNN, NCCL
and more (its libtorch.so needs libtorch_cuda.so), and their aarch64 wheels are gigabytes
(nvidia-cudnn-cu13 is not even on the registry here). Nothing in an ExecuTorch run on a CPU calls
them, but the dynamic loader must find every needed library and every symbol version. So for each
library torch needs and nobody ships, this writes a shared object with that soname that defines
the versioned functions torch imports from it, each returning 100 (cudaErrorNoDevice: "no GPU"),
which is what a phone without CUDA would answer. Functions are bound lazily (torch is not linked
with BIND_NOW), so unversioned imports need no stand-in until called, and none is.

    python cuda_stubs.py TORCH_LIB_DIR SYSTEM_LIB_DIR OUTPUT_DIR

needs aarch64-linux-gnu-as/-ld (Debian's binutils-aarch64-linux-gnu) and readelf.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

NO_DEVICE = 100
DRIVER = "libcuda.so.1"


def readelf(*args: str) -> str:
    return subprocess.run(["readelf", "-W", *args], check=True, capture_output=True, text=True).stdout


def missing_libraries(torch_lib: Path, system_lib: Path) -> set[str]:
    needed = set()
    for library in torch_lib.glob("*.so*"):
        needed |= set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", readelf("-d", str(library))))
    # The driver, libcuda.so.1, stays absent as on a machine without a GPU; only the lazily loaded
    # libcaffe2_nvrtc.so needs it.
    return {name for name in needed if not (torch_lib / name).exists() and not (system_lib / name).exists()
            and name != DRIVER}


def dynamic_symbols(library: Path) -> list[list[str]]:
    """readelf's dynamic symbol rows: [num, value, size, type, bind, vis, ndx, name[@version]]."""
    rows = (line.split() for line in readelf("--dyn-syms", str(library)).splitlines())
    return [row for row in rows if len(row) >= 8 and row[0].endswith(":")]


def owner_by_prefix(symbol: str, missing: set[str]) -> str | None:
    """Unversioned imports do not name their library, and any loaded stand-in satisfies the
    loader; the library whose name the symbol starts with takes it (cusparseLt..., nccl...,
    cuda... for libcudart). Others (Python's C API, imported from the interpreter) are left alone."""
    stems = {name[3:].split(".")[0].lower().removesuffix("rt"): name for name in missing}
    matches = [stem for stem in stems if symbol.lower().startswith(stem)]
    return stems[max(matches, key=len)] if matches else None


def imports_by_library(torch_lib: Path, system_lib: Path, missing: set[str]) -> dict[str, dict[str, set[str]]]:
    """{missing library: {version or "": {symbols}}} from torch's version needs and imports.

    Versioned imports name their library. Unversioned ones that no present library defines are
    bound at load time when their address is taken (cusparseLtMatmulPlanDestroy), so they get a
    definition too."""
    wanted: dict[str, dict[str, set[str]]] = {name: defaultdict(set) for name in missing}
    present = [*torch_lib.glob("*.so*"), *system_lib.glob("*.so*")]
    defined = {row[7].split("@")[0] for library in present for row in dynamic_symbols(library) if row[6] != "UND"}
    for library in torch_lib.glob("*.so*"):
        version_owner, current = {}, None
        for line in readelf("-V", str(library)).splitlines():
            if (file := re.search(r"File: (\S+)", line)):
                current = file.group(1)
            elif (name := re.search(r"Name: (\S+)", line)) and current in missing:
                version_owner[name.group(1)] = current
                wanted[current].setdefault(name.group(1), set())
        for row in dynamic_symbols(library):
            if row[6] != "UND" or row[4] == "WEAK":
                continue
            symbol, _, version = row[7].partition("@")
            if version in version_owner:
                wanted[version_owner[version]][version].add(symbol)
            elif not version and symbol not in defined and (owner := owner_by_prefix(symbol, missing)):
                wanted[owner][""].add(symbol)
    return wanted


def write_stub(soname: str, versions: dict[str, set[str]], output: Path, scratch: Path) -> None:
    functions = sorted(set().union(*versions.values())) if versions else []
    assembly = [".text"] + [line for f in functions for line in
                            (f".global {f}", f".type {f}, %function", f"{f}:", f"  mov w0, #{NO_DEVICE}", "  ret")]
    source, obj, script = scratch / f"{soname}.s", scratch / f"{soname}.o", scratch / f"{soname}.map"
    source.write_text("\n".join(assembly) + "\n")
    # One version node per version torch asks for; unversioned symbols ("") stay unversioned.
    nodes = [f"{v} {{ {'global: ' + ''.join(f'{name}; ' for name in sorted(s)) if s else ''}}};\n"
             for v, s in sorted(versions.items()) if v]
    script.write_text("".join(nodes) or "{ global: *; };\n")
    subprocess.run(["aarch64-linux-gnu-as", "-o", str(obj), str(source)], check=True)
    subprocess.run(["aarch64-linux-gnu-ld", "-shared", "-soname", soname, "--version-script", str(script),
                    "-o", str(output / soname), str(obj)], check=True)


def main(torch_lib: str, system_lib: str, output: str) -> int:
    out = Path(output)
    scratch = out / "build"
    scratch.mkdir(parents=True, exist_ok=True)
    missing = missing_libraries(Path(torch_lib), Path(system_lib))
    for soname, versions in sorted(imports_by_library(Path(torch_lib), Path(system_lib), missing).items()):
        write_stub(soname, versions, out, scratch)
        print(f"  {soname}: {sum(len(s) for s in versions.values())} functions")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
