"""One exception hierarchy for everything the store can refuse or fail at.

Every error is a :class:`StoreError`; callers that only care whether the store
worked catch that. Subclasses say *what* went wrong, and the input errors carry
the offending item's position and id so a caller can point at it.
"""

from __future__ import annotations

from typing import Any


def located(message: str, index: int | None = None, item_id: Any = None) -> str:
    """``message`` prefixed with where the offending item is: ``item 3, id 'x': ...``."""
    where = []
    if index is not None:
        where.append(f"item {index}")
    if item_id is not None:
        where.append(f"id {item_id!r}")
    return f"{', '.join(where)}: {message}" if where else message


class StoreError(Exception):
    """Base class of every error raised by :mod:`retrieval`."""


class InvalidInputError(StoreError, ValueError):
    """The caller passed something the store refuses. Nothing was written.

    ``index`` is the position of the offending item in the caller's batch (when
    there is one) and ``item_id`` its external id, so messages and RPC status
    details can name it.
    """

    def __init__(self, message: str, *, index: int | None = None, item_id: Any = None) -> None:
        self.index = index
        self.item_id = item_id
        super().__init__(located(message, index, item_id))


class EmptyBatchError(InvalidInputError):
    """A write or query batch had no items."""


class DimensionError(InvalidInputError):
    """A vector had the wrong shape."""


class InvalidVectorError(InvalidInputError):
    """A vector held NaN or infinity, or was all zeros (no direction for cosine)."""


class DuplicateIdError(InvalidInputError):
    """The same id appeared twice in one batch."""


class InvalidPayloadError(InvalidInputError):
    """A payload was not a JSON object of JSON values, or used a reserved key wrongly."""


class InvalidFilterError(InvalidInputError):
    """A payload filter could not be understood."""


class InvalidCollectionNameError(InvalidInputError):
    """A collection name outside ``[A-Za-z0-9_-]{1,64}``."""


class CollectionNotFoundError(StoreError, LookupError):
    """The named collection does not exist."""

    def __init__(self, collection: str) -> None:
        self.collection = collection
        super().__init__(
            f"collection {collection!r} does not exist (`embedstore index` / `ingest` create one; in Python, "
            "ensure_collection)"
        )


class CollectionExistsError(StoreError):
    """create_collection was asked for a name that is taken."""

    def __init__(self, collection: str) -> None:
        self.collection = collection
        super().__init__(f"collection {collection!r} already exists")


class SchemaMismatchError(StoreError):
    """An existing collection does not have the schema this version of embedstore writes."""


class PointNotFoundError(StoreError, LookupError):
    """One or more ids are not in the collection. Nothing was written."""

    def __init__(self, collection: str, missing: list[Any]) -> None:
        self.collection = collection
        self.missing = list(missing)
        shown = ", ".join(repr(m) for m in self.missing[:5])
        more = f" and {len(self.missing) - 5} more" if len(self.missing) > 5 else ""
        super().__init__(f"{len(self.missing)} id(s) not found in collection {collection!r}: {shown}{more}")


class StoreLockedError(StoreError):
    """Another process (or another open handle) owns the embedded store directory."""


class StoreFullError(StoreError):
    """Too little free space on the device holding the embedded store to write safely (nothing was written)."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The store could not be reached (server down, network error, closed handle)."""
