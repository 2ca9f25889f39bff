"""Read a collection for a labeling job: paged scroll for ids, labels and embedding prefixes, then the kNN graph.

Memory model: ids, the ``prefix_dims`` embedding prefix (float32) and the k-NN
graph (int32 + float32, ``k`` per point) are held for every point; full 512D
vectors only one page at a time (one page per partition when partitions are
read in parallel). For 100k points at prefix 128 and k = 15 that
is about 51 MB + 12 MB.

The graph comes from the store's own search path (128D shortlist, 512D rerank),
one ``search_batch`` call per page: no per-point round trips. A point is never
its own neighbour (dropped by id, not position).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from labeling.neighbours import NeighbourGraph
from retrieval import FULL_VECTOR, Hit, VectorStore

Advance = Callable[[str, int, int], None]  # (stage, done, total)
T = TypeVar("T")


@dataclass
class Snapshot:
    ids: list[str]
    x: np.ndarray  # (n, prefix) renormalised prefix
    labels: list[str | None]
    sources: list[str | None]
    truth: list[str | None] | None
    graph: NeighbourGraph | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.ids)


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def read_snapshot(
    store: VectorStore,
    collection: str,
    *,
    label_field: str = "label",
    source_field: str = "label_source",
    truth_field: str | None = None,
    prefix_dims: int = 128,
    page_size: int = 1024,
    partitions: int | None = None,
    advance: Advance | None = None,
) -> Snapshot:
    """Pass 1: ids, labels and prefixes of every point, by paged scroll.

    ``partitions`` > 1 reads that many disjoint id ranges in parallel threads (VectorStore.iter_partition);
    None uses the store's ``read_parallelism`` (1 on Edge, 4 on a server). The rows come out in id order
    whatever the partitioning, so a job's snapshot does not depend on it.
    """
    t0 = time.perf_counter()
    parts = _partitions(store, partitions)
    total = store.count(collection)
    progress = _Progress("read", total, advance)

    def read(part: int) -> tuple[list[str], list[str | None], list[str | None], list[str | None], np.ndarray]:
        ids: list[str] = []
        labels: list[str | None] = []
        sources: list[str | None] = []
        truth: list[str | None] = []
        # prefixes go into page-sized float32 buffers: no per-row array objects, and never a view that would
        # keep a whole 512D vector alive
        blocks: list[np.ndarray] = []
        buf = np.empty((page_size, prefix_dims), np.float32)
        fill = 0
        records = store.iter_partition(
            collection, part, parts, page_size=page_size, with_payload=True, with_vectors=FULL_VECTOR
        )
        for rec in records:
            p = rec.payload or {}
            ids.append(rec.id)
            labels.append(_text(p.get(label_field)))
            sources.append(_text(p.get(source_field)))
            if truth_field:
                truth.append(_text(p.get(truth_field)))
            buf[fill] = np.asarray(rec.vector, np.float32)[:prefix_dims]
            fill += 1
            if fill == page_size:
                blocks.append(_unit_rows(buf))
                buf = np.empty((page_size, prefix_dims), np.float32)
                fill = 0
                progress.add(page_size)
        blocks.append(_unit_rows(buf[:fill]))
        progress.add(fill)
        return ids, labels, sources, truth, np.vstack(blocks)

    chunks = _each_partition(read, parts)
    ids = [i for c in chunks for i in c[0]]
    progress.finish(len(ids))
    x = chunks[0][4] if len(chunks) == 1 else np.vstack([c[4] for c in chunks])
    return Snapshot(
        ids,
        x,
        [v for c in chunks for v in c[1]],
        [v for c in chunks for v in c[2]],
        [v for c in chunks for v in c[3]] if truth_field else None,
        seconds={"read": time.perf_counter() - t0},
    )


def _partitions(store: VectorStore, partitions: int | None) -> int:
    parts = store.read_parallelism if partitions is None else partitions
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"partitions must be a positive int, got {partitions!r}")
    return parts


def _each_partition(work: Callable[[int], T], parts: int) -> list[T]:
    """``work(part)`` for every partition, in part order: inline for one, one thread each otherwise."""
    if parts == 1:
        return [work(0)]
    with ThreadPoolExecutor(parts, thread_name_prefix="snapshot") as pool:
        return list(pool.map(work, range(parts)))


def _unit_rows(block: np.ndarray) -> np.ndarray:
    """Renormalise the rows of a page of prefixes in place (page by page: no full-size temporary)."""
    block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return block


class _Progress:
    """A thread-safe running count reported through ``advance``."""

    def __init__(self, stage: str, total: int, advance: Advance | None) -> None:
        self.stage, self.total, self.advance = stage, total, advance
        self.done = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.done += n
            if self.advance is not None:
                self.advance(self.stage, self.done, max(self.total, self.done))

    def finish(self, n: int) -> None:
        if self.advance is not None:
            self.advance(self.stage, n, max(self.total, n))


#: Extra neighbours fetched past k so that a group of equal similarities at the k-th place is cut by
#: snapshot row, not by the store's internal order (duplicates come in twos and threes).
_TIE_MARGIN = 4


def _ranked_rows(
    found: Sequence[Hit], row_of: Mapping[str, int], k: int, exclude: str | None = None
) -> list[tuple[int, float]]:
    """The first ``k`` hits as (snapshot row, similarity): best first, equal similarities by snapshot row.

    Equal similarities (duplicate items) come back in the store's internal point order, which differs
    between two builds of the same points; ordering them by snapshot row (the id order) makes the graph,
    and the job, the same on every build (BENCHMARKS.md, "Rows vary"). Hits outside the snapshot
    (inserted after pass 1) and ``exclude`` (the query point itself) are dropped.
    """
    rows = ((r, h.score) for h in found if h.id != exclude and (r := row_of.get(h.id)) is not None)
    return sorted(rows, key=lambda rs: (-rs[1], rs[0]))[:k]


def _search(
    store: VectorStore, collection: str, vecs: np.ndarray, fetch: int, shortlist: int | None
) -> list[list[Hit]]:
    """The graph's one search rule: ``fetch`` hits per vector, the shortlist never narrower than ``fetch``."""
    return store.search_batch(
        collection,
        vecs,
        top_k=fetch,
        shortlist=None if shortlist is None else max(shortlist, fetch),
        with_payload=False,
    )


def row_index(ids: Sequence[str]) -> dict[str, int]:
    """Snapshot point id -> row."""
    return {pid: i for i, pid in enumerate(ids)}


def query_graph(
    store: VectorStore,
    collection: str,
    ids: Sequence[str] | Mapping[str, int],
    vectors: np.ndarray,
    *,
    k: int,
    shortlist: int | None = None,
    batch: int = 256,
) -> NeighbourGraph:
    """The ``k`` nearest snapshot rows of each of ``vectors`` - items that are *not* in the snapshot - with the
    same search and the same tie order as :func:`neighbour_graph` (rows without a neighbour stay ``-1``).

    ``ids`` are the snapshot's point ids in row order, or their :func:`row_index` when the caller keeps one
    (``JobResult`` does: repeated calls on a large snapshot then skip rebuilding it).
    """
    row_of = ids if isinstance(ids, Mapping) else row_index(ids)
    vecs = np.asarray(vectors, np.float32)
    index = np.full((len(vecs), k), -1, np.int32)
    sims = np.zeros((len(vecs), k), np.float32)
    fetch = k + _TIE_MARGIN
    for start in range(0, len(vecs), batch):
        hits = _search(store, collection, vecs[start : start + batch], fetch, shortlist)
        for i, found in enumerate(hits, start):
            for j, (r, score) in enumerate(_ranked_rows(found, row_of, k)):
                index[i, j], sims[i, j] = r, score
    return NeighbourGraph(index, sims)


def neighbour_graph(
    store: VectorStore,
    collection: str,
    ids: list[str],
    *,
    k: int,
    shortlist: int | None = None,
    page_size: int = 1024,
    batch: int = 256,
    partitions: int | None = None,
    advance: Advance | None = None,
) -> NeighbourGraph:
    """Pass 2: each point's ``k`` nearest neighbours from the store (self excluded), as snapshot rows.

    ``partitions`` as in :func:`read_snapshot`: each partition scrolls its own id range and sends its own
    ``search_batch`` calls; every point's row is written by exactly one partition.
    """
    parts = _partitions(store, partitions)
    row_of = row_index(ids)
    n = len(ids)
    index = np.full((n, k), -1, np.int32)
    sims = np.zeros((n, k), np.float32)
    progress = _Progress("neighbours", n, advance)
    fetch = k + 1 + _TIE_MARGIN  # the point itself, k neighbours, and room for a tie at the k-th place

    def flush(page_ids: list[str], page_vecs: list[np.ndarray]) -> None:
        hits = _search(store, collection, np.vstack(page_vecs), fetch, shortlist)
        for pid, found in zip(page_ids, hits, strict=True):
            i = row_of.get(pid)
            if i is None:
                continue  # inserted after pass 1: not part of this job
            for j, (r, score) in enumerate(_ranked_rows(found, row_of, k, exclude=pid)):
                index[i, j] = r
                sims[i, j] = score
        progress.add(len(page_ids))

    def run(part: int) -> None:
        page_ids: list[str] = []
        page_vecs: list[np.ndarray] = []
        records = store.iter_partition(
            collection, part, parts, page_size=page_size, with_payload=False, with_vectors=FULL_VECTOR
        )
        for rec in records:
            page_ids.append(rec.id)
            page_vecs.append(np.asarray(rec.vector, np.float32))
            if len(page_ids) >= batch:
                flush(page_ids, page_vecs)
                page_ids, page_vecs = [], []
        if page_ids:
            flush(page_ids, page_vecs)

    _each_partition(run, parts)
    return NeighbourGraph(index, sims)
