"""`smallcap features extract`: cache the CLIP encoder states of a caption file's images for training."""

from __future__ import annotations

import argparse

from smallcap.cli.options import non_negative_int, positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser("features", help="the encoder-state cache used for training")
    verbs = parser.add_subparsers(dest="features_command", required=True, metavar="VERB")
    extract = verbs.add_parser("extract", help="encode the images of a caption file into a feature cache",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    extract.add_argument("data", help="caption file: COCO annotations, Karpathy json, .jsonl/.csv/.parquet")
    extract.add_argument("--model", required=True,
                         help="CLIP checkpoint or SmallCap checkpoint whose encoder to use (path or Hub id)")
    extract.add_argument("--out", required=True, help="cache directory (an interrupted extraction continues)")
    extract.add_argument("--images", help="image root directory (default: guessed from the caption file)")
    extract.add_argument("--split", help="split(s) to encode, comma-separated (default: the training split)")
    extract.add_argument("--fp16", action="store_true", help="store float16 states (and compute in fp16 on GPU)")
    extract.add_argument("--batch-size", type=positive_int, default=64)
    extract.add_argument("--workers", type=non_negative_int, default=0, help="image-decoding worker processes")
    extract.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    extract.set_defaults(func=run)


def run(args) -> int:
    from smallcap.features import extract_dataset_features

    report = extract_dataset_features(args.data, args.model, args.out, images=args.images, split=args.split,
                                      fp16=args.fp16, batch_size=args.batch_size, num_workers=args.workers,
                                      device=args.device)
    print(f"{args.out}: encoded {report.encoded} images, {report.cached} already cached, "
          f"{len(report.skipped)} skipped as unreadable")
    return 0
