"""The issue's observation re-created (docs/benchmarks.md, Memory): a random-weight phone program
through ExecuTorch's stock runner with mlock unavailable, prompted in English through the tiny
tokenizer that bench.py exports beside such programs. Its ids are all below 512, so the prompt
gathers only the tables' first rows, and the program file's mapping holds about 1 MB resident
whatever the file's size.

    python bench.py --variant e2b --layers 2 --configs phone --keep-programs --work-dir DIR --export-only
    python docs/experiment_tiny_tokenizer_rows.py DIR/phone.pte
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NEW_TOKENS = 64


def child(program: Path) -> None:
    import executorch.kernels.quantized  # noqa: F401  the quantized embedding kernels
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  llama:: kernels
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from gemma3n_executorch import memory_probe, program_file
    from gemma3n_executorch.exporter import tokenizer_path_for
    from gemma3n_executorch.tiny_tokenizer import _CORPUS, build_tiny_tokenizer

    text = (_CORPUS.replace("\n", " ") + " ") * 3
    ids = build_tiny_tokenizer().encode(text).ids
    refusal = memory_probe.mlock_refusal()
    program_file.evict_from_page_cache(program)
    recorder = memory_probe.Recorder(program, program_file.layout(program))
    runner = TextLLMRunner(str(program), str(tokenizer_path_for(program)))
    runner.prefill(text, GenerationConfig(num_bos=1, num_eos=0))
    runner.generate("", GenerationConfig(echo=False, max_new_tokens=NEW_TOKENS, temperature=0.0))
    after = recorder.snapshot("decoded", len(ids) + NEW_TOKENS)
    print(f"mlock refused ({refusal}); {len(ids)} prompt tokens, {len(set(ids))} distinct ids, the largest "
          f"{max(ids)}; after {NEW_TOKENS} more: allocated {after['anon'] / 1e6:.1f} MB above the interpreter, "
          f"program file resident {after['program_file_resident'] / 1e6:.2f} MB, of it "
          + ", ".join(f"{name} {value / 1e6:.2f} MB" for name, value in after["tables_resident"].items()),
          file=sys.stderr)


def main() -> None:
    from gemma3n_executorch.memory_probe import without_mlock

    program = Path(sys.argv[1]).resolve()
    command, limit_memlock = without_mlock([sys.executable, __file__, "--child", str(program)])
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, preexec_fn=limit_memlock)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(Path(sys.argv[2]))
    else:
        main()
