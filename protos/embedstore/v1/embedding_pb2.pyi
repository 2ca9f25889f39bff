from embedstore.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedRequest(_message.Message):
    __slots__ = ("items", "dimensions")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_types_pb2.Item]
    dimensions: int
    def __init__(self, items: _Optional[_Iterable[_Union[_types_pb2.Item, _Mapping]]] = ..., dimensions: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dimensions", "embedding_version")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[_types_pb2.Vector]
    dimensions: int
    embedding_version: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[_types_pb2.Vector, _Mapping]]] = ..., dimensions: _Optional[int] = ..., embedding_version: _Optional[str] = ...) -> None: ...

class EmbedStreamRequest(_message.Message):
    __slots__ = ("item", "dimensions")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    item: _types_pb2.Item
    dimensions: int
    def __init__(self, item: _Optional[_Union[_types_pb2.Item, _Mapping]] = ..., dimensions: _Optional[int] = ...) -> None: ...

class EmbedStreamResponse(_message.Message):
    __slots__ = ("sequence", "id", "embedding", "error")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    id: str
    embedding: _types_pb2.Vector
    error: _types_pb2.ItemError
    def __init__(self, sequence: _Optional[int] = ..., id: _Optional[str] = ..., embedding: _Optional[_Union[_types_pb2.Vector, _Mapping]] = ..., error: _Optional[_Union[_types_pb2.ItemError, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("embedding_version", "dimensions", "encoders_json", "max_batch", "max_message_bytes")
    EMBEDDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODERS_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    embedding_version: str
    dimensions: _containers.RepeatedScalarFieldContainer[int]
    encoders_json: str
    max_batch: int
    max_message_bytes: int
    def __init__(self, embedding_version: _Optional[str] = ..., dimensions: _Optional[_Iterable[int]] = ..., encoders_json: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
