"""`smallcap caption`: caption images and videos (files or directories) and print JSON lines or a table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from smallcap.cli.options import positive_int
from smallcap.data import image_id_key
from smallcap.errors import SmallCapError
from smallcap.hub import DEFAULT_MODEL
from smallcap.images import VideoOptions, expand_inputs
from smallcap.io import check_output_file

PIL_MAX_IMAGE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS (not imported here so that --help starts fast)


def register(subparsers) -> None:
    """Add the `caption` subcommand."""
    parser = subparsers.add_parser("caption", help="caption images and videos with retrieved captions in the prompt",
                                   description="Caption images and videos; directories are expanded to their files.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    add_captioner_arguments(parser)
    parser.add_argument("--output", type=Path, metavar="FILE.jsonl",
                        help="append one JSON line per image here as each batch finishes; a rerun skips the "
                             "images already captioned in it")
    parser.add_argument("--overwrite", action="store_true", help="start --output afresh instead of resuming it")
    parser.set_defaults(func=run, validate=check_precision_arguments)


def add_captioner_arguments(parser) -> None:
    """Model, retrieval, decoding and video options shared by `caption` and `predict`."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or checkpoint directory (default {DEFAULT_MODEL})")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--retrieved", type=Path, metavar="FILE.json",
                        help="retrieved captions as {image_id: [captions]}; keys match the file stem or its integer value")
    source.add_argument("--no-retrieval", action="store_true", help="prompt without retrieved captions")
    source.add_argument("--datastore", action="append", metavar="DIR",
                        help="retrieve from this caption datastore; repeat to combine several")
    parser.add_argument("--retrieval-encoder", default=None, metavar="NAME",
                        help="encoder for --datastore queries (default: the one the datastore was built with)")
    parser.add_argument("--k", type=positive_int, default=None,
                        help="retrieved captions in the prompt (default: the model's, 4)")
    parser.add_argument("--num-beams", type=positive_int, default=3)
    parser.add_argument("--max-new-tokens", type=positive_int, default=25)
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images decoded together (default 16)")
    parser.add_argument("--max-image-pixels", type=positive_int, default=PIL_MAX_IMAGE_PIXELS, metavar="N",
                        help="refuse (as a per-input error) images with more pixels than this, read from the file "
                             "header (default: Pillow's limit, %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_precision_arguments(parser)
    parser.add_argument("--tokenizer", default=None, help="tokenizer to use instead of the model's")
    parser.add_argument("--image-processor", default=None, help="image processor to use instead of the model's")
    parser.add_argument("--frames", type=positive_int, default=4, help="video: frames sampled evenly over each clip")
    parser.add_argument("--rows", type=positive_int, default=None,
                        help="video: rows of the frame grid (default 2 for 4 frames)")
    parser.add_argument("--cols", type=positive_int, default=None, help="video: columns of the frame grid")
    parser.add_argument("--save-tiles", type=Path, metavar="DIR", help="video: write each tiled image here as PNG")


def add_precision_arguments(parser) -> None:
    """`--dtype` and `--quantize` (opt-in fast modes, `smallcap.precision`), shared by caption, predict, serve."""
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="model weights' precision: float32 (exact, default), bfloat16 (faster on CPUs with "
                             "bf16 support), float16 (GPU only); reduced precision may change some captions")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none",
                        help="int8: dynamic int8 quantization of the decoder's linear layers (CPU, float32 only; "
                             "faster, may change some captions); default none")


def check_precision_arguments(args) -> None:
    """--device, --dtype and --quantize checked together (`smallcap.precision.check_precision`), run by the CLI
    right after parsing (`validate` default): a bad combination fails before anything is loaded or written."""
    from smallcap.precision import check_precision

    check_precision(args.device, args.dtype, args.quantize)


def captioner_options(args) -> dict:
    """The `Captioner.from_pretrained` keyword arguments the shared arguments describe."""
    import torch

    from smallcap.generation import GenerationSettings

    return dict(
        model=args.model, tokenizer=args.tokenizer, image_processor=args.image_processor, device=args.device,
        dtype=None if args.dtype == "float32" else getattr(torch, args.dtype), quantize=args.quantize,
        k=args.k, use_retrieval=False if args.no_retrieval else None,
        datastores=args.datastore, retrieval_encoder=args.retrieval_encoder,
        settings=GenerationSettings(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens),
        video=VideoOptions(args.frames, args.rows, args.cols, args.save_tiles), max_image_pixels=args.max_image_pixels)


# Settings added to the record after files were made without them, and the value those files were made with.
# "logits": "float32" for reduced precision since its logits are computed in float32 (smallcap.precision.Float32Logits);
# a reduced-precision file from before had them in reduced precision, so resuming it now would mix the two.
RECORDED_DEFAULTS = {"quantize": "none", "logits": None}


def captioner_settings(args) -> dict:
    """What decides the captions of a run (model, retrieval, decoding, video tiling), as recorded beside the
    output of `caption --output` and `predict --out` so that a resumed run cannot mix two configurations."""

    def absolute(path):
        return None if path is None else str(Path(path).expanduser().resolve()) if Path(path).exists() else str(path)

    return {"model": absolute(args.model), "tokenizer": args.tokenizer, "image_processor": args.image_processor,
            "dtype": args.dtype, "logits": None if args.dtype == "float32" else "float32",
            "quantize": args.quantize, "retrieval": not args.no_retrieval,
            "datastore": None if not args.datastore else [absolute(d) for d in args.datastore],
            "retrieval_encoder": args.retrieval_encoder, "retrieved": absolute(args.retrieved), "k": args.k,
            "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
            "video": [args.frames, args.rows, args.cols]}


def build_captioner(args):
    """The Captioner the shared arguments describe."""
    from smallcap.captioner import Captioner

    return Captioner.from_pretrained(**captioner_options(args))


def retrieved_for(path: Path, table: dict[str, list[str]]) -> list[str]:
    """The entry for an image file: keyed by its stem, or by its image id (`image_id_key`: 000000000139 -> 139)."""
    stem = path.stem
    if stem not in table and image_id_key(stem) in table:
        stem = image_id_key(stem)
    if stem in table:
        if not table[stem]:
            raise SmallCapError(f"{path}: the --retrieved file has an empty list for image id {stem!r}; the prompt "
                                "needs at least one caption (or pass --no-retrieval)")
        return table[stem]
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


def read_done(output: Path) -> set[str]:
    """Inputs already captioned in a JSONL output (lines with a caption; errors and a cut-off last line are
    done again)."""
    done = set()
    if output.exists():
        for line in output.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("caption") is not None and "image" in row:
                done.add(str(row["image"]))
    return done


def _open_output(output: Path, overwrite: bool):
    """The JSONL file opened for appending (truncated with `overwrite`); a cut-off last line left by an
    interruption is ended so the next line starts cleanly."""
    cut_off = False
    if not overwrite and output.exists() and output.stat().st_size:
        with open(output, "rb") as existing:
            existing.seek(-1, 2)
            cut_off = existing.read(1) != b"\n"
    handle = open(output, "w" if overwrite else "a", encoding="utf-8")
    if cut_off:
        handle.write("\n")
    return handle


def run(args) -> int:
    """Caption the inputs; exit code 1 if any input could not be captioned."""
    if args.output:
        check_output_file(args.output, "--output")
    paths = expand_inputs(args.inputs)
    if not paths:
        raise SmallCapError("no image files found in " + ", ".join(args.inputs))
    if args.output:
        from smallcap.prediction import check_resume_settings

        check_resume_settings(args.output, captioner_settings(args), overwrite=args.overwrite,
                              recorded_defaults=RECORDED_DEFAULTS)
    if args.output and not args.overwrite:
        done = read_done(args.output)
        skipped = [path for path in paths if str(path) in done]
        if skipped:
            paths = [path for path in paths if str(path) not in done]
            print(f"smallcap caption: {len(skipped)} inputs already captioned in {args.output}, skipped "
                  "(--overwrite starts afresh)", file=sys.stderr)
        if not paths:
            return 0
    retrieved = None
    if args.retrieved:
        from smallcap.retrieval.datastore import load_retrieved

        table = load_retrieved(args.retrieved)
        retrieved = [retrieved_for(path, table) for path in paths]
    captioner = build_captioner(args)
    batches = captioner.iter_batches(paths, retrieved=retrieved, batch_size=args.batch_size,
                                     progress=len(paths) > args.batch_size)
    results = []
    table_view = not args.output and sys.stdout.isatty()
    handle = _open_output(args.output, args.overwrite) if args.output else sys.stdout
    try:
        for batch in batches:
            results += batch
            if table_view:
                print_table(batch, sys.stdout)
            else:
                handle.write("".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in batch))
            handle.flush()
    finally:
        if args.output:
            handle.close()
    failed = [r for r in results if r.error]
    for result in failed:
        print(f"smallcap caption: {result.error}", file=sys.stderr)
    if failed:
        print(f"smallcap caption: {len(failed)} of {len(results)} inputs could not be captioned", file=sys.stderr)
    return 1 if failed else 0
