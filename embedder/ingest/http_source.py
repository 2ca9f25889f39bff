"""Ingest items from a paginated JSON API through the shared key pool, resumably.

The API: ``GET url`` returns a JSON object with a list of items under
``items_key`` and the next page under ``next_key`` (an absolute or relative URL,
or a cursor token sent back as ``?<cursor_param>=``; missing/null = last page).
``next_is`` says which: ``auto`` (default) reads ``http(s)://...``, ``/...`` and
``?...`` as URLs and anything else as a token; ``url`` or ``cursor`` force one.
A chain that comes back to a cursor it already read in the run, or serves the
same items twice in a row (a server ignoring the cursor), stops with an error
naming the page instead of reading it forever.
An item has an id, a text, an image (``image_url`` fetched over HTTP, or
``image_base64``), an optional label and a metadata object; field names are
configurable.

Every page request leases a key (``Authorization: Bearer <key>`` by default) and
reports the answer to the pool. The key goes only to the origins (scheme, host,
port) of the source's ``url`` and ``shards``, plus any listed in ``key_origins``:
a ``next`` URL, an image URL or a redirect elsewhere is fetched without it (an
item's image URL is often whoever submitted the item's to choose), and only the
answers of those origins count against a key's health. Redirects are followed
by hand so that the rule holds on every hop (httpx drops only ``Authorization``
on a cross-origin redirect, not a custom ``auth_header``). A 429/403/401 puts
that key aside and the request goes out again at once with another (the pool waits for a cooldown when
every key is cooling, then raises ``NoHealthyKey``). Transport errors and 5xx
are retried with tenacity's full-jitter exponential backoff, a bounded number
of times. Other 4xx stop the run, naming the URL and status.

Resumable: after a page's items are embedded and upserted, the next cursor is
checkpointed in Redis (``{embedstore:ingest:<name>}:state``). A crash re-reads
at most the page in flight, and since points are keyed by item id a
re-ingested item overwrites itself: nothing is ever stored twice.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urljoin

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from embedder.indexing import reserved_payload_keys
from embedder.ingest.keypool import (
    KeyPool,
    KeyPoolError,
    KeyPoolUnavailable,
    LeaseCancelled,
    NoHealthyKey,
    UnknownKey,
    call_redis,
    safe_url,
)
from embedder.model import Item

log = logging.getLogger("embedstore.ingest")


MAX_REDIRECTS = 10


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what a key is bound to."""
    u = httpx.URL(url)
    return u.scheme, u.host.lower(), u.port or {"http": 80, "https": 443}.get(u.scheme)


class IngestError(Exception):
    """An ingest run stopped; the message names the URL, status or item."""


class _Transient(Exception):
    """A retryable failure (transport error, 5xx)."""


class HttpSourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str
    #: More start URLs, one independent page chain each (e.g. one per category or date range):
    #: ``shard_workers`` threads walk them concurrently, sharing one key pool; each has its own checkpoint.
    shards: dict[str, str] = Field(default_factory=dict)
    shard_workers: int = Field(4, ge=1, le=64)
    pool: str | None = None  # key pool name; None = no auth
    items_key: str = "items"
    next_key: str = "next"
    #: how ``next_key`` is read: "auto" (a URL if it starts with http(s)://, / or ?, else a token), "url", "cursor"
    next_is: Literal["auto", "url", "cursor"] = "auto"
    cursor_param: str = "cursor"
    id_field: str = "id"
    text_field: str = "text"
    image_url_field: str = "image_url"
    image_b64_field: str = "image_base64"
    label_field: str = "label"
    metadata_field: str = "metadata"
    auth_header: str = "Authorization"
    auth_prefix: str = "Bearer "
    image_auth: bool = False  # send the key with image downloads too (to the key's origins only)
    #: More origins (``https://cdn.example.com``) the key may be sent to, besides those of ``url`` and ``shards``.
    key_origins: list[str] = Field(default_factory=list)

    @field_validator("key_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            try:
                u = httpx.URL(origin)
            except httpx.InvalidURL as exc:
                raise ValueError(f"{origin!r} is not an origin: {exc}") from None
            if u.scheme not in ("http", "https") or not u.host or u.path not in ("", "/") or u.query:
                raise ValueError(f"{origin!r} is not an origin such as https://cdn.example.com (scheme, host, port)")
        return value

    timeout_s: float = Field(30.0, gt=0)  # per socket operation (connect, each read)
    #: a whole answer (headers and body) must arrive within this; a slow drip is retried like a timeout
    request_deadline_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=50)
    retry_cap_s: float = Field(30.0, gt=0)
    key_wait_s: float = Field(60.0, ge=0)  # how long a request waits for a cooling key
    max_key_rotations: int = Field(50, ge=1)  # 429/403/401 answers tolerated for one request
    workers: int = Field(4, ge=1, le=64)  # concurrent image downloads
    #: empty pages in a row (each with a next cursor) before the walk stops: such a chain was read forever
    max_empty_pages: int = Field(100, ge=1)


class Checkpoint:
    """The source's resume point in Redis: the next cursor, pages and items done, whether it finished."""

    def __init__(self, client: Any, name: str, url: str = "", *, scope: str = "") -> None:
        """``scope`` names where the items go and where they come from (store, collection, start URL): the
        same source ingested into another collection or store, or from an edited URL, has its own resume
        point; keyed by the name alone, a second target was skipped as "already ingested"."""
        self.r = client
        self.scope = scope
        tag = hashlib.sha256(scope.encode()).hexdigest()[:12] if scope else ""
        self.key = f"{{embedstore:ingest:{name}}}:{tag + ':' if tag else ''}state"
        self.url = safe_url(url) if url else ""  # for messages: never the password

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return call_redis(self.url or "the configured URL", "cannot read or save the ingest checkpoint", fn, *args)

    def load(self) -> dict[str, str]:
        raw = self._call(self.r.hgetall, self.key)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def save(self, cursor: str | None, items: int) -> None:
        pipe = self.r.pipeline()
        if cursor is None:
            pipe.hset(self.key, mapping={"done": 1, "updated_at": time.time()}).hdel(self.key, "cursor")
        else:
            pipe.hset(self.key, mapping={"cursor": cursor, "done": 0, "updated_at": time.time()})
        pipe.hincrby(self.key, "pages", 1).hincrby(self.key, "items", items)
        self._call(pipe.execute)

    def reset(self) -> None:
        self._call(self.r.delete, self.key)


@dataclass
class Page:
    url: str
    items: list[Item]
    bad: list[tuple[str, str]]  # (item id, why)
    next_cursor: str | None


@dataclass
class IngestReport:
    pages: int = 0
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    resumed_from: str | None = None
    already_done: bool = False
    #: the checkpoint had progress but the collection is gone or empty (a deleted or restored store): read again
    stale_checkpoint: bool = False


class HttpSource:
    def __init__(
        self,
        config: HttpSourceConfig,
        *,
        pool: KeyPool | None,
        checkpoint: Checkpoint,
        client: httpx.Client | None = None,
        start_url: str | None = None,
        shard: str = "main",
    ) -> None:
        if config.pool is not None and pool is None:
            raise IngestError(f"source {config.name!r} names key pool {config.pool!r} but no pool was given")
        self.config = config
        self.pool = pool
        self.checkpoint = checkpoint
        self.start_url = start_url or config.url
        self.shard = shard
        self.http = client or httpx.Client(timeout=config.timeout_s)
        #: set to stop: waits for a key or a retry end at once, and no further page is fetched
        self.cancel: threading.Event | None = None
        self._key_origins = {_origin(u) for u in (config.url, *config.shards.values(), *config.key_origins)}
        self._warned: set[tuple[str, str, int | None]] = set()

    def shard_sources(self) -> list[HttpSource]:
        """This source and one more per configured shard, each with its own checkpoint (same pool, same client)."""
        out = [self]
        for shard, url in sorted(self.config.shards.items()):
            cp = Checkpoint(
                self.checkpoint.r, f"{self.config.name}.{shard}", self.checkpoint.url, scope=self.checkpoint.scope
            )
            out.append(
                HttpSource(self.config, pool=self.pool, checkpoint=cp, client=self.http, start_url=url, shard=shard)
            )
        return out

    # ------------------------------------------------------------------ requests
    def key_allowed(self, url: str) -> bool:
        """Whether the pool's key may be sent to ``url``: its origin is the source's, a shard's or listed."""
        return _origin(url) in self._key_origins

    def _send(self, url: str, params: dict[str, str] | None, secret: str | None) -> tuple[httpx.Response, bool]:
        """GET ``url``, following redirects by hand so that the key goes to allowed origins only, on every hop.
        Returns the answer and whether its request carried the key."""
        cfg = self.config
        for _ in range(MAX_REDIRECTS + 1):
            with_key = secret is not None and self.key_allowed(url)
            if secret is not None and not with_key and _origin(url) not in self._warned:
                self._warned.add(_origin(url))
                log.warning("source %s: %s is not one of the key's origins: fetched without the key", cfg.name, url)
            headers = {cfg.auth_header: cfg.auth_prefix + secret} if with_key and secret is not None else {}
            try:
                r = self._get_within_deadline(url, params, headers)
            except (httpx.TransportError, httpx.DecodingError) as exc:  # a body that lies about its gzip: retried
                raise _Transient(f"{type(exc).__name__} on {url}") from exc
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise IngestError(f"{url}: {type(exc).__name__}: {exc}") from None
            if not (r.is_redirect and "location" in r.headers):
                return r, with_key
            url, params = urljoin(str(r.url), r.headers["location"]), None
        raise IngestError(f"more than {MAX_REDIRECTS} redirects from {url}")

    def _get_within_deadline(self, url: str, params: dict[str, str] | None, headers: dict[str, str]) -> httpx.Response:
        """One GET whose whole answer must arrive within ``request_deadline_s``: httpx's timeout bounds each
        socket read, so a server dripping a byte every 0.2 s held a worker (and its lease) for minutes."""
        deadline = time.monotonic() + self.config.request_deadline_s
        with self.http.stream("GET", url, params=params, headers=headers, follow_redirects=False) as streamed:
            raw = bytearray()
            for chunk in streamed.iter_raw():
                raw += chunk
                if time.monotonic() > deadline:
                    raise _Transient(
                        f"{url}: no whole answer within {self.config.request_deadline_s:g}s (request_deadline_s)"
                    )
        # the raw bytes, decoded by the new response as its headers say (gzip, ...), as a plain get() does
        answer = httpx.Response(
            streamed.status_code, headers=streamed.headers, content=bytes(raw), request=streamed.request
        )
        answer.read()
        return answer

    def _sleep(self, seconds: float) -> None:
        """A retry's back-off, cut short when the run is stopping."""
        if self.cancel is None:
            time.sleep(seconds)
        elif self.cancel.wait(seconds):
            raise LeaseCancelled(f"source {self.config.name!r}: stopped while waiting to retry")

    def _report(self, key_id: str, status: int, headers: Any) -> None:
        """The answer's verdict on the key; a key removed meanwhile (``keys remove``, a Redis that lost its data)
        is passed over: its answer is used all the same (it stopped the run, though the request had succeeded)."""
        try:
            self.pool.report(key_id, status, headers)  # type: ignore[union-attr]
        except UnknownKey:
            log.warning("key %s left pool %s during a request (removed, or Redis lost its data)", key_id, self.pool)

    def _once(self, url: str, *, params: dict[str, str] | None, keyed: bool, image: bool = False) -> httpx.Response:
        """One request, rotating keys on 429/403/401; raises _Transient for transport errors and 5xx."""
        cfg = self.config
        refused_by: str | None = None  # a key this request got a 401 with
        for _ in range(cfg.max_key_rotations):
            # no lease for a URL the key may not go to: its answers say nothing about the key's health
            keyed_here = keyed and self.pool is not None and self.key_allowed(url)
            try:
                lease = self.pool.lease(wait=cfg.key_wait_s, cancel=self.cancel) if keyed_here else None  # type: ignore[union-attr]
            except NoHealthyKey as exc:  # named with the source and the request it stopped
                raise NoHealthyKey(f"source {cfg.name!r}, {url}: {exc}", exc.next_free) from None
            r, sent = self._send(url, params, lease.secret if lease is not None else None)
            status = r.status_code
            # an image's 401/403 is about the image (a private or missing object), not the key: only its 429
            # speaks of the key (one 403 image cooled every key in the pool, and the run stopped)
            about_key = status == 429 or (status in (401, 403) and not image)
            if lease is not None and sent and (about_key or status not in (401, 403)):
                if status == 401 and refused_by is not None:
                    # a second key refused on the same request: the request is the likely cause (a wrong
                    # auth_header, a proxy answering 401), so this key is left active and the run stops, rather
                    # than walk the shared pool deactivating every key
                    raise IngestError(
                        f"{url}: two keys in a row were refused (401): the request rather than the keys is the likely "
                        f"cause (auth_header={cfg.auth_header!r}, auth_prefix={cfg.auth_prefix!r}, the URL); key "
                        f"{refused_by} was deactivated by the first answer: `embedstore keys enable "
                        f"{cfg.pool} {refused_by}` once the cause is fixed"
                    )
                self._report(lease.key_id, status, r.headers)
                if about_key:
                    if status == 401:
                        refused_by = lease.key_id
                    log.info("key %s got %d on %s: trying another key", lease.key_id, status, url)
                    continue
            if r.status_code >= 500:
                raise _Transient(f"HTTP {r.status_code} from {url}")
            if r.status_code >= 400:
                raise IngestError(f"HTTP {r.status_code} from {url}: {r.text[:200]!r}")
            return r
        raise IngestError(f"{url}: {cfg.max_key_rotations} answers of 401/403/429 in a row; giving up on this request")

    def get(
        self, url: str, *, params: dict[str, str] | None = None, keyed: bool = True, image: bool = False
    ) -> httpx.Response:
        """GET with key rotation and retries; ``image``: an image download, whose 401/403 does not count against
        the key (the run skips the item instead)."""
        cfg = self.config
        try:
            for attempt in Retrying(
                retry=retry_if_exception_type(_Transient),
                wait=wait_random_exponential(multiplier=0.5, max=cfg.retry_cap_s),
                stop=stop_after_attempt(cfg.max_attempts),
                sleep=self._sleep,
                reraise=True,
            ):
                with attempt:
                    return self._once(url, params=params, keyed=keyed, image=image)
        except _Transient as exc:
            raise IngestError(f"{exc}; gave up after {cfg.max_attempts} attempts") from exc
        raise AssertionError("unreachable")

    # --------------------------------------------------------------------- pages
    def _page_url(self, cursor: str | None) -> tuple[str, dict[str, str] | None]:
        if cursor is None:
            return self.start_url, None
        is_url = self.config.next_is == "url" or (
            self.config.next_is == "auto" and cursor.startswith(("http://", "https://", "/", "?"))
        )
        try:
            if is_url:
                url = urljoin(self.start_url, cursor)
                httpx.URL(url)  # a malformed one is named here, with the page that gave it
                return url, None
            # merged into the start URL's own query (httpx's ``params=`` would replace it)
            return str(httpx.URL(self.start_url).copy_merge_params({self.config.cursor_param: cursor})), None
        except (httpx.InvalidURL, ValueError) as exc:
            raise IngestError(
                f"source {self.config.name!r}: the next page {cursor!r} is not a usable URL or cursor ({exc})"
            ) from None

    def _item(self, raw: dict[str, Any], images: dict[str, bytes | Exception]) -> Item:
        cfg = self.config
        pid = str(raw[cfg.id_field])
        image: bytes | None = None
        b64 = raw.get(cfg.image_b64_field)
        if b64:
            try:
                image = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"{cfg.image_b64_field} is not valid base64") from exc
        elif raw.get(cfg.image_url_field):
            got = images[pid]
            if isinstance(got, Exception):
                raise ValueError(f"image download failed: {got}")
            image = got
        meta = raw.get(cfg.metadata_field)
        payload = dict(meta) if isinstance(meta, dict) else {}
        clash = sorted(k for k in payload if k in reserved_payload_keys())
        if clash:  # the API's data may not forge the system's own fields (pseudo_status, image_uri, ...)
            raise ValueError(f"{cfg.metadata_field} sets {clash}: the system writes those fields itself")
        if raw.get(cfg.image_url_field):  # absolute, so reindex can fetch it again without this source's config
            payload["image_uri"] = urljoin(self.start_url, str(raw[cfg.image_url_field]))
        label = raw.get(cfg.label_field)
        text = raw.get(cfg.text_field)
        return Item(
            id=pid,
            image=image,
            text=str(text) if text not in (None, "") else None,
            label=None if label in (None, "") else str(label),
            payload=payload,
        )

    def _download(self, url: str) -> bytes | Exception:
        try:
            return self.get(urljoin(self.start_url, url), keyed=self.config.image_auth, image=True).content
        except (IngestError, KeyPoolError) as exc:
            if isinstance(exc, (KeyPoolUnavailable, LeaseCancelled)):
                raise  # not the item's fault: it must not be listed as bad and passed by the checkpoint
            return exc

    def fetch(self, cursor: str | None) -> Page:
        """One page: its items (images downloaded by ``workers`` threads) and the items that could not be read."""
        cfg = self.config
        url, params = self._page_url(cursor)
        response = self.get(url, params=params)
        try:
            body = response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise IngestError(
                f"{response.request.url}: answered {response.status_code} with a body that is not JSON ({kind}, "
                f"{len(response.content)} bytes, starting {response.text[:60]!r})"
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get(cfg.items_key), list):
            raise IngestError(f"{url}: the answer has no list under {cfg.items_key!r}")
        raws = body[cfg.items_key]
        bad: list[tuple[str, str]] = []
        ok_raws = []
        first_at: dict[str, int] = {}
        for n, raw in enumerate(raws):
            if not isinstance(raw, dict) or raw.get(cfg.id_field) in (None, ""):
                bad.append((f"{url}#{n}", f"item {n} has no {cfg.id_field!r}"))
                continue
            pid = str(raw[cfg.id_field])
            if pid in first_at:  # the first copy is kept; a repeat stopped every run at this page, for good
                bad.append((pid, f"item {n} repeats the id of item {first_at[pid]} on this page; the first is kept"))
                continue
            first_at[pid] = n
            ok_raws.append(raw)
        wanted = {
            str(r[cfg.id_field]): str(r[cfg.image_url_field])
            for r in ok_raws
            if r.get(cfg.image_url_field) and not r.get(cfg.image_b64_field)
        }
        images: dict[str, bytes | Exception] = {}
        if wanted:
            with ThreadPoolExecutor(min(cfg.workers, len(wanted))) as downloads:
                for pid, got in zip(wanted, downloads.map(self._download, wanted.values()), strict=True):
                    images[pid] = got
        items = []
        for raw in ok_raws:
            try:
                items.append(self._item(raw, images))
            except ValueError as exc:
                bad.append((str(raw[cfg.id_field]), str(exc)))
        nxt = body.get(cfg.next_key)
        return Page(url, items, bad, None if nxt in (None, "") else str(nxt))

    def pages(self, *, restart: bool = False) -> Iterator[Page]:
        """Pages from the checkpoint on (or from the start). Call :meth:`commit` after storing each one."""
        if restart:
            self.checkpoint.reset()
        state = self.checkpoint.load()
        if state.get("done") == "1":
            return
        cursor = state.get("cursor")
        seen: set[str | None] = {cursor}
        last_ids: list[str] = []
        empty = 0
        while True:
            if self.cancel is not None and self.cancel.is_set():
                return
            page = self.fetch(cursor)
            ids = [it.id for it in page.items] + [pid for pid, _ in page.bad]
            empty = 0 if ids else empty + 1
            if empty > self.config.max_empty_pages:
                raise IngestError(
                    f"{page.url}: {empty} empty pages in a row, each with a new next cursor: stopping instead of "
                    "reading such a chain forever (max_empty_pages)"
                )
            if ids and ids == last_ids:
                raise IngestError(
                    f"{page.url}: served the same {len(ids)} items as the page before it: the server does not "
                    f"read the cursor {cursor!r} as sent (next_is={self.config.next_is!r}, "
                    f"cursor_param={self.config.cursor_param!r}); stopping instead of reading it forever"
                )
            yield page
            if page.next_cursor is None:
                return
            if page.next_cursor in seen:
                raise IngestError(
                    f"{page.url}: the next page {page.next_cursor!r} was already read in this run (a cycle); "
                    "stopping instead of reading it forever"
                )
            seen.add(page.next_cursor)
            last_ids = ids
            cursor = page.next_cursor

    def commit(self, page: Page, written: int) -> None:
        self.checkpoint.save(page.next_cursor, written)


def ingest_http(
    source: HttpSource,
    store: Any,
    collection: str,
    embedder: Any,
    *,
    skip_bad: bool = False,
    restart: bool = False,
    progress: bool = False,
    on_page: Callable[[Page], None] | None = None,
) -> IngestReport:
    """Pages -> embed -> upsert -> checkpoint, until every shard's chain ends.

    Shards are walked by ``shard_workers`` threads at once (page fetches and image downloads
    overlap, all leasing from the one key pool); embedding and upserting are serialised.
    Bad items fail the run or, with ``skip_bad``, are listed in the report; never silently dropped.
    """
    from embedder.indexing import index_items

    shards = source.shard_sources()
    stop = threading.Event()
    for s in shards:
        s.cancel = stop  # Ctrl-C (or a failed shard) ends the others' waits at once, not after a cooldown
    report = IngestReport()
    states = {s.shard: (s.checkpoint.load() if not restart else {}) for s in shards}
    if any(states.values()) and not (store.collection_exists(collection) and store.count(collection) > 0):
        # The checkpoint lives in Redis and outlives the store: resuming (or "already ingested") would write
        # nothing into a collection that no longer holds anything
        restart, report.stale_checkpoint = True, True
        states = {s.shard: {} for s in shards}
    report.resumed_from = states["main"].get("cursor")
    report.already_done = all(st.get("done") == "1" for st in states.values())
    write_lock = threading.Lock()
    bar: Any = None
    task: Any = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task(f"ingesting {source.config.name}", total=None)

    def walk(src: HttpSource) -> None:
        for page in src.pages(restart=restart):
            if stop.is_set():
                return
            if page.bad and not skip_bad:
                pid, why = page.bad[0]
                raise IngestError(
                    f"{page.url}: item {pid}: {why} ({len(page.bad)} bad on this page; --skip-bad skips and lists them)"
                )
            with write_lock:
                report.skipped.extend(page.bad)
                written = 0
                if page.items:
                    done = index_items(store, collection, embedder, page.items, skip_bad=skip_bad)
                    report.skipped.extend(done.skipped)
                    written = done.written
                src.commit(page, written)
                report.pages += 1
                report.written += written
                if bar is not None:
                    bar.update(
                        task, advance=written, description=f"ingesting {source.config.name}: {report.pages} pages"
                    )
                if on_page is not None:
                    on_page(page)

    try:
        if len(shards) == 1:
            walk(shards[0])
        else:
            with ThreadPoolExecutor(min(source.config.shard_workers, len(shards))) as ex:
                futures = [ex.submit(walk, s) for s in shards]
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    stop.set()  # the other shards stop after their page in flight
                    raise
    finally:
        if bar is not None:
            bar.stop()
    return report
