"""The inspection web page in a real headless browser (Debian's chromium + chromedriver through Selenium),
over a real Edge store that a real labeling job has written to."""

from __future__ import annotations

import threading
import time
import urllib.request
from urllib.error import HTTPError

import numpy as np
import pytest
import uvicorn
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from embedder.ui.app import create_app
from labeling.config import LabelingConfig
from labeling.job import run_job
from tests.conftest import clustered, free_port, make_edge

SCRIPT_TEXT = '<script>window.__pwned = 1</script><b id="injected">bold</b> & "quotes"'
TOKEN = "s3cret-token"


class _Served:
    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the UI server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An Edge store of 360 clustered points (3 classes, 15% ground truth), thumbnails for some, a script in one
    text, after a real 2-iteration labeling job; served twice: open, and behind a token."""
    tmp = tmp_path_factory.mktemp("ui")
    images = tmp / "images"
    images.mkdir()
    x, cl = clustered(360, n_clusters=3, seed=7, spread=0.6)
    classes = ["cat", "dog", "fox"]
    rng = np.random.default_rng(0)
    seed = set(rng.choice(360, 54, replace=False).tolist())
    payloads = []
    for i in range(360):
        p: dict = {"text": f"item {i} about a {classes[cl[i]]}", "hidden": classes[cl[i]]}
        if i in seed:
            p |= {"label": classes[cl[i]], "label_source": "seed"}
        if i % 4 == 0:
            path = images / f"{i}.png"
            Image.new("RGB", (32, 32), (40 * cl[i], 120, 200)).save(path)
            p["image_uri"] = str(path)
        payloads.append(p)
    payloads[1]["text"] = SCRIPT_TEXT
    payloads[2]["image_uri"] = str(images / "missing.png")  # a dangling reference: a placeholder, not an error
    payloads[3]["image_uri"] = "/etc/hostname"  # outside the image root: never served
    store = make_edge(tmp / "store")
    store.create_collection("items")
    store.upsert("items", [f"p{i}" for i in range(360)], x, payloads)
    store.flush()
    cfg = LabelingConfig(max_iterations=2, truth_field="hidden", review_count=20)
    run_job(store, "items", cfg, runs_dir=tmp / "runs")
    open_ui = _Served(create_app(store, "items", image_roots=[images]))
    locked_ui = _Served(create_app(store, "items", tokens=[TOKEN], image_roots=[images]))
    yield {"store": store, "open": open_ui.url, "locked": locked_ui.url, "cl": cl, "classes": classes}
    open_ui.stop()
    locked_ui.stop()
    store.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait_for(browser, element_id: str):
    """The element, once the page a click navigated to has it (clicks do not wait for navigation)."""
    return WebDriverWait(browser, 15).until(ec.presence_of_element_located((By.ID, element_id)))


def _image_loaded(browser, element) -> bool:
    return browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", element)


def test_overview_shows_counts_the_run_its_curves_and_reliability_diagram(world, browser):
    browser.get(world["open"] + "/")
    status = browser.find_element(By.ID, "by-status").text
    counts = world["store"].facet("items", "pseudo_status")
    for s, n in counts.items():
        assert f"{s} {n}" in status
    by_class = browser.find_element(By.ID, "by-class").text
    assert all(c in by_class for c in world["classes"])
    run = browser.find_element(By.CSS_SELECTOR, "section.run")
    assert "(active)" in run.text
    rows = run.find_elements(By.CSS_SELECTOR, "table.iterations tr")
    assert len(rows) >= 2  # header + at least one iteration with its held-out F1
    imgs = run.find_elements(By.TAG_NAME, "img")
    assert {i.get_attribute("alt") for i in imgs} == {"reliability.png", "iterations.png"}
    assert all(_image_loaded(browser, i) for i in imgs)


def test_the_overview_says_when_its_counts_include_a_pending_write(world):
    """The status counts read raw payloads: during (or after an interrupted) write they mix two runs' labels."""
    import urllib.request

    from labeling.runs import load_registry, save_registry

    def page() -> str:
        return urllib.request.urlopen(world["open"] + "/").read().decode()

    assert 'id="pending-run"' not in page()
    store = world["store"]
    reg = load_registry(store, "items")
    reg.pending = "20990101T000000-abcdef"
    save_registry(store, "items", reg)
    try:
        assert 'id="pending-run"' in page() and "20990101T000000-abcdef is writing, or was interrupted" in page()
    finally:
        reg.pending = None
        save_registry(store, "items", reg)


def test_a_point_shows_its_neighbours_with_disagreements_marked(world, browser):
    browser.get(world["open"] + "/points?status=accepted")
    cards = browser.find_elements(By.CSS_SELECTOR, "#points .point-card a")
    assert cards
    cards[0].click()
    point = _wait_for(browser, "point")
    neighbours = browser.find_elements(By.CSS_SELECTOR, "#neighbours .neighbour")
    assert len(neighbours) == 12
    me = browser.find_element(By.ID, "pseudo").text
    # a neighbour is marked exactly when its effective label differs from the point's
    for n in neighbours:
        label = n.find_elements(By.TAG_NAME, "div")[-2].text.split(" (")[0]
        marked = "disagree" in n.get_attribute("class")
        assert marked == (label not in (me, "unlabelled") and label != ""), (label, me)
    assert "similarity" in neighbours[0].text and point.find_element(By.ID, "agreement").text


def test_thumbnails_load_and_missing_or_forbidden_images_degrade_to_a_placeholder(world, browser):
    browser.get(world["open"] + "/point/p4")
    thumb = browser.find_element(By.ID, "thumb")
    assert _image_loaded(browser, thumb) and browser.execute_script("return arguments[0].naturalWidth", thumb) == 32
    for pid in ("p2", "p3"):  # missing file; a file outside the image root
        with urllib.request.urlopen(f"{world['open']}/thumb/{pid}") as resp:
            assert resp.headers["content-type"].startswith("image/svg+xml") and b"no image" in resp.read()
    browser.get(world["open"] + "/point/p5")  # text only: its text, no image
    assert not browser.find_elements(By.ID, "thumb") and "item 5" in browser.find_element(By.ID, "text").text


def test_a_remote_thumbnail_is_followed_by_an_img_only(tmp_path):
    """An http(s) image reference is redirected to for an <img>; opened as a page it was an open redirect."""
    import httpx

    store = make_edge(tmp_path / "store")
    store.create_collection("items")
    store.upsert(
        "items", ["r1"], clustered(1, n_clusters=1, seed=1)[0], [{"image_uri": "https://elsewhere.example/a.png"}]
    )
    served = _Served(create_app(store, "items"))
    try:
        url = f"{served.url}/thumb/r1"
        img = httpx.get(url, headers={"Sec-Fetch-Dest": "image"}, follow_redirects=False)
        assert img.status_code == 302 and img.headers["location"] == "https://elsewhere.example/a.png"
        assert httpx.get(url, follow_redirects=False).status_code == 302  # a client that says nothing
        page = httpx.get(url, headers={"Sec-Fetch-Dest": "document"}, follow_redirects=False)
        assert page.status_code == 403 and "location" not in page.headers and "another site" in page.text
    finally:
        served.stop()
        store.close()


def test_correcting_a_label_writes_human_ground_truth_and_never_silently_overwrites_it(world, browser):
    store = world["store"]
    pid = next(r.id for r in store.iter_records("items", filter={"pseudo_status": "review"}))
    browser.get(f"{world['open']}/point/{pid}")
    box = browser.find_element(By.ID, "label-input")
    box.clear()
    box.send_keys("fox")
    browser.find_element(By.ID, "save").click()
    assert "saved: fox" in _wait_for(browser, "saved").text
    assert browser.find_element(By.ID, "label").text.startswith("fox (human)")  # visible at once
    browser.refresh()  # the outcome is shown once, not again on a reload
    assert not browser.find_elements(By.ID, "saved")
    browser.get(f"{world['open']}/point/{pid}?saved=Pwned&error=call+0800")  # and never from a crafted link
    assert not browser.find_elements(By.ID, "saved") and not browser.find_elements(By.ID, "error")
    payload = store.retrieve("items", [pid])[0].payload
    assert payload["label"] == "fox" and payload["label_source"] == "human"
    # another person's different answer is refused, visibly, and the store keeps the first
    box = browser.find_element(By.ID, "label-input")
    box.clear()
    box.send_keys("dog")
    browser.find_element(By.ID, "save").click()
    assert "different human label" in _wait_for(browser, "error").text
    assert store.retrieve("items", [pid])[0].payload["label"] == "fox"
    browser.get(world["open"] + "/review")
    assert pid not in browser.find_element(By.ID, "review").text  # answered: out of the queue
    # the person takes the answer back: the point is unlabelled again; a seed label offers no such button
    browser.get(f"{world['open']}/point/{pid}")
    browser.find_element(By.ID, "clear").click()
    assert "label cleared" in _wait_for(browser, "cleared").text
    assert browser.find_element(By.ID, "label").text == "-" and not browser.find_elements(By.ID, "clear")
    assert "label" not in store.retrieve("items", [pid])[0].payload
    # a page loaded before another reviewer's newer answer does not clear that answer
    from labeling.review import submit_labels

    submit_labels(store, "items", [(pid, "dog")])
    browser.get(f"{world['open']}/point/{pid}")
    submit_labels(store, "items", [(pid, "cat")], overwrite_human=True)  # someone else, meanwhile
    browser.find_element(By.ID, "clear").click()
    assert "changed since they were shown" in _wait_for(browser, "error").text
    assert store.retrieve("items", [pid])[0].payload["label"] == "cat"
    seed = next(r.id for r in store.iter_records("items") if (r.payload or {}).get("label_source") == "seed")
    browser.get(f"{world['open']}/point/{seed}")
    assert not browser.find_elements(By.ID, "clear")


def test_a_cross_site_form_post_is_refused_and_bad_offsets_are_400(world):
    """Without tokens the page is open on localhost: another site's page must still not be able to write a
    label through the user's browser (CSRF; the browser sends its Origin)."""
    store = world["store"]
    pid = next(r.id for r in store.iter_records("items", filter={"pseudo_status": "review"}))
    before = store.retrieve("items", [pid])[0].payload.get("label")

    def post(origin: str | None) -> int:
        req = urllib.request.Request(f"{world['open']}/point/{pid}/label", data=b"label=Pwned&replace=true")
        if origin:
            req.add_header("Origin", origin)
        try:
            with urllib.request.urlopen(req) as resp:
                return resp.status
        except HTTPError as err:
            return err.code

    assert post("https://evil.example") == 403
    assert store.retrieve("items", [pid])[0].payload.get("label") == before
    for path in ("/points?offset=garbage", "/suspicious?offset=zzz"):
        with pytest.raises(HTTPError) as err:
            urllib.request.urlopen(world["open"] + path)
        assert err.value.code == 400  # was a 500 from an uncaught ValueError


def test_a_malformed_payload_does_not_take_down_the_review_queue(world):
    """One point whose pseudo_top held a string where a number goes made /review and its /point page 500 for
    everyone (and the gRPC ListReviewQueue INTERNAL): a payload is anyone's to write."""
    from labeling.review import review_queue

    store = world["store"]
    pid = next(r.id for r in store.iter_records("items", filter={"pseudo_status": "review"}))
    before = store.retrieve("items", [pid])[0].payload
    bad = {"pseudo_top": [["red", "not-a-number"], "junk", ["fox", 0.4]], "review_score": "x", "pseudo_confidence": "y"}
    store.set_payload("items", {pid: bad})
    try:
        for path in ("/review", f"/point/{pid}"):
            with urllib.request.urlopen(world["open"] + path) as resp:
                assert resp.status == 200
        item = next(it for it in review_queue(store, "items") if it.id == pid)
        assert item.top == [("fox", 0.4)] and item.review_score is None  # the malformed entries left out
    finally:
        store.set_payload("items", {pid: {k: before.get(k) for k in bad}})


def test_item_text_is_escaped_never_executed(world, browser):
    browser.get(world["open"] + "/point/p1")
    assert browser.find_element(By.ID, "text").text == SCRIPT_TEXT  # shown as text, verbatim
    assert browser.execute_script("return window.__pwned === undefined")
    assert not browser.find_elements(By.ID, "injected")
    assert "&lt;script&gt;" in browser.page_source


def test_unauthenticated_access_is_refused_when_a_token_is_set(world, browser):
    for path in ("/", "/points", "/point/p1", "/review", "/thumb/p4"):
        with pytest.raises(HTTPError) as err:
            urllib.request.urlopen(world["locked"] + path)
        assert err.value.code == 401
    req = urllib.request.Request(world["locked"] + "/", headers={"Authorization": "Bearer wrong"})
    with pytest.raises(HTTPError):
        urllib.request.urlopen(req)
    req = urllib.request.Request(world["locked"] + "/", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 200
    browser.delete_all_cookies()
    browser.get(world["locked"] + "/")
    assert "Sign in" in browser.page_source and not browser.find_elements(By.ID, "by-status")
    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.ID, "login").click()
    assert "wrong token" in _wait_for(browser, "login-error").text
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    assert _wait_for(browser, "by-status")  # signed in: the overview
    browser.find_element(By.ID, "logout").click()  # and out again: the cookie is gone
    _wait_for(browser, "token")
    browser.get(world["locked"] + "/")
    assert not browser.find_elements(By.ID, "by-status")


def test_sign_in_is_a_revocable_session_and_pages_cannot_be_framed(world):
    """The sign-in cookie was the gRPC token itself (sign-out could not revoke it), /login took unlimited
    guesses, and no page forbade framing (a framed label form can be clickjacked)."""
    import http.cookiejar
    import urllib.parse

    ui = _Served(create_app(world["store"], "items", tokens=[TOKEN]))
    try:
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        form = urllib.parse.urlencode({"token": TOKEN}).encode()
        with opener.open(ui.url + "/login", data=form) as resp:  # follows the 303 to the overview
            assert resp.status == 200 and resp.headers["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        (cookie,) = list(jar)
        assert cookie.value != TOKEN and TOKEN not in cookie.value and len(cookie.value) >= 32
        session = {"Cookie": f"{cookie.name}={cookie.value}"}
        with urllib.request.urlopen(urllib.request.Request(ui.url + "/points", headers=session)) as resp:
            assert resp.status == 200
        opener.open(ui.url + "/logout").close()
        with pytest.raises(HTTPError) as err:  # the same cookie, replayed after sign-out: refused
            urllib.request.urlopen(urllib.request.Request(ui.url + "/points", headers=session))
        assert err.value.code == 401 and err.value.headers["Cache-Control"] == "no-store"
        assert err.value.headers["X-Frame-Options"] == "DENY"
        # a sign-in goes back to the page that asked for it (it landed on the overview), and only to this site
        with pytest.raises(HTTPError) as err:
            urllib.request.urlopen(ui.url + "/points?status=review")
        assert 'name="next" value="/points?status=review"' in err.value.read().decode()
        for asked, lands in (("/points?status=review", "/points?status=review"), ("//evil.example/x", "/")):
            form = urllib.parse.urlencode({"token": TOKEN, "next": asked}).encode()
            with opener.open(ui.url + "/login", data=form) as resp:
                assert resp.geturl() == ui.url + lands
        codes = []
        for _ in range(11):
            try:
                urllib.request.urlopen(ui.url + "/login", data=urllib.parse.urlencode({"token": "guess"}).encode())
            except HTTPError as e:
                codes.append(e.code)
        assert codes == [401] * 10 + [429]  # ten wrong tokens a minute, then refused without a check
    finally:
        ui.stop()


def test_a_typo_is_not_made_a_class_and_other_hosts_are_refused(world, browser):
    """Any string was saved as ground truth: "objects" beside "Objects", a zero-width space, a new class by
    mistake; the next job then refused to start (a class with one example). And the page answered any Host:
    a DNS-rebinding site could read and write it through the browser."""
    store = world["store"]
    pid = next(r.id for r in store.iter_records("items", filter={"pseudo_status": "review"}))
    before = store.retrieve("items", [pid])[0].payload.get("label")

    def answer(text: str, new_class: bool = False) -> str:
        browser.get(f"{world['open']}/point/{pid}")
        box = browser.find_element(By.ID, "label-input")
        box.clear()
        box.send_keys(text)
        if new_class:
            browser.find_element(By.ID, "new-class").click()
        browser.find_element(By.ID, "save").click()
        WebDriverWait(browser, 15).until(lambda b: b.find_elements(By.ID, "error") or b.find_elements(By.ID, "saved"))
        return (browser.find_elements(By.ID, "error") or browser.find_elements(By.ID, "saved"))[0].text

    assert "did you mean 'dog'" in answer("Dog")
    assert "not one of the 3 classes here; tick 'new class'" in answer("dinosaur")
    assert "invisible or control character" in answer("dog\u200b")
    assert store.retrieve("items", [pid])[0].payload.get("label") == before  # none of them written
    assert "saved: wolf" in answer("wolf", new_class=True)  # a new class, on purpose
    assert store.retrieve("items", [pid])[0].payload["label"] == "wolf"
    store.delete_payload_keys("items", [pid], ["label", "label_source", "labeled_at"])  # as the other tests expect
    req = urllib.request.Request(world["open"] + "/", headers={"Host": "attacker.example"})
    with pytest.raises(HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 421


def test_suspicious_and_points_pages_paginate(world, browser):
    browser.get(world["open"] + "/points")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#points .point-card")) == 48
    first = browser.find_element(By.CSS_SELECTOR, "#points .point-card .id").text
    browser.find_element(By.ID, "next").click()
    WebDriverWait(browser, 15).until(lambda b: "offset=" in b.current_url)
    assert browser.find_element(By.CSS_SELECTOR, "#points .point-card .id").text != first
    browser.get(world["open"] + "/suspicious")
    assert browser.find_element(By.ID, "suspicious")
    with pytest.raises(HTTPError) as err:
        urllib.request.urlopen(world["open"] + "/points?status=bogus")
    assert err.value.code == 400
