"""The ``nemolite`` command: generate, chat (serve, bench, convert... as they land)."""

from __future__ import annotations

import argparse
import logging
import sys

from nemolite.errors import NemoliteError

log = logging.getLogger("nemolite")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _add_sampling_options(parser: argparse.ArgumentParser, *, max_tokens: int, temperature: float) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    parser.add_argument("--min-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemolite", description="Run NVIDIA Nemotron models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete one prompt and print the completion",
                                   description="Print the completion of PROMPT on stdout (logs go to stderr). "
                                               "Without MODEL the bundled demo model is used.")
    generate.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    _add_model_options(generate)
    _add_sampling_options(generate, max_tokens=64, temperature=0.0)
    generate.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")

    chat = commands.add_parser("chat", help="talk to a model in the terminal (streams tokens)")
    chat.add_argument("model", nargs="?", default=None)
    chat.add_argument("--system", default="", help="system prompt")
    _add_model_options(chat)
    _add_sampling_options(chat, max_tokens=256, temperature=0.7)
    return parser


def _sampling_params(args):
    from nemolite.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                          ignore_eos=args.ignore_eos)


def _load(model, args):
    from nemolite.engine.llm import LLM

    log.info("loading %s", model or "the bundled demo model")
    return LLM(model, dtype=args.dtype, device=args.device, seed=args.seed)


def run_generate(args) -> int:
    if len(args.args) > 2:
        raise NemoliteError("give at most MODEL and PROMPT; quote the prompt if it has spaces")
    model, prompt = (args.args[0], args.args[1]) if len(args.args) == 2 else (None, args.args[0])
    params = _sampling_params(args)
    llm = _load(model, args)
    ids = llm.tokenizer.encode(prompt, add_bos=False if args.no_bos else None)
    llm._prompts(None, [ids])  # same validation as the API
    llm.stream(ids, params, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    sys.stdout.write("\n")
    return 0


def run_chat(args) -> int:
    params = _sampling_params(args)
    llm = _load(args.model, args)
    params = llm.chat_params(params)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("nemolite chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            user = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        prompt = llm.tokenizer.apply_chat_template(messages)
        ids = llm.tokenizer.encode(prompt, add_bos=False)
        try:
            output = llm.stream(ids, params, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
            messages.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": output.text.strip()})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"generate": run_generate, "chat": run_chat}
    try:
        return handlers[args.command](args)
    except NemoliteError as error:
        print(f"nemolite: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
