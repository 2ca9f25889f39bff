"""A typed Python client for the embedstore gRPC service.

    from embedder.client import Client

    with Client("localhost:50051", token="…") as client:
        vectors = client.embed(["a red apple", Path("apple.png")], dimensions=128)
        hits = client.search(text="a red apple", top_k=5, filter={"split": "train"})
        view = client.inspect(hits[0].id, k=10)

Every failure is a :class:`ServiceError` subclass named after its gRPC status
(:class:`InvalidArgument`, :class:`NotFound`, ...), carrying ``code`` and the
server's message. Requests larger than ``max_message_mb`` are refused before
they are sent (:class:`MessageTooLarge`), with a hint to send smaller batches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedder.model import Item
from embedder.service.convert import BadRequest, dict_to_struct, struct_to_dict
from embedstore.v1 import (
    embedding_pb2,
    embedding_pb2_grpc,
    labeling_pb2,
    labeling_pb2_grpc,
    store_pb2,
    store_pb2_grpc,
    types_pb2,
)
from labeling.inspect import Agreement, InspectedPoint, Inspection, LabelState, Neighbour


# ----------------------------------------------------------------------- errors
class ServiceError(Exception):
    """A call to the embedstore service failed; ``code`` is the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


def _struct(value: Mapping[str, Any], target: Any) -> None:
    """``dict_to_struct``, its refusals raised as the client's own InvalidArgument (one hierarchy)."""
    try:
        dict_to_struct(value, target)
    except BadRequest as exc:
        raise InvalidArgument(str(exc)) from None


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class MessageTooLarge(ResourceExhausted):
    """A request or response is over the message size limit."""


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(ServiceError):
    """E.g. a labeling job is already running on the collection."""

    code = grpc.StatusCode.ABORTED


_ERRORS: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Unavailable,
                              Unauthenticated, DeadlineExceeded, Aborted)
}  # fmt: skip


def _translate(exc: grpc.RpcError, max_bytes: int) -> ServiceError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return MessageTooLarge(
            f"{details}: the message is over a gRPC size limit (client {max_bytes // 2**20} MiB; the server's is "
            "EMBEDSTORE_GRPC_MAX_MESSAGE_MB); send smaller batches or raise both limits",
            code,
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        # grpc's own "Method not found!": the server is older than this client (e.g. ClearLabels before it existed)
        return ServiceError(
            f"{details}: the server does not have this call; it is probably older than this client (upgrade it)",
            code,
        )
    return _ERRORS.get(code, ServiceError)(details, code)


# ------------------------------------------------------------------------ types
@dataclass(frozen=True, slots=True)
class ScoredPoint:
    id: str
    score: float
    payload: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Point:
    id: str
    payload: dict[str, Any] | None = None
    vector: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class CountResult:
    count: int
    facets: dict[str, int]


@dataclass(frozen=True, slots=True)
class StreamResult:
    """One item's outcome on :meth:`Client.embed_stream`: ``vector`` or ``error`` (status, message)."""

    sequence: int
    id: str
    vector: np.ndarray | None
    error: tuple[str, str] | None = None


ImageLike = bytes | bytearray | str | Path
ItemLike = Item | str | bytes | Path


def _image_bytes(image: ImageLike) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    path = Path(image)
    if not path.is_file():
        raise InvalidArgument(f"image file {str(path)!r} does not exist")
    return path.read_bytes()


def _wire_text(text: str | None, what: str = "text") -> str:
    """``text`` checked to be sendable: protobuf strings are UTF-8, which a lone surrogate cannot be."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise InvalidArgument(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{what} is not valid Unicode ({exc.reason} at character {exc.start})") from None
    return text


def _item_message(item: ItemLike) -> types_pb2.Item:
    """An Item, a text (str), image bytes or an image path (Path) as the wire Item."""
    if isinstance(item, str):
        return types_pb2.Item(text=_wire_text(item))
    if isinstance(item, (bytes, bytearray, Path)):
        return types_pb2.Item(image=_image_bytes(item))
    if isinstance(item, Item):
        image = b""
        if item.image is not None:
            if not isinstance(item.image, (bytes, bytearray, str, Path)):
                raise InvalidArgument(f"item {item.id!r}: image must be bytes or a file path to send over gRPC")
            image = _image_bytes(item.image)
        where = f"item {item.id!r}"
        return types_pb2.Item(
            id=_wire_text(str(item.id or ""), f"{where}: id"), image=image, text=_wire_text(item.text, f"{where}: text")
        )
    raise InvalidArgument(f"cannot send {type(item).__name__} as an item: give an Item, a str, bytes or a Path")


def _vector(values: Any) -> types_pb2.Vector:
    return types_pb2.Vector(values=np.asarray(values, dtype=np.float32).ravel().tolist())


def _label_state(m: labeling_pb2.LabelState) -> LabelState:
    return LabelState(
        label=m.label or None,
        label_source=m.label_source or None,
        pseudo_label=m.pseudo_label or None,
        pseudo_confidence=m.pseudo_confidence if m.HasField("pseudo_confidence") else None,
        pseudo_status=m.pseudo_status or None,
    )


def _inspected(m: labeling_pb2.InspectedPoint) -> InspectedPoint:
    return InspectedPoint(m.id, _label_state(m.state), struct_to_dict(m.payload, True) or {})


def tls_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Client TLS settings from the environment, as the command line uses them: ``EMBEDSTORE_SERVER_CA`` (a
    PEM file to verify the server with; implies TLS), ``EMBEDSTORE_SERVER_TLS=true`` (TLS with the system's
    roots) and ``EMBEDSTORE_SERVER_TLS_NAME`` (the name the server's certificate carries, when it is not the
    host dialled). Empty when none is set: plaintext."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    if env.get("EMBEDSTORE_SERVER_CA"):
        ca = Path(env["EMBEDSTORE_SERVER_CA"])
        if not ca.is_file():
            raise InvalidArgument(f"EMBEDSTORE_SERVER_CA={ca}: no such certificate file")
        out["root_certificates"] = ca
    if env.get("EMBEDSTORE_SERVER_TLS", "").strip().lower() in ("1", "true", "yes", "on"):
        out["tls"] = True
    if env.get("EMBEDSTORE_SERVER_TLS_NAME"):
        out["tls_name"] = env["EMBEDSTORE_SERVER_TLS_NAME"]
    return out


def check_target(target: str) -> str:
    """``host:port`` (or a gRPC name with its scheme: ``unix:``, ``dns:``, ``ipv4:``, ``ipv6:``), else
    :class:`InvalidArgument`. Without a port grpc dials 443, so ``--server myhost`` hung until its deadline
    against a service that listens on 50051, saying only "unavailable"."""
    target = (target or "").strip()
    if not target:
        raise InvalidArgument("the server address is empty: give host:port (EMBEDSTORE_SERVER or --server)")
    if target.split(":", 1)[0] in ("unix", "unix-abstract", "dns", "ipv4", "ipv6", "vsock", "xds"):
        return target
    host, sep, port = target.rpartition(":")
    if target.startswith("[") and not target.endswith("]"):  # [::1]:50051
        host, sep, port = target.rpartition("]:")
        host += "]"
    if not sep or not host or host.endswith(":") or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(
            f"server address {target!r} needs a port: give host:port (embedstore serve listens on 50051; "
            "a TLS proxy usually on 443)"
        )
    return target


# ----------------------------------------------------------------------- client
class Client:
    """Synchronous client over one gRPC channel (thread-safe; share one per process)."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        tls_name: str | None = None,
        timeout: float | None = 30.0,
        max_message_mb: int = 64,
        collection: str = "",
    ) -> None:
        self.target = target = check_target(target)
        self.timeout = timeout
        self.collection = collection
        self.max_bytes = max_message_mb * 1024 * 1024
        options = [
            ("grpc.max_receive_message_length", self.max_bytes),
            ("grpc.max_send_message_length", self.max_bytes),
        ]
        if tls_name:  # the name the server's certificate must carry, when it is not the dialled host
            options.append(("grpc.ssl_target_name_override", tls_name))
        if tls or root_certificates is not None:
            roots = root_certificates
            if isinstance(roots, (str, Path)):
                try:
                    roots = Path(roots).read_bytes()
                except OSError as exc:
                    raise InvalidArgument(
                        f"cannot read the CA certificate {roots} (EMBEDSTORE_SERVER_CA or root_certificates): "
                        f"{exc.strerror or exc}"
                    ) from None
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._closed = False
        self._embed = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)
        self._store = store_pb2_grpc.StoreServiceStub(self._channel)
        self._labeling = labeling_pb2_grpc.LabelingServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ------------------------------------------------------------- plumbing
    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def _require_open(self) -> None:
        if self._closed:  # grpc's own error here is a bare ValueError, outside ServiceError
            raise Unavailable("this client was closed; make a new Client")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        size = request.ByteSize()
        if size > self.max_bytes:
            raise MessageTooLarge(
                f"request is {size} bytes, over the {self.max_bytes // 2**20} MiB message limit; "
                "send smaller batches (or raise max_message_mb here and EMBEDSTORE_GRPC_MAX_MESSAGE_MB on the server)"
            )
        self._require_open()
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _translate(exc, self.max_bytes) from None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server reports SERVING (models loaded, store open)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except ServiceError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"{self.target} is not SERVING after {timeout:.0f}s")
            time.sleep(0.1)

    def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        """The health status name of ``service`` (``""``: the whole server)."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # ------------------------------------------------------------ embedding
    def embed(self, items: Sequence[ItemLike], dimensions: int = 512, *, timeout: float | None = None) -> np.ndarray:
        """(len(items), dimensions) unit-norm vectors."""
        request = embedding_pb2.EmbedRequest(items=[_item_message(x) for x in items], dimensions=dimensions)
        response = self._call(self._embed.Embed, request, timeout)
        if not response.embeddings:
            return np.zeros((0, dimensions), dtype=np.float32)
        return np.array([e.values for e in response.embeddings], dtype=np.float32)

    def embed_stream(
        self, items: Iterable[ItemLike], dimensions: int = 512, *, timeout: float | None = None
    ) -> Iterator[StreamResult]:
        """Stream many items; results come back in order, a bad item as a result with ``error`` set."""

        local: list[ServiceError] = []  # an item this side could not send (a missing file, a lone surrogate)

        def requests() -> Iterator[embedding_pb2.EmbedStreamRequest]:
            for n, x in enumerate(items):
                try:
                    message = _item_message(x)
                except ServiceError as exc:
                    # gRPC would only report "Exception iterating requests!" and cancel the call: keep the reason
                    local.append(type(exc)(f"stream item {n}: {exc.message}"))
                    raise
                yield embedding_pb2.EmbedStreamRequest(item=message, dimensions=dimensions)

        try:
            self._require_open()
            for r in self._embed.EmbedStream(requests(), timeout=timeout, metadata=self._metadata):
                if r.HasField("error"):
                    yield StreamResult(r.sequence, r.id, None, (r.error.status, r.error.message))
                else:
                    yield StreamResult(r.sequence, r.id, np.asarray(r.embedding.values, dtype=np.float32))
        except grpc.RpcError as exc:
            if local:
                raise local[0] from None
            raise _translate(exc, self.max_bytes) from None
        if local:  # the call may end cleanly with the results of the items sent before the bad one
            raise local[0]

    def info(self) -> dict[str, Any]:
        r = self._call(self._embed.Info, embedding_pb2.InfoRequest())
        return {
            "embedding_version": r.embedding_version,
            "dimensions": list(r.dimensions),
            "encoders": json.loads(r.encoders_json) if r.encoders_json else {},
            "max_batch": r.max_batch,
            "max_message_bytes": r.max_message_bytes,
        }

    # ---------------------------------------------------------------- store
    def upsert(self, items: Sequence[Item], *, collection: str | None = None, timeout: float | None = None) -> int:
        """Embed and store items (``Item.id``, image and/or text, ``label``, ``payload``); returns points written."""
        request = store_pb2.UpsertRequest(collection=collection or self.collection)
        for item in items:
            point = request.points.add(id=str(item.id), item=_item_message(item), label=item.label or "")
            _struct(item.payload, point.payload)
        return int(self._call(self._store.Upsert, request, timeout).written)

    def upsert_vectors(
        self,
        ids: Sequence[str],
        vectors: Any,
        payloads: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        labels: Sequence[str | None] | None = None,
        collection: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Store raw 512D vectors under ``ids``; returns points written."""
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != len(ids):
            raise InvalidArgument(f"vectors must be ({len(ids)}, 512), got shape {arr.shape}")
        request = store_pb2.UpsertRequest(collection=collection or self.collection)
        for i, pid in enumerate(ids):
            point = request.points.add(id=str(pid), vector=_vector(arr[i]))
            if labels is not None and labels[i]:
                point.label = str(labels[i])
            if payloads is not None:
                _struct(payloads[i], point.payload)
        return int(self._call(self._store.Upsert, request, timeout).written)

    def search(
        self,
        text: str | None = None,
        image: ImageLike | None = None,
        *,
        vector: Any = None,
        point_id: str | None = None,
        top_k: int = 10,
        shortlist: int | None = None,
        filter: Mapping[str, Any] | None = None,
        with_payload: bool = True,
        collection: str | None = None,
        timeout: float | None = None,
    ) -> list[ScoredPoint]:
        """Neighbours of a text and/or image, a 512D vector, or a stored point (exactly one kind of query)."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            # 0 would read as "not set" on the wire (proto3) and come back as 10 hits
            raise InvalidArgument(f"top_k must be an int >= 1, got {top_k!r}")
        kinds = sum([text is not None or image is not None, vector is not None, point_id is not None])
        if kinds != 1:
            raise InvalidArgument("give exactly one query: text and/or image, vector, or point_id")
        request = store_pb2.SearchRequest(
            collection=collection or self.collection, top_k=top_k, shortlist=shortlist or 0, with_payload=with_payload
        )
        if vector is not None:
            request.query.vector.CopyFrom(_vector(vector))
        elif point_id is not None:
            request.query.point_id = str(point_id)
        else:
            request.query.item.CopyFrom(
                types_pb2.Item(text=_wire_text(text), image=_image_bytes(image) if image is not None else b"")
            )
        if filter:
            _struct(filter, request.filter)
        response = self._call(self._store.Search, request, timeout)
        return [
            ScoredPoint(h.id, h.score, struct_to_dict(h.payload, h.HasField("payload")) if with_payload else None)
            for h in response.hits
        ]

    def get(
        self,
        ids: Sequence[str],
        *,
        with_payload: bool = True,
        with_vectors: bool = False,
        allow_missing: bool = False,
        collection: str | None = None,
    ) -> list[Point]:
        request = store_pb2.GetRequest(
            collection=collection or self.collection,
            ids=[str(i) for i in ids],
            with_payload=with_payload,
            with_vectors=with_vectors,
            allow_missing=allow_missing,
        )
        response = self._call(self._store.Get, request)
        return [
            Point(
                p.id,
                struct_to_dict(p.payload, p.HasField("payload")) if with_payload else None,
                np.asarray(p.vector.values, dtype=np.float32) if with_vectors else None,
            )
            for p in response.points
        ]

    def delete(self, ids: Sequence[str], *, allow_missing: bool = False, collection: str | None = None) -> int:
        request = store_pb2.DeleteRequest(
            collection=collection or self.collection, ids=[str(i) for i in ids], allow_missing=allow_missing
        )
        return int(self._call(self._store.Delete, request).deleted)

    def count(
        self, filter: Mapping[str, Any] | None = None, *, facet: str | None = None, collection: str | None = None
    ) -> CountResult:
        request = store_pb2.CountRequest(collection=collection or self.collection, facet=facet or "")
        if filter:
            _struct(filter, request.filter)
        response = self._call(self._store.Count, request)
        facets = sorted(response.facets.items(), key=lambda kv: (-kv[1], kv[0]))
        return CountResult(int(response.count), dict(facets))

    # ------------------------------------------------------------- labeling
    def inspect(self, point_id: str, k: int = 10, *, collection: str | None = None) -> Inspection:
        """A point's label state beside its k nearest neighbours and their agreement."""
        request = labeling_pb2.InspectNeighboursRequest(
            collection=collection or self.collection, point_id=str(point_id), k=k
        )
        r = self._call(self._labeling.InspectNeighbours, request)
        a = r.agreement
        return Inspection(
            point=_inspected(r.point),
            neighbours=[Neighbour(_inspected(n.point), n.similarity) for n in r.neighbours],
            agreement=Agreement(
                label=a.label or None,
                weighted=a.weighted,
                unweighted=a.unweighted,
                labelled_neighbours=a.labelled_neighbours,
                majority_label=a.majority_label or None,
                majority_share=a.majority_share,
            ),
        )

    def run_labeling_job(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        collection: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[labeling_pb2.LabelingEvent]:
        """Run a labeling job on the server, yielding its progress events; the last one (stage "done") has ``run``.

        ``config`` holds :class:`labeling.config.LabelingConfig` fields by name. ``timeout`` bounds the whole
        job (default: none - a job can take minutes).
        """
        request = labeling_pb2.RunLabelingJobRequest(collection=collection or self.collection)
        if config:
            _struct(dict(config), request.config)
        try:
            self._require_open()
            yield from self._labeling.RunLabelingJob(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _translate(exc, self.max_bytes) from None

    def review_queue(self, *, limit: int = 100, collection: str | None = None) -> list[labeling_pb2.ReviewItem]:
        """The points the active run sent to review, most uncertain first."""
        request = labeling_pb2.ListReviewQueueRequest(collection=collection or self.collection, limit=limit)
        return list(self._call(self._labeling.ListReviewQueue, request).items)

    def submit_labels(
        self,
        answers: Mapping[str, str] | Sequence[tuple[str, str]],
        *,
        source: str = "human",
        overwrite_human: bool = False,
        collection: str | None = None,
    ) -> tuple[int, int]:
        """Write human answers as ground truth; returns (written, unchanged). All-or-nothing."""
        pairs = list(answers.items()) if isinstance(answers, Mapping) else list(answers)
        request = labeling_pb2.SubmitLabelsRequest(
            collection=collection or self.collection, source=source, overwrite_human=overwrite_human
        )
        for pid, label in pairs:
            request.answers.add(id=str(pid), label=str(label))
        r = self._call(self._labeling.SubmitLabels, request)
        return int(r.written), int(r.unchanged)

    def clear_labels(
        self, ids: Sequence[str], *, any_source: bool = False, collection: str | None = None
    ) -> tuple[int, int]:
        """Take ground-truth labels back (answers given through embedstore unless ``any_source``);
        returns (cleared, unchanged)."""
        request = labeling_pb2.ClearLabelsRequest(
            collection=collection or self.collection, ids=[str(i) for i in ids], any_source=any_source
        )
        r = self._call(self._labeling.ClearLabels, request)
        return int(r.cleared), int(r.unchanged)
