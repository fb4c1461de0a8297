"""The staged export pipeline (load, patch, quantize, export, lower, serialize) and its CLI.

``e2b/export.py`` and ``e4b/export.py`` call ``main(variant)``. Arguments and paths are checked
before torch, transformers and executorch are imported, so bad input fails at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from pathlib import Path

from . import preflight, slicing
from .options import (ATTENTION_KERNELS, BACKENDS, DEFAULT_GROUP_SIZE, DEFAULT_MAX_CONTEXT_LENGTH, DEFAULT_MAX_SEQ_LENGTH,
                      DEFAULT_SEQ_LEN, DTYPES, EMBEDDING_SCHEMES, FIXED, KV, KV_CACHE_DTYPES, LINEAR_SCHEMES,
                      MODE_DEFAULTS, MODES, PER_CHANNEL, XNNPACK_GROUP_MULTIPLE, ExportOptions, resolve)
from .progress import StageTimer, UserError, gib, human_bytes, log, peak_rss_bytes, release_freed_memory, run_cli
from .variants import TINY_MODEL, TRAINED_MODEL, Variant

TOKENIZER_SUFFIX = ".tokenizer.json"
CHAT_TEMPLATE_SUFFIX = ".chat_template.jinja"


def tokenizer_path_for(pte: Path) -> Path:
    return pte.with_name(pte.stem + TOKENIZER_SUFFIX)


def chat_template_path_for(pte: Path) -> Path:
    return pte.with_name(pte.stem + CHAT_TEMPLATE_SUFFIX)


def default_output(variant: Variant, options: ExportOptions) -> Path:
    parts = [variant.output_stem(options.model)]
    if options.matformer_slice is not None:
        parts.append(f"slice-{options.matformer_slice.name}")
    if options.mode == KV:
        parts.append("kv")
    if options.quantize != "none":
        parts.append(options.quantize)
    if options.quantize == "8da4w" and options.group_size != DEFAULT_GROUP_SIZE:
        parts.append(f"g{options.group_size}")
    if options.embeddings != "none":
        parts.append(f"emb{options.embeddings}")
    if options.mode == KV and options.kv_cache != MODE_DEFAULTS[KV]["kv_cache"]:
        parts.append(f"kv{options.kv_cache}")
    if options.mode == KV and options.attention_kernel != ATTENTION_KERNELS[0]:
        parts.append(f"attn{options.attention_kernel}")
    if options.backend != "portable":
        parts.append(options.backend)
    return Path("-".join(parts) + ".pte")


def prepare(model, options: ExportOptions, timer: StageTimer, weights=None):
    """Patch, wrap and quantize an eager model (whose weights ``weights`` reads, when it was built
    without them): the module that gets exported."""
    import patches

    from . import checkpoint, lowering, quantize, tasks

    with timer.stage("patch"):
        applied = patches.apply(model)
        log(f"  runtime fixes in force: {', '.join(applied) or 'none needed'}")
    with timer.stage("quantize"):  # before wrapping: the KV caches take the export dtype
        quantize.apply(model, options.quantize, options.embeddings, options.group_size,
                       checkpoint.TORCH_DTYPES[options.dtype], weights or quantize.HeldWeights)
    if options.mode == FIXED:
        module = tasks.FixedWindowLM(model, options.seq_len).eval()
    else:
        module = tasks.KVCacheLM(model, options.seq_len, options.context_len, options.kv_cache,
                                 options.attention_kernel).eval()
    lowering.prepare_for_backend(module, options.backend)
    return module


def export_program(variant: Variant, options: ExportOptions, output: Path, timer: StageTimer | None = None,
                   verbose: bool = False, loaded=None) -> dict:
    """Run every stage and write ``output``; return the summary figures. The model is consumed:
    quantized in place, then released (``loaded.model`` becomes None) as soon as the program holds
    its weights, so that an export never holds both whole."""
    from . import lowering, lowering_shortcuts, stored_weights
    from .metadata import ProgramInfo

    timer = timer or StageTimer()
    if loaded is None:
        with timer.stage("load"):  # the weights are read as the quantize stage reaches them
            loaded = stored_weights.load(options.model, variant, options.matformer_slice)
    parameters = loaded.num_parameters
    log(f"  {parameters / 1e6:.1f} M text parameters from {loaded.source}")
    options = fit_context(options, loaded.config)
    module = prepare(loaded.model, options, timer, loaded.weights)
    info = ProgramInfo(
        variant=variant.name, source=loaded.source, mode=options.mode, seq_len=options.seq_len,
        context_len=options.context_len, kv_cache=options.kv_cache, attention_kernel=options.attention_kernel,
        vocab_size=loaded.config.vocab_size, dtype=options.dtype, quantize=options.quantize,
        embeddings=options.embeddings, group_size=options.group_size, backend=options.backend,
        matformer_slice=options.matformer_slice.spec(loaded.config) if options.matformer_slice else "none",
    )
    kv_cache_bytes = module.kv_cache_bytes() if options.mode == KV else 0
    if kv_cache_bytes > PHONE_KV_CACHE_BYTES:
        log(f"  warning: the KV cache alone takes {human_bytes(kv_cache_bytes)} for {options.context_len} positions; "
            f"phone apps are killed at a few GB in all: pass --kv-cache int8 or a smaller --max-context-length")
    with timer.stage("export"):
        exported = lowering.export(module, module.example_inputs(), module.dynamic_shapes())
    initialized_buffers = module.initialized_buffers
    del module
    loaded.model = None  # the exported program holds the weights now; the delegates will hold them next
    # Weights this export read from files are held by nothing else: each is freed once serialized.
    releasing = (lowering_shortcuts.releasing(exported, frozenset(loaded.weights.mapped)) if loaded.weights is not None
                 else contextlib.nullcontext())
    with lowering_shortcuts.constants_on_disk(existing_directory_of(output)) as on_disk:
        with timer.stage("lower"), lowering_shortcuts.enabled() as shortcuts, releasing:
            edge, delegation = lowering.delegate(exported, options.backend, info.constant_methods(), verbose)
            del exported
            release_freed_memory()  # what the delegates took (the quantized weights: E2B's 5 GB) is free now
            program = lowering.emit(edge, options.embeddings != "none", initialized_buffers)
            del edge
            released, on_disk_bytes = shortcuts["weight bytes released"], shortcuts["constant bytes kept on disk"]
        if released:
            phases = ", ".join(f"{human_bytes(shortcuts[f'weight bytes released {phase}'])} once {phase}"
                               for phase in lowering_shortcuts.RELEASE_PHASES)
            log(f"  {human_bytes(released)} of weights freed as soon as the program held them ({phases})")
        if on_disk_bytes:
            log(f"  {human_bytes(on_disk_bytes)} of the program's constants kept on disk until it is written")
        with timer.stage("serialize"):
            tokenizer, template = companion_files(loaded)
            lowering.write_together({
                output: on_disk.writing(program.write_to_file),
                tokenizer_path_for(output): writer(tokenizer),
                chat_template_path_for(output): writer(template),
            })
            size = output.stat().st_size
    if tokenizer is None:
        log(f"  warning: {loaded.directory} has no tokenizer.json; none written beside the program")
    return {
        "output": str(output), "bytes": size, "parameters": parameters,
        "kv_cache_bytes": kv_cache_bytes, "planned_bytes": lowering.planned_bytes(program),
        "delegation": {k: v for k, v in delegation.items() if k != "table"},
        "tokenizer": str(tokenizer_path_for(output)) if tokenizer is not None else None, "peak_rss_bytes": peak_rss_bytes(),
        "seconds": dict(timer.seconds), "total_seconds": timer.total, "released_bytes": released,
        "constant_bytes_on_disk": on_disk_bytes,
    }


def existing_directory_of(output: Path) -> Path:
    """Where the program's scratch file goes: the output's directory, or the nearest of its parents
    that exists yet (write_together makes the rest), so on the output's file system."""
    return next(directory for directory in output.absolute().parents if directory.is_dir())


# A warning, not a refusal: a tablet or a desktop may have the memory. fp32 E2B at 32768 positions: 0.58 GB.
PHONE_KV_CACHE_BYTES = 512 * 2**20


def fit_context(options: ExportOptions, config) -> ExportOptions:
    """The context may not exceed what the model's rotary tables were trained for: defaults that
    do not fit the model become the model's own limit; a flag that does not is refused."""
    limit = config.max_position_embeddings
    if options.mode != KV or options.context_len <= limit:
        return options
    if not options.context_is_default:
        raise UserError(f"--max-context-length {options.context_len} exceeds the model's max_position_embeddings "
                        f"{limit}; pass at most {limit}")
    seq_len = options.seq_len
    if seq_len > limit:
        if not options.seq_len_is_default:
            raise UserError(f"--max-seq-length {seq_len} exceeds the model's max_position_embeddings {limit}; "
                            f"pass at most {limit}")
        seq_len = limit
    log(f"  max_context_length {limit}, max_seq_length {seq_len}: the model's max_position_embeddings is "
        f"{limit}, fewer than the default {options.context_len}")
    return dataclasses.replace(options, context_len=limit, seq_len=seq_len)


def companion_files(loaded) -> tuple[bytes | None, str | None]:
    """The tokenizer.json and chat template to put beside the program, where generate.py and the
    runner look; None for what the checkpoint does not ship."""
    if loaded.directory is None:
        from .tiny_tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer

        return build_tiny_tokenizer().to_str().encode(), CHAT_TEMPLATE
    from .chat import checkpoint_chat_template

    source = loaded.directory / "tokenizer.json"
    return (source.read_bytes() if source.is_file() else None), checkpoint_chat_template(loaded.directory)


def writer(content: bytes | str | None):
    if content is None:
        return None
    data = content.encode() if isinstance(content, str) else content
    return lambda file: file.write(data)


def parse_args(variant: Variant, argv: list[str] | None) -> tuple[ExportOptions, Path, bool, Path | None]:
    parser = argparse.ArgumentParser(
        prog=f"{variant.key}/export.py", allow_abbrev=False,  # a prefix of a renamed flag must not pass for it
        description=f"Export the Gemma 3n {variant.name} text decoder to an ExecuTorch .pte program.",
    )
    parser.add_argument("--model", default=variant.hub_id,
                        help=f"hub id or local checkpoint directory (default {variant.hub_id}); "
                             f"'{TINY_MODEL}' builds a random-weight tiny model offline, '{TRAINED_MODEL}' (E2B only) loads "
                             "the small trained model that comes with the project")
    parser.add_argument("--output", type=Path, help="where to write the .pte (default: named after the options)")
    parser.add_argument("--mode", choices=MODES, default=FIXED,
                        help="fixed: stateless fixed-window forward; kv: KV-cache program for generation")
    kv, fixed = MODE_DEFAULTS[KV], MODE_DEFAULTS[FIXED]
    parser.add_argument("--dtype", choices=DTYPES, help=f"default: fixed {fixed['dtype']}, kv {kv['dtype']}")
    parser.add_argument("--quantize", choices=LINEAR_SCHEMES,
                        help="linear layers: int8 weight-only (portable), or int8 dynamic activations x int4 "
                             f"grouped weights (8da4w, XNNPACK); default: fixed {fixed['quantize']}, kv {kv['quantize']}")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                        help=f"8da4w: weights per int4 scale along the input, a multiple of {XNNPACK_GROUP_MULTIPLE} "
                             f"(default {DEFAULT_GROUP_SIZE}); "
                             f"{PER_CHANNEL}: one scale per output channel, faster and coarser")
    parser.add_argument("--quantize-embeddings", choices=EMBEDDING_SCHEMES,
                        help="token embedding, per-layer embedding table and tied lm_head: 8-bit or 4-bit "
                             f"(XNNPACK); default: fixed {fixed['embeddings']}, kv {kv['embeddings']}")
    parser.add_argument("--backend", choices=BACKENDS,
                        help=f"portable kernels, or XNNPACK delegation; default: fixed {fixed['backend']}, kv {kv['backend']}")
    parser.add_argument("--verbose", action="store_true", help="list the operators left outside the backend")
    parser.add_argument("--seq-len", type=int, help=f"fixed mode: window length (default {DEFAULT_SEQ_LEN})")
    parser.add_argument("--max-seq-length", type=int,
                        help=f"kv mode: the most tokens one call takes; longer prompts are fed in chunks of it "
                             f"(default {DEFAULT_MAX_SEQ_LENGTH})")
    parser.add_argument("--max-context-length", type=int,
                        help=f"kv mode: positions the cache holds, prompt + generated (default "
                             f"{DEFAULT_MAX_CONTEXT_LENGTH}, the model's own limit)")
    parser.add_argument("--kv-cache", choices=KV_CACHE_DTYPES,
                        help=f"kv mode: the cache's precision (default {kv['kv_cache']})")
    parser.add_argument("--attention-kernel", choices=ATTENTION_KERNELS,
                        help="kv mode: what runs the attention: ExecuTorch's own kernel, which every ExecuTorch "
                             "runtime has, or this project's, which reads each KV head once and a sliding ring only "
                             "where a token sees it (much faster with an int8 or fp16 cache) and which the app must "
                             "link (README, 'Attention kernels'); "
                             f"default {ATTENTION_KERNELS[0]}")
    if variant.matformer:
        add_slice_arguments(parser)
    parser.add_argument("--max-seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_seq_len is not None:
        parser.error(f"--max-seq-len is gone: for the positions the cache holds, what it meant, pass "
                     f"--max-context-length {args.max_seq_len}; --max-seq-length now sets the tokens one call takes")
    length = args.seq_len if args.mode == FIXED else args.max_seq_length
    if (length is not None and length < 2) or (args.max_context_length is not None and args.max_context_length < 2):
        parser.error("--seq-len, --max-seq-length and --max-context-length must be at least 2")
    try:
        options = resolve(args.mode, args.dtype, args.quantize, args.quantize_embeddings, args.backend,
                          args.group_size, args.model, length, args.max_context_length, args.kv_cache,
                          args.attention_kernel)
        cut = slicing.request(args.slice, args.slice_ffn, args.skip_layers) if variant.matformer else None
    except ValueError as error:
        parser.error(str(error))
    save_slice = getattr(args, "save_slice", None)
    if save_slice is not None and cut is None:
        parser.error("--save-slice writes a slice: say which with --slice, or --slice-ffn and --skip-layers")
    options = dataclasses.replace(options, matformer_slice=cut)
    return options, args.output or default_output(variant, options), args.verbose, save_slice


def add_slice_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(slicing.published_slices())
    parser.add_argument("--slice", help=f"export a smaller model nested in this one (MatFormer, Mix-n-Match): one of "
                                        f"Google's published configurations: {names} (README, 'Choosing a size')")
    parser.add_argument("--slice-ffn", metavar="WIDTHS",
                        help="a custom slice: the MLP width of each kept layer, comma-separated (one value: all layers)")
    parser.add_argument("--skip-layers", metavar="LAYERS",
                        help="a custom slice: layers to drop, comma-separated (only KV-sharing layers and those before "
                             "them that no sharing layer reads)")
    parser.add_argument("--save-slice", type=Path, metavar="DIR",
                        help="write the slice as a Hugging Face checkpoint in DIR (to evaluate or fine-tune it "
                             "elsewhere, or export it later) instead of a program")


def describe_quantization(options: ExportOptions) -> str:
    group = ""
    if options.quantize == "8da4w":
        group = " (per channel)" if options.group_size == PER_CHANNEL else f" (group {options.group_size})"
    return f"quantize {options.quantize}{group}, embeddings {options.embeddings}"


def main(variant: Variant, argv: list[str] | None = None) -> int:
    options, output, verbose, save_slice = parse_args(variant, argv)
    if save_slice is not None:
        return run_cli(lambda: save_slice_checkpoint(variant, options, save_slice))
    return run_cli(lambda: export_and_report(variant, options, output, verbose))


def save_slice_checkpoint(variant: Variant, options: ExportOptions, directory: Path) -> int:
    """The slice as a Hugging Face checkpoint directory, with the source's tokenizer files."""
    import shutil
    import tempfile

    from . import stored_weights

    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"--save-slice {directory}: exists and is not an empty directory; pass a new directory")
    parent = directory.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--save-slice {directory}: cannot create it in {parent}; choose a writable location")
    if options.model != TINY_MODEL:
        preflight.local_checkpoint(options.model)
    timer = StageTimer()
    with timer.stage("load"):  # the slice is cut from each tensor as it is read: the full model is never held
        loaded = stored_weights.load(options.model, variant, options.matformer_slice)
        if loaded.weights is not None:
            loaded.weights.fill_(loaded.model)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.resolve().parent))
    try:
        with timer.stage("save"):
            loaded.model.save_pretrained(staging)
            tokenizer, template = companion_files(loaded)
            if tokenizer is not None:
                (staging / "tokenizer.json").write_bytes(tokenizer)
            if template is not None:
                (staging / "chat_template.jinja").write_text(template)
            for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json"):
                if loaded.directory is not None and (loaded.directory / name).is_file():
                    shutil.copyfile(loaded.directory / name, staging / name)
        if directory.exists():
            directory.rmdir()
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote the {options.matformer_slice.name} slice of {loaded.source} to {directory} "
        f"({loaded.num_parameters / 1e6:.1f} M text parameters, {loaded.config.num_hidden_layers} layers) "
        f"in {timer.total:.1f} s; peak memory {gib(peak_rss_bytes())}")
    return 0


def export_and_report(variant: Variant, options: ExportOptions, output: Path, verbose: bool) -> int:
    preflight.check_output(output)
    if options.model != TINY_MODEL:
        preflight.local_checkpoint(options.model)
    log(f"exporting Gemma 3n {variant.name} ({options.model}) -> {output}: mode {options.mode}, "
        f"{options.dtype}, {describe_quantization(options)}, backend {options.backend}, "
        + (f"max_seq_length {options.seq_len}, max_context_length {options.context_len}, "
           f"{options.kv_cache} KV cache, {options.attention_kernel} attention kernel" if options.mode == KV else f"seq_len {options.seq_len}"))
    summary = export_program(variant, options, output, verbose=verbose)
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in summary["seconds"].items())
    log(f"wrote {output} ({human_bytes(summary['bytes'])}) in {summary['total_seconds']:.1f} s [{stages}]; "
        f"peak memory {gib(summary['peak_rss_bytes'])}")
    if options.backend != "portable":
        delegation = summary["delegation"]
        log(f"  {options.backend}: {delegation['delegated']} operators delegated in {delegation['subgraphs']} "
            f"subgraphs, {delegation['outside']} outside (--verbose lists them)")
    if summary["kv_cache_bytes"]:
        log(f"  KV cache: {human_bytes(summary['kv_cache_bytes'])} for {options.context_len} positions")
    log(f"  planned memory: {human_bytes(summary['planned_bytes'])} "
        f"({human_bytes(summary['planned_bytes'] - summary['kv_cache_bytes'])} of activations)")
    if summary["tokenizer"]:
        log(f"  tokenizer: {summary['tokenizer']}")
    return 0
