"""FAISS index choice, construction and memory-mapped loading for caption datastores.

All embeddings are L2-normalised, so inner product = cosine similarity and every index uses
METRIC_INNER_PRODUCT. `choose_index` is the one place that decides which index a datastore gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import faiss
import numpy as np

from smallcap.errors import SmallCapError

INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
DEFAULT_MEMORY_BUDGET = 4 << 30  # bytes of float32 vectors an exact index may hold in RAM
FLAT_MAX_COUNT = 1_000_000


@dataclass
class IndexSpec:
    """Which FAISS index to build and its parameters (stored in the datastore manifest)."""

    type: str
    params: dict = field(default_factory=dict)
    reason: str = ""


def choose_index(count: int, dim: int, requested: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET) -> IndexSpec:
    """Pick the index for `count` vectors of width `dim`.

    - flat (`IndexFlatIP`): exact search, what the reference uses. Memory is count*dim*4 bytes and a query
      costs count*dim multiply-adds; up to FLAT_MAX_COUNT captions (the published COCO store has 565k) that
      is tens of milliseconds per query on one CPU core and a few ms per query in batches, small next to
      caption generation, so exactness is free. Chosen whenever the vectors fit the memory budget and the
      count is at most FLAT_MAX_COUNT.
    - ivf (`IndexIVFFlat`): for larger stores whose vectors still fit the budget. k-means (trained on a
      sample) splits the vectors into ~sqrt(count) lists; a query scans `nprobe` of them, so search cost
      drops by nlist/nprobe while the full vectors keep the ranking within those lists exact. Its
      inverted lists memory-map from disk.
    - ivfpq (`IndexIVFPQ`): when even the raw vectors exceed the budget. Product quantisation stores
      dim/8 bytes per vector (32x smaller than float32), at a loss of recall. Memory-mapped like ivf.
    - hnsw (`IndexHNSWFlat`): only on request. The fastest single queries at high recall, but its graph
      (~M*8 bytes per vector) is always read into RAM and it builds an order of magnitude slower than IVF;
      worth it for latency-bound serving of a large store that is queried one image at a time.
    `requested` other than "auto" forces a type (parameters still follow the count).
    """
    if requested not in ("auto", *INDEX_TYPES):
        raise SmallCapError(f"unknown index type {requested!r}; expected auto or one of {', '.join(INDEX_TYPES)}")
    raw = count * dim * 4
    if requested != "auto":
        kind, reason = requested, "requested"
    elif count <= FLAT_MAX_COUNT and raw <= memory_budget:
        kind, reason = "flat", f"{count} vectors ({raw / 2**20:.0f} MiB) fit the budget: exact search"
    elif raw <= memory_budget:
        kind, reason = "ivf", f"{count} vectors > {FLAT_MAX_COUNT}: inverted lists, full vectors"
    else:
        kind, reason = "ivfpq", f"{raw / 2**30:.1f} GiB of vectors exceed the {memory_budget / 2**30:.1f} GiB budget"
    nlist = _nlist(count)
    params = {
        "flat": {},
        # Scanning 1/16 of the lists keeps recall@4 >= 0.97 on clustered caption embeddings (benchmarks/).
        "ivf": {"nlist": nlist, "nprobe": max(1, nlist // 16)},
        "ivfpq": {"nlist": nlist, "nprobe": max(1, nlist // 16), "m": _pq_subquantizers(dim), "nbits": 8},
        "hnsw": {"M": 32, "ef_construction": 80, "ef_search": 128},
    }[kind]
    return IndexSpec(kind, params, reason)


def _nlist(count: int) -> int:
    """~sqrt(count) lists (a power of two), at least 1 and at most count/39 so k-means has enough points."""
    target = max(1, min(int(math.sqrt(count)), count // 39))
    return 1 << max(0, round(math.log2(target)))


def _pq_subquantizers(dim: int) -> int:
    """Number of 8-bit sub-quantizers: about one per 8 dimensions, and it must divide dim."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def train_sample_size(spec: IndexSpec, count: int) -> int:
    """How many vectors the index trains on, capped at count: 64 per IVF list (faiss wants >= 39 per
    centroid), and for PQ at least 39 per each of the 256 codes of a sub-quantizer."""
    if spec.type in ("ivf", "ivfpq"):
        return min(count, max(64 * spec.params["nlist"], 10_000 if spec.type == "ivfpq" else 0))
    return 0


def new_index(spec: IndexSpec, dim: int) -> faiss.Index:
    """An empty (untrained) index for `spec`."""
    p = spec.params
    ip = faiss.METRIC_INNER_PRODUCT
    if spec.type == "flat":
        return faiss.IndexFlatIP(dim)
    if spec.type == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, p["nlist"], ip)
    if spec.type == "ivfpq":
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, p["nlist"], p["m"], p["nbits"], ip)
    index = faiss.IndexHNSWFlat(dim, p["M"], ip)
    index.hnsw.efConstruction = p["ef_construction"]
    return index


def build_index(spec: IndexSpec, dim: int, chunks: Callable[[], Iterable[np.ndarray]],
                train_sample: np.ndarray | None = None) -> faiss.Index:
    """Build an index: train on `train_sample` if the type needs it, then add every chunk in order.

    `chunks` is called once and yields (n_i, dim) float32 arrays, so the vectors can come from shards on disk.
    """
    index = new_index(spec, dim)
    if not index.is_trained:
        if train_sample is None or len(train_sample) == 0:
            raise ValueError(f"{spec.type} index needs a training sample")
        index.train(np.ascontiguousarray(train_sample, dtype=np.float32))
    for chunk in chunks():
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    configure_search(index, spec)
    return index


def configure_search(index: faiss.Index, spec: IndexSpec) -> None:
    """Set the query-time knobs (IVF nprobe, HNSW efSearch), which faiss does not store in the file."""
    if spec.type in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = spec.params["nprobe"]
    elif spec.type == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = spec.params["ef_search"]


def describe(index: faiss.Index) -> str:
    """The faiss class name of an index (e.g. IndexFlatIP)."""
    return type(faiss.downcast_index(index)).__name__


def read_index(path: str | Path, spec: IndexSpec, mmap: bool = True) -> faiss.Index:
    """Read an index file, memory-mapping what faiss can map, and apply the query-time parameters.

    faiss has two unrelated mmap flags (not combinable bit flags): IO_FLAG_MMAP maps IVF inverted lists,
    IO_FLAG_MMAP_IFC maps the flat code arrays of IndexFlat* and HNSW's storage (HNSW's graph still loads).
    """
    flags = 0
    if mmap:
        flags = faiss.IO_FLAG_MMAP if spec.type in ("ivf", "ivfpq") else faiss.IO_FLAG_MMAP_IFC
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise SmallCapError(f"index file {path} is not a readable faiss index ({first})") from None
    configure_search(index, spec)
    return index


def spec_of_index(index: faiss.Index) -> IndexSpec:
    """Describe an existing (e.g. imported) index as an IndexSpec, keeping its own parameters."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return IndexSpec("flat", {}, "imported")
    if isinstance(index, faiss.IndexHNSW):
        return IndexSpec("hnsw", {"M": index.hnsw.nb_neighbors(1), "ef_search": index.hnsw.efSearch}, "imported")
    if isinstance(index, faiss.IndexIVF):
        kind = "ivfpq" if isinstance(index, faiss.IndexIVFPQ) else "ivf"
        # A file's nprobe is often faiss's default of 1; never probe fewer lists than our own builds do.
        return IndexSpec(kind, {"nlist": index.nlist, "nprobe": max(index.nprobe, index.nlist // 16)}, "imported")
    raise SmallCapError(f"unsupported faiss index type {type(index).__name__}; "
                        "expected IndexFlat, IndexIVFFlat, IndexIVFPQ or IndexHNSWFlat")
