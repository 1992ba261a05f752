"""`smallcap demo`: offline, the bundled mini SmallCap captions sample images with a source and a target datastore."""

from __future__ import annotations

import json
from dataclasses import asdict

from smallcap.cli.options import non_negative_int
from smallcap.errors import SmallCapError
from smallcap.images import expand_inputs


def register(subparsers) -> None:
    """Add the `demo` subcommand."""
    parser = subparsers.add_parser(
        "demo", help="offline demo: bundled mini model, sample images, source vs target datastore",
        description="Caption the bundled sample images of both miniworld domains with the bundled mini SmallCap "
                    "(trained on the source domain only), once with the source datastore and once with the target "
                    "datastore, and show the retrieved captions. Runs offline in seconds.")
    parser.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR", help="images to caption instead of the samples")
    parser.add_argument("--model", default="mini", help="SmallCap model (default: the bundled 'mini')")
    parser.add_argument("--datastore", action="append", metavar="DIR",
                        help="datastores to compare, repeatable (default: mini-source and mini-target)")
    parser.add_argument("--retrieved", type=non_negative_int, default=2, help="retrieved captions shown per datastore")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Caption and print; exit code 1 if an image could not be read."""

    import torch
    from transformers.utils import logging as transformers_logging

    from smallcap.demo import DEMO_DATASTORES, compare_datastores, format_rows, sample_images, sample_references

    images = expand_inputs(args.images) if args.images else sample_images()
    if not images:
        raise SmallCapError("no image files found in " + ", ".join(args.images))
    transformers_logging.disable_progress_bar()  # no "Loading weights" bars around a table of a few lines
    # The models are tiny: one thread is as fast, and on a busy machine idle OpenMP threads that spin made the
    # demo 3-4x slower.
    torch.set_num_threads(1)
    rows = compare_datastores(images, model=args.model, datastores=args.datastore or DEMO_DATASTORES)
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=1, ensure_ascii=False))
    else:
        print(format_rows(rows, args.retrieved, None if args.images else sample_references()))
    return 1 if any(row.error for row in rows) else 0
