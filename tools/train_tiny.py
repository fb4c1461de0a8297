"""Train the small Gemma 3n behind `--model tiny-trained`, byte for byte reproducibly.

    python tools/train_tiny.py                      # what made gemma3n_executorch/tiny_trained/
    python tools/train_tiny.py --steps 20 --output /tmp/t   # a short run, e.g. to check reproducibility

The corpus is text every machine that runs this has: the source files of the Python standard
library of the interpreter running it, code, docstrings and comments (test packages and the
generated code-page tables of `encodings` left out). Its text differs between Python versions, so
the version is recorded. One file in HELD_OUT_EVERY, chosen by a hash of its path, is never trained
on: those files are the held-out text, written beside the weights as heldout.txt.

The tokenizer is trained first, on the training text, by the project's tokenizer builder; then the
model, with the architecture `variants.VARIANTS["e2b"].trained_config` declares, from Hugging
Face's initialisation under a fixed seed, on fixed-length windows in a seeded order, with a fixed
thread count: the same command on the same kind of CPU and the pinned packages gives the same
bytes (a different CPU's kernels round differently). Writes a Hugging Face checkpoint directory
(config.json, model.safetensors, the tokenizer files) with provenance.json: the sha256 of each
file, which loading checks, and how it was made.
"""

from __future__ import annotations

import os

# Waiting threads sleep instead of spinning: on a busy machine spinning made two threads 7x slower
# than one. It changes only scheduling, not what is computed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import string  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma3n_executorch.progress import StageTimer, gib, log, peak_rss_bytes  # noqa: E402
from gemma3n_executorch.tiny_tokenizer import SPACE, build_tokenizer, write_tokenizer  # noqa: E402
from gemma3n_executorch.variants import (BOS_ID, HELD_OUT_FILE, PROVENANCE_FILE, TRAINED_DIRECTORY, VARIANTS,  # noqa: E402
                                         WEIGHTS_FILE)

THREADS = 2  # results depend on the thread count (how sums are split), so it is fixed
SEED = 0
HELD_OUT_EVERY = 25  # one file in 25, by the hash of its path: about 4% of the text
# Printable ASCII (tab and the rarer control characters aside): everything else is spelled in bytes.
ALPHABET = sorted(set(string.printable.replace(" ", SPACE)) - set("\t\r\x0b\x0c"))

CONTEXT = 256  # tokens per training window, <bos> included: four sliding windows
BATCH = 16
STEPS = 700  # about 30 minutes on an idle 2-core x86 machine (see the README's section on it)
PEAK_LR = 3e-3
FINAL_LR_FRACTION = 0.1
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.1  # on matrices and embeddings; norms and scales are not pulled towards zero
BETAS = (0.9, 0.95)
CLIP_NORM = 1.0
STORED_DTYPE, DTYPE_NAME = torch.bfloat16, "bfloat16"  # as the published checkpoints are stored
CHECKED_FILES = (WEIGHTS_FILE, "config.json", "tokenizer.json", HELD_OUT_FILE)  # their sha256 go in provenance.json
LOG_EVERY = 25
EVAL_WINDOWS = 64  # held-out windows scored at each progress evaluation (all of them at the end)

TEST_DIRECTORIES = {"test", "tests", "idle_test"}
LEFT_OUT_PACKAGES = {"site-packages", "encodings"}  # installed packages; generated character tables


def source_files(stdlib: Path) -> list[tuple[str, str]]:
    """(path relative to ``stdlib``, text) of the corpus's files, in path order."""
    found = []
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix()):
        relative = path.relative_to(stdlib)
        if relative.parts[0] not in LEFT_OUT_PACKAGES and not TEST_DIRECTORIES & set(relative.parts[:-1]):
            found.append((relative.as_posix(), path.read_text(encoding="utf-8")))
    return found


def is_held_out(name: str) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] % HELD_OUT_EVERY == 0


def windows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``length`` - 1 tokens, each after a <bos>."""
    body = ids[: len(ids) // (length - 1) * (length - 1)].view(-1, length - 1)
    return torch.cat([torch.full((len(body), 1), BOS_ID), body], dim=1)


def batches(ids: torch.Tensor, generator: torch.Generator):
    """Endless batches of training windows: each epoch starts the windows at a new offset and
    takes them in a new order."""
    while True:
        offset = int(torch.randint(CONTEXT - 1, (1,), generator=generator))
        epoch = windows(ids[offset:], CONTEXT)
        order = torch.randperm(len(epoch), generator=generator)
        for start in range(0, len(order) - BATCH + 1, BATCH):
            yield epoch[order[start:start + BATCH]]


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to FINAL_LR_FRACTION of the peak."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return PEAK_LR * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def mean_loss(model, data: torch.Tensor) -> float:
    """Mean next-token cross-entropy over every predicted position of ``data``'s windows."""
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in data.split(BATCH):
        total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * chunk.numel()
    model.train(was_training)
    return total / data.numel()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(model, train_ids: torch.Tensor, held_out: torch.Tensor, steps: int) -> dict:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=PEAK_LR, betas=BETAS)
    data = batches(train_ids, torch.Generator().manual_seed(SEED))
    model.train()
    began, cpu_began = time.perf_counter(), time.process_time()
    recent, curve = [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        batch = next(data)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss.item())
        done = step + 1
        if done % LOG_EVERY == 0 or done == steps:
            elapsed = time.perf_counter() - began
            line = (f"  step {done}/{steps}: train loss {sum(recent) / len(recent):.3f}, lr {learning_rate(step, steps):.2e}, "
                    f"{elapsed:.0f} s ({done / elapsed:.2f} steps/s, cpu {time.process_time() - cpu_began:.0f} s), "
                    f"peak {gib(peak_rss_bytes())}")
            if done % (LOG_EVERY * 8) == 0:
                held = mean_loss(model, held_out[:EVAL_WINDOWS])
                curve.append({"step": done, "train_loss": sum(recent) / len(recent), "held_out_loss": held})
                line += f"; held-out loss {held:.3f}"
            log(line)
            recent = []
    return {"seconds": time.perf_counter() - began, "cpu_seconds": time.process_time() - cpu_began, "curve": curve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps (default {STEPS})")
    parser.add_argument("--output", type=Path, default=TRAINED_DIRECTORY,
                        help=f"checkpoint directory to write (default {TRAINED_DIRECTORY})")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    timer = StageTimer()
    variant = VARIANTS["e2b"]

    with timer.stage("corpus"):
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = source_files(stdlib)
        train_text = "\n\n".join(text for name, text in files if not is_held_out(name))
        held_out_names = [name for name, _ in files if is_held_out(name)]
        held_out_text = "\n\n".join(text for name, text in files if is_held_out(name))
        log(f"  {len(files)} files of {stdlib} (Python {platform.python_version()}): "
            f"{len(files) - len(held_out_names)} to train on ({len(train_text)} characters), "
            f"{len(held_out_names)} held out ({len(held_out_text)} characters)")
    with timer.stage("tokenizer"):
        tokenizer = build_tokenizer(train_text.splitlines(keepends=True), variant.trained_config["vocab_size_per_layer_input"],
                                    ALPHABET)
        train_ids = torch.tensor(tokenizer.encode(train_text, add_special_tokens=False).ids)
        held_out = windows(torch.tensor(tokenizer.encode(held_out_text, add_special_tokens=False).ids), CONTEXT)
        log(f"  {tokenizer.get_vocab_size()} pieces; {len(train_ids)} training tokens "
            f"({len(train_text) / len(train_ids):.2f} characters each), {held_out.numel()} held-out tokens")

    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    from gemma3n_executorch import checkpoint

    torch.manual_seed(SEED)
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**variant.trained_config))
    model.set_attn_implementation(checkpoint.ATTENTION)  # the reference the programs are checked against
    parameters = sum(p.numel() for p in model.parameters())
    log(f"  {parameters / 1e6:.2f} M parameters; {args.steps} steps of {BATCH} x {CONTEXT} tokens "
        f"({args.steps * BATCH * CONTEXT / len(train_ids):.2f} epochs)")
    with timer.stage("train"):
        record = train(model, train_ids, held_out, args.steps)
    with timer.stage("save"):
        write_checkpoint(args.output, model, tokenizer, held_out_text)
    with timer.stage("evaluate"):  # the weights as stored, loaded as every tool loads them
        stored = checkpoint.load(str(args.output), variant, torch.float32).model
        held_out_loss = mean_loss(stored, held_out)
        train_loss = mean_loss(stored, windows(train_ids, CONTEXT)[: len(held_out)])
        log(f"  held-out loss {held_out_loss:.3f} (perplexity {math.exp(held_out_loss):.2f}), "
            f"on as much training text {train_loss:.3f} (perplexity {math.exp(train_loss):.2f})")
    provenance = {
        "sha256": {name: sha256_of(args.output / name) for name in CHECKED_FILES},
        "command": " ".join(["python", "tools/train_tiny.py", *(sys.argv[1:] if argv is None else argv)]),
        "reproducible": f"byte for byte by the same command on the same CPU type ({THREADS} threads), with the same "
                        "Python version (its standard library is the corpus) and the requirements.txt pins",
        "made_with": {"python": platform.python_version(), "torch": torch.__version__,
                      "transformers": __import__("transformers").__version__,
                      "tokenizers": __import__("tokenizers").__version__, "cpu": cpu_name(), "threads": THREADS},
        "corpus": {"text": "the .py files of the Python standard library, except test packages (test, tests, "
                           f"idle_test) and {', '.join(sorted(LEFT_OUT_PACKAGES))}, joined in path order by blank lines",
                   "held_out": f"files whose path's sha256 has a first byte divisible by {HELD_OUT_EVERY}, never "
                               f"trained on, in {HELD_OUT_FILE}: {', '.join(held_out_names)}",
                   "files": len(files), "train_characters": len(train_text), "train_tokens": len(train_ids),
                   "held_out_characters": len(held_out_text), "held_out_tokens": held_out.numel()},
        "training": {"steps": args.steps, "batch": BATCH, "context": CONTEXT, "peak_lr": PEAK_LR,
                     "final_lr_fraction": FINAL_LR_FRACTION, "warmup_fraction": WARMUP_FRACTION,
                     "weight_decay": WEIGHT_DECAY, "betas": BETAS, "clip_norm": CLIP_NORM, "seed": SEED,
                     "parameters": parameters, "stored_dtype": DTYPE_NAME,
                     "seconds": round(record["seconds"]), "cpu_seconds": round(record["cpu_seconds"]),
                     "curve": record["curve"]},
        "results": {"held_out_loss": round(held_out_loss, 4), "held_out_perplexity": round(math.exp(held_out_loss), 3),
                    "train_loss": round(train_loss, 4), "train_perplexity": round(math.exp(train_loss), 3)},
    }
    (args.output / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
    log(f"wrote {args.output} in {timer.total:.0f} s; {WEIGHTS_FILE} sha256 {provenance['sha256'][WEIGHTS_FILE]}")
    return 0


def write_checkpoint(directory: Path, model, tokenizer, held_out_text: str) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # An earlier run's record would make loading the new weights fail its sha256 check; the new
    # record is written once they are evaluated.
    (directory / PROVENANCE_FILE).unlink(missing_ok=True)
    config = dict(model.config.to_dict(), model_type="gemma3n_text", dtype=DTYPE_NAME)
    (directory / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    # lm_head is tied to embed_tokens; stored once, as in the published checkpoints.
    tensors = {name: tensor.to(STORED_DTYPE).contiguous() for name, tensor in model.state_dict().items()
               if name != "lm_head.weight"}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    write_tokenizer(tokenizer, str(directory))
    (directory / HELD_OUT_FILE).write_text(held_out_text)


def cpu_name() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine())


if __name__ == "__main__":
    sys.exit(main())
