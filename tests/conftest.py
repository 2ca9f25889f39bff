"""Shared fixtures: real stores only (Qdrant Edge on disk, qdrant-client local mode, a real server if QDRANT_URL)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from embedder.ingest.redis_server import RedisServer
from retrieval import EdgeStore, QdrantServerStore, VectorStore
from retrieval.synthetic import clustered_vectors

# The contract suite runs on every adapter that can be reached here. A real
# server joins only when QDRANT_URL names one (no skipped placeholder otherwise).
STORE_KINDS = ["edge", "memory"] + (["server"] if os.environ.get("QDRANT_URL") else [])


def free_port() -> int:
    """A loopback port free at the time of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
