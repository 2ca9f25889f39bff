"""Copy a collection between stores (the embedded Edge store -> a Qdrant server or cluster), resumably.

``migrate(source, target, "items")`` scrolls the source in id order, a *window* of
pages at a time, and writes each window's pages to the target in parallel
(``workers`` threads; upsert is idempotent, so a page written twice is harmless).
After a whole window is written, the scroll offset of the next page is saved in the
*target* collection's metadata (``migration``): an interrupted run (crash, Ctrl-C,
a server restart) started again resumes from the last finished window instead of
from the start. Memory holds at most ``window x page_size`` points.

What is copied: every point's 512D vector (the 128D prefix is recomputed from it,
exactly as on any upsert), its whole payload (labels, pseudo-labels, statuses,
``embedding_version``...), the collection's metadata (the embedding version, the
labeling run registry) and the payload indexes made beyond the schema's. Point ids
are the same (UUIDv5 of the caller's id). The target collection is created with
``spec`` (shards and replicas on a cluster), or must already have the same vector layout.

A copy, not a sync: points changed in the source after they were copied are not
copied again, and a finished migration is not re-run (``restart=True`` copies
everything again; upserts are idempotent, so that is safe).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.base import VectorStore
from retrieval.errors import InvalidInputError
from retrieval.schema import CollectionSpec

MIGRATION_KEY = "migration"


@dataclass
class MigrationReport:
    collection: str
    target_collection: str
    copied: int  # points written by this run
    total: int  # points in the target at the end
    resumed: bool  # whether this run continued an interrupted one
    pages: int
    already_done: bool = False  # a finished copy was found: nothing was read (a copy, not a sync: --restart)


def migrate(
    source: VectorStore,
    target: VectorStore,
    collection: str,
    *,
    target_collection: str | None = None,
    spec: CollectionSpec | None = None,
    page_size: int = 1024,
    workers: int = 4,
    window: int | None = None,
    restart: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MigrationReport:
    """Copy ``collection`` from ``source`` to ``target`` (see the module docstring); returns a report.

    ``progress(copied_so_far, source_total)`` is called after every window; ``restart`` ignores a
    saved checkpoint and copies from the start.
    """
    if source is target:
        raise InvalidInputError("source and target are the same store")
    if not 1 <= workers <= 64:
        raise InvalidInputError(f"workers must be in 1..64, got {workers}")
    if not 1 <= page_size <= 100_000:
        raise InvalidInputError(f"page_size must be in 1..100000, got {page_size}")
    dest = target_collection or collection
    total = source.count(collection)  # also: a missing source collection fails here, before anything is written
    target.ensure_collection(dest, spec)
    # payload indexes made beyond the schema's (e.g. `embedstore store index source`): facets and filters on
    # them must work on the target too
    have = target.collection_info(dest).payload_indexes
    for key, kind in source.collection_info(collection).payload_index_kinds.items():
        if key not in have and kind != "other":
            target.create_payload_index(dest, key, kind)
    meta = target.collection_metadata(dest)
    state = meta.get(MIGRATION_KEY) or {}
    resumed = False
    offset: str | None = None
    copied_before = 0
    if state and not restart:
        if state.get("source_collection") != collection:
            raise InvalidInputError(
                f"target collection {dest!r} holds a migration of {state.get('source_collection')!r}, "
                f"not {collection!r}; pass restart=True (--restart) to start over"
            )
        if state.get("done"):
            n = target.count(dest)
            return MigrationReport(collection, dest, 0, n, False, 0, already_done=True)
        offset = state.get("next_offset")
        copied_before = int(state.get("copied", 0))
        resumed = offset is not None
    # the source's metadata (embedding version, labeling runs) first: a half-copied collection already
    # refuses vectors of another embedding version
    source_meta = source.collection_metadata(collection)
    if source_meta:
        target.update_collection_metadata(dest, {k: v for k, v in source_meta.items() if k != MIGRATION_KEY})
    window = window or workers
    copied = 0
    pages = 0

    def write(page: tuple[list[str], np.ndarray, list[dict[str, Any]]]) -> int:
        ids, vectors, payloads = page
        return target.upsert(dest, ids, vectors, payloads)

    with ThreadPoolExecutor(workers, thread_name_prefix="migrate") as pool:
        finished = False
        while not finished:
            batch: list[tuple[list[str], np.ndarray, list[dict[str, Any]]]] = []
            while len(batch) < window:
                page = source.scroll(collection, limit=page_size, offset=offset, with_vectors="full512")
                if page.records:
                    batch.append(
                        (
                            [r.id for r in page.records],
                            np.stack([np.asarray(r.vector, np.float32) for r in page.records]),
                            [dict(r.payload or {}) for r in page.records],
                        )
                    )
                offset = page.next_offset
                if offset is None:
                    finished = True
                    break
            copied += sum(pool.map(write, batch))  # all pages of the window, in parallel; raises on failure
            pages += len(batch)
            target.update_collection_metadata(
                dest,
                {
                    MIGRATION_KEY: {
                        "source_collection": collection,
                        "next_offset": offset,
                        "copied": copied_before + copied,
                        "done": finished,
                    }
                },
            )
            if progress is not None:
                progress(copied_before + copied, total)
    target.flush()
    return MigrationReport(collection, dest, copied, target.count(dest), resumed, pages)
