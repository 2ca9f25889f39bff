"""The scale-out adapter: a Qdrant server or cluster through ``qdrant-client``.

``QdrantServerStore(url=...)`` talks to a server (gRPC preferred);
``QdrantServerStore(location=":memory:")`` runs qdrant-client's local mode, a
pure-Python brute force that speaks the same API. Local mode is for tests and
development only: it ignores HNSW settings and payload indexes, and warns above
20,000 points. It is never the product default (that is :class:`EdgeStore`).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from retrieval.base import (
    QueryPlan,
    VectorStore,
    group_by_payload,
    has_id_point_ids,
    hit_from,
    payload_kind_name,
    record_from,
    vector_names,
)
from retrieval.config import safe_url
from retrieval.errors import (
    CollectionNotFoundError,
    InvalidFilterError,
    InvalidInputError,
    SchemaMismatchError,
    StoreError,
    StoreUnavailableError,
)
from retrieval.filters import Filter, HasId, IsEmpty, Match, MatchAny, Range
from retrieval.schema import (
    EXTERNAL_ID_KEY,
    FULL_DIM,
    FULL_VECTOR,
    INT8_QUANTILE,
    PREFIX_DIM,
    PREFIX_VECTOR,
    SCHEMA_VERSION,
    CollectionSpec,
)
from retrieval.types import CollectionInfo, Hit, Record, ScrollPage, WithVectors

_KINDS = {
    "keyword": qm.PayloadSchemaType.KEYWORD,
    "integer": qm.PayloadSchemaType.INTEGER,
    "float": qm.PayloadSchemaType.FLOAT,
    "bool": qm.PayloadSchemaType.BOOL,
}
_META_KEY = "embedstore"
_USER_KEY = "embedstore_user"
# The shortlist is taken on the int8 copy, not rescored on the float mrl128 originals: the full512 rerank
# is the rescore. Ignored by collections without quantization.
_SHORTLIST_PARAMS = qm.SearchParams(quantization=qm.QuantizationSearchParams(rescore=False))

try:  # grpc is a dependency of qdrant-client; keep the import soft all the same
    import grpc

    _RPC_ERROR: tuple[type[BaseException], ...] = (grpc.RpcError,)
except ImportError:  # pragma: no cover
    grpc = None  # type: ignore[assignment]
    _RPC_ERROR = ()


class QdrantServerStore(VectorStore):
    """Store on a Qdrant server/cluster (or qdrant-client's local mode for tests)."""

    backend = "server"

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        location: str | None = None,
        prefer_grpc: bool = True,
        grpc_port: int = 6334,
        timeout: int = 60,
        client: QdrantClient | None = None,
        shortlist: int = 100,
        write_batch_size: int = 256,
        read_consistency: qm.ReadConsistency | None = None,
        write_ordering: qm.WriteOrdering | None = None,
    ) -> None:
        super().__init__(shortlist=shortlist, write_batch_size=write_batch_size)
        given = [x for x in (url, location, client) if x is not None]
        if len(given) != 1:
            raise InvalidInputError("QdrantServerStore needs exactly one of url=, location= or client=")
        if client is None:
            try:
                client = QdrantClient(
                    url=url,
                    location=location,
                    api_key=api_key,
                    prefer_grpc=prefer_grpc,
                    grpc_port=grpc_port,
                    timeout=timeout,
                )
            except Exception as exc:  # bad URL, unreachable at connect time, ...
                shown = safe_url(url) if url else location
                detail = str(exc).replace(url, shown) if url else str(exc)
                raise StoreUnavailableError(f"cannot connect to Qdrant at {shown}: {detail}") from None
        self.client = client
        # with gRPC preferred, qdrant-client dials grpc_port whatever port the URL names: say which one. The URL
        # without its password: the target goes into every error message and log line
        shown = safe_url(url) if url else None
        self.target = f"{shown} (gRPC port {grpc_port})" if shown and prefer_grpc else shown or location or "client"
        self.local = self.client._client.__class__.__name__ == "QdrantLocal"
        self._local_lock = threading.RLock()
        # a server answers several scroll streams at once (a cluster spreads them over its shards' nodes);
        # local mode is serialised, so more partitions would only add round trips
        self.read_parallelism = 1 if self.local else 4
        self.read_consistency = read_consistency
        self.write_ordering = write_ordering
        self._known: set[str] = set()
        # Local mode keeps no payload schema; remember what was indexed so facets
        # refuse the same keys as on a server.
        self._local_indexes: dict[str, dict[str, str]] = {}  # local mode keeps no payload schema: name -> kind

    def __repr__(self) -> str:
        return f"QdrantServerStore({self.target!r})"

    @contextlib.contextmanager
    def _call(self, what: str, name: str | None = None) -> Iterator[None]:
        """Translate qdrant-client / transport errors; silence local mode's known warnings."""
        try:
            # qdrant-client's local mode is not thread-safe (concurrent upserts paired vectors with the wrong ids
            # in the migrate test); a real server is, so only local mode is serialised
            with self._local_lock if self.local else contextlib.nullcontext(), warnings.catch_warnings():
                if self.local:
                    warnings.filterwarnings("ignore", message=".*(Local mode|local Qdrant|Payload indexes).*")
                yield
        except StoreError:
            raise
        except UnexpectedResponse as exc:
            if exc.status_code == 404 and name is not None:
                self._known.discard(name)
                raise CollectionNotFoundError(name) from exc
            raise StoreError(f"{what}: Qdrant answered {exc.status_code}: {exc.content!r}") from exc
        except ValueError as exc:
            if name is not None and "not found" in str(exc).lower() and name in str(exc):
                self._known.discard(name)
                raise CollectionNotFoundError(name) from exc
            raise StoreError(f"{what}: {exc}") from exc
        except (ResponseHandlingException, ConnectionError, TimeoutError) as exc:
            raise StoreUnavailableError(f"{what}: Qdrant at {self.target} unreachable: {exc}") from exc
        except _RPC_ERROR as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if grpc is not None and code == grpc.StatusCode.NOT_FOUND and name is not None:
                self._known.discard(name)
                raise CollectionNotFoundError(name) from exc
            # the status's details, not the exception's multi-line repr with grpc's debug string
            detail = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            if grpc is not None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise StoreUnavailableError(f"{what}: Qdrant at {self.target} unreachable: {detail}") from exc
            raise StoreError(f"{what}: Qdrant gRPC error {code}: {detail}") from exc

    # ------------------------------------------------------------- collections
    def _collection_exists(self, name: str) -> bool:
        if name in self._known:
            return True
        with self._call(f"checking collection {name!r}"):
            exists = self.client.collection_exists(name)
        if exists:
            self._known.add(name)
        return exists

    def _list_collections(self) -> list[str]:
        with self._call("listing collections"):
            return [c.name for c in self.client.get_collections().collections]

    @staticmethod
    def create_request(spec: CollectionSpec) -> qm.CreateCollection:
        """The collection this adapter asks Qdrant for under ``spec``, as qdrant-client's own request model
        (named vectors, shards, replicas): what a server or cluster receives."""
        quantized = spec.int8_prefix
        return qm.CreateCollection(
            vectors={
                PREFIX_VECTOR: qm.VectorParams(
                    size=PREFIX_DIM,
                    distance=qm.Distance.COSINE,
                    hnsw_config=qm.HnswConfigDiff(m=spec.hnsw_m, ef_construct=spec.hnsw_ef_construct),
                    # int8: the quantized copy in RAM, the float originals on disk (see CollectionSpec)
                    quantization_config=qm.ScalarQuantization(
                        scalar=qm.ScalarQuantizationConfig(
                            type=qm.ScalarType.INT8, quantile=INT8_QUANTILE, always_ram=True
                        )
                    )
                    if quantized
                    else None,
                    on_disk=quantized,
                ),
                # m=0: no HNSW graph for the rerank-only vector.
                FULL_VECTOR: qm.VectorParams(
                    size=FULL_DIM,
                    distance=qm.Distance.COSINE,
                    hnsw_config=qm.HnswConfigDiff(m=0),
                    on_disk=spec.full_on_disk,
                ),
            },
            shard_number=spec.shard_number,
            replication_factor=spec.replication_factor,
            metadata={_META_KEY: {"spec": spec.__dict__, "layout": spec.layout()}},
        )

    def _create_collection(self, name: str, spec: CollectionSpec) -> None:
        req = self.create_request(spec)
        with self._call(f"creating collection {name!r}", name):
            self.client.create_collection(
                name,
                vectors_config=req.vectors,
                shard_number=req.shard_number,
                replication_factor=req.replication_factor,
                metadata=req.metadata,
            )
        self._known.add(name)
        self._local_indexes[name] = {}

    def _collection_layout(self, name: str) -> dict[str, Any]:
        with self._call(f"reading collection {name!r}", name):
            info = self.client.get_collection(name)
        meta = (info.config.metadata or {}).get(_META_KEY)
        if meta and "layout" in meta:
            return meta["layout"]
        vectors = info.config.params.vectors
        if not isinstance(vectors, dict):
            raise SchemaMismatchError(
                f"collection {name!r} has a single unnamed vector, not {PREFIX_VECTOR}/{FULL_VECTOR}"
            )
        distances = {str(v.distance.value).lower() for v in vectors.values()}
        return {
            "schema_version": SCHEMA_VERSION if meta is None else meta.get("schema_version"),
            "vectors": {k: v.size for k, v in vectors.items()},
            "distance": distances.pop() if len(distances) == 1 else sorted(distances),
        }

    def _drop_collection(self, name: str) -> None:
        with self._call(f"dropping collection {name!r}", name):
            self.client.delete_collection(name)
        self._known.discard(name)
        self._local_indexes.pop(name, None)

    def _collection_info(self, name: str) -> CollectionInfo:
        with self._call(f"reading collection {name!r}", name):
            info = self.client.get_collection(name)
            points = self.client.count(name, exact=True).count
        meta = (info.config.metadata or {}).get(_META_KEY) or {}
        params = info.config.params
        stored = CollectionSpec.from_stored(meta["spec"]).__dict__ if "spec" in meta else {}
        kinds = self._payload_index_kinds(name)
        return CollectionInfo(
            name=name,
            backend=self.backend,
            points_count=points,
            indexed_vectors_count=int(info.indexed_vectors_count or 0),
            spec={
                **stored,
                # the server's word; qdrant-client's local mode has no shards and reports None: then what was asked
                "shard_number": params.shard_number or stored.get("shard_number"),
                "replication_factor": params.replication_factor or stored.get("replication_factor"),
                "status": str(info.status.value) if info.status else None,
            },
            payload_indexes=tuple(sorted(kinds)),
            payload_index_kinds=dict(sorted(kinds.items())),
        )

    def _get_metadata(self, name: str) -> dict[str, Any]:
        with self._call(f"reading collection {name!r}", name):
            info = self.client.get_collection(name)
        return dict((info.config.metadata or {}).get(_USER_KEY) or {})

    def _set_metadata(self, name: str, metadata: dict[str, Any]) -> None:
        with self._call(f"updating metadata of {name!r}", name):
            self.client.update_collection(name, metadata={_USER_KEY: metadata})

    def _create_payload_index(self, name: str, key: str, kind: str) -> None:
        with self._call(f"indexing {key!r} in {name!r}", name):
            self.client.create_payload_index(name, key, field_schema=_KINDS[kind], wait=True)
        if self.local:
            self._local_indexes.setdefault(name, {})[key] = kind

    def _payload_index_kinds(self, name: str) -> dict[str, str]:
        if self.local:
            return dict(self._local_indexes.get(name, {}))
        with self._call(f"reading collection {name!r}", name):
            schema = self.client.get_collection(name).payload_schema
        return {k: payload_kind_name(_KINDS, v.data_type) for k, v in schema.items()}

    # ------------------------------------------------------------------ writes
    def _upsert_request(
        self, name: str, pids: list[str], full: np.ndarray, prefix: np.ndarray, payloads: list[dict[str, Any]]
    ) -> Any:
        return qm.Batch(
            ids=pids, vectors={PREFIX_VECTOR: prefix.tolist(), FULL_VECTOR: full.tolist()}, payloads=payloads
        )

    def _write_upsert(self, name: str, request: Any, n_points: int) -> None:
        with self._call(f"upsert into {name!r}", name):
            self.client.upsert(name, points=request, wait=True, ordering=self.write_ordering)

    def _existing_ids(self, name: str, pids: list[str]) -> set[str]:
        with self._call(f"retrieve from {name!r}", name):
            records = self.client.retrieve(
                name, pids, with_payload=False, with_vectors=False, consistency=self.read_consistency
            )
        return {str(r.id) for r in records}

    def _set_payloads(self, name: str, updates: list[tuple[str, dict[str, Any]]]) -> None:
        ops = [
            qm.SetPayloadOperation(set_payload=qm.SetPayload(payload=body, points=pids))
            for body, pids in group_by_payload(updates)
        ]
        with self._call(f"set_payload in {name!r}", name):
            self.client.batch_update_points(name, ops, wait=True, ordering=self.write_ordering)

    def _delete_payload_keys(self, name: str, pids: list[str], keys: list[str]) -> None:
        with self._call(f"delete_payload in {name!r}", name):
            self.client.delete_payload(name, keys=keys, points=pids, wait=True, ordering=self.write_ordering)

    def _delete(self, name: str, pids: list[str]) -> None:
        with self._call(f"delete from {name!r}", name):
            self.client.delete(
                name, points_selector=qm.PointIdsList(points=pids), wait=True, ordering=self.write_ordering
            )

    # ------------------------------------------------------------------- reads
    def _query(self, name: str, full: np.ndarray, prefix: np.ndarray, plan: QueryPlan) -> list[list[Hit]]:
        flt = _to_qdrant_filter(plan.filter) if plan.filter is not None else None
        payload_sel: Any = True if plan.with_payload else qm.PayloadSelectorInclude(include=[EXTERNAL_ID_KEY])
        vec_sel: Any = vector_names(plan.with_vectors) or False
        requests = []
        for i in range(full.shape[0]):
            if plan.exact:
                requests.append(
                    qm.QueryRequest(
                        query=full[i].tolist(),
                        using=FULL_VECTOR,
                        params=qm.SearchParams(exact=True),
                        limit=plan.top_k,
                        filter=flt,
                        with_payload=payload_sel,
                        with_vector=vec_sel,
                        score_threshold=plan.score_threshold,
                    )
                )
            else:
                requests.append(
                    qm.QueryRequest(
                        prefetch=[
                            qm.Prefetch(
                                query=prefix[i].tolist(),
                                using=PREFIX_VECTOR,
                                limit=plan.shortlist,
                                filter=flt,
                                params=_SHORTLIST_PARAMS,
                            )
                        ],
                        query=full[i].tolist(),
                        using=FULL_VECTOR,
                        limit=plan.top_k,
                        filter=flt,
                        with_payload=payload_sel,
                        with_vector=vec_sel,
                        score_threshold=plan.score_threshold,
                    )
                )
        with self._call(f"query on {name!r}", name):
            responses = self.client.query_batch_points(name, requests=requests, consistency=self.read_consistency)
        return [[hit_from(p, plan.with_payload, plan.with_vectors) for p in r.points] for r in responses]

    def _retrieve(self, name: str, pids: list[str], with_payload: bool, with_vectors: WithVectors) -> list[Record]:
        with self._call(f"retrieve from {name!r}", name):
            records = self.client.retrieve(
                name,
                pids,
                with_payload=True if with_payload else qm.PayloadSelectorInclude(include=[EXTERNAL_ID_KEY]),
                with_vectors=vector_names(with_vectors) or False,
                consistency=self.read_consistency,
            )
        return [record_from(r, with_payload, with_vectors) for r in records]

    def _scroll(
        self,
        name: str,
        filter: Filter | None,
        limit: int,
        offset: str | None,
        with_payload: bool,
        with_vectors: WithVectors,
    ) -> ScrollPage:
        with self._call(f"scroll on {name!r}", name):
            records, nxt = self.client.scroll(
                name,
                scroll_filter=_to_qdrant_filter(filter) if filter is not None else None,
                limit=limit,
                offset=offset,
                with_payload=True if with_payload else qm.PayloadSelectorInclude(include=[EXTERNAL_ID_KEY]),
                with_vectors=vector_names(with_vectors) or False,
                consistency=self.read_consistency,
            )
        return ScrollPage(
            [record_from(r, with_payload, with_vectors) for r in records], None if nxt is None else str(nxt)
        )

    def _count(self, name: str, filter: Filter | None) -> int:
        with self._call(f"count on {name!r}", name):
            return self.client.count(
                name, count_filter=_to_qdrant_filter(filter) if filter is not None else None, exact=True
            ).count

    def _facet(self, name: str, key: str, filter: Filter | None, limit: int) -> dict[Any, int]:
        with self._call(f"facet on {name!r}", name):
            response = self.client.facet(
                name,
                key,
                facet_filter=_to_qdrant_filter(filter) if filter is not None else None,
                limit=limit,
                exact=True,
                consistency=self.read_consistency,
            )
        return [(hit.value, hit.count) for hit in response.hits]

    # --------------------------------------------------------------- lifecycle
    def _flush(self) -> None:
        """Writes use wait=True, so every acknowledged write is already applied."""

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def _to_qdrant_filter(flt: Filter) -> qm.Filter:
    def conv(cond: Any) -> Any:
        if isinstance(cond, Filter):
            return _to_qdrant_filter(cond)
        if isinstance(cond, Match):
            return qm.FieldCondition(key=cond.key, match=qm.MatchValue(value=cond.value))
        if isinstance(cond, MatchAny):
            return qm.FieldCondition(key=cond.key, match=qm.MatchAny(any=list(cond.values)))
        if isinstance(cond, Range):
            return qm.FieldCondition(key=cond.key, range=qm.Range(gt=cond.gt, gte=cond.gte, lt=cond.lt, lte=cond.lte))
        if isinstance(cond, IsEmpty):
            return qm.IsEmptyCondition(is_empty=qm.PayloadField(key=cond.key))
        if isinstance(cond, HasId):
            return qm.HasIdCondition(has_id=has_id_point_ids(cond))
        raise InvalidFilterError(f"unsupported filter condition {cond!r}")

    return qm.Filter(
        must=[conv(c) for c in flt.must] or None,
        should=[conv(c) for c in flt.should] or None,
        must_not=[conv(c) for c in flt.must_not] or None,
    )
