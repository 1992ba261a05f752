"""Cross-request batching: jobs from concurrent requests wait up to `max_wait_ms` and are decoded together.

One worker task takes the oldest waiting job, waits until `max_wait_ms` after that job arrived (or until
`max_batch` jobs share its generation settings), then runs the batch on a single model thread, off the event
loop. Jobs with other settings wait for a later batch. `submit` refuses work beyond `max_queue` waiting jobs.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from smallcap.serving.engine import Job, JobResult


class QueueFullError(Exception):
    """The batcher already holds `max_queue` waiting jobs."""


@dataclass
class _Waiting:
    job: Job
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects jobs from concurrent requests into batches for `run_batch` (an `Engine.caption`)."""

    def __init__(self, run_batch: Callable[[Sequence[Job]], list[JobResult]], max_batch: int = 16,
                 max_wait_ms: float = 10.0, max_queue: int = 256,
                 on_batch: Callable[[int], None] | None = None):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1e3
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._waiting: list[_Waiting] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smallcap-model")
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch (not counting the one being decoded)."""
        return len(self._waiting)

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._work(), name="smallcap-batcher")

    async def stop(self) -> None:
        """Stop the worker after the batch in progress; waiting jobs fail with CancelledError."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for waiting in self._waiting:
            waiting.future.cancel()
        self._waiting.clear()
        self._executor.shutdown(wait=True)

    async def submit(self, jobs: Sequence[Job]) -> list[tuple[JobResult, float]]:
        """Queue the jobs of one request; returns each job's result and its queue wait in seconds."""
        if len(self._waiting) + len(jobs) > self.max_queue:
            raise QueueFullError(f"{len(self._waiting)} images are waiting (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        entries = [_Waiting(job, loop.create_future()) for job in jobs]
        self._waiting.extend(entries)
        self._wake.set()
        try:
            return list(await asyncio.gather(*(entry.future for entry in entries)))
        except asyncio.CancelledError:  # the client went away: its jobs leave the queue, others are unaffected
            for entry in entries:
                entry.future.cancel()
            self._waiting = [w for w in self._waiting if not w.future.cancelled()]
            raise

    def _take_batch(self) -> list[_Waiting]:
        key = self._waiting[0].job.batch_key
        batch = [w for w in self._waiting if w.job.batch_key == key][:self.max_batch]
        taken = set(map(id, batch))
        self._waiting = [w for w in self._waiting if id(w) not in taken]
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._waiting = [w for w in self._waiting if not w.future.done()]
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            key = self._waiting[0].job.batch_key
            ready = sum(w.job.batch_key == key for w in self._waiting) >= self.max_batch
            remaining = self._waiting[0].arrived + self.max_wait - time.perf_counter()
            if not ready and remaining > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
                continue
            batch = self._take_batch()
            started = time.perf_counter()
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [w.job for w in batch])
            except Exception as error:  # a model failure fails this batch's requests, not the server
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                continue
            for waiting, result in zip(batch, results):
                if not waiting.future.done():
                    waiting.future.set_result((result, started - waiting.arrived))
