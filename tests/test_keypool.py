"""The API key pool on a real redis-server: leases, cooldowns from real HTTP responses, budgets, concurrency."""

from __future__ import annotations

import contextlib
import email.utils
import http.server
import logging
import multiprocessing as mp
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from embedder.ingest import KeyPool, KeyPoolError, KeyPoolUnavailable, Lease, NoHealthyKey, cooldown_from_headers
from embedder.ingest.keypool import FAILURE_PENALTY_LEASES, WINDOW_BUCKETS
from embedder.ingest.redis_server import RedisServer

KEYS = [f"secret-key-{i}-{uuid.uuid4().hex}" for i in range(5)]


@pytest.fixture
def pool(redis_server) -> KeyPool:
    return KeyPool(f"api-{uuid.uuid4().hex[:8]}", redis_server.url, secret="", backoff_base_s=1.0, backoff_cap_s=8.0)


class RateLimitedAPI(http.server.BaseHTTPRequestHandler):
    """Answers per key: 'ok' 200, 'slow' 429 + Retry-After: 2, 'date' 429 + an HTTP-date Retry-After,
    'reset' 403 + x-ratelimit-reset (epoch), 'bad' 401."""

    def do_GET(self) -> None:
        key = self.headers.get("authorization", "").removeprefix("Bearer ")
        kind = key.split("-")[0]
        now = time.time()
        if kind == "ok":
            self.send_response(200)
        elif kind == "slow":
            self.send_response(429)
            self.send_header("Retry-After", "2")
        elif kind == "date":
            self.send_response(429)
            self.send_header("Retry-After", email.utils.formatdate(now + 3, usegmt=True))
        elif kind == "reset":
            self.send_response(403)
            self.send_header("x-ratelimit-reset", str(int(now) + 2))
        else:
            self.send_response(401)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RateLimitedAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/items"
    server.shutdown()


def call(api: str, pool: KeyPool, lease: Lease) -> int:
    r = httpx.get(api, headers={"authorization": f"Bearer {lease.secret}"})
    pool.report(lease.key_id, r.status_code, r.headers)
    return r.status_code


def test_keys_are_known_by_id_and_leased_least_recently_used_first(pool):
    ids = [pool.add(k) for k in KEYS[:3]]
    assert pool.add(KEYS[0]) == ids[0]  # idempotent
    assert all(i.startswith("k_") and len(i) == 14 for i in ids)
    listed = pool.list()
    assert [k.key_id for k in listed] == sorted(ids) and all(k.state == "active" for k in listed)
    assert not any(raw in repr(listed) for raw in KEYS)
    got = [pool.lease(wait=0) for _ in range(6)]
    assert [g.key_id for g in got[:3]] == [g.key_id for g in got[3:]] and len({g.key_id for g in got[:3]}) == 3
    assert {g.secret for g in got} == set(KEYS[:3]) and KEYS[0] not in repr(got[0])
    pool.disable(ids[0])
    assert ids[0] not in {pool.lease(wait=0).key_id for _ in range(4)}
    pool.enable(ids[0])
    pool.remove(ids[1])
    assert {pool.lease(wait=0).key_id for _ in range(4)} == {ids[0], ids[2]}
    with pytest.raises(KeyPoolError, match="no key"):
        pool.disable(ids[1])


def test_a_budget_window_must_be_positive_and_adding_again_keeps_what_is_not_given(pool):
    for bad in (0, -1, 0.0004, float("nan")):
        with pytest.raises(KeyPoolError, match="window must be at least 1 ms"):
            pool.add(KEYS[0], budget=3, window_s=bad)  # 0 or less restarted the window on every lease
    assert pool.list() == []
    kid = pool.add(KEYS[0], budget=3, window_s=120)
    assert pool.add(KEYS[0]) == kid  # again, without budget or window
    (info,) = pool.list()
    assert (info.budget, info.window_s) == (3, 120.0)  # kept (the budget used to be dropped)
    pool.add(KEYS[0], budget=5)
    (info,) = pool.list()
    assert (info.budget, info.window_s) == (5, 120.0)
    granted = 0
    with contextlib.suppress(KeyPoolError):
        for _ in range(10):
            pool.lease(wait=0)
            granted += 1
    assert granted == 5
    # over its budget the key is out until the window ends: the listing said "active", cooling nowhere
    (info,) = pool.list()
    assert info.state == "active" and info.cooldown_until is not None and info.cooldown_until > time.time() + 60
    pool.report(kid, 429, {"Retry-After": "3000"})
    pool.enable(kid)  # back at once: the old cooldown is not shown any more
    assert pool.list()[0].cooldown_until is None
    # the ready set lost (a partial restore, an eviction): the key looked active and was never leased again;
    # adding it again puts it back
    pool.remove(kid)
    other = pool.add(KEYS[1])
    pool.r.delete(pool.keys[0])
    pool.r.delete(pool.keys[1])
    with pytest.raises(NoHealthyKey):
        pool.lease(wait=0)
    pool.add(KEYS[1])
    assert pool.lease(wait=0).key_id == other


def _lease_at(pool: KeyPool, now_ms: int) -> tuple[bool, int]:
    """One run of the lease script with the clock at ``now_ms``: (granted, when the next key frees in ms)."""
    got = pool._lease(keys=pool.keys, args=[now_ms, FAILURE_PENALTY_LEASES, WINDOW_BUCKETS])
    return bool(got[0]), (-1 if got[0] else int(got[1]))


def test_a_budget_holds_over_every_sliding_window_not_only_fixed_ones(pool):
    """The budget was a fixed window opened by a lease: one lease, the rest of the budget just before the window
    ended, and a whole budget again just after sent nearly twice the budget within a second."""
    budget, window_ms = 7, 10_000
    width = window_ms // WINDOW_BUCKETS
    pool.add(KEYS[0], budget=budget, window_s=window_ms / 1000)
    t0 = 1_800_000_000_000  # a multiple of the bucket width: its first bucket ends at t0 + width - 1
    assert _lease_at(pool, t0)[0]
    assert all(_lease_at(pool, t0 + 9_000)[0] for _ in range(budget - 1))
    granted, free_at = _lease_at(pool, t0 + window_ms)
    assert not granted and free_at == t0 + width - 1 + window_ms  # a fixed window granted a whole budget here
    assert not _lease_at(pool, free_at - 1)[0]
    assert _lease_at(pool, free_at)[0] and not _lease_at(pool, free_at)[0]  # exactly the one that left


def test_budget_property_no_window_over_budget_and_no_refusal_without_cause(pool):
    """Random lease times against two keys: no window_s-long interval holds more than the budget of a key, and
    every refusal had the budget used within the window plus one bucket (the price of counting in buckets)."""
    budget, window_ms = 5, 3_010  # not a multiple of the bucket count: the slack is still one bucket
    width = window_ms // WINDOW_BUCKETS
    for k in KEYS[:2]:
        pool.add(k, budget=budget, window_s=window_ms / 1000)
    rng = random.Random(7)
    t = 1_800_000_000_123
    leases: dict[str, list[int]] = {}
    refusals = []
    for _ in range(1500):
        t += rng.choice([0, 0, 1, 7, 40, 150, 400, 1300])
        got = pool._lease(keys=pool.keys, args=[t, FAILURE_PENALTY_LEASES, WINDOW_BUCKETS])
        if got[0]:
            leases.setdefault(got[0].decode(), []).append(t)
        else:
            refusals.append((t, int(got[1])))
    assert len(leases) == 2 and refusals and sum(map(len, leases.values())) > 500
    for times in leases.values():
        for g in times:
            assert sum(g - window_ms < x <= g for x in times) <= budget
    for r, free_at in refusals:
        for times in leases.values():  # both keys were at their budget, counting one bucket of slack
            assert sum(r - window_ms - width < x <= r for x in times) >= budget
        assert r < free_at <= r + window_ms + width


def test_changing_a_keys_window_rereads_its_count_in_the_new_window(pool):
    """Buckets were stored by number, read back with the new window's width: widening 60 s to 90 s kept a key out
    for ~10,000 days, and narrowing it forgot recent leases (6 granted within 10 ms on a budget of 3)."""
    kid = pool.add(KEYS[0], budget=2, window_s=60)
    t = 1_800_000_000_000
    assert _lease_at(pool, t)[0] and _lease_at(pool, t + 10)[0]
    pool.add(KEYS[0], window_s=90)  # wider: both leases still count, and leave 90 s after their bucket
    granted, free_at = _lease_at(pool, t + 20)
    assert not granted and t + 90_000 <= free_at <= t + 90_000 + 90_000 // WINDOW_BUCKETS
    assert _lease_at(pool, free_at)[0]
    pool.r.hdel(pool.keys[2], f"{kid}:win_ring")
    assert _lease_at(pool, t + 200_000)[0] and _lease_at(pool, t + 200_001)[0]
    pool.add(KEYS[0], window_s=1)  # narrower: the two leases of a millisecond ago still count
    granted, free_at = _lease_at(pool, t + 200_002)
    # and leave a second after the end of the (90 s window's, 4.5 s) bucket they were counted in
    assert not granted and free_at <= t + 200_001 + 90_000 // WINDOW_BUCKETS + 1_000
    assert not _lease_at(pool, free_at - 1)[0] and _lease_at(pool, free_at)[0]


def test_a_refund_gives_back_the_bucket_its_lease_was_counted_in(pool):
    """The refund took the unit from the newest bucket: after another worker's lease there, the window held
    more used leases than the budget."""
    kid = pool.add(KEYS[0], budget=2, window_s=10)
    t = 1_800_000_000_000
    first = pool._lease(keys=pool.keys, args=[t, FAILURE_PENALTY_LEASES, WINDOW_BUCKETS])
    assert _lease_at(pool, t + 5_000)[0]  # another worker, another bucket
    pool._refund(keys=pool.keys[2:3], args=[kid, first[2]])  # the first was never sent
    ring = pool.r.hget(pool.keys[2], f"{kid}:win_ring").decode()
    assert ring == f"{t + 499}:0,{t + 5_499}:1"
    assert _lease_at(pool, t + 5_001)[0] and not _lease_at(pool, t + 5_002)[0]


def test_a_key_counted_by_the_older_fixed_window_keeps_its_count(pool):
    kid = pool.add(KEYS[0], budget=5, window_s=60)
    now_ms = int(time.time() * 1000)
    pool.r.hset(pool.keys[2], mapping={f"{kid}:win_start": now_ms - 1_000, f"{kid}:win_count": 3})
    granted = 0
    with contextlib.suppress(NoHealthyKey):
        for _ in range(5):
            pool.lease(wait=0)
            granted += 1
    assert granted == 2 and pool.list()[0].window_used == 5


def test_real_http_answers_set_cooldowns_to_the_second_and_401_deactivates(pool, api):
    ids = {kind: pool.add(f"{kind}-{uuid.uuid4().hex}") for kind in ("slow", "date", "reset", "bad")}
    by_id = {v: k for k, v in ids.items()}
    start = time.time()
    seen = {}
    for _ in range(4):
        lease = pool.lease(wait=0)
        seen[by_id[lease.key_id]] = call(api, pool, lease)
    assert seen == {"slow": 429, "date": 429, "reset": 403, "bad": 401}
    info = {by_id[k.key_id]: k for k in pool.list()}
    assert info["bad"].state == "deactivated"
    assert info["slow"].cooldown_until == pytest.approx(start + 2, abs=1.1)
    assert info["reset"].cooldown_until == pytest.approx(int(start) + 2, abs=1.1)
    assert info["date"].cooldown_until == pytest.approx(start + 3, abs=1.1)
    with pytest.raises(NoHealthyKey, match="next frees up") as exc:
        pool.lease(wait=0)
    earliest = min(info[k].cooldown_until for k in ("slow", "reset"))
    assert exc.value.next_free == pytest.approx(earliest, abs=0.01)
    # no key is leased while cooling: the first lease with waiting comes only once a cooldown is over
    # (HTTP dates and x-ratelimit-reset have whole-second resolution, so 'date' can tie with 'reset' when the
    # calls straddle a second boundary: any key whose own cooldown is over may come first)
    lease = pool.lease(wait=10)
    leased_at = time.time()
    assert leased_at >= earliest - 0.01 and by_id[lease.key_id] != "bad"
    assert info[by_id[lease.key_id]].cooldown_until <= leased_at + 0.01
    assert "bad" not in {by_id[pool.lease(wait=10).key_id] for _ in range(3)}


def test_exponential_cooldown_without_headers_and_success_resets(pool):
    kid = pool.add(KEYS[0])
    t0 = time.time()
    pool.report(kid, 429)
    first = pool.list()[0].cooldown_until - t0
    # base 1 s, jittered in [base/2, base]; the pool keeps whole milliseconds (the report's now is floored), so
    # a report in t0's own millisecond lands up to 1 ms under the bound (CI saw 0.49943); 2 ms leaves float slack
    ms = 0.002
    assert 0.5 - ms <= first <= 1.01
    pool.report(kid, 429)
    second = pool.list()[0].cooldown_until - t0
    assert 1.0 - ms <= second <= 2.01
    assert pool.list()[0].consecutive_failures == 2
    pool.enable(kid)
    pool.report(kid, 200)
    k = pool.list()[0]
    assert k.consecutive_failures == 0 and k.successes == 1 and k.failures == 2


def test_a_wait_for_a_cooling_key_ends_at_once_when_cancelled(pool):
    """Ctrl-C on a sharded ingest waited out a 40 s cooldown in silence: the shard threads slept in lease()."""
    from embedder.ingest.keypool import LeaseCancelled

    kid = pool.add(KEYS[0])
    pool.report(kid, 429, {"Retry-After": "40"})
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(LeaseCancelled, match="stopped while waiting"):
        pool.lease(wait=60, cancel=cancel)
    assert time.monotonic() - t0 < 5


def test_no_key_at_all_is_a_clear_error(pool):
    with pytest.raises(NoHealthyKey, match="add or enable one") as exc:
        pool.lease(wait=1)
    assert exc.value.next_free is None


def test_sixteen_threads_never_exceed_per_key_budgets_and_counters_are_exact(pool):
    ids = [pool.add(k, budget=300, window_s=3600) for k in KEYS]
    results: list[str | None] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = []
        for _ in range(500):
            try:
                mine.append(pool.lease(wait=0).key_id)
            except NoHealthyKey:
                mine.append(None)
        with lock:
            results.extend(mine)

    with ThreadPoolExecutor(16) as ex:
        for f in [ex.submit(worker) for _ in range(16)]:
            f.result()
    granted = [r for r in results if r is not None]
    assert len(results) == 8000 and len(granted) == 5 * 300  # capacity, exactly
    assert {i: granted.count(i) for i in ids} == dict.fromkeys(ids, 300)
    assert all(k.leases == 300 for k in pool.list())


def _lease_many(url: str, name: str, n: int, out: mp.Queue) -> None:
    pool = KeyPool(name, url, secret="")
    got = []
    for _ in range(n):
        got.append(pool.lease(wait=5).key_id)
    out.put(got)


def test_two_processes_share_one_pool(redis_server):
    name = f"shared-{uuid.uuid4().hex[:6]}"
    pool = KeyPool(name, redis_server.url, secret="")
    ids = [pool.add(k, budget=100, window_s=3600) for k in KEYS[:4]]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_lease_many, args=(redis_server.url, name, 200, q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = q.get(timeout=60) + q.get(timeout=60)
    for p in procs:
        p.join(30)
    assert len(got) == 400 and {i: got.count(i) for i in ids} == dict.fromkeys(ids, 100)
    with pytest.raises(NoHealthyKey):
        pool.lease(wait=0)


def test_keys_are_encrypted_at_rest_when_a_secret_is_set(redis_server):
    from cryptography.fernet import InvalidToken

    name = f"enc-{uuid.uuid4().hex[:6]}"
    pool = KeyPool(name, redis_server.url, secret="correct horse")
    kid = pool.add(KEYS[0])
    stored = redis.Redis.from_url(redis_server.url).hget(pool.keys[3], kid)
    assert KEYS[0].encode() not in stored
    assert pool.lease(wait=0).secret == KEYS[0]
    # scrypt-derived, salted by the pool; under the older "fernet:" prefix so that an older worker stops on it
    # instead of sending the ciphertext to the API as the key
    assert stored.startswith(b"fernet:scrypt:")
    wrong = KeyPool(name, redis_server.url, secret="wrong")
    with pytest.raises(KeyPoolError, match="cannot be decrypted"):
        wrong.lease(wait=0)
    # the same secret in another pool derives another key: a stored value does not decrypt there
    other = KeyPool(f"{name}x", redis_server.url, secret="correct horse")
    with pytest.raises(InvalidToken):
        other._fernet.decrypt(stored.removeprefix(b"fernet:scrypt:"))


def test_keys_stored_before_the_scrypt_derivation_still_decrypt(redis_server):
    """Keys were encrypted with the secret's SHA-256 as the Fernet key, with and without a "fernet:" prefix."""
    from embedder.ingest.keypool import _fernet

    name = f"enc-{uuid.uuid4().hex[:6]}"
    pool = KeyPool(name, redis_server.url, secret="correct horse")
    r = redis.Redis.from_url(redis_server.url)
    old = _fernet("correct horse")  # the SHA-256 one
    for raw, stored in ((KEYS[0], "fernet:" + old.encrypt(KEYS[0].encode()).decode()),
                        (KEYS[1], old.encrypt(KEYS[1].encode()).decode())):  # fmt: skip
        r.hset(pool.keys[3], pool.add(raw), stored)
    assert {pool.lease(wait=0).secret for _ in range(2)} == {KEYS[0], KEYS[1]}
    kid = pool.add(KEYS[0])  # adding it again re-stores it in the new format
    assert r.hget(pool.keys[3], kid).startswith(b"fernet:scrypt:")


def test_a_key_that_cannot_be_decrypted_is_not_charged(redis_server):
    """The lease counted the key's use and budget before the decrypt failed: a key never sent was charged."""
    name = f"enc-{uuid.uuid4().hex[:6]}"
    kid = KeyPool(name, redis_server.url, secret="correct horse").add(KEYS[0], budget=5, window_s=3600)
    wrong = KeyPool(name, redis_server.url, secret="wrong")
    for _ in range(3):
        with pytest.raises(KeyPoolError, match="cannot be decrypted"):
            wrong.lease(wait=0)
    (status,) = [k for k in wrong.list() if k.key_id == kid]
    assert status.leases == 0 and status.window_used == 0


def test_an_encrypted_key_is_never_sent_as_ciphertext_without_the_secret(redis_server):
    """With EMBEDSTORE_KEY_SECRET unset (compose's default is empty) the stored ciphertext was leased as the key:
    the API got a Fernet token, answered 401, and the key was deactivated."""
    name = f"enc-{uuid.uuid4().hex[:6]}"
    KeyPool(name, redis_server.url, secret="correct horse").add(KEYS[1])
    with pytest.raises(KeyPoolError, match="stored encrypted and EMBEDSTORE_KEY_SECRET is not set"):
        KeyPool(name, redis_server.url, secret="").lease(wait=0)


def test_redis_down_is_a_clear_error_and_recovery_works(tmp_path):
    server = RedisServer(tmp_path)
    try:
        url = f"redis://:hunter2@127.0.0.1:{server.port}/0"
        r = redis.Redis(port=server.port)
        r.config_set("requirepass", "hunter2")
        pool = KeyPool("down", url, secret="")
        pool.add(KEYS[0])
        assert pool.lease(wait=0).secret == KEYS[0]
        server.stop()
        with pytest.raises(KeyPoolUnavailable, match="unreachable") as exc:
            pool.lease(wait=0)
        assert "hunter2" not in str(exc.value) and "***" in str(exc.value)
        server.start()  # a fresh, empty server (no persistence): the pool says there is no key, it never guesses
        redis.Redis(port=server.port).config_set("requirepass", "hunter2")
        with pytest.raises(NoHealthyKey):
            pool.lease(wait=0)
        pool.add(KEYS[0])
        assert pool.lease(wait=0).secret == KEYS[0]
    finally:
        server.stop()


def test_raw_keys_appear_in_no_log_line(pool, api, caplog):
    caplog.set_level(logging.DEBUG)
    raws = [f"{kind}-{uuid.uuid4().hex}" for kind in ("ok", "slow", "bad")]
    ids = [pool.add(k) for k in raws]
    for _ in range(3):
        call(api, pool, pool.lease(wait=0))
    pool.disable(ids[0])
    pool.enable(ids[0])
    pool.remove(ids[0])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert ids[1] in text  # keys are logged, by id
    assert not any(raw in text for raw in raws)


def test_cooldown_header_parsing():
    now = 1_700_000_000.0
    assert cooldown_from_headers({"Retry-After": "30"}, now) == now + 30
    assert cooldown_from_headers({"retry-after": email.utils.formatdate(now + 90, usegmt=True)}, now) == now + 90
    assert cooldown_from_headers({"X-RateLimit-Reset": str(int(now) + 60)}, now) == int(now) + 60
    assert cooldown_from_headers({"x-ratelimit-reset": "45"}, now) == now + 45  # small: seconds from now
    assert cooldown_from_headers({}, now) is None
    assert cooldown_from_headers({"Retry-After": "soon"}, now) is None
    # an epoch in milliseconds was read as seconds (a cooldown to the year 58901 crashed the run and `keys list`),
    # and "inf" crashed the report with OverflowError: ms are read as ms, and no header cools a key past a day
    assert cooldown_from_headers({"x-ratelimit-reset": str(int((now + 60) * 1000))}, now) == pytest.approx(now + 60)
    assert cooldown_from_headers({"Retry-After": "inf"}, now) is None
    assert cooldown_from_headers({"Retry-After": "1e12"}, now) == now + 86_400
    from embedder.ingest.keypool import when_text

    assert when_text(1e15) == "a time too far to show" and when_text(0).startswith("1970-01-01")


def test_keys_cli(redis_server, monkeypatch):
    import json

    from typer.testing import CliRunner

    from embedder.cli import app

    monkeypatch.setenv("EMBEDSTORE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("EMBEDSTORE_KEY_SECRET", "s3cret")
    runner = CliRunner()
    api = f"cli-{uuid.uuid4().hex[:6]}"
    result = runner.invoke(app, ["keys", "add", api], input=KEYS[0] + "\n")  # prompted, hidden
    assert result.exit_code == 0, result.output
    kid = result.output.strip().splitlines()[-1]
    assert kid.startswith("k_") and KEYS[0] not in result.output
    result = runner.invoke(app, ["keys", "add", api, "--key", KEYS[1], "--budget", "10"])
    assert result.exit_code == 0
    listed = json.loads(runner.invoke(app, ["keys", "list", api, "--json"]).output)
    assert {k["key_id"] for k in listed} >= {kid} and any(k["budget"] == 10 for k in listed)
    for cmd in ("disable", "enable", "remove"):
        result = runner.invoke(app, ["keys", cmd, api, kid])
        assert result.exit_code == 0 and kid in result.output
    result = runner.invoke(app, ["keys", "disable", api, kid])
    assert result.exit_code == 2 and "no key" in result.output
    assert "plain text" not in result.output  # encrypted: no warning
    monkeypatch.delenv("EMBEDSTORE_KEY_SECRET")
    result = runner.invoke(app, ["keys", "add", api, "--key", KEYS[2]])
    assert result.exit_code == 0 and "stored in plain text in Redis" in " ".join(result.output.split())
    # unreachable: named without its password, whichever way the URL carries it (?password= was printed)
    for url in ("redis://:Pw777@127.0.0.1:1/0", "redis://127.0.0.1:1/0?password=Pw777"):
        monkeypatch.setenv("EMBEDSTORE_REDIS_URL", url)
        result = runner.invoke(app, ["keys", "list", api])
        assert result.exit_code == 2 and "unreachable" in result.output and "Pw777" not in result.output
