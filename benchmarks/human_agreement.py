"""Human-agreement baseline on COCO val2017: one human caption per image scored against the other four.

Each image's caption with the smallest annotation id is the "prediction", the image's other captions the
references; scored with `smallcap.evaluation.evaluate` (pycocoevalcap). Writes
benchmarks/results/human_agreement.json with the scores and the wall time of the evaluation.

    python benchmarks/human_agreement.py [--annotations ../shared/data/coco/captions_val2017.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from smallcap.evaluation import evaluate, format_table
from smallcap.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def split_one_human(annotations: dict) -> tuple[dict, list[dict]]:
    """(references without each image's first caption, that first caption as the prediction)."""
    by_image: dict[int, list[dict]] = {}
    for ann in sorted(annotations["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann)
    images = annotations["images"]
    predictions = [{"image_id": img["id"], "caption": by_image[img["id"]][0]["caption"]} for img in images]
    references = {"images": images, "annotations": [a for img in images for a in by_image[img["id"]][1:]]}
    return references, predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=Path,
                        default=ROOT.parent / "shared" / "data" / "coco" / "captions_val2017.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "human_agreement.json")
    args = parser.parse_args()

    references, predictions = split_one_human(json.loads(args.annotations.read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        preds = Path(tmp) / "predictions.json"
        preds.write_text(json.dumps(predictions))
        start = time.perf_counter()
        result = evaluate(references, preds)
        seconds = time.perf_counter() - start
    print(format_table(result))
    atomic_write_json(args.out, {
        "what": "one human caption per COCO val2017 image (smallest annotation id) against the image's other "
                "captions, pycocoevalcap metrics x100",
        "annotations": args.annotations.name,
        "num_images": result["num_images"],
        "num_references": len(references["annotations"]),
        "scores": result["scores"],
        "unavailable": result["unavailable"],
        "evaluate_seconds": round(seconds, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    })


if __name__ == "__main__":
    main()
