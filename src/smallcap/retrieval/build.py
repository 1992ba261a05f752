"""Creating caption datastores: build one from caption files (resumable), or import a published one.

Build pipeline: read caption files -> drop empty / over-long (GPT-2 tokens, counted per caption) /
optionally duplicate captions -> embed in shards written to a work directory next to the output ->
build the FAISS index from the shards -> write the datastore directory atomically -> delete the work
directory. A killed build, rerun with the same arguments, reuses the finished shards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

import smallcap
from smallcap.data import DATASTORE_SPLITS, DATASTORE_TEXT, CaptionRecord, image_id_key, load_json, read_captions
from smallcap.errors import SmallCapError
from smallcap.hub import explain_load_errors, resolve_pretrained
from smallcap.io import atomic_directory, atomic_open, atomic_write_json, check_output_dir
from smallcap.retrieval.datastore import FORMAT, FORMAT_VERSION, INDEX_FILE, Datastore, StringColumn
from smallcap.retrieval.encoders import RetrievalEncoder, canonical_encoder_name, load_encoder
from smallcap.retrieval.index import (
    DEFAULT_MEMORY_BUDGET,
    IndexSpec,
    build_index,
    choose_index,
    describe,
    read_index,
    spec_of_index,
    train_sample_size,
)

DEFAULT_SHARD_SIZE = 16384
DEFAULT_LENGTH_TOKENIZER = "gpt2"
# Embeds (shard number, captions) jobs, yielding (shard number, float32 vectors) in any order.
ShardEmbedder = Callable[[list[tuple[int, list[str]]]], Iterator[tuple[int, np.ndarray]]]


@dataclass
class Selection:
    """The captions kept for a datastore and how many each filter removed."""

    records: list[CaptionRecord]
    counts: dict[str, int] = field(default_factory=dict)


def load_length_tokenizer(name: str = DEFAULT_LENGTH_TOKENIZER):
    """The decoder's tokenizer (Hub id or directory; GPT-2, OPT or XGLM), used to measure caption lengths."""
    from transformers import AutoTokenizer, GPT2Tokenizer


    if not Path(name).expanduser().is_dir():
        name = resolve_pretrained(name, what="tokenizer")
    with explain_load_errors(name, "tokenizer"):
        try:
            return AutoTokenizer.from_pretrained(name)
        except ValueError:  # a directory with only vocab.json + merges.txt has no fast-tokenizer file
            return GPT2Tokenizer.from_pretrained(name)


def token_lengths(tokenizer, captions: Sequence[str], chunk: int = 4096) -> np.ndarray:
    """Number of tokens of each caption encoded on its own (no padding, no special tokens)."""
    lengths = []
    for start in range(0, len(captions), chunk):
        ids = tokenizer(list(captions[start:start + chunk]), add_special_tokens=False)["input_ids"]
        lengths.extend(len(row) for row in ids)
    return np.asarray(lengths, dtype=np.int64)


def select_captions(records: Sequence[CaptionRecord], tokenizer=None, max_tokens: int | None = 25,
                    dedupe: bool = False) -> Selection:
    """Keep non-empty captions of at most `max_tokens` tokens (None: no limit), optionally first copies only."""
    counts = {"read": len(records), "empty": 0, "too_long": 0, "duplicate": 0}
    kept = [record for record in records if record.caption]
    counts["empty"] = len(records) - len(kept)
    if max_tokens is not None and kept:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to filter by max_tokens")
        lengths = token_lengths(tokenizer, [record.caption for record in kept])
        counts["too_long"] = int((lengths > max_tokens).sum())
        kept = [record for record, length in zip(kept, lengths) if length <= max_tokens]
    if dedupe:
        first = {}
        for record in kept:
            first.setdefault(record.caption, record)
        counts["duplicate"] = len(kept) - len(first)
        kept = list(first.values())  # dicts keep insertion order: first copies, in input order
    counts["kept"] = len(kept)
    return Selection(kept, counts)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


DATASTORE_FILES = {INDEX_FILE, "manifest.json", "captions.txt", "captions.offsets.npy", "source_ids.txt",
                   "source_ids.offsets.npy", "source_files.npy"}


def _check_out_dir(out_dir: Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any work, an output that exists (without `overwrite`) or that `overwrite` must not
    replace: only a datastore (its manifest and files, nothing else) or an empty directory is replaced; never
    the working directory or one of its parents, a file, or a folder holding the inputs or other files."""
    if not out_dir.exists():
        check_output_dir(out_dir, "output")
        return
    if not overwrite:
        raise SmallCapError(f"output {out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    resolved = out_dir.resolve()
    refuse = f"refusing to replace {out_dir} with --overwrite:"
    if not resolved.is_dir():
        raise SmallCapError(f"{refuse} it is a file, not a datastore directory")
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise SmallCapError(f"{refuse} it is the current directory or one of its parents; give a new directory")
    for path in inputs:
        if resolved in Path(path).resolve().parents:
            raise SmallCapError(f"{refuse} it holds the input {path}; give a new directory")
    entries = {entry.name for entry in resolved.iterdir()}
    if not entries:
        return
    if "manifest.json" not in entries:
        raise SmallCapError(f"{refuse} it is not a smallcap datastore (no manifest.json) and not empty; "
                            "--overwrite only replaces a datastore")
    try:
        manifest_format = json.loads((resolved / "manifest.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        manifest_format = None
    if manifest_format != FORMAT:
        raise SmallCapError(f"{refuse} its manifest.json is not a smallcap datastore's; --overwrite only "
                            "replaces a datastore")
    others = sorted(entries - DATASTORE_FILES)
    if others:
        raise SmallCapError(f"{refuse} besides the datastore it holds other files ({', '.join(others[:5])}"
                            f"{' ...' if len(others) > 5 else ''}), which would be lost; move them or give a new "
                            "directory")


def read_datastore_captions(inputs: Sequence[str | Path], splits: Sequence[str] | None = DATASTORE_SPLITS,
                            format: str | None = None, column: str = "caption", id_column: str | None = None,
                            text: str = DATASTORE_TEXT) -> tuple[list[CaptionRecord], list[dict]]:
    """The caption records a datastore build reads from `inputs` (`smallcap.data.read_captions`; text rule
    "tokens" by default: Karpathy files as the reference indexes them, "raw" their sentences as written), and per
    input its path, sha256 and record count."""
    records: list[CaptionRecord] = []
    input_info = []
    for path in inputs:
        before = len(records)
        records.extend(read_captions(path, format=format, column=column, id_column=id_column, splits=splits,
                                     text=text))
        input_info.append({"path": str(path), "sha256": sha256_file(path), "records": len(records) - before})
    return records, input_info


def build_datastore(inputs: Sequence[str | Path], out_dir: str | Path, encoder: RetrievalEncoder | str, *,
                    index: str = "auto", max_tokens: int | None = 25, tokenizer: Any = DEFAULT_LENGTH_TOKENIZER,
                    dedupe: bool = False, batch_size: int = 256, shard_size: int = DEFAULT_SHARD_SIZE,
                    splits: Sequence[str] | None = DATASTORE_SPLITS, format: str | None = None,
                    column: str = "caption", id_column: str | None = None, text: str = DATASTORE_TEXT,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET, overwrite: bool = False, device: str = "cpu",
                    progress: bool = True, embedder: ShardEmbedder | None = None) -> Datastore:
    """Build a datastore from caption files and return it opened.

    `encoder`: a RetrievalEncoder or a name for `load_encoder`. `index`: auto|flat|ivf|ivfpq|hnsw (see
    `smallcap.retrieval.index.choose_index`). `max_tokens`: drop captions longer than this many decoder
    tokens (`tokenizer`: GPT-2 tokenizer object, Hub id or directory). `splits`: for files with splits
    (Karpathy, MSR-VTT) keep only these (default train + restval); None keeps all. `format`, `column`,
    `id_column`, `text`: reader options (`read_datastore_captions`). Embeddings go to `<out_dir>/../.<name>.build/` in shards of
    `shard_size` captions; rerunning after an interruption resumes there. `embedder` embeds the shards still
    to do elsewhere (e.g. `smallcap.scale.datastore.RayShardEmbedder`); default: `encoder`, in this process.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite, inputs)
    if not inputs:
        raise SmallCapError("no input caption files given")
    records, input_info = read_datastore_captions(inputs, splits, format, column, id_column, text)
    tokenizer_name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None)
    if isinstance(tokenizer, str) and max_tokens is not None:
        tokenizer = load_length_tokenizer(tokenizer)
    selection = select_captions(records, tokenizer, max_tokens, dedupe)
    if not selection.records:
        raise SmallCapError(f"no captions to index in {', '.join(map(str, inputs))}: "
                            f"{_describe_counts(selection.counts)}")
    _log(f"captions: {_describe_counts(selection.counts)}")
    _warn_if_many_too_long(selection.counts, max_tokens, tokenizer_name)
    if isinstance(encoder, str):
        encoder = load_encoder(encoder, device=device)
    encoder_name = canonical_encoder_name(encoder.name)
    kept = selection.records
    source_of = {info["path"]: position for position, info in enumerate(input_info)}

    plan = {"inputs": input_info, "encoder": encoder_name, "dim": int(encoder.dim), "shard_size": shard_size,
            "captions_sha256": hashlib.sha256("\n".join(r.caption for r in kept).encode()).hexdigest(),
            "count": len(kept)}
    work = out_dir.parent / f".{out_dir.name}.build"
    shards = _embed_in_shards(work, plan, [record.caption for record in kept], encoder, batch_size, progress,
                              embedder)

    spec = choose_index(len(kept), encoder.dim, index, memory_budget)
    _log(f"index: {spec.type} {spec.params} ({spec.reason})")
    started = time.perf_counter()
    faiss_index = build_index(spec, encoder.dim, lambda: _iter_shards(shards), _train_sample(shards, spec, len(kept)))
    _log(f"index built in {time.perf_counter() - started:.1f}s")

    per_source: dict[str, int] = {}
    for record in kept:
        per_source[image_id_key(record.image_id)] = per_source.get(image_id_key(record.image_id), 0) + 1
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "smallcap_version": smallcap.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "encoder": {"name": encoder_name, "dim": int(encoder.dim), "normalisation": "l2"},
        "count": len(kept),
        "index": {"type": spec.type, "faiss": describe(faiss_index), "metric": "inner_product", "params": spec.params,
                  "reason": spec.reason, "file": INDEX_FILE},
        "inputs": [{**info, "format": format or "auto"} for info in input_info],
        "filters": {"max_tokens": max_tokens, "tokenizer": tokenizer_name, "dedupe": dedupe,
                    "splits": None if splits is None else list(splits), "text": text,
                    "counts": selection.counts},
        "max_captions_per_source": max(per_source.values()),
    }
    sources = np.asarray([source_of[record.source] for record in kept], dtype=np.int32)
    write_datastore(out_dir, overwrite, manifest, lambda path: faiss.write_index(faiss_index, str(path)),
                    (r.caption for r in kept), (image_id_key(r.image_id) for r in kept), sources)
    shutil.rmtree(work, ignore_errors=True)
    _log(f"wrote {out_dir}: {len(kept)} captions")
    return Datastore.load(out_dir)


def _warn_if_many_too_long(counts: dict[str, int], max_tokens: int | None, tokenizer_name: str | None) -> None:
    """Warn when the length filter drops more than a tenth of the captions: with a tokenizer that splits real
    words into many pieces (e.g. a small model's own BPE), --max-tokens stops meaning "a long caption"."""
    measured = counts["read"] - counts["empty"]
    if max_tokens is None or not measured or counts["too_long"] <= 0.1 * measured:
        return
    _log(f"warning: {counts['too_long']} of {measured} captions ({100 * counts['too_long'] / measured:.0f}%) are longer "
         f"than {max_tokens} tokens of the {tokenizer_name or 'given'} tokenizer and were dropped; if that tokenizer "
         "splits these captions into many pieces, pass --max-tokens 0 (keep all) or a larger --max-tokens")


def _describe_counts(counts: dict[str, int]) -> str:
    return (f"{counts['read']} read, {counts['empty']} empty, {counts['too_long']} too long, "
            f"{counts['duplicate']} duplicate, {counts.get('kept', 0)} kept")


def embed_captions(encoder: RetrievalEncoder, captions: Sequence[str], batch_size: int) -> np.ndarray:
    """L2-normalised embeddings of `captions` in order, as float32; batched by length to cut padding."""
    order = np.argsort([len(caption) for caption in captions], kind="stable")
    embedded = encoder.embed_texts([captions[i] for i in order], batch_size=batch_size)
    vectors = np.empty_like(embedded)
    vectors[order] = embedded  # the inverse permutation restores row order
    return vectors.astype(np.float32)


def _embed_in_shards(work: Path, plan: dict, captions: list[str], encoder: RetrievalEncoder, batch_size: int,
                     progress: bool, embedder: ShardEmbedder | None = None) -> list[Path]:
    """Embed captions shard by shard into `work`, reusing shards a previous run of the same plan finished."""
    plan_path = work / "plan.json"
    if work.exists():
        try:
            same = json.loads(plan_path.read_text()) == plan
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            _log(f"discarding {work}: left by an interrupted build with other inputs or settings")
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_path, plan)
    size = plan["shard_size"]
    paths = [work / f"embeddings-{number:05d}.npy" for number in range((len(captions) + size - 1) // size)]
    done = [path for path in paths if _valid_shard(path, plan["dim"])]
    if done:
        _log(f"resuming: {len(done)} of {len(paths)} shards already embedded in {work}")
    jobs = [(number, captions[number * size:(number + 1) * size]) for number, path in enumerate(paths)
            if path not in done]
    if embedder is None:
        def embedder(todo):
            return ((number, embed_captions(encoder, shard, batch_size)) for number, shard in todo)
    bar = tqdm(total=len(captions), initial=len(captions) - sum(len(shard) for _, shard in jobs), unit="caption",
               desc="embedding captions", disable=not progress)
    sizes = {number: len(shard) for number, shard in jobs}
    for number, vectors in embedder(jobs):
        if vectors.shape != (sizes[number], plan["dim"]):
            raise SmallCapError(f"shard {number}: got embeddings of shape {vectors.shape}, expected "
                                f"{(sizes[number], plan['dim'])}; was the same encoder used everywhere?")
        with atomic_open(paths[number]) as handle:
            np.save(handle, np.asarray(vectors, dtype=np.float32))
        bar.update(len(vectors))
    bar.close()
    missing = [path.name for path in paths if not _valid_shard(path, plan["dim"])]
    if missing:
        raise SmallCapError(f"embedding ended without shards {', '.join(missing[:5])}; rerun to resume")
    return paths


def _valid_shard(path: Path, dim: int) -> bool:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return array.ndim == 2 and array.shape[1] == dim


def _iter_shards(paths: Sequence[Path]) -> Iterator[np.ndarray]:
    for path in paths:
        yield np.load(path, mmap_mode="r")


def _train_sample(paths: Sequence[Path], spec: IndexSpec, count: int) -> np.ndarray | None:
    """A fixed-seed uniform sample of rows across shards, for indexes that need training."""
    size = train_sample_size(spec, count)
    if not size:
        return None
    rows = np.sort(np.random.default_rng(0).choice(count, size=size, replace=False))
    sample, start = [], 0
    for array in _iter_shards(paths):
        inside = rows[(rows >= start) & (rows < start + len(array))] - start
        sample.append(np.asarray(array[inside]))
        start += len(array)
    return np.concatenate(sample)


def write_datastore(out_dir: Path, overwrite: bool, manifest: dict, write_index: Callable[[Path], Any],
                    captions: Iterable[str], source_ids: Iterable[str], source_files: np.ndarray) -> None:
    """Write every datastore file into a temporary directory that becomes `out_dir` only when complete.

    `write_index(path)` writes the faiss index file; the other arguments are aligned with the index rows.
    """
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            write_index(tmp / INDEX_FILE)
            StringColumn.write(tmp / "captions.txt", captions)
            StringColumn.write(tmp / "source_ids.txt", source_ids)
            np.save(tmp / "source_files.npy", source_files)
            atomic_write_json(tmp / "manifest.json", manifest)
    except FileExistsError:
        raise SmallCapError(f"output {out_dir} already exists; pass --overwrite to replace it") from None


def read_caption_list(path: str | Path) -> list[str]:
    """Captions of a published datastore: a JSON list, or a JSON object keyed by row id ("0".."n-1")."""
    path = Path(path)
    expected = 'a JSON list of caption strings, or an object {"0": caption, "1": ...} keyed by row id'
    data = load_json(path, "caption", expected)
    if isinstance(data, dict):
        try:
            rows = {int(key): value for key, value in data.items()}
        except ValueError:
            raise SmallCapError(f"{path}: object keys must be row numbers; expected {expected}") from None
        if sorted(rows) != list(range(len(rows))):
            raise SmallCapError(f"{path}: row ids are not 0..{len(rows) - 1} without gaps; expected {expected}")
        data = [rows[row] for row in range(len(rows))]
    if not isinstance(data, list) or not all(isinstance(caption, str) for caption in data):
        raise SmallCapError(f"{path}: not a list of strings; expected {expected}")
    return data


def import_datastore(index_path: str | Path, captions_path: str | Path, encoder: str, out_dir: str | Path, *,
                     overwrite: bool = False) -> Datastore:
    """Turn a published index + caption file (e.g. SmallCap's `coco_index`, `coco_index_captions.json`) into a
    datastore, recording `encoder` (e.g. `open_clip:RN50x64`) as the model the index was embedded with.

    Captions are kept verbatim; their source ids are their row numbers (published files carry no image ids,
    so self-exclusion does not apply). A count mismatch is an error and writes nothing.
    """
    out_dir, index_path = Path(out_dir), Path(index_path)
    _check_out_dir(out_dir, overwrite, [index_path, captions_path])
    if not index_path.is_file():
        raise SmallCapError(f"index file {index_path} does not exist")
    captions = read_caption_list(captions_path)
    index = read_index(index_path, IndexSpec("flat"), mmap=False)
    spec = spec_of_index(index)
    if index.ntotal != len(captions):
        raise SmallCapError(f"{index_path} has {index.ntotal} rows but {captions_path} has {len(captions)} captions; "
                            "they must be aligned row for row")
    if not captions:
        raise SmallCapError(f"{index_path} and {captions_path} are empty")
    metric = {faiss.METRIC_INNER_PRODUCT: "inner_product", faiss.METRIC_L2: "l2"}.get(index.metric_type)
    if metric is None:
        raise SmallCapError(f"{index_path}: unsupported faiss metric {index.metric_type}; expected inner product or L2")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "smallcap_version": smallcap.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "encoder": {"name": canonical_encoder_name(encoder), "dim": int(index.d), "normalisation": "l2"},
        "count": len(captions),
        "index": {"type": spec.type, "faiss": describe(index), "metric": metric, "params": spec.params,
                  "reason": "imported", "file": INDEX_FILE},
        "inputs": [{"path": str(index_path), "sha256": sha256_file(index_path), "records": index.ntotal},
                   {"path": str(captions_path), "sha256": sha256_file(captions_path), "records": len(captions)}],
        "filters": None,
        "max_captions_per_source": 1,
        "imported": True,
    }
    del index  # the file is copied byte for byte, not re-serialised
    write_datastore(out_dir, overwrite, manifest, lambda path: shutil.copyfile(index_path, path), captions,
                    map(str, range(len(captions))), np.ones(len(captions), dtype=np.int32))
    return Datastore.load(out_dir)
