"""Result types shared by both adapters (plain, immutable, backend-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

#: ``True`` returns the full 512D vector, a vector name returns that one.
WithVectors = bool | Literal["full512", "mrl128"]


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: the caller's id, the similarity, and what was asked for."""

    id: str
    point_id: str
    score: float
    payload: dict[str, Any] | None = None
    vector: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """One stored point as read back by retrieve or scroll."""

    id: str
    point_id: str
    payload: dict[str, Any] | None = None
    vector: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class ScrollPage:
    """A page of a scroll; pass ``next_offset`` back to get the next, ``None`` at the end."""

    records: list[Record]
    next_offset: str | None


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    name: str
    backend: str
    points_count: int
    indexed_vectors_count: int
    spec: dict[str, Any] = field(default_factory=dict)
    payload_indexes: tuple[str, ...] = ()
    #: each indexed payload field's kind (keyword, integer, float, bool; "other" for kinds made outside embedstore)
    payload_index_kinds: dict[str, str] = field(default_factory=dict)
