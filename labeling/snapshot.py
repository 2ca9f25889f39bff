"""Read a collection for a labeling job: paged scroll for ids, labels and embedding prefixes, then the kNN graph.

Memory model: ids, the ``prefix_dims`` embedding prefix (float32) and the k-NN
graph (int32 + float32, ``k`` per point) are held for every point; full 512D
vectors only one page at a time. For 100k points at prefix 128 and k = 15 that
is about 51 MB + 12 MB.

The graph comes from the store's own search path (128D shortlist, 512D rerank),
one ``search_batch`` call per page: no per-point round trips. A point is never
its own neighbour (dropped by id, not position).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labeling.neighbours import NeighbourGraph
from retrieval import FULL_VECTOR, VectorStore

Advance = Callable[[str, int, int], None]  # (stage, done, total)


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
    advance: Advance | None = None,
) -> Snapshot:
    """Pass 1: ids, labels and prefixes of every point, by paged scroll."""
    t0 = time.perf_counter()
    total = store.count(collection)
    ids: list[str] = []
    labels: list[str | None] = []
    sources: list[str | None] = []
    truth: list[str | None] = []
    blocks: list[np.ndarray] = []
    for rec in store.iter_records(collection, page_size=page_size, with_payload=True, with_vectors=FULL_VECTOR):
        p = rec.payload or {}
        ids.append(rec.id)
        labels.append(_text(p.get(label_field)))
        sources.append(_text(p.get(source_field)))
        if truth_field:
            truth.append(_text(p.get(truth_field)))
        v = np.asarray(rec.vector, np.float32)[:prefix_dims]
        blocks.append(v)
        if advance is not None and len(ids) % page_size == 0:
            advance("read", len(ids), total)
    if advance is not None:
        advance("read", len(ids), max(total, len(ids)))
    x = np.vstack(blocks) if blocks else np.zeros((0, prefix_dims), np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    return Snapshot(
        ids,
        x.astype(np.float32),
        labels,
        sources,
        truth if truth_field else None,
        seconds={"read": time.perf_counter() - t0},
    )


def neighbour_graph(
    store: VectorStore,
    collection: str,
    ids: list[str],
    *,
    k: int,
    shortlist: int | None = None,
    page_size: int = 1024,
    batch: int = 256,
    advance: Advance | None = None,
) -> NeighbourGraph:
    """Pass 2: each point's ``k`` nearest neighbours from the store (self excluded), as snapshot rows."""
    row_of = {pid: i for i, pid in enumerate(ids)}
    n = len(ids)
    index = np.full((n, k), -1, np.int32)
    sims = np.zeros((n, k), np.float32)
    done = 0
    page_ids: list[str] = []
    page_vecs: list[np.ndarray] = []

    def flush() -> None:
        nonlocal done
        if not page_ids:
            return
        hits = store.search_batch(
            collection,
            np.vstack(page_vecs),
            top_k=k + 1,
            shortlist=None if shortlist is None else max(shortlist, k + 1),
            with_payload=False,
        )
        for pid, found in zip(page_ids, hits, strict=True):
            i = row_of.get(pid)
            if i is None:
                continue  # inserted after pass 1: not part of this job
            j = 0
            for h in found:
                r = row_of.get(h.id)
                if h.id == pid or r is None:
                    continue
                if j < k:
                    index[i, j] = r
                    sims[i, j] = h.score
                    j += 1
        done += len(page_ids)
        page_ids.clear()
        page_vecs.clear()
        if advance is not None:
            advance("neighbours", done, n)

    for rec in store.iter_records(collection, page_size=page_size, with_payload=False, with_vectors=FULL_VECTOR):
        page_ids.append(rec.id)
        page_vecs.append(np.asarray(rec.vector, np.float32))
        if len(page_ids) >= batch:
            flush()
    flush()
    return NeighbourGraph(index, sims)
