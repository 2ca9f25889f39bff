"""Items into the store and queries against it, with the embedding version enforced.

A collection's vectors are only comparable if one projection made them all.
The first embedder write records the projection's version in the collection
metadata (``embedding_version``) and every point records it in its payload;
writing or searching with another version raises
:class:`EmbeddingVersionMismatchError` (FAILED_PRECONDITION over gRPC) until
:func:`reindex` has re-embedded the collection.

Payload written per item: ``label`` (+ ``label_source``, default ``human``,
when the item has a label), ``text``, ``image_uri`` (when the image came from a
path), ``embedding_version``, and the item's own payload fields.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from embedder.errors import EmbeddingVersionMismatchError, InvalidItemError, _ItemError
from embedder.model import Embedder, Item, check_items
from retrieval import CollectionSpec, FilterLike, Hit, VectorStore

VERSION_KEY = "embedding_version"
SOURCE_KEY = "embedded_from"
#: collection metadata beside the version: how many labels the projection was fitted on, which a labeling job
#: reads to warn that its calibration is optimistic (``labeling.job.PROJECTION_LABELS_KEY``, same name)
PROJECTION_LABELS_KEY = "projection_labels"


def _version_metadata(embedder: Embedder) -> dict[str, Any]:
    n = embedder.projection.training.get("n_labeled", 0) if embedder.projection is not None else 0
    return {VERSION_KEY: embedder.version, PROJECTION_LABELS_KEY: int(n or 0)}


def stored_version(store: VectorStore, collection: str) -> str | None:
    return store.collection_metadata(collection).get(VERSION_KEY)


def require_version(store: VectorStore, collection: str, embedder: Embedder, *, claim: bool = False) -> str:
    """The embedder's version, checked against the collection's (recorded here first when ``claim``)."""
    current = embedder.version
    stored = stored_version(store, collection)
    if stored is None:
        if claim:
            store.update_collection_metadata(collection, _version_metadata(embedder))
        return current
    if stored != current:
        raise EmbeddingVersionMismatchError(collection, stored, current)
    return current


@functools.cache
def reserved_payload_keys() -> frozenset[str]:
    """Payload keys the system writes (ids, versions, image paths, the labeling job's fields): a manifest row or
    an Upsert over gRPC may not set them. Over gRPC they were accepted: one point with a forged
    ``embedding_version`` stopped every labeling job, a forged ``pseudo_status`` showed as accepted."""
    from labeling.runs import PREV_FIELD, PSEUDO_FIELDS
    from retrieval.schema import EXTERNAL_ID_KEY

    return frozenset({EXTERNAL_ID_KEY, VERSION_KEY, SOURCE_KEY, "image_uri", "labeled_at", PREV_FIELD, *PSEUDO_FIELDS})


def item_payload(item: Item, version: str) -> dict[str, Any]:
    """The payload stored with an embedded item: its own fields, label, text, image path, the embedding
    version, and what the vector was made from (``embedded_from``: ``image+text``, ``image`` or ``text``),
    so :func:`reindex` can tell a point it can re-embed as it was from one whose image it never had (bytes)."""
    payload: dict[str, Any] = dict(item.payload)
    if item.label is not None:
        payload["label"] = str(item.label)
        payload.setdefault("label_source", "human")
    if item.has_text:
        payload["text"] = item.text
    if isinstance(item.image, (str, Path)):
        payload.setdefault("image_uri", str(item.image))
    payload[VERSION_KEY] = version
    payload[SOURCE_KEY] = _made_from(item)
    return payload


def _made_from(item: Item) -> str:
    return "+".join(m for m, has in (("image", item.has_image), ("text", item.has_text)) if has)


@dataclass
class IndexReport:
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item id, why)
    #: points whose human answer (given through `label import`, the web page or SubmitLabels) was kept over
    #: the label the item came with
    kept_answers: int = 0
    #: (item id, word pieces) of texts longer than the text model reads: only their beginning is embedded
    truncated: list[tuple[str, int]] = field(default_factory=list)


def index_items(
    store: VectorStore,
    collection: str,
    embedder: Embedder,
    items: Sequence[Item],
    *,
    batch_size: int = 256,
    skip_bad: bool = False,
    progress: bool = False,
    spec: CollectionSpec | None = None,
) -> IndexReport:
    """Embed ``items`` and upsert them (idempotent: same ids, same points).

    All or nothing: every item is checked and embedded before the first write, so a bad item (unreadable
    image, empty item, an id given twice) fails the run naming its position in ``items`` and its id, and
    the store is left as it was, not even a new empty collection created. With ``skip_bad`` a bad item is
    left out and listed in the report instead: never silently dropped. The vectors wait in memory, or in
    a temporary file beyond ``_SPOOL_ITEMS`` items (2 KB an item).
    """
    if store.collection_exists(collection):
        require_version(store, collection, embedder)  # fail before the embedding, not after it
    ids = [getattr(it, "id", None) for it in items]
    _refuse_repeated_ids(ids)
    report = IndexReport()
    kept: list[Item] = []
    with contextlib.ExitStack() as stack:
        vectors: np.ndarray | None = None  # allocated at the first batch, when the width is known
        starts: Any = range(0, len(items), batch_size)
        if progress:
            from rich.progress import track

            starts = track(starts, description=f"embedding {len(items)} items")
        for start in starts:
            batch = list(items[start : start + batch_size])
            if skip_bad:
                batch = _drop_bad(embedder, batch, report)
                if not batch:
                    continue
            try:
                got = embedder.embed(batch)
            except _ItemError as exc:
                # the position in the whole run, not in this batch ("item 24" of a 300-row manifest misleads)
                at = None if exc.index is None or skip_bad else start + exc.index
                raise type(exc)(exc.reason, index=at, item_id=exc.item_id) from None
            overlong = getattr(embedder.text_encoder, "overlong", None)
            if overlong is not None:
                texts = [(it.id, it.text) for it in batch if it.has_text]
                report.truncated += [(texts[i][0], n) for i, n in overlong([t for _, t in texts])]
            if vectors is None:
                vectors = _vector_buffer(len(items), got.shape[1], stack)
            vectors[len(kept) : len(kept) + len(batch)] = got
            kept.extend(batch)
        if vectors is None:
            return report
        existed = store.collection_exists(collection)
        store.ensure_collection(collection, spec)  # spec: shards/replicas when this run creates it
        version = require_version(store, collection, embedder, claim=True)
        writes: Any = range(0, len(kept), batch_size)
        if progress:
            from rich.progress import track

            writes = track(writes, description=f"writing {len(kept)} points to {collection}")
        for start in writes:
            batch = kept[start : start + batch_size]
            payloads = [item_payload(it, version) for it in batch]
            if existed:
                payloads = _keep_labeling(store, collection, batch, payloads, report)
            store.upsert(collection, [it.id for it in batch], np.asarray(vectors[start : start + len(batch)]), payloads)
            report.written += len(batch)
    return report


def _keep_labeling(
    store: VectorStore, collection: str, batch: list[Item], payloads: list[dict[str, Any]], report: IndexReport
) -> list[dict[str, Any]]:
    """Indexing an item again replaces its payload, but not what was learned about it since: the labeling
    runs' fields (``pseudo_*``; the run registry still points at them) and a human answer given through
    embedstore (``labeled_at`` set: `label import`, the web page, SubmitLabels), which is newer than the
    item's own label. Without this, re-running `index` on the same manifest wiped both silently."""
    from labeling.runs import PREV_FIELD, PSEUDO_FIELDS

    old = {r.id: r.payload or {} for r in store.retrieve(collection, [it.id for it in batch], missing_ok=True)}
    out = []
    for item, new in zip(batch, payloads, strict=True):
        before = old.get(item.id)
        if before:
            new = new | {k: before[k] for k in (*PSEUDO_FIELDS, PREV_FIELD) if k in before}
            if before.get("labeled_at") and before.get("label") not in (None, ""):
                if new.get("label") != before["label"]:
                    report.kept_answers += 1
                new |= {k: before[k] for k in ("label", "label_source", "labeled_at") if k in before}
        out.append(new)
    return out


#: beyond this many items the vectors of an index run wait in a temporary file rather than in memory
_SPOOL_ITEMS = 100_000


def _vector_buffer(n: int, dim: int, stack: contextlib.ExitStack) -> np.ndarray:
    if n <= _SPOOL_ITEMS:
        return np.empty((n, dim), np.float32)
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="embedstore-index-"))
    return np.lib.format.open_memmap(Path(folder) / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, dim))


def _refuse_repeated_ids(ids: Sequence[Any]) -> None:
    first: dict[str, int] = {}
    for i, pid in enumerate(ids):
        if pid is None:
            continue  # check_items names an item without an id
        key = str(pid)  # 7 and "7" are one point: the point id is derived from the id's text
        if key in first:
            raise InvalidItemError(
                f"id {pid!r} is also item {first[key]}'s; ids must be unique in a run (the second would "
                "overwrite the first)",
                index=i,
                item_id=pid,
            )
        first[key] = i


def _drop_bad(embedder: Embedder, batch: list[Item], report: IndexReport) -> list[Item]:
    good = []
    for item in batch:
        try:
            check_items([item])
            embedder.check_texts([item])
            embedder.decode([item])
        except InvalidItemError as exc:
            report.skipped.append((item.id, exc.reason))  # the id is the key; "item 0" would mislead
            continue
        good.append(item)
    return good


def search_items(
    store: VectorStore,
    collection: str,
    embedder: Embedder,
    query: Item | str,
    *,
    top_k: int = 10,
    filter: FilterLike = None,
    **kw: Any,
) -> list[Hit]:
    """Neighbours of a query item (or text) in ``collection``, refused on a version mismatch."""
    require_version(store, collection, embedder)
    item = Item(id="query", text=query) if isinstance(query, str) else query
    vector = embedder.embed([item])[0]
    return store.search(collection, vector, top_k=top_k, filter=filter, **kw)


@dataclass
class ReindexReport:
    reembedded: int = 0
    already_current: int = 0
    missing_source: list[str] = field(default_factory=list)
    #: (id, why) of points whose stored source could not be read (a moved file, an image URL that fails)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    version: str = ""


def _is_url(uri: object) -> bool:
    return isinstance(uri, str) and uri.startswith(("http://", "https://"))


def _fetcher(client: Any, attempts: int = 3) -> Callable[[str], bytes]:
    """GET an image URL with ``client`` (an httpx.Client), retrying transport errors, 429 and 5xx with
    jittered backoff."""
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    def transient(exc: BaseException) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code == 429 or exc.response.status_code >= 500
        return isinstance(exc, httpx.TransportError)

    def fetch(url: str) -> bytes:
        for attempt in Retrying(
            stop=stop_after_attempt(attempts),
            wait=wait_random_exponential(multiplier=0.5, max=8),
            retry=retry_if_exception(transient),
            reraise=True,
        ):
            with attempt:
                response = client.get(url)
                response.raise_for_status()
                return response.content
        raise AssertionError("unreachable")  # pragma: no cover

    return fetch


def reindex(
    store: VectorStore,
    collection: str,
    embedder: Embedder,
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    fetch: Callable[[str], bytes] | None = None,
) -> ReindexReport:
    """Re-embed every point of ``collection`` with ``embedder`` from its stored ``text`` / ``image_uri``.

    Resumable: points already at the new version are skipped, and the
    collection's version is switched only once every point carries it. Points
    with no stored source cannot be re-embedded; they are listed and the
    version is not switched (delete or re-ingest them, then run again). So are
    points whose vector was made from a modality they have no stored source for
    (``embedded_from``): an image sent as bytes (gRPC ``Upsert``) leaves no
    ``image_uri``, and re-embedding its text alone would silently give it another
    kind of vector than its neighbours'.

    An ``image_uri`` that is an http(s) URL (HTTP ingestion stores the absolute
    URL) is fetched again with ``fetch`` (default: httpx with retries; no API
    key: a source whose images need one cannot be re-fetched here). A point
    whose source cannot be read (a moved file, a failing URL, a corrupt image)
    is listed in ``unreadable`` with the reason, the others go on, and the
    version is not switched.
    """
    version = embedder.version
    report = ReindexReport(version=version)
    pending: list[tuple[str, Item, dict[str, Any]]] = []
    client = httpx.Client(timeout=30.0, follow_redirects=True)  # no connection until the first image URL
    get_url = fetch or _fetcher(client)

    def fetched(batch: list[tuple[str, Item, dict[str, Any]]]) -> list[tuple[str, Item, dict[str, Any]]]:
        """The batch with URL images fetched; points whose fetch fails go to ``unreadable``."""
        good = []
        for pid, item, payload in batch:
            if _is_url(item.image):
                try:
                    item = Item(id=item.id, image=get_url(str(item.image)), text=item.text)
                except Exception as exc:  # any fetch failure: name it and go on
                    report.unreadable.append((pid, f"image {item.image}: {type(exc).__name__}: {exc}"))
                    continue
            good.append((pid, item, payload))
        return good

    def flush() -> None:
        batch = fetched(pending)
        pending.clear()
        while batch:
            try:
                vectors = embedder.embed([p[1] for p in batch])
                break
            except InvalidItemError as exc:  # a file gone or corrupt: list it, embed the rest
                if exc.index is None:
                    raise
                report.unreadable.append((batch[exc.index][0], exc.reason))
                batch = batch[: exc.index] + batch[exc.index + 1 :]
        if not batch:
            return
        payloads = [{**p[2], VERSION_KEY: version, SOURCE_KEY: _made_from(p[1])} for p in batch]
        store.upsert(collection, [p[0] for p in batch], vectors, payloads)
        report.reembedded += len(batch)
        if progress:
            progress(len(batch))

    try:
        for record in store.iter_records(collection, page_size=batch_size, with_payload=True):
            payload = dict(record.payload or {})
            payload.pop("external_id", None)
            if payload.get(VERSION_KEY) == version:
                report.already_current += 1
                continue
            text, uri = payload.get("text"), payload.get("image_uri")
            made_from = str(payload.get(SOURCE_KEY) or "").split("+")  # [""] on points stored before the field
            if (not text and not uri) or ("image" in made_from and not uri) or ("text" in made_from and not text):
                report.missing_source.append(record.id)
                continue
            pending.append((record.id, Item(id=record.id, text=text, image=uri), payload))
            if len(pending) >= batch_size:
                flush()
        flush()
    finally:
        client.close()
    if not report.missing_source and not report.unreadable:
        store.update_collection_metadata(collection, _version_metadata(embedder))
    return report
