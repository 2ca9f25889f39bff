"""Key pool benchmark: lease + report operations per second, our Lua scripts vs the article's SCAN + HGETALL.

    python benchmarks/keys.py                 # 10, 100, 1000 keys; starts its own redis-server on loopback

One "op" is a lease followed by a 200 report, by one client, against a real
redis-server (Debian's 7.0.x here) on loopback. ``scan`` is the article's
sketch: each key a hash ``<pool>:key:<id>``; a lease SCANs the pool's keys,
HGETALLs each, picks the least recently used one out of cooldown and writes
its ``last_used``; a report HSETs counters. It is O(N) round trips per lease
and not atomic (two workers can pick the same cooling key); ours is one
EVALSHA per lease and one per report. Both run in this process, one after the
other, for each key count. Results: benchmarks/results/keys.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info  # noqa: E402


class ScanPool:
    """The article's approach, written as fairly as we could: pipelined HGETALLs after each SCAN page."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.r = client
        self.prefix = f"scan:{name}:key:"

    def add(self, raw: str, i: int) -> None:
        self.r.hset(self.prefix + str(i), mapping={"key": raw, "cooldown_until": 0, "last_used": 0, "ok": 0})

    def lease(self) -> str:
        now = time.time()
        best, best_used = None, None
        for batch in self._scan():
            pipe = self.r.pipeline(transaction=False)
            for k in batch:
                pipe.hgetall(k)
            for k, h in zip(batch, pipe.execute(), strict=True):
                if float(h[b"cooldown_until"]) > now:
                    continue
                used = float(h[b"last_used"])
                if best_used is None or used < best_used:
                    best, best_used = k, used
        if best is None:
            raise RuntimeError("no key")
        self.r.hset(best, "last_used", now)
        return best

    def _scan(self) -> Iterator[list[bytes]]:
        cursor = 0
        while True:
            cursor, keys = self.r.scan(cursor, match=self.prefix + "*", count=1000)
            if keys:
                yield keys
            if cursor == 0:
                return

    def report(self, key: str, status: int) -> None:
        self.r.hincrby(key, "ok", 1)


def measure(fn: Callable[[], object], seconds: float) -> float:
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", default="10,100,1000")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per method and key count")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "keys.json")
    args = ap.parse_args()

    import redis

    from embedder.ingest import KeyPool
    from embedder.ingest.redis_server import RedisServer

    server = None
    url = args.redis_url
    if url is None:
        server = RedisServer(tempfile.mkdtemp(prefix="keys-bench-"))
        url = server.url
    rows = []
    try:
        client = redis.Redis.from_url(url)
        for n in [int(x) for x in args.keys.split(",")]:
            name = f"bench-{n}-{uuid.uuid4().hex[:6]}"
            pool = KeyPool(name, url, secret="")
            scan = ScanPool(client, name)
            for i in range(n):
                raw = f"key-{i}-{uuid.uuid4().hex}"
                pool.add(raw)
                scan.add(raw, i)

            def lua_op(pool: KeyPool = pool) -> None:
                lease = pool.lease(wait=0)
                pool.report(lease.key_id, 200)

            def scan_op(scan: ScanPool = scan) -> None:
                scan.report(scan.lease(), 200)

            for method, fn in (("lua", lua_op), ("scan", scan_op)):
                fn()  # warm-up (loads the scripts)
                ops = measure(fn, args.seconds)
                rows.append({"keys": n, "method": method, "ops_per_s": round(ops, 1)})
                print(f"{n:>5} keys  {method:<5} {ops:10.1f} lease+report/s", flush=True)
    finally:
        if server is not None:
            server.stop()
    by = {(r["keys"], r["method"]): r["ops_per_s"] for r in rows}
    out = {
        "rows": rows,
        "speedup_lua_over_scan": {str(n): round(by[(n, "lua")] / by[(n, "scan")], 1) for n, m in by if m == "lua"},
        "redis": "local redis-server on loopback, one client",
        "machine": machine_info(),  # CPU, Python and package versions (benchmarks/machine.py)
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
