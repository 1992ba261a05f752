"""The model side of the server: one Captioner and its datastores, loaded once, captioning batches of jobs.

A batch may mix jobs with different datastores and `k` (retrieval and prompts are per row, and left-padded
batched decoding is exact), but not different generation settings: the batcher groups by `Job.batch_key`.
Each row is captioned exactly as `smallcap caption --model M --datastore D` captions that file.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from smallcap.errors import SmallCapError
from smallcap.hub import BUNDLED_DATASTORES

DEFAULT_SERVE_MODEL = "mini"
DEFAULT_SERVE_DATASTORES = ("mini-source", "mini-target")


@dataclass(frozen=True)
class Job:
    """One image to caption with the request's retrieval and decoding choices (`datastores=()`: none)."""

    image: Image.Image = field(compare=False)
    datastores: tuple[str, ...]
    k: int
    num_beams: int
    max_new_tokens: int

    @property
    def batch_key(self) -> tuple[int, int]:
        """What must be equal for jobs to be decoded in one `generate` call."""
        return (self.num_beams, self.max_new_tokens)


@dataclass
class Retrieved:
    """One retrieved caption with its similarity to the image and the id of the image it describes."""

    caption: str
    score: float
    source_id: str


@dataclass
class JobResult:
    """A job's caption, its retrieved captions and the batch's stage timings in milliseconds."""

    caption: str
    retrieved: list[Retrieved]
    timings_ms: dict[str, float]
    batch_size: int


def datastore_name(name_or_dir: str) -> str:
    """The name a datastore is served under: the bundled short name, else the directory's base name."""
    if name_or_dir in BUNDLED_DATASTORES and not Path(name_or_dir).exists():
        return name_or_dir
    return Path(name_or_dir).expanduser().resolve().name


class Engine:
    """A loaded Captioner plus named datastores; `caption(jobs)` runs one batch (not thread-safe: one at a time)."""

    def __init__(self, captioner, stores: dict, model_name: str, default_datastores: Sequence[str]):
        from smallcap.retrieval.encoders import load_encoder

        self.captioner = captioner
        self.stores = dict(stores)
        self.model_name = model_name
        self.default_datastores = tuple(default_datastores)
        self._encoders = {}
        for store in self.stores.values():
            if store.encoder_name not in self._encoders:
                self._encoders[store.encoder_name] = load_encoder(store.encoder_name,
                                                                  device=str(captioner.model.device))
        self._retrievers: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str = DEFAULT_SERVE_MODEL, datastores: Sequence[str] | None = None,
             device: str = "cpu", dtype: str = "float32", quantize: str = "none") -> "Engine":
        """Load `model` (in the `dtype`/`quantize` mode of `Captioner.from_pretrained`) and open `datastores`
        (names or directories; the first is the default)."""
        from smallcap.captioner import Captioner
        from smallcap.retrieval.datastore import Datastore

        if datastores is None:
            datastores = DEFAULT_SERVE_DATASTORES if model == DEFAULT_SERVE_MODEL else ()
        stores = {}
        for name_or_dir in datastores:
            name = datastore_name(name_or_dir)
            if name in stores:
                raise SmallCapError(f"two datastores would be served under the name {name!r}; "
                                    "rename one of the directories")
            stores[name] = Datastore.load(name_or_dir)
        captioner = Captioner.from_pretrained(model, device=device, dtype=dtype, quantize=quantize)
        return cls(captioner, stores, model, list(stores)[:1])

    def check_datastores(self, names: Sequence[str]) -> tuple[str, ...]:
        """Validate requested datastore names (`none` alone: no retrieval); raises KeyError naming unknown ones."""
        names = tuple(dict.fromkeys(names))
        if names == ("none",):
            return ()
        unknown = [name for name in names if name not in self.stores]
        if unknown:
            raise KeyError(", ".join(unknown))
        from smallcap.retrieval.datastore import check_same_encoder

        check_same_encoder([(name, self.stores[name].encoder_name, self.stores[name].dim) for name in names])
        return names

    def _retriever(self, names: tuple[str, ...]):
        from smallcap.retrieval.datastore import MultiDatastore
        from smallcap.retrieval.retriever import DatastoreRetriever

        with self._lock:
            if names not in self._retrievers:
                stores = [self.stores[name] for name in names]
                store = stores[0] if len(stores) == 1 else MultiDatastore(stores)
                self._retrievers[names] = DatastoreRetriever(store, self._encoders[store.encoder_name],
                                                             vision_model=self.captioner.model.encoder)
            return self._retrievers[names]

    def caption(self, jobs: Sequence[Job]) -> list[JobResult]:
        """Caption jobs sharing one `batch_key`: one encoder pass, retrieval per datastore set, one decode."""
        from smallcap.generation import GenerationSettings, generate
        from smallcap.prompt import clean_caption, prompt_ids

        if len({job.batch_key for job in jobs}) != 1:
            raise ValueError("a batch must share its generation settings")
        captioner = self.captioner
        start = time.perf_counter()
        states = captioner.encode([job.image for job in jobs])
        encoded = time.perf_counter()
        retrieved: list[list[Retrieved] | None] = [None] * len(jobs)
        for names in dict.fromkeys(job.datastores for job in jobs if job.datastores):
            rows = [i for i, job in enumerate(jobs) if job.datastores == names]
            retriever = self._retriever(names)
            embeddings = retriever.embed([jobs[i].image for i in rows], states[rows])
            hits = retriever.store.search(embeddings, max(jobs[i].k for i in rows))
            for position, row in enumerate(rows):
                k = jobs[row].k
                retrieved[row] = [Retrieved(c, float(s), str(sid)) for c, s, sid in
                                  zip(hits.captions[position][:k], hits.scores[position][:k],
                                      hits.source_ids[position][:k])]
        searched = time.perf_counter()
        prompts = [prompt_ids(captioner.tokenizer, None if hits is None else [h.caption for h in hits], job.k)
                   for job, hits in zip(jobs, retrieved)]
        settings = GenerationSettings(num_beams=jobs[0].num_beams, max_new_tokens=jobs[0].max_new_tokens)
        new_ids = generate(captioner.model, prompts, encoder_hidden_states=states, settings=settings)
        captions = [clean_caption(captioner.tokenizer, ids, captioner.model.config.eos_token_id) for ids in new_ids]
        decoded = time.perf_counter()
        timings = {"encode": (encoded - start) * 1e3, "retrieve": (searched - encoded) * 1e3,
                   "decode": (decoded - searched) * 1e3}
        return [JobResult(caption, hits or [], dict(timings), len(jobs)) for caption, hits in zip(captions, retrieved)]

    def datastore_info(self) -> list[dict]:
        """Name, encoder, size and whether it is a default, per loaded datastore."""
        return [{"name": name, "encoder": store.encoder_name, "size": len(store),
                 "default": name in self.default_datastores} for name, store in self.stores.items()]

    def model_info(self) -> dict:
        """The model's name, parameter counts and default settings."""
        from smallcap.precision import quantization_of

        model = self.captioner.model
        return {"name": self.model_name, "parameters": sum(p.numel() for p in model.parameters()),
                "k": self.captioner.k,
                "use_retrieval": self.captioner.use_retrieval, "device": str(model.device),
                "dtype": str(model.dtype).replace("torch.", ""), "quantize": quantization_of(model),
                "default_datastores": list(self.default_datastores)}
