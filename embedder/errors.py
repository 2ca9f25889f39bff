"""Errors of the embedder: one hierarchy, each naming the offending item where there is one."""

from __future__ import annotations

from typing import Any

from retrieval.errors import located


class EmbedderError(Exception):
    """Base class of every error raised by :mod:`embedder`."""


class _ItemError(EmbedderError):
    """An error about one item of a batch: ``reason`` alone, and the message naming the item's index and id."""

    def __init__(self, message: str, *, index: int | None = None, item_id: Any = None) -> None:
        self.reason = message
        self.index = index
        self.item_id = item_id
        super().__init__(located(message, index, item_id))


class InvalidItemError(_ItemError, ValueError):
    """An item cannot be embedded (empty, corrupt image, unreadable file, ...). Nothing was embedded."""


class ModelUnavailableError(EmbedderError, RuntimeError):
    """Model weights or packages cannot be had here (offline, not installed, bad path)."""


class ProjectionNotFittedError(EmbedderError, RuntimeError):
    """No trained Matryoshka projection is available where one is required."""


class ModalityNotFittedError(_ItemError, RuntimeError):
    """An item has an image (or text) but the projection was fitted on items without any: it would
    silently drop that part of the item, so the item is refused, naming it."""


class EmbeddingVersionMismatchError(EmbedderError, RuntimeError):
    """A collection was written with another embedding version than the one in use."""

    def __init__(self, collection: str, stored: str, current: str) -> None:
        self.collection = collection
        self.stored = stored
        self.current = current
        super().__init__(
            f"collection {collection!r} holds embedding version {stored!r} but this embedder is {current!r}; "
            f"vectors from different projections are not comparable: run `embedstore reindex --collection "
            f"{collection}` to re-embed it, or load projection {stored!r}"
        )
