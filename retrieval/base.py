"""The store contract: one typed facade, validated once, over two adapters.

:class:`VectorStore` holds every public method and every input check; an
adapter (``EdgeStore``, ``QdrantServerStore``) only implements the ``_``-prefixed
primitives, which receive input that is already valid. So both adapters refuse
the same inputs with the same errors, and a whole batch is checked before
anything is written.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import json
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    EmptyBatchError,
    InvalidInputError,
    InvalidPayloadError,
    PointNotFoundError,
    SchemaMismatchError,
    StoreUnavailableError,
)
from retrieval.filters import QUOTE_HINT, Filter, FilterLike, HasId, as_filter, is_key_path
from retrieval.schema import (
    EXTERNAL_ID_KEY,
    FULL_VECTOR,
    INDEXED_KEYWORD_FIELDS,
    PREFIX_VECTOR,
    CollectionSpec,
    ExternalId,
    check_collection_name,
    check_ids,
    check_payload,
    check_vectors,
    normalise,
    point_id,
    prepare_payloads,
    prepare_vectors,
)
from retrieval.types import CollectionInfo, Hit, Record, ScrollPage, WithVectors

MAX_TOP_K = 10_000


@dataclass(frozen=True, slots=True)
class QueryPlan:
    """A validated search request, as the adapters receive it."""

    top_k: int
    shortlist: int
    filter: Filter | None
    with_payload: bool
    with_vectors: WithVectors
    exact: bool
    score_threshold: float | None


PAYLOAD_INDEX_KINDS = ("keyword", "integer", "float", "bool")
#: the index kinds a facet counts, and the type of the values it counts for each
_FACET_TYPES: dict[str, type] = {"keyword": str, "integer": int, "bool": bool}


def payload_kind_name(engine_kinds: Mapping[str, Any], data_type: Any) -> str:
    """The name (one of PAYLOAD_INDEX_KINDS) of an engine's payload index type; "other" for one we never make."""
    return next((name for name, t in engine_kinds.items() if t == data_type), "other")


class VectorStore(abc.ABC):
    """A collection store with a 128D-prefix shortlist and a 512D rerank.

    Use it as a context manager, or call :meth:`close` (which flushes).
    """

    backend: str = "abstract"
    #: How many scroll partitions a bulk reader should use by default: 1 in-process (Edge: the work is
    #: already local), more on a server, where each partition is a separate stream of network round trips.
    read_parallelism: int = 1

    def __init__(self, *, shortlist: int = 100, write_batch_size: int = 512) -> None:
        if not isinstance(shortlist, int) or shortlist < 1:
            raise InvalidInputError(f"shortlist must be a positive int, got {shortlist!r}")
        if not isinstance(write_batch_size, int) or write_batch_size < 1:
            raise InvalidInputError(f"write_batch_size must be a positive int, got {write_batch_size!r}")
        self.shortlist = shortlist
        self.write_batch_size = write_batch_size
        self._closed = False
        self._state_lock = threading.RLock()
        # Held by the writes that check which points exist and then write them (set_payload, delete_payload_keys,
        # delete): a delete between the check and the write made the engine refuse the write half-done (a
        # labeling job's write-back died on a point a client deleted meanwhile). See :meth:`exclusive`.
        self._mutating = threading.RLock()
        self._bulk_depth = 0
        self._bulk_written: set[str] = set()

    @contextlib.contextmanager
    def bulk_write(self) -> Iterator[VectorStore]:
        """Defer the adapter's after-write housekeeping (Edge: the threshold optimize) to the end of a bulk
        write: a write-back of every point would otherwise optimize midway and again at the end. The deferral
        is store-wide: other threads' writes in the window are caught by the same check at its end."""
        with self._state_lock:
            self._bulk_depth += 1
        try:
            yield self
        finally:
            with self._state_lock:
                self._bulk_depth -= 1
                due = sorted(self._bulk_written) if self._bulk_depth == 0 else []
                if self._bulk_depth == 0:
                    self._bulk_written.clear()
            for name in due:
                if not self._closed and self._collection_exists(name):
                    self._after_write(name, 0)

    def _wrote(self, collection: str, n_written: int) -> None:
        with self._state_lock:
            if self._bulk_depth:
                self._bulk_written.add(collection)
                return
        self._after_write(collection, n_written)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush and release the store. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            try:
                self._close()
            finally:
                self._closed = True

    def flush(self) -> None:
        """Make every acknowledged write durable (and, on Edge, indexed)."""
        self._check_open()
        self._flush()

    def optimize(self, collection: str) -> None:
        """Build pending indexes now (Edge); a no-op where the server does it in the background."""
        self._require(collection)
        self._optimize(collection)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailableError(f"this {self.backend} store is closed")

    def _require(self, collection: str) -> str:
        self._check_open()
        check_collection_name(collection)
        if not self._collection_exists(collection):
            raise CollectionNotFoundError(collection)
        return collection

    # ---------------------------------------------------------------- collections
    def create_collection(self, name: str, spec: CollectionSpec | None = None, *, exist_ok: bool = False) -> bool:
        """Create ``name`` with the embedstore schema. Returns True if it was created.

        With ``exist_ok`` an existing collection is accepted after checking that
        its layout (vector names, sizes, distance, schema version) matches.
        """
        self._check_open()
        check_collection_name(name)
        spec = spec or CollectionSpec()
        with self._state_lock:
            if self._collection_exists(name):
                if not exist_ok:
                    raise CollectionExistsError(name)
                found = self._collection_layout(name)
                if found != spec.layout():
                    raise SchemaMismatchError(
                        f"collection {name!r} has layout {found}, this version of embedstore writes "
                        f"{spec.layout()}; migrate it or use another collection name"
                    )
                return False
            self._create_collection(name, spec)
            for key in INDEXED_KEYWORD_FIELDS:
                self._create_payload_index(name, key, "keyword")
            return True

    def ensure_collection(self, name: str, spec: CollectionSpec | None = None) -> bool:
        """Create ``name`` unless it exists with a matching layout. Returns True if created."""
        return self.create_collection(name, spec, exist_ok=True)

    def collection_exists(self, name: str) -> bool:
        self._check_open()
        check_collection_name(name)
        return self._collection_exists(name)

    def list_collections(self) -> list[str]:
        self._check_open()
        return sorted(self._list_collections())

    def drop_collection(self, name: str, *, missing_ok: bool = False) -> None:
        self._check_open()
        check_collection_name(name)
        with self._state_lock:
            if not self._collection_exists(name):
                if missing_ok:
                    return
                raise CollectionNotFoundError(name)
            self._drop_collection(name)

    def collection_info(self, name: str) -> CollectionInfo:
        return self._collection_info(self._require(name))

    def collection_metadata(self, name: str) -> dict[str, Any]:
        """The caller's key-value metadata of a collection (e.g. its embedding version)."""
        return dict(self._get_metadata(self._require(name)))

    def update_collection_metadata(self, name: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``values`` into the collection's metadata (a None value removes the key); returns the result."""
        self._require(name)
        if not isinstance(values, Mapping) or not values:
            raise InvalidInputError("metadata update must be a non-empty dict")
        body = check_payload(values)  # same rules as a payload: JSON values, string keys
        with self._state_lock:
            merged = dict(self._get_metadata(name))
            for key, value in body.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            self._set_metadata(name, merged)
        return merged

    def create_payload_index(self, collection: str, key: str, kind: str = "keyword") -> None:
        """Index another payload field (needed to facet on it)."""
        self._require(collection)
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"payload index key must be a non-empty string, got {key!r}")
        if not is_key_path(key):
            raise InvalidInputError(f"payload index key {key!r} is not a payload path: {QUOTE_HINT}")
        if kind not in PAYLOAD_INDEX_KINDS:
            raise InvalidInputError(f"payload index kind must be one of {PAYLOAD_INDEX_KINDS}, got {kind!r}")
        if key in INDEXED_KEYWORD_FIELDS and kind != "keyword":
            # an integer index on `label` left Edge's facet empty while qdrant-client's still counted the strings
            raise InvalidInputError(f"{key!r} is one of the store's keyword fields: its index stays 'keyword'")
        self._create_payload_index(collection, key, kind)

    # --------------------------------------------------------------------- writes
    def upsert(
        self,
        collection: str,
        ids: Sequence[ExternalId],
        vectors: Any,
        payloads: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> int:
        """Insert or replace points; returns how many were written.

        ``vectors`` is (n, 512), any real dtype; it is L2-normalised and its
        128D prefix renormalised into ``mrl128``. The whole batch is validated
        first, so a bad item means nothing is written. A payload replaces the
        point's whole payload (use :meth:`set_payload` to merge fields).
        """
        self._require(collection)
        ext = check_ids(ids)
        checked = check_vectors(vectors, ext)
        if checked.shape[0] != len(ext):
            raise InvalidInputError(f"got {len(ext)} ids but {checked.shape[0]} vectors")
        bodies = prepare_payloads(payloads, ext)
        pids = [point_id(e) for e in ext]
        # before the first batch: a refusal writes nothing
        self._check_room(collection, len(pids), payload_bytes_estimate(bodies))
        step = self.write_batch_size
        starts = range(0, len(pids), step)

        def request(start: int) -> Any:
            full, prefix = normalise(checked[start : start + step])  # per batch: memory stays O(batch)
            return self._upsert_request(
                collection, pids[start : start + step], full, prefix, bodies[start : start + step]
            )

        def write(start: int, req: Any) -> None:
            try:
                self._write_upsert(collection, req, min(step, len(pids) - start))
            except StoreUnavailableError as exc:
                raise StoreUnavailableError(
                    f"{exc}; {start} of {len(pids)} points were written before the failure "
                    "(upsert is idempotent: retrying the whole batch is safe)"
                ) from exc

        if len(starts) == 1:
            write(0, request(0))
        else:
            # Pipelined: the next batch's request is built in Python while the engine writes this one
            # (qdrant-edge releases the GIL for part of its write: ingest 8% faster at 200k points,
            # 9.4 vs 10.2 s side by side). One write in flight, in order, so a failure still means
            # "the batches before it were written".
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedstore-upsert") as pool:
                in_flight: concurrent.futures.Future[None] | None = None
                for start in starts:
                    req = request(start)
                    if in_flight is not None:
                        in_flight.result()
                    in_flight = pool.submit(write, start, req)
                assert in_flight is not None
                in_flight.result()
        self._wrote(collection, len(pids))
        return len(pids)

    def set_payload(
        self,
        collection: str,
        updates: Mapping[str, Mapping[str, Any]]
        | Mapping[int, Mapping[str, Any]]
        | Iterable[tuple[ExternalId, Mapping[str, Any]]],
        *,
        missing_ok: bool = False,
    ) -> int:
        """Merge a different payload into each point: ``{id: {field: value}}``.

        Fields not named are kept. Every id must exist (unless ``missing_ok``, in
        which case unknown ids are skipped) and every payload must be valid;
        otherwise nothing is written. Returns the number of points updated.
        """
        self._require(collection)
        pairs = list(updates.items()) if isinstance(updates, Mapping) else list(updates)
        if not pairs:
            raise EmptyBatchError("empty set_payload: no updates given")
        ext = check_ids([p[0] for p in pairs], what="set_payload batch")
        bodies = []
        for i, (e, (_, body)) in enumerate(zip(ext, pairs, strict=True)):
            clean = check_payload(body, index=i, item_id=e)
            if not clean:
                raise InvalidPayloadError("empty payload update", index=i, item_id=e)
            if EXTERNAL_ID_KEY in clean and str(clean[EXTERNAL_ID_KEY]) != e:
                raise InvalidPayloadError(
                    f"payload key {EXTERNAL_ID_KEY!r} is reserved and cannot be changed", index=i, item_id=e
                )
            bodies.append(clean)
        pids = [point_id(e) for e in ext]
        with self._mutating:
            present = self._existing(collection, pids, ext, missing_ok)
            todo = [(pid, body) for pid, body in zip(pids, bodies, strict=True) if pid in present]
            self._check_room(collection, len(todo), payload_bytes_estimate([b for _, b in todo]), op="set_payload")
            for batch in self._batches(todo):
                self._set_payloads(collection, batch)
        self._wrote(collection, len(todo))
        return len(todo)

    def delete_payload_keys(
        self, collection: str, ids: Sequence[ExternalId], keys: Sequence[str], *, missing_ok: bool = False
    ) -> int:
        """Remove payload ``keys`` from the points ``ids``. Returns points touched."""
        self._require(collection)
        ext = check_ids(ids)
        keys = list(keys)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise InvalidInputError(f"keys must be a non-empty list of field names, got {keys!r}")
        if EXTERNAL_ID_KEY in keys:
            raise InvalidPayloadError(f"payload key {EXTERNAL_ID_KEY!r} is reserved and cannot be deleted")
        if bad := [k for k in keys if not is_key_path(k)]:
            raise InvalidInputError(f"keys {bad} are not payload paths: {QUOTE_HINT}")
        pids = [point_id(e) for e in ext]
        with self._mutating:
            present = self._existing(collection, pids, ext, missing_ok)
            todo = [p for p in pids if p in present]
            self._check_room(collection, len(todo), op="delete_payload")
            for batch in self._batches(todo):
                self._delete_payload_keys(collection, batch, keys)
        self._wrote(collection, len(todo))
        return len(todo)

    def delete(self, collection: str, ids: Sequence[ExternalId], *, missing_ok: bool = False) -> int:
        """Delete points by external id. Returns how many were deleted."""
        self._require(collection)
        ext = check_ids(ids)
        pids = [point_id(e) for e in ext]
        with self._mutating:
            present = self._existing(collection, pids, ext, missing_ok)
            todo = [p for p in pids if p in present]
            self._check_room(collection, len(todo), op="delete")
            for batch in self._batches(todo):
                self._delete(collection, batch)
        self._wrote(collection, 0)
        return len(todo)

    def _batches(self, items: list[Any]) -> Iterator[list[Any]]:
        """``items`` in slices of ``write_batch_size``, the size of one engine write."""
        step = self.write_batch_size
        for start in range(0, len(items), step):
            yield items[start : start + step]

    def check_room(self, collection: str, n_points: int, payload_bytes: int = 0, *, op: str = "set_payload") -> None:
        """Raise :class:`StoreFullError` now if ``op`` (upsert, set_payload, delete_payload, delete) on
        ``n_points`` points with about ``payload_bytes`` of new payload would not fit: for a caller about to make
        several writes as one answer, so that a refusal comes before the first (each write checks again)."""
        self._require(collection)
        if op not in ("upsert", "set_payload", "delete_payload", "delete"):
            raise InvalidInputError(f"op must be upsert, set_payload, delete_payload or delete, got {op!r}")
        self._check_room(collection, n_points, payload_bytes, op=op)

    def exclusive(self) -> contextlib.AbstractContextManager[Any]:
        """Hold off this store object's other check-then-write calls (set_payload, delete_payload_keys, delete)
        while the caller reads, decides and writes: e.g. read the points, skip those a person has labelled
        since, write the rest, with no label or delete landing in between. Re-entrant; other processes (a
        Qdrant server's other clients) are not held off."""
        return self._mutating

    def _existing(self, collection: str, pids: list[str], ext: list[str], missing_ok: bool) -> set[str]:
        present: set[str] = set()
        step = 4096
        for start in range(0, len(pids), step):
            present.update(self._existing_ids(collection, pids[start : start + step]))
        if not missing_ok and len(present) < len(pids):
            missing = [e for e, p in zip(ext, pids, strict=True) if p not in present]
            raise PointNotFoundError(collection, missing)
        return present

    # ---------------------------------------------------------------------- reads
    def search(
        self,
        collection: str,
        vector: Any,
        *,
        top_k: int = 10,
        shortlist: int | None = None,
        filter: FilterLike = None,
        with_payload: bool = True,
        with_vectors: WithVectors = False,
        exact: bool = False,
        score_threshold: float | None = None,
    ) -> list[Hit]:
        """Top-k neighbours of one 512D vector.

        Default path: shortlist ``shortlist`` candidates on the HNSW-indexed
        ``mrl128`` prefix, rerank them on ``full512`` (one Qdrant prefetch query).
        ``exact=True`` scores every point on ``full512`` instead: the ground truth.

        Hits come best first; hits of equal score in point-id order (the engines' own order among
        ties differed between adapters and between Edge's two paths). When more points tie than
        ``top_k`` leaves room for, which of them are returned is the engine's choice (it cuts
        before the order is made). ``score_threshold`` is exclusive, as in Qdrant: a hit scoring
        exactly the threshold is left out.
        """
        vec = np.asarray(vector)
        if vec.ndim != 1:
            raise InvalidInputError(f"search takes one vector of shape (512,), got shape {vec.shape}; use search_batch")
        return self.search_batch(
            collection,
            vec[None, :],
            top_k=top_k,
            shortlist=shortlist,
            filter=filter,
            with_payload=with_payload,
            with_vectors=with_vectors,
            exact=exact,
            score_threshold=score_threshold,
        )[0]

    def search_batch(
        self,
        collection: str,
        vectors: Any,
        *,
        top_k: int = 10,
        shortlist: int | None = None,
        filter: FilterLike = None,
        with_payload: bool = True,
        with_vectors: WithVectors = False,
        exact: bool = False,
        score_threshold: float | None = None,
    ) -> list[list[Hit]]:
        """:meth:`search` for many query vectors in one planned batch (same order out)."""
        self._require(collection)
        top_k, shortlist = _plain_int(top_k), _plain_int(shortlist)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise InvalidInputError(f"top_k must be an int in 1..{MAX_TOP_K}, got {top_k!r}")
        if shortlist is None:
            shortlist = max(self.shortlist, top_k)
        elif isinstance(shortlist, bool) or not isinstance(shortlist, int) or shortlist < top_k:
            raise InvalidInputError(f"shortlist must be an int >= top_k ({top_k}), got {shortlist!r}")
        if score_threshold is not None:
            number = isinstance(score_threshold, (int, float, np.number))
            if isinstance(score_threshold, (bool, np.bool_)) or not number:
                raise InvalidInputError(f"score_threshold must be a number, got {score_threshold!r}")
            if not np.isfinite(score_threshold):
                raise InvalidInputError(f"score_threshold must be finite, got {score_threshold!r}")
            score_threshold = float(score_threshold)
        with_vectors = _check_with_vectors(with_vectors)
        with_payload = _check_with_payload(with_payload)
        full, prefix = prepare_vectors(vectors, what="query vector")
        flt = self._resolve_filter(filter)
        plan = QueryPlan(top_k, shortlist, flt, with_payload, with_vectors, exact, score_threshold)
        # ties in point-id order: a sort of already-ordered hits, ~2 us for ten
        return [
            sorted(hits, key=_best_first) if len(hits) > 1 else hits
            for hits in self._query(collection, full, prefix, plan)
        ]

    def retrieve(
        self,
        collection: str,
        ids: Sequence[ExternalId],
        *,
        with_payload: bool = True,
        with_vectors: WithVectors = False,
        missing_ok: bool = False,
    ) -> list[Record]:
        """Points by external id, in the order asked. Unknown ids raise unless ``missing_ok``."""
        self._require(collection)
        ext = check_ids(ids)
        with_vectors = _check_with_vectors(with_vectors)
        with_payload = _check_with_payload(with_payload)
        pids = [point_id(e) for e in ext]
        found = {r.point_id: r for r in self._retrieve(collection, pids, with_payload, with_vectors)}
        if not missing_ok and len(found) < len(pids):
            raise PointNotFoundError(collection, [e for e, p in zip(ext, pids, strict=True) if p not in found])
        return [found[p] for p in pids if p in found]

    def scroll(
        self,
        collection: str,
        *,
        filter: FilterLike = None,
        limit: int = 256,
        offset: str | None = None,
        with_payload: bool = True,
        with_vectors: WithVectors = False,
    ) -> ScrollPage:
        """One page of points in id order; pass ``page.next_offset`` back for the next page."""
        self._require(collection)
        limit = _plain_int(limit)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise InvalidInputError(f"limit must be an int in 1..100000, got {limit!r}")
        if offset is not None and not _is_uuid(offset):
            # Edge raised a bare ValueError, and the server adapter returned an empty page: "the end", silently
            raise InvalidInputError(f"offset must be a next_offset from a previous page (a point id), got {offset!r}")
        with_vectors = _check_with_vectors(with_vectors)
        with_payload = _check_with_payload(with_payload)
        return self._scroll(collection, self._resolve_filter(filter), limit, offset, with_payload, with_vectors)

    def iter_records(
        self,
        collection: str,
        *,
        filter: FilterLike = None,
        page_size: int = 1024,
        with_payload: bool = True,
        with_vectors: WithVectors = False,
    ) -> Iterator[Record]:
        """Every matching point, fetched page by page (memory bounded by ``page_size``)."""
        return self.iter_partition(
            collection, 0, 1, filter=filter, page_size=page_size, with_payload=with_payload, with_vectors=with_vectors
        )

    def iter_partition(
        self,
        collection: str,
        part: int,
        parts: int,
        *,
        filter: FilterLike = None,
        page_size: int = 1024,
        with_payload: bool = True,
        with_vectors: WithVectors = False,
    ) -> Iterator[Record]:
        """The points of partition ``part`` of ``parts``: a contiguous range of point ids, read by paged scroll.

        Point ids are UUIDv5 hashes, so equal ranges of the 128-bit id space hold about equal numbers of
        points, and both Qdrant engines scroll in id order from any id (it need not exist). The partitions
        are disjoint and cover the collection, so ``parts`` readers (threads, processes, machines) can each
        read one in parallel without coordination; reading them in order equals :meth:`iter_records`.
        """
        low, high = partition_bounds(part, parts)
        offset: str | None = low
        while True:
            page = self.scroll(
                collection,
                filter=filter,
                limit=page_size,
                offset=offset,
                with_payload=with_payload,
                with_vectors=with_vectors,
            )
            for rec in page.records:
                if high is not None and rec.point_id >= high:
                    return
                yield rec
            if page.next_offset is None:
                return
            offset = page.next_offset

    def count(self, collection: str, filter: FilterLike = None) -> int:
        """Exact number of points matching ``filter`` (all points without one)."""
        self._require(collection)
        return self._count(collection, self._resolve_filter(filter))

    def facet(self, collection: str, key: str, *, filter: FilterLike = None, limit: int = 1000) -> dict[Any, int]:
        """Exact counts of the values of an indexed payload field, most common first."""
        self._require(collection)
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"facet key must be a non-empty string, got {key!r}")
        kinds = self._payload_index_kinds(collection)
        if key not in kinds:
            raise InvalidInputError(
                f"cannot facet on {key!r}: it has no payload index (indexed: {sorted(kinds)}); "
                "call create_payload_index first"
            )
        kind = kinds[key]
        if kind not in _FACET_TYPES:
            raise InvalidInputError(
                f"cannot facet on {key!r}: its index is {kind!r}; facets count keyword, integer or bool values"
            )
        limit = _plain_int(limit)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidInputError(f"facet limit must be a positive int, got {limit!r}")
        # Only values of the index's own type are counted, on both adapters (the engine's rule; qdrant-client's
        # local mode counted every value), and True is never merged into 1 by the dict (True == 1 in Python).
        want = _FACET_TYPES[kind]
        counts = {
            value: n
            for value, n in self._facet(collection, key, self._resolve_filter(filter), limit)
            # n > 0: Edge's facet kept a value with count 0 once its last point lost it (a payload key deleted
            # or overwritten); qdrant-client's did not list it (found by tests/test_store_parity.py)
            if n > 0 and isinstance(value, want) and (want is bool or not isinstance(value, bool))
        }
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))))

    def _resolve_filter(self, spec: FilterLike) -> Filter | None:
        return as_filter(spec)

    # ------------------------------------------------------- adapter primitives
    # Inputs are already validated; point ids are UUID strings; vectors are
    # float32 and unit-norm.
    @abc.abstractmethod
    def _collection_exists(self, name: str) -> bool: ...

    @abc.abstractmethod
    def _list_collections(self) -> list[str]: ...

    @abc.abstractmethod
    def _create_collection(self, name: str, spec: CollectionSpec) -> None: ...

    @abc.abstractmethod
    def _collection_layout(self, name: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _drop_collection(self, name: str) -> None: ...

    @abc.abstractmethod
    def _collection_info(self, name: str) -> CollectionInfo: ...

    @abc.abstractmethod
    def _create_payload_index(self, name: str, key: str, kind: str) -> None: ...

    @abc.abstractmethod
    def _get_metadata(self, name: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _set_metadata(self, name: str, metadata: dict[str, Any]) -> None: ...

    def _payload_indexes(self, name: str) -> set[str]:
        return set(self._payload_index_kinds(name))

    @abc.abstractmethod
    def _payload_index_kinds(self, name: str) -> dict[str, str]:
        """Indexed payload field -> its kind (one of PAYLOAD_INDEX_KINDS, or "other")."""

    def _check_room(  # noqa: B027 - a hook, empty by default
        self, name: str, n_points: int, payload_bytes: int = 0, *, op: str = "upsert"
    ) -> None:
        """Raise StoreFullError when ``op`` (upsert, set_payload, delete_payload, delete) on ``n_points`` points,
        with about ``payload_bytes`` of new payload, cannot be written safely; called once per call, before its
        first batch, so a refusal writes nothing. The embedded adapter checks the disk."""

    @abc.abstractmethod
    def _upsert_request(
        self, name: str, pids: list[str], full: np.ndarray, prefix: np.ndarray, payloads: list[dict[str, Any]]
    ) -> Any:
        """One batch as the engine's write request (Python work only: no I/O, no engine call)."""

    @abc.abstractmethod
    def _write_upsert(self, name: str, request: Any, n_points: int) -> None:
        """Send a request made by :meth:`_upsert_request`."""

    @abc.abstractmethod
    def _existing_ids(self, name: str, pids: list[str]) -> set[str]: ...

    @abc.abstractmethod
    def _set_payloads(self, name: str, updates: list[tuple[str, dict[str, Any]]]) -> None: ...

    @abc.abstractmethod
    def _delete_payload_keys(self, name: str, pids: list[str], keys: list[str]) -> None: ...

    @abc.abstractmethod
    def _delete(self, name: str, pids: list[str]) -> None: ...

    @abc.abstractmethod
    def _query(self, name: str, full: np.ndarray, prefix: np.ndarray, plan: QueryPlan) -> list[list[Hit]]: ...

    @abc.abstractmethod
    def _retrieve(self, name: str, pids: list[str], with_payload: bool, with_vectors: WithVectors) -> list[Record]: ...

    @abc.abstractmethod
    def _scroll(
        self,
        name: str,
        filter: Filter | None,
        limit: int,
        offset: str | None,
        with_payload: bool,
        with_vectors: WithVectors,
    ) -> ScrollPage: ...

    @abc.abstractmethod
    def _count(self, name: str, filter: Filter | None) -> int: ...

    @abc.abstractmethod
    def _facet(self, name: str, key: str, filter: Filter | None, limit: int) -> list[tuple[Any, int]]:
        """(value, count) pairs as the engine gives them (a list: True and 1 are one key of a dict)."""

    def _after_write(self, name: str, n_written: int) -> None:  # noqa: B027 - optional hook
        """Called after a successful write batch (Edge uses it to schedule optimize)."""

    def _optimize(self, name: str) -> None:  # noqa: B027 - optional hook
        """Build pending indexes now; servers do this in the background."""

    @abc.abstractmethod
    def _flush(self) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...


def partition_bounds(part: int, parts: int) -> tuple[str | None, str | None]:
    """Id range ``[low, high)`` of partition ``part`` of ``parts`` as canonical UUID strings (None = open end)."""
    if isinstance(parts, bool) or not isinstance(parts, int) or not 1 <= parts <= 4096:
        raise InvalidInputError(f"parts must be an int in 1..4096, got {parts!r}")
    if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < parts:
        raise InvalidInputError(f"part must be an int in 0..{parts - 1}, got {part!r}")

    def bound(i: int) -> str | None:
        if i == 0 or i == parts:
            return None
        return str(uuid.UUID(int=(i << 128) // parts))

    return bound(part), bound(part + 1)


def _check_with_vectors(value: Any) -> WithVectors:
    """``with_vectors`` as a bool or a vector name. ``value in (True, False, ...)`` let 1, 0 and numpy bools
    through (1 == True), which the adapters then read differently: one as a vector name, one as nothing."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value in (FULL_VECTOR, PREFIX_VECTOR):
        return value
    raise InvalidInputError(f"with_vectors must be a bool, {FULL_VECTOR!r} or {PREFIX_VECTOR!r}, got {value!r}")


def _check_with_payload(value: Any) -> bool:
    """``with_payload`` as a bool: it was read by truthiness, so "no" returned the payload."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidInputError(f"with_payload must be a bool, got {value!r}")


def vector_names(with_vectors: WithVectors) -> list[str]:
    """Which stored vectors to fetch for a ``with_vectors`` value."""
    if with_vectors is True:
        return [FULL_VECTOR]
    if with_vectors is False:
        return []
    return [str(with_vectors)]


def has_id_point_ids(cond: HasId) -> list[str]:
    return [point_id(i) for i in cond.ids]


def json_size(body: Any) -> int:
    """Bytes of ``body`` as JSON (what the engine stores of a payload, about)."""
    return len(json.dumps(body, default=str))


def payload_bytes_estimate(bodies: Sequence[Any], sample: int = 64) -> int:
    """The JSON size of many payloads, from at most ``sample`` of them spread over the batch (mean x n, plus the
    largest seen): a disk-space check without serialising a million payloads."""
    n = len(bodies)
    if n == 0:
        return 0
    step = max(1, n // sample)
    sizes = [json_size(bodies[i]) for i in range(0, n, step)]
    return int(sum(sizes) / len(sizes) * n) + max(sizes)


def group_by_payload(updates: list[tuple[str, dict[str, Any]]]) -> list[tuple[dict[str, Any], list[str]]]:
    """Group per-point payload updates so points that get the same payload share one operation.

    Labeling write-back is mostly a few distinct payloads ({"pseudo_status": "quarantined"}, ...)
    over many points, so this turns n operations into a handful. Order of first appearance is kept.
    """
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for pid, body in updates:
        key = json.dumps(body, sort_keys=True)
        groups.setdefault(key, (body, []))[1].append(pid)
    return list(groups.values())


def _vector_out(raw: Any, with_vectors: WithVectors) -> np.ndarray | None:
    names = vector_names(with_vectors)
    if not names or not raw:
        return None
    return np.asarray(raw[names[0]], dtype=np.float32)


def _best_first(hit: Hit) -> tuple[float, str]:
    return -hit.score, hit.point_id


def hit_from(p: Any, with_payload: bool, with_vectors: WithVectors) -> Hit:
    """A Hit from a qdrant-edge or qdrant-client scored point (same attribute names)."""
    payload = p.payload or {}
    pid = str(p.id)  # the bindings build a new UUID object on every access of .id: read it once
    ext = payload.get(EXTERNAL_ID_KEY)
    return Hit(
        id=pid if ext is None else str(ext),
        point_id=pid,
        score=float(p.score),
        payload=payload if with_payload else None,
        vector=_vector_out(p.vector, with_vectors),
    )


def record_from(r: Any, with_payload: bool, with_vectors: WithVectors) -> Record:
    """A Record from a qdrant-edge or qdrant-client record."""
    payload = r.payload or {}
    pid = str(r.id)
    ext = payload.get(EXTERNAL_ID_KEY)
    return Record(
        id=pid if ext is None else str(ext),
        point_id=pid,
        payload=payload if with_payload else None,
        vector=_vector_out(r.vector, with_vectors),
    )


def _plain_int(value: Any) -> Any:
    """A numpy integer (from argsort, len of an array, ...) as the int it is; anything else unchanged."""
    return int(value) if isinstance(value, np.integer) else value


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
