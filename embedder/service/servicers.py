"""The three gRPC services, their status-code mapping and their metrics.

Every RPC runs through :func:`_rpc`, which maps the project's exceptions to
gRPC status codes in one place (see ``STATUS``), counts the call by method
and status, and times it. Model work goes through the :class:`MicroBatcher`;
store calls run in a thread pool: nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from embedder.errors import (
    EmbedderError,
    EmbeddingVersionMismatchError,
    InvalidItemError,
    ModalityNotFittedError,
    ModelUnavailableError,
    ProjectionNotFittedError,
)
from embedder.indexing import VERSION_KEY, item_payload, require_version, reserved_payload_keys
from embedder.model import Embedder, Item
from embedder.service import convert
from embedder.service.batcher import MicroBatcher, Overloaded
from embedstore.v1 import (
    embedding_pb2,
    embedding_pb2_grpc,
    labeling_pb2,
    labeling_pb2_grpc,
    store_pb2,
    store_pb2_grpc,
)
from labeling.config import LabelingConfig
from labeling.errors import (
    JobCancelledError,
    JobPreconditionError,
    JobRunningError,
    LabelConflictError,
    LabelingError,
    ReviewFileError,
    RunNotFoundError,
    RunStateError,
    SeedError,
    UnknownAnswerIdsError,
)
from labeling.inspect import MAX_K, inspect_neighbours
from labeling.job import JobEvent, run_job
from labeling.review import clear_labels, review_queue, submit_labels
from labeling.runs import RUN_FIELD, load_registry, resolve
from retrieval import FULL_DIM, VectorStore
from retrieval.base import MAX_TOP_K
from retrieval.errors import (
    CollectionNotFoundError,
    InvalidInputError,
    PointNotFoundError,
    SchemaMismatchError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreUnavailableError,
)
from retrieval.schema import (
    EXTERNAL_ID_KEY,
    CollectionSpec,
    check_collection_name,
    check_ids,
    check_vectors,
    prepare_payloads,
)

log = logging.getLogger("embedstore.service")

#: The most UTF-8 bytes of an error's text a status carries. Messages quote the caller's input (a filter, a key):
#: past grpc's 16 KB limit on trailing metadata the caller got "RESOURCE_EXHAUSTED: Stream removed" instead of
#: its INVALID_ARGUMENT (the details are percent-encoded, so up to 3 bytes a byte).
MAX_STATUS_BYTES = 3000


def status_message(exc: BaseException) -> str:
    """``str(exc)``, cut to :data:`MAX_STATUS_BYTES` (saying so) when longer."""
    text = str(exc)
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_STATUS_BYTES:
        return text
    return data[:MAX_STATUS_BYTES].decode("utf-8", "ignore") + f" ... (cut: {len(text)} characters in all)"


DIMENSIONS = (128, 256, 512)
MAX_ITEMS_PER_CALL = 4096
SMALL_READ = 100  # top_k / ids up to this run inline on the event loop (see Runtime.read)


class ReplyTooLarge(Exception):
    """The reply a call asks for would be over the server's message limit (RESOURCE_EXHAUSTED)."""


# First match wins: subclasses before their bases.
STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (convert.BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidItemError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (PointNotFoundError, grpc.StatusCode.NOT_FOUND),
    (CollectionNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ProjectionNotFittedError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModalityNotFittedError, grpc.StatusCode.FAILED_PRECONDITION),
    (EmbeddingVersionMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (SchemaMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ReplyTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # the disk: nothing written, a client may retry later
    (StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (StoreLockedError, grpc.StatusCode.UNAVAILABLE),
    (ModelUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (LabelConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownAnswerIdsError, grpc.StatusCode.NOT_FOUND),
    (ReviewFileError, grpc.StatusCode.INVALID_ARGUMENT),
    (SeedError, grpc.StatusCode.FAILED_PRECONDITION),
    (RunStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (JobPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (RunNotFoundError, grpc.StatusCode.NOT_FOUND),
    (JobRunningError, grpc.StatusCode.ABORTED),
    (JobCancelledError, grpc.StatusCode.CANCELLED),
    (StoreError, grpc.StatusCode.INTERNAL),
    (EmbedderError, grpc.StatusCode.INTERNAL),
    (LabelingError, grpc.StatusCode.INTERNAL),
)


def status_of(exc: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class NotReady(Exception):
    """The server is still loading models or opening the store."""


class Metrics:
    """Prometheus instruments in their own registry (one per server, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "embedstore_grpc_requests", "RPCs handled, by method and status", ["method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "embedstore_grpc_request_seconds",
            "RPC latency by method",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "embedstore_embed_batch_size",
            "Items per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.items = Counter("embedstore_embedded_items", "Items embedded", registry=self.registry)
        self.queue = Gauge("embedstore_embed_queue_items", "Items waiting to be embedded", registry=self.registry)


@dataclass
class Runtime:
    """What the servicers share: set up by the server, ready once models and store are loaded."""

    metrics: Metrics
    default_collection: str
    store_pool: ThreadPoolExecutor
    max_message_bytes: int
    max_batch: int
    embedder: Embedder | None = None
    batcher: MicroBatcher | None = None
    store: VectorStore | None = None
    ready: bool = False
    load_failure: str | None = None
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The layout collections are created with (shards and replicas on a Qdrant server or cluster).
    collection_spec: CollectionSpec | None = None

    def require(self) -> tuple[Embedder, MicroBatcher, VectorStore]:
        if self.load_failure is not None:
            raise NotReady(f"the server could not load models or open the store: {self.load_failure}")
        if not self.ready or self.embedder is None or self.batcher is None or self.store is None:
            raise NotReady("the server is starting (loading models and opening the store); retry shortly")
        return self.embedder, self.batcher, self.store

    inline_reads: bool = True
    runs_dir: Path = Path("./data/runs")
    labeling_jobs: set[str] = field(default_factory=set)  # collections with a job running
    labeling_stopping: set[str] = field(default_factory=set)  # of those, jobs cancelled and not yet stopped

    #: The Dask scheduler an ``xgboost_dask`` job may use (EMBEDSTORE_GRPC_DASK_SCHEDULER); None = a local cluster.
    dask_scheduler: str | None = None

    def job_config(self, fields: dict[str, Any]) -> LabelingConfig:
        """A caller's labeling config, less what only the operator may choose.

        ``dask_scheduler`` over the wire let any token holder make the server dial an address of their
        choosing, send it the training matrix, and trust its pickled replies (Dask trusts its scheduler):
        the scheduler is the server's setting. Thread counts above this machine's CPUs are refused."""
        if "dask_scheduler" in fields:
            raise convert.BadRequest(
                "invalid labeling config: dask_scheduler is the server's setting (EMBEDSTORE_GRPC_DASK_SCHEDULER), "
                "not a job's"
            )
        try:
            config = LabelingConfig(**fields)
        except ValidationError as exc:
            bad = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
            raise convert.BadRequest(f"invalid labeling config: {bad}") from exc
        cpus = os.cpu_count() or 1
        for part in ("xgboost", "forest"):
            n_jobs = getattr(config, part).n_jobs
            if n_jobs > cpus:
                raise convert.BadRequest(
                    f"invalid labeling config: {part}.n_jobs={n_jobs} is more than this server's {cpus} CPUs"
                )
        return config.model_copy(update={"dask_scheduler": self.dask_scheduler})

    #: collection -> (when read, the run ids whose write is not applied): the registry is read at most once a
    #: second per collection, so a Search pays nothing for it most of the time
    _unapplied: dict[str, tuple[float, frozenset[str]]] = field(default_factory=dict)

    async def as_readers_see(self, store: VectorStore, collection: str, points: list[Any]) -> list[Any]:
        """Hits or records with their payload as readers should see it (``labeling.runs.resolve``): a point
        written by a run whose write is pending (interrupted, or still going) shows the run before it, and the
        undo record (``pseudo_prev``) is not shown. Get and Search returned both raw, which the README said
        they did not."""
        now = time.monotonic()
        cached = self._unapplied.get(collection)
        if cached is None or now - cached[0] > 1.0:
            registry = await self.read(True, load_registry, store, collection)
            cached = (now, frozenset(registry.unapplied))
            self._unapplied[collection] = cached
        unapplied = cached[1]
        if not unapplied:  # the usual case: nothing to see through (the undo record is left out by convert)
            return points
        return [
            dataclasses.replace(p, payload=resolve(p.payload, unapplied))
            if p.payload is not None and p.payload.get(RUN_FIELD) in unapplied
            else p
            for p in points
        ]

    async def in_store(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.store_pool, functools.partial(fn, *args, **kw))

    async def read(self, small: bool, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """A store read: run on the event loop when ``small`` (and inline_reads), else in the store pool.

        Why: a top-10 search takes ~0.3 ms and the engine holds the GIL for most
        of it (two threads searching measured 1.15x one), so the thread hop buys
        no parallelism and costs ~0.13 ms of the gRPC p50 (measured with
        benchmarks/grpc_load.py). Large reads still leave the loop.
        """
        if small and self.inline_reads:
            return fn(*args, **kw)
        return await self.in_store(fn, *args, **kw)

    def collection(self, name: str) -> str:
        if not name:
            return self.default_collection
        try:
            return check_collection_name(name)
        except InvalidInputError as exc:
            raise convert.BadRequest(f"collection: {exc}") from exc


T = TypeVar("T")


DEADLINE_SLACK_S = 0.1


def _cancel_code(context: Any) -> grpc.StatusCode:
    """How a call that ended by cancellation is counted: DEADLINE_EXCEEDED when its deadline had passed,
    CANCELLED otherwise (the client went away or cancelled it)."""
    left = context.time_remaining()
    # The client gives up at its own deadline and cancels the stream; the server's copy of the deadline starts
    # when the call arrived, a little later, so it is seen a few ms early (a labeling job past its deadline was
    # counted CANCELLED). A cancel within DEADLINE_SLACK_S of the deadline is the deadline.
    expired = left is not None and left <= DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def _rpc(method: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Status mapping, metrics and logging for a unary-response RPC."""

    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
            rt: Runtime = self.rt
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                reply = await fn(self, request, context)
                size = reply.ByteSize() if hasattr(reply, "ByteSize") else 0
                if size > rt.max_message_bytes:
                    # grpc would fail the send with a bare traceback in the log and the call counted as OK
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED
                    await context.abort(
                        code,
                        f"the reply would be {size} bytes, over the server's limit of {rt.max_message_bytes} "
                        "(EMBEDSTORE_GRPC_MAX_MESSAGE_MB): ask for fewer results, or without payload / vectors",
                    )
                return reply
            except NotReady as exc:
                code = grpc.StatusCode.UNAVAILABLE
                await context.abort(code, status_message(exc))
            except asyncio.CancelledError:
                code = _cancel_code(context)
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                code = status_of(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                await context.abort(code, status_message(exc))
            finally:
                rt.metrics.requests.labels(method, code.name).inc()
                rt.metrics.latency.labels(method).observe(time.perf_counter() - start)
            raise AssertionError("unreachable")  # abort always raises

        return handler

    return wrap


def _dims(value: int) -> int:
    dims = value or 512
    if dims not in DIMENSIONS:
        raise convert.BadRequest(f"dimensions must be one of {DIMENSIONS} (or 0 for 512), got {value}")
    return dims


def _items(messages: Any, what: str = "items") -> list[Item]:
    if len(messages) == 0:
        raise convert.BadRequest(f"no {what} given")
    if len(messages) > MAX_ITEMS_PER_CALL:
        raise convert.BadRequest(f"{len(messages)} {what} in one call; the limit is {MAX_ITEMS_PER_CALL}")
    return [convert.item(m) for m in messages]


# ------------------------------------------------------------------ embedding
class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, rt: Runtime, stream_window: int = 256) -> None:
        self.rt = rt
        self.stream_window = stream_window

    @_rpc("Embed")
    async def Embed(self, request: embedding_pb2.EmbedRequest, context: Any) -> embedding_pb2.EmbedResponse:
        embedder, batcher, _ = self.rt.require()
        dims = _dims(request.dimensions)
        items = _items(request.items)
        # A reply over the size limit is refused by _rpc after the fact; known from the count alone, it is
        # refused here before any model work (each vector: its floats plus ~6 bytes of framing).
        per_item = 4 * dims + 6
        if len(items) * per_item + 64 > self.rt.max_message_bytes:
            fits = max(1, (self.rt.max_message_bytes - 64) // per_item)
            raise ReplyTooLarge(
                f"{len(items)} items at {dims} dimensions make a reply of about {len(items) * per_item} bytes, over "
                f"the server's limit of {self.rt.max_message_bytes} (EMBEDSTORE_GRPC_MAX_MESSAGE_MB): send at most "
                f"{fits} items per call, or use EmbedStream"
            )
        vectors = await batcher.embed(items, dims)
        self.rt.metrics.items.inc(len(items))
        response = embedding_pb2.EmbedResponse(dimensions=dims, embedding_version=embedder.version)
        for row in vectors:
            convert.fill_vector(response.embeddings.add(), row)
        return response

    async def EmbedStream(
        self, request_iterator: AsyncIterator[embedding_pb2.EmbedStreamRequest], context: Any
    ) -> AsyncIterator[embedding_pb2.EmbedStreamResponse]:
        """Reads items while earlier ones are being embedded (a window of ``stream_window`` in flight)."""
        metrics = self.rt.metrics
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            _, batcher, _ = self.rt.require()
        except NotReady as exc:
            metrics.requests.labels("EmbedStream", "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, status_message(exc))
        window: asyncio.Queue[tuple[int, str, asyncio.Future[Any]] | None] = asyncio.Queue(self.stream_window)

        async def submit(seq: int, req: embedding_pb2.EmbedStreamRequest) -> Any:
            dims = _dims(req.dimensions)
            try:
                return (await batcher.embed([convert.item(req.item)], dims))[0]
            except InvalidItemError as exc:  # name the item by its position in the stream
                raise InvalidItemError(exc.reason, index=seq, item_id=req.item.id or None) from exc

        inflight: set[asyncio.Future[Any]] = set()  # every item's task, until its reply is sent

        async def reader() -> None:
            seq = 0
            async for req in request_iterator:
                task = asyncio.ensure_future(submit(seq, req))
                inflight.add(task)
                await window.put((seq, req.item.id, task))
                seq += 1
            await window.put(None)

        reading = asyncio.ensure_future(reader())
        try:
            while True:
                entry = await window.get()
                if entry is None:
                    break
                seq, item_id, task = entry
                response = embedding_pb2.EmbedStreamResponse(sequence=seq, id=item_id)
                try:
                    inflight.discard(task)
                    convert.fill_vector(response.embedding, await task)
                    metrics.items.inc()
                except (convert.BadRequest, EmbedderError, InvalidInputError) as exc:
                    if isinstance(exc, Overloaded | ProjectionNotFittedError):
                        raise
                    response.error.status = status_of(exc).name
                    response.error.message = str(exc)
                yield response
            await reading
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: grpc closes the response stream of a client that cancelled or went away
            code = _cancel_code(context)
            raise
        except Exception as exc:
            code = status_of(exc)
            await context.abort(code, status_message(exc))
        finally:
            if code == grpc.StatusCode.OK and context.cancelled():
                code = _cancel_code(context)
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
            # A stream that ends early (the client left, shutdown) leaves items queued: cancel them, and take the
            # outcome of those already failed (a shutdown logged one "exception never retrieved" per item)
            for task in inflight:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()
            metrics.requests.labels("EmbedStream", code.name).inc()
            metrics.latency.labels("EmbedStream").observe(time.perf_counter() - start)

    @_rpc("Info")
    async def Info(self, request: embedding_pb2.InfoRequest, context: Any) -> embedding_pb2.InfoResponse:
        embedder, _, _ = self.rt.require()
        version = embedder.projection.version if embedder.projection is not None else ""
        return embedding_pb2.InfoResponse(
            embedding_version=version,
            dimensions=list(DIMENSIONS) if version else [],
            encoders_json=json.dumps(embedder.encoder_signatures(), sort_keys=True),
            max_batch=self.rt.max_batch,
            max_message_bytes=self.rt.max_message_bytes,
        )


# ---------------------------------------------------------------------- store
class StoreServicer(store_pb2_grpc.StoreServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @_rpc("Upsert")
    async def Upsert(self, request: store_pb2.UpsertRequest, context: Any) -> store_pb2.UpsertResponse:
        embedder, batcher, store = self.rt.require()
        collection = self.rt.collection(request.collection)
        points = list(request.points)
        if not points:
            raise convert.BadRequest("no points given")
        if len(points) > MAX_ITEMS_PER_CALL:
            raise convert.BadRequest(f"{len(points)} points in one call; the limit is {MAX_ITEMS_PER_CALL}")
        to_embed: list[int] = []
        vectors = np.zeros((len(points), FULL_DIM), dtype=np.float32)
        payloads: list[dict[str, Any]] = []
        reserved = reserved_payload_keys()
        for i, p in enumerate(points):
            where = f"point {i}" + (f", id {p.id!r}" if p.id else "")
            if not p.id:
                raise convert.BadRequest(f"{where}: id is required")
            has_item = p.HasField("item") and (bool(p.item.image) or bool(p.item.text))
            has_vector = p.HasField("vector") and len(p.vector.values) > 0
            if has_item == has_vector:
                raise convert.BadRequest(f"{where}: give exactly one of item (image/text) or vector")
            payload = convert.struct_to_dict(p.payload, p.HasField("payload")) or {}
            clash = sorted(k for k in payload if k in reserved and k != EXTERNAL_ID_KEY)  # the store names that one
            if clash:
                raise convert.BadRequest(
                    f"{where}: payload sets {clash}: the system writes "
                    f"{'that field' if len(clash) == 1 else 'those fields'} itself; use another key"
                )
            if p.label:
                payload["label"] = p.label
                payload.setdefault("label_source", "human")
            if has_vector:
                vectors[i] = convert.vector(p.vector, dim=FULL_DIM, what=where + ": vector")
            else:
                to_embed.append(i)
            payloads.append(payload)
        version = ""
        if to_embed:
            exists = await self.rt.in_store(store.collection_exists, collection)
            # a new collection is made only when the write is certain (below): a refused call makes nothing
            version = await self.rt.in_store(require_version, store, collection, embedder) if exists else ""
            version = version or embedder.version  # no projection: FAILED_PRECONDITION, as before
            items = [convert.item(points[i].item, points[i].id) for i in to_embed]
            try:
                embedded = await batcher.embed(items, 512)
            except InvalidItemError as exc:  # name the point's index in the request, not in the embedded subset
                raise InvalidItemError(exc.reason, index=to_embed[exc.index or 0], item_id=exc.item_id) from exc
            self.rt.metrics.items.inc(len(items))
            for row, item, i in zip(embedded, items, to_embed, strict=True):
                vectors[i] = row
                payloads[i] = item_payload(item, version) | payloads[i]
                payloads[i][VERSION_KEY] = version
        # the store's own checks (ids, vectors, payloads) before the collection is made: a refused point
        # leaves no empty collection behind
        ext = check_ids([p.id for p in points], what="request")
        prepare_payloads(payloads, ext)
        check_vectors(vectors, ext)
        if context.time_remaining() is not None and context.time_remaining() <= 0:
            raise asyncio.CancelledError  # the caller has gone: write nothing
        async with self.rt.write_lock:  # claim the version and write as one step per server
            await self.rt.in_store(store.ensure_collection, collection, self.rt.collection_spec)
            if to_embed:
                await self.rt.in_store(require_version, store, collection, embedder, claim=True)
            written = await self.rt.in_store(store.upsert, collection, [p.id for p in points], vectors, payloads)
        return store_pb2.UpsertResponse(written=written, embedding_version=version)

    @_rpc("Search")
    async def Search(self, request: store_pb2.SearchRequest, context: Any) -> store_pb2.SearchResponse:
        embedder, batcher, store = self.rt.require()
        collection = self.rt.collection(request.collection)
        top_k = request.top_k or 10
        if top_k > MAX_TOP_K:
            raise convert.BadRequest(f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
        shortlist = request.shortlist or None
        flt = convert.struct_to_dict(request.filter, request.HasField("filter"))
        kind = request.query.WhichOneof("kind") if request.HasField("query") else None
        exclude: str | None = None
        if kind == "vector":
            query = convert.vector(request.query.vector, dim=FULL_DIM, what="query vector")
        elif kind == "item":
            item = convert.item(request.query.item)
            await self.rt.in_store(require_version, store, collection, embedder)
            query = (await batcher.embed([item], 512))[0]
        elif kind == "point_id":
            if not request.query.point_id:
                raise convert.BadRequest("query.point_id is empty")
            exclude = request.query.point_id
            record = (await self.rt.read(True, store.retrieve, collection, [exclude], with_vectors=True))[0]
            query = record.vector
            top_k += 1
            if shortlist is not None:
                shortlist = max(shortlist, top_k)
        else:
            raise convert.BadRequest("query must set one of item, vector or point_id")
        if shortlist is not None and shortlist < top_k:
            raise convert.BadRequest(f"shortlist ({shortlist}) must be >= top_k ({top_k})")
        small = top_k <= SMALL_READ and (shortlist or 0) <= 10 * SMALL_READ
        hits = await self.rt.read(
            small,
            store.search,
            collection,
            query,
            top_k=top_k,
            shortlist=shortlist,
            filter=flt,
            with_payload=request.with_payload,
        )
        if exclude is not None:
            hits = [h for h in hits if h.id != exclude][: top_k - 1]
        if request.with_payload:
            hits = await self.rt.as_readers_see(store, collection, hits)
        response = store_pb2.SearchResponse()
        for h in hits:
            convert.hit_to_proto(h, response.hits.add(), request.with_payload)
        return response

    def _by_ids(self, request: Any) -> tuple[VectorStore, str, list[str]]:
        """The store, collection and ids of a Get/Delete request (refused when no ids are given)."""
        _, _, store = self.rt.require()
        collection = self.rt.collection(request.collection)
        if not request.ids:
            raise convert.BadRequest("no ids given")
        return store, collection, list(request.ids)

    @_rpc("Get")
    async def Get(self, request: store_pb2.GetRequest, context: Any) -> store_pb2.GetResponse:
        store, collection, ids = self._by_ids(request)
        records = await self.rt.read(
            len(ids) <= SMALL_READ,
            store.retrieve,
            collection,
            ids,
            with_payload=request.with_payload,
            with_vectors=request.with_vectors,
            missing_ok=request.allow_missing,
        )
        if request.with_payload:
            records = await self.rt.as_readers_see(store, collection, records)
        response = store_pb2.GetResponse()
        for r in records:
            convert.record_to_proto(r, response.points.add())
        return response

    @_rpc("Delete")
    async def Delete(self, request: store_pb2.DeleteRequest, context: Any) -> store_pb2.DeleteResponse:
        store, collection, ids = self._by_ids(request)
        async with self.rt.write_lock:
            deleted = await self.rt.in_store(store.delete, collection, ids, missing_ok=request.allow_missing)
        return store_pb2.DeleteResponse(deleted=deleted)

    @_rpc("Count")
    async def Count(self, request: store_pb2.CountRequest, context: Any) -> store_pb2.CountResponse:
        _, _, store = self.rt.require()
        collection = self.rt.collection(request.collection)
        flt = convert.struct_to_dict(request.filter, request.HasField("filter"))
        count = await self.rt.in_store(store.count, collection, flt)
        response = store_pb2.CountResponse(count=count)
        if request.facet:
            facets = await self.rt.in_store(store.facet, collection, request.facet, filter=flt)
            for value, n in facets.items():
                response.facets[str(value)] = n
        return response


# ------------------------------------------------------------------- labeling
class LabelingServicer(labeling_pb2_grpc.LabelingServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @_rpc("InspectNeighbours")
    async def InspectNeighbours(
        self, request: labeling_pb2.InspectNeighboursRequest, context: Any
    ) -> labeling_pb2.InspectNeighboursResponse:
        _, _, store = self.rt.require()
        collection = self.rt.collection(request.collection)
        if not request.point_id:
            raise convert.BadRequest("point_id is empty")
        k = request.k or 10
        if k > MAX_K:
            raise convert.BadRequest(f"k must be in 1..{MAX_K}, got {k}")
        result = await self.rt.in_store(inspect_neighbours, store, collection, request.point_id, k)
        return convert.inspection_to_proto(result)

    async def RunLabelingJob(
        self, request: labeling_pb2.RunLabelingJobRequest, context: Any
    ) -> AsyncIterator[labeling_pb2.LabelingEvent]:
        """Runs :func:`labeling.job.run_job` in the store pool and streams its events as they happen."""
        metrics, rt = self.rt.metrics, self.rt
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        cancelled = threading.Event()
        collection = ""
        owned = False
        job: asyncio.Future[Any] | None = None
        getter: asyncio.Future[Any] | None = None
        try:
            _, _, store = rt.require()
            collection = rt.collection(request.collection)
            fields = convert.struct_to_dict(request.config) if request.HasField("config") else {}
            config = rt.job_config(fields)
            if collection in rt.labeling_stopping:
                raise JobRunningError(
                    f"the labeling job on collection {collection!r} was cancelled and is stopping (at its next step, "
                    "at most one training step away): retry in a little while"
                )
            if collection in rt.labeling_jobs:
                raise JobRunningError(f"a labeling job is already running on collection {collection!r}")
            rt.labeling_jobs.add(collection)
            owned = True
            log.info("labeling job on %r started (%s)", collection, config.learner)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[JobEvent] = asyncio.Queue()

            def on_event(e: JobEvent) -> None:
                if cancelled.is_set() or loop.is_closed():
                    raise JobCancelledError("the labeling job was cancelled by its caller")
                loop.call_soon_threadsafe(events.put_nowait, e)

            job = loop.run_in_executor(
                rt.store_pool,
                functools.partial(run_job, store, collection, config, runs_dir=rt.runs_dir, events=on_event),
            )
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    if (msg := convert.event_to_proto(getter.result())) is not None:
                        yield msg
                    continue
                getter.cancel()
                while not events.empty():
                    if (msg := convert.event_to_proto(events.get_nowait())) is not None:
                        yield msg
                yield convert.run_summary_to_proto(job.result())
                break
        except asyncio.CancelledError:
            cancelled.set()
            code = _cancel_code(context)  # a deadline is DEADLINE_EXCEEDED, as the caller sees it
            raise
        except NotReady as exc:
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, status_message(exc))
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("RunLabelingJob failed")
            await context.abort(code, status_message(exc))
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            if owned:
                if job is not None and not job.done():
                    # the job thread stops at its next step; the collection is free once it has
                    rt.labeling_stopping.add(collection)

                    def freed(f: asyncio.Future[Any]) -> None:
                        rt.labeling_jobs.discard(collection)
                        rt.labeling_stopping.discard(collection)
                        if not f.cancelled():
                            f.exception()  # retrieved: its JobCancelledError is the expected end, not a log error

                    job.add_done_callback(freed)
                else:
                    rt.labeling_jobs.discard(collection)
            metrics.requests.labels("RunLabelingJob", code.name).inc()
            metrics.latency.labels("RunLabelingJob").observe(time.perf_counter() - start)
            if owned:
                log.info("labeling job on %r ended: %s after %.1fs", collection, code.name, time.perf_counter() - start)

    @_rpc("ListReviewQueue")
    async def ListReviewQueue(
        self, request: labeling_pb2.ListReviewQueueRequest, context: Any
    ) -> labeling_pb2.ListReviewQueueResponse:
        _, _, store = self.rt.require()
        collection = self.rt.collection(request.collection)
        items = await self.rt.in_store(review_queue, store, collection, limit=request.limit or 100)
        response = labeling_pb2.ListReviewQueueResponse()
        for item in items:
            convert.review_item_to_proto(item, response.items.add())
        return response

    @_rpc("SubmitLabels")
    async def SubmitLabels(
        self, request: labeling_pb2.SubmitLabelsRequest, context: Any
    ) -> labeling_pb2.SubmitLabelsResponse:
        _, _, store = self.rt.require()
        collection = self.rt.collection(request.collection)
        if not request.answers:
            raise convert.BadRequest("no answers given")
        answers = [(a.id, a.label) for a in request.answers]
        async with self.rt.write_lock:
            result = await self.rt.in_store(
                submit_labels,
                store,
                collection,
                answers,
                source=request.source or "human",
                overwrite_human=request.overwrite_human,
            )
        return labeling_pb2.SubmitLabelsResponse(written=result.written, unchanged=result.unchanged)

    @_rpc("ClearLabels")
    async def ClearLabels(
        self, request: labeling_pb2.ClearLabelsRequest, context: Any
    ) -> labeling_pb2.ClearLabelsResponse:
        _, _, store = self.rt.require()
        collection = self.rt.collection(request.collection)
        if not request.ids:
            raise convert.BadRequest("no ids given")
        async with self.rt.write_lock:
            result = await self.rt.in_store(
                clear_labels, store, collection, list(request.ids), any_source=request.any_source
            )
        return labeling_pb2.ClearLabelsResponse(cleared=result.cleared, unchanged=result.unchanged)
