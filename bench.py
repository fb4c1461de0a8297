"""Benchmark exported KV-cache programs against eager PyTorch, on random-weight Gemma 3n models of
the real architecture (gemma3n_executorch/architectures/), in one run on one machine.

    python bench.py --variant e2b [--layers N] [--configs LIST] [--prompt-len 128] [--new-tokens 128]
                    [--repeats 3] [--json OUT.json] [--model tiny]

A configuration is a name made of export options joined by '-': a backend (portable, xnnpack),
a dtype (fp32, bf16), a linear scheme (int8, 8da4w), an embedding scheme (emb8w, emb4w), a
group size (g32), a KV cache precision (kvfp32, kvint8), the positions the cache holds (ctx4096)
and the tokens one call takes (chunk256); quantization not named is off (the KV cache fp32), the dtype defaults to
fp32, the backend to what the quantization needs (xnnpack for 8da4w and quantized embeddings,
else portable), the lengths to --max-context-length and --max-seq-length. 'phone' is the --mode
kv default recipe, and a name starting 'phone-' overrides some of it ('phone-kvfp32').
With no --configs: the eager baselines and 'phone'.

Long context: --long-prompt N also times one prefill of N tokens (in calls of the program's
max_seq_length), and --depths D1,D2,... the decode speed after D tokens in the cache (programs
and llama.cpp, whose llama-bench -d fills its cache the same way; not eager). Each run records
this machine's memory read bandwidth (a short probe), so decode can be set against its floor.
'llamacpp-q4_0' is the peer: llama.cpp's Q4_0 of the same weights, timed by llama-bench (needs
--llama-cpp, a llama.cpp tree with its tools built, and the full-depth random model).
'litertlm-int8' and 'litertlm-int4' are Google's LiteRT-LM on the same weights, converted by
litert-torch and timed by LiteRT-LM's benchmark (need --litert-lm, an environment with LiteRT's
tools; any depth whose conversion fits in memory); its API gives out tokens, not logits, so its
records have top-1 agreement and no relative L2 (docs/benchmarks.md).

--keep-programs keeps the programs in --work-dir and reuses them in a later run of the same commit
and arguments; with --export-only a run only exports (so exports can run while the machine is
busy, and the timing later, alone: the export records then say what they were measured beside).

Memory as a phone app pays it: --memory-probe also runs every program through ExecuTorch's stock
runner (TextLLMRunner), as it loads it and with the random-access advice the README gives apps,
and through this project's runtime, each in a process that cannot mlock (as an Android app
cannot), on a prompt of --probe-prompt random ids over the whole vocabulary (default: the context
less --new-tokens) with --new-tokens decoded after it; each record gets a "memory" entry per
probe (gemma3n_executorch/memory_probe.py says what is measured, docs/make_memory.py tables it).

Every export and every measurement runs in its own process, so peak memory is its own. Each
record: pte_bytes, load_s, prefill_tok_s (the mean of --repeats warm prefills, as llama-bench
times them), prefill_first_tok_s and ttft_s (the first prefill after loading), decode_tok_s, run_peak_rss_bytes,
export_peak_rss_bytes, export_s, and the logit error against eager fp32 on the same tokens
(teacher-forced: relative L2 and top-1 agreement). Eager baselines (``eager-fp32``,
``eager-bf16``) run the Hugging Face model with its own KV cache, on the same weights. For
llama.cpp, pte_bytes is the .gguf's size, and load time and logit error are not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemma3n_executorch.options import (BACKENDS, DEFAULT_GROUP_SIZE, DEFAULT_MAX_CONTEXT_LENGTH,  # noqa: E402
                                        DEFAULT_MAX_SEQ_LENGTH, DTYPES, EMBEDDING_SCHEMES, KV, KV_CACHE_DTYPES,
                                        LINEAR_SCHEMES, MODE_DEFAULTS, resolve)
from gemma3n_executorch.litertlm import RECIPES as LITERT_LM_CONFIGS  # noqa: E402
from gemma3n_executorch.progress import UserError, log, memory_status, peak_rss_bytes  # noqa: E402
from gemma3n_executorch.variants import BOS_ID, TINY_MODEL, VARIANTS  # noqa: E402

EAGER = {"eager-fp32": "fp32", "eager-bf16": "bf16"}
PHONE = "phone"  # the --mode kv defaults
LLAMA_CPP = "llamacpp-q4_0"
DEFAULT_CONFIGS = ["eager-fp32", "eager-bf16", PHONE]


def parse_config(name: str, model: str, max_seq_length: int, max_context_length: int):
    """'xnnpack-8da4w-emb4w-g64' -> ExportOptions; 'phone' -> the --mode kv defaults;
    'phone-kvfp32-ctx2048' -> those with the named parts changed."""
    parts = name.split("-")
    if parts[0] == PHONE:
        chosen = dict(dtype=None, quantize=None, embeddings=None, backend=None, kv_cache=None)
        parts = parts[1:]
    else:
        chosen = dict(dtype=None, quantize="none", embeddings="none", backend=None, kv_cache="fp32")
    chosen.update(group_size=DEFAULT_GROUP_SIZE, seq_len=max_seq_length, context_len=max_context_length)
    for part in parts:
        if part in BACKENDS:
            chosen["backend"] = part
        elif part in DTYPES:
            chosen["dtype"] = part
        elif part in LINEAR_SCHEMES:
            chosen["quantize"] = part
        elif part.startswith("emb") and part[3:] in EMBEDDING_SCHEMES:
            chosen["embeddings"] = part[3:]
        elif part.startswith("kv") and part[2:] in KV_CACHE_DTYPES:
            chosen["kv_cache"] = part[2:]
        elif part.startswith("g") and part[1:].isdigit():
            chosen["group_size"] = int(part[1:])
        elif part.startswith("ctx") and part[3:].isdigit():
            chosen["context_len"] = int(part[3:])
        elif part.startswith("chunk") and part[5:].isdigit():
            chosen["seq_len"] = int(part[5:])
        else:
            raise UserError(f"--configs: {part!r} in {name!r} is not a backend {BACKENDS}, dtype {DTYPES}, "
                            f"linear scheme {LINEAR_SCHEMES}, emb{{8w,4w}}, kv{{fp32,int8}}, gN, ctxN or chunkN")
    phone = name.split("-")[0] == PHONE
    if not phone and chosen["backend"] is None and chosen["quantize"] != "8da4w" and chosen["embeddings"] == "none":
        chosen["backend"] = "portable"
    if not phone:
        chosen["dtype"] = chosen["dtype"] or "fp32"
    try:
        return resolve(KV, model=model, **chosen)
    except ValueError as error:
        raise UserError(f"--configs {name}: {error}") from None


def build_model(args, dtype: str | None, attention: str | None = None):
    """The random-weight model in ``dtype``, or with None as a checkpoint would store it (the
    exporter casts it while quantizing, as it does a real checkpoint)."""
    import torch

    from gemma3n_executorch import checkpoint

    variant = VARIANTS[args.variant]
    torch_dtype = dtype and checkpoint.TORCH_DTYPES[dtype]
    if args.model == TINY_MODEL:
        model = checkpoint.build_tiny(variant, torch_dtype or torch.float32)
    else:
        model = checkpoint.build_random(variant, args.layers, torch_dtype, attention or checkpoint.ATTENTION)
    if attention:
        model.set_attn_implementation(attention)
    return model


def prompt_tokens(args, vocab_size: int) -> list[int]:
    from gemma3n_executorch.parity import probe_tokens

    return probe_tokens(args.prompt_len, vocab_size, BOS_ID)


# ---- child processes: one job each, result as JSON in --result ----

def child_export(args) -> dict:
    from gemma3n_executorch import checkpoint, exporter

    options = parse_config(args.config, args.model, args.max_seq_length, args.max_context_length)
    model = build_model(args, None)
    source = TINY_MODEL if args.model == TINY_MODEL else f"random {args.variant} ({model.config.num_hidden_layers} layers)"
    summary = exporter.export_program(VARIANTS[args.variant], options, Path(args.output),
                                      loaded=checkpoint.LoadedModel(model, source, None))
    return {"pte_bytes": summary["bytes"], "export_s": summary["total_seconds"],
            "export_peak_rss_bytes": summary["peak_rss_bytes"], "parameters": summary["parameters"],
            "kv_cache_bytes": summary["kv_cache_bytes"], "planned_bytes": summary["planned_bytes"],
            "delegation": summary["delegation"], "export_stages_s": summary["seconds"]}


def children_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def child_export_llamacpp(args) -> dict:
    """The same weights as a Hugging Face checkpoint, then llama.cpp's bf16 GGUF, then its Q4_0."""
    import gc

    from gemma3n_executorch import llamacpp

    began, output = time.perf_counter(), Path(args.output)
    checkpoint, bf16 = output.with_suffix(".hf"), output.with_suffix(".bf16.gguf")
    model = build_model(args, None)
    llamacpp.save_checkpoint(model, checkpoint)
    del model
    gc.collect()
    llamacpp.convert(args.llama_cpp, checkpoint, bf16)
    shutil.rmtree(checkpoint)
    llamacpp.quantize(args.llama_cpp, bf16, output)
    bf16.unlink()
    return {"pte_bytes": output.stat().st_size, "export_s": time.perf_counter() - began,
            "export_peak_rss_bytes": max(peak_rss_bytes(), children_peak_rss_bytes())}


def child_export_litertlm(args) -> dict:
    """The same weights as a multimodal-layout checkpoint, then litert-torch's .litertlm."""
    import gc

    from gemma3n_executorch import litertlm

    began, output = time.perf_counter(), Path(args.output)
    checkpoint = output.with_suffix(".hf")
    model = build_model(args, None)
    litertlm.save_checkpoint(model, checkpoint)
    del model
    gc.collect()
    litertlm.convert(args.litert_lm, checkpoint, output, args.config, args.max_seq_length, args.max_context_length)
    shutil.rmtree(checkpoint)
    return {"pte_bytes": output.stat().st_size, "export_s": time.perf_counter() - began,
            "export_peak_rss_bytes": max(peak_rss_bytes(), children_peak_rss_bytes())}


def prefill_figures(first_tok_s: float, warm_tok_s: list[float]) -> dict:
    """The record's prefill keys, for programs, eager and llama.cpp alike: the first prefill after
    loading, and the mean of the warm ones after it (llama-bench's protocol)."""
    return {"prefill_first_tok_s": first_tok_s, "prefill_tok_s": sum(warm_tok_s) / len(warm_tok_s),
            "prefill_warm_samples_tok_s": warm_tok_s}


def timed_generation(step, reset, first_token, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """The first prefill after loading, the prompt in one call (``ttft_s``); the same prefill
    ``repeats`` times more into an empty cache, warm, as llama-bench times it (``prefill_tok_s``,
    their mean); then greedy decode after the last one. ``step(tokens) -> last logits``."""
    began = time.perf_counter()
    logits = step(prompt)
    first_token(logits)
    ttft = time.perf_counter() - began
    warm = []
    for _ in range(repeats):
        reset()
        began = time.perf_counter()
        logits = step(prompt)
        warm.append(len(prompt) / (time.perf_counter() - began))
    rows, tokens = [logits], [first_token(logits)]
    began = time.perf_counter()
    for _ in range(new_tokens - 1):
        rows.append(step([tokens[-1]]))
        tokens.append(first_token(rows[-1]))
    decode = time.perf_counter() - began
    return dict(prefill_figures(len(prompt) / ttft, warm), ttft_s=ttft,
                decode_tok_s=(new_tokens - 1) / decode, tokens=tokens, rows=rows)


def save_logits(result: dict, path: str) -> None:
    """Move the generated tokens and logits out of ``result`` to ``path``, for the quality job."""
    import torch

    torch.save({"tokens": result.pop("tokens"), "rows": torch.stack(result.pop("rows")).float()}, path)


def child_run_program(args) -> dict:
    from gemma3n_executorch.runtime import Program

    began = time.perf_counter()
    program = Program(args.output)
    load_s = time.perf_counter() - began
    result = timed_generation(program.step, program.reset, lambda row: int(row.argmax()),
                              prompt_tokens(args, program.info.vocab_size), args.new_tokens, args.repeats)
    save_logits(result, args.logits)
    result.update(long_context(program, args))
    # After decoding: how much of what is resident is the memory-mapped program file, and how much
    # was allocated (XNNPACK's repacked weights, the KV cache, activations, the Python runtime).
    memory = memory_status("RssFile", "RssAnon")
    return dict(result, load_s=load_s, run_peak_rss_bytes=peak_rss_bytes(),
                run_rss_file_bytes=memory["RssFile"], run_rss_anon_bytes=memory["RssAnon"])


def long_context(program, args) -> dict:
    """One prefill of --long-prompt tokens into an empty cache, then decode speed at each of
    --depths that fits the program's context: the cache is filled, chunk by chunk, from where the
    last measurement left it to the next depth, and --new-tokens are decoded greedily there."""
    from gemma3n_executorch.parity import probe_tokens

    figures, context = {}, program.info.context_len
    filler = probe_tokens(max([args.long_prompt or 0, *args.depths, 2]), program.info.vocab_size, BOS_ID)
    if args.long_prompt and args.long_prompt <= context:
        program.reset()
        began = time.perf_counter()
        program.step(filler[:args.long_prompt])
        figures["prefill_long_tok_s"] = args.long_prompt / (time.perf_counter() - began)
        log(f"   prefill of {args.long_prompt} tokens: {figures['prefill_long_tok_s']:.1f} tok/s")
    decode, program_memory = {}, {}
    program.reset()
    for depth in sorted(args.depths):
        if depth + args.new_tokens > context:
            decode[depth] = None
            continue
        logits = program.step(filler[program.position:depth]) if depth > program.position else None
        token = int(logits.argmax()) if logits is not None else BOS_ID
        began = time.perf_counter()
        for _ in range(args.new_tokens):
            token = int(program.step([token]).argmax())
        decode[depth] = args.new_tokens / (time.perf_counter() - began)
        program_memory[depth] = memory_status("RssAnon")["RssAnon"]
        log(f"   decode at depth {depth}: {decode[depth]:.2f} tok/s")
    if args.depths:
        figures.update(decode_at_depth_tok_s=decode, rss_anon_at_depth_bytes=program_memory)
    return figures


def child_run_llamacpp(args) -> dict:
    from gemma3n_executorch import llamacpp

    result = llamacpp.bench(args.llama_cpp, Path(args.output), args.prompt_len, args.new_tokens, os.cpu_count(),
                            args.repeats)
    first, *warm = result.pop("prefill_samples_tok_s")
    if args.long_prompt:
        result["prefill_long_tok_s"] = llamacpp.prefill(args.llama_cpp, Path(args.output), args.long_prompt,
                                                        os.cpu_count())
    if args.depths:
        result["decode_at_depth_tok_s"] = llamacpp.decode_at_depths(args.llama_cpp, Path(args.output), args.depths,
                                                                    args.new_tokens, os.cpu_count())
    return dict(result, **prefill_figures(first, warm), ttft_s=args.prompt_len / first,
                load_s=None, run_peak_rss_bytes=children_peak_rss_bytes())


def child_run_litertlm(args) -> dict:
    """LiteRT-LM's benchmark (prompt of bench.py's tokens, first run after loading, then --repeats
    more), then its greedy tokens after the same prompt, for the quality job."""
    import torch

    from gemma3n_executorch import litertlm

    variant = VARIANTS[args.variant]
    vocab_size = (variant.tiny_config if args.model == TINY_MODEL else variant.real_text_config())["vocab_size"]
    prompt = prompt_tokens(args, vocab_size)
    result = litertlm.bench(args.litert_lm, Path(args.output), prompt, args.new_tokens, os.cpu_count(), args.repeats,
                            args.max_context_length)
    first, *warm = result["samples"]
    torch.save({"tokens": result.pop("greedy_tokens")}, args.logits)
    output = Path(args.output)
    cache_bytes = sum(cache.stat().st_size for cache in output.parent.glob(output.name + "_*.xnnpack_cache"))
    return dict(prefill_figures(first["prefill_tok_s"], [s["prefill_tok_s"] for s in warm]),
                decode_tok_s=sum(s["decode_tok_s"] for s in warm) / len(warm), ttft_s=first["ttft_s"],
                load_s=first["init_s"], run_peak_rss_bytes=result["peak_rss_bytes"],
                litertlm_samples=result["samples"], litertlm_xnnpack_cache_bytes=cache_bytes)


def child_run_eager(args) -> dict:
    """Hugging Face's model with its own KV cache (DynamicCache) and default attention (SDPA)."""
    import torch

    began = time.perf_counter()
    model = build_model(args, EAGER[args.config], attention="sdpa")
    load_s = time.perf_counter() - began
    state = {"cache": None, "position": 0}

    def step(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            output = model(input_ids=torch.tensor([tokens]), past_key_values=state["cache"], use_cache=True,
                           logits_to_keep=1)
        state["cache"] = output.past_key_values
        return output.logits[0, -1]

    def reset() -> None:
        state["cache"] = None

    result = timed_generation(step, reset, lambda row: int(row.argmax()),
                              prompt_tokens(args, model.config.vocab_size), args.new_tokens, args.repeats)
    save_logits(result, args.logits)
    return dict(result, load_s=load_s, run_peak_rss_bytes=peak_rss_bytes(),
                parameters=sum(p.numel() for p in model.parameters()))


def child_quality(args) -> dict:
    """Teacher-forced: eager fp32 logits on each configuration's own prompt + greedy tokens."""
    import torch

    from gemma3n_executorch import parity

    model = build_model(args, "fp32")
    prompt = prompt_tokens(args, model.config.vocab_size)
    errors = {}
    for name, path in json.loads(args.logits).items():
        saved = torch.load(path)
        sequence = prompt + saved["tokens"][:-1]
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0, len(prompt) - 1:]
        if "rows" in saved:
            agreement = parity.compare(saved["rows"], reference)
            errors[name] = {"relative_l2_vs_fp32": agreement.relative_l2, "top1_vs_fp32": agreement.top1}
        else:  # LiteRT-LM gives out its tokens, not its logits: top-1 only
            top1 = (reference.argmax(-1) == torch.tensor(saved["tokens"])).float().mean().item()
            errors[name] = {"relative_l2_vs_fp32": None, "top1_vs_fp32": top1}
    return errors


CHILDREN = {"export": child_export, "run-program": child_run_program, "run-eager": child_run_eager,
            "quality": child_quality, "export-llamacpp": child_export_llamacpp, "run-llamacpp": child_run_llamacpp,
            "export-litertlm": child_export_litertlm, "run-litertlm": child_run_litertlm}


def spawn(job: str, args, **extra) -> dict:
    """Run one job in a fresh interpreter; its progress goes to our stderr, its result comes back."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, __file__, "--child", job, "--result", result.name, "--variant", args.variant,
                   "--model", args.model, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats), "--max-seq-length", str(args.max_seq_length),
                   "--max-context-length", str(args.max_context_length),
                   "--long-prompt", str(args.long_prompt or 0), "--depths", ",".join(map(str, args.depths))]
        if args.layers:
            command += ["--layers", str(args.layers)]
        for key, value in extra.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        completed = subprocess.run(command, stdin=subprocess.DEVNULL)
        if completed.returncode != 0:
            raise RuntimeError(f"bench {job} {extra.get('config', '')} failed (exit {completed.returncode})")
        return json.loads(Path(result.name).read_text())


def parameter_count(args) -> int:
    """Of the random model of the real architecture at --layers (counted without building it)."""
    import torch
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    config = VARIANTS[args.variant].real_text_config(args.layers)
    config.pop("model_type", None), config.pop("torch_dtype", None)
    with torch.device("meta"):
        return sum(p.numel() for p in Gemma3nForCausalLM(Gemma3nTextConfig(**config)).parameters())


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fp32_reference_fits(args) -> bool:
    """Whether the eager fp32 model (baseline and error reference) fits in this machine's memory:
    full-depth E4B (27.5 GB) does not on a 24 GB machine."""
    return args.model == TINY_MODEL or 4 * parameter_count(args) < 0.9 * physical_memory_bytes()


def check_llama_cpp(args) -> None:
    from gemma3n_executorch import llamacpp

    if args.model == TINY_MODEL or args.layers:
        raise UserError(f"{LLAMA_CPP} needs the full-depth random model: llama.cpp's Gemma 3n graph hard-codes the "
                        "published depths; drop --layers and --model tiny")
    if args.llama_cpp is None:
        raise UserError(f"--configs {LLAMA_CPP} needs --llama-cpp DIR, a llama.cpp source tree with "
                        f"{' and '.join(llamacpp.BINARIES)} built; docs/benchmarks.md says how")
    llamacpp.check_tree(args.llama_cpp)


def check_litert_lm(args) -> None:
    from gemma3n_executorch import litertlm

    if args.litert_lm is None:
        raise UserError(f"--configs {', '.join(LITERT_LM_CONFIGS)} need --litert-lm VENV, an environment with "
                        "litert-torch, litert-lm and tensorflow-cpu; docs/benchmarks.md says how to make it")
    litertlm.check_venv(args.litert_lm)
    if args.model != TINY_MODEL:
        litertlm.check_conversion_fits(parameter_count(args), physical_memory_bytes())


# The instruction sets that decide which kernels run: int8 GEMMs without VNNI, with it, bf16 with
# AVX-512 BF16, XNNPACK's AMX int8 kernels. The same 2-core VM type has come as CPUs with and without them.
CPU_FEATURES = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm")


def cpu() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    present = " ".join(feature for feature in CPU_FEATURES if feature in flags)
    return f"{fields.get('model name', 'unknown CPU')} ({present or 'none of ' + ', '.join(CPU_FEATURES)})"


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {cpu()}, {os.cpu_count()} cores, {memory:.0f} GiB, "
            f"{platform.python_implementation()} {platform.python_version()}")


def probe_prompt_tokens(args, context_len: int) -> int:
    """--probe-prompt, or what the context leaves after --new-tokens; refused if they do not fit."""
    tokens = args.probe_prompt or context_len - args.new_tokens
    if tokens + args.new_tokens > context_len:
        raise UserError(f"--probe-prompt {tokens} and --new-tokens {args.new_tokens} need {tokens + args.new_tokens} "
                        f"positions; the program holds {context_len}: lower them or raise --max-context-length")
    return tokens


def memory_probes(args, program: Path, context_len: int, work: Path) -> dict:
    from gemma3n_executorch import memory_probe

    tokens = probe_prompt_tokens(args, context_len)
    figures = {}
    for probe in memory_probe.PROBES:
        log(f"   memory probe {probe}: {tokens}-token prompt, {args.new_tokens} new tokens, mlock unavailable")
        figures[probe] = memory_probe.measure(probe, program, tokens, args.new_tokens, args.probe_step, work)
        last = figures[probe]["phases"][-1]
        log(f"   {probe}: peak {figures[probe]['peak_rss_bytes'] / 2**30:.2f} GiB above the interpreter; after decode "
            f"anon {last['anon'] / 2**30:.2f}, file {last['file'] / 2**30:.2f} GiB; tables resident "
            + ", ".join(f"{name} {value / 1e6:.1f} MB" for name, value in last["tables_resident"].items()))
    return figures


def memory_environment(args) -> dict:
    from gemma3n_executorch import memory_probe

    return dict(memory_probe.environment(Path(args.work_dir or tempfile.gettempdir())), step=args.probe_step)


def source_commit() -> str:
    """The commit the figures come from, '+changes' when the tree differs from it."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+changes" if dirty else "")


def exported(args, name: str, output: Path) -> dict:
    """Export ``name`` to ``output``, or with --keep-programs reuse the program an earlier run left
    there from the same commit and arguments (its export record is kept beside it): exports can
    then run while the machine is busy, and the timing later, on a quiet machine."""
    record_path = output.with_suffix(".export.json")
    key = {"commit": source_commit(), "variant": args.variant, "model": args.model, "layers": args.layers,
           "max_seq_length": args.max_seq_length, "max_context_length": args.max_context_length}
    if args.keep_programs and output.exists() and record_path.exists():
        kept = json.loads(record_path.read_text())
        if kept.pop("key") == key and not key["commit"].endswith("+changes"):
            log(f"   reusing {output} (exported earlier from the same commit and arguments)")
            return kept
    record = spawn("export", args, config=name, output=output)
    if args.keep_programs:
        record_path.write_text(json.dumps(dict(record, key=key)))
    return record


def run_all(args) -> list[dict]:
    records, logits = [], {}
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gemma3n-bench-", dir=args.work_dir) as work:
        for name in args.configs:
            log(f"== {name}")
            saved = str(Path(work) / f"{name}.logits.pt")
            if args.export_only and (name in EAGER or name == LLAMA_CPP or name in LITERT_LM_CONFIGS):
                log("   not one of our programs: converted, if at all, in the timing run")
                continue
            if name in EAGER:
                record = spawn("run-eager", args, config=name, logits=saved)
                record.update(pte_bytes=None, export_s=None, export_peak_rss_bytes=None)
                logits[name] = saved
            elif name == LLAMA_CPP:  # llama-bench reads no logits out: no error columns
                output = Path(work) / f"{name}.gguf"
                record = spawn("export-llamacpp", args, output=output, llama_cpp=args.llama_cpp)
                record.update(spawn("run-llamacpp", args, output=output, llama_cpp=args.llama_cpp))
                output.unlink()
            elif name in LITERT_LM_CONFIGS:
                output = Path(work) / f"{name}.litertlm"
                record = spawn("export-litertlm", args, config=name, output=output, litert_lm=args.litert_lm)
                record.update(spawn("run-litertlm", args, output=output, litert_lm=args.litert_lm, logits=saved))
                logits[name] = saved
                for written in output.parent.glob(output.name + "*"):  # and the XNNPACK cache LiteRT-LM left
                    written.unlink()
            else:
                options = parse_config(name, args.model, args.max_seq_length, args.max_context_length)
                output = Path(args.work_dir if args.keep_programs else work) / f"{name}.pte"
                record = exported(args, name, output)
                if not args.export_only:
                    record.update(spawn("run-program", args, config=name, output=output, logits=saved))
                    logits[name] = saved
                    if args.memory_probe:
                        record["memory"] = memory_probes(args, output, options.context_len, Path(work) / name)
                record["options"] = {k: v for k, v in vars(options).items() if k not in ("model", "mode")}
                if not args.keep_programs:
                    output.unlink()
            records.append(dict(config=name, **record))
            if not args.export_only:
                log(f"   {summary_line(records[-1])}")
        if args.fp32_fits and logits and args.logit_error:
            log("== logit error against eager fp32")
            errors = spawn("quality", args, logits=json.dumps(logits))
        else:
            errors = {}
    for record in records:
        record.update(errors.get(record["config"], {"relative_l2_vs_fp32": None, "top1_vs_fp32": None}))
    return records


def summary_line(record: dict) -> str:
    size = f"{record['pte_bytes'] / 1e9:.3f} GB, " if record.get("pte_bytes") else ""
    return (f"{size}prefill {record['prefill_tok_s']:.1f} tok/s, decode {record['decode_tok_s']:.2f} tok/s, "
            f"ttft {record['ttft_s']:.2f} s, run peak {record['run_peak_rss_bytes'] / 2**30:.2f} GiB")


def depth_list(text: str) -> list[int]:
    depths = [int(d) for d in text.split(",") if d.strip()]
    if any(d < 1 for d in depths):
        raise argparse.ArgumentTypeError("depths must be positive")
    return depths


def read_bandwidth_bytes_s(size: int = 1 << 30, repeats: int = 5) -> float:
    """This machine's memory read bandwidth, with every core reading: the best of a few sums over
    a buffer far larger than any cache (decode's floor is the bytes it reads per token over this)."""
    import torch

    buffer = torch.ones(size // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - began)
    return size / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--layers", type=int, help="cut the real architecture to N layers (default: full depth)")
    parser.add_argument("--model", default="random", choices=["random", TINY_MODEL],
                        help="random: the real architecture with random weights; tiny: the test model (smoke runs)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated (default {','.join(DEFAULT_CONFIGS)}); '{PHONE}' is "
                             f"{'-'.join(v for k, v in MODE_DEFAULTS[KV].items() if k != 'embeddings')}-emb{MODE_DEFAULTS[KV]['embeddings']}")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3,
                        help="after the first prefill (ttft), time it this many times more, warm; prefill tok/s is "
                             "their mean, as llama-bench -r times it (default 3)")
    parser.add_argument("--max-seq-length", type=int, default=DEFAULT_MAX_SEQ_LENGTH,
                        help=f"programs: tokens per call, unless a config says chunkN (default {DEFAULT_MAX_SEQ_LENGTH})")
    parser.add_argument("--max-context-length", type=int, default=DEFAULT_MAX_CONTEXT_LENGTH,
                        help=f"programs: cache positions, unless a config says ctxN (default {DEFAULT_MAX_CONTEXT_LENGTH})")
    parser.add_argument("--long-prompt", type=int, help="also time one prefill of this many tokens (e.g. 4096)")
    parser.add_argument("--depths", type=depth_list, default=[],
                        help="also time decode after this many tokens in the cache, e.g. 128,4096,16384,32000")
    parser.add_argument("--no-logit-error", dest="logit_error", action="store_false",
                        help="skip the error columns: their reference is eager fp32 in memory (18 GB for full-depth "
                             "E2B), and at full depth random weights make them meaningless anyway")
    parser.add_argument("--memory-probe", action="store_true",
                        help="also measure each program's resident memory through ExecuTorch's stock runner and this "
                             "project's runtime with mlock unavailable, as on a phone")
    parser.add_argument("--probe-prompt", type=int,
                        help="--memory-probe: prompt tokens (default: the context less --new-tokens)")
    parser.add_argument("--probe-step", type=int, default=1000,
                        help="--memory-probe: prompt tokens between snapshots (default 1000)")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--work-dir", help="where the programs are written while measured, created if missing "
                                           "(default: the temp dir)")
    parser.add_argument("--keep-programs", action="store_true",
                        help="keep the programs in --work-dir, and reuse the ones an earlier run of the same commit "
                             "and arguments left there (export while the machine is busy, time them when it is quiet)")
    parser.add_argument("--export-only", action="store_true", help="export the programs, time nothing")
    parser.add_argument("--llama-cpp", type=Path, help=f"a llama.cpp source tree with its tools built, for {LLAMA_CPP}")
    parser.add_argument("--litert-lm", type=Path,
                        help=f"a virtual environment with litert-torch, litert-lm and tensorflow-cpu, for "
                             f"{', '.join(LITERT_LM_CONFIGS)}")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prompt_len < 2 or args.new_tokens < 2:
        parser.error("--prompt-len and --new-tokens must be at least 2")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if (args.probe_prompt is not None and args.probe_prompt < 2) or args.probe_step < 1:
        parser.error("--probe-prompt must be at least 2 and --probe-step at least 1")
    if args.child:
        Path(args.result).write_text(json.dumps(CHILDREN[args.child](args)))
        return 0
    if args.keep_programs and not args.work_dir:
        parser.error("--keep-programs needs --work-dir")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    try:
        for name in args.configs:
            if name == LLAMA_CPP:
                check_llama_cpp(args)
            elif name in LITERT_LM_CONFIGS:
                check_litert_lm(args)
            elif name not in EAGER:
                options = parse_config(name, args.model, args.max_seq_length, args.max_context_length)
                if args.memory_probe:
                    probe_prompt_tokens(args, options.context_len)
        if args.memory_probe:
            from gemma3n_executorch.memory_probe import without_mlock

            without_mlock([])  # refuses at once where CAP_IPC_LOCK cannot be dropped
        if args.json:
            from gemma3n_executorch.preflight import check_output

            check_output(args.json, ".json", "--json")
        if args.model != TINY_MODEL:
            VARIANTS[args.variant].real_text_config(args.layers)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.fp32_fits = fp32_reference_fits(args)
    if not args.fp32_fits:
        log(f"eager fp32 {args.variant} does not fit in this machine's memory: no eager-fp32 baseline, "
            "no logit error columns")
        args.configs = [name for name in args.configs if name != "eager-fp32"]
    began = time.perf_counter()
    bandwidth = read_bandwidth_bytes_s()
    log(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    records = run_all(args)
    report = {"variant": args.variant, "model": args.model, "layers": args.layers, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "long_prompt": args.long_prompt, "depths": args.depths,
              "memory_probe": args.memory_probe and memory_environment(args),
              "read_bandwidth_bytes_s": bandwidth, "machine": machine(), "commit": source_commit(), "seconds": time.perf_counter() - began,
              "records": records}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        log(f"wrote {args.json}")
    else:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
