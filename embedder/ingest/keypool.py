"""A pool of API keys shared by many workers, its state in Redis, every decision one atomic Lua script.

Layout for pool ``P`` (every Redis key shares the hash tag ``{embedstore:P}``, so
the scripts also run on Redis Cluster):

==========================  ====================================================
``{embedstore:P}:ready``    sorted set: leasable key ids, scored by the pool's lease sequence at their
                            last lease (+ a penalty per consecutive failure): lowest leased next (LRU)
``{embedstore:P}:cooling``  sorted set: key ids out until the score (epoch ms): rate-limited, or
                            over their request budget in the sliding window
``{embedstore:P}:stats``    hash: ``<id>:<field>`` -> state, counters, budget window (``win_ring``: leases per
                            bucket), last status
``{embedstore:P}:secrets``  hash: ``<id>`` -> the raw key (Fernet-encrypted when
                            ``EMBEDSTORE_KEY_SECRET`` is set, its key derived by scrypt); read only by ``lease``
==========================  ====================================================

``lease()`` moves keys whose cooldown ended back to ``ready``, takes the least
recently used key within its budget, counts it, and returns it - one EVALSHA,
O(log N), no SCAN. ``report()`` applies an HTTP outcome atomically: 2xx resets
the consecutive-failure count; 429/403 cool the key until ``Retry-After``
(seconds or HTTP date) or ``x-ratelimit-reset`` (epoch seconds), else for an
exponential per-key backoff with jitter; 401 deactivates it until re-enabled.
A key is known everywhere but in ``secrets`` by its id: ``k_`` + 12 hex of a
SHA-256 of pool and key.
"""

from __future__ import annotations

import base64
import datetime as _dt
import email.utils
import hashlib
import logging
import math
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from retrieval.config import safe_url

log = logging.getLogger("embedstore.keys")

ACTIVE, DISABLED, DEACTIVATED = "active", "disabled", "deactivated"
STAT_FIELDS = (
    "state",
    "added_at",
    "last_used",
    "last_seq",
    "leases",
    "successes",
    "failures",
    "consecutive_failures",
    "cooldown_until",
    "last_status",
    "budget",
    "window_ms",
    "win_ring",
    "win_start",  # the fixed window of older versions: read once into win_ring, deleted with the key
    "win_count",
)
#: LRU order is a per-pool lease sequence (strict, unlike millisecond clocks); each consecutive
#: failure pushes a key this many leases further back.
FAILURE_PENALTY_LEASES = 16
#: A key's budget is counted over a sliding window kept as this many buckets (a bucket is window / this long):
#: no ``window_s``-long interval holds more than ``budget`` leases, and a key over its budget comes back at
#: most one bucket (5% of the window) later than an exact log of every lease would let it. Buckets are stored
#: by their last millisecond, so changing a key's window re-reads them right.
WINDOW_BUCKETS = 20

# A key's budget entries in its stats field `<id>:win_ring`: "e:c,e:c,..." (a bucket's last millisecond, its lease
# count), oldest first. Read and written only through these two functions, which both scripts below include.
_RING = """
local function ring_read(stats, id)
  local es, cs = {}, {}
  local ring = redis.call('HGET', stats, id .. ':win_ring')
  for e, c in string.gmatch(ring or '', '(%d+):(%d+)') do es[#es + 1], cs[#cs + 1] = tonumber(e), tonumber(c) end
  return es, cs, ring
end
local function ring_write(stats, id, es, cs)
  local parts = {}
  for i = 1, #es do parts[i] = es[i] .. ':' .. cs[i] end
  redis.call('HSET', stats, id .. ':win_ring', table.concat(parts, ','))
end
"""

# KEYS: ready, cooling, stats, secrets. ARGV: now_ms, failure penalty (leases), buckets per budget window.
# Returns {id, secret, the budget entry that counted the lease (-1: none)} or {false, next_free_ms (-1: no key can
# ever free up)}.
_LEASE = (
    _RING
    + """
local ready, cooling, stats, secrets = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', cooling, '-inf', now)
for _, id in ipairs(due) do
  redis.call('ZREM', cooling, id)
  if redis.call('HGET', stats, id .. ':state') == 'active' then
    local cf = tonumber(redis.call('HGET', stats, id .. ':consecutive_failures') or '0')
    local last = tonumber(redis.call('HGET', stats, id .. ':last_seq') or '0')
    redis.call('ZADD', ready, last + cf * tonumber(ARGV[2]), id)
  end
end
while true do
  local head = redis.call('ZRANGE', ready, 0, 0)
  if #head == 0 then break end
  local id = head[1]
  local budget = tonumber(redis.call('HGET', stats, id .. ':budget') or '0')
  local ok, counted = true, -1
  if budget > 0 then
    -- sliding window: leases are counted per bucket of `width` ms, each entry "e:c" holding the bucket's last
    -- millisecond e (absolute, so a changed window reads old entries right) and its count c. An entry counts
    -- while it overlaps the last `window` ms (e > now - window): no `window`-long interval ever holds more than
    -- `budget` leases, and a lease is counted at most one bucket longer than it has to be.
    local window = tonumber(redis.call('HGET', stats, id .. ':window_ms'))
    local width = math.max(1, math.floor(window / tonumber(ARGV[3])))
    local e_now = (math.floor(now / width) + 1) * width - 1
    local all_es, all_cs, ring = ring_read(stats, id)
    if not ring then
      -- a key counted by the fixed window of older versions: its count stays counted, as of its last lease
      local count = tonumber(redis.call('HGET', stats, id .. ':win_count') or '0')
      local start = tonumber(redis.call('HGET', stats, id .. ':win_start') or '0')
      local last = tonumber(redis.call('HGET', stats, id .. ':last_used') or '0')
      if count > 0 and now - start < window then all_es, all_cs = {math.max(start, last)}, {count} end
    end
    local es, cs, sum = {}, {}, 0
    for i = 1, #all_es do
      if all_es[i] > now - window and all_cs[i] > 0 then
        es[#es + 1], cs[#cs + 1], sum = all_es[i], all_cs[i], sum + all_cs[i]
      end
    end
    if sum >= budget then
      ok = false
      -- out until enough of its oldest entries have left the window: entry e leaves at e + window
      local free, i = sum - budget + 1, 0
      repeat i = i + 1; free = free - cs[i] until free <= 0
      redis.call('ZREM', ready, id)
      redis.call('ZADD', cooling, es[i] + window, id)
    elseif #es > 0 and es[#es] >= e_now then
      cs[#cs] = cs[#cs] + 1  -- this bucket (or a later one, written by a worker whose clock runs ahead)
      counted = es[#es]
    else
      es[#es + 1], cs[#cs + 1], counted = e_now, 1, e_now
    end
    ring_write(stats, id, es, cs)
  end
  if ok then
    local cf = tonumber(redis.call('HGET', stats, id .. ':consecutive_failures') or '0')
    local seq = redis.call('HINCRBY', stats, '_seq', 1)
    redis.call('HSET', stats, id .. ':last_used', now, id .. ':last_seq', seq)
    redis.call('HINCRBY', stats, id .. ':leases', 1)
    redis.call('ZADD', ready, seq + cf * tonumber(ARGV[2]), id)
    return {id, redis.call('HGET', secrets, id), counted}
  end
end
local nxt = redis.call('ZRANGE', cooling, 0, 0, 'WITHSCORES')
if #nxt == 0 then return {false, -1} end
return {false, tonumber(nxt[2])}
"""
)

# KEYS: stats. ARGV: id, the budget entry the lease returned. Gives back what a lease of a key that could not be
# used (not decryptable) counted.
_REFUND = (
    _RING
    + """
local stats, id = KEYS[1], ARGV[1]
if tonumber(redis.call('HGET', stats, id .. ':leases') or '0') > 0 then
  redis.call('HINCRBY', stats, id .. ':leases', -1)
end
local es, cs, ring = ring_read(stats, id)
if ring and tonumber(ARGV[2]) >= 0 then
  -- the lease was counted in the entry ending at ARGV[2] (other workers may have leased since: not the latest)
  for i = 1, #es do
    if es[i] == tonumber(ARGV[2]) and cs[i] > 0 then cs[i] = cs[i] - 1 end
  end
  ring_write(stats, id, es, cs)
end
return 1
"""
)

# KEYS: ready, cooling, stats. ARGV: id, status, now_ms, until_ms (-1: none given), base_ms, cap_ms, u in [0,1).
# Returns the key's state after the report, or 'unknown'.
_REPORT = """
local ready, cooling, stats = KEYS[1], KEYS[2], KEYS[3]
local id, status, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HGET', stats, id .. ':state')
if not state then return 'unknown' end
redis.call('HSET', stats, id .. ':last_status', status)
if status >= 200 and status < 300 then
  redis.call('HINCRBY', stats, id .. ':successes', 1)
  redis.call('HSET', stats, id .. ':consecutive_failures', 0)
  if redis.call('ZSCORE', ready, id) then
    redis.call('ZADD', ready, tonumber(redis.call('HGET', stats, id .. ':last_seq') or '0'), id)
  end
  return state
end
redis.call('HINCRBY', stats, id .. ':failures', 1)
local cf = redis.call('HINCRBY', stats, id .. ':consecutive_failures', 1)
if status == 401 then
  redis.call('HSET', stats, id .. ':state', 'deactivated')
  redis.call('ZREM', ready, id)
  redis.call('ZREM', cooling, id)
  return 'deactivated'
end
if status == 429 or status == 403 then
  local untl = tonumber(ARGV[4])
  if untl < 0 then
    local backoff = math.min(tonumber(ARGV[6]), tonumber(ARGV[5]) * 2 ^ (cf - 1))
    untl = now + math.floor(backoff / 2 + tonumber(ARGV[7]) * backoff / 2)
  end
  redis.call('HSET', stats, id .. ':cooldown_until', untl)
  redis.call('ZREM', ready, id)
  if state == 'active' then redis.call('ZADD', cooling, untl, id) end
  return state
end
if redis.call('ZSCORE', ready, id) then
  local last = tonumber(redis.call('HGET', stats, id .. ':last_seq') or '0')
  redis.call('ZADD', ready, last + cf * tonumber(ARGV[8]), id)
end
return state
"""


class KeyPoolError(Exception):
    """Base of the key pool's errors."""


class KeyPoolUnavailable(KeyPoolError, ConnectionError):
    """Redis could not be reached: nothing is treated as healthy."""


class NoHealthyKey(KeyPoolError):
    """No key can be leased now (all cooling, over budget, disabled or deactivated)."""

    def __init__(self, message: str, next_free: float | None) -> None:
        super().__init__(message)
        self.next_free = next_free  # epoch seconds, or None when no key will free up by itself


class LeaseCancelled(KeyPoolError):
    """A wait for a key was cancelled (the run is stopping)."""


class UnknownKey(KeyPoolError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Lease:
    key_id: str
    secret: str = ""

    def __repr__(self) -> str:  # never print the secret
        return f"Lease(key_id={self.key_id!r})"


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    state: str
    leases: int
    successes: int
    failures: int
    consecutive_failures: int
    cooldown_until: float | None
    last_status: int | None
    last_used: float | None
    budget: int | None
    window_s: float | None
    #: leases counted against the budget now (in the sliding window); None without a budget
    window_used: int | None = None


def window_used(fields: Mapping[str, str], now_ms: int) -> int:
    """How many leases a key's budget counts at ``now_ms``, from its stats fields (the lease script's rule)."""
    window_ms = int(float(fields.get("window_ms") or 0))
    ring = fields.get("win_ring")
    if ring is None:  # counted by the older fixed window, not leased since
        count, start = int(float(fields.get("win_count") or 0)), int(float(fields.get("win_start") or 0))
        return count if now_ms - start < window_ms else 0
    used = 0
    for part in filter(None, ring.split(",")):
        end, _, count = part.partition(":")
        if float(end) > now_ms - window_ms:
            used += int(float(count))
    return used


def key_id(pool: str, raw: str) -> str:
    return "k_" + hashlib.sha256(f"{pool}\0{raw}".encode()).hexdigest()[:12]


#: Prefix of a key stored encrypted with a Fernet key derived by scrypt from the secret and the pool's name. It
#: begins with the older prefix on purpose: a worker from before the derivation sees an encrypted key it cannot
#: decrypt and stops; under any other prefix it took the ciphertext for a raw key, sent it to the API, and the
#: 401 deactivated the key for every worker.
ENCRYPTED = "fernet:scrypt:"
#: Prefix of a key stored before the scrypt derivation (the Fernet key was the secret's SHA-256): still read.
ENCRYPTED_SHA256 = "fernet:"
#: scrypt cost: 2**15 x 8 x 128 B = 32 MiB and 0.15-0.3 s per derivation on this 2-CPU machine, paid once per
#: pool object (each command, each ingest worker) and by every guess at the secret from a Redis dump. OWASP's
#: figure for stored passwords is N=2**17 (~1.3 s here): too slow for a CLI that builds a pool on every call,
#: and the README still asks for a long random secret.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


def _legacy_token(value: str) -> bool:
    """A key encrypted before the prefix: a Fernet token (version byte 0x80: base64 "gAAAAA", 100+ chars)."""
    return value.startswith("gAAAAA") and len(value) >= 100


def _fernet(secret: str, pool: str | None = None) -> Any:
    """The Fernet of ``secret``: scrypt-derived and salted by the pool's name, or (``pool=None``) the SHA-256
    one that keys stored before the derivation were encrypted with."""
    try:
        from cryptography.fernet import Fernet
    except ImportError as exc:  # pragma: no cover - cryptography is a dependency
        raise KeyPoolError("EMBEDSTORE_KEY_SECRET is set but the `cryptography` package is missing") from exc
    if pool is None:
        return Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest()))
    key = hashlib.scrypt(
        secret.encode(),
        salt=f"embedstore-keypool\0{pool}".encode(),
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=64 * 2**20,
        dklen=32,
    )
    return Fernet(base64.urlsafe_b64encode(key))


def when_text(epoch_s: float) -> str:
    """An epoch time as ISO text, or "never" beyond what a date can hold (a cooldown stored before the cap)."""
    try:
        return _dt.datetime.fromtimestamp(epoch_s, _dt.UTC).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return "a time too far to show"


#: The longest cooldown a rate-limit header may ask for (a day).
MAX_COOLDOWN_S = 86_400


def cooldown_from_headers(headers: Mapping[str, str] | None, now: float) -> float | None:
    """When a rate-limited key frees up (epoch seconds) per ``Retry-After`` or ``x-ratelimit-reset``; else None.

    ``Retry-After`` is delta-seconds or an HTTP date; ``x-ratelimit-reset`` is epoch
    seconds (GitHub's convention; a value below 10^9 is taken as seconds from now).
    An epoch above 10^12 is taken as milliseconds (some APIs send those). Whatever the header says, the result
    is at most :data:`MAX_COOLDOWN_S` from now: a value read wrong (an epoch in ms taken as seconds: the year
    58901) or ``inf`` crashed the run and every later ``keys list`` of the pool.
    """
    if not headers:
        return None
    h = {k.lower(): v for k, v in headers.items()}
    until: float | None = None
    ra = h.get("retry-after")
    if ra:
        ra = ra.strip()
        try:
            until = now + max(0.0, float(ra))
        except ValueError:
            try:
                until = email.utils.parsedate_to_datetime(ra).timestamp()
            except (TypeError, ValueError, OverflowError):
                log.warning("ignoring an unparseable Retry-After header")
    reset = h.get("x-ratelimit-reset")
    if until is None and reset:
        try:
            value = float(reset)
        except ValueError:
            return None
        if value >= 1e12:
            value /= 1000.0  # epoch milliseconds
        until = value if value >= 1e9 else now + max(0.0, value)
    if until is None or not math.isfinite(until):
        if until is not None:
            log.warning("ignoring a rate-limit header that is not a finite time")
        return None
    if until > now + MAX_COOLDOWN_S:
        log.warning("a rate-limit header asked for a cooldown of %.0f s; capped at %d s", until - now, MAX_COOLDOWN_S)
        until = now + MAX_COOLDOWN_S
    return until


def call_redis(url: str, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)``, Redis's failures as :class:`KeyPoolUnavailable` naming ``url`` (already masked) and
    ``what`` cannot be done: the key pool and the ingest checkpoint say it alike."""
    import redis

    try:
        return fn(*args, **kw)
    except redis.AuthenticationError:  # a ConnectionError to redis-py, but the server is there
        raise KeyPoolUnavailable(
            f"Redis at {url} refused the credentials: check the password in EMBEDSTORE_REDIS_URL; {what}"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise KeyPoolUnavailable(f"Redis at {url} is unreachable ({type(exc).__name__}); {what}") from None
    except redis.ResponseError as exc:  # an ACL without EVALSHA/EVAL (the pool runs Lua), a DB index out of range
        raise KeyPoolUnavailable(f"Redis at {url} refused a command ({type(exc).__name__}: {exc}); {what}") from None


class KeyPool:
    """The keys of one named API, shared through Redis by any number of workers and processes."""

    def __init__(
        self,
        pool: str,
        redis_url: str = "redis://localhost:6379/0",
        *,
        secret: str | None = None,
        backoff_base_s: float = 60.0,
        backoff_cap_s: float = 3600.0,
        client: Any = None,
    ) -> None:
        import redis

        if not pool or any(c in pool for c in "{}: "):
            raise KeyPoolError(f"pool name must be non-empty without braces, colons or spaces, got {pool!r}")
        self.pool = pool
        self.url = safe_url(redis_url)
        self.backoff_base_ms = int(backoff_base_s * 1000)
        self.backoff_cap_ms = int(backoff_cap_s * 1000)
        self._secret = secret if secret is not None else os.environ.get("EMBEDSTORE_KEY_SECRET")
        self._fernet = _fernet(self._secret, pool) if self._secret else None
        self._old_fernet: Any = None  # the SHA-256 Fernet, made when a key stored before scrypt is first read
        self.r = client or redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        tag = f"{{embedstore:{pool}}}"
        self.keys = [f"{tag}:ready", f"{tag}:cooling", f"{tag}:stats", f"{tag}:secrets"]
        self._lease = self.r.register_script(_LEASE)
        self._report = self.r.register_script(_REPORT)
        self._refund = self.r.register_script(_REFUND)

    # ------------------------------------------------------------------ plumbing
    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return call_redis(self.url, f"key pool {self.pool!r} cannot be used", fn, *args, **kw)

    def _stat(self, kid: str, field: str) -> str:
        return f"{kid}:{field}"

    # --------------------------------------------------------------------- admin
    def add(self, raw: str, *, budget: int | None = None, window_s: float | None = None) -> str:
        """Add a key (idempotent: the same key gets the same id and keeps its state). Returns its id.

        ``budget`` requests per ``window_s`` seconds (default 60). Adding a known key again changes only
        what is given: a budget or window left out keeps the key's current one."""
        if not isinstance(raw, str) or not raw.strip():
            raise KeyPoolError("an API key must be a non-empty string")
        if budget is not None and budget < 1:
            raise KeyPoolError(f"budget must be a positive number of requests per window, got {budget}")
        if window_s is not None and not window_s >= 0.001:  # also refuses NaN
            # a window of 0 or less restarts on every lease: the budget would never bind
            raise KeyPoolError(f"the budget window must be at least 1 ms, got {window_s} s")
        raw = raw.strip()
        kid = key_id(self.pool, raw)
        stored = ENCRYPTED + self._fernet.encrypt(raw.encode()).decode() if self._fernet else raw
        ready, cooling, stats, secrets = self.keys

        def tx(pipe: Any) -> None:
            exists = pipe.hget(stats, self._stat(kid, "state"))
            # an active key in neither set (a partial restore, an eviction) was never leased again, and adding
            # it again did not help: it goes back to `ready`
            lost = exists == ACTIVE.encode() and pipe.zscore(ready, kid) is None and pipe.zscore(cooling, kid) is None
            pipe.multi()
            pipe.hset(secrets, kid, stored)
            fields: dict[str, Any] = {}
            if budget is not None or not exists:
                fields[self._stat(kid, "budget")] = budget or 0
            if window_s is not None or not exists:
                fields[self._stat(kid, "window_ms")] = int((60.0 if window_s is None else window_s) * 1000)
            if not exists:
                fields[self._stat(kid, "state")] = ACTIVE
                fields[self._stat(kid, "added_at")] = int(time.time() * 1000)
            if not exists or lost:
                pipe.zadd(ready, {kid: 0})
            if fields:
                pipe.hset(stats, mapping=fields)

        self._call(self.r.transaction, tx, stats)
        log.info("key %s added to pool %s", kid, self.pool)
        return kid

    def _require(self, kid: str) -> str:
        state = self._call(self.r.hget, self.keys[2], self._stat(kid, "state"))
        if state is None:
            raise UnknownKey(f"no key {kid!r} in pool {self.pool!r}")
        return state.decode()

    def disable(self, kid: str) -> None:
        """Take a key out of rotation until :meth:`enable`."""
        self._require(kid)
        ready, cooling, stats, _ = self.keys
        pipe = self.r.pipeline()
        pipe.hset(stats, self._stat(kid, "state"), DISABLED).zrem(ready, kid).zrem(cooling, kid)
        self._call(pipe.execute)
        log.info("key %s disabled in pool %s", kid, self.pool)

    def enable(self, kid: str) -> None:
        """Put a disabled or deactivated (401) key back into rotation, failures forgotten."""
        self._require(kid)
        ready, cooling, stats, _ = self.keys
        pipe = self.r.pipeline()
        pipe.hset(
            stats,
            mapping={
                self._stat(kid, "state"): ACTIVE,
                self._stat(kid, "consecutive_failures"): 0,
                self._stat(kid, "cooldown_until"): 0,  # the listing kept showing the old cooldown
            },
        )
        pipe.zrem(cooling, kid).zadd(ready, {kid: 0})
        self._call(pipe.execute)
        log.info("key %s enabled in pool %s", kid, self.pool)

    def remove(self, kid: str) -> None:
        self._require(kid)
        ready, cooling, stats, secrets = self.keys
        pipe = self.r.pipeline()
        pipe.zrem(ready, kid).zrem(cooling, kid).hdel(secrets, kid)
        pipe.hdel(stats, *[self._stat(kid, f) for f in STAT_FIELDS])
        self._call(pipe.execute)
        log.info("key %s removed from pool %s", kid, self.pool)

    def list(self) -> list[KeyInfo]:
        """Every key's id, state and counters (never the raw key). An admin call: O(N)."""
        raw = self._call(self.r.hgetall, self.keys[2])
        # a key over its budget sits in `cooling` without a cooldown_until of its own: the set's score is when
        # it frees (the listing showed such a key active, with nothing cooling)
        out_until = {k.decode(): int(v) for k, v in self._call(self.r.zrange, self.keys[1], 0, -1, withscores=True)}
        by_id: dict[str, dict[str, str]] = {}
        for k, v in raw.items():
            kid, _, field = k.decode().rpartition(":")
            by_id.setdefault(kid, {})[field] = v.decode()
        out = []
        now_ms = int(time.time() * 1000)
        for kid, f in sorted(by_id.items()):
            if "state" not in f:
                continue

            def num(name: str, d: dict[str, str] = f) -> int:
                return int(float(d.get(name, 0) or 0))

            cooldown = max(num("cooldown_until"), out_until.get(kid, 0)) if f["state"] == ACTIVE else 0
            out.append(
                KeyInfo(
                    key_id=kid,
                    state=f["state"],
                    leases=num("leases"),
                    successes=num("successes"),
                    failures=num("failures"),
                    consecutive_failures=num("consecutive_failures"),
                    cooldown_until=cooldown / 1000 if cooldown > now_ms else None,
                    last_status=num("last_status") or None,
                    last_used=num("last_used") / 1000 or None,
                    budget=num("budget") or None,
                    window_s=num("window_ms") / 1000 if num("budget") else None,
                    window_used=window_used(f, now_ms) if num("budget") else None,
                )
            )
        return out

    @property
    def encrypts(self) -> bool:
        """Whether keys added through this pool are stored encrypted (EMBEDSTORE_KEY_SECRET is set)."""
        return self._fernet is not None

    # -------------------------------------------------------------------- leases
    def try_lease(self) -> Lease | float | None:
        """One atomic attempt: a :class:`Lease`, or when the next key frees up (epoch s), or None if none will."""
        now_ms = int(time.time() * 1000)
        got = self._call(self._lease, keys=self.keys, args=[now_ms, FAILURE_PENALTY_LEASES, WINDOW_BUCKETS])
        kid, value = got[0], got[1]
        if kid:
            try:
                return Lease(kid.decode(), self._decrypt(kid.decode(), value.decode() if value is not None else ""))
            except KeyPoolError:
                # the key was never used: its lease and budget unit are given back
                self._call(self._refund, keys=self.keys[2:3], args=[kid, got[2]])
                raise
        return None if value is None or int(value) < 0 else int(value) / 1000

    def _decrypt(self, kid: str, stored: str) -> str:
        """The raw key from what ``secrets`` holds: plain, or encrypted in either format."""
        if stored.startswith(ENCRYPTED):
            fernet, token = self._fernet, stored.removeprefix(ENCRYPTED)
        elif stored.startswith(ENCRYPTED_SHA256) or _legacy_token(stored):
            if self._secret and self._old_fernet is None:
                self._old_fernet = _fernet(self._secret)
            fernet, token = self._old_fernet, stored.removeprefix(ENCRYPTED_SHA256)
        else:
            return stored
        if fernet is None:
            # without this the ciphertext went to the API as the key, and the API's 401 deactivated it
            raise KeyPoolError(
                f"key {kid} is stored encrypted and EMBEDSTORE_KEY_SECRET is not set (or empty): set the secret it "
                "was added with"
            )
        from cryptography.fernet import InvalidToken

        try:
            return fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise KeyPoolError(
                f"key {kid} cannot be decrypted: EMBEDSTORE_KEY_SECRET differs from the one it was stored with"
            ) from None

    def lease(
        self, *, wait: float = 30.0, base_s: float = 0.05, cap_s: float = 5.0, cancel: threading.Event | None = None
    ) -> Lease:
        """The healthiest key; waits (at most ``wait`` s) for the earliest cooldown to end, with full jitter.

        Raises :class:`NoHealthyKey` naming when the next key frees up, and :class:`LeaseCancelled` as soon as
        ``cancel`` is set while waiting (Ctrl-C on a sharded ingest waited out a 40 s cooldown in silence).
        """
        deadline = time.monotonic() + wait
        attempt = 0
        while True:
            got = self.try_lease()
            if isinstance(got, Lease):
                return got
            now = time.time()
            remaining = deadline - time.monotonic()
            if got is None:
                raise NoHealthyKey(
                    f"no usable key in pool {self.pool!r}: every key is disabled or deactivated (401), or there are "
                    "none; add or enable one",
                    None,
                )
            if got - now > remaining:
                when = when_text(got)
                raise NoHealthyKey(
                    f"no healthy key in pool {self.pool!r}: all are cooling down or over budget; the next frees up "
                    f"at {when} (in {got - now:.1f}s), beyond the {wait:g}s wait",
                    got,
                )
            # sleep until it frees, plus full jitter so that waiting workers do not all retry at once
            jitter = random.uniform(0, min(cap_s, base_s * 2**attempt))
            pause = max(0.0, min(remaining, max(0.0, got - now) + jitter))
            if cancel is None:
                time.sleep(pause)
            elif cancel.wait(pause):
                raise LeaseCancelled(f"stopped while waiting for a key of pool {self.pool!r}")
            attempt += 1

    def report(self, kid: str, status: int, headers: Mapping[str, str] | None = None) -> str:
        """Apply an HTTP outcome to a key atomically; returns its state afterwards."""
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise KeyPoolError(f"status must be an HTTP status code, got {status!r}")
        now = time.time()
        until = cooldown_from_headers(headers, now) if status in (403, 429) else None
        state = self._call(
            self._report,
            keys=self.keys[:3],
            args=[
                kid,
                status,
                int(now * 1000),
                int(until * 1000) if until is not None else -1,
                self.backoff_base_ms,
                self.backoff_cap_ms,
                random.random(),
                FAILURE_PENALTY_LEASES,
            ],
        ).decode()
        if state == "unknown":
            raise UnknownKey(f"no key {kid!r} in pool {self.pool!r}")
        if status == 401:
            log.warning("key %s in pool %s answered 401: deactivated until re-enabled", kid, self.pool)
        elif status in (403, 429):
            log.info("key %s in pool %s rate-limited (%d): cooling down", kid, self.pool, status)
        return state
