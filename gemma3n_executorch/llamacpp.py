"""The peer a phone program is held to: llama.cpp's Q4_0, converted from the same weights and
timed by llama.cpp's own ``llama-bench`` on the same machine, so bench.py can compare in one run.

llama.cpp is not a dependency of this project. ``tree`` is a llama.cpp source tree (its converter
``convert_hf_to_gguf.py`` and ``gguf-py``) with ``llama-quantize`` and ``llama-bench`` built in
``build/bin``. docs/benchmarks.md says how to get one from PyPI alone.
"""

from __future__ import annotations

import json
import logging
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

from .progress import UserError
from .variants import BOS_ID, EOS_ID, PAD_ID

BINARIES = ("llama-quantize", "llama-bench")
QUANTIZATION = "Q4_0"
# As docs/benchmarks.md builds it.
BUILD = ("cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF "
         "-DLLAMA_OPENSSL=OFF && cmake --build build --target llama-quantize llama-bench -j2")


def binary(tree: Path, name: str) -> Path:
    return Path(tree) / "build" / "bin" / name


def check_tree(tree: Path) -> None:
    for needed in [Path(tree) / "convert_hf_to_gguf.py", *(binary(tree, name) for name in BINARIES)]:
        if not needed.exists():
            raise UserError(f"--llama-cpp {tree}: no {needed}; build it in that tree: {BUILD}")


def save_checkpoint(model, directory: Path) -> None:
    """The model as the published checkpoint stores it (write_shared_kv_stand_ins)."""
    model.save_pretrained(directory)
    write_shared_kv_stand_ins(directory, model.config, model.dtype)


def write_random_checkpoint(directory: Path, config: dict) -> None:
    """checkpoint.build_random's model of ``config`` as save_checkpoint would store it, written a
    row block at a time (stored_weights.write_random): the model is never in memory (E4B's 13.6 GB
    beside the converter's own did not fit in 24 GiB)."""
    from transformers import Gemma3nTextConfig

    from .stored_weights import write_random

    write_random(directory, config)
    path = directory / "config.json"
    saved = dict(json.loads(path.read_text()), architectures=["Gemma3nForCausalLM"])  # the converter's key
    path.write_text(json.dumps(saved, indent=1))
    write_shared_kv_stand_ins(directory, Gemma3nTextConfig.from_json_file(path), getattr(torch, saved["dtype"]))


def write_shared_kv_stand_ins(directory: Path, config, dtype: torch.dtype) -> None:
    """Hugging Face builds no K/V projections for the layers that reuse an earlier layer's cache
    (they are never computed), but the published checkpoint has them and llama.cpp's loader
    requires them: zeros stand in."""
    from safetensors.torch import save_file

    kv_width = config.num_key_value_heads * config.head_dim
    stand_ins = {}
    for layer in range(config.num_hidden_layers - config.num_kv_shared_layers, config.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        stand_ins[prefix + "k_proj.weight"] = torch.zeros(kv_width, config.hidden_size, dtype=dtype)
        stand_ins[prefix + "v_proj.weight"] = torch.zeros(kv_width, config.hidden_size, dtype=dtype)
        stand_ins[prefix + "k_norm.weight"] = torch.zeros(config.head_dim, dtype=dtype)
    save_file(stand_ins, Path(directory) / "model-shared-kv.safetensors")


def _placeholder_vocabulary(converter) -> None:
    """A random-weight model has no tokenizer; llama.cpp loads any vocabulary of the right size,
    and llama-bench feeds random token ids."""
    size = converter.hparams["vocab_size"]
    writer = converter.gguf_writer
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"<t{i}>".encode() for i in range(size)])
    writer.add_token_scores([0.0] * size)
    writer.add_token_types([1] * size)  # normal
    writer.add_pad_token_id(PAD_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_bos_token_id(BOS_ID)


def convert(tree: Path, checkpoint: Path, output: Path) -> None:
    """A bf16 GGUF through llama.cpp's own converter, run in this process so that its vocabulary
    step can read the placeholder instead of a tokenizer file."""
    tree = Path(tree).resolve()
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    import conversion.gemma  # llama.cpp's converter package, from the tree just put on the path

    conversion.gemma.Gemma3NModel.set_vocab = _placeholder_vocabulary
    # Its warnings stay; its line per tensor (700 of them) would bury bench.py's progress.
    logging.getLogger("hf-to-gguf").setLevel(logging.WARNING)
    argv = ["convert_hf_to_gguf.py", str(checkpoint), "--outfile", str(output), "--outtype", "bf16"]
    with mock.patch.object(sys, "argv", argv):
        runpy.run_path(str(tree / "convert_hf_to_gguf.py"), run_name="__main__")


def _run(command: list) -> str:
    completed = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed (exit {completed.returncode}): "
                           f"{completed.stderr.strip().splitlines()[-1:]}")
    return completed.stdout


def quantize(tree: Path, source: Path, output: Path) -> None:
    _run([binary(tree, "llama-quantize"), source, output, QUANTIZATION])


def bench(tree: Path, gguf: Path, prompt_len: int, new_tokens: int, threads: int, repeats: int) -> dict:
    """Prefill of ``prompt_len`` tokens into an empty cache, and decode after a prompt of that
    length, as bench.py times the exported programs: llama-bench runs without its warm-up, so its
    first prefill sample is the first after loading and the ``repeats`` after it are warm (decode:
    the mean of those ``repeats``)."""
    results = json.loads(_run([binary(tree, "llama-bench"), "-m", gguf, "-p", prompt_len, "-n", new_tokens,
                               "-d", f"0,{prompt_len}", "-t", threads, "-r", repeats + 1, "--no-warmup",
                               "-o", "json"]))
    prefill = next(r for r in results if r["n_prompt"] == prompt_len and r["n_depth"] == 0)["samples_ts"]
    decode = next(r for r in results if r["n_gen"] == new_tokens and r["n_depth"] == prompt_len)["samples_ts"]
    return {"prefill_samples_tok_s": prefill, "decode_tok_s": sum(decode[1:]) / repeats,
            "llama_cpp_commit": results[0]["build_commit"]}


def prefill(tree: Path, gguf: Path, prompt_len: int, threads: int) -> float:
    """tok/s of one prefill of ``prompt_len`` tokens into an empty cache (after llama-bench's warm-up)."""
    results = json.loads(_run([binary(tree, "llama-bench"), "-m", gguf, "-p", prompt_len, "-n", 0, "-t", threads,
                               "-r", 1, "-o", "json"]))
    return results[0]["avg_ts"]


def decode_at_depths(tree: Path, gguf: Path, depths: list[int], new_tokens: int, threads: int) -> dict:
    """Decode tok/s of ``new_tokens`` after each depth of tokens in the cache (``llama-bench -d``,
    which fills the cache untimed first), with llama.cpp's default cache settings."""
    results = json.loads(_run([binary(tree, "llama-bench"), "-m", gguf, "-p", 0, "-n", new_tokens,
                               "-d", ",".join(map(str, depths)), "-t", threads, "-r", 1, "-o", "json"]))
    return {r["n_depth"]: r["avg_ts"] for r in results}
