"""The peer from Google itself: LiteRT-LM, the runtime Gemma 3n was built for, on the same weights,
converted by ``litert-torch export_hf`` and timed by LiteRT-LM's own benchmark in the same run.

LiteRT is not a dependency of this project, and its packages must not share our environment
(tensorflow, another transformers): ``venv`` is a virtual environment with ``litert-torch``,
``litert-lm`` and ``tensorflow-cpu`` installed, as docs/benchmarks.md makes it from PyPI. bench.py
runs in our environment and writes the checkpoint and tokenizer; the conversion and the timing run
this module under ``venv``'s Python (``python -m gemma3n_executorch.litertlm convert|benchmark``),
so everything imported at its top is the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from .progress import UserError, log
from .variants import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKEN_IDS

# bench.py's configuration names -> litert-torch's quantization recipes (ai_edge_quantizer's
# recipe module, by name). int8: its default, 8-bit weights with one scale per output channel
# in every linear and embedding table, activations quantized to int8 on the fly. int4: the same
# at 4 bits.
RECIPES = {"litertlm-int8": "dynamic_wi8_afp32", "litertlm-int4": "dynamic_wi4_afp32"}
# Peak resident memory of litert-torch's conversion per parameter of the model: 7.59 GiB for
# E2B's widths at 3 layers (0.95 B parameters), its fp32 copy and the converter's copies of it,
# plus a fixed part, so an upper bound for deeper models (docs/benchmarks.md).
CONVERSION_PEAK_BYTES_PER_PARAMETER = 8.6
NEEDED_MODULES = ("litert_torch", "litert_lm", "tensorflow")
REPOSITORY = Path(__file__).resolve().parent.parent


def python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def check_venv(venv: Path) -> None:
    """A one-line refusal unless ``venv`` has LiteRT's tools (found without importing them:
    tensorflow alone takes seconds to import)."""
    if not python(venv).exists():
        raise UserError(f"--litert-lm {venv}: no {python(venv)}; make the environment as docs/benchmarks.md says")
    probe = f"import importlib.util; print(*(m for m in {NEEDED_MODULES!r} if importlib.util.find_spec(m) is None))"
    completed = subprocess.run([str(python(venv)), "-c", probe], capture_output=True, text=True)
    missing = completed.stdout.split() if completed.returncode == 0 else [f"a working Python ({completed.stderr.strip()})"]
    if missing:
        raise UserError(f"--litert-lm {venv}: no {', '.join(missing)}; install litert-torch, litert-lm and "
                        "tensorflow-cpu there as docs/benchmarks.md says")


def check_conversion_fits(parameters: int, memory_bytes: int) -> None:
    """Refuse a model whose conversion would run this machine out of memory (full-depth E2B)."""
    peak = CONVERSION_PEAK_BYTES_PER_PARAMETER * parameters
    if peak > memory_bytes:
        raise UserError(f"litert-torch's conversion of this model ({parameters / 1e9:.2f} B parameters) would peak "
                        f"near {peak / 2**30:.0f} GiB, more than this machine's {memory_bytes / 2**30:.0f} GiB: "
                        "cut it with --layers (E2B at 10 layers: about 15 GiB)")


# ---- in our environment: the checkpoint and tokenizer litert-torch reads ----

def save_checkpoint(model, directory: Path) -> None:
    """The text decoder in the published multimodal layout (``model_type: gemma3n``, weights
    under ``model.language_model.``), the only one litert-torch's Gemma 3n exporter takes; the
    vision and audio configs are transformers' defaults and get no weights (``convert`` builds
    parameter-free stand-ins for those towers). The tied lm_head is not stored, as published."""
    from safetensors.torch import save_file
    from transformers import Gemma3nConfig

    directory = Path(directory)
    directory.mkdir(parents=True)
    config = Gemma3nConfig(text_config=model.config.to_dict())
    config.architectures = ["Gemma3nForConditionalGeneration"]
    config.save_pretrained(directory)
    tensors = {"model.language_model." + name.removeprefix("model."): tensor.contiguous()
               for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    save_placeholder_tokenizer(directory, model.config.vocab_size)


def token_text(ids: list[int]) -> str:
    """Text that the placeholder tokenizer encodes to exactly ``ids``."""
    return " ".join(token_name(i) for i in ids)


def token_name(token_id: int) -> str:
    return next((name for name, i in SPECIAL_TOKEN_IDS.items() if i == token_id), f"<t{token_id}>")


def save_placeholder_tokenizer(directory: Path, vocab_size: int) -> None:
    """A random-weight model has no tokenizer; a .litertlm needs one that can decode every id the
    model may generate. One word per id (Gemma's special tokens by name, the rest ``<tN>``),
    split on spaces: ``token_text`` then writes any token sequence as text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from .chat import GEMMA_CHAT_TEMPLATE

    tokenizer = Tokenizer(models.WordLevel({token_name(i): i for i in range(vocab_size)}, unk_token="<t3>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(Path(directory) / "tokenizer.json"))
    names = {"pad_token": token_name(PAD_ID), "eos_token": token_name(EOS_ID), "bos_token": token_name(BOS_ID)}
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps(
        dict(names, tokenizer_class="PreTrainedTokenizerFast", chat_template=GEMMA_CHAT_TEMPLATE)))


def run_in_venv(venv: Path, *arguments) -> dict:
    """``python -m gemma3n_executorch.litertlm ARGUMENTS`` under ``venv``; its progress goes to
    our stderr, its last stdout line is its JSON result."""
    command = [str(python(venv)), "-m", "gemma3n_executorch.litertlm", *map(str, arguments)]
    # TensorFlow's and LiteRT's C++ INFO lines (hundreds per run) would bury bench.py's progress.
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY), TF_CPP_MIN_LOG_LEVEL="1")
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=environment, cwd=REPOSITORY)
    if completed.returncode != 0:
        raise RuntimeError(f"litertlm {arguments[0]} failed (exit {completed.returncode})")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def convert(venv: Path, checkpoint: Path, output: Path, config: str, prefill_len: int, cache_len: int) -> None:
    result = run_in_venv(venv, "convert", checkpoint, output, RECIPES[config], prefill_len, cache_len)
    log(f"   litert-torch export_hf: {result['seconds']:.0f} s")


def bench(venv: Path, litertlm: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int,
          cache_len: int) -> dict:
    """LiteRT-LM's benchmark on ``prompt``, once after loading and ``repeats`` times more (each run
    loads the engine anew; it caches XNNPACK's packed weights beside the file after the first),
    then its greedy tokens after the same prompt. LiteRT-LM starts every prompt with the start
    token itself, so the text leaves out the prompt's own BOS."""
    if prompt[0] != BOS_ID:
        raise ValueError("the prompt must start with BOS, which LiteRT-LM adds itself")
    return run_in_venv(venv, "benchmark", litertlm, token_text(prompt[1:]), len(prompt), new_tokens, threads,
                       repeats + 1, cache_len)


# ---- under LiteRT's environment ----

def _stand_in_towers() -> None:
    """litert-torch builds the whole multimodal model, whose vision tower needs timm and
    torchvision (whose PyPI wheel does not load beside the CPU torch); the text export never
    traces the towers, so parameter-free modules stand in for them and their embedders."""
    from torch import nn
    from transformers.models.gemma3n import modeling_gemma3n

    class StandIn(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

    real = modeling_gemma3n.AutoModel

    class AutoModel:
        @staticmethod
        def from_config(config, **kwargs):
            if config.model_type in ("gemma3n_vision", "gemma3n_audio"):
                return StandIn()
            return real.from_config(config, **kwargs)

    modeling_gemma3n.AutoModel = AutoModel
    modeling_gemma3n.Gemma3nMultimodalEmbedder = StandIn


def _lightweight_everywhere() -> None:
    """litert-torch passes its lightweight-conversion flag to the decoder and the token embedder
    but not to the per-layer embedder, whose table (E2B: 67 M values a layer) then costs several
    fp32 copies of itself in memory; every conversion takes it here."""
    from litert_torch._convert import interface

    convert = interface.Converter.convert

    def lightweight(self, *args, **kwargs):
        kwargs["lightweight_conversion"] = True
        return convert(self, *args, **kwargs)

    interface.Converter.convert = lightweight


def _restore_sparsity_cutoffs() -> None:
    """litert-torch's Gemma 3n patch (0.10.0) computes the sparse MLP layers' cutoff (the normal
    quantile of their 0.95 sparsity, 1.645) into a buffer when the model is constructed, which
    transformers 5 does on the meta device and then leaves that buffer uninitialised (seen:
    3.5e13 and 6.7e-44): those layers' MLPs, and so all logits, came out wrong (relative L2 0.8
    against the same model unpatched). It is computed again once the model is loaded."""
    import torch
    from litert_torch.generative.export_hf.core import export_lib

    load = export_lib.load_model

    def load_model(*args, **kwargs):
        artifacts = load(*args, **kwargs)
        for module in artifacts.model.modules():
            if hasattr(module, "_std_multiplier"):
                sparsity = torch.tensor(module.activation_sparsity, dtype=torch.float32)
                module._std_multiplier = torch.special.ndtri(sparsity)
        return artifacts

    export_lib.load_model = load_model


def _convert_main(checkpoint: str, output: str, recipe: str, prefill_len: int, cache_len: int) -> dict:
    import shutil
    import tempfile

    began = time.perf_counter()
    _stand_in_towers()
    _lightweight_everywhere()
    _restore_sparsity_cutoffs()
    from litert_torch.generative.export_hf import export

    with tempfile.TemporaryDirectory(prefix="litert-export-", dir=Path(output).parent) as work:
        # Its progress and summary go to stdout, where our JSON result goes last.
        stdout = sys.stdout
        sys.stdout = sys.stderr
        try:
            export.export(model=checkpoint, output_dir=work, externalize_embedder=True, prefill_lengths=[prefill_len],
                          cache_length=cache_len, quantization_recipe=recipe, export_vision_encoder=False,
                          export_audio_encoder=False, experimental_lightweight_conversion=True)
        finally:
            sys.stdout = stdout
        (produced,) = Path(work).glob("*.litertlm")
        shutil.move(produced, output)
    return {"seconds": time.perf_counter() - began}


def _benchmark_main(litertlm: str, prompt: str, prefill_len: int, new_tokens: int, threads: int, runs: int,
                    cache_len: int) -> dict:
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    benchmark = litert_lm.Benchmark(
        litertlm, backend=litert_lm.interfaces.CPU(thread_count=threads), prefill_tokens=prefill_len,
        decode_tokens=new_tokens, max_num_tokens=cache_len, prompt=prompt,
        activation_data_type=litert_lm.ActivationDataType.FLOAT32, use_ringbuffers_local_attention=True)
    samples = []
    for run in range(runs):
        info = benchmark.run()
        samples.append({"init_s": info.init_time_in_second, "ttft_s": info.time_to_first_token_in_second,
                        "prefill_tokens": info.last_prefill_token_count,
                        "prefill_tok_s": info.last_prefill_tokens_per_second,
                        "decode_tokens": info.last_decode_token_count,
                        "decode_tok_s": info.last_decode_tokens_per_second})
        log(f"   run {run + 1}/{runs}: {json.dumps(samples[-1])}")
    return {"samples": samples, "greedy_tokens": _greedy(litert_lm, litertlm, prompt, new_tokens, threads, cache_len),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _greedy(litert_lm, litertlm: str, prompt: str, new_tokens: int, threads: int, cache_len: int) -> list[int]:
    """LiteRT-LM's own greedy continuation of ``prompt`` (its sampler at top-k 1; it stops early
    at a stop token). Its API gives out text and per-token scores, not logits: the tokens are
    what can be held against eager."""
    engine = litert_lm.Engine(litertlm, backend=litert_lm.interfaces.CPU(thread_count=threads),
                              max_num_tokens=cache_len, activation_data_type=litert_lm.ActivationDataType.FLOAT32)
    session = engine.create_session(apply_prompt_template=False, sampler_config=litert_lm.SamplerConfig(top_k=1),
                                    max_output_tokens=new_tokens)
    session.run_prefill([prompt])
    texts = session.run_decode().texts
    return engine.tokenize(texts[0]) if texts else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LiteRT's side of bench.py's litertlm peer (run under its venv)")
    commands = parser.add_subparsers(dest="command", required=True)
    converting = commands.add_parser("convert")
    converting.add_argument("checkpoint")
    converting.add_argument("output")
    converting.add_argument("recipe")
    converting.add_argument("prefill_len", type=int)
    converting.add_argument("cache_len", type=int)
    timing = commands.add_parser("benchmark")
    timing.add_argument("litertlm")
    timing.add_argument("prompt")
    for name in ("prefill_len", "new_tokens", "threads", "runs", "cache_len"):
        timing.add_argument(name, type=int)
    args = vars(parser.parse_args(argv))
    body = {"convert": _convert_main, "benchmark": _benchmark_main}[args.pop("command")]
    print(json.dumps(body(**args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
