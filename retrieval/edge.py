"""The embedded adapter: Qdrant Edge (``qdrant-edge-py``), Qdrant's engine in-process.

Layout on disk (``path``, default ``./data/store``)::

    .embedstore.lock            # who owns the directory (see _lock.py)
    collections/<name>/meta.json  # the CollectionSpec, written last (a collection exists iff it has one)
    collections/<name>/shard/     # one EdgeShard

Qdrant Edge has no background optimizer: freshly written points are searched
brute force until ``optimize()`` builds the HNSW graph. This adapter therefore
optimizes a collection after a write once the points written since its last
optimize reach ``max(optimize_min_pending, optimize_ratio * points indexed at
that optimize)`` (so bulk loads do O(log n) rebuilds, not one per batch), and on
:meth:`flush` / :meth:`close`. ``auto_optimize=False`` leaves it to you.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from retrieval._lock import DirectoryLock
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
from retrieval.errors import (
    DimensionError,
    InvalidFilterError,
    InvalidInputError,
    SchemaMismatchError,
    StoreError,
    StoreFullError,
    StoreLockedError,
)
from retrieval.filters import Filter, HasId, IsEmpty, Match, MatchAny, Range
from retrieval.schema import (
    EXTERNAL_ID_KEY,
    FULL_DIM,
    FULL_VECTOR,
    INT8_QUANTILE,
    PREFIX_DIM,
    PREFIX_VECTOR,
    CollectionSpec,
)
from retrieval.types import CollectionInfo, Hit, Record, ScrollPage, WithVectors

_KINDS = {
    "keyword": qe.PayloadSchemaType.Keyword,
    "integer": qe.PayloadSchemaType.Integer,
    "float": qe.PayloadSchemaType.Float,
    "bool": qe.PayloadSchemaType.Bool,
}


@contextlib.contextmanager
def _edge_errors(what: str) -> Iterator[None]:
    """Turn qdrant-edge's bare Exceptions into the store's error hierarchy."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:  # qdrant-edge raises plain Exception with a message
        msg = str(exc)
        if "WouldBlock" in msg:
            raise StoreLockedError(f"{what}: the shard is open elsewhere ({msg})") from exc
        if "dimension error" in msg:
            raise DimensionError(f"{what}: {msg}") from exc
        raise StoreError(f"{what}: qdrant-edge error: {msg}") from exc


#: Free space an embedded store keeps in reserve (its write-ahead log maps segments of tens of MiB). Qdrant Edge
#: maps its files into memory: a write that finds the disk full kills the process with SIGBUS, no Python error
#: and no message (measured on a full 20 MB tmpfs: even `store info` died so), so the adapter checks first.
MIN_FREE_BYTES = 64 * 2**20
#: What a point's vectors cost on disk, at most: both vectors in the write-ahead log and in a segment, int8 prefix,
#: and room for a small payload. A write adds twice its payload's JSON size (log and segment) on top.
BYTES_PER_POINT = 2 * 4 * (512 + 128) + 128 + 4096


def _tree_bytes(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


class EdgeStore(VectorStore):
    """Embedded store on Qdrant Edge. One process owns ``path`` at a time."""

    backend = "edge"

    def __init__(
        self,
        path: str | os.PathLike[str] = "./data/store",
        *,
        shortlist: int = 100,
        write_batch_size: int = 512,
        auto_optimize: bool = True,
        optimize_min_pending: int = 20_000,
        optimize_ratio: float = 0.5,
        indexing_threshold_kb: int | None = None,
        full_scan_threshold_kb: int = 10_000,
        max_search_threads: int | None = None,
        create: bool = True,
        min_free_bytes: int = MIN_FREE_BYTES,
    ) -> None:
        super().__init__(shortlist=shortlist, write_batch_size=write_batch_size)
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInputError(f"store path {str(self.path)!r} is a file, not an embedded store directory")
        if not create and not (self.path / "collections").is_dir():
            # a typo'd --path would otherwise open as a new, empty store and read as "nothing there"
            raise StoreError(
                f"no embedded store at {str(self.path)!r} (EMBEDSTORE_PATH / --path); `embedstore index` or "
                "`ingest` creates one"
            )
        self.auto_optimize = auto_optimize
        self.optimize_min_pending = optimize_min_pending
        self.optimize_ratio = optimize_ratio
        self.indexing_threshold_kb = indexing_threshold_kb
        self.full_scan_threshold_kb = full_scan_threshold_kb
        self.max_search_threads = max_search_threads
        self._lock = DirectoryLock(self.path)
        self._lock.acquire()
        try:
            self._require_space(0, "opening the store")
        except StoreError:
            self._lock.release()
            raise
        self._shards: dict[str, qe.EdgeShard] = {}
        self._pending: dict[str, int] = {}
        self._indexed_at_optimize: dict[str, int] = {}
        self._write_lock = threading.RLock()
        (self.path / "collections").mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"EdgeStore(path={str(self.path)!r})"

    # ----------------------------------------------------------------- helpers
    def _require_space(self, need: int, doing: str) -> None:
        """Refuse, naming the device, when a write may find the disk full (see ``MIN_FREE_BYTES``)."""
        free = shutil.disk_usage(self.path).free
        if free < self.min_free_bytes + need:
            mib = 2**20
            raise StoreFullError(
                f"{doing}: only {free / mib:.0f} MiB free on the device holding the store at {str(self.path)!r} "
                f"(about {(self.min_free_bytes + need) / mib:.0f} MiB needed). Qdrant Edge maps its files into "
                "memory, and a write that finds the disk full kills the process without a message (SIGBUS): "
                "free some space first"
            )

    def _dir(self, name: str) -> Path:
        return self.path / "collections" / name

    def _meta(self, name: str) -> dict[str, Any]:
        path = self._dir(name) / "meta.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # ValueError: JSON and UTF-8 decoding
            raise StoreError(f"collection {name!r}: its settings file {str(path)!r} cannot be read ({exc})") from None

    def _shard(self, name: str) -> qe.EdgeShard:
        shard = self._shards.get(name)
        if shard is None:
            with self._write_lock:
                shard = self._shards.get(name)
                if shard is None:
                    with _edge_errors(f"opening collection {name!r}"):
                        shard = qe.EdgeShard.load(str(self._dir(name) / "shard"), self._edge_config(name))
                    self._shards[name] = shard
                    self._indexed_at_optimize[name] = shard.info().points_count
        return shard

    def _edge_config(self, name: str, spec: CollectionSpec | None = None) -> qe.EdgeConfig:
        if spec is None:
            meta = self._meta(name)
            spec = CollectionSpec.from_stored(meta["spec"])
        optimizers = None
        quantized = spec.int8_prefix
        if self.indexing_threshold_kb is not None:
            optimizers = qe.EdgeOptimizersConfig(indexing_threshold=self.indexing_threshold_kb)
        return qe.EdgeConfig(
            vectors={
                PREFIX_VECTOR: qe.EdgeVectorParams(
                    size=PREFIX_DIM,
                    distance=qe.Distance.Cosine,
                    hnsw_config=qe.HnswIndexConfig(
                        m=spec.hnsw_m,
                        ef_construct=spec.hnsw_ef_construct,
                        full_scan_threshold=self.full_scan_threshold_kb,
                    ),
                    # int8: the quantized copy in RAM, the float originals on disk (see CollectionSpec)
                    quantization_config=qe.ScalarQuantizationConfig(
                        qe.ScalarType.Int8, quantile=INT8_QUANTILE, memory=qe.Memory.Cached
                    )
                    if quantized
                    else None,
                    memory=qe.Memory.Cold if quantized else qe.Memory.Cached,
                ),
                FULL_VECTOR: qe.EdgeVectorParams(
                    size=FULL_DIM,
                    distance=qe.Distance.Cosine,
                    # m=0: no graph. full512 is only scored for the shortlist.
                    hnsw_config=qe.HnswIndexConfig(
                        m=0, ef_construct=spec.hnsw_ef_construct, full_scan_threshold=self.full_scan_threshold_kb
                    ),
                    memory=qe.Memory.Cold if spec.full_on_disk else qe.Memory.Cached,
                ),
            },
            optimizers=optimizers,
            max_search_threads=self.max_search_threads,
        )

    # ------------------------------------------------------------- collections
    def _collection_exists(self, name: str) -> bool:
        return name in self._shards or (self._dir(name) / "meta.json").is_file()

    def _list_collections(self) -> list[str]:
        root = self.path / "collections"
        return [p.name for p in root.iterdir() if (p / "meta.json").is_file()]

    def _create_collection(self, name: str, spec: CollectionSpec) -> None:
        directory = self._dir(name)
        if directory.exists():  # leftovers of a create that died before meta.json
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        try:
            with _edge_errors(f"creating collection {name!r}"):
                shard = qe.EdgeShard.create(str(directory / "shard"), self._edge_config(name, spec))
            meta = {"spec": spec.__dict__, "layout": spec.layout()}
            tmp = directory / "meta.json.tmp"
            tmp.write_text(json.dumps(meta, indent=2))
            os.replace(tmp, directory / "meta.json")
        except BaseException:
            with contextlib.suppress(Exception):
                shard.close()  # type: ignore[possibly-undefined]
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._shards[name] = shard
        self._pending[name] = 0
        self._indexed_at_optimize[name] = 0

    def _collection_layout(self, name: str) -> dict[str, Any]:
        try:
            return self._meta(name)["layout"]
        except (OSError, ValueError, KeyError) as exc:
            raise SchemaMismatchError(f"collection {name!r} has no readable meta.json: {exc}") from exc

    def _drop_collection(self, name: str) -> None:
        with self._write_lock:
            shard = self._shards.pop(name, None)
            if shard is not None:
                with _edge_errors(f"closing collection {name!r}"):
                    shard.close()
            self._pending.pop(name, None)
            self._indexed_at_optimize.pop(name, None)
            (self._dir(name) / "meta.json").unlink(missing_ok=True)
            shutil.rmtree(self._dir(name), ignore_errors=True)

    def _collection_info(self, name: str) -> CollectionInfo:
        with _edge_errors(f"info of {name!r}"):
            info = self._shard(name).info()
        return CollectionInfo(
            name=name,
            backend=self.backend,
            points_count=info.points_count,
            indexed_vectors_count=info.indexed_vectors_count,
            spec={
                **CollectionSpec.from_stored(self._meta(name)["spec"]).__dict__,
                "segments": info.segments_count,
                "pending_optimize": self._pending.get(name, 0),
            },
            payload_indexes=tuple(sorted(info.payload_schema)),
            payload_index_kinds={
                k: payload_kind_name(_KINDS, v.data_type) for k, v in sorted(info.payload_schema.items())
            },
        )

    def _get_metadata(self, name: str) -> dict[str, Any]:
        return self._meta(name).get("user", {})

    def _set_metadata(self, name: str, metadata: dict[str, Any]) -> None:
        meta = self._meta(name)
        meta["user"] = metadata
        text = json.dumps(meta, indent=2)
        self._require_space(len(text), f"writing the metadata of {name!r}")
        tmp = self._dir(name) / "meta.json.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())  # the new file whole on disk before it replaces the old one
            os.replace(tmp, self._dir(name) / "meta.json")
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot write the metadata of {name!r} ({exc}); the previous metadata is kept") from None

    def _create_payload_index(self, name: str, key: str, kind: str) -> None:
        self._require_space(0, f"indexing {key!r} in {name!r}")
        with self._write_lock, _edge_errors(f"indexing {key!r} in {name!r}"):
            self._shard(name).update(qe.UpdateOperation.create_field_index(key, _KINDS[kind]))

    def _payload_index_kinds(self, name: str) -> dict[str, str]:
        with _edge_errors(f"info of {name!r}"):
            schema = self._shard(name).info().payload_schema
        return {k: payload_kind_name(_KINDS, v.data_type) for k, v in schema.items()}

    # ------------------------------------------------------------------ writes
    def _upsert_request(
        self, name: str, pids: list[str], full: np.ndarray, prefix: np.ndarray, payloads: list[dict[str, Any]]
    ) -> Any:
        # float32 numpy rows straight into the bindings: measured 10% faster than .tolist() rows on
        # qdrant-edge-py 0.9 (40k points: 1.66-1.70 vs 1.86-1.90 s, construction + update).
        return qe.UpdateOperation.upsert_points(
            [
                qe.Point(id=pid, vector={PREFIX_VECTOR: prefix[i], FULL_VECTOR: full[i]}, payload=payloads[i])
                for i, pid in enumerate(pids)
            ]
        )

    def _check_room(self, name: str, n_points: int, payload_bytes: int = 0, *, op: str = "upsert") -> None:
        # a payload change copies the point out of its optimized segment (its vectors too); a delete logs ids
        per_point = 64 if op == "delete" else BYTES_PER_POINT
        doing = {
            "upsert": f"upsert of {n_points} points into {name!r}",
            "set_payload": f"set_payload on {n_points} points in {name!r}",
            "delete_payload": f"delete_payload on {n_points} points in {name!r}",
            "delete": f"delete of {n_points} points from {name!r}",
        }[op]
        self._require_space(n_points * per_point + 2 * payload_bytes, doing)

    def _write_upsert(self, name: str, request: Any, n_points: int) -> None:
        with self._write_lock, _edge_errors(f"upsert into {name!r}"):
            self._shard(name).update(request)
            self._pending[name] = self._pending.get(name, 0) + n_points

    def _after_write(self, name: str, n_written: int) -> None:
        if not self.auto_optimize:
            return
        pending = self._pending.get(name, 0)
        due = max(self.optimize_min_pending, self.optimize_ratio * self._indexed_at_optimize.get(name, 0))
        if pending >= due:
            self._optimize(name)

    def _optimize(self, name: str) -> None:
        # Optimizing rewrites segments: room for a second copy of the collection, at worst. Without it the
        # optimize is skipped, not failed: the points are written and searchable, only slower until then.
        need = self.min_free_bytes + _tree_bytes(self._dir(name))
        free = shutil.disk_usage(self.path).free
        if free < need:
            warnings.warn(
                f"not optimizing {name!r}: {free / 2**20:.0f} MiB free on the device holding {str(self.path)!r}, "
                f"about {need / 2**20:.0f} MiB needed; its points are stored and searchable, searches stay slower "
                "until an optimize finds the room (the next bulk write, or closing the store)",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        with self._write_lock, _edge_errors(f"optimizing {name!r}"):
            shard = self._shard(name)
            shard.optimize()
            self._pending[name] = 0
            self._indexed_at_optimize[name] = shard.info().points_count

    def _existing_ids(self, name: str, pids: list[str]) -> set[str]:
        with _edge_errors(f"retrieve from {name!r}"):
            records = self._shard(name).retrieve(pids, with_payload=False, with_vector=False)
        return {str(r.id) for r in records}

    def _set_payloads(self, name: str, updates: list[tuple[str, dict[str, Any]]]) -> None:
        with self._write_lock, _edge_errors(f"set_payload in {name!r}"):
            shard = self._shard(name)
            for body, pids in group_by_payload(updates):
                shard.update(qe.UpdateOperation.set_payload(pids, body))
            # a payload update copies the point out of its optimized segment: counted like an upsert, so the
            # threshold optimize runs (measured, 100k points: search 4.3x slower after a payload update of
            # every point, back to normal after optimize)
            self._pending[name] = self._pending.get(name, 0) + len(updates)

    def _delete_payload_keys(self, name: str, pids: list[str], keys: list[str]) -> None:
        with self._write_lock, _edge_errors(f"delete_payload in {name!r}"):
            self._shard(name).update(qe.UpdateOperation.delete_payload(pids, keys))
            self._pending[name] = self._pending.get(name, 0) + len(pids)

    def _delete(self, name: str, pids: list[str]) -> None:
        with self._write_lock, _edge_errors(f"delete from {name!r}"):
            self._shard(name).update(qe.UpdateOperation.delete_points(pids))

    # ------------------------------------------------------------------- reads
    def _query(self, name: str, full: np.ndarray, prefix: np.ndarray, plan: QueryPlan) -> list[list[Hit]]:
        flt = _to_edge_filter(plan.filter) if plan.filter is not None else None
        payload_sel: Any = True if plan.with_payload else qe.PayloadSelector.Include([EXTERNAL_ID_KEY])
        vec_sel: Any = vector_names(plan.with_vectors) or False
        requests = []
        full_rows, prefix_rows = full.tolist(), prefix.tolist()  # lists cross into Rust faster than numpy rows
        for i in range(full.shape[0]):
            if plan.exact:
                requests.append(
                    qe.QueryRequest(
                        limit=plan.top_k,
                        query=qe.Query.Nearest(full_rows[i], using=FULL_VECTOR),
                        params=qe.SearchParams(exact=True),
                        filter=flt,
                        with_payload=payload_sel,
                        with_vector=vec_sel,
                        score_threshold=plan.score_threshold,
                    )
                )
            else:
                requests.append(
                    qe.QueryRequest(
                        limit=plan.top_k,
                        prefetches=[
                            qe.Prefetch(
                                limit=plan.shortlist,
                                query=qe.Query.Nearest(prefix_rows[i], using=PREFIX_VECTOR),
                                filter=flt,
                                params=_SHORTLIST_PARAMS,
                            )
                        ],
                        query=qe.Query.Nearest(full_rows[i], using=FULL_VECTOR),
                        filter=flt,
                        with_payload=payload_sel,
                        with_vector=vec_sel,
                        score_threshold=plan.score_threshold,
                    )
                )
        with _edge_errors(f"query on {name!r}"):
            shard = self._shard(name)
            if len(requests) == 1:
                results = [shard.query(requests[0])]
            else:
                results = shard.query_batch(qe.QueryBatchRequest(requests))
        return [[hit_from(p, plan.with_payload, plan.with_vectors) for p in points] for points in results]

    def _retrieve(self, name: str, pids: list[str], with_payload: bool, with_vectors: WithVectors) -> list[Record]:
        with _edge_errors(f"retrieve from {name!r}"):
            records = self._shard(name).retrieve(
                pids,
                with_payload=True if with_payload else qe.PayloadSelector.Include([EXTERNAL_ID_KEY]),
                with_vector=vector_names(with_vectors) or False,
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
        request = qe.ScrollRequest(
            offset=offset,
            limit=limit,
            filter=_to_edge_filter(filter) if filter is not None else None,
            with_payload=True if with_payload else qe.PayloadSelector.Include([EXTERNAL_ID_KEY]),
            with_vector=vector_names(with_vectors) or False,
        )
        with _edge_errors(f"scroll on {name!r}"):
            records, nxt = self._shard(name).scroll(request)
        return ScrollPage(
            [record_from(r, with_payload, with_vectors) for r in records], None if nxt is None else str(nxt)
        )

    def _count(self, name: str, filter: Filter | None) -> int:
        with _edge_errors(f"count on {name!r}"):
            return self._shard(name).count(
                qe.CountRequest(exact=True, filter=_to_edge_filter(filter) if filter is not None else None)
            )

    def _facet(self, name: str, key: str, filter: Filter | None, limit: int) -> dict[Any, int]:
        with _edge_errors(f"facet on {name!r}"):
            response = self._shard(name).facet(
                qe.FacetRequest(
                    key=key, limit=limit, exact=True, filter=_to_edge_filter(filter) if filter is not None else None
                )
            )
        return [(hit.value, hit.count) for hit in response]

    # --------------------------------------------------------------- lifecycle
    def _flush(self) -> None:
        with self._write_lock:
            for name, shard in list(self._shards.items()):
                if self._pending.get(name):
                    self._optimize(name)
                with _edge_errors(f"flushing {name!r}"):
                    shard.flush()

    def _close(self) -> None:
        try:
            with self._write_lock:
                errors = []
                for name, shard in list(self._shards.items()):
                    try:
                        if self._pending.get(name):
                            self._optimize(name)
                        with _edge_errors(f"closing {name!r}"):
                            shard.flush()
                            shard.close()
                    except StoreError as exc:
                        errors.append(exc)
                self._shards.clear()
                if errors:
                    raise errors[0]
        finally:
            self._lock.release()


# ---------------------------------------------------------------- conversions
# The shortlist is taken on the int8 copy and not rescored on the float mrl128 originals (on disk):
# the full512 rerank that follows is the rescore. Ignored by collections without quantization.
_SHORTLIST_PARAMS = qe.SearchParams(quantization=qe.QuantizationSearchParams(rescore=False))


def _to_edge_filter(flt: Filter) -> qe.Filter:
    def conv(cond: Any) -> Any:
        if isinstance(cond, Filter):
            return _to_edge_filter(cond)
        if isinstance(cond, Match):
            # qdrant-edge-py 0.9 reads a Python bool as an int (bool is an int subclass): True matched the
            # int 1, never True. numpy's bool is no int, so the binding takes it as the bool it is.
            value = np.bool_(cond.value) if isinstance(cond.value, bool) else cond.value
            return qe.FieldCondition(key=cond.key, match=qe.MatchValue(value))
        if isinstance(cond, MatchAny):
            return qe.FieldCondition(key=cond.key, match=qe.MatchAny(list(cond.values)))
        if isinstance(cond, Range):
            return qe.FieldCondition(
                key=cond.key, range=qe.RangeFloat(gt=cond.gt, gte=cond.gte, lt=cond.lt, lte=cond.lte)
            )
        if isinstance(cond, IsEmpty):
            return qe.IsEmptyCondition(cond.key)
        if isinstance(cond, HasId):
            return qe.HasIdCondition(set(has_id_point_ids(cond)))
        raise InvalidFilterError(f"unsupported filter condition {cond!r}")

    return qe.Filter(
        must=[conv(c) for c in flt.must] or None,
        should=[conv(c) for c in flt.should] or None,
        must_not=[conv(c) for c in flt.must_not] or None,
    )
