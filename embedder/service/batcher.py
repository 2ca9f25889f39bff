"""Dynamic micro-batching: many concurrent embed requests, one model call.

Requests (a list of items and a prefix length) wait in a bounded queue. A
single worker takes everything queued, up to ``max_batch`` items, and runs
decode + encoders + projection in a thread, off the event loop. When the
worker is idle and fewer than ``max_batch`` items wait, it lingers up to
``max_delay_ms`` for more (``0`` disables the wait: requests that arrive while
a batch runs are batched anyway).

Per-request isolation: a corrupt image fails only the request that sent it
(the error names the item's index *within that request*); requests whose
caller gave up (deadline, cancel) before their batch ran are skipped. A full
queue raises :class:`Overloaded` at once (RESOURCE_EXHAUSTED over gRPC)
instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.errors import EmbedderError, InvalidItemError, ProjectionNotFittedError
from embedder.images import load_rgb
from embedder.model import Embedder, Item, check_items, check_modalities
from embedder.projection import RawFeatures


class Overloaded(EmbedderError, RuntimeError):
    """The embed queue is full: the caller should back off and retry."""


@dataclass(eq=False)
class _Job:
    items: list[Item]
    dims: int
    future: asyncio.Future[np.ndarray]
    pictures: list[Any] = field(default_factory=list)


class MicroBatcher:
    """Batches :meth:`embed` calls from many coroutines into few model calls."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        max_batch: int = 64,
        max_delay_ms: float = 2.0,
        max_queue: int = 4096,
        decode_workers: int = 2,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < max_batch or max_delay_ms < 0:
            raise ValueError("need max_batch >= 1, max_queue >= max_batch and max_delay_ms >= 0")
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._pending: deque[_Job] = deque()
        self._queued = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="embed-infer")
        self._decode = ThreadPoolExecutor(max(1, decode_workers), thread_name_prefix="embed-decode")

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop the worker (call after in-flight requests have drained); fail anything still queued."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(Overloaded("the server is shutting down"))
        self._queued = 0
        self._infer.shutdown(wait=True)
        self._decode.shutdown(wait=True)

    @property
    def queued_items(self) -> int:
        return self._queued

    # ---------------------------------------------------------------- submit
    async def embed(self, items: Sequence[Item], dims: int = 512) -> np.ndarray:
        """(len(items), dims) unit-norm vectors, computed in a shared batch."""
        if self._task is None or self._wake is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self.embedder.projection is None:
            raise ProjectionNotFittedError(
                "no Matryoshka projection loaded; train one with `embedstore fit-projection`"
            )
        items = list(items)
        check_items(items)
        check_modalities(items, self.embedder.projection)
        if self._queued + len(items) > self.max_queue:
            raise Overloaded(
                f"embed queue is full ({self._queued} items waiting, limit {self.max_queue}); retry with backoff"
            )
        job = _Job(items, dims, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._queued += len(items)
        self._wake.set()
        return await job.future  # a cancelled caller cancels the future: the worker skips the job

    # ---------------------------------------------------------------- worker
    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if self.max_delay > 0 and self._queued < self.max_batch:
                deadline = loop.time() + self.max_delay
                while self._queued < self.max_batch and (left := deadline - loop.time()) > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), left)
            batch: list[_Job] = []
            count = 0
            while self._pending and (count == 0 or count + len(self._pending[0].items) <= self.max_batch):
                job = self._pending.popleft()
                self._queued -= len(job.items)
                if job.future.done():  # cancelled by its caller (deadline or disconnect)
                    continue
                batch.append(job)
                count += len(job.items)
            if not self._pending:
                self._wake.clear()
            if not batch:
                continue
            if self.on_batch is not None:
                # one observation per model call: a request larger than max_batch is encoded in max_batch
                # chunks (_encode), and was recorded as one call of its whole size
                for start in range(0, count, self.max_batch):
                    self.on_batch(min(self.max_batch, count - start))
            try:
                outcomes = await loop.run_in_executor(self._infer, self._run, batch)
            except Exception as exc:  # unexpected: fail this batch, keep serving
                outcomes = [exc] * len(batch)
            for job, outcome in zip(batch, outcomes, strict=True):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _decode_one(self, item: Item, index: int) -> Any:
        try:
            return load_rgb(item.image, index=index, item_id=item.id or None) if item.has_image else None
        except InvalidItemError as exc:
            return exc

    def _run(self, jobs: list[_Job]) -> list[np.ndarray | BaseException]:
        """Decode, encode and project ``jobs`` (in the inference thread); one outcome per job."""
        outcomes: dict[int, np.ndarray | BaseException] = {}
        flat = [(j, i, item) for j, job in enumerate(jobs) for i, item in enumerate(job.items)]
        pictures = list(self._decode.map(lambda t: self._decode_one(t[2], t[1]), flat))
        for (j, _, _), pic in zip(flat, pictures, strict=True):
            if isinstance(pic, BaseException) and j not in outcomes:
                outcomes[j] = pic
            elif j not in outcomes:
                jobs[j].pictures.append(pic)
        live = [j for j in range(len(jobs)) if j not in outcomes]
        while live:
            try:
                vectors = self._encode([jobs[j] for j in live])
            except InvalidItemError as exc:  # an encoder produced NaN for one item: fail its job, retry the rest
                found = self._owner([jobs[j] for j in live], exc.index)
                if found is None:
                    raise
                owner, rel = found
                job = jobs[live[owner]]
                outcomes[live[owner]] = InvalidItemError(exc.reason, index=rel, item_id=job.items[rel].id or None)
                del live[owner]
                continue
            outcomes.update(zip(live, vectors, strict=True))
            break
        return [outcomes[j] for j in range(len(jobs))]

    @staticmethod
    def _owner(jobs: list[_Job], flat_index: int | None) -> tuple[int, int] | None:
        """(job position, index within the job) of a flat item index."""
        if flat_index is None:
            return None
        for j, job in enumerate(jobs):
            if flat_index < len(job.items):
                return j, flat_index
            flat_index -= len(job.items)
        return None

    def _encode(self, jobs: list[_Job]) -> list[np.ndarray]:
        items = [item for job in jobs for item in job.items]
        pictures = [pic for job in jobs for pic in job.pictures]
        chunks = []
        for s in range(0, len(items), self.max_batch):
            try:
                stop = s + self.max_batch
                chunks.append(self.embedder.encode_decoded(items[s:stop], pictures[s:stop]))
            except InvalidItemError as exc:
                if exc.index is None:
                    raise
                raise InvalidItemError(exc.reason, index=exc.index + s, item_id=exc.item_id) from exc
        raw = chunks[0] if len(chunks) == 1 else RawFeatures.concat(chunks)
        assert self.embedder.projection is not None
        views = self.embedder.projection.project_views(raw, [job.dims for job in jobs])
        out, start = [], 0
        for job in jobs:
            out.append(views[job.dims][start : start + len(job.items)])
            start += len(job.items)
        return out
