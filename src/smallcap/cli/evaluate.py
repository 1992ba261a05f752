"""`smallcap evaluate`: COCO caption metrics of a predictions file against reference captions."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="BLEU, METEOR, ROUGE-L, CIDEr, SPICE of predicted captions (pycocoevalcap, offline)",
        description="Score predicted captions against references with pycocoevalcap (x100), on the predicted "
                    "images only; nocaps-style references are also scored per domain.")
    parser.add_argument("--references", required=True, metavar="ANNOTATIONS",
                        help="COCO-format caption annotations, or a Karpathy split file (see --split)")
    parser.add_argument("--predictions", required=True, metavar="PREDICTIONS",
                        help='JSON list of {"image_id": int, "caption": str}')
    parser.add_argument("--out", metavar="FILE", help="write the scores as JSON here")
    parser.add_argument("--per-image", metavar="FILE", help="write every image's scores as a JSON list here")
    parser.add_argument("--split", help="with a Karpathy split file: use the images of this split (e.g. test)")
    parser.add_argument("--metrics", default="BLEU,METEOR,ROUGE-L,CIDEr,SPICE",
                        help="comma-separated subset of BLEU,METEOR,ROUGE-L,CIDEr,SPICE (default: all)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from smallcap.evaluation import evaluate, format_table
    from smallcap.io import atomic_write_json

    result = evaluate(args.references, args.predictions, per_image=bool(args.per_image),
                      metrics=[m for m in args.metrics.split(",") if m.strip()], split=args.split)
    for warning in result["warnings"]:
        print(f"smallcap evaluate: warning: {warning}", file=sys.stderr)
    per_image = result.pop("per_image", None)
    if args.per_image:
        atomic_write_json(args.per_image, per_image)
    if args.out:
        atomic_write_json(args.out, result)
    print(format_table(result))
    return 0
