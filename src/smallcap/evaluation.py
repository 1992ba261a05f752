"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE) computed with pycocoevalcap, offline,
and on request CLIPScore / RefCLIPScore (`smallcap.clipscore`), which also look at the images.

`evaluate(references, predictions)` gives the numbers pycocoevalcap's `COCOEvalCap` gives on the same
inputs, x100, restricted to the predicted images; nocaps-style references (a `domain` on each image) are
scored per domain as well. References are COCO caption annotations, Karpathy split files or MSR-VTT
annotations, read by `smallcap.data` (raw text). Every metric is one function in `SCORERS` taking a `Batch`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from smallcap.data import coco_images, expected_form, json_format, load_json, parse_image_id, read_caption_data
from smallcap.errors import SmallCapError, require_extra
from smallcap.io import is_parquet, read_parquet_rows

ImageId = int | str
# Each metric and the scores it reports, in table order.
METRIC_SCORES = {"BLEU": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"), "METEOR": ("METEOR",),
                 "ROUGE-L": ("ROUGE-L",), "CIDEr": ("CIDEr",), "SPICE": ("SPICE",),
                 "CLIPScore": ("CLIPScore", "RefCLIPScore")}
METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr", "SPICE")  # the default; CLIPScore also needs images and a CLIP
DEFAULT_CLIP_ENCODER = "openai/clip-vit-base-patch32"  # the CLIP of Hessel et al.'s CLIPScore
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
JAVA_HINT = "Java 8+ (e.g. `apt-get install default-jre-headless`)"
# Characters that Java's PTBTokenizer (-preserveLines) reads as line ends. pycocoevalcap replaces only "\n",
# so one of these inside a caption shifts every later caption onto the wrong image, silently.
_LINE_BREAKS = {ord(c): " " for c in "\n\r\x0b\x0c\u2028\u2029"}

REFERENCE_FORMATS = ("coco", "karpathy", "msrvtt")  # the smallcap.data formats that hold references
PREDICTIONS_FORM = 'a JSON list of {"image_id": int or str, "caption": str}'


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class References:
    """Reference captions per image in file order, and each image's nocaps-style domain and file name where
    given (COCO `file_name`, Karpathy `filepath/filename`)."""

    captions: dict[ImageId, list[str]]
    domains: dict[ImageId, str] = field(default_factory=dict)
    source: str = "references"
    files: dict[ImageId, str] = field(default_factory=dict)


def _describe(data: Any) -> str:
    if isinstance(data, dict):
        return "a JSON object with keys " + ", ".join(map(repr, list(data)[:8]))
    kinds = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
    return f"a JSON {kinds.get(type(data), type(data).__name__)}"


def load_references(source: str | os.PathLike | dict | References, split: str | None = None) -> References:
    """Read COCO-format caption annotations, a Karpathy split file or MSR-VTT annotations (only the images or
    videos of `split`, if given), through `smallcap.data` with its "raw" text rule: the references as written,
    whitespace collapsed (pycocoevalcap's tokenizer splits on whitespace, so the scores are unchanged)."""
    if isinstance(source, References):
        return source
    name = "references" if isinstance(source, dict) else str(source)
    data = source if isinstance(source, dict) else load_json(source, "references")
    fmt = json_format(data)
    if fmt not in REFERENCE_FORMATS:
        hint = ""
        if isinstance(data, list) and data and isinstance(data[0], dict) and "image_id" in data[0]:
            hint = " (this looks like a predictions file; are --references and --predictions swapped?)"
        raise SmallCapError(f"{name} is not a references file: expected {expected_form('coco')}, "
                            f"{expected_form('karpathy')} or {expected_form('msrvtt')}; got {_describe(data)}{hint}")
    if fmt == "coco" and split is not None:
        raise SmallCapError(f"{name}: --split applies to Karpathy and MSR-VTT files; this is COCO-format "
                            "annotations, whose images are all used")
    captions: dict[ImageId, list[str]] = {}
    domains: dict[ImageId, str] = {}
    files: dict[ImageId, str] = {}
    if fmt == "coco":  # every listed image, in file order, with its nocaps-style domain
        for image_id, image in coco_images(data, name).items():
            captions[image_id] = []
            if image.get("domain"):
                domains[image_id] = str(image["domain"])
    splits = set()
    for record in read_caption_data(data, name, fmt, text="raw"):
        splits.add(str(record.split))
        if split is not None and record.split != split:
            continue
        image_id = parse_image_id(record.image_id, name)
        captions.setdefault(image_id, []).append(record.caption)
        if record.image_file:
            files.setdefault(image_id, record.image_file)
    if not captions and split is not None:
        kind = "video" if fmt == "msrvtt" else "image"
        raise SmallCapError(f"{name}: no {kind} has split {split!r}; splits in the file: {', '.join(sorted(splits))}")
    return References(captions, domains, name, files)


def load_predictions(source: str | os.PathLike | Sequence[dict]) -> dict[ImageId, str]:
    """Read `[{"image_id": ..., "caption": str}, ...]` (a JSON file, or a Parquet table with these columns as
    `predict --out X.parquet` writes) into {image_id: caption}; duplicate ids are an error."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else "predictions"
    if isinstance(source, (str, os.PathLike)):
        data = read_parquet_rows(source) if is_parquet(source) else load_json(source, "predictions")
    else:
        data = source
    if not isinstance(data, list):
        raise SmallCapError(f"{name}: expected {PREDICTIONS_FORM}; got {_describe(data)}")
    predictions: dict[ImageId, str] = {}
    duplicates: list[ImageId] = []
    for index, item in enumerate(data):
        if not isinstance(item, dict) or "image_id" not in item or not isinstance(item.get("caption"), str):
            raise SmallCapError(f"{name}: item {index} is {json.dumps(item)[:80]}; expected {PREDICTIONS_FORM}")
        image_id = parse_image_id(item["image_id"], f"{name}: item {index}")
        if image_id in predictions:
            duplicates.append(image_id)
        predictions[image_id] = item["caption"]
    if duplicates:
        raise SmallCapError(f"{name}: {len(duplicates)} duplicate image ids (e.g. {_some(duplicates)}); "
                            "give one caption per image")
    if not predictions:
        raise SmallCapError(f"{name}: no predictions; expected {PREDICTIONS_FORM}")
    return predictions


def _some(ids: Iterable, n: int = 5) -> str:
    ids = list(dict.fromkeys(ids))
    return ", ".join(map(str, ids[:n])) + (", ..." if len(ids) > n else "")


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class Batch:
    """What a metric sees: image ids in order, PTB-tokenised references and predictions (only cleaned when no
    metric reads them), raw predictions and references, and for CLIPScore a scorer that knows the images
    (`smallcap.clipscore.CLIPScorer`)."""

    ids: list[ImageId]
    refs: dict[ImageId, list[str]]
    preds: dict[ImageId, list[str]]
    raw_preds: dict[ImageId, str]
    raw_refs: dict[ImageId, list[str]] = field(default_factory=dict)
    clip_scorer: Callable | None = None

    def subset(self, ids: list[ImageId]) -> "Batch":
        """The same batch restricted to `ids` (a nocaps domain)."""
        return Batch(ids, {i: self.refs[i] for i in ids}, {i: self.preds[i] for i in ids},
                     {i: self.raw_preds[i] for i in ids}, {i: self.raw_refs[i] for i in ids}, self.clip_scorer)


class MetricUnavailable(Exception):
    """A metric that cannot run here; the message says why and how to make it run."""


Scores = tuple[dict[str, float], dict[str, list[float]]]  # corpus scores, per-image scores in batch order


def _pycocoevalcap(submodule: str) -> ModuleType:
    """pycocoevalcap's `submodule`; the `eval` extra installs it."""
    return require_extra(f"pycocoevalcap.{submodule}", "eval", "Computing caption metrics")


def _bleu(batch: Batch) -> Scores:
    corpus, per_image = _pycocoevalcap("bleu.bleu").Bleu(4).compute_score(batch.refs, batch.preds, verbose=0)
    names = METRIC_SCORES["BLEU"]
    return dict(zip(names, corpus)), dict(zip(names, per_image))


_meteor_process: Any = None  # the running METEOR scorer of this process, reused between evaluations


def _meteor_scorer() -> Any:
    """pycocoevalcap's METEOR scorer, started once per process: its Java start and paraphrase-table load take
    5-15 s, the scoring itself well under a second for a few hundred images. A scorer whose Java process died, or
    one inherited through fork, is replaced."""
    global _meteor_process
    scorer = _meteor_process
    if scorer is None or scorer.owner != os.getpid() or scorer.meteor_p.poll() is not None:
        Meteor = _pycocoevalcap("meteor.meteor").Meteor

        class ReusableMeteor(Meteor):
            """pycocoevalcap's Meteor that a forked child never stops (the parent's Java process is not its)."""

            def __init__(self):
                super().__init__()
                self.owner = os.getpid()

            def __del__(self):
                if os.getpid() == self.owner:
                    self.meteor_p.kill()
                    self.meteor_p.wait()

        scorer = _meteor_process = ReusableMeteor()
    return scorer


def _meteor(batch: Batch) -> Scores:
    global _meteor_process
    scorer = _meteor_scorer()
    try:
        corpus, per_image = scorer.compute_score(batch.refs, batch.preds)
    except (ValueError, OSError) as error:  # the Java process died: its replies are empty
        _meteor_process = None
        if scorer.lock.locked():
            scorer.lock.release()
        scorer.meteor_p.kill()
        message = scorer.meteor_p.stderr.read().decode(errors="replace").strip()[-2000:]
        raise SmallCapError(f"METEOR (pycocoevalcap's meteor-1.5.jar) failed: {error}\n{message}") from None
    return {"METEOR": corpus}, {"METEOR": per_image}


def _rouge(batch: Batch) -> Scores:
    corpus, per_image = _pycocoevalcap("rouge.rouge").Rouge().compute_score(batch.refs, batch.preds)
    return {"ROUGE-L": corpus}, {"ROUGE-L": list(per_image)}


def _cider(batch: Batch) -> Scores:
    corpus, per_image = _pycocoevalcap("cider.cider").Cider().compute_score(batch.refs, batch.preds)
    return {"CIDEr": corpus}, {"CIDEr": list(per_image)}


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here (its Stanford CoreNLP jars are missing), or None when it can.

    pycocoevalcap's Spice() downloads the jars on first use; that is never attempted here.
    """
    spice = _pycocoevalcap("spice.spice")
    lib = Path(spice.__file__).parent / "lib"
    missing = [jar for jar in SPICE_JARS if not (lib / jar).is_file()]
    if missing:
        return (f"Stanford CoreNLP 3.6.0 jars not found in {lib} ({', '.join(missing)}); run "
                "`python -m pycocoevalcap.spice.get_stanford_models` once with internet access to install "
                "them (about 400 MB), or copy them there")
    return None


def _spice(batch: Batch) -> Scores:
    reason = spice_unavailable_reason()
    if reason:
        raise MetricUnavailable(reason)
    try:
        corpus, per_image = _pycocoevalcap("spice.spice").Spice().compute_score(batch.refs, batch.preds)
    except subprocess.CalledProcessError as error:
        raise MetricUnavailable(f"SPICE's Java process failed with exit code {error.returncode} (its messages "
                                "are above); SPICE 1.0 is known to need Java 8 or 11") from None
    # Spice returns scores in sorted-id order.
    by_id = dict(zip(sorted(batch.ids), per_image))
    return {"SPICE": corpus}, {"SPICE": [by_id[i]["All"]["f"] for i in batch.ids]}


def _clipscore(batch: Batch) -> Scores:
    if batch.clip_scorer is None:
        raise MetricUnavailable("CLIPScore needs the images and a CLIP model: pass --clipscore --images-dir DIR "
                                "(evaluate(..., images_dir=DIR))")
    return batch.clip_scorer(batch.ids, batch.raw_preds, batch.raw_refs)


SCORERS: dict[str, Callable[[Batch], Scores]] = {
    "BLEU": _bleu, "METEOR": _meteor, "ROUGE-L": _rouge, "CIDEr": _cider, "SPICE": _spice, "CLIPScore": _clipscore,
}
PTB_METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr", "SPICE")  # those that read the PTB-tokenised captions


def _resolve_metrics(metrics: Iterable[str]) -> list[str]:
    canonical = {name.lower().replace("_", "-"): name for name in SCORERS}
    canonical.update({"rouge": "ROUGE-L", "cider-d": "CIDEr", "refclipscore": "CLIPScore", "clip-s": "CLIPScore"})
    resolved = []
    for name in metrics:
        key = name.strip().lower().replace("_", "-")
        if key not in canonical:
            raise SmallCapError(f"unknown metric {name!r}; choose from {', '.join(SCORERS)}")
        resolved.append(canonical[key])
    return [name for name in SCORERS if name in resolved]


def _require_java() -> None:
    if shutil.which("java") is None:
        raise SmallCapError(f"`java` was not found on PATH; pycocoevalcap's PTB tokenizer and METEOR run on "
                            f"Java. Install {JAVA_HINT} and make sure `java` is on PATH")


def _clean(texts: dict[ImageId, list[str]], what: str, warnings: list[str]) -> dict[ImageId, list[str]]:
    """Make captions safe for the Java tools: line-break characters become spaces, unpaired surrogates '?'."""
    breaks = surrogates = 0
    cleaned = {}
    for image_id, captions in texts.items():
        out = []
        for caption in captions:
            flat = caption.translate(_LINE_BREAKS)
            breaks += flat != caption.replace("\n", " ")
            safe = flat.encode("utf-8", "replace").decode("utf-8")
            surrogates += safe != flat
            out.append(safe)
        cleaned[image_id] = out
    if breaks:
        warnings.append(f"{breaks} {what} contained line-break characters (\\r, \\v, \\f, U+2028, U+2029) that "
                        "pycocoevalcap's tokenizer splits lines on; replaced them with spaces")
    if surrogates:
        warnings.append(f"{surrogates} {what} contained unpaired UTF-16 surrogates; replaced them with '?'")
    return cleaned


def _tokenize(refs: dict[ImageId, list[str]], preds: dict[ImageId, list[str]]) -> tuple[dict, dict]:
    """PTB-tokenise references and predictions in one Java run, checking every caption came back."""
    PTBTokenizer = _pycocoevalcap("tokenizer.ptbtokenizer").PTBTokenizer
    inputs = {("ref", i): [{"caption": c} for c in caps] for i, caps in refs.items()}
    inputs.update({("pred", i): [{"caption": c} for c in caps] for i, caps in preds.items()})
    try:
        tokens = PTBTokenizer().tokenize(inputs)
    except OSError as error:
        raise SmallCapError(f"could not run pycocoevalcap's PTB tokenizer (Java): {error}") from None
    if any(len(tokens.get(key, ())) != len(value) for key, value in inputs.items()):
        raise SmallCapError("pycocoevalcap's PTB tokenizer (Java) did not return one line per caption; "
                            f"see its messages above (needs {JAVA_HINT})")
    return ({i: tokens[("ref", i)] for i in refs}, {i: tokens[("pred", i)] for i in preds})


def _run_metrics(batch: Batch, metrics: list[str], unavailable: dict[str, str]) -> tuple[dict, dict]:
    scores: dict[str, float | None] = {}
    per_image: dict[str, list[float]] = {}
    for name in tqdm(metrics, desc="metrics", unit="metric", disable=None, leave=False):
        if name in unavailable:
            continue
        try:
            corpus, images = SCORERS[name](batch)
        except MetricUnavailable as reason:
            unavailable[name] = str(reason)
            continue
        scores.update({key: _x100(value) for key, value in corpus.items()})
        per_image.update({key: [_x100(v) for v in values] for key, values in images.items()})
    return {n: scores.get(n) for metric in metrics for n in METRIC_SCORES[metric]}, per_image


def _x100(value: float) -> float | None:
    value = float(value)
    return None if value != value else 100 * value  # NaN (SPICE on an unparsable caption) -> None


def evaluate(references: str | os.PathLike | dict | References, predictions: str | os.PathLike | Sequence[dict],
             per_image: bool = False, metrics: Iterable[str] = METRICS, split: str | None = None,
             images_dir: str | os.PathLike | None = None, clip_encoder: Any = DEFAULT_CLIP_ENCODER,
             device: str = "auto") -> dict:
    """Score `predictions` against `references` with pycocoevalcap; every score x100.

    Only the predicted images are scored. "CLIPScore" in `metrics` adds CLIPScore and RefCLIPScore
    (`smallcap.clipscore`), computed with `clip_encoder` (a retrieval encoder name, path or object) on the
    images in `images_dir`, on `device` ("auto": cuda if available).
    Returns {"num_images", "scores": {name: value or None}, "unavailable": {metric: reason}, "warnings": [...]},
    plus "domains": {domain: {"num_images", "scores"}} when the references give images a nocaps-style
    `domain`, and "per_image": [{"image_id", "caption", name: value, ...}] when `per_image` is set.
    """
    metrics = _resolve_metrics(metrics)
    if any(name in PTB_METRICS for name in metrics):
        _pycocoevalcap("tokenizer.ptbtokenizer")  # a missing extra fails before any work
    refs = load_references(references, split)
    preds = load_predictions(predictions)
    unknown = [i for i in preds if i not in refs.captions]
    if unknown:
        raise SmallCapError(f"{len(unknown)} of {len(preds)} predicted image ids are not in {refs.source} "
                            f"(e.g. {_some(unknown)}); are these predictions for this dataset"
                            f"{' and split' if split else ''}?")
    ids = [i for i in refs.captions if i in preds]  # reference order, as COCOEvalCap uses
    no_refs = [i for i in ids if not refs.captions[i]]
    if no_refs:
        raise SmallCapError(f"{len(no_refs)} predicted images have no reference captions in {refs.source} "
                            f"(e.g. {_some(no_refs)})")
    warnings: list[str] = []
    empty = [i for i in ids if not preds[i].strip()]
    if empty:
        warnings.append(f"{len(empty)} predictions have an empty caption (image ids {_some(empty)}); "
                        "scored as empty")
    clip_scorer = _clip_scorer(refs, ids, images_dir, clip_encoder, device) if "CLIPScore" in metrics else None
    ref_texts = _clean({i: refs.captions[i] for i in ids}, "reference captions", warnings)
    pred_texts = _clean({i: [preds[i]] for i in ids}, "predicted captions", warnings)
    if any(name in PTB_METRICS for name in metrics):
        _require_java()
        ref_texts, pred_texts = _tokenize(ref_texts, pred_texts)
    batch = Batch(ids, ref_texts, pred_texts, {i: preds[i] for i in ids}, {i: refs.captions[i] for i in ids},
                  clip_scorer)

    unavailable: dict[str, str] = {}
    scores, image_scores = _run_metrics(batch, metrics, unavailable)
    result: dict[str, Any] = {"num_images": len(ids), "scores": scores}
    domains = {i: refs.domains.get(i, "(no domain)") for i in ids} if refs.domains else {}
    if domains:
        result["domains"] = {}
        for domain in sorted(set(domains.values())):
            subset = [i for i in ids if domains[i] == domain]
            domain_scores, _ = _run_metrics(batch.subset(subset), metrics, unavailable)
            result["domains"][domain] = {"num_images": len(subset), "scores": domain_scores}
    result["unavailable"] = unavailable
    result["warnings"] = warnings
    if per_image:
        result["per_image"] = [
            {"image_id": i, **({"domain": domains[i]} if domains else {}), "caption": preds[i],
             **{name: image_scores[name][n] if name in image_scores else None for name in scores}}
            for n, i in enumerate(ids)]
    return result


def _clip_scorer(refs: References, ids: list[ImageId], images_dir: str | os.PathLike | None, encoder: Any,
                 device: str) -> Callable:
    from smallcap.clipscore import CLIPScorer, find_images
    from smallcap.retrieval.encoders import load_encoder

    if images_dir is None:
        raise SmallCapError("CLIPScore needs the images: pass --images-dir DIR (evaluate(..., images_dir=DIR))")
    images = find_images(ids, refs.files, images_dir, refs.source)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    named = isinstance(encoder, (str, os.PathLike))
    return CLIPScorer(load_encoder(str(encoder), device=device) if named else encoder, images)


def format_table(result: dict) -> str:
    """The scores of `evaluate` as a fixed-width table: one row overall, one per domain."""
    names = list(result["scores"])
    rows = [("all", result["num_images"], result["scores"])]
    rows += [(domain, d["num_images"], d["scores"]) for domain, d in result.get("domains", {}).items()]
    width = max(len(row[0]) for row in rows) + 2
    cell = {name: max(9, len(name) + 2) for name in names}
    lines = [f"{'':<{width}}{'images':>7}" + "".join(f"{name:>{cell[name]}}" for name in names)]
    for label, count, scores in rows:
        cells = "".join(f"{'n/a' if scores.get(n) is None else format(scores[n], '.2f'):>{cell[n]}}" for n in names)
        lines.append(f"{label:<{width}}{count:>7}{cells}")
    lines += [f"{name} unavailable: {reason}" for name, reason in result.get("unavailable", {}).items()]
    return "\n".join(lines)
