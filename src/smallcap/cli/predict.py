"""`smallcap predict`: caption a whole split into the standard predictions file."""

from __future__ import annotations

import sys
from pathlib import Path

from smallcap.cli.caption import add_captioner_arguments, build_captioner


def register(subparsers) -> None:
    """Add the `predict` subcommand."""
    parser = subparsers.add_parser(
        "predict", help="caption every image of a split into [{image_id, caption}]",
        description="Caption a split (Karpathy, COCO, JSONL/CSV, MSR-VTT annotations, or an image folder); "
                    "resumable: a re-run skips images already captioned.")
    parser.add_argument("data", metavar="DATA", help="annotation file or folder of images/videos")
    parser.add_argument("--split", default=None, help="split to caption (Karpathy/MSR-VTT/tables with a split)")
    parser.add_argument("--format", default=None, help="annotation format (default: detected)")
    parser.add_argument("--images-dir", type=Path, default=None, help="where image files are (default: DATA's folder)")
    parser.add_argument("--features", type=Path, default=None, help="feature cache made by `smallcap features extract`")
    parser.add_argument("--out", type=Path, required=True, metavar="PREDS.json")
    add_captioner_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    """Predict; exit code 1 if some images could not be captioned (they are retried on a re-run)."""
    from smallcap.prediction import dataset_images, predict

    images = dataset_images(args.data, split=args.split, images_dir=args.images_dir, format=args.format)
    captioner = build_captioner(args)
    features = None
    if args.features is not None:
        from smallcap.features import EncoderInfo, FeatureCache

        features = FeatureCache(args.features)
        features.check_encoder(EncoderInfo.of(captioner.model.encoder))
    if args.retrieved:
        from smallcap.retrieval.datastore import load_retrieved

        retrieved = load_retrieved(args.retrieved)
    else:
        retrieved = None
    report = predict(captioner, images, args.out, retrieved=retrieved, features=features, batch_size=args.batch_size)
    print(f"smallcap predict: {report.captioned} captioned, {report.resumed} already done, "
          f"{len(report.failed)} failed -> {report.output}", file=sys.stderr)
    for image_id, reason in report.failed.items():
        print(f"smallcap predict: image {image_id}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0
