"""gRPC load benchmark: Search and Embed through the server against the same work in-process.

    python benchmarks/grpc_load.py            # 100k points, 1/8/32 Search clients, Embed unary + stream
    python benchmarks/grpc_load.py --n 20000 --seconds 3   # quicker

What runs, in one process tree on this machine, side by side:

1. A Qdrant Edge store with ``n`` synthetic clustered 512D vectors (see
   retrieval.synthetic: the structure of a Matryoshka embedding, not real
   data) is built, and ``store.search`` is timed in-process (shortlist 100 on
   mrl128, rerank on full512, top 10, with payload): the baseline.
2. The store is closed and ``embedstore serve``'s server starts on it in a
   child process (real Lite0 + MiniLM encoders, a projection fitted on the
   real emoji set). Search by vector is driven by 1, 8 and 32 concurrent
   grpc.aio clients for a fixed time; QPS, p50 and p99 are recorded.
3. Embed on real emoji items (image + text): in-process ``Embedder.embed`` in
   batches of 64, against gRPC unary batches of 64 (1 and 4 clients) and one
   EmbedStream carrying every item.

Targets (issue 4): gRPC Search p50 overhead <= 0.5 ms over the in-process call;
EmbedStream >= 0.9 x in-process Embed throughput. Results:
benchmarks/results/grpc.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info  # noqa: E402

COLLECTION = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pcts(lat: list[float]) -> tuple[float, float]:
    arr = np.asarray(lat) * 1000
    return round(float(np.percentile(arr, 50)), 3), round(float(np.percentile(arr, 99)), 3)


# ------------------------------------------------------------------ set-up
def build_store(path: Path, n: int) -> np.ndarray:
    from retrieval import EdgeStore
    from retrieval.synthetic import clustered_vectors

    x, labels = clustered_vectors(n, n_clusters=100, seed=0, centres_seed=0)
    with EdgeStore(path) as store:
        store.create_collection(COLLECTION)
        step = 4096
        for s in range(0, n, step):
            ids = [f"p{i}" for i in range(s, min(n, s + step))]
            payloads = [{"label": f"c{labels[i]}", "split": "train"} for i in range(s, min(n, s + step))]
            store.upsert(COLLECTION, ids, x[s : s + step], payloads)
        store.optimize(COLLECTION)
    q, _ = clustered_vectors(2000, n_clusters=100, seed=1, centres_seed=0)
    return q


def fit_projection_dir(out: Path, epochs: int = 40) -> tuple[Path, list[Any]]:
    from embedder.datasets import load_items
    from embedder.encoders import EfficientNetEncoder, SentenceTransformerEncoder
    from embedder.features import FeatureCache
    from embedder.model import Embedder
    from embedder.projection import TrainConfig, fit_projection
    from embedder.training import features_for

    items = load_items("emoji")
    embedder = Embedder(EfficientNetEncoder(backend="onnx", threads=2), SentenceTransformerEncoder(threads=2))
    raw = features_for(items, embedder, cache_name="emoji", cache=FeatureCache(), progress=False)
    artifact = fit_projection(
        raw, [it.label for it in items], TrainConfig(epochs=epochs, seed=0), encoders=embedder.encoder_signatures()
    )
    artifact.save(out)
    return out, items


def _serve(store_path: str, projection_dir: str, port: int) -> None:
    from embedder.config import ServerSettings
    from embedder.encoders import EfficientNetEncoder, SentenceTransformerEncoder
    from embedder.model import Embedder
    from embedder.projection import ProjectionArtifact
    from embedder.service.server import EmbedstoreServer
    from retrieval import EdgeStore

    def make_embedder() -> Embedder:
        return Embedder(
            EfficientNetEncoder(backend="onnx", threads=2),
            SentenceTransformerEncoder(threads=2),
            ProjectionArtifact.load(projection_dir),
        )

    server = EmbedstoreServer(
        ServerSettings(
            host="127.0.0.1", port=port, metrics_port=0, max_concurrent=1024, runs_dir=Path(store_path).parent / "runs"
        ),
        embedder_factory=make_embedder,
        store_factory=lambda: EdgeStore(store_path),
        collection=COLLECTION,
    )
    asyncio.run(server.serve())


# ----------------------------------------------------------------- search
def inprocess_search(store_path: Path, queries: np.ndarray, seconds: float) -> dict[str, Any]:
    from retrieval import EdgeStore

    with EdgeStore(store_path) as store:
        for q in queries[:200]:
            store.search(COLLECTION, q, top_k=10, with_payload=True)
        lat: list[float] = []
        end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            store.search(COLLECTION, queries[i % len(queries)], top_k=10, with_payload=True)
            lat.append(time.perf_counter() - t0)
            i += 1
    p50, p99 = _pcts(lat)
    return {"rpc": "Search (in-process store call)", "clients": 1, "qps": round(len(lat) / seconds, 1),
            "p50_ms": p50, "p99_ms": p99}  # fmt: skip


async def grpc_search(target: str, queries: np.ndarray, clients: int, seconds: float) -> dict[str, Any]:
    import grpc

    from embedstore.v1 import store_pb2_grpc

    requests = _search_requests(queries)
    channels = [grpc.aio.insecure_channel(target) for _ in range(min(clients, 4))]
    stubs = [store_pb2_grpc.StoreServiceStub(c) for c in channels]
    lat: list[float] = []
    state = {"measure": False, "end": 0.0}

    async def worker(w: int) -> None:
        stub = stubs[w % len(stubs)]
        i = w
        while True:
            now = time.perf_counter()
            if state["end"] and now > state["end"]:
                return
            t0 = time.perf_counter()
            await stub.Search(requests[i % len(requests)])
            if state["measure"]:
                lat.append(time.perf_counter() - t0)
            i += clients

    tasks = [asyncio.ensure_future(worker(w)) for w in range(clients)]
    await asyncio.sleep(1.0)  # warm-up
    state["measure"] = True
    start = time.perf_counter()
    state["end"] = start + seconds
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for c in channels:
        await c.close()
    p50, p99 = _pcts(lat)
    return {"rpc": "Search", "clients": clients, "qps": round(len(lat) / elapsed, 1), "p50_ms": p50, "p99_ms": p99}


def _search_requests(queries: np.ndarray) -> list[Any]:
    from embedstore.v1 import store_pb2

    requests = []
    for q in queries:
        r = store_pb2.SearchRequest(collection=COLLECTION, top_k=10, with_payload=True)
        r.query.vector.values.extend(q.tolist())
        requests.append(r)
    return requests


def sync_search(target: str, queries: np.ndarray, seconds: float) -> dict[str, Any]:
    """One blocking client (grpc's sync stub, as embedder.client.Client uses), requests built beforehand."""
    import grpc

    from embedstore.v1 import store_pb2_grpc

    requests = _search_requests(queries)
    with grpc.insecure_channel(target) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        for r in requests[:200]:
            stub.Search(r)
        lat: list[float] = []
        start = time.perf_counter()
        end = start + seconds
        i = 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            stub.Search(requests[i % len(requests)])
            lat.append(time.perf_counter() - t0)
            i += 1
        elapsed = time.perf_counter() - start
    p50, p99 = _pcts(lat)
    return {"rpc": "Search (sync client)", "clients": 1, "qps": round(len(lat) / elapsed, 1), "p50_ms": p50,
            "p99_ms": p99}  # fmt: skip


def grpc_floor(target: str, seconds: float) -> dict[str, Any]:
    """An empty grpc.health.v1 Check on the same server and client stack: what any gRPC call costs here."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        for _ in range(200):
            stub.Check(request)
        lat: list[float] = []
        start = time.perf_counter()
        while time.perf_counter() < start + seconds:
            t0 = time.perf_counter()
            stub.Check(request)
            lat.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
    p50, p99 = _pcts(lat)
    return {"rpc": "Health.Check (empty call: the gRPC floor)", "clients": 1, "qps": round(len(lat) / elapsed, 1),
            "p50_ms": p50, "p99_ms": p99}  # fmt: skip


# ------------------------------------------------------- compiled client
CPP_DIR = ROOT / "benchmarks" / "cpp_client"


def _median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds of it: the median of each figure, and the rounds' p50s."""
    out = dict(rounds[0])
    for key in ("qps", "p50_ms", "p99_ms"):
        out[key] = round(float(np.median([r[key] for r in rounds])), 3)
    out["round_p50_ms"] = [r["p50_ms"] for r in rounds]
    return out


def build_cpp_client(cache: Path | None = None) -> tuple[Path | None, str]:
    """Compile benchmarks/cpp_client/search_client.cc against the system's gRPC C++ (Debian:
    libgrpc++-dev, protobuf-compiler-grpc). Returns (binary, "") or (None, why not). Cached under
    ~/.cache/embedstore/cpp-client/<digest of the sources and protos>, so a rerun does not recompile."""
    import hashlib
    import subprocess

    tools = {t: shutil.which(t) for t in ("g++", "protoc", "grpc_cpp_plugin", "pkg-config")}
    missing = [t for t, where in tools.items() if where is None]
    if missing:
        return None, f"not built: {', '.join(missing)} not found (Debian: g++ libgrpc++-dev protobuf-compiler-grpc)"
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"], capture_output=True, text=True, check=False
    )
    if flags.returncode != 0:
        return None, f"not built: pkg-config finds no grpc++/protobuf ({flags.stderr.strip()})"
    protos = ["embedstore/v1/types.proto", "embedstore/v1/store.proto"]
    sources = [ROOT / "protos" / p for p in protos] + [CPP_DIR / "health_check.proto", CPP_DIR / "search_client.cc"]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in sources) + flags.stdout.encode()).hexdigest()[:12]
    out = (cache or Path.home() / ".cache" / "embedstore" / "cpp-client") / digest
    binary = out / "search_client"
    if binary.exists():
        return binary, ""
    build = Path(tempfile.mkdtemp(prefix="cpp-client-"))
    try:
        steps = [
            [tools["protoc"], f"-I{ROOT / 'protos'}", f"-I{CPP_DIR}", f"--cpp_out={build}", f"--grpc_out={build}",
             f"--plugin=protoc-gen-grpc={tools['grpc_cpp_plugin']}", *protos, "health_check.proto"],
            [tools["g++"], "-O2", "-std=c++17", f"-I{build}", str(CPP_DIR / "search_client.cc"),
             *[str(build / p.replace(".proto", s)) for p in protos for s in (".pb.cc", ".grpc.pb.cc")],
             str(build / "health_check.pb.cc"), str(build / "health_check.grpc.pb.cc"),
             *flags.stdout.split(), "-o", str(build / "search_client")],
        ]  # fmt: skip
        for cmd in steps:
            run = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if run.returncode != 0:
                return None, f"not built: {Path(cmd[0]).name} failed: {run.stderr.strip()[-800:]}"
        out.mkdir(parents=True, exist_ok=True)
        shutil.move(str(build / "search_client"), binary)
        return binary, ""
    finally:
        shutil.rmtree(build, ignore_errors=True)


def cpp_rows(binary: Path, target: str, queries: np.ndarray, seconds: float, work: Path) -> list[dict[str, Any]]:
    """The empty Health.Check and Search by vector from the compiled client, one blocking call at a time."""
    import subprocess

    qfile = work / "queries.f32"
    np.ascontiguousarray(queries, dtype="<f4").tofile(qfile)
    run = subprocess.run(
        [str(binary), target, COLLECTION, str(qfile), str(queries.shape[1]), str(seconds), "200"],
        capture_output=True, text=True, check=True, timeout=seconds * 2 + 120,
    )  # fmt: skip
    got = json.loads(run.stdout)
    names = {"health": "Health.Check (C++ client)", "search": "Search (C++ client)"}
    return [
        {"rpc": names[k], "clients": 1, "qps": round(v["calls"] / v["seconds"], 1), "p50_ms": round(v["p50_ms"], 3),
         "p99_ms": round(v["p99_ms"], 3)}
        for k, v in got.items()
    ]  # fmt: skip


# ------------------------------------------------------------------ embed
def embed_rows(target: str, projection_dir: Path, items: list[Any], batch: int) -> list[dict[str, Any]]:
    from concurrent.futures import ThreadPoolExecutor

    from embedder.client import Client
    from embedder.encoders import EfficientNetEncoder, SentenceTransformerEncoder
    from embedder.model import Embedder, Item
    from embedder.projection import ProjectionArtifact

    wire = [Item(it.id, image=Path(it.image).read_bytes(), text=it.text) for it in items]
    chunks = [wire[s : s + batch] for s in range(0, len(wire), batch)]
    rows = []

    local = Embedder(
        EfficientNetEncoder(backend="onnx", threads=2),
        SentenceTransformerEncoder(threads=2),
        ProjectionArtifact.load(projection_dir),
    )
    local.embed(chunks[0])
    lat = []
    t0 = time.perf_counter()
    for c in chunks:
        t1 = time.perf_counter()
        local.embed(c)
        lat.append(time.perf_counter() - t1)
    inproc = len(wire) / (time.perf_counter() - t0)
    p50, p99 = _pcts(lat)
    rows.append({"rpc": f"Embed (in-process, batches of {batch})", "clients": 1,
                 "qps": round(len(chunks) / sum(lat), 2), "p50_ms": p50, "p99_ms": p99,
                 "items_per_s": round(inproc, 1)})  # fmt: skip
    del local

    with Client(target, timeout=600) as client:
        client.embed(chunks[0])
        for clients in (1, 4):
            lat = []

            def call(c: list[Any], lat: list[float] = lat) -> None:
                t1 = time.perf_counter()
                client.embed(c)
                lat.append(time.perf_counter() - t1)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(call, chunks))
            elapsed = time.perf_counter() - t0
            p50, p99 = _pcts(lat)
            rows.append({"rpc": f"Embed (unary, batches of {batch})", "clients": clients,
                         "qps": round(len(chunks) / elapsed, 2), "p50_ms": p50, "p99_ms": p99,
                         "items_per_s": round(len(wire) / elapsed, 1)})  # fmt: skip
        t0 = time.perf_counter()
        results = list(client.embed_stream(wire))
        elapsed = time.perf_counter() - t0
        assert len(results) == len(wire) and all(r.error is None for r in results)
        rows.append({"rpc": "EmbedStream (one stream, every item)", "clients": 1, "qps": round(1 / elapsed, 3),
                     "p50_ms": round(elapsed * 1000, 1), "p99_ms": round(elapsed * 1000, 1),
                     "items_per_s": round(len(wire) / elapsed, 1)})  # fmt: skip
    return rows


# ------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="stored points")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per Search row")
    parser.add_argument("--embed-items", type=int, default=768, help="emoji items pushed through Embed")
    parser.add_argument(
        "--epochs", type=int, default=40, help="projection training epochs (its quality is not measured here)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of the single-client rows (median reported)"
    )
    parser.add_argument(
        "--no-cpp-client", action="store_true", help="skip the compiled client's rows (built with g++ and gRPC C++)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grpc.json")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="embedstore-grpc-"))
    proc = None
    try:
        print(f"building a {args.n}-point Edge store ...", flush=True)
        queries = build_store(work / "store", args.n)
        print("fitting a projection on the real emoji features ...", flush=True)
        projection_dir, items = fit_projection_dir(work / "projection", args.epochs)
        rows = [inprocess_search(work / "store", queries, args.seconds)]
        print(rows[-1], flush=True)

        port = _free_port()
        target = f"127.0.0.1:{port}"
        proc = mp.get_context("spawn").Process(
            target=_serve, args=(str(work / "store"), str(projection_dir), port), daemon=True
        )
        proc.start()
        from embedder.client import Client

        with Client(target) as client:
            client.wait_ready(300)
            assert client.count(collection=COLLECTION).count == args.n
        # the single-client rows in interleaved rounds (Python floor, Python Search, then the compiled client's
        # two): this shared machine drifts, so each row's figure is the median of its rounds' p50s
        cpp_note, binary = "skipped (--no-cpp-client)", None
        if not args.no_cpp_client:
            binary, cpp_note = build_cpp_client()
            if binary is None:
                print(f"C++ client {cpp_note}", flush=True)
        rounds: dict[str, list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            got = [grpc_floor(target, args.seconds), sync_search(target, queries, args.seconds)]
            if binary is not None:
                got += cpp_rows(binary, target, queries, args.seconds, work)
            for row in got:
                rounds.setdefault(row["rpc"], []).append(row)
                print(f"round {r + 1}/{args.rounds}: {row}", flush=True)
        rows.extend(_median_row(rs) for rs in rounds.values())
        for clients in (1, 8, 32):
            rows.append(asyncio.run(grpc_search(target, queries, clients, args.seconds)))
            print(rows[-1], flush=True)
        for row in embed_rows(target, projection_dir, items[: args.embed_items], 64):
            rows.append(row)
            print(row, flush=True)
        proc.terminate()  # SIGTERM: the server drains and closes the store
        proc.join(60)
        # the in-process call again, on the same store once the server has let it go: the baseline is the
        # mean of before and after, so a drift of the machine during the gRPC rows shows in their spread
        after = inprocess_search(work / "store", queries, args.seconds)
        after["rpc"] = "Search (in-process store call, after the server)"
        rows.append(after)
        print(after, flush=True)
    finally:
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(30)
        shutil.rmtree(work, ignore_errors=True)

    inproc = round((rows[0]["p50_ms"] + after["p50_ms"]) / 2, 3)
    grpc1 = next(r for r in rows if r["rpc"] == "Search (sync client)")["p50_ms"]
    cpp = next((r["p50_ms"] for r in rows if r["rpc"] == "Search (C++ client)"), None)
    embed_local = next(r for r in rows if r["rpc"].startswith("Embed (in-process"))["items_per_s"]
    embed_stream = next(r for r in rows if r["rpc"].startswith("EmbedStream"))["items_per_s"]
    result = {
        "n": args.n,
        "rows": rows,
        "inprocess_p50_ms": inproc,  # mean of the in-process call before and after the server
        "search_overhead_p50_ms": round(grpc1 - inproc, 3),
        "grpc_floor_p50_ms": next(r for r in rows if r["rpc"].startswith("Health.Check"))["p50_ms"],
        # the same Search from a compiled client (C++ gRPC core, no Python on the client side): the part of
        # the overhead that the server and the wire add; None when the client could not be built (see note)
        "search_overhead_p50_ms_cpp_client": None if cpp is None else round(cpp - inproc, 3),
        "cpp_client": cpp_note or "built",
        "embed_stream_vs_inprocess": round(embed_stream / embed_local, 3),
        "targets": {
            "search overhead p50 <= 0.5 ms": grpc1 - inproc <= 0.5,
            "search overhead p50 <= 0.5 ms (C++ client)": None if cpp is None else cpp - inproc <= 0.5,
            "EmbedStream >= 0.9 x in-process": embed_stream / embed_local >= 0.9,
        },
        "machine": machine_info(),  # CPU, Python and package versions (benchmarks/machine.py)
        "data": "synthetic clustered 512D vectors for Search; real emoji items (image + text) for Embed",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("search_overhead_p50_ms", "search_overhead_p50_ms_cpp_client", "embed_stream_vs_inprocess", "targets")
    print(json.dumps({k: result[k] for k in keys}))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
