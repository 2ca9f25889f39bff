"""Ingestion: a Redis-backed API key pool shared by many workers, and a resumable paginated HTTP source."""

from embedder.ingest.keypool import (
    KeyInfo,
    KeyPool,
    KeyPoolError,
    KeyPoolUnavailable,
    Lease,
    NoHealthyKey,
    UnknownKey,
    cooldown_from_headers,
)

__all__ = [
    "KeyInfo",
    "KeyPool",
    "KeyPoolError",
    "KeyPoolUnavailable",
    "Lease",
    "NoHealthyKey",
    "UnknownKey",
    "cooldown_from_headers",
]
