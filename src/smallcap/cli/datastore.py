"""`smallcap datastore build|import|info|search|retrieve`: create, inspect and query caption datastores."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from smallcap.cli.options import non_negative_int, positive_float, positive_int
from smallcap.data import DATASTORE_SPLITS, DATASTORE_TEXT, FORMATS, TEXT_RULES
from smallcap.cli.caption import PIL_MAX_IMAGE_PIXELS
from smallcap.errors import SmallCapError
from smallcap.hub import bundled_path, local_snapshot
from smallcap.images import load_image

DEFAULT_LENGTH_TOKENIZER = "gpt2"  # smallcap.retrieval.build.DEFAULT_LENGTH_TOKENIZER
DEFAULT_ENCODER = "openai/clip-vit-base-patch32"  # smallcap.retrieval.encoders.DEFAULT_RETRIEVAL_ENCODER (not
# imported here so that the CLI starts without torch)


def register(subparsers) -> None:
    """Add `datastore` and its sub-verbs."""
    parser = subparsers.add_parser("datastore", help="build, import, inspect and search caption datastores")
    verbs = parser.add_subparsers(dest="datastore_command", required=True, metavar="VERB")

    build = verbs.add_parser("build", help="embed caption files into a new datastore (resumable)")
    build.add_argument("inputs", nargs="+", metavar="INPUT", help="caption files (text, JSON, COCO, Karpathy, "
                       "MSR-VTT, JSONL, CSV, Parquet)")
    build.add_argument("--out", required=True, help="datastore directory to create")
    build.add_argument("--encoder", default=DEFAULT_ENCODER,
                       help="HF CLIP id/path or open_clip:ARCH[/PRETRAINED] (default %(default)s)")
    build.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "ivfpq", "hnsw"],
                       help="index type (default: chosen from the caption count and --memory-budget)")
    build.add_argument("--memory-budget", type=positive_float, default=4.0, metavar="GIB",
                       help="RAM for raw vectors before auto switches to a compressed index (default %(default)s)")
    build.add_argument("--max-tokens", type=non_negative_int, default=25,
                       help="drop captions longer than this many decoder tokens; 0 keeps all (default %(default)s)")
    build.add_argument("--tokenizer", default=None,
                       help="the decoder's tokenizer (id or directory) for --max-tokens, e.g. facebook/opt-125m for "
                            "OPT (default: --model's, else gpt2)")
    build.add_argument("--model", default=None, metavar="MODEL",
                       help="the SmallCap model the datastore is for (e.g. mini): its tokenizer measures --max-tokens")
    build.add_argument("--dedupe", action="store_true", help="keep only the first copy of identical captions")
    build.add_argument("--splits", default=",".join(DATASTORE_SPLITS),
                       help="splits kept from Karpathy/MSR-VTT files, comma-separated, or 'all' (default %(default)s)")
    build.add_argument("--format", choices=FORMATS, help="input format (default: detected per file)")
    build.add_argument("--column", default="caption", help="caption column of JSONL/CSV/Parquet/JSON records")
    build.add_argument("--id-column", help="image id column of JSONL/CSV/Parquet/JSON records")
    build.add_argument("--text", choices=sorted(TEXT_RULES), default=DATASTORE_TEXT,
                       help="Karpathy files: index their tokens joined by spaces, as the reference builds its "
                            "datastore (tokens, the default), or the sentences as written (raw); other formats "
                            "are always raw (see smallcap.data)")
    build.add_argument("--batch-size", type=positive_int, default=256, help="captions per encoder batch")
    build.add_argument("--shard-size", type=positive_int, default=16384, help="captions per resumable embedding shard")
    build.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    build.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="ray: embed the shards with an actor pool on a Ray cluster (needs smallcap[ray])")
    build.add_argument("--address", default=None, help="--engine ray: cluster to join (default: a local one)")
    build.add_argument("--num-workers", type=positive_int, default=1, help="--engine ray: embedding actors (default 1)")
    build.add_argument("--gpus-per-worker", type=float, default=0.0, help="--engine ray: GPUs per actor")
    build.set_defaults(func=run_build)

    imp = verbs.add_parser("import", help="import a published faiss index and its caption file")
    imp.add_argument("--index", required=True, help="faiss index file (e.g. coco_index)")
    imp.add_argument("--captions", required=True,
                     help="JSON list of captions, or object keyed by row id, aligned with the index rows")
    imp.add_argument("--encoder", required=True, help="encoder the index was embedded with (e.g. open_clip:RN50x64)")
    imp.add_argument("--out", required=True, help="datastore directory to create")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    imp.set_defaults(func=run_import)

    info = verbs.add_parser("info", help="describe a datastore")
    info.add_argument("directory")
    info.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    info.set_defaults(func=run_info)

    search = verbs.add_parser("search", help="retrieve the captions nearest to images or texts")
    search.add_argument("directories", nargs="+", metavar="DIR", help="one datastore, or several to combine")
    search.add_argument("--image", nargs="+", action="extend", default=[],
                        help="image or video files to query with (repeatable)")
    search.add_argument("--text", nargs="+", action="extend", default=[], help="texts to query with (repeatable)")
    search.add_argument("--max-image-pixels", type=positive_int, default=PIL_MAX_IMAGE_PIXELS, metavar="N",
                        help="refuse (as a per-query error) images with more pixels than this (default %(default)s)")
    search.add_argument("-k", type=positive_int, default=10, help="captions per query (default %(default)s)")
    search.add_argument("--exclude", help="drop captions whose source id is this (the query image's own id)")
    search.add_argument("--encoder", help="query encoder (default: the one the datastore names)")
    search.add_argument("--device", default="auto")
    search.add_argument("--json", action="store_true", help="print results as JSON")
    search.set_defaults(func=run_search)

    retrieve = verbs.add_parser(
        "retrieve", help="retrieved captions for every image of a split, the --retrieved file of `smallcap train`",
        description="For each image of a dataset split: its K nearest captions, without the image's own ones "
                    "(--exclude-own, the default), the first KEEP kept; written as {image_id: [captions]}.")
    retrieve.add_argument("directories", nargs="+", metavar="DIR", help="one datastore, or several to combine")
    retrieve.add_argument("--data", required=True, help="annotation file (Karpathy, COCO, JSONL/CSV) or image folder")
    retrieve.add_argument("--split", default=None, help="split of DATA whose images are queried (e.g. train)")
    retrieve.add_argument("--images-dir", default=None, help="where the image files are (default: DATA's folder)")
    retrieve.add_argument("--encoder", help="query encoder (default: the one the datastore names)")
    retrieve.add_argument("--k", type=positive_int, default=15, help="nearest captions searched per image (default %(default)s)")
    retrieve.add_argument("--keep", type=positive_int, default=7, help="captions kept per image (default %(default)s)")
    retrieve.add_argument("--exclude-own", action=argparse.BooleanOptionalAction, default=True,
                          help="drop captions of the query image itself (default: on)")
    retrieve.add_argument("--batch-size", type=positive_int, default=256, help="images per encoder batch")
    retrieve.add_argument("--device", default="auto")
    retrieve.add_argument("--out", required=True, help="JSON file to write")
    retrieve.set_defaults(func=run_retrieve)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_build(args: argparse.Namespace) -> int:
    """`datastore build`."""
    from smallcap.retrieval.build import build_datastore

    splits = None if args.splits == "all" else [split for split in args.splits.split(",") if split]
    tokenizer = args.tokenizer
    if tokenizer is None and args.model is not None and args.max_tokens:
        from smallcap.loading import TOKENIZER_FILES

        directory = Path(local_snapshot(args.model))
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = args.model if bundled_path(args.model) else str(directory)
        # else a published checkpoint without its own tokenizer: its decoder is GPT-2, the default
    embedder = None
    if args.engine == "ray":
        from smallcap.scale.datastore import RayShardEmbedder

        embedder = RayShardEmbedder(args.encoder, device=args.device, batch_size=args.batch_size,
                                    num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
                                    address=args.address)
    store = build_datastore(
        args.inputs, args.out, args.encoder, index=args.index, max_tokens=args.max_tokens or None,
        tokenizer=tokenizer or DEFAULT_LENGTH_TOKENIZER, dedupe=args.dedupe, batch_size=args.batch_size, shard_size=args.shard_size,
        splits=splits, format=args.format, column=args.column, id_column=args.id_column, text=args.text,
        memory_budget=int(args.memory_budget * 2**30), overwrite=args.overwrite, device=_device(args.device),
        embedder=embedder)
    print(f"{store.directory}: {len(store)} captions, {store.manifest['index']['type']} index, {store.encoder_name}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    """`datastore import`."""
    from smallcap.retrieval.build import import_datastore

    store = import_datastore(args.index, args.captions, args.encoder, args.out, overwrite=args.overwrite)
    print(f"{store.directory}: {len(store)} captions, {store.manifest['index']['faiss']}, {store.encoder_name}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    """`datastore info`."""
    from smallcap.retrieval.datastore import Datastore

    store = Datastore.load(args.directory)
    manifest = store.manifest
    if args.json:
        print(json.dumps(manifest, indent=1, ensure_ascii=False))
        return 0
    index = manifest["index"]
    print(f"datastore   {store.directory}")
    print(f"captions    {len(store)}")
    print(f"encoder     {store.encoder_name} ({store.dim}-d, {manifest['encoder']['normalisation']})")
    print(f"index       {index['type']} ({index['faiss']}, {index['metric']}) {index['params']}")
    for item in manifest["inputs"]:
        print(f"input       {item['path']} ({item['records']} records, sha256 {item['sha256'][:12]})")
    if manifest.get("filters"):
        filters = manifest["filters"]
        print(f"filters     max_tokens={filters['max_tokens']} dedupe={filters['dedupe']} splits={filters['splits']}")
        print(f"counts      {filters['counts']}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    """`datastore search`."""
    from smallcap.retrieval.datastore import load_datastores
    from smallcap.retrieval.encoders import load_encoder

    if not args.image and not args.text:
        raise SmallCapError("nothing to search for: give --image FILE... and/or --text TEXT...")
    store = load_datastores(args.directories)
    encoder = load_encoder(args.encoder or store.encoder_name, device=_device(args.device))
    store.check_encoder(encoder)

    rows: list[dict] = [{"query": path} for path in args.image] + [{"query": text} for text in args.text]
    images, image_rows = [], []
    for row in rows[:len(args.image)]:
        try:
            images.append(load_image(row["query"], max_pixels=args.max_image_pixels))
            image_rows.append(row)
        except SmallCapError as error:
            row["error"] = str(error)
    text_rows = rows[len(args.image):]
    parts = [encoder.embed_images(images)] if images else []
    parts += [encoder.embed_texts(args.text)] if args.text else []
    answered = image_rows + text_rows
    if answered:
        own = None if args.exclude is None else [args.exclude] * len(answered)
        hits = store.search(np.concatenate(parts), args.k, exclude_source_ids=own)
        for q, row in enumerate(answered):
            row["results"] = [{"caption": c, "score": round(s, 6), "source_id": i}
                              for c, s, i in zip(hits.captions[q], hits.scores[q], hits.source_ids[q])]
    if args.json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
    else:
        for row in rows:
            print(row["query"])
            if "error" in row:
                print(f"  ERROR: {row['error']}")
            for rank, hit in enumerate(row.get("results", []), start=1):
                print(f"  {rank:2d}. {hit['score']:.4f}  {hit['caption']}  [{hit['source_id']}]")
    failed = [row for row in rows if "error" in row]
    for row in failed:
        print(f"smallcap datastore search: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def run_retrieve(args: argparse.Namespace) -> int:
    """`datastore retrieve`; exit code 1 if some images could not be read (the others are retrieved for)."""
    from smallcap.retrieval.retriever import retrieve_for_dataset

    unreadable: dict[str, str] = {}
    retrieved = retrieve_for_dataset(args.directories, args.data, args.out, split=args.split,
                                     images_dir=args.images_dir, encoder=args.encoder, k=args.k, keep=args.keep,
                                     exclude_own=args.exclude_own, batch_size=args.batch_size,
                                     device=_device(args.device), unreadable=unreadable)
    short = sum(len(captions) < args.keep for captions in retrieved.values())
    print(f"{args.out}: retrieved captions for {len(retrieved)} images"
          + (f" ({short} with fewer than {args.keep})" if short else "")
          + (f"; {len(unreadable)} could not be read" if unreadable else ""))
    for image_id, reason in unreadable.items():
        print(f"smallcap datastore retrieve: image {image_id}: {reason}", file=sys.stderr)
    return 1 if unreadable else 0
