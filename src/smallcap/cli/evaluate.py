"""`smallcap evaluate`: COCO caption metrics (and CLIPScore) of a predictions file against reference captions."""

from __future__ import annotations

import sys

from smallcap.errors import SmallCapError
from smallcap.evaluation import evaluate, format_table
from smallcap.io import atomic_write_json

DEFAULT_CLIP_ENCODER = "openai/clip-vit-base-patch32"  # smallcap.evaluation.DEFAULT_CLIP_ENCODER


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="BLEU, METEOR, ROUGE-L, CIDEr, SPICE (pycocoevalcap, offline), optionally CLIPScore",
        description="Score predicted captions against references with pycocoevalcap (x100), on the predicted "
                    "images only; nocaps-style references are also scored per domain. --clipscore adds "
                    "CLIPScore and RefCLIPScore (Hessel et al. 2021, x100), computed from the images.")
    parser.add_argument("--references", required=True, metavar="ANNOTATIONS",
                        help="COCO-format caption annotations, a Karpathy split file or MSR-VTT annotations "
                             "(see --split)")
    parser.add_argument("--predictions", required=True, metavar="PREDICTIONS",
                        help='JSON list of {"image_id": int or str, "caption": str}')
    parser.add_argument("--out", metavar="FILE", help="write the scores as JSON here")
    parser.add_argument("--per-image", metavar="FILE", help="write every image's scores as a JSON list here")
    parser.add_argument("--split", help="with a Karpathy or MSR-VTT file: use the images/videos of this split "
                                        "(e.g. test)")
    parser.add_argument("--metrics", default="BLEU,METEOR,ROUGE-L,CIDEr,SPICE",
                        help="comma-separated subset of BLEU,METEOR,ROUGE-L,CIDEr,SPICE,CLIPScore "
                             "(default: all but CLIPScore)")
    clip = parser.add_argument_group("CLIPScore")
    clip.add_argument("--clipscore", action="store_true",
                      help="add CLIPScore and RefCLIPScore to the metrics (needs --images-dir)")
    clip.add_argument("--images-dir", metavar="DIR",
                      help="folder of the images or videos: the references' file names, or <image_id>.<ext>")
    clip.add_argument("--clip-encoder", default=DEFAULT_CLIP_ENCODER, metavar="NAME",
                      help="HF CLIP id/path or open_clip:ARCH[/PRETRAINED] (default %(default)s)")
    clip.add_argument("--device", default="auto", help="device for the CLIP model (default: cuda if available)")
    parser.set_defaults(func=run)


def run(args) -> int:
    metrics = [m for m in args.metrics.split(",") if m.strip()] + (["CLIPScore"] if args.clipscore else [])
    if args.images_dir and not args.clipscore and not any("clip" in m.lower() for m in metrics):
        raise SmallCapError("--images-dir is only used by CLIPScore; add --clipscore")
    result = evaluate(args.references, args.predictions, per_image=bool(args.per_image), metrics=metrics,
                      split=args.split, images_dir=args.images_dir, clip_encoder=args.clip_encoder,
                      device=args.device)
    for warning in result["warnings"]:
        print(f"smallcap evaluate: warning: {warning}", file=sys.stderr)
    per_image = result.pop("per_image", None)
    if args.per_image:
        atomic_write_json(args.per_image, per_image)
    if args.out:
        atomic_write_json(args.out, result)
    print(format_table(result))
    return 0
