"""Shared fixtures: real stores only (Qdrant Edge on disk, qdrant-client local mode, a real server if QDRANT_URL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from retrieval import EdgeStore, QdrantServerStore, VectorStore
from retrieval.synthetic import clustered_vectors

# The contract suite runs on every adapter that can be reached here. A real
# server joins only when QDRANT_URL names one (no skipped placeholder otherwise).
STORE_KINDS = ["edge", "memory"] + (["server"] if os.environ.get("QDRANT_URL") else [])


def make_edge(path: os.PathLike[str] | str, **kw: object) -> EdgeStore:
    # Small thresholds so HNSW is really built (and used) on test-sized data.
    kw.setdefault("indexing_threshold_kb", 64)
    kw.setdefault("full_scan_threshold_kb", 16)
    return EdgeStore(path, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[VectorStore]:
    kind = request.param
    if kind == "edge":
        s: VectorStore = make_edge(tmp_path / "store")
    elif kind == "memory":
        s = QdrantServerStore(location=":memory:")
    else:
        s = QdrantServerStore(os.environ["QDRANT_URL"], api_key=os.environ.get("QDRANT_API_KEY"))
    yield s
    if kind == "server" and not s.closed:
        for name in s.list_collections():
            if name.startswith("t_"):
                s.drop_collection(name, missing_ok=True)
    s.close()


@pytest.fixture
def collection(store: VectorStore) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    store.create_collection(name)
    return name


def clustered(n: int, *, n_clusters: int = 20, seed: int = 0, spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Clustered 512D vectors whose leading dims carry most of the structure (like a Matryoshka embedding)."""
    return clustered_vectors(n, n_clusters=n_clusters, seed=seed, spread=spread, centres_seed=seed)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1)[:, :k]


# ------------------------------------------------------------------ embedder
@pytest.fixture(scope="session")
def image_encoder():
    from embedder.encoders import EfficientNetEncoder

    return EfficientNetEncoder(backend="onnx", threads=2)


@pytest.fixture(scope="session")
def text_encoder():
    from embedder.encoders import SentenceTransformerEncoder

    return SentenceTransformerEncoder(threads=2)


@pytest.fixture(scope="session")
def emoji_items():
    from embedder.datasets import emoji_items as load

    return load()


@pytest.fixture(scope="session")
def emoji_features(emoji_items, image_encoder, text_encoder, tmp_path_factory):
    """Raw features of the real emoji dataset (computed once per session, cached on disk for this run)."""
    from embedder.features import FeatureCache
    from embedder.model import Embedder
    from embedder.training import features_for

    embedder = Embedder(image_encoder, text_encoder)
    cache = FeatureCache(tmp_path_factory.mktemp("features"))
    return features_for(emoji_items, embedder, cache_name="emoji", cache=cache, progress=False)


@pytest.fixture(scope="session")
def fitted_projection(image_encoder, text_encoder, emoji_items, emoji_features):
    """A real Matryoshka projection fitted (briefly) on the real emoji features."""
    from embedder.model import Embedder
    from embedder.projection import TrainConfig, fit_projection

    sig = Embedder(image_encoder, text_encoder).encoder_signatures()
    labels = [it.label for it in emoji_items]
    return fit_projection(emoji_features, labels, TrainConfig(epochs=3, seed=1), encoders=sig, progress=False)


# --------------------------------------------------------------------- Redis
class RedisServer:
    """A real redis-server on a free loopback port (no persistence), stoppable and restartable."""

    def __init__(self, tmp: os.PathLike[str] | str) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.dir = str(tmp)
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import shutil
        import subprocess
        import time

        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
