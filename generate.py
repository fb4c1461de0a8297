"""Generate text, or chat, with an exported Gemma 3n program.

    python generate.py MODEL.pte --prompt "Why is the sky blue?"
    python generate.py MODEL.pte            # interactive multi-turn chat; /reset, /exit

Text streams to stdout as it is produced; timing (prefill and decode tokens/s, time to first
token) goes to stderr. --mode kv programs keep their cache between chat turns; --mode fixed
programs work too, re-running their window for every token.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemma3n_executorch import preflight  # noqa: E402
from gemma3n_executorch.progress import UserError, run_cli  # noqa: E402


def stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def report(reply) -> None:
    if reply.stop_reason == "context_full":
        print("\n[stopped: the program's context is full; re-export with a larger --max-context-length]",
              file=sys.stderr)
    print(f"\n[{reply.timing.summary()}]", file=sys.stderr, flush=True)


def chat(session, max_new_tokens: int) -> None:
    print("chat: type a message; /reset starts over, /exit or an empty line ends", file=sys.stderr)
    while True:
        try:
            text = input("> ")
            text.encode("utf-8")  # under a C locale stdin smuggles bad bytes in as surrogates
        except EOFError:
            break
        except UnicodeError:  # the line is lost, the session is not
            print("error: that line is not UTF-8 text; type it again", file=sys.stderr)
            continue
        if text.strip() in ("", "/exit"):
            break
        if text.strip() == "/reset":
            session.reset()
            continue
        try:
            report(session.turn(text, max_new_tokens, stream))
        except UserError as error:  # e.g. the conversation is full: say so and go on
            print(f"error: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("program", type=Path, help="a .pte from e2b/export.py or e4b/export.py")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the one exported beside the program)")
    parser.add_argument("--prompt", help="generate once for this prompt; without it, chat interactively")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system", help="a system prompt (Gemma folds it into the first user turn)")
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    args = parser.parse_args(argv)
    if (args.max_new_tokens < 1 or not math.isfinite(args.temperature) or args.temperature < 0
            or not 0 < args.top_p <= 1 or args.top_k < 0):
        parser.error("need --max-new-tokens >= 1, a finite --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0")
    if args.system and args.no_chat_template:
        parser.error("--system needs the chat template; drop --no-chat-template")
    return run_cli(lambda: run(args))


def run(args) -> int:
    preflight.check_program_file(args.program)
    from gemma3n_executorch.chat import ChatFormat
    from gemma3n_executorch.exporter import chat_template_path_for, tokenizer_path_for
    from gemma3n_executorch.generation import ChatSession, Generator, Sampling, load_tokenizer
    from gemma3n_executorch.runtime import Program

    tokenizer = load_tokenizer(args.tokenizer or tokenizer_path_for(args.program))
    # The checkpoint's own template, exported beside the program when it shipped one; else Gemma's rules.
    template = chat_template_path_for(args.program)
    chat_format = None if args.no_chat_template else ChatFormat(template.read_text() if template.is_file() else None)
    program = Program(args.program)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    session = ChatSession(Generator(program, tokenizer, sampling), chat_format, args.system)
    if args.prompt is None:
        chat(session, args.max_new_tokens)
    else:
        report(session.turn(args.prompt, args.max_new_tokens, stream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
