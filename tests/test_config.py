from __future__ import annotations

import pytest
from pydantic import ValidationError

from retrieval import EdgeStore, QdrantServerStore, StoreSettings, collection_spec, open_store


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDSTORE_PATH", str(tmp_path / "s"))
    monkeypatch.setenv("EMBEDSTORE_SHORTLIST", "250")
    monkeypatch.setenv("EMBEDSTORE_COLLECTION", "emoji")
    monkeypatch.setenv("EMBEDSTORE_API_KEY", "secret-key")
    s = StoreSettings()
    assert (s.backend, s.shortlist, s.collection) == ("edge", 250, "emoji")
    assert "secret-key" not in repr(s)  # secrets never printed
    with open_store(s) as store:
        assert isinstance(store, EdgeStore) and store.shortlist == 250
        assert store.path == tmp_path / "s"


def test_server_backend_needs_a_url(monkeypatch):
    monkeypatch.setenv("EMBEDSTORE_BACKEND", "server")
    with pytest.raises(ValidationError, match="EMBEDSTORE_URL"):
        StoreSettings()


@pytest.mark.parametrize(
    ("var", "value"),
    [("EMBEDSTORE_BACKEND", "faiss"), ("EMBEDSTORE_SHORTLIST", "0"), ("EMBEDSTORE_COLLECTION", "bad name")],
)
def test_bad_settings_are_refused(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        StoreSettings()


def test_open_store_with_overrides_builds_the_server_adapter():
    store = open_store(StoreSettings(), backend="server", url=":memory:")
    try:
        assert isinstance(store, QdrantServerStore) and store.local
    finally:
        store.close()


def test_collection_spec_carries_cluster_settings():
    spec = collection_spec(StoreSettings(shard_number=6, replication_factor=2))
    assert (spec.shard_number, spec.replication_factor) == (6, 2)


def test_an_unreachable_server_names_the_grpc_port_that_was_dialled(monkeypatch):
    from retrieval import StoreUnavailableError

    monkeypatch.setenv("EMBEDSTORE_QDRANT_GRPC_PORT", "9")  # discard: nothing listens
    settings = StoreSettings(backend="server", url="http://127.0.0.1:6333", timeout=2)
    assert settings.qdrant_grpc_port == 9
    with open_store(settings) as store, pytest.raises(StoreUnavailableError, match=r"gRPC port 9\)") as err:
        store.list_collections()
    assert "127.0.0.1:9" in str(err.value)  # the port qdrant-client dialled is the one named
