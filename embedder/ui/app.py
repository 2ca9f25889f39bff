"""The inspection web page (``embedstore ui``): pseudo-labels beside their nearest neighbours, and corrections.

Server-rendered (FastAPI + Jinja2, autoescaping on: item text is data, never markup).
Pages, each costing a bounded number of store calls whatever the collection size:

* ``/`` - run overview: counts by status and class (facets on indexed fields), the
  runs with held-out F1/ECE per iteration (from each run's ``report.json``) and its
  reliability diagram and per-iteration curves.
* ``/points`` - one scroll page of points, filterable by status, label or pseudo-label.
* ``/point/{id}`` - the point (thumbnail, text, label state) and its k nearest
  neighbours as a grid; neighbours whose label differs from the point's are marked.
  A form writes a label as ground truth (``label_source = human``); a different human
  label is never overwritten unless the person ticks "replace".
* ``/review`` - the review queue (bounded by the gate's review count per run).
* ``/suspicious`` - accepted pseudo-labels least supported by their neighbours, one
  scroll window per page (``?offset=`` continues).
* ``/thumb/{id}`` - the item's image from its stored reference: an http(s) URL is
  redirected to when an ``<img>`` asks (``Sec-Fetch-Dest: image``), refused when the
  browser says it opens it as a page (no open redirect); a local path is served only from under an allowed image root (a
  payload must not be able to read arbitrary files); otherwise a placeholder.

Auth: when tokens are configured (the gRPC service's ``EMBEDSTORE_GRPC_TOKENS``),
every page needs ``Authorization: Bearer <token>`` or the ``embedstore_token`` cookie
that ``/login`` sets (HttpOnly, SameSite=Strict: a cross-site form cannot post with it).
"""

from __future__ import annotations

import base64
import hmac
import json
import mimetypes
import secrets as secrets_module
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from labeling.errors import LabelingError
from labeling.inspect import LabelState, inspect_neighbours, top_classes
from labeling.review import (
    LabelConflictError,
    clear_labels,
    image_ref,
    is_answer,
    label_problem,
    review_queue,
    same_class_spelt_otherwise,
    submit_labels,
    suspicious_page,
)
from labeling.runs import load_registry, resolve
from retrieval import Filter, Match, VectorStore
from retrieval.errors import PointNotFoundError, StoreError

TEMPLATES = Path(__file__).with_name("templates")
COOKIE = "embedstore_session"
SESSION_S = 12 * 3600  # a sign-in's life: a working day, then sign in again
LOGIN_FAILURES_PER_MINUTE = 10  # per client address; then /login answers 429 until the minute has passed
#: sent with every answer: no framing by other sites (a framed label form could be clickjacked), no MIME sniffing
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _host_name(host: str) -> str:
    """The name in a Host header, without its port (``[::1]:8080`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"}
PLACEHOLDER_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="96" height="96"><rect width="96" height="96" fill="#eee"/>'
    '<text x="48" y="52" font-size="11" text-anchor="middle" fill="#888">no image</text></svg>'
)
RUN_FILES = {"reliability.png", "iterations.png"}
FLASH = "embedstore_flash"  # a form post's outcome, shown once on the page it redirects to
STATUS_FILTERS = ("accepted", "quarantined", "review")


def create_app(
    store: VectorStore,
    collection: str,
    *,
    tokens: Sequence[str] = (),
    image_roots: Sequence[str | Path] = (),
    k: int = 12,
    page_size: int = 48,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
) -> FastAPI:
    """The web app over an open ``store``; store calls are serialised (one lock), pages stay small.

    ``allowed_hosts``: the host names requests may be addressed to (the ``Host`` header; None: any). The
    default, loopback only, stops DNS rebinding: a site whose name resolves to 127.0.0.1 would otherwise read
    and write an open page through the user's browser (same origin to the browser, so CSRF checks pass)."""
    app = FastAPI(title="embedstore", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(TEMPLATES))  # autoescape is on for .html
    lock = threading.Lock()
    roots = [Path(r).resolve() for r in image_roots]
    secrets = [t for t in tokens if t]
    allowed = {h.lower().strip("[]") for h in allowed_hosts or ()}

    def locked(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with lock:
            return fn(*args, **kwargs)

    # Signed-in browsers hold a random session id, not the token: the cookie was the service's bearer token
    # itself, which signing out could not revoke. Sessions live in this process (a restart signs everyone out).
    sessions: dict[str, float] = {}  # session id -> expiry (time.monotonic())
    session_lock = threading.Lock()  # not the store's lock: the middleware must not wait on a store call
    failures: dict[str, list[float]] = {}  # client address -> times of recent wrong tokens

    def token_ok(given: str) -> bool:
        return any(hmac.compare_digest(given.encode(), s.encode()) for s in secrets)

    def authorised(request: Request) -> bool:
        if not secrets:
            return True
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return token_ok(header[7:].strip())
        sid = request.cookies.get(COOKIE, "")
        with session_lock:
            expiry = sessions.get(sid)
            if expiry is not None and expiry < time.monotonic():
                del sessions[sid]
                expiry = None
        return expiry is not None

    @app.middleware("http")
    async def require_token(request: Request, call_next: Callable[[Request], Any]) -> Response:
        resp: Response
        if allowed_hosts is not None and _host_name(request.headers.get("host", "")) not in allowed:
            resp = Response("unknown host (see `embedstore ui --allowed-host`)", status_code=421)
        elif request.method not in ("GET", "HEAD", "OPTIONS") and not same_origin(request):
            # a page on another site must not write labels through the user's browser (CSRF): without tokens
            # nothing else would stop it, and a token cookie is SameSite=Strict but Origin is checked anyway
            resp = page(request, "error.html", status_code=403, message="cross-site request refused")
        elif request.url.path in ("/login", "/logout", "/healthz") or authorised(request):
            resp = await call_next(request)
        else:
            wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            resp = page(request, "login.html", status_code=401, error=None, next=wanted)
        resp.headers.update(SECURITY_HEADERS)
        return resp

    def same_origin(request: Request) -> bool:
        """Origin (or, without it, Referer) names this page's own host; a browser sends one of them on a
        form post. A request with neither (curl, a script) is not a browser's cross-site request."""
        source = request.headers.get("origin") or request.headers.get("referer")
        if not source:
            return True
        got = urlsplit(source)
        return got.scheme in ("http", "https") and got.netloc == request.headers.get("host", request.url.netloc)

    def page(request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        resp = templates.TemplateResponse(request, name, {"collection": collection, **ctx}, status_code=status_code)
        resp.headers["Cache-Control"] = "no-store"  # Back must not show a point as it was before a save
        return resp

    def known_classes() -> list[str]:
        """The classes in use: ground-truth labels and pseudo-labels (two facets on indexed fields)."""
        names = {str(k) for k in store.facet(collection, "label")} | {
            str(k) for k in store.facet(collection, "pseudo_label")
        }
        return sorted(names)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> HTMLResponse:
        return page(request, "login.html", error=None)

    @app.post("/login")
    def login(request: Request, token: str = Form(...), next: str = Form("/")) -> Response:
        client = request.client.host if request.client else "?"
        now = time.monotonic()
        with session_lock:
            recent = [t for t in failures.pop(client, []) if now - t < 60]  # nothing kept for quiet addresses
            if recent:
                failures[client] = recent
        if len(recent) >= LOGIN_FAILURES_PER_MINUTE:
            return page(request, "login.html", status_code=429, error="too many wrong tokens: wait a minute", next=next)
        if secrets and not token_ok(token):
            with session_lock:
                failures.setdefault(client, []).append(now)
            return page(request, "login.html", status_code=401, error="wrong token", next=next)
        # back to the page that asked for the sign-in (it landed on the overview); only a path on this site
        target = next if next.startswith("/") and not next.startswith(("//", "/\\")) else "/"
        resp = RedirectResponse(target, status_code=303)
        if secrets:
            sid = secrets_module.token_urlsafe(32)
            with session_lock:
                for old_sid in [k for k, exp in sessions.items() if exp < now]:
                    del sessions[old_sid]
                sessions[sid] = now + SESSION_S
            resp.set_cookie(
                COOKIE,
                sid,
                httponly=True,
                samesite="strict",
                max_age=SESSION_S,
                secure=request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https",
            )
        return resp

    @app.get("/logout")
    def logout(request: Request) -> Response:
        with session_lock:
            sessions.pop(request.cookies.get(COOKIE, ""), None)  # revoked here, not only in the browser
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> HTMLResponse:
        def read() -> dict[str, Any]:
            return {
                "total": store.count(collection),
                "by_status": store.facet(collection, "pseudo_status"),
                "by_label": store.facet(collection, "label"),
                "by_pseudo": store.facet(collection, "pseudo_label"),
                "registry": load_registry(store, collection),
            }

        data = locked(read)
        reg = data["registry"]
        runs = []
        for r in reversed(reg.runs):
            iterations = []
            report_path = Path(r.run_dir) / "report.json" if r.run_dir else None
            if report_path is not None and report_path.is_file():
                try:
                    report = json.loads(report_path.read_text())
                    iterations = [
                        {
                            "iteration": it.get("iteration"),
                            "f1": (it.get("heldout_after") or {}).get("macro_f1"),
                            "ece": (it.get("heldout_after") or {}).get("ece"),
                            "accepted": (it.get("counts") or {}).get("accepted"),
                            "precision": it.get("pseudo_precision"),
                        }
                        for it in report.get("iterations", [])
                    ]
                except (OSError, ValueError):
                    iterations = []
            files = [f for f in sorted(RUN_FILES) if r.run_dir and (Path(r.run_dir) / f).is_file()]
            runs.append({"run": r, "iterations": iterations, "files": files, "active": r.run_id == reg.active})
        classes = sorted(set(data["by_label"]) | set(data["by_pseudo"]), key=str)
        return page(request, "overview.html", classes=classes, runs=runs, **data)

    @app.get("/runs/{run_id}/{name}")
    def run_file(run_id: str, name: str) -> Response:
        if name not in RUN_FILES:
            return Response("not found", status_code=404)
        reg = locked(load_registry, store, collection)
        run = next((r for r in reg.runs if r.run_id == run_id), None)
        if run is None or not run.run_dir or not (Path(run.run_dir) / name).is_file():
            return Response("not found", status_code=404)
        return FileResponse(Path(run.run_dir) / name, media_type="image/png")

    @app.get("/points", response_class=HTMLResponse)
    def points(
        request: Request,
        status: str | None = None,
        label: str | None = None,
        pseudo: str | None = None,
        offset: str | None = None,
    ) -> HTMLResponse:
        must = []
        if status:
            if status not in STATUS_FILTERS:
                return page(request, "error.html", status_code=400, message=f"unknown status {status!r}")
            must.append(Match("pseudo_status", status))
        if label:
            must.append(Match("label", label))
        if pseudo:
            must.append(Match("pseudo_label", pseudo))

        def read() -> tuple[Any, set[str]]:
            got = store.scroll(collection, filter=Filter(must=must) if must else None, limit=page_size, offset=offset)
            return got, load_registry(store, collection).unapplied

        try:
            got, unapplied = locked(read)
        except (StoreError, ValueError) as exc:  # ValueError: an offset that is no point id
            return page(request, "error.html", status_code=400, message=str(exc))
        rows = [_row(r.id, resolve(r.payload, unapplied)) for r in got.records]
        query = {"status": status, "label": label, "pseudo": pseudo}
        base = "&".join(f"{k}={quote(v)}" for k, v in query.items() if v)
        next_url = f"/points?{base + '&' if base else ''}offset={quote(got.next_offset)}" if got.next_offset else None
        return page(request, "points.html", rows=rows, query=query, next_url=next_url, statuses=STATUS_FILTERS)

    @app.get("/point/{point_id:path}", response_class=HTMLResponse)
    def point(request: Request, point_id: str) -> HTMLResponse:
        # The outcome of the form post comes in a one-shot cookie, not the query string: a crafted link could
        # otherwise show "saved: ..." or any error text on this page.
        saved = error = cleared = None
        try:
            flash = json.loads(base64.urlsafe_b64decode(request.cookies.get(FLASH, "")) or b"{}")
        except ValueError:  # binascii.Error and JSONDecodeError are ValueErrors
            flash = {}
        if isinstance(flash, dict) and flash.get("point") == point_id:
            saved, error, cleared = flash.get("saved"), flash.get("error"), flash.get("cleared")
        try:
            ins = locked(inspect_neighbours, store, collection, point_id, k)
        except PointNotFoundError:
            return page(request, "error.html", status_code=404, message=f"no point {point_id!r} in {collection!r}")
        me = ins.point.state.judged_label
        neighbours = [
            {
                **_row(n.point.id, n.point.payload),
                "similarity": n.similarity,
                "disagrees": me is not None
                and n.point.state.effective_label is not None
                and n.point.state.effective_label != me,
            }
            for n in ins.neighbours
        ]
        resp = page(
            request,
            "point.html",
            p=_row(ins.point.id, ins.point.payload),
            state=ins.point.state,
            clearable=ins.point.state.label is not None and is_answer(ins.point.payload),
            top=top_classes(ins.point.payload),
            neighbours=neighbours,
            agreement=ins.agreement,
            saved=saved,
            error=error,
            cleared=cleared,
            classes=locked(known_classes),
        )
        if FLASH in request.cookies:
            resp.delete_cookie(FLASH, path="/")
        return resp

    def back_to(point_id: str, **outcome: str) -> Response:
        """Back to the point's page, the form's outcome in a one-shot cookie."""
        resp = RedirectResponse(f"/point/{quote(point_id, safe='')}", status_code=303)
        # base64: a cookie value cannot carry every character a label or message may have
        body = base64.urlsafe_b64encode(json.dumps({"point": point_id, **outcome}).encode()).decode()
        resp.set_cookie(FLASH, body, max_age=60, httponly=True, samesite="strict", path="/")
        return resp

    @app.post("/point/{point_id:path}/label")
    def set_label(
        point_id: str, label: str = Form(...), replace: bool = Form(False), new_class: bool = Form(False)
    ) -> Response:
        def back(**outcome: str) -> Response:
            return back_to(point_id, **outcome)

        label = unicodedata.normalize("NFC", label.strip())  # as submit_labels stores it
        # A typo here is ground truth: it became a class of its own, and the next job refused to start (a class
        # with one example). Known classes pass; a spelling variant of one is refused; a new one must be ticked.
        if (why := label_problem(label)) is not None:
            return back(error=why)
        known = locked(known_classes)
        if label not in known:
            if (other := same_class_spelt_otherwise(label, known)) is not None:
                return back(
                    error=f"did you mean {other!r}? {label!r} differs from it only by case, spacing or Unicode form"
                )
            if not new_class:
                return back(error=f"{label!r} is not one of the {len(known)} classes here; tick 'new class' to add it")
        try:
            locked(submit_labels, store, collection, [(point_id, label)], overwrite_human=replace)
        except LabelConflictError:
            return back(error="this point already has a different human label; tick 'replace' to overwrite it")
        except (LabelingError, StoreError) as exc:
            return back(error=str(exc))
        return back(saved=label)

    @app.post("/point/{point_id:path}/clear")
    def clear_label(point_id: str, shown: str = Form("")) -> Response:
        # human answers only: a seed or dataset label is the data's own truth (the CLI's --any-source clears it);
        # `shown` is the label the page showed: another reviewer's newer answer is not cleared by a stale page
        try:
            result = locked(clear_labels, store, collection, [point_id], expected={point_id: shown})
        except (LabelingError, StoreError) as exc:
            return back_to(point_id, error=str(exc))
        return back_to(point_id, cleared="yes" if result.cleared else "no")

    @app.get("/review", response_class=HTMLResponse)
    def review(request: Request) -> HTMLResponse:
        items = locked(review_queue, store, collection, limit=200)
        return page(request, "review.html", items=items)

    @app.get("/suspicious", response_class=HTMLResponse)
    def suspects(request: Request, offset: str | None = None) -> HTMLResponse:
        try:
            found, nxt = locked(suspicious_page, store, collection, offset=offset, window=256, k=10)
        except (StoreError, ValueError) as exc:  # ValueError: an offset that is no point id
            return page(request, "error.html", status_code=400, message=str(exc))
        next_url = f"/suspicious?offset={quote(nxt)}" if nxt else None
        return page(request, "suspicious.html", suspects=found, next_url=next_url)

    @app.get("/thumb/{point_id:path}")
    def thumb(point_id: str, request: Request) -> Response:
        placeholder = Response(PLACEHOLDER_SVG, media_type="image/svg+xml")
        try:
            rec = locked(store.retrieve, collection, [point_id], missing_ok=True)
        except StoreError:
            return placeholder
        ref = image_ref(rec[0].payload or {}) if rec else None
        if ref is None:
            return placeholder
        if ref.startswith(("http://", "https://")):
            # Followed for an <img> only: a link to /thumb/<id> opened as a page would make this trusted host
            # forward a reader to whatever address a payload holds (an open redirect). Browsers send
            # Sec-Fetch-Dest; one that sends none (old Safari, scripts) still gets the image.
            dest = request.headers.get("sec-fetch-dest")
            if dest is not None and dest != "image":
                return Response(
                    "this item's image lives at another site; it is shown on the item's page, not opened from here",
                    status_code=403,
                    media_type="text/plain",
                )
            return RedirectResponse(ref, status_code=302)
        path = Path(ref.removeprefix("file://")).expanduser()
        try:
            path = path.resolve(strict=True)
        except OSError:
            return placeholder
        allowed = any(path.is_relative_to(r) for r in roots)
        if not allowed or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            return placeholder
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    return app


def _row(point_id: str, payload: dict[str, Any] | None) -> dict[str, Any]:
    p = payload or {}
    st = LabelState.from_payload(p)
    text = p.get("text") if isinstance(p.get("text"), str) else None
    return {
        "id": point_id,
        "url": f"/point/{quote(point_id, safe='')}",
        "thumb": f"/thumb/{quote(point_id, safe='')}",
        "has_image": image_ref(p) is not None,
        "text": text,
        "label": st.label,
        "label_source": st.label_source,
        "pseudo_label": st.pseudo_label,
        "confidence": st.pseudo_confidence,
        "status": st.pseudo_status,
        "effective": st.effective_label,
    }
