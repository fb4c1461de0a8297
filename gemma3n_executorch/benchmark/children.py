"""The jobs a run hands to child processes, one job each, so that each export and each
measurement's peak memory is its own: spawn() starts one, and its result comes back as JSON."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..progress import log, memory_status, peak_rss_bytes
from ..variants import BOS_ID, BUILT_IN_MODELS, VARIANTS
from .configs import EAGER, build_model, model_config, parse_config, prompt_tokens


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


def long_context(program, args) -> dict:
    """One prefill of --long-prompt tokens into an empty cache, then decode speed at each of
    --depths that fits the program's context: the cache is filled, chunk by chunk, from where the
    last measurement left it to the next depth, and --new-tokens are decoded greedily there."""
    from ..parity import probe_tokens

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


def children_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def child_export(args) -> dict:
    """A random model is written as a checkpoint first and exported from the files, as a user's
    checkpoint is (the weights read as they are quantized, a slice cut as read): the export's
    peak memory is then a user's, not that of a model built whole in memory."""
    from .. import checkpoint, exporter, slicing, stored_weights

    options = parse_config(args.config, args.model, args.max_seq_length, args.max_context_length)
    variant = VARIANTS[args.variant]
    if args.model in BUILT_IN_MODELS:
        loaded = checkpoint.LoadedModel(build_model(args, None), args.model, None)
        if options.matformer_slice is not None:
            slicing.apply(loaded, options.matformer_slice)
        summary = exporter.export_program(variant, options, Path(args.output), loaded=loaded)
    else:
        config = model_config(args)
        with stored_weights.random_model_from_files(Path(args.output).with_suffix(".checkpoint"), variant, config,
                                                    options.matformer_slice,
                                                    f"random {args.variant} ({config['num_hidden_layers']} layers)") as loaded:
            summary = exporter.export_program(variant, options, Path(args.output), loaded=loaded)
    return {"pte_bytes": summary["bytes"], "export_s": summary["total_seconds"],
            "export_peak_rss_bytes": summary["peak_rss_bytes"], "parameters": summary["parameters"],
            "kv_cache_bytes": summary["kv_cache_bytes"], "planned_bytes": summary["planned_bytes"],
            "delegation": summary["delegation"], "export_stages_s": summary["seconds"]}


def child_run_program(args) -> dict:
    from ..runtime import Program

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

    from .. import parity

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


def child_export_llamacpp(args) -> dict:
    """The same weights as a Hugging Face checkpoint, then llama.cpp's bf16 GGUF, then its Q4_0."""
    from .. import llamacpp

    began, output = time.perf_counter(), Path(args.output)
    checkpoint, bf16 = output.with_suffix(".hf"), output.with_suffix(".bf16.gguf")
    llamacpp.write_random_checkpoint(checkpoint, model_config(args))  # check_llama_cpp: the random model only
    llamacpp.convert(args.llama_cpp, checkpoint, bf16)
    shutil.rmtree(checkpoint)
    llamacpp.quantize(args.llama_cpp, bf16, output)
    bf16.unlink()
    return {"pte_bytes": output.stat().st_size, "export_s": time.perf_counter() - began,
            "export_peak_rss_bytes": max(peak_rss_bytes(), children_peak_rss_bytes())}


def child_run_llamacpp(args) -> dict:
    from .. import llamacpp

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


def child_export_litertlm(args) -> dict:
    """The same weights as a multimodal-layout checkpoint, then litert-torch's .litertlm."""
    import gc

    from .. import litertlm

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


def child_run_litertlm(args) -> dict:
    """LiteRT-LM's benchmark (prompt of bench.py's tokens, first run after loading, then --repeats
    more), then its greedy tokens after the same prompt, for the quality job."""
    import torch

    from .. import litertlm

    vocab_size = model_config(args)["vocab_size"]
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


CHILDREN = {"export": child_export, "run-program": child_run_program, "run-eager": child_run_eager,
            "quality": child_quality, "export-llamacpp": child_export_llamacpp, "run-llamacpp": child_run_llamacpp,
            "export-litertlm": child_export_litertlm, "run-litertlm": child_run_litertlm}

# A child is the benchmark itself, re-run with --child: through its entry script, which puts this
# repository on sys.path wherever the run was started from.
ENTRY_POINT = Path(__file__).resolve().parents[2] / "bench.py"


def spawn(job: str, args, **extra) -> dict:
    """Run one job in a fresh interpreter; its progress goes to our stderr, its result comes back."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, str(ENTRY_POINT), "--child", job, "--result", result.name, "--variant", args.variant,
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
