from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InspectNeighboursRequest(_message.Message):
    __slots__ = ("collection", "point_id", "k")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    POINT_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    collection: str
    point_id: str
    k: int
    def __init__(self, collection: _Optional[str] = ..., point_id: _Optional[str] = ..., k: _Optional[int] = ...) -> None: ...

class LabelState(_message.Message):
    __slots__ = ("label", "label_source", "pseudo_label", "pseudo_confidence", "pseudo_status", "effective_label")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_LABEL_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_STATUS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_LABEL_FIELD_NUMBER: _ClassVar[int]
    label: str
    label_source: str
    pseudo_label: str
    pseudo_confidence: float
    pseudo_status: str
    effective_label: str
    def __init__(self, label: _Optional[str] = ..., label_source: _Optional[str] = ..., pseudo_label: _Optional[str] = ..., pseudo_confidence: _Optional[float] = ..., pseudo_status: _Optional[str] = ..., effective_label: _Optional[str] = ...) -> None: ...

class InspectedPoint(_message.Message):
    __slots__ = ("id", "state", "payload")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: LabelState
    payload: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[LabelState, _Mapping]] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("point", "similarity")
    POINT_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    point: InspectedPoint
    similarity: float
    def __init__(self, point: _Optional[_Union[InspectedPoint, _Mapping]] = ..., similarity: _Optional[float] = ...) -> None: ...

class Agreement(_message.Message):
    __slots__ = ("label", "weighted", "unweighted", "labelled_neighbours", "majority_label", "majority_share")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_FIELD_NUMBER: _ClassVar[int]
    UNWEIGHTED_FIELD_NUMBER: _ClassVar[int]
    LABELLED_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_LABEL_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_SHARE_FIELD_NUMBER: _ClassVar[int]
    label: str
    weighted: float
    unweighted: float
    labelled_neighbours: int
    majority_label: str
    majority_share: float
    def __init__(self, label: _Optional[str] = ..., weighted: _Optional[float] = ..., unweighted: _Optional[float] = ..., labelled_neighbours: _Optional[int] = ..., majority_label: _Optional[str] = ..., majority_share: _Optional[float] = ...) -> None: ...

class InspectNeighboursResponse(_message.Message):
    __slots__ = ("point", "neighbours", "agreement")
    POINT_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    point: InspectedPoint
    neighbours: _containers.RepeatedCompositeFieldContainer[Neighbour]
    agreement: Agreement
    def __init__(self, point: _Optional[_Union[InspectedPoint, _Mapping]] = ..., neighbours: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., agreement: _Optional[_Union[Agreement, _Mapping]] = ...) -> None: ...
