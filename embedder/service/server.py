"""Assembling the gRPC server: servicers, health, reflection, auth, TLS, limits, metrics, shutdown.

Lifecycle: :meth:`EmbedstoreServer.start` binds the port and answers health
checks at once (NOT_SERVING), then loads the models and opens the store in a
thread; every service turns SERVING when both are ready (calls before that get
UNAVAILABLE). :meth:`EmbedstoreServer.stop` turns health NOT_SERVING, stops
accepting calls, lets in-flight calls finish for ``grace_s`` seconds, then
stops the batcher and flushes and closes the store.

Auth: with tokens configured, every call needs ``authorization: Bearer <token>``
metadata, except the health service (load balancers and orchestrators probe it
without credentials). Reflection needs the token like any other service
(``grpcurl -H 'authorization: Bearer …'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import inspect
import logging
import math
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from embedder.config import ServerSettings
from embedder.model import Embedder
from embedder.service.batcher import MicroBatcher
from embedder.service.servicers import EmbeddingServicer, LabelingServicer, Metrics, Runtime, StoreServicer
from embedstore.v1 import embedding_pb2, embedding_pb2_grpc, labeling_pb2, labeling_pb2_grpc, store_pb2, store_pb2_grpc
from retrieval import CollectionSpec, VectorStore

log = logging.getLogger("embedstore.server")

SERVICES = (
    embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
    store_pb2.DESCRIPTOR.services_by_name["StoreService"].full_name,
    labeling_pb2.DESCRIPTOR.services_by_name["LabelingService"].full_name,
)
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_WATCH = f"/{HEALTH_SERVICE}/Watch"
EMBEDDING_SERVICE = SERVICES[0]


#: At most one log line per this many seconds about calls refused for their token.
AUTH_LOG_EVERY_S = 10.0


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token check on every call outside the health service (UNAUTHENTICATED otherwise)."""

    def __init__(self, tokens: list[str], metrics: Metrics | None = None) -> None:
        self._tokens = [t.encode() for t in tokens]
        self._metrics = metrics
        self._refused = 0
        self._logged_at = -math.inf

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return True
        header = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode()
        if not header.lower().startswith("bearer "):
            return False
        given = header[7:].strip().encode()
        return any(hmac.compare_digest(given, t) for t in self._tokens)  # no early exit on a match

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if self._allowed(details):
            return handler  # None for an unknown method: grpc answers UNIMPLEMENTED, to a caller with a token
        if handler is None:
            # the same refusal as a known method's: UNIMPLEMENTED here let anyone list the API without a token.
            # Logged (probing is what the log is for), not counted: the name is the caller's, unbounded as a label
            self._log_refusal(details.method)
            return _DENY_ANY
        if self._metrics is not None:
            self._metrics.requests.labels(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()
        self._log_refusal(details.method)
        return _denying(handler)

    def _log_refusal(self, method: str) -> None:
        # one line per AUTH_LOG_EVERY_S with the count since the last: a guessing client must not flood the log
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= AUTH_LOG_EVERY_S:
            log.warning("refused %d call(s) without a valid bearer token (latest: %r)", self._refused, method[:200])
            self._refused, self._logged_at = 0, now


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The servicer function a method handler calls, whatever its streaming kind."""
    return {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[(handler.request_streaming, handler.response_streaming)]


def _replaced(
    handler: grpc.RpcMethodHandler, behavior: Callable[..., Any], *, parse: bool = True
) -> grpc.RpcMethodHandler:
    """``handler`` with another servicer function: same streaming kind, same (de)serializers; with
    ``parse=False`` the request is left as bytes (a refusal has no use for it)."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer if parse else None,
        response_serializer=handler.response_serializer,
    )


_DENIED = "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"


async def _deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    # not parsed: a caller without a token made the server decode up to EMBEDSTORE_GRPC_MAX_MESSAGE_MB per call
    return _replaced(handler, _deny, parse=False)


#: The refusal of a method the server does not have, to a caller without a token. Stream-stream whatever the
#: caller's kind, so it aborts before reading a message (a unary handler would wait for the request first).
_DENY_ANY = grpc.stream_stream_rpc_method_handler(_deny)


class ConcurrencyLimiter(grpc.aio.ServerInterceptor):
    """At most ``limit`` calls in flight outside the health service; the next gets RESOURCE_EXHAUSTED.

    grpc's own ``maximum_concurrent_rpcs`` counts health checks too, so a saturated server failed its
    liveness probe and was restarted for being busy; and its refusals never reached our metrics. This
    limiter exempts health (a probe must answer *because* the server is busy, not despite it) and counts
    each refusal under ``embedstore_grpc_requests_total{code="RESOURCE_EXHAUSTED"}``.

    Health ``Watch`` streams get their own cap, ``watch_limit``: health needs no token, and an open
    stream lives until the caller hangs up, so without one anyone who reached the port could hold
    memory without bound. ``Check`` stays unlimited (it ends at once).
    """

    def __init__(self, limit: int, metrics: Metrics | None = None, *, watch_limit: int = 1024) -> None:
        self.calls = _Slots(limit, "calls already in flight (EMBEDSTORE_GRPC_MAX_CONCURRENT); retry with backoff")
        self.watch_slots = _Slots(
            watch_limit,
            "health Watch streams already open (EMBEDSTORE_GRPC_MAX_HEALTH_WATCHES); use Check, or retry with backoff",
        )
        self._metrics = metrics
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}  # per method, made once

    @property
    def in_flight(self) -> int:
        return self.calls.used

    @property
    def watches(self) -> int:
        return self.watch_slots.used

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        watch = details.method == HEALTH_WATCH
        if handler is None or (details.method.startswith(f"/{HEALTH_SERVICE}/") and not watch):
            return handler
        known = self._wrapped.get(details.method)
        if known is None or known[0] is not handler:
            method = details.method.rsplit("/", 1)[-1]
            known = (handler, self._limited(handler, method, self.watch_slots if watch else self.calls))
            self._wrapped[details.method] = known
        return known[1]

    def _refuse(self, method: str, slots: _Slots) -> str:
        if self._metrics is not None:
            self._metrics.requests.labels(method, "RESOURCE_EXHAUSTED").inc()
        return f"server busy: {slots.limit} {slots.what}"

    def _limited(self, handler: grpc.RpcMethodHandler, method: str, slots: _Slots) -> grpc.RpcMethodHandler:
        # The count is taken and released on the event loop, where every aio handler starts and ends: no lock.
        behavior = _behavior(handler)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a sync handler runs in grpc's thread pool: not ours to count

        if handler.response_streaming:

            async def limited_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if slots.used >= slots.limit:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._refuse(method, slots))
                slots.used += 1
                try:
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        async for reply in result:
                            yield reply
                    else:  # a coroutine that writes with context.write()
                        await result
                finally:
                    slots.used -= 1

            wrapped: Any = limited_stream
        else:

            async def limited_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if slots.used >= slots.limit:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._refuse(method, slots))
                slots.used += 1
                try:
                    return await behavior(request, context)
                finally:
                    slots.used -= 1

            wrapped = limited_unary
        return _replaced(handler, wrapped)


@dataclass
class _Slots:
    """A count of calls of one kind in flight, its limit, and what a refusal says after the limit."""

    limit: int
    what: str
    used: int = 0


def bind_problem(host: str, port: int) -> str:
    """Why ``host:port`` cannot be bound, naming the setting to change: a plain socket is bound to each address the
    host resolves to, the way grpc binds (``SO_REUSEADDR``, dual-stack for ``::``), and the errors read. grpc fails
    only when every address fails, so a port in use or a privileged port anywhere is the cause before "not this
    machine's address", which must hold for all of them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"EMBEDSTORE_GRPC_HOST={host} does not resolve ({exc.strerror})"
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                errors.append(exc)
    codes = {exc.errno for exc in errors}
    if errno.EADDRINUSE in codes:
        return f"EMBEDSTORE_GRPC_PORT={port} is already in use on {host}"
    if errno.EACCES in codes:
        return f"EMBEDSTORE_GRPC_PORT={port} needs privileges to bind (ports below 1024)"
    if errors and codes == {errno.EADDRNOTAVAIL}:
        return f"EMBEDSTORE_GRPC_HOST={host} is not an address of this machine"
    if errors:
        exc = errors[0]
        return f"{exc.strerror or exc} (EMBEDSTORE_GRPC_HOST={host}, EMBEDSTORE_GRPC_PORT={port})"
    return f"grpc refused it; the OS would bind it (EMBEDSTORE_GRPC_HOST={host}, EMBEDSTORE_GRPC_PORT={port})"


def check_runs_dir(path: Path) -> None:
    """Make sure labeling runs can be written under ``path`` (created if missing): a server whose runs folder
    cannot be written came up "ready" and answered every RunLabelingJob with FAILED_PRECONDITION."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OSError(
            f"EMBEDSTORE_GRPC_RUNS_DIR={path} cannot hold labeling runs: {exc.strerror or exc}; point it at a "
            "writable folder"
        ) from None


class EmbedstoreServer:
    """The embedstore gRPC server (grpc.aio).

    ``embedder_factory`` and ``store_factory`` run in a thread after the port
    is bound, so health answers NOT_SERVING while models load.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        embedder_factory: Callable[[], Embedder],
        store_factory: Callable[[], VectorStore],
        collection: str = "items",
        collection_spec: CollectionSpec | None = None,
    ) -> None:
        self.settings = settings
        self._embedder_factory = embedder_factory
        self._store_factory = store_factory
        self.metrics = Metrics()
        self.rt = Runtime(
            metrics=self.metrics,
            default_collection=collection,
            store_pool=ThreadPoolExecutor(settings.store_workers, thread_name_prefix="store"),
            max_message_bytes=settings.max_message_bytes,
            max_batch=settings.max_batch,
            inline_reads=settings.inline_reads,
            runs_dir=settings.runs_dir,
            dask_scheduler=settings.dask_scheduler,
            collection_spec=collection_spec,
        )
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.load_error: BaseException | None = None
        self._server: grpc.aio.Server | None = None
        self._loading: asyncio.Task[None] | None = None
        self._metrics_http: Any = None
        self._stopped = False
        self._hurry = asyncio.Event()  # a second signal during the drain: stop taking calls now
        self.limiter: ConcurrencyLimiter | None = None

    # ------------------------------------------------------------------ start
    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until loaded); returns the bound port."""
        s = self.settings
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if s.tokens:  # first: an unauthenticated call is refused before it takes a slot
            interceptors.append(AuthInterceptor([t.get_secret_value() for t in s.tokens], self.metrics))
        self.limiter = ConcurrencyLimiter(s.max_concurrent, self.metrics, watch_limit=s.max_health_watches)
        interceptors.append(self.limiter)
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(EmbeddingServicer(self.rt), self._server)
        store_pb2_grpc.add_StoreServiceServicer_to_server(StoreServicer(self.rt), self._server)
        labeling_pb2_grpc.add_LabelingServiceServicer_to_server(LabelingServicer(self.rt), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((*SERVICES, HEALTH_SERVICE, reflection.SERVICE_NAME), self._server)
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        check_runs_dir(s.runs_dir)
        address = s.address
        try:
            if s.tls_cert is not None and s.tls_key is not None:
                creds = grpc.ssl_server_credentials([(s.tls_key.read_bytes(), s.tls_cert.read_bytes())])
                self.port = self._server.add_secure_port(address, creds)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises where older releases returned 0
            self.port = 0
        if not self.port:
            # grpc says only "Failed to bind": ask the OS the same question to name the setting at fault
            raise OSError(f"cannot serve gRPC on {address}: {bind_problem(s.host, s.port)}")
        await self._server.start()
        if s.metrics_port:
            from prometheus_client import start_http_server

            try:
                self._metrics_http, _ = start_http_server(s.metrics_port, addr=s.host, registry=self.metrics.registry)
            except OSError as exc:
                await self._server.stop(0)
                raise OSError(
                    f"cannot bind the metrics port {s.host}:{s.metrics_port} (EMBEDSTORE_GRPC_METRICS_PORT; 0 turns "
                    f"metrics off): {exc.strerror or exc}"
                ) from None
            self.metrics_port = self._metrics_http.server_port
        self._loading = asyncio.get_running_loop().create_task(self._load())
        log.info(
            "embedstore gRPC listening on %s (%s)",
            s.model_copy(update={"port": self.port}).address,
            "TLS" if s.tls_cert else "plaintext",
        )
        return self.port

    async def _load(self) -> None:
        store: VectorStore | None = None
        try:
            # the store first: it is quick to open, and a store another process holds is then reported at once,
            # not after the models have loaded
            store = await asyncio.to_thread(self._store_factory)
            await asyncio.to_thread(store.ensure_collection, self.rt.default_collection, self.rt.collection_spec)
            embedder = await asyncio.to_thread(self._embedder_factory)
        except asyncio.CancelledError:  # stopped while loading (a rollout): a clean stop, not a failure
            log.info("stopped while loading")
            if store is not None:
                await asyncio.to_thread(store.close)
            raise
        except BaseException as exc:  # stays NOT_SERVING; serve() reports it
            self.load_error = exc
            self.rt.load_failure = str(exc) or type(exc).__name__
            log.error("loading failed: %s", self.rt.load_failure)
            if store is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(store.close)
            return
        batcher = MicroBatcher(
            embedder,
            max_batch=self.settings.max_batch,
            max_delay_ms=self.settings.max_delay_ms,
            max_queue=self.settings.max_queue,
            on_batch=self.metrics.batch_size.observe,
        )
        batcher.start()
        self.metrics.queue.set_function(lambda: batcher.queued_items)
        self.rt.embedder, self.rt.batcher, self.rt.store = embedder, batcher, store
        self.rt.ready = True
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if embedder.projection is None:
            # the store and labeling services work on stored vectors; embedding needs a projection
            await self.health.set(EMBEDDING_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
            log.warning(
                "no Matryoshka projection loaded: %s is NOT_SERVING, and Upsert of items and Search by text or "
                "image answer FAILED_PRECONDITION (fit one with `embedstore fit-projection`; EMBEDSTORE_PROJECTION)",
                EMBEDDING_SERVICE,
            )
        log.info("embedstore ready (embedding version %s)", embedder.projection.version if embedder.projection else "-")

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until models and store are loaded; re-raises a loading failure."""
        if self._loading is None:
            raise RuntimeError("start() was not called")
        await asyncio.wait_for(asyncio.shield(self._loading), timeout)
        if self.load_error is not None:
            raise self.load_error

    # ------------------------------------------------------------------- stop
    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING; calls still taken for ``drain`` seconds (``EMBEDSTORE_GRPC_DRAIN_S``, so a
        load balancer routes away first); then no new calls, in-flight ones get ``grace`` seconds; then the batcher
        stops and the store is flushed and closed."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_s if grace is None else grace
        drain = self.settings.drain_s if drain is None else drain
        await self.health.enter_graceful_shutdown()
        # only a server that served drains: one whose loading failed, or that is stopped while loading, was never
        # SERVING, so no balancer sends it calls to finish (it waited the whole drain before exiting)
        if drain > 0 and self._server is not None and self.rt.ready and self.load_error is None:
            log.info(
                "embedstore draining: health NOT_SERVING, calls still taken for %gs (a second signal ends it)", drain
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), drain)
        log.info(
            "embedstore stopping: no new calls; %d in flight get %gs, then the store is flushed and closed",
            self.limiter.in_flight if self.limiter is not None else 0,
            grace,
        )
        if self._server is not None:
            await self._server.stop(grace)
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            with contextlib.suppress(BaseException):
                await self._loading
        self.rt.ready = False
        if self.rt.batcher is not None:
            await self.rt.batcher.stop()
        if self.rt.store is not None and not self.rt.store.closed:
            store = self.rt.store
            await asyncio.to_thread(lambda: (store.flush(), store.close()))
        self.rt.store_pool.shutdown(wait=True)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("embedstore stopped")

    async def serve(self) -> None:
        """Start, run until SIGINT/SIGTERM, then shut down gracefully. A loading failure ends it with that error."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: a closed terminal, drained too
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        assert self._loading is not None
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait({self._loading, waiter}, return_when=asyncio.FIRST_COMPLETED)
        try:
            if self.load_error is None:
                await waiter
        finally:
            waiter.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal cuts the drain short
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._hurry.set)
            await self.stop()
        if self.load_error is not None:
            raise self.load_error


class BackgroundServer:
    """An :class:`EmbedstoreServer` on its own event-loop thread (tests, benchmarks, notebooks).

    ``with BackgroundServer(server) as bg:`` starts it and waits until ready;
    leaving the block shuts it down gracefully.
    """

    def __init__(self, server: EmbedstoreServer, *, ready_timeout: float = 120.0, wait: bool = True) -> None:
        import threading

        self.server = server
        self._ready_timeout = ready_timeout
        self._wait = wait
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedstore-grpc", daemon=True)

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def target(self) -> str:
        return self.server.settings.model_copy(update={"port": self.port}).address

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> BackgroundServer:
        self._thread.start()
        self.run(self.server.start())
        if self._wait:
            self.run(self.server.wait_ready(self._ready_timeout))
        return self

    def stop(self, grace: float | None = None) -> None:
        if self._thread.is_alive():
            try:
                self.run(self.server.stop(grace))
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
                self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
