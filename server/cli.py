"""The `codevista` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import logging_setup


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a model's continuation of a prompt to stdout")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--stats", action="store_true",
                   help="print token counts and timings to stderr at the end")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from codevista.models.engine import Engine, SamplingParams
    from codevista.models.loader import load_model

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    loaded = load_model(args.model, dtype=args.dtype)
    d = loaded.defaults
    params = SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=d.temperature if args.temperature is None else args.temperature,
        top_k=d.top_k if args.top_k is None else args.top_k,
        top_p=d.top_p if args.top_p is None else args.top_p,
        seed=args.seed, stop=tuple(args.stop))
    with Engine(loaded) as engine:
        handle = engine.submit(prompt, params)
        try:
            for delta in handle:
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            handle.cancel()
        result = handle.result()
    sys.stdout.write("\n")
    if args.stats:
        print(f"prompt_tokens={result.prompt_tokens} cached={result.cached_tokens} "
              f"generated={result.generated_tokens} finish={result.finish_reason} "
              f"ttft={result.ttft_s or 0:.3f}s total={result.total_s:.3f}s", file=sys.stderr)
    if result.error is not None:
        raise result.error
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codevista", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("CODEVISTA_LOG", "WARNING"))
    parser.add_argument("--log-file", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging_setup.configure(args.log_level, args.log_file)
    from codevista.models.errors import ModelError

    try:
        return int(args.func(args))
    except ModelError as e:
        print(f"codevista: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
