"""The `codevista` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import logging_setup


def fail(message: str) -> int:
    """One `codevista: error:` line on stderr; exit status 2."""
    print(f"codevista: error: {message}", file=sys.stderr)
    return 2


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a model's continuation of a prompt to stdout")
    p.add_argument("--model", default=None,
                   help="Hugging Face checkpoint directory (default: the embedded model)")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--language", default=None,
                   help="the prompt's language (python, java, ...): models that have "
                        "language-tag tokens, as the embedded one does, get the tag first")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"])
    p.add_argument("--stats", action="store_true",
                   help="print token counts and timings to stderr at the end")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from codevista.models import formats
    from codevista.models.engine import Engine, SamplingParams
    from codevista.models.loader import DEFAULT_MODEL_DIR, load_model

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    loaded = load_model(args.model or DEFAULT_MODEL_DIR, dtype=args.dtype)
    if args.language is not None:
        if args.language not in formats.LANGUAGES:
            return fail(f"unknown language {args.language!r} (known: "
                        f"{', '.join(formats.LANGUAGES)})")
        if loaded.tokenizer.token_to_id(formats.lang_tag(args.language)) is not None:
            prompt = formats.plain(args.language, prompt)
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


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="translate a source file into another language, "
                                         "streamed to stdout")
    p.add_argument("file", help="source file ('-' reads stdin; then --from is required)")
    p.add_argument("--to", required=True, dest="target", help="target language (e.g. csharp, "
                   "C#, go, rust)")
    p.add_argument("--from", dest="source", default=None,
                   help="source language (default: from the file's extension)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: embedded)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stats", action="store_true", help="pieces, tokens and time on stderr")
    p.set_defaults(func=_translate)


def _translate(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from .backend import LocalBackend
    from .features.translate import TranslationService
    from .translation import LANGUAGES, UnsupportedLanguageError, resolve_language

    try:
        target = resolve_language(args.target)
        if args.source is not None:
            source = resolve_language(args.source, "source")
        else:
            ext = Path(args.file).suffix.lower()
            by_ext = {lang.extension: lang for lang in LANGUAGES.values()}
            by_ext.update({".h": LANGUAGES["c"], ".hpp": LANGUAGES["cpp"],
                           ".cc": LANGUAGES["cpp"], ".mjs": LANGUAGES["javascript"],
                           ".tsx": LANGUAGES["typescript"]})
            if ext not in by_ext:
                return fail(f"cannot tell the language of {args.file!r} from its extension; "
                            "pass --from")
            source = by_ext[ext]
    except UnsupportedLanguageError as e:
        return fail(str(e))
    try:
        code = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(
            encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return fail(f"cannot read {args.file}: {e}")

    printed = ""
    HOLD = 10

    def on_partial(text: str) -> None:
        # stdout only grows: lines that extend what is already printed, held back by
        # HOLD lines because clean-up (a loop cut, say) may still revise the last ones
        nonlocal printed
        lines = text.split("\n")
        stable = "\n".join(lines[:-HOLD]) + "\n" if len(lines) > HOLD else ""
        if len(stable) > len(printed) and stable.startswith(printed):
            sys.stdout.write(stable[len(printed):])
            sys.stdout.flush()
            printed = stable

    async def run() -> int:
        backend = LocalBackend()
        await backend.load(args.model, "float32", lambda m: None)
        try:
            if backend.state != "ready":
                return fail(backend.error or "the model did not load")
            result = await TranslationService(backend).translate(
                code, source, target, on_partial, temperature=args.temperature)
        finally:
            backend.close()
        if result.text.startswith(printed):
            sys.stdout.write(result.text[len(printed):])
        else:  # the final clean-up revised streamed lines: print the final text whole
            sys.stdout.write("\n" + result.text)
        sys.stdout.flush()
        if args.stats:
            print(f"pieces={result.pieces} prompt_tokens={result.prompt_tokens} "
                  f"generated={result.generated_tokens} seconds={result.seconds:.2f} "
                  f"finish={','.join(result.finish_reasons)}", file=sys.stderr)
        return 0

    try:
        return asyncio.run(run())
    except ValueError as e:  # unsupported source language for this model, too long, ...
        return fail(str(e))


def _add_explain_image(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain-image", help="explain, describe, transcribe or locate in an "
                                             "image with a vision model, streamed to stdout")
    p.add_argument("image", help="PNG, JPEG, WebP, BMP or GIF file")
    p.add_argument("--question", default=None)
    p.add_argument("--task", default="explain",
                   choices=["explain", "describe-diagram", "transcribe", "locate"])
    p.add_argument("--model", default=None,
                   help="a LLaVA-family checkpoint directory (default: the embedded VLM)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--stats", action="store_true")
    p.set_defaults(func=_explain_image)


def _explain_image(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from codevista.models.vision.image import ImageError, load_image_file

    from .errors import NotReadyError
    from .features.vision import VisionService
    from .vision import ImageRequestError

    try:
        img = load_image_file(Path(args.image))
    except ImageError as e:
        return fail(str(e))

    async def run() -> int:
        service = VisionService()
        printed = ""

        def on_partial(text: str) -> None:
            nonlocal printed
            if text.startswith(printed):
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text

        try:
            if args.task == "transcribe":  # the OCR alone: no vision model to load
                answer = await service.transcribe(img, on_partial)
            else:
                model = str(Path(args.model).expanduser().resolve()) if args.model else None
                backend = await service.ensure(model, lambda m: None)
                answer = await service.explain(backend, img, args.task, args.question,
                                               on_partial, args.max_tokens)
        finally:
            service.close()
        rest = answer.text[len(printed):] if answer.text.startswith(printed) else ""
        sys.stdout.write(rest + "\n")
        if args.task == "locate":
            print(f"boxes: {answer.boxes}", file=sys.stderr)
        if args.stats:
            print(f"prompt_tokens={answer.prompt_tokens} cached={answer.cached_tokens} "
                  f"generated={answer.generated_tokens}", file=sys.stderr)
        return 0

    try:
        return asyncio.run(run())
    except (NotReadyError, ImageRequestError) as e:
        return fail(str(e))


def _add_generate_image(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate-image", help="draw a PNG from a description with the "
                                              "text-to-image model")
    p.add_argument("prompt", help='e.g. "2 shapes: a red circle top left, a blue square '
                                  'centre"')
    p.add_argument("-o", "--output", required=True, help="the PNG file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="pixels per side (16-1024)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1: off; default: the model's)")
    p.add_argument("--model", default=None,
                   help="a text-to-image checkpoint directory (default: the embedded one)")
    p.set_defaults(func=_generate_image)


def _generate_image(args: argparse.Namespace) -> int:
    from pathlib import Path

    from codevista.models.vision.t2i import DEFAULT_T2I_DIR, TextToImage, check_size

    out = Path(args.output).expanduser()
    if out.suffix.lower() != ".png":
        return fail(f"{out} must end in .png")
    if not out.parent.is_dir():
        return fail(f"folder {out.parent} does not exist")
    check_size(args.size)
    model = TextToImage.load(Path(args.model).expanduser() if args.model else DEFAULT_T2I_DIR)
    try:
        def on_rows(done: int, total: int) -> None:
            print(f"\rrow {done}/{total}", end="", file=sys.stderr, flush=True)

        gen = model.generate(args.prompt, seed=args.seed, size=args.size, on_rows=on_rows,
                             guidance=args.guidance)
    finally:
        model.close()
    print(file=sys.stderr)
    gen.image.save(out, format="PNG")
    print(f"{out} {gen.image.width}x{gen.image.height} ({gen.result.generated_tokens} tokens "
          f"in {gen.result.total_s:.2f} s)")
    return 0


def _add_export_gguf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-gguf", help="write a checkpoint as GGUF for llama.cpp / Ollama")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory (default: the embedded model)")
    p.add_argument("out", help="output .gguf file")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0"])
    p.set_defaults(func=_export_gguf)


def _export_gguf(args: argparse.Namespace) -> int:
    from codevista.models.gguf_export import export_gguf
    from codevista.models.loader import DEFAULT_MODEL_DIR

    try:
        import gguf  # noqa: F401
    except ImportError:
        return fail("GGUF export needs the gguf package: pip install 'codevista[remote]'")
    out = export_gguf(args.model or DEFAULT_MODEL_DIR, args.out, args.type)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.type})", file=sys.stderr)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the language server (stdio by default)")
    p.add_argument("--tcp", type=int, default=None, metavar="PORT",
                   help="listen on 127.0.0.1:PORT instead of stdio (for debugging)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from .app import server

    if args.tcp is not None:
        server.start_tcp("127.0.0.1", args.tcp)
    else:
        server.start_io()
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="type into a document through the language server and "
                                    "watch the ghost text stream in")
    p.add_argument("--model", default=None, help="checkpoint directory (default: embedded)")
    p.add_argument("--cps", type=float, default=8.0, help="typing speed, characters/second")
    p.add_argument("--chars", type=int, default=0, help="type only the first N characters")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codevista", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("CODEVISTA_LOG", "WARNING"))
    parser.add_argument("--log-file", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_translate(sub)
    _add_explain_image(sub)
    _add_generate_image(sub)
    _add_export_gguf(sub)
    _add_serve(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging_setup.configure(args.log_level, args.log_file)
    from codevista.models.errors import ModelError

    try:
        return int(args.func(args))
    except ModelError as e:
        return fail(str(e))
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
