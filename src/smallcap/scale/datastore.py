"""`smallcap datastore build --engine ray`: caption shards embedded by a Ray Data actor pool.

`build_datastore` plans the shards, skips those a previous run finished and builds the index; this module only
embeds the shards still to do. Each actor loads the retrieval encoder once and embeds whole shards with the
same code as the single-process build (`embed_captions`), so the vectors, and a flat index's search results,
are the same. The driver writes each returned shard atomically; a shard redone after a worker died overwrites
its file with the same vectors.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np

from smallcap.scale.predict import check_worker_pool, connect, import_ray, quiet_ray_data


class EmbedWorker:
    """A Ray Data actor: loads the retrieval encoder once and embeds batches of shards."""

    def __init__(self, encoder: str, device: str, batch_size: int):
        import torch

        from smallcap.retrieval.encoders import load_encoder

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = load_encoder(encoder, device=device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from smallcap.retrieval.build import embed_captions

        vectors = [embed_captions(self.encoder, json.loads(captions), self.batch_size)
                   for captions in batch["captions"]]
        return {"number": batch["number"], "vectors": np.array([v.tobytes() for v in vectors], dtype=object),
                "rows": np.array([len(v) for v in vectors]), "dim": np.array([v.shape[1] for v in vectors])}


class RayShardEmbedder:
    """A `ShardEmbedder` for `build_datastore(embedder=...)`: shards embedded by `num_workers` actors, each with
    `gpus_per_worker` GPUs, on the cluster at `address` (None: a local one, started and stopped here)."""

    def __init__(self, encoder: str, *, device: str = "auto", batch_size: int = 256, num_workers: int = 1,
                 gpus_per_worker: float = 0.0, address: str | None = None):
        check_worker_pool(num_workers, gpus_per_worker)
        self.options: dict[str, Any] = {"encoder": encoder, "device": device, "batch_size": batch_size}
        self.num_workers, self.gpus_per_worker, self.address = num_workers, gpus_per_worker, address

    def __call__(self, jobs: list[tuple[int, list[str]]]) -> Iterator[tuple[int, np.ndarray]]:
        if not jobs:
            return
        ray = import_ray()
        started = connect(self.address)
        try:
            quiet_ray_data()
            items = [{"number": number, "captions": json.dumps(captions)} for number, captions in jobs]
            dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                EmbedWorker, fn_constructor_kwargs=self.options, batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=self.num_workers), num_cpus=1,
                num_gpus=self.gpus_per_worker or None)
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for number, data, rows, dim in zip(batch["number"], batch["vectors"], batch["rows"], batch["dim"]):
                    yield int(number), np.frombuffer(data, np.float32).reshape(int(rows), int(dim))
        finally:
            if started:
                ray.shutdown()
