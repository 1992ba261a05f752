"""Caption datastores: a FAISS index over caption embeddings plus the captions, searched by image or text.

A datastore is a directory:

    manifest.json            format version, encoder (name, dim, normalisation), count, index type and
                             parameters, inputs with sha256, filter settings and counts
    index.faiss              the FAISS index; row i is caption i
    captions.txt             the captions, UTF-8, one per line, row order   (+ captions.offsets.npy)
    source_ids.txt           the id of the image each caption describes      (+ source_ids.offsets.npy)
    source_files.npy         int32 per row: position of its input file in manifest["inputs"]

Text files are read through byte offsets memory-mapped from disk, so opening a multi-million caption store is
instant and costs no RAM until rows are used. Typical use:

    store = Datastore.load("coco_store")                     # or load_datastores([dir1, dir2])
    hits = store.search(encoder.embed_images(images), k=4)   # hits.captions[i] = best first
    MultiDatastore([coco, web]).search(queries, k=4)         # best k of the union

`build_datastore(...)` and `import_datastore(...)` (smallcap.retrieval.build) create datastores.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from smallcap.data import image_id_key, load_json
from smallcap.errors import SmallCapError
from smallcap.hub import resolve_datastore
from smallcap.io import atomic_write_json
from smallcap.retrieval.encoders import RetrievalEncoder, canonical_encoder_name
from smallcap.retrieval.index import IndexSpec, read_index

FORMAT = "smallcap-datastore"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"


class StringColumn:
    """Strings stored one per line in a UTF-8 file plus an int64 offsets array, for O(1) random access.

    Row i is the bytes between offsets[i] and offsets[i+1] minus the newline, so strings may themselves
    contain newlines (imported captions are kept verbatim) and still round-trip exactly.
    """

    def __init__(self, path: Path, use_mmap: bool = True):
        self.path = Path(path)
        try:
            self.offsets = np.load(_offsets_path(self.path), mmap_mode="r" if use_mmap else None)
            with open(self.path, "rb") as handle:
                if use_mmap and self.path.stat().st_size > 0:
                    self.data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                else:
                    self.data = handle.read()
        except (OSError, ValueError) as error:
            raise SmallCapError(f"datastore file {path} (or its .offsets.npy) is missing or unreadable: "
                                f"{error}") from None
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or int(self.offsets[-1]) != len(self.data):
            raise SmallCapError(f"datastore file {path} does not match its offsets (truncated or corrupt)")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> str:
        return self.data[int(self.offsets[row]):int(self.offsets[row + 1]) - 1].decode("utf-8")

    @staticmethod
    def write(path: Path, strings: Iterable[str]) -> int:
        """Write `strings` to `path` and `path`.offsets.npy; returns the number written."""
        offsets, position = [0], 0
        with open(path, "wb") as handle:
            for text in strings:
                data = text.encode("utf-8") + b"\n"
                handle.write(data)
                position += len(data)
                offsets.append(position)
        np.save(_offsets_path(path), np.asarray(offsets, dtype=np.int64))
        return len(offsets) - 1


def _offsets_path(path: Path) -> Path:
    return path.with_name(path.stem + ".offsets.npy")


@dataclass
class SearchResults:
    """Per query, the retrieved captions with their similarity scores and source ids, most similar first.

    Lists are shorter than k only when the datastore (after self-exclusion) has fewer captions.
    """

    captions: list[list[str]]
    scores: list[list[float]]
    source_ids: list[list[str]]

    def __len__(self) -> int:
        return len(self.captions)


def _as_queries(query_embeddings: np.ndarray, dim: int, what: str) -> np.ndarray:
    """Check the query shape against the datastore and L2-normalise (the stored vectors are unit length)."""
    queries = np.asarray(query_embeddings, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise SmallCapError(f"query embeddings have shape {tuple(np.shape(query_embeddings))}, but {what} holds "
                            f"{dim}-d embeddings: the queries come from a different encoder than the datastore's")
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(queries / np.maximum(norms, 1e-12))


def _check_exclusions(exclude_source_ids: Sequence | None, count: int) -> list[str | None] | None:
    if exclude_source_ids is None:
        return None
    if len(exclude_source_ids) != count:
        raise SmallCapError(f"exclude_source_ids has {len(exclude_source_ids)} entries for {count} queries")
    return [None if sid is None else image_id_key(sid) for sid in exclude_source_ids]


class Datastore:
    """A caption datastore on disk: open with `Datastore.load(dir)`, query with `search`."""

    def __init__(self, directory: Path, manifest: dict, index, captions: StringColumn, source_ids: StringColumn,
                 source_files: np.ndarray):
        self.directory = Path(directory)
        self.manifest = manifest
        self.index = index
        self.captions = captions
        self.source_ids = source_ids
        self.source_files = source_files

    @property
    def encoder_name(self) -> str:
        """Name of the encoder whose embeddings the index holds (`load_encoder(store.encoder_name)`)."""
        return self.manifest["encoder"]["name"]

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.manifest["encoder"]["dim"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        return (f"Datastore({str(self.directory)!r}, {len(self)} captions, {self.encoder_name}, "
                f"{self.manifest['index']['type']})")

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> "Datastore":
        """Open a datastore directory (or bundled short name, `mini-source`); with `mmap` the index and captions
        are memory-mapped, not read."""
        directory = resolve_datastore(directory)
        manifest_path = directory / "manifest.json"
        if not directory.is_dir():
            raise SmallCapError(f"datastore directory {directory} does not exist")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SmallCapError(f"{directory} is not a datastore: it has no manifest.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SmallCapError(f"{manifest_path} is corrupt ({error})") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise SmallCapError(f"{manifest_path}: not a version-{FORMAT_VERSION} {FORMAT} manifest "
                                f"(format {manifest.get('format')!r}, version {manifest.get('format_version')!r})")
        spec = IndexSpec(manifest["index"]["type"], manifest["index"]["params"])
        index_path = directory / manifest["index"]["file"]
        if not index_path.is_file():
            raise SmallCapError(f"datastore {directory} is missing its index file {index_path.name}")
        index = read_index(index_path, spec, mmap=mmap)
        captions = StringColumn(directory / "captions.txt", mmap)
        source_ids = StringColumn(directory / "source_ids.txt", mmap)
        try:
            source_files = np.load(directory / "source_files.npy", mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as error:
            raise SmallCapError(f"datastore file {directory / 'source_files.npy'} is missing or unreadable: "
                                f"{error}") from None
        count, dim = int(manifest["count"]), int(manifest["encoder"]["dim"])
        sizes = {"index rows": index.ntotal, "captions": len(captions), "source ids": len(source_ids),
                 "source files": len(source_files)}
        if any(size != count for size in sizes.values()) or index.d != dim:
            found = ", ".join(f"{size} {name}" for name, size in sizes.items())
            raise SmallCapError(f"datastore {directory} is inconsistent: manifest says {count} captions of dim {dim}, "
                                f"found {found} and index dim {index.d}")
        return cls(directory, manifest, index, captions, source_ids, source_files)

    def check_encoder(self, encoder: RetrievalEncoder, strict_name: bool = True) -> None:
        """Raise SmallCapError unless `encoder` is the one the datastore was built with (name and dim).

        `strict_name=False` accepts another name with the same width (the same model under a new path).
        """
        check_same_encoder([(str(self.directory), self.encoder_name, self.dim),
                            ("the query encoder", canonical_encoder_name(encoder.name), int(encoder.dim))],
                           strict_name)

    def caption(self, row: int) -> str:
        """Caption text of one index row."""
        return self.captions[row]

    def source_file(self, row: int) -> str:
        """Input file one row came from."""
        return self.manifest["inputs"][int(self.source_files[row])]["path"]

    def search(self, query_embeddings: np.ndarray, k: int = 4,
               exclude_source_ids: Sequence | None = None) -> SearchResults:
        """The k captions most similar to each query embedding (most similar first).

        `exclude_source_ids`, one per query (None for no exclusion), drops captions of that query's own
        image: the search goes deeper by the largest number of captions any one image has, so k results
        survive the filter.
        """
        queries = _as_queries(query_embeddings, self.dim, f"datastore {self.directory}")
        exclude = _check_exclusions(exclude_source_ids, len(queries))
        margin = int(self.manifest.get("max_captions_per_source", 1)) if exclude else 0
        depth = min(k + margin, len(self))
        results = SearchResults([], [], [])
        if depth <= 0:
            results.captions, results.scores, results.source_ids = ([[] for _ in queries] for _ in range(3))
            return results
        distances, rows = self.index.search(queries, depth)
        if self.manifest["index"].get("metric", "inner_product") == "l2":
            distances = 1.0 - distances / 2.0  # squared L2 between unit vectors = 2 - 2 cos
        for q in range(len(queries)):
            captions, scores, ids = [], [], []
            for row, score in zip(rows[q], distances[q]):
                if row < 0 or len(captions) == k:
                    break
                sid = self.source_ids[row]
                if exclude and exclude[q] is not None and sid == exclude[q]:
                    continue
                captions.append(self.captions[row])
                scores.append(float(score))
                ids.append(sid)
            results.captions.append(captions)
            results.scores.append(scores)
            results.source_ids.append(ids)
        return results


def check_same_encoder(stores: Sequence[tuple[str, str, int]], strict_name: bool = True) -> None:
    """Raise SmallCapError unless every (what, encoder name, dim) triple names the same encoder."""
    first_what, first_name, first_dim = stores[0]
    for what, name, dim in stores[1:]:
        if dim != first_dim or (strict_name and name != first_name):
            raise SmallCapError(
                f"encoder mismatch: {first_what} holds {first_dim}-d embeddings from {first_name!r}, but {what} "
                f"uses {dim}-d embeddings from {name!r}; similarities from different encoders are not comparable "
                "(query a datastore with the encoder it was built with, and combine only datastores built with "
                "the same encoder)")


class MultiDatastore:
    """Several datastores searched as one: each answers, and the union's k most similar captions are kept.

    All must share the encoder (name and dim); that is what makes their similarity scores comparable.
    """

    def __init__(self, stores: Sequence[Datastore]):
        if not stores:
            raise SmallCapError("MultiDatastore needs at least one datastore")
        check_same_encoder([(str(store.directory), store.encoder_name, store.dim) for store in stores])
        self.stores = list(stores)

    @property
    def encoder_name(self) -> str:
        """The shared encoder's name."""
        return self.stores[0].encoder_name

    @property
    def dim(self) -> int:
        """The shared embedding width."""
        return self.stores[0].dim

    def __len__(self) -> int:
        return sum(len(store) for store in self.stores)

    def check_encoder(self, encoder: RetrievalEncoder, strict_name: bool = True) -> None:
        """Raise SmallCapError unless `encoder` is the stores' encoder."""
        self.stores[0].check_encoder(encoder, strict_name)

    def search(self, query_embeddings: np.ndarray, k: int = 4,
               exclude_source_ids: Sequence | None = None) -> SearchResults:
        """The union's k best captions per query, most similar first (ties keep the stores' order)."""
        parts = [store.search(query_embeddings, k, exclude_source_ids) for store in self.stores]
        merged = SearchResults([], [], [])
        for q in range(len(parts[0])):
            hits = [(score, caption, sid) for part in parts
                    for score, caption, sid in zip(part.scores[q], part.captions[q], part.source_ids[q])]
            hits.sort(key=lambda hit: -hit[0])  # stable sort: equal scores stay in store order
            merged.scores.append([hit[0] for hit in hits[:k]])
            merged.captions.append([hit[1] for hit in hits[:k]])
            merged.source_ids.append([hit[2] for hit in hits[:k]])
        return merged


def load_datastores(directories: Sequence[str | Path], mmap: bool = True) -> Datastore | MultiDatastore:
    """Open one datastore, or several combined into a MultiDatastore."""
    stores = [Datastore.load(directory, mmap=mmap) for directory in directories]
    return stores[0] if len(stores) == 1 else MultiDatastore(stores)


def retrieve_for_training(store: Datastore | MultiDatastore, image_embeddings: np.ndarray, image_ids: Sequence,
                          out_path: str | Path | None = None, k: int = 15, keep: int = 7, batch_size: int = 1024,
                          progress: bool = True, exclude_own: bool = True) -> dict[str, list[str]]:
    """Retrieved captions for training, as the reference does it: for each training image, its k=15 nearest
    captions, minus the image's own captions, first `keep`=7 kept. Returns (and with `out_path` writes)
    the reference's `{"<image_id>": [captions]}` JSON mapping. `exclude_own=False` keeps own captions (for
    images the datastore does not describe, e.g. a test split).
    """
    if len(image_embeddings) != len(image_ids):
        raise SmallCapError(f"{len(image_embeddings)} image embeddings for {len(image_ids)} image ids")
    retrieved: dict[str, list[str]] = {}
    starts = range(0, len(image_ids), batch_size)
    for start in tqdm(starts, desc="retrieving", unit="batch", disable=not progress or len(starts) < 2):
        ids = [image_id_key(image_id) for image_id in image_ids[start:start + batch_size]]
        hits = store.search(image_embeddings[start:start + batch_size], k)
        for image_id, captions, sources in zip(ids, hits.captions, hits.source_ids):
            retrieved[image_id] = [caption for caption, sid in zip(captions, sources)
                                   if not (exclude_own and sid == image_id)][:keep]
    if out_path is not None:
        atomic_write_json(out_path, retrieved)
    return retrieved


def load_retrieved(path: str | Path) -> dict[str, list[str]]:
    """Read the reference's retrieved-captions file `{"<image_id>": [caption, ...]}` (most similar first), as
    `retrieve_for_training` writes it; any other form is a clear error."""
    expected = "a JSON object {image_id: [caption, ...]}"
    data = load_json(path, "retrieved captions", expected)
    if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(c, str) for c in v) for v in data.values()):
        raise SmallCapError(f"{path}: expected {expected}")
    return {image_id_key(key): value for key, value in data.items()}
