"""retrieval: the embedstore vector store.

One contract (:class:`VectorStore`), two adapters: :class:`EdgeStore` (Qdrant
Edge, embedded, the default) and :class:`QdrantServerStore` (a Qdrant server or
cluster through qdrant-client). Every point holds a 512D Matryoshka vector as
``full512`` (rerank only) and its renormalised 128D prefix as ``mrl128``
(HNSW-indexed); a search shortlists on the prefix and reranks on the full vector.

This package imports neither ``embedder`` nor ``labeling``.
"""

from retrieval.base import VectorStore
from retrieval.config import StoreSettings
from retrieval.edge import EdgeStore
from retrieval.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    DimensionError,
    DuplicateIdError,
    EmptyBatchError,
    InvalidCollectionNameError,
    InvalidFilterError,
    InvalidInputError,
    InvalidPayloadError,
    InvalidVectorError,
    PointNotFoundError,
    SchemaMismatchError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreUnavailableError,
)
from retrieval.factory import collection_spec, open_store
from retrieval.filters import Filter, FilterLike, HasId, IsEmpty, Match, MatchAny, Range, as_filter
from retrieval.schema import (
    EXTERNAL_ID_KEY,
    FULL_DIM,
    FULL_VECTOR,
    INDEXED_KEYWORD_FIELDS,
    PREFIX_DIM,
    PREFIX_VECTOR,
    CollectionSpec,
    point_id,
)
from retrieval.server import QdrantServerStore
from retrieval.types import CollectionInfo, Hit, Record, ScrollPage

__all__ = [
    "EXTERNAL_ID_KEY",
    "FULL_DIM",
    "FULL_VECTOR",
    "INDEXED_KEYWORD_FIELDS",
    "PREFIX_DIM",
    "PREFIX_VECTOR",
    "CollectionExistsError",
    "CollectionInfo",
    "CollectionNotFoundError",
    "CollectionSpec",
    "DimensionError",
    "DuplicateIdError",
    "EdgeStore",
    "EmptyBatchError",
    "Filter",
    "FilterLike",
    "HasId",
    "Hit",
    "InvalidCollectionNameError",
    "InvalidFilterError",
    "InvalidInputError",
    "InvalidPayloadError",
    "InvalidVectorError",
    "IsEmpty",
    "Match",
    "MatchAny",
    "PointNotFoundError",
    "QdrantServerStore",
    "Range",
    "Record",
    "SchemaMismatchError",
    "ScrollPage",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "StoreSettings",
    "StoreUnavailableError",
    "VectorStore",
    "as_filter",
    "collection_spec",
    "open_store",
    "point_id",
]
