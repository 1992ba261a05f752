"""`smallcap caption`: caption images and videos (files or directories) and print JSON lines or a table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from smallcap.errors import SmallCapError


def register(subparsers) -> None:
    """Add the `caption` subcommand."""
    parser = subparsers.add_parser("caption", help="caption images and videos with retrieved captions in the prompt",
                                   description="Caption images and videos; directories are expanded to their files.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    add_captioner_arguments(parser)
    parser.add_argument("--output", type=Path, metavar="FILE.jsonl", help="write one JSON line per image here")
    parser.set_defaults(func=run)


def add_captioner_arguments(parser) -> None:
    """Model, retrieval, decoding and video options shared by `caption` and `predict`."""
    from smallcap.hub import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or checkpoint directory (default {DEFAULT_MODEL})")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--retrieved", type=Path, metavar="FILE.json",
                        help="retrieved captions as {image_id: [captions]}; keys match the file stem or its integer value")
    source.add_argument("--no-retrieval", action="store_true", help="prompt without retrieved captions")
    source.add_argument("--datastore", action="append", metavar="DIR",
                        help="retrieve from this caption datastore; repeat to combine several")
    parser.add_argument("--retrieval-encoder", default=None, metavar="NAME",
                        help="encoder for --datastore queries (default: the one the datastore was built with)")
    parser.add_argument("--k", type=int, default=None, help="retrieved captions in the prompt (default: the model's, 4)")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=16, help="images decoded together (default 16)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="model weights' precision (reduced precision may change some captions)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to use instead of the model's")
    parser.add_argument("--image-processor", default=None, help="image processor to use instead of the model's")
    parser.add_argument("--frames", type=int, default=4, help="video: frames sampled evenly over each clip")
    parser.add_argument("--rows", type=int, default=None, help="video: rows of the frame grid (default 2 for 4 frames)")
    parser.add_argument("--cols", type=int, default=None, help="video: columns of the frame grid")
    parser.add_argument("--save-tiles", type=Path, metavar="DIR", help="video: write each tiled image here as PNG")


def captioner_options(args) -> dict:
    """The `Captioner.from_pretrained` keyword arguments the shared arguments describe."""
    from smallcap.generation import GenerationSettings
    from smallcap.images import VideoOptions

    import torch

    return dict(
        model=args.model, tokenizer=args.tokenizer, image_processor=args.image_processor, device=args.device,
        dtype=None if args.dtype == "float32" else getattr(torch, args.dtype),
        k=args.k, use_retrieval=False if args.no_retrieval else None,
        datastores=args.datastore, retrieval_encoder=args.retrieval_encoder,
        settings=GenerationSettings(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens),
        video=VideoOptions(args.frames, args.rows, args.cols, args.save_tiles))


def build_captioner(args):
    """The Captioner the shared arguments describe."""
    from smallcap.captioner import Captioner

    return Captioner.from_pretrained(**captioner_options(args))


def retrieved_for(path: Path, table: dict[str, list[str]]) -> list[str]:
    """The entry for an image file: keyed by its stem, or by the stem's integer value (000000000139 -> 139)."""
    stem = path.stem
    if stem in table:
        return table[stem]
    if stem.isdigit() and str(int(stem)) in table:
        return table[str(int(stem))]
    raise SmallCapError(f"{path}: no retrieved captions for image id {stem!r} in the --retrieved file")


def print_table(results, stream) -> None:
    """A readable listing for a terminal: image, caption, and the retrieved captions under it."""
    for result in results:
        if result.error:
            print(f"{result.image}\n  ERROR: {result.error}", file=stream)
            continue
        print(f"{result.image}\n  caption:   {result.caption}", file=stream)
        for index, caption in enumerate(result.retrieved):
            print(f"  {'retrieved:' if index == 0 else '':<10} {caption}", file=stream)


def run(args) -> int:
    """Caption the inputs; exit code 1 if any input could not be captioned."""
    from smallcap.images import expand_inputs
    from smallcap.io import atomic_write_text

    paths = expand_inputs(args.inputs)
    if not paths:
        raise SmallCapError("no image files found in " + ", ".join(args.inputs))
    retrieved = None
    if args.retrieved:
        from smallcap.retrieval.datastore import load_retrieved

        table = load_retrieved(args.retrieved)
        retrieved = [retrieved_for(path, table) for path in paths]
    captioner = build_captioner(args)
    results = captioner(paths, retrieved=retrieved, batch_size=args.batch_size, progress=len(paths) > args.batch_size)
    lines = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in results)
    if args.output:
        atomic_write_text(args.output, lines)
    elif sys.stdout.isatty():
        print_table(results, sys.stdout)
    else:
        sys.stdout.write(lines)
    failed = [r for r in results if r.error]
    for result in failed:
        print(f"smallcap caption: {result.error}", file=sys.stderr)
    if failed:
        print(f"smallcap caption: {len(failed)} of {len(results)} inputs could not be captioned", file=sys.stderr)
    return 1 if failed else 0
