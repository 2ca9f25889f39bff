"""Open the configured store: the one place that picks an adapter."""

from __future__ import annotations

from typing import Any

from retrieval.base import VectorStore
from retrieval.config import StoreSettings
from retrieval.schema import CollectionSpec


def open_store(settings: StoreSettings | None = None, *, create: bool = True, **overrides: Any) -> VectorStore:
    """The store described by ``settings`` (default: from the environment).

    ``overrides`` are StoreSettings fields, e.g. ``open_store(path="/tmp/s")``. ``create=False`` refuses
    an embedded store directory that does not exist yet (commands that only read or change one).
    """
    settings = settings or StoreSettings()
    if overrides:
        settings = settings.model_copy(update=overrides)
        settings = StoreSettings.model_validate(settings.model_dump())
    if settings.backend == "edge":
        from retrieval.edge import EdgeStore

        return EdgeStore(settings.path, shortlist=settings.shortlist, create=create)
    from retrieval.server import QdrantServerStore

    # EMBEDSTORE_URL=:memory: selects qdrant-client's local mode (tests, development).
    local = settings.url == ":memory:"
    return QdrantServerStore(
        None if local else settings.url,
        location=":memory:" if local else None,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        prefer_grpc=settings.prefer_grpc,
        grpc_port=settings.qdrant_grpc_port,
        timeout=settings.timeout,
        shortlist=settings.shortlist,
    )


def collection_spec(settings: StoreSettings) -> CollectionSpec:
    """The spec new collections get under these settings."""
    return CollectionSpec(shard_number=settings.shard_number, replication_factor=settings.replication_factor)
