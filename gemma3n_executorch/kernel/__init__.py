"""gemma3n::gqa_attention: causal grouped-query attention over a static KV cache, as one
ExecuTorch kernel that reads each KV head's cache once for all the query heads sharing it
(see gqa_attention.cpp). With ``--attention-kernel gemma3n`` the kv program's attention runs on
it, the full layers' and the sliding layers' rings; whatever runs such a program must load it first.

Importing this module defines the ATen-side operators (a pure-PyTorch reference for eager use and
a fake implementation for torch.export):

    gemma3n::gqa_attention(query[1,n,H,D] f32, k_cache[1,S,KV,D], v_cache, start_pos) -> [1,n,H,D]
        caches float32 or float16; token t sees positions [0, start_pos + t]
    gemma3n::gqa_attention_int8(query, k_cache, v_cache, k_scales, k_zero_points, v_scales,
                                v_zero_points, start_pos) -> [1,n,H,D]
        int8 caches, float32 scales and int8 zero points [1,S,KV,1]: value = (q - zp) * scale;
        the query is rounded to int8 per token and head (symmetric, max |q| / 127; ExecuTorch's
        int8 kernel rounds it too, asymmetrically)
    gemma3n::sliding_gqa_attention{,_int8}(..., start_pos, window)
        the cache is a ring, position p in slot p % S; token t sees (start_pos + t - window,
        start_pos + t], and no slot outside that is read (an unwritten ring needs no zeroing)

each with an ``.out`` overload, which ExecuTorch's to_executorch substitutes. The scores are not
scaled (Gemma 3n's query norm does it).

``load_runtime_kernel()`` compiles the ExecuTorch kernels on first use (g++, cached by a hash of
the source and flags under $GEMMA3N_KERNEL_CACHE or ~/.cache/gemma3n_executorch/kernels) and loads
them into the runtime's kernel registry, the one of executorch's pybindings (_portable_lib). Call it
before loading a program that uses these operators.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..metadata import PREFIX
from ..progress import UserError

SOURCE = Path(__file__).with_name("gqa_attention.cpp")
_LIBRARY = torch.library.Library("gemma3n", "DEF")
_loaded: Path | None = None

_FLOAT_ARGS = "Tensor query, Tensor k_cache, Tensor v_cache, SymInt start_pos"
_INT8_ARGS = ("Tensor query, Tensor k_cache, Tensor v_cache, Tensor k_scales, Tensor k_zero_points, "
              "Tensor v_scales, Tensor v_zero_points, SymInt start_pos")


def reference(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: int,
              window: int = 0) -> torch.Tensor:
    """What the kernel computes, with torch's SDPA over the visible positions (float caches).
    window 0: positions [0, start_pos + t]; else (start_pos + t - window, start_pos + t], position p
    in slot p % slots."""
    tokens, heads = query.shape[1], query.shape[2]
    start_pos, end = int(start_pos), int(start_pos) + tokens
    positions = torch.arange(max(0, start_pos - window + 1) if window else 0, end, device=query.device)
    slots = positions % k_cache.shape[1]
    keys = k_cache[:, slots].transpose(1, 2).to(torch.float32)
    values = v_cache[:, slots].transpose(1, 2).to(torch.float32)
    query_positions = (start_pos + torch.arange(tokens, device=query.device))[:, None]
    visible = positions[None, :] <= query_positions
    if window:
        visible &= positions[None, :] > query_positions - window
    output = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2).to(torch.float32), keys, values, attn_mask=visible, scale=1.0,
        enable_gqa=heads != k_cache.shape[2])
    return output.transpose(1, 2).contiguous()


def dequantize(cache: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    return (cache.to(torch.float32) - zero_points.to(torch.float32)) * scales


def quantize_query(query: torch.Tensor) -> torch.Tensor:
    """The query as the int8 kernel uses it: each head's row rounded to int8 at max |q| / 127 (so
    that q . k is an integer dot product), returned dequantized."""
    amax = query.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(query / scale) * scale


def reference_int8(query, k_cache, v_cache, k_scales, k_zero_points, v_scales, v_zero_points, start_pos, window=0):
    return reference(quantize_query(query), dequantize(k_cache, k_scales, k_zero_points),
                     dequantize(v_cache, v_scales, v_zero_points), start_pos, window)


def _define(name: str, arguments: str, compute) -> None:
    """name and name.out, computed eagerly by ``compute`` (the reference), with fake implementations."""
    _LIBRARY.define(f"{name}({arguments}) -> Tensor")
    _LIBRARY.define(f"{name}.out({arguments}, *, Tensor(a!) out) -> Tensor(a!)")

    def functional(*args):
        return compute(*args)

    def out_variant(*args, out):
        out.resize_(args[0].shape).copy_(compute(*args))
        return out

    torch.library.impl(_LIBRARY, name, "CompositeExplicitAutograd")(functional)
    torch.library.impl(_LIBRARY, f"{name}.out", "CompositeExplicitAutograd")(out_variant)
    torch.library.register_fake(f"gemma3n::{name}")(lambda query, *args: query.new_empty(query.shape,
                                                                                          dtype=torch.float32))
    torch.library.register_fake(f"gemma3n::{name}.out")(lambda *args, out: out)


_define("gqa_attention", _FLOAT_ARGS, reference)
_define("gqa_attention_int8", _INT8_ARGS, reference_int8)
_define("sliding_gqa_attention", _FLOAT_ARGS + ", int window", reference)
_define("sliding_gqa_attention_int8", _INT8_ARGS + ", int window", reference_int8)


def _portable_lib() -> Path:
    import executorch.extension.pybindings.portable_lib as portable_lib  # noqa: F401  (the registry)

    from executorch.extension.pybindings import _portable_lib as module
    return Path(module.__file__)


def _flags() -> list[str]:
    machine = platform.machine().lower()
    arch = ["-march=native"] if machine in ("x86_64", "amd64") else ["-mcpu=native"]
    return ["-O3", *arch, "-ffp-contract=fast", "-fPIC", "-shared", "-std=c++17", "-DNDEBUG",
            "-DET_USE_THREADPOOL", "-DC10_USING_CUSTOM_GENERATED_MACROS"]


def _cpu_features() -> bytes:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "").encode()


def build() -> Path:
    """The kernel library, compiled now if the source, flags or ExecuTorch changed."""
    portable = _portable_lib()
    include = portable.parents[2] / "include"
    flags = _flags()
    # -march=native: a library built on one CPU may not run on another that shares the home directory.
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + str(portable).encode()
                         + str(portable.stat().st_size).encode() + _cpu_features()).hexdigest()[:16]
    cache = Path(os.environ.get("GEMMA3N_KERNEL_CACHE", Path.home() / ".cache" / "gemma3n_executorch" / "kernels"))
    library = cache / f"gqa_attention-{key}.so"
    if library.exists():
        return library
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise UserError("this program uses the gemma3n attention kernel, which is compiled on first use, and no C++ "
                        "compiler was found: install g++ (or set CXX), or re-export with --attention-kernel executorch")
    cache.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{library.name}.", suffix=".partial", dir=cache)
    os.close(handle)
    command = [compiler, *flags, f"-I{include}", f"-I{include / 'executorch/runtime/core/portable_type/c10'}",
               str(SOURCE), "-o", partial, f"-L{portable.parent}", f"-l:{portable.name}",
               f"-Wl,-rpath,{portable.parent}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip()[:300])
            raise UserError(f"the gemma3n attention kernel did not compile ({first}); re-export with "
                            "--attention-kernel executorch, or report it with the output of: " + " ".join(command))
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def load_for_program(path: Path | str) -> None:
    """Load the kernels if the program at ``path`` was exported to use them (its metadata says so):
    for runners that are handed a path, such as ExecuTorch's TextLLMRunner."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(Path(path))
    name = PREFIX + "attention_kernel"
    if name in program.method_names and program.load_method(name).execute([])[0] == "gemma3n":
        load_runtime_kernel()


def load_runtime_kernel() -> Path:
    """Build if needed and register the kernels with ExecuTorch's runtime (once per process)."""
    global _loaded
    if _loaded is None:
        library = build()
        ctypes.CDLL(str(library))
        _loaded = library
    return _loaded
