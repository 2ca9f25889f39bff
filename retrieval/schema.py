"""The collection schema both adapters write, and the input checks they share.

A point is one item: a 512D Matryoshka vector stored twice, as

* ``full512``: the whole vector, L2-normalised; rerank only (no HNSW graph,
  ``m=0``), may live on disk;
* ``mrl128``: its first 128 dims, renormalised; HNSW-indexed and kept in RAM.

plus a JSON payload. Point ids are UUIDv5 of the caller's external id, so
re-ingesting an item overwrites it instead of duplicating it; the external id
is also kept in the payload (``external_id``) so results can be reported in the
caller's own ids.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.errors import (
    DimensionError,
    DuplicateIdError,
    EmptyBatchError,
    InvalidCollectionNameError,
    InvalidInputError,
    InvalidPayloadError,
    InvalidVectorError,
)

SCHEMA_VERSION = 1
FULL_VECTOR = "full512"
PREFIX_VECTOR = "mrl128"
FULL_DIM = 512
PREFIX_DIM = 128

EXTERNAL_ID_KEY = "external_id"
#: Payload fields that get a keyword index on both adapters. Values must be
#: strings (or null): a keyword index silently skips ints, which would make
#: facets and filtered counts lie.
INDEXED_KEYWORD_FIELDS: tuple[str, ...] = ("label", "pseudo_label", "pseudo_status", "split")

#: Fixed namespace for point ids. Changing it would orphan every stored point.
POINT_ID_NAMESPACE = uuid.UUID("6f1b5a52-2b7c-5d0e-9a57-3e2c1d9b8a10")
_NAMESPACE_BYTES = POINT_ID_NAMESPACE.bytes

PREFIX_QUANTIZATIONS = ("int8", "none")
# Qdrant's recommended quantile for int8: the extreme 1% of values are clipped, not stretched into the range.
INT8_QUANTILE = 0.99

_COLLECTION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

ExternalId = str | int


@dataclass(frozen=True)
class CollectionSpec:
    """How a collection is built. Stored with it, checked by ``ensure_collection``.

    ``shard_number`` and ``replication_factor`` only mean something on a Qdrant
    server or cluster; the embedded store is a single shard.
    """

    # HNSW of the mrl128 shortlist graph: Qdrant's defaults. Measured at 1M clustered
    # points: every miss of the two-stage search is an HNSW miss (the exact 128D top-100
    # always held the 512D top-10), and cheaper graphs (m=12 or ef_construct=64) fell to
    # recall@10 0.984-0.994, below the 0.99 bar; m=16/ef_construct=100 kept 0.998.
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    full_on_disk: bool = True
    # "int8": the mrl128 graph is built and searched on int8 scalar-quantized copies (quantile
    # 0.99) kept in RAM, and the float originals live on disk; the shortlist is not rescored on
    # them, because the full512 rerank that follows is the rescore. "none": float mrl128 in RAM.
    # Measured at 200k clustered points, side by side (README "Search"): optimize 17-19 s -> 10-13 s,
    # resident memory -17%, engine p50 0.41-0.50 -> 0.33-0.34 ms, recall@10 0.9998 -> 0.996-0.999.
    # Collections created before this field existed read as "none" (their segments have no
    # quantized copy).
    prefix_quantization: str = "int8"
    shard_number: int = 1
    replication_factor: int = 1
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        for name in ("hnsw_m", "hnsw_ef_construct", "shard_number", "replication_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"CollectionSpec.{name} must be a positive int, got {value!r}")
        if self.prefix_quantization not in PREFIX_QUANTIZATIONS:
            raise InvalidInputError(
                f"CollectionSpec.prefix_quantization must be one of {PREFIX_QUANTIZATIONS}, "
                f"got {self.prefix_quantization!r}"
            )

    @property
    def int8_prefix(self) -> bool:
        """Whether the mrl128 graph runs on int8 copies with the float originals on disk."""
        return self.prefix_quantization == "int8"

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> CollectionSpec:
        """The spec saved with a collection; fields added since it was saved take the value that
        describes how it was built (a collection from before ``prefix_quantization`` has none)."""
        return cls(**{"prefix_quantization": "none", **stored})

    def layout(self) -> dict[str, Any]:
        """The parts of the spec that must match for data to be readable."""
        return {
            "schema_version": self.schema_version,
            "vectors": {PREFIX_VECTOR: PREFIX_DIM, FULL_VECTOR: FULL_DIM},
            "distance": "cosine",
        }


def check_collection_name(name: str) -> str:
    if not isinstance(name, str) or not _COLLECTION_RE.match(name):
        raise InvalidCollectionNameError(f"collection name must match [A-Za-z0-9_-]{{1,64}}, got {name!r}")
    return name


def point_id(external_id: ExternalId) -> str:
    """The store's point id (UUIDv5) for a caller's external id.

    External ids are strings; ints are accepted and mean ``str(i)``, so ``7``
    and ``"7"`` are the same item.
    """
    return uuid5_str(_external_str(external_id))


def uuid5_str(name: str) -> str:
    """``str(uuid.uuid5(POINT_ID_NAMESPACE, name))``, made directly from the SHA-1 digest (RFC 4122
    section 4.3): 3x faster than building the UUID object, which ingest does once per point
    (measured: 200k ids 0.19 vs 0.58 s)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _external_str(external_id: ExternalId, index: int | None = None) -> str:
    if isinstance(external_id, bool) or not isinstance(external_id, (str, int)):
        raise InvalidInputError(f"external id must be a str or int, got {type(external_id).__name__}", index=index)
    text = str(external_id)
    if not text or len(text) > 1024:
        raise InvalidInputError("external id must be 1..1024 characters", index=index, item_id=external_id)
    if (bad := _bad_unicode(text)) is not None:
        raise InvalidInputError(
            f"external id is not valid Unicode (a lone surrogate at position {bad})",
            index=index,
            item_id=external_id,
        )
    return text


def _bad_unicode(text: str) -> int | None:
    """The position of the first character UTF-8 cannot encode (a lone surrogate), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


#: Integers the engines keep exactly: Qdrant stores int64 (Edge turned larger ones into floats silently).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_ids(ids: Sequence[ExternalId], *, what: str = "batch") -> list[str]:
    """Validate a batch of external ids; return them as strings. Rejects duplicates."""
    if isinstance(ids, (str, bytes)):
        raise InvalidInputError(f"ids must be a sequence of ids, not a single {type(ids).__name__}")
    ids = list(ids)
    if not ids:
        raise EmptyBatchError(f"empty {what}: no ids given")
    out: list[str] = []
    seen: dict[str, int] = {}
    for i, ext in enumerate(ids):
        text = _external_str(ext, i)
        if text in seen:
            raise DuplicateIdError(f"duplicate id in one {what} (first at item {seen[text]})", index=i, item_id=ext)
        seen[text] = i
        out.append(text)
    return out


def check_vectors(vectors: Any, ids: Sequence[Any] | None = None, *, what: str = "vector") -> np.ndarray:
    """Validate a batch of 512D vectors; return it as a float32 array (no copy if it already is one).

    Refuses the whole batch, naming the first bad item, on a wrong shape, NaN or
    infinity (also values that overflow float32), an all-zero vector, or a vector
    whose 128D prefix is all zeros (the prefix would have no direction to search
    by). Works in bounded chunks, so checking a million vectors needs no
    million-row temporaries.
    """

    def name(i: int) -> Any:
        return ids[i] if ids is not None and i < len(ids) else None

    if isinstance(vectors, np.ndarray):
        arr = vectors
    else:
        rows = list(vectors)
        if not rows:
            raise EmptyBatchError(f"empty batch: no {what}s given")
        for i, row in enumerate(rows):
            length = np.shape(row)
            if length != (FULL_DIM,):
                raise DimensionError(f"{what} must have {FULL_DIM} dims, got shape {length}", index=i, item_id=name(i))
        arr = np.asarray(rows)
    if arr.ndim == 1:
        raise DimensionError(f"expected a batch of {what}s with shape (n, {FULL_DIM}), got a single shape {arr.shape}")
    if arr.ndim != 2 or arr.shape[1] != FULL_DIM:
        raise DimensionError(f"{what}s must have shape (n, {FULL_DIM}), got {arr.shape}")
    if arr.shape[0] == 0:
        raise EmptyBatchError(f"empty batch: no {what}s given")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InvalidVectorError(f"{what}s must be real numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        arr32 = np.asarray(arr, dtype=np.float32)
    step = 16_384
    for start in range(0, arr32.shape[0], step):
        block = arr32[start : start + step]
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            i = start + int(np.flatnonzero(~finite)[0])
            raise InvalidVectorError(f"{what} contains NaN or infinity (in float32)", index=i, item_id=name(i))
        for bad, msg in (
            (
                ~block.any(axis=1),
                f"{what} is all zeros in float32 (cosine needs a direction; values below ~1e-45 underflow to 0 "
                "there: scale the vector up, its direction is what counts)",
            ),
            (
                ~block[:, :PREFIX_DIM].any(axis=1),
                f"{what}'s first {PREFIX_DIM} dims are all zeros in float32 (no prefix to shortlist on)",
            ),
        ):
            if bad.any():
                i = start + int(np.flatnonzero(bad)[0])
                raise InvalidVectorError(msg, index=i, item_id=name(i))
    return arr32


def normalise(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(full512, mrl128) of checked float32 vectors, each L2-normalised (norms taken in float64)."""
    norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    prefix = block[:, :PREFIX_DIM]
    prefix_norms = np.sqrt(np.einsum("ij,ij->i", prefix, prefix, dtype=np.float64))
    return (
        (block / norms[:, None]).astype(np.float32, copy=False),
        (prefix / prefix_norms[:, None]).astype(np.float32, copy=False),
    )


def prepare_vectors(
    vectors: Any, ids: Sequence[Any] | None = None, *, what: str = "vector"
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`check_vectors` then :func:`normalise`: (full512, mrl128), both unit-norm float32."""
    return normalise(check_vectors(vectors, ids, what=what))


def prepare_payloads(payloads: Sequence[Mapping[str, Any] | None] | None, ids: Sequence[str]) -> list[dict[str, Any]]:
    """Check payloads (JSON objects, finite numbers, string keyword fields); add ``external_id``."""
    if payloads is None:
        payloads = [None] * len(ids)
    payloads = list(payloads)
    if len(payloads) != len(ids):
        raise InvalidInputError(f"got {len(ids)} ids but {len(payloads)} payloads")
    out = []
    for i, (ext, payload) in enumerate(zip(ids, payloads, strict=True)):
        body = check_payload(payload, index=i, item_id=ext)
        given = body.get(EXTERNAL_ID_KEY)
        if given is not None and str(given) != ext:
            raise InvalidPayloadError(
                f"payload key {EXTERNAL_ID_KEY!r} is reserved and must equal the id, got {given!r}",
                index=i,
                item_id=ext,
            )
        body[EXTERNAL_ID_KEY] = ext
        out.append(body)
    return out


def check_payload(
    payload: Mapping[str, Any] | None, *, index: int | None = None, item_id: Any = None
) -> dict[str, Any]:
    """A copy of ``payload`` if it is a JSON object the store accepts, else InvalidPayloadError."""
    if payload is None:
        return {}
    if not isinstance(payload, Mapping):
        raise InvalidPayloadError(
            f"payload must be a JSON object (dict), got {type(payload).__name__}", index=index, item_id=item_id
        )
    body: dict[str, Any] = {}
    for key, value in payload.items():
        if not isinstance(key, str) or not key or _bad_unicode(key) is not None:
            raise InvalidPayloadError(
                f"payload keys must be non-empty valid strings, got {key!a}", index=index, item_id=item_id
            )
        value = _plain(value, f"payload[{key!r}]", index, item_id)
        if key in INDEXED_KEYWORD_FIELDS and value is not None and not isinstance(value, str):
            raise InvalidPayloadError(
                f"payload field {key!r} is keyword-indexed and must be a string or null, "
                f"got {type(value).__name__} {value!r}",
                index=index,
                item_id=item_id,
            )
        body[key] = value
    return body


def _plain(value: Any, where: str, index: int | None, item_id: Any) -> Any:
    """``value`` as plain JSON types (numpy scalars and tuples converted), or InvalidPayloadError."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if (bad := _bad_unicode(value)) is not None:
            raise InvalidPayloadError(
                f"{where} is not valid Unicode (a lone surrogate at position {bad}); the engine cannot store it",
                index=index,
                item_id=item_id,
            )
        return value
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidPayloadError(
                f"{where} = {value} is outside the 64-bit integers the store keeps exactly; store it as a string",
                index=index,
                item_id=item_id,
            )
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidPayloadError(f"{where} is {value}; JSON has no NaN or infinity", index=index, item_id=item_id)
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or _bad_unicode(k) is not None:
                raise InvalidPayloadError(
                    f"{where} has a key that is not a valid string: {k!a}", index=index, item_id=item_id
                )
            out[k] = _plain(v, f"{where}[{k!r}]", index, item_id)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{j}]", index, item_id) for j, v in enumerate(value)]
    raise InvalidPayloadError(
        f"{where} has type {type(value).__name__}, which is not a JSON value", index=index, item_id=item_id
    )
