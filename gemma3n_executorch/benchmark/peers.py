"""What the peers' configurations need before a run starts, refused at once when missing: the
peers themselves (conversion, timing) are gemma3n_executorch/llamacpp.py and litertlm.py."""

from __future__ import annotations

from ..progress import UserError
from ..variants import BUILT_IN_MODELS
from .configs import LITERT_LM_CONFIGS, LLAMA_CPP, parameter_count
from .machine import physical_memory_bytes


def check_llama_cpp(args) -> None:
    from .. import llamacpp

    if args.model in BUILT_IN_MODELS or args.layers:
        raise UserError(f"{LLAMA_CPP} needs the full-depth random model: llama.cpp's Gemma 3n graph hard-codes the "
                        f"published depths; drop --layers and --model {args.model}")
    if args.llama_cpp is None:
        raise UserError(f"--configs {LLAMA_CPP} needs --llama-cpp DIR, a llama.cpp source tree with "
                        f"{' and '.join(llamacpp.BINARIES)} built; docs/benchmarks.md says how")
    llamacpp.check_tree(args.llama_cpp)


def check_litert_lm(args) -> None:
    from .. import litertlm

    if args.litert_lm is None:
        raise UserError(f"--configs {', '.join(LITERT_LM_CONFIGS)} need --litert-lm VENV, an environment with "
                        "litert-torch, litert-lm and tensorflow-cpu; docs/benchmarks.md says how to make it")
    litertlm.check_venv(args.litert_lm)
    if args.model not in BUILT_IN_MODELS:
        litertlm.check_conversion_fits(parameter_count(args), physical_memory_bytes())
