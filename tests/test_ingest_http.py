"""HTTP ingestion through the key pool: a real paginated API on loopback, real Redis, real embedder and store."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from PIL import Image

from embedder.ingest import KeyPool, KeyPoolUnavailable
from embedder.ingest.http_source import Checkpoint, HttpSource, HttpSourceConfig, IngestError, ingest_http
from embedder.ingest.redis_server import RedisServer
from embedder.model import Embedder
from tests.conftest import make_edge

PAGE = 4


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def catalog() -> list[dict]:
    items = []
    for i in range(14):
        item: dict = {"id": f"it-{i}", "text": f"item number {i}", "label": "even" if i % 2 == 0 else "odd"}
        if i % 3 == 0:
            item["image_url"] = f"/img/{i}.png"
        elif i % 3 == 1:
            item["image_base64"] = base64.b64encode(png((i * 15, 80, 200))).decode()
        item["metadata"] = {"source": "catalog", "n": i}
        items.append(item)
    items[5]["image_url"] = "/img/missing.png"  # a broken image: a bad item
    items[5].pop("image_base64", None)
    return items


class Catalog(http.server.BaseHTTPRequestHandler):
    state: dict

    def do_GET(self) -> None:
        st = self.state
        parts = urlsplit(self.path)
        if parts.path.startswith("/img/"):
            name = parts.path.rsplit("/", 1)[1].removesuffix(".png")
            if (
                st.get("image_keys")
                and self.headers.get("authorization", "").removeprefix("Bearer ") not in (st["image_keys"])
            ):
                return self._send(401, b"images need a key")
            if not name.isdigit() or name in st.get("gone", ()):
                return self._send(404, b"no such image")
            return self._send(200, png((int(name) * 17 % 255, 120, 30)), "image/png")
        key = self.headers.get("authorization", "").removeprefix("Bearer ")
        with st["lock"]:
            st["calls"].append((key, parts.query))
            if key in st["revoked"]:
                return self._send(401, b"bad key")
            if key in st["limited"] and st["limited"][key] > 0:
                st["limited"][key] -= 1
                return self._send(429, b"slow down", headers={"Retry-After": "1"})
        query = parse_qs(parts.query)
        cursor = 0 if st.get("ignore_cursor") else int(query.get("cursor", ["0"])[0])
        if cursor in st["fail"]:
            return self._send(500, b"boom")
        pool = st["shards"][query["shard"][0]] if "shard" in query else st["items"]
        items = pool[cursor : cursor + PAGE]
        nxt = str(cursor + PAGE) if cursor + PAGE < len(pool) else None
        if nxt is not None and st.get("next_style") == "relative":  # a relative URL, not a token
            nxt = f"items?cursor={nxt}"
        if st.get("next_back_to") is not None and cursor == PAGE:  # page 2 points back to page 1: a cycle
            nxt = st["next_back_to"]
        self._send(200, json.dumps({"items": items, "next": nxt}).encode(), "application/json")

    def _send(self, code, body, ctype="text/plain", headers=None):
        self.send_response(code)
        self.send_header("content-type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def api():
    state = {
        "lock": threading.Lock(),
        "calls": [],
        "revoked": set(),
        "limited": {},
        "fail": set(),
        "items": catalog(),
        "shards": {},
    }
    handler = type("Handler", (Catalog,), {"state": state})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/items", state
    server.shutdown()


@pytest.fixture(scope="module")
def embedder(image_encoder, text_encoder, fitted_projection):
    return Embedder(image_encoder, text_encoder, fitted_projection)


def make_source(url, redis_url, name=None, **cfg):
    name = name or f"src-{uuid.uuid4().hex[:6]}"
    pool = KeyPool(f"pool-{name}", redis_url, secret="")
    config = HttpSourceConfig(name=name, url=url, pool=pool.pool, retry_cap_s=0.05, **cfg)
    checkpoint = Checkpoint(redis.Redis.from_url(redis_url), name, redis_url)
    return HttpSource(config, pool=pool, checkpoint=checkpoint), pool


def page_calls(state) -> list[str]:
    return [q for _, q in state["calls"]]


def test_ingest_all_pages_rotating_keys_and_listing_bad_items(api, redis_server, embedder, tmp_path):
    url, state = api
    source, pool = make_source(url, redis_server.url)
    limited, good, revoked = (pool.add(k) for k in ("limited-key", "good-key", "revoked-key"))
    state["limited"]["limited-key"] = 1
    state["revoked"].add("revoked-key")
    with make_edge(tmp_path / "store") as store:
        report = ingest_http(source, store, "catalog", embedder, skip_bad=True)
        assert report.pages == 4 and report.written == 13
        assert [pid for pid, _ in report.skipped] == ["it-5"] and "image download failed" in report.skipped[0][1]
        assert store.count("catalog") == 13
        rec = store.retrieve("catalog", ["it-3"])[0]
        assert rec.payload["image_uri"] == url.removesuffix("/items") + "/img/3.png"  # absolute: reindex refetches
        assert rec.payload["source"] == "catalog" and rec.payload["n"] == 3  # metadata fields become payload
        assert store.retrieve("catalog", ["it-4"])[0].payload["label"] == "even"
        keys = {k.key_id: k for k in pool.list()}
        assert keys[revoked].state == "deactivated" and keys[limited].failures == 1 and keys[good].successes >= 1
        # finished: a second run fetches nothing; a restart re-reads everything and stores nothing twice
        n_calls = len(state["calls"])
        again = ingest_http(source, store, "catalog", embedder, skip_bad=True)
        assert again.already_done and again.pages == 0 and len(state["calls"]) == n_calls
        ingest_http(source, store, "catalog", embedder, skip_bad=True, restart=True)
        assert store.count("catalog") == 13
        # the checkpoint (in Redis) outlives the store: with the collection gone, "already ingested" wrote nothing
        store.drop_collection("catalog")
        fresh = ingest_http(source, store, "catalog", embedder, skip_bad=True)
        assert fresh.stale_checkpoint and not fresh.already_done and fresh.written == 13
        assert store.count("catalog") == 13


def test_reindex_refetches_image_urls_and_lists_what_it_cannot_redo(
    api, redis_server, embedder, emoji_features, image_encoder, text_encoder, tmp_path
):
    from embedder.indexing import VERSION_KEY, reindex
    from embedder.projection import TrainConfig, fit_projection

    url, state = api
    source, pool = make_source(url, redis_server.url)
    pool.add("good-key")
    sig = embedder.encoder_signatures()
    newer = Embedder(
        image_encoder,
        text_encoder,
        fit_projection(emoji_features, None, TrainConfig(epochs=2, seed=7), encoders=sig, progress=False),
    )
    with make_edge(tmp_path / "store") as store:
        ingest_http(source, store, "catalog", embedder, skip_bad=True)
        state["gone"] = {"6"}  # an image URL that stopped working since the ingest
        report = reindex(store, "catalog", newer)
        by_url = {f"it-{i}" for i in (0, 3, 9, 12)}  # refetched
        text_only = {f"it-{i}" for i in (2, 8, 11)}
        base64_sent = {f"it-{i}" for i in (1, 4, 7, 10, 13)}  # the image came inline: nothing to fetch again
        assert report.reembedded == len(by_url | text_only)
        assert set(report.missing_source) == base64_sent
        assert [pid for pid, _ in report.unreadable] == ["it-6"] and "404" in report.unreadable[0][1]
        versions = {r.id: r.payload[VERSION_KEY] for r in store.iter_records("catalog")}
        assert {pid for pid, v in versions.items() if v == newer.version} == by_url | text_only
        assert store.collection_metadata("catalog")[VERSION_KEY] == embedder.version  # not switched
        # a refetched point got the vector its image + text give with the new projection
        item = source.fetch(None).items[0]
        assert item.id == "it-0"
        got = store.retrieve("catalog", ["it-0"], with_vectors=True)[0].vector
        assert float(got @ newer.embed([item])[0]) > 0.999


def test_reindex_fetches_keyed_image_urls_through_the_sources_pool(
    api, redis_server, embedder, emoji_features, tmp_path, monkeypatch
):
    """An API whose images need a key: `reindex` alone cannot fetch them (401, listed), `reindex --source`
    fetches them through the source's key pool, as the ingest did."""
    from typer.testing import CliRunner

    from embedder.cli import app
    from embedder.projection import TrainConfig, fit_projection

    url, state = api
    state["items"] = [it for it in state["items"] if "image_base64" not in it and it["id"] != "it-5"]
    state["image_keys"] = {"good-key"}
    name = f"keyed-{uuid.uuid4().hex[:6]}"
    source, pool = make_source(url, redis_server.url, name=name, image_auth=True)
    pool.add("good-key")
    with make_edge(tmp_path / "store") as store:
        assert ingest_http(source, store, "catalog", embedder).written == len(state["items"])
    newer = fit_projection(
        emoji_features, None, TrainConfig(epochs=2, seed=8), encoders=embedder.encoder_signatures(), progress=False
    )
    newer.save(tmp_path / "newer")
    monkeypatch.setenv("EMBEDSTORE_PROJECTION", str(tmp_path / "newer"))
    monkeypatch.setenv("EMBEDSTORE_REDIS_URL", redis_server.url)
    config = tmp_path / "source.json"
    config.write_text(json.dumps({"name": name, "url": url, "pool": pool.pool, "image_auth": True}))
    runner = CliRunner()
    common = ["reindex", "--path", str(tmp_path / "store"), "-c", "catalog"]
    result = runner.invoke(app, common)
    flat = " ".join(result.output.split())
    assert result.exit_code == 1 and "unreadable it-0" in flat and "401" in flat
    result = runner.invoke(app, [*common, "--source", str(config)])
    assert result.exit_code == 0, result.output
    assert f"version {newer.version}" in " ".join(result.output.split())


def test_a_relative_next_url_is_followed_when_next_is_url(api, redis_server, embedder, tmp_path):
    url, state = api
    state["items"] = [it for it in state["items"] if it["id"] != "it-5"]
    state["next_style"] = "relative"  # "items?cursor=4": no scheme, no leading slash
    source, pool = make_source(url, redis_server.url, next_is="url")
    pool.add("good-key")
    with make_edge(tmp_path / "store") as store:
        report = ingest_http(source, store, "catalog", embedder)
        assert report.pages == 4 and store.count("catalog") == 13
    assert page_calls(state) == ["", "cursor=4", "cursor=8", "cursor=12"]


@pytest.mark.parametrize(
    ("trap", "message"),
    [
        (
            {"ignore_cursor": True},
            r"served the same 4 items as the page before it: the server does not read the cursor",
        ),
        ({"next_back_to": "0"}, r"the next page '4' was already read in this run \(a cycle\)"),
    ],
)
def test_a_chain_that_never_ends_is_stopped_naming_the_page(api, redis_server, embedder, tmp_path, trap, message):
    url, state = api
    state["items"] = [it for it in state["items"] if it["id"] != "it-5"]
    state.update(trap)
    source, pool = make_source(url, redis_server.url)
    pool.add("good-key")
    with make_edge(tmp_path / "store") as store:
        with pytest.raises(IngestError, match=message):
            ingest_http(source, store, "catalog", embedder)
        assert store.count("catalog") == 8 if "next_back_to" in trap else 4  # what it read before the loop
    assert len(state["calls"]) <= 4


def test_a_bad_item_fails_the_run_by_default_naming_it(api, redis_server, embedder, tmp_path):
    url, _ = api
    source, pool = make_source(url, redis_server.url)
    pool.add("good-key")
    with make_edge(tmp_path / "store") as store:
        with pytest.raises(IngestError, match="item it-5: image download failed"):
            ingest_http(source, store, "catalog", embedder)
        assert store.count("catalog") == 4  # the first page only: the failing page wrote nothing
        assert source.checkpoint.load()["cursor"] == "4"


def test_a_crash_resumes_from_the_checkpoint_without_refetching_or_duplicating(api, redis_server, embedder, tmp_path):
    url, state = api
    state["items"] = [it for it in state["items"] if it["id"] != "it-5"]  # no bad item here
    source, pool = make_source(url, redis_server.url, max_attempts=2)
    pool.add("good-key")
    state["fail"].add(8)
    with make_edge(tmp_path / "store") as store:
        with pytest.raises(IngestError, match=r"HTTP 500 .* gave up after 2 attempts"):
            ingest_http(source, store, "catalog", embedder)
        assert source.checkpoint.load()["cursor"] == "8" and store.count("catalog") == 8
        state["fail"].clear()
        report = ingest_http(source, store, "catalog", embedder)
        assert report.resumed_from == "8" and report.written == 5
        calls = page_calls(state)
        assert calls.count("") == 1 and calls.count("cursor=4") == 1  # pages before the crash: read once
        assert store.count("catalog") == 13


def test_redis_killed_mid_run_is_a_clear_error_and_a_rerun_recovers(api, embedder, tmp_path):
    url, state = api
    state["items"] = [it for it in state["items"] if it["id"] != "it-5"]
    server = RedisServer(tmp_path / "redis")
    try:
        source, pool = make_source(url, server.url)
        pool.add("good-key")
        with make_edge(tmp_path / "store") as store:
            with pytest.raises(KeyPoolUnavailable, match="unreachable"):
                ingest_http(source, store, "catalog", embedder, on_page=lambda page: server.stop())
            assert store.count("catalog") == 4
            server.start()  # an empty Redis: keys and checkpoint are gone, nothing is assumed
            pool.add("good-key")
            report = ingest_http(source, store, "catalog", embedder)
            assert report.resumed_from is None and report.written == 13
            assert store.count("catalog") == 13  # the first page was re-read, and overwrote itself
    finally:
        server.stop()


def test_ingest_cli(api, redis_server, fitted_projection, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from embedder.cli import app

    url, _state = api
    fitted_projection.save(tmp_path / "projection")
    monkeypatch.setenv("EMBEDSTORE_PROJECTION", str(tmp_path / "projection"))
    monkeypatch.setenv("EMBEDSTORE_REDIS_URL", redis_server.url)
    name = f"cli-{uuid.uuid4().hex[:6]}"
    KeyPool(f"pool-{name}", redis_server.url, secret="").add("good-key")
    config = tmp_path / "source.json"
    config.write_text(json.dumps({"name": name, "url": url, "pool": f"pool-{name}", "retry_cap_s": 0.05}))
    runner = CliRunner()
    common = ["--path", str(tmp_path / "store"), "-c", "catalog"]
    result = runner.invoke(app, ["ingest", "--source", str(config), *common, "--skip-bad"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "ingested 13 items from 4 pages" in flat and "skipped it-5" in flat
    result = runner.invoke(app, ["ingest", "--source", str(config), *common, "--skip-bad"])
    assert result.exit_code == 0 and "already ingested" in " ".join(result.output.split())
    result = runner.invoke(app, ["ingest", "--source", str(config), *common, "--restart"])
    assert result.exit_code == 2 and "it-5" in result.output  # without --skip-bad the bad item stops the run
    result = runner.invoke(app, ["ingest", "--source", "nonsense", *common])
    assert result.exit_code == 2 and "manifest:PATH" in " ".join(result.output.split())
    # the same source into another collection has its own checkpoint (it was skipped as "already ingested")
    result = runner.invoke(app, ["ingest", "--source", str(config), "--path", str(tmp_path / "store"), "-c", "copy",
                                 "--skip-bad"])  # fmt: skip
    assert result.exit_code == 0 and "ingested 13 items from 4 pages into 'copy'" in " ".join(result.output.split())
    # config mistakes are named with the file, before any model loads
    for content, needle in [("{bad json", "not JSON"), ("[1, 2]", "must be a JSON object"),
                            (json.dumps({"name": name}), "url: Field required")]:  # fmt: skip
        config.write_text(content)
        result = runner.invoke(app, ["ingest", "--source", str(config), *common])
        flat = " ".join(result.output.split())
        assert result.exit_code == 2 and f"source config {config}: " in flat and needle in flat, flat


def test_an_answer_that_is_not_json_names_the_url(redis_server, embedder, tmp_path):
    class Html(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>login page</html>")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/items"
        src, pool = make_source(url, redis_server.url)
        pool.add("k")
        with make_edge(tmp_path) as store, pytest.raises(IngestError) as err:
            ingest_http(src, store, "c", embedder)
        assert url in str(err.value) and "not JSON (text/html" in str(err.value) and "login page" in str(err.value)
    finally:
        server.shutdown()


def _recording_server(routes):
    """A server on its own port (another origin) answering ``routes[path] -> (status, headers, body)`` and
    recording each request's path and X-Api-Key header."""
    seen: list[tuple[str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            seen.append((path, self.headers.get("x-api-key")))
            status, headers, body = routes(path)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", seen


def test_the_key_goes_only_to_the_sources_origins(redis_server, embedder, tmp_path):
    """The raw key went to any host an API page named: an absolute next URL, an item's image URL (with
    image_auth), and, with a custom auth header, through a cross-origin redirect (httpx drops only
    Authorization). Those hosts' answers also counted against the key's health."""
    other, other_url, other_seen = _recording_server(
        lambda path: (
            (200, {"content-type": "image/png"}, png((1, 2, 3)))
            if path == "/img.png"
            else (200, {"content-type": "application/json"}, json.dumps({"items": [], "next": None}).encode())
        )
    )
    page = {"items": [{"id": "a", "text": "x", "image_url": other_url + "/img.png"}], "next": other_url + "/p2"}

    def api_routes(path):
        if path == "/moved":  # the API moved a page to another host
            return 302, {"location": other_url + "/p3"}, b""
        if path == "/moved-here":  # a same-origin redirect keeps the key
            return 302, {"location": "/items"}, b""
        return 200, {"content-type": "application/json"}, json.dumps(page).encode()

    api, api_url, api_seen = _recording_server(api_routes)
    try:
        for start in ("/items", "/moved", "/moved-here"):
            other_seen.clear()
            src, pool = make_source(
                api_url + start, redis_server.url, auth_header="X-Api-Key", auth_prefix="", image_auth=True
            )
            key_id = pool.add("RAW-KEY-123")
            with make_edge(tmp_path / start.strip("/")) as store:
                ingest_http(src, store, "c", embedder)
            assert other_seen and all(key is None for _, key in other_seen), other_seen  # never the key
            assert api_seen[-1] == ("/items", "RAW-KEY-123") or start == "/moved"  # the API's own origin has it
            assert pool.list()[0].key_id == key_id
        # listed origins get it: an image CDN that needs the key
        other_seen.clear()
        src, pool = make_source(
            api_url + "/items",
            redis_server.url,
            auth_header="X-Api-Key",
            auth_prefix="",
            image_auth=True,
            key_origins=[other_url],
        )
        pool.add("RAW-KEY-456")
        with make_edge(tmp_path / "cdn") as store:
            ingest_http(src, store, "c", embedder)
        assert ("/img.png", "RAW-KEY-456") in other_seen
        with pytest.raises(ValueError, match="not an origin"):
            HttpSourceConfig(name="x", url=api_url, key_origins=[other_url + "/path"])
    finally:
        api.shutdown()
        other.shutdown()


def test_hostile_or_broken_answers_stop_or_skip_cleanly(redis_server, embedder, tmp_path):
    """From an ingest walk-through: a page repeating an id stopped every run there for good (--skip-bad did not
    help, no page named); an item's metadata could set pseudo_status or image_uri; a source whose every request
    got 401 deactivated the whole shared pool; one 403 image cooled every key; empty pages with a new cursor
    were read forever; a key removed mid-request stopped a run whose request had succeeded."""
    pages = {
        "/dup": {"items": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}]},
        "/forged": {"items": [{"id": "f", "text": "x", "metadata": {"pseudo_status": "accepted", "ok": 1}}]},
        "/img403": {"items": [{"id": "i", "text": "x", "image_url": "/private.png"}, {"id": "j", "text": "y"}]},
    }

    def routes(path):
        if path == "/private.png":
            return 403, {}, b"forbidden"
        if path == "/locked":
            return 401, {}, b"who are you"
        if path.startswith("/empty"):  # an empty page pointing at yet another empty page
            n = int(path.removeprefix("/empty") or 0)
            return (
                200,
                {"content-type": "application/json"},
                json.dumps({"items": [], "next": f"/empty{n + 1}"}).encode(),
            )
        return 200, {"content-type": "application/json"}, json.dumps(pages[path] | {"next": None}).encode()

    server, url, _ = _recording_server(routes)
    try:
        with make_edge(tmp_path / "s") as store:
            src, pool = make_source(url + "/dup", redis_server.url)
            pool.add("k1")
            with pytest.raises(IngestError, match=r"/dup: item a: item 2 repeats the id of item 0"):
                ingest_http(src, store, "c", embedder)
            report = ingest_http(src, store, "c", embedder, skip_bad=True)
            assert report.written == 2 and [pid for pid, _ in report.skipped] == ["a"]
            assert store.retrieve("c", ["a"])[0].payload["text"] == "x"  # the first copy

            src, pool = make_source(url + "/forged", redis_server.url)
            pool.add("k1")
            report = ingest_http(src, store, "c", embedder, skip_bad=True)
            assert report.written == 0 and "sets ['pseudo_status']" in report.skipped[0][1]

            src, pool = make_source(url + "/img403", redis_server.url, image_auth=True)
            for k in ("k1", "k2", "k3"):
                pool.add(k)
            report = ingest_http(src, store, "c", embedder, skip_bad=True)
            assert report.written == 1 and "403" in report.skipped[0][1]
            assert {k.state for k in pool.list()} == {"active"} and all(k.cooldown_until is None for k in pool.list())

            src, pool = make_source(url + "/locked", redis_server.url)
            for k in ("k1", "k2", "k3", "k4"):
                pool.add(k)
            with pytest.raises(IngestError, match="two keys in a row were refused"):
                ingest_http(src, store, "c", embedder)
            assert sorted(k.state for k in pool.list()) == ["active", "active", "active", "deactivated"]

            src, pool = make_source(url + "/empty", redis_server.url, max_empty_pages=5)
            pool.add("k1")
            with pytest.raises(IngestError, match="6 empty pages in a row"):
                ingest_http(src, store, "c", embedder)

            src, pool = make_source(url + "/dup", redis_server.url)
            src._report("k_gone", 200, {})  # a key removed while its request was out: logged, not fatal
    finally:
        server.shutdown()


def test_a_dripping_answer_is_cut_at_the_request_deadline(redis_server, embedder, tmp_path):
    """httpx's timeout bounds each read: a server sending one byte every 0.2 s took 80 s against timeout_s 2."""
    import time

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            for byte in b'{"items": [], "next": null}':
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/items"
        src, pool = make_source(url, redis_server.url, timeout_s=2, request_deadline_s=0.5, max_attempts=1)
        pool.add("k")
        t0 = time.monotonic()
        with make_edge(tmp_path) as store, pytest.raises(IngestError, match=r"no whole answer within 0.5s"):
            ingest_http(src, store, "c", embedder)
        assert time.monotonic() - t0 < 2.5  # the drip alone takes 2.7 s
    finally:
        server.shutdown()


def test_shards_are_walked_concurrently_sharing_one_pool(api, redis_server, embedder, tmp_path):
    url, state = api
    state["items"] = [it for it in state["items"] if it["id"] != "it-5"]
    for shard in ("a", "b"):
        state["shards"][shard] = [{"id": f"{shard}-{i}", "text": f"{shard} thing {i}"} for i in range(9)]
    source, pool = make_source(
        url, redis_server.url, shards={"a": f"{url}?shard=a", "b": f"{url}?shard=b"}, shard_workers=3
    )
    ids = [pool.add(k) for k in ("key-one", "key-two")]
    with make_edge(tmp_path / "store") as store:
        report = ingest_http(source, store, "catalog", embedder)
        assert report.written == 13 + 18 and store.count("catalog") == 31 and report.pages == 4 + 3 + 3
        assert store.retrieve("catalog", ["a-8", "b-0", "it-13"], missing_ok=False)
    leases = {k.key_id: k.leases for k in pool.list()}
    assert sum(leases.values()) == 10 and all(leases[i] == 5 for i in ids)  # one pool, LRU-balanced
    for shard in ("main", "a", "b"):
        name = source.config.name if shard == "main" else f"{source.config.name}.{shard}"
        assert Checkpoint(redis.Redis.from_url(redis_server.url), name).load()["done"] == "1"
