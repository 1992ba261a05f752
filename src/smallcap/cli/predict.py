"""`smallcap predict`: caption a whole split into the standard predictions file."""

from __future__ import annotations

import sys
from pathlib import Path

from smallcap.cli.caption import (RECORDED_DEFAULTS, add_captioner_arguments, build_captioner, captioner_options,
                                  captioner_settings, check_precision_arguments)
from smallcap.cli.options import positive_int
from smallcap.data import dataset_images
from smallcap.errors import SmallCapError
from smallcap.io import check_output_dir, check_output_file


def register(subparsers) -> None:
    """Add the `predict` subcommand."""
    parser = subparsers.add_parser(
        "predict", help="caption every image of a split into [{image_id, caption}]",
        description="Caption a split (Karpathy, COCO, JSONL/CSV, MSR-VTT annotations), an image folder or an "
                    "image list; resumable: a re-run skips images already captioned.")
    parser.add_argument("data", metavar="DATA", nargs="+",
                        help="annotation file, folder of images/videos, or image list (a Parquet/CSV/TSV table of "
                             "paths, no caption column); with --engine ray also several, globs and WebDataset tars "
                             "(shards/{00000..00099}.tar)")
    parser.add_argument("--split", default=None, help="split to caption (Karpathy/MSR-VTT/tables with a split)")
    parser.add_argument("--format", default=None, help="annotation format (default: detected)")
    parser.add_argument("--images-dir", type=Path, default=None, help="where image files are (default: DATA's folder)")
    parser.add_argument("--features", type=Path, default=None, help="feature cache made by `smallcap features extract`")
    parser.add_argument("--out", type=Path, required=True, metavar="PREDS.json",
                        help="predictions file: JSON, or a Parquet table (image_id, caption) when it ends in .parquet "
                             "or .pq (needs smallcap[parquet]); its settings are recorded in PREDS.json.settings.json "
                             "and a rerun with other settings is refused")
    parser.add_argument("--overwrite", action="store_true", help="start --out again instead of resuming it")
    add_captioner_arguments(parser)
    scale = parser.add_argument_group("scale-out (--engine ray, needs smallcap[ray])")
    scale.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local: this process (default); ray: a Ray Data job, one output file per input shard")
    scale.add_argument("--address", default=None,
                       help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (default: start a local one)")
    scale.add_argument("--num-workers", type=positive_int, default=1, help="captioning actors (default 1)")
    scale.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per captioning actor (default 0)")
    scale.add_argument("--output-dir", type=Path, default=None,
                       help="per-shard outputs (JSONL, or Parquet when --out is), reused by a rerun "
                            "(default: PREDS.json.shards/)")
    scale.add_argument("--shard-size", type=positive_int, default=1000,
                       help="images per output shard for inputs that are not tar files (default 1000)")
    parser.set_defaults(func=run, validate=check_precision_arguments)


def run(args) -> int:
    """Predict; exit code 1 if some images could not be captioned (they are retried on a re-run)."""
    from smallcap.prediction import check_resume_settings, predict

    check_output_file(args.out, "--out")
    if args.engine == "ray":
        return run_on_ray(args)
    if len(args.data) > 1:
        raise SmallCapError(f"{len(args.data)} DATA inputs given; several inputs need --engine ray")
    images = dataset_images(args.data[0], split=args.split, images_dir=args.images_dir, format=args.format)
    check_resume_settings(args.out, captioner_settings(args), overwrite=args.overwrite,
                          recorded_defaults=RECORDED_DEFAULTS)
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
    report = predict(captioner, images, args.out, retrieved=retrieved, features=features, batch_size=args.batch_size,
                     overwrite=args.overwrite)
    print(f"smallcap predict: {report.captioned} captioned, {report.resumed} already done, "
          f"{len(report.failed)} failed -> {report.output}", file=sys.stderr)
    for image_id, reason in report.failed.items():
        print(f"smallcap predict: image {image_id}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


def run_on_ray(args) -> int:
    """`predict --engine ray`: plan input shards, run the Ray Data job, merge into --out."""
    from smallcap.scale.predict import predict_on_ray
    from smallcap.scale.sources import plan_shards

    if args.features is not None or args.retrieved is not None:
        raise SmallCapError("--features and --retrieved are not supported with --engine ray; retrieval runs in "
                            "the captioning workers (--datastore) or is off (--no-retrieval)")
    if args.output_dir is not None:
        check_output_dir(args.output_dir, "--output-dir")
    shards = plan_shards(args.data, split=args.split, images_dir=args.images_dir, format=args.format,
                         shard_size=args.shard_size)
    options = captioner_options(args)
    report = predict_on_ray(shards, args.out, options, output_dir=args.output_dir, address=args.address,
                            num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
                            batch_size=args.batch_size, overwrite=args.overwrite)
    print(f"smallcap predict: {report.shards_done} shards captioned, {report.shards_resumed} already done, "
          f"{report.captioned} images, {len(report.failed)} failed -> {report.output}", file=sys.stderr)
    for image_id, reason in report.failed.items():
        print(f"smallcap predict: image {image_id}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0
