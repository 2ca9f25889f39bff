from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunLabelingJobRequest(_message.Message):
    __slots__ = ("collection", "config")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    collection: str
    config: _struct_pb2.Struct
    def __init__(self, collection: _Optional[str] = ..., config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class IterationSummary(_message.Message):
    __slots__ = ("iteration", "heldout_macro_f1", "heldout_ece_raw", "heldout_ece_calibrated", "calibration_method", "accepted", "quarantined", "review", "revoked", "pseudo_precision", "breaker_tripped")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ECE_RAW_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ECE_CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_METHOD_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_PRECISION_FIELD_NUMBER: _ClassVar[int]
    BREAKER_TRIPPED_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    heldout_macro_f1: float
    heldout_ece_raw: float
    heldout_ece_calibrated: float
    calibration_method: str
    accepted: int
    quarantined: int
    review: int
    revoked: int
    pseudo_precision: float
    breaker_tripped: bool
    def __init__(self, iteration: _Optional[int] = ..., heldout_macro_f1: _Optional[float] = ..., heldout_ece_raw: _Optional[float] = ..., heldout_ece_calibrated: _Optional[float] = ..., calibration_method: _Optional[str] = ..., accepted: _Optional[int] = ..., quarantined: _Optional[int] = ..., review: _Optional[int] = ..., revoked: _Optional[int] = ..., pseudo_precision: _Optional[float] = ..., breaker_tripped: _Optional[bool] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("run_id", "run_dir", "written", "chosen_iteration", "stop_reason", "counts", "report")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_ITERATION_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    run_dir: str
    written: int
    chosen_iteration: int
    stop_reason: str
    counts: _containers.ScalarMap[str, int]
    report: _struct_pb2.Struct
    def __init__(self, run_id: _Optional[str] = ..., run_dir: _Optional[str] = ..., written: _Optional[int] = ..., chosen_iteration: _Optional[int] = ..., stop_reason: _Optional[str] = ..., counts: _Optional[_Mapping[str, int]] = ..., report: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class LabelingEvent(_message.Message):
    __slots__ = ("stage", "done", "total", "message", "iteration", "run")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    message: str
    iteration: IterationSummary
    run: RunSummary
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ..., iteration: _Optional[_Union[IterationSummary, _Mapping]] = ..., run: _Optional[_Union[RunSummary, _Mapping]] = ...) -> None: ...

class ListReviewQueueRequest(_message.Message):
    __slots__ = ("collection", "limit")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    limit: int
    def __init__(self, collection: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class ReviewItem(_message.Message):
    __slots__ = ("id", "text", "image", "pseudo_label", "pseudo_confidence", "review_score", "top", "labeling_run")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_LABEL_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    REVIEW_SCORE_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    LABELING_RUN_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    image: str
    pseudo_label: str
    pseudo_confidence: float
    review_score: float
    top: _containers.RepeatedCompositeFieldContainer[ClassScore]
    labeling_run: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., image: _Optional[str] = ..., pseudo_label: _Optional[str] = ..., pseudo_confidence: _Optional[float] = ..., review_score: _Optional[float] = ..., top: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., labeling_run: _Optional[str] = ...) -> None: ...

class ListReviewQueueResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ReviewItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ReviewItem, _Mapping]]] = ...) -> None: ...

class LabelAnswer(_message.Message):
    __slots__ = ("id", "label")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    label: str
    def __init__(self, id: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class SubmitLabelsRequest(_message.Message):
    __slots__ = ("collection", "answers", "source", "overwrite_human")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_HUMAN_FIELD_NUMBER: _ClassVar[int]
    collection: str
    answers: _containers.RepeatedCompositeFieldContainer[LabelAnswer]
    source: str
    overwrite_human: bool
    def __init__(self, collection: _Optional[str] = ..., answers: _Optional[_Iterable[_Union[LabelAnswer, _Mapping]]] = ..., source: _Optional[str] = ..., overwrite_human: _Optional[bool] = ...) -> None: ...

class SubmitLabelsResponse(_message.Message):
    __slots__ = ("written", "unchanged")
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    written: int
    unchanged: int
    def __init__(self, written: _Optional[int] = ..., unchanged: _Optional[int] = ...) -> None: ...

class ClearLabelsRequest(_message.Message):
    __slots__ = ("collection", "ids", "any_source")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ANY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    any_source: bool
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., any_source: _Optional[bool] = ...) -> None: ...

class ClearLabelsResponse(_message.Message):
    __slots__ = ("cleared", "unchanged")
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    cleared: int
    unchanged: int
    def __init__(self, cleared: _Optional[int] = ..., unchanged: _Optional[int] = ...) -> None: ...

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
