"""Deployment: the compose files validate (Debian's docker-compose, no engine needed), the cluster file asks
for the documented shards/replicas and the server adapter honours them, and `embedstore migrate` copies
an Edge collection to a server collection, resumably."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from embedder.cli import app
from retrieval import QdrantServerStore, StoreSettings, collection_spec
from retrieval.errors import InvalidInputError
from retrieval.migrate import MIGRATION_KEY, migrate
from tests.conftest import clustered, free_port, make_edge

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cluster.yml")


def _config(name: str, **env: str) -> dict:
    """The file as docker-compose resolves it (anchors merged, env interpolated, with ``env`` set on the host):
    fails on an invalid file."""
    out = subprocess.run(
        ["docker-compose", "-f", str(ROOT / name), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, f"{name} does not validate: {out.stderr}"
    return yaml.safe_load(out.stdout)


def _port(entry) -> tuple[str | None, str]:
    """(host address, container port) of a resolved ports entry: "127.0.0.1:6379:6379/tcp" or a mapping."""
    if isinstance(entry, dict):
        return entry.get("host_ip"), str(entry["target"])
    parts = str(entry).split("/")[0].split(":")
    return (parts[0] if len(parts) == 3 else None), parts[-1]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_validate_and_wire_the_service_to_healthy_backends(name):
    cfg = _config(name)
    svc = cfg["services"]["embedstore"]
    assert set(svc["depends_on"]) >= {"redis"} and all(
        d["condition"] == "service_healthy" for d in svc["depends_on"].values()
    )
    env = svc["environment"]
    settings = StoreSettings(backend=env["EMBEDSTORE_BACKEND"], url=env["EMBEDSTORE_URL"])
    assert settings.backend == "server" and env["EMBEDSTORE_REDIS_URL"].startswith("redis://redis:")
    assert "embedstore" in " ".join(svc["healthcheck"]["test"]) and "health" in svc["healthcheck"]["test"]
    assert {"50051", "9464"} <= {_port(p)[1] for p in svc["ports"]}
    # the shutdown (grace, then flush and close: 14-15.5 s measured) fits before Docker's SIGKILL, and every
    # service comes back after a crash or a host reboot
    grace = float(env["EMBEDSTORE_GRPC_GRACE_S"])
    assert _seconds(svc["stop_grace_period"]) >= grace + 15, svc.get("stop_grace_period")
    assert all(s.get("restart") == "unless-stopped" for s in cfg["services"].values())
    # nothing is published beyond loopback by default: Qdrant and Redis have no key or password here
    published = [_port(p) for s in cfg["services"].values() for p in s.get("ports", [])]
    assert published and all(host == "127.0.0.1" for host, _ in published), published
    redis = cfg["services"]["redis"]
    assert "--appendonly" in redis["command"] and "redis-cli" in redis["healthcheck"]["test"]
    qdrants = [s for n, s in cfg["services"].items() if n == "qdrant" or n.startswith("qdrant-node")]
    assert qdrants and all("/readyz" in " ".join(q["healthcheck"]["test"]) for q in qdrants)
    if "qdrant-lb" in cfg["services"]:  # healthy while at least one node is in (deploy/qdrant-lb.cfg)
        assert "/healthz" in " ".join(cfg["services"]["qdrant-lb"]["healthcheck"]["test"])


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_pass_tls_through_and_stay_plaintext_without_it(name, tmp_path, monkeypatch):
    """TLS needed hand edits: neither file passed the certificate settings or mounted a certificate."""
    from embedder.config import ServerSettings

    def tls_of(svc: dict) -> ServerSettings:
        env = svc["environment"]
        return ServerSettings(tls_cert=env["EMBEDSTORE_GRPC_TLS_CERT"], tls_key=env["EMBEDSTORE_GRPC_TLS_KEY"])

    tls_keys = (
        "EMBEDSTORE_GRPC_TLS_CERT",
        "EMBEDSTORE_GRPC_TLS_KEY",
        "EMBEDSTORE_SERVER_TLS_NAME",
        "EMBEDSTORE_SERVER_CA",
    )
    for key in (*tls_keys, "EMBEDSTORE_TLS_DIR"):
        monkeypatch.delenv(key, raising=False)  # the host's own settings must not leak into the default case
    plain = _config(name)["services"]["embedstore"]
    assert tls_of(plain).tls_cert is None and tls_of(plain).tls_key is None  # "" from compose: TLS off
    svc = _config(
        name,
        EMBEDSTORE_GRPC_TLS_CERT="/data/tls/server.crt",
        EMBEDSTORE_GRPC_TLS_KEY="/data/tls/server.key",
        EMBEDSTORE_SERVER_TLS_NAME="embed.example.org",
        EMBEDSTORE_SERVER_CA="/data/tls/ca.pem",
        EMBEDSTORE_TLS_DIR=str(tmp_path),
    )["services"]["embedstore"]
    env = svc["environment"]
    assert (env["EMBEDSTORE_GRPC_TLS_CERT"], env["EMBEDSTORE_GRPC_TLS_KEY"]) == (
        "/data/tls/server.crt",
        "/data/tls/server.key",
    )
    assert (
        env["EMBEDSTORE_SERVER_TLS_NAME"] == "embed.example.org" and env["EMBEDSTORE_SERVER_CA"] == "/data/tls/ca.pem"
    )
    # unset, the health check's client settings read as plaintext
    from embedder.client import tls_from_env

    assert tls_from_env({k: plain["environment"][k] for k in tls_keys}) == {}
    mounts = dict(_mount(m) for m in svc["volumes"])
    assert mounts["/data/tls"] == (str(tmp_path), True)


def _mount(entry) -> tuple[str, tuple[str, bool]]:
    """(target, (source, read-only)) of a resolved volume: docker-compose v1 writes "source:target[:mode]",
    v2 a mapping."""
    if isinstance(entry, dict):
        return entry["target"], (entry.get("source", ""), bool(entry.get("read_only")))
    source, target, *mode = str(entry).split(":")
    return target, (source, mode == ["ro"])


def _seconds(duration: str) -> float:
    """A compose duration ("30s", "1m30s") in seconds."""
    import re

    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_a_broken_compose_file_is_refused(tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  qdrant:\n    image: qdrant/qdrant\n    depends_on: 5\n")
    out = subprocess.run(["docker-compose", "-f", str(bad), "config", "-q"], capture_output=True, text=True)
    assert out.returncode != 0 and "depends_on" in out.stderr


def test_cluster_file_runs_three_nodes_and_the_adapter_creates_six_shards_two_replicas():
    cfg = _config("docker-compose.cluster.yml")
    nodes = {n: s for n, s in cfg["services"].items() if n.startswith("qdrant-node")}
    assert len(nodes) == 3
    assert all(s["environment"]["QDRANT__CLUSTER__ENABLED"] == "true" for s in nodes.values())
    commands = [" ".join(s["command"]) for s in nodes.values()]
    assert sum("--uri" in c for c in commands) == 1 and sum("--bootstrap" in c for c in commands) == 2
    env = cfg["services"]["embedstore"]["environment"]
    settings = StoreSettings(
        backend="server",
        url=env["EMBEDSTORE_URL"],
        shard_number=env["EMBEDSTORE_SHARD_NUMBER"],
        replication_factor=env["EMBEDSTORE_REPLICATION_FACTOR"],
    )
    spec = collection_spec(settings)
    req = QdrantServerStore.create_request(spec)  # qdrant-client's CreateCollection: what the cluster receives
    assert (req.shard_number, req.replication_factor) == (6, 2)
    assert req.vectors["mrl128"].size == 128 and req.vectors["full512"].hnsw_config.m == 0
    with QdrantServerStore(location=":memory:") as store:  # local mode accepts it (it has no shards to report)
        store.create_collection("items", spec)
        info = store.collection_info("items")
        assert (info.spec["shard_number"], info.spec["replication_factor"]) == (6, 2)
    url = os.environ.get("QDRANT_URL")
    if url:  # a real server answers with its collection config
        with QdrantServerStore(url) as store:
            store.create_collection("embedstore_deploy_test", spec)
            try:
                params = store.client.get_collection("embedstore_deploy_test").config.params
                assert (params.shard_number, params.replication_factor) == (6, 2)
            finally:
                store.drop_collection("embedstore_deploy_test")


LB_CONFIG = ROOT / "deploy" / "qdrant-lb.cfg"


def _haproxy() -> str:
    """Debian's haproxy (``make test`` installs it); /usr/sbin is not on every user's PATH."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    assert found, "haproxy is missing: `make test` installs Debian's (apt-get install haproxy)"
    return found


def test_cluster_service_dials_a_load_balancer_over_every_node_on_both_ports():
    """It dialled node 1 only: while node 1 was down the service was UNAVAILABLE."""
    cfg = _config("docker-compose.cluster.yml")
    services = cfg["services"]
    nodes = sorted(n for n in services if n.startswith("qdrant-node"))
    env = services["embedstore"]["environment"]
    assert env["EMBEDSTORE_URL"] == "http://qdrant-lb:6333"
    assert services["embedstore"]["depends_on"]["qdrant-lb"]["condition"] == "service_healthy"
    lb = services["qdrant-lb"]
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in lb["volumes"]]
    assert any(m.startswith(str(LB_CONFIG)) and "haproxy.cfg" in m for m in mounts), mounts
    assert {_port(p)[1] for p in lb["ports"]} == {"6333", "6334"}  # the host's tools reach the cluster here
    assert not any(services[n].get("ports") for n in nodes)  # and not through node 1
    text = LB_CONFIG.read_text()
    for node in nodes:
        assert f"{node}:6333" in text and f"{node}:6334" in text  # every node, both ports
    # the gRPC port is checked itself, plus the node's readiness on its REST port; sessions to a node marked down
    # are cut (qdrant-client holds one connection), and a refused connection is redispatched
    assert "tcp-check connect port 6334" in text and "tcp-check connect port 6333" in text
    assert "on-marked-down shutdown-sessions" in text and "option redispatch" in text
    out = subprocess.run([_haproxy(), "-c", "-f", str(LB_CONFIG)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Configuration file is valid" in out.stdout + out.stderr, out.stderr


class _StandInRest(http.server.BaseHTTPRequestHandler):
    """A node's REST port as the load balancer sees it: /readyz (200, or 503 while not ready), / naming the node."""

    def do_GET(self) -> None:
        ready = self.server.ready.is_set()  # type: ignore[attr-defined]
        status = (200 if ready else 503) if self.path == "/readyz" else 200
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _StandInGrpc(socketserver.BaseRequestHandler):
    """A node's gRPC port as the load balancer sees it: accepts, says the node's name, holds the connection open
    until the other side closes it (as a gRPC client's HTTP/2 connection stays open)."""

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            self.request.sendall(self.server.name.encode() + b"\n")  # type: ignore[attr-defined]
            while self.request.recv(1024):
                pass


def _stand_ins(stack: contextlib.ExitStack) -> tuple[dict[int, Any], dict[int, Any], int, int]:
    """Nodes 1-3 on 127.0.0.2-4, each with a REST and a gRPC stand-in on the same two ports (the config's checks
    name one port for every node, as Qdrant's do)."""
    for _ in range(20):
        rest: dict[int, Any] = {}
        grpc: dict[int, Any] = {}
        try:
            for n in (1, 2, 3):
                host = f"127.0.0.{n + 1}"
                rest[n] = http.server.ThreadingHTTPServer(
                    (host, rest[1].server_address[1] if n > 1 else 0), _StandInRest
                )
                grpc[n] = socketserver.ThreadingTCPServer(
                    (host, grpc[1].server_address[1] if n > 1 else 0), _StandInGrpc
                )
        except OSError:  # a port taken on one of the addresses: draw again
            for server in (*rest.values(), *grpc.values()):
                server.server_close()
            continue
        for n in (1, 2, 3):
            for server, name in ((rest[n], f"node{n}"), (grpc[n], f"node{n} grpc")):
                server.name, server.ready, server.daemon_threads = name, threading.Event(), True  # type: ignore[attr-defined]
                server.ready.set()  # type: ignore[attr-defined]
                threading.Thread(target=server.serve_forever, daemon=True).start()
                stack.callback(server.server_close)
                stack.callback(server.shutdown)
        return rest, grpc, rest[1].server_address[1], grpc[1].server_address[1]
    raise AssertionError("no port free on 127.0.0.2-4 for the stand-in nodes")


def test_the_load_balancer_fails_over_when_a_node_stops_being_ready_or_goes_away(tmp_path):
    """The committed config, run by haproxy, with its node names pointed at local stand-ins (nodes 1-3 on
    127.0.0.2-4) and its ports renumbered: what the config decides is what is under test."""
    with contextlib.ExitStack() as stack:
        rest, grpc, rest_port, grpc_port = _stand_ins(stack)
        listen = {"6333": free_port(), "6334": free_port(), "8405": free_port()}
        text = LB_CONFIG.read_text()
        for port, local in listen.items():
            assert f"bind :{port}\n" in text
            text = text.replace(f"bind :{port}\n", f"bind 127.0.0.1:{local}\n")
        for n in (1, 2, 3):
            text = text.replace(f"qdrant-node-{n}:", f"127.0.0.{n + 1}:")
        text = text.replace("6333", str(rest_port)).replace("6334", str(grpc_port))
        assert "qdrant-node" not in text.split("\nglobal", 1)[1]
        cfg = tmp_path / "lb.cfg"
        cfg.write_text(text)
        log = stack.enter_context((tmp_path / "haproxy.log").open("w"))  # a file: an unread pipe can stall it
        proc = subprocess.Popen([_haproxy(), "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

        stack.callback(stop)

        def through_rest() -> str | None:
            try:
                return httpx.get(f"http://127.0.0.1:{listen['6333']}/", timeout=3).text
            except httpx.HTTPError:
                return None

        def through_grpc() -> str | None:
            try:
                with socket.create_connection(("127.0.0.1", listen["6334"]), timeout=3) as conn:
                    return conn.makefile().readline().strip() or None
            except OSError:
                return None

        def healthy() -> int:
            try:
                return httpx.get(f"http://127.0.0.1:{listen['8405']}/healthz", timeout=3).status_code
            except httpx.HTTPError:
                return 0

        def seen(tries: int = 12) -> tuple[set[str | None], set[str | None]]:
            return {through_rest() for _ in range(tries)}, {through_grpc() for _ in range(tries)}

        def nodes(*ns: int) -> tuple[set[str], set[str]]:
            return {f"node{n}" for n in ns}, {f"node{n} grpc" for n in ns}

        def wait_for(check, what: str, timeout: float = 30.0) -> None:
            deadline = time.monotonic() + timeout
            while not check():
                assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
                assert time.monotonic() < deadline, f"{what}: {seen()}"
                time.sleep(0.2)

        wait_for(lambda: healthy() == 200 and seen() == nodes(1, 2, 3), "all three nodes in, on both ports")
        # the service's one long-lived gRPC connection, on some node: it is cut when that node is marked down
        held = socket.create_connection(("127.0.0.1", listen["6334"]), timeout=30)
        stack.callback(held.close)
        x = int(held.makefile().readline().split()[0].removeprefix("node"))
        y, z = (n for n in (1, 2, 3) if n != x)
        rest[x].ready.clear()  # up but not ready: out of both ports (the gRPC port's check reads /readyz too)
        wait_for(lambda: seen() == nodes(y, z), f"node {x} out")
        assert held.recv(1) == b""  # closed by the balancer, not left on the node
        grpc[y].shutdown(), grpc[y].server_close()  # node y's gRPC port gone, its REST port still ready
        rest[y].shutdown(), rest[y].server_close()
        assert None not in seen()[0] | seen()[1]  # refused connections go to another node (redispatch)
        wait_for(lambda: seen() == nodes(z), f"only node {z} left")
        assert healthy() == 200
        rest[x].ready.set()  # node x back
        wait_for(lambda: seen() == nodes(x, z), f"node {x} back")
        rest[x].ready.clear(), rest[z].ready.clear()  # none ready: the container's health check fails
        wait_for(lambda: healthy() == 503, "unhealthy with no node in")


def test_dockerfile_runs_as_non_root_with_a_grpc_health_check():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] != "USER root"
    assert any(ln.startswith("HEALTHCHECK") for ln in lines) and '"embedstore", "health"' in text
    assert "download.pytorch.org/whl/cpu" in text and "HF_HUB_OFFLINE=1" in text
    # every /data path the image's settings name exists in the image: `serve` refuses a set projection path that
    # does not exist (a typo), and a plain `docker run` without a mount must still start in store-only mode
    made = next(ln for ln in lines if "mkdir -p" in ln)
    for env_path in ("EMBEDSTORE_PROJECTION=/data/projection",):
        assert env_path in text and env_path.split("=")[1] in made.split()


def _filled_edge(path: Path, n: int = 700):
    x, labels = clustered(n, n_clusters=5, seed=3)
    ids = [f"item-{i}" for i in range(n)]
    payloads = [
        {"label": f"c{labels[i]}", "text": f"item {i}", "n": i} if i % 3 == 0 else {"text": f"item {i}", "n": i}
        for i in range(n)
    ]
    store = make_edge(path)
    store.create_collection("items")
    store.create_payload_index("items", "n", "integer")  # an index beyond the schema's
    store.upsert("items", ids, x, payloads)
    store.update_collection_metadata("items", {"embedding_version": "v-test", "labeling": {"active": None}})
    store.flush()
    return store, ids, x


def test_migrate_round_trip_edge_to_server_keeps_ids_vectors_payload_and_metadata(tmp_path):
    source, ids, x = _filled_edge(tmp_path / "edge")
    with source, QdrantServerStore(location=":memory:") as target:
        report = migrate(source, target, "items", page_size=64, workers=3)
        assert report.copied == report.total == len(ids) and not report.resumed
        got = {r.id: r for r in target.retrieve("items", ids, with_vectors="full512")}
        want = {r.id: r for r in source.retrieve("items", ids, with_vectors="full512")}
        assert set(got) == set(ids)
        for i in ids[::37]:
            assert got[i].point_id == want[i].point_id and got[i].payload == want[i].payload
            np.testing.assert_allclose(got[i].vector, want[i].vector, atol=1e-6)
        meta = target.collection_metadata("items")
        assert meta["embedding_version"] == "v-test" and meta[MIGRATION_KEY]["done"]
        q = x[5]
        # exact search on both sides: the same vectors give the same ranking (the approximate shortlists of two
        # different engines may legitimately differ)
        got_hits = target.search("items", q, top_k=10, exact=True)
        want_hits = source.search("items", q, top_k=10, exact=True)
        assert [h.id for h in got_hits] == [h.id for h in want_hits]
        np.testing.assert_allclose([h.score for h in got_hits], [h.score for h in want_hits], atol=1e-5)
        assert target.count("items", {"label": "c1"}) == source.count("items", {"label": "c1"})
        kinds = target.collection_info("items").payload_index_kinds
        assert kinds == source.collection_info("items").payload_index_kinds and kinds["n"] == "integer"
        assert target.count("items", {"n": {"lt": 10}}) == 10
        again = migrate(source, target, "items")  # finished: nothing to do
        assert again.copied == 0 and again.total == len(ids) and again.already_done


class _Interrupted(Exception):
    pass


def test_an_interrupted_migration_resumes_where_it_stopped(tmp_path):
    source, ids, _ = _filled_edge(tmp_path / "edge")
    with source, QdrantServerStore(location=":memory:") as target:
        seen: list[int] = []

        def stop_after_two_windows(done: int, total: int) -> None:
            seen.append(done)
            if len(seen) == 2:
                raise _Interrupted

        with pytest.raises(_Interrupted):
            migrate(source, target, "items", page_size=50, workers=2, progress=stop_after_two_windows)
        partial = target.count("items")
        assert partial == 200 and target.collection_metadata("items")[MIGRATION_KEY]["copied"] == 200
        report = migrate(source, target, "items", page_size=50, workers=2)
        assert report.resumed and report.copied == len(ids) - 200 and report.total == len(ids)
        with pytest.raises(InvalidInputError, match="holds a migration of"):
            source.create_collection("other")
            source.upsert("other", ["z"], np.ones((1, 512)), [{}])
            migrate(source, target, "other", target_collection="items")


def test_migrate_command_copies_to_a_server_and_reports(tmp_path):
    source, ids, _ = _filled_edge(tmp_path / "edge")
    source.close()
    # ":memory:" is qdrant-client's local mode, the same adapter as a real URL
    result = CliRunner().invoke(app, ["migrate", "--to-server", ":memory:", "--path", str(tmp_path / "edge")])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert f"now holds {len(ids)}" in flat and "the copy is discarded when this command exits" in flat
    result = CliRunner().invoke(app, ["migrate", "--to-server", " ", "--path", str(tmp_path / "edge")])
    assert result.exit_code == 2 and "--to-server needs the Qdrant server's URL" in result.output
