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


def choose_index(count: int, dim: int, requested: str = "auto",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> IndexSpec:
    """Pick the index for `count` vectors of width `dim`: exact while affordable, then IVF-PQ with re-ranking.

    Measured on one CPU core with clustered 512-d caption embeddings (benchmarks/results/datastore.md):

    - flat (`IndexFlatIP`, the reference's choice): exact. Memory count*dim*4 bytes; at 1M captions a single
      query takes ~150 ms and batched queries ~45 ms each, small next to beam-search generation, so we stay
      exact up to FLAT_MAX_COUNT captions whenever the vectors fit the memory budget. (The published COCO
      store, 565k x 1024 = 2.2 GiB, stays exact as in the reference.)
    - ivfpq (`IndexIVFPQ` inside `IndexRefineFlat`): everything larger, or whose vectors exceed the budget.
      ~sqrt(count) k-means lists (trained on a sample), nlist/8 probed; dim/8-byte PQ codes pick 10*k
      candidates that are re-ranked exactly against the full vectors, memory-mapped from the index file, so
      RAM holds the codes (32x smaller than float32) and the candidates' pages. At 1M: ~6 ms per query
      (8x faster than flat batched), recall@4 0.92, and the captions it returns are within 0.12% of the
      exact ones' similarity: its misses are near-ties among near-duplicate captions. Without re-ranking
      recall@4 was ~0.5.
    - ivf (`IndexIVFFlat`), on request: full vectors in memory-mapped lists, recall@4 0.97 at 1M, but it
      reads nlist/8 of all vectors per query, so batched queries were slower than flat's BLAS scan (single
      queries 1.8x faster). For single-query use with exact vectors.
    - hnsw (`IndexHNSWFlat`), on request: the fastest queries (1.5 ms at 1M, recall@4 0.94 with these
      parameters; raise ef_search for more), vectors memory-mapped but the graph (~M*8 bytes per vector) in
      RAM, and a slow build (~9 min per 1M captions on one core, 3.5x IVF-PQ's).
    `requested` other than "auto" forces a type (its parameters still follow the count).
    """
    if requested not in ("auto", *INDEX_TYPES):
        raise SmallCapError(f"unknown index type {requested!r}; expected auto or one of {', '.join(INDEX_TYPES)}")
    raw = count * dim * 4
    if requested != "auto":
        kind, reason = requested, "requested"
    elif count <= FLAT_MAX_COUNT and raw <= memory_budget:
        kind, reason = "flat", f"{count} vectors ({raw / 2**20:.0f} MiB) fit the budget: exact search"
    elif raw <= memory_budget:
        kind, reason = "ivfpq", f"{count} vectors > {FLAT_MAX_COUNT}: IVF-PQ with exact re-ranking"
    else:
        kind, reason = "ivfpq", (f"{raw / 2**30:.1f} GiB of vectors exceed the {memory_budget / 2**30:.1f} GiB "
                                 "budget: IVF-PQ codes in RAM, exact re-ranking from disk")
    nlist = _nlist(count)
    params = {
        "flat": {},
        "ivf": {"nlist": nlist, "nprobe": max(1, nlist // 8)},
        "ivfpq": {"nlist": nlist, "nprobe": max(1, nlist // 8), "m": _pq_subquantizers(dim), "nbits": 8,
                  "k_factor": 10},
        "hnsw": {"M": 32, "ef_construction": 40, "ef_search": 256},
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
        return faiss.IndexRefineFlat(faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, p["nlist"], p["m"], p["nbits"], ip))
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
    """Set the query-time knobs (IVF nprobe, refine depth, HNSW efSearch), which faiss does not store."""
    if spec.type in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = spec.params["nprobe"]
    if "k_factor" in spec.params:
        faiss.downcast_index(index).k_factor = spec.params["k_factor"]
    if spec.type == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = spec.params["ef_search"]


def describe(index: faiss.Index) -> str:
    """The faiss class name of an index (e.g. IndexFlatIP)."""
    return type(faiss.downcast_index(index)).__name__


def read_index(path: str | Path, spec: IndexSpec, mmap: bool = True) -> faiss.Index:
    """Read an index file, memory-mapping what faiss can map, and apply the query-time parameters.

    faiss has two unrelated mmap flags (not combinable bit flags): IO_FLAG_MMAP maps IVF inverted lists,
    IO_FLAG_MMAP_IFC maps flat code arrays: IndexFlat's vectors, HNSW's storage (its graph still loads) and
    the re-ranking vectors of ivfpq (whose small PQ codes load into RAM).
    """
    flags = 0
    if mmap:
        flags = faiss.IO_FLAG_MMAP if spec.type == "ivf" else faiss.IO_FLAG_MMAP_IFC
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
