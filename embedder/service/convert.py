"""Between protobuf messages and the Python types of embedder/retrieval/labeling."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from embedder.model import Item
from embedstore.v1 import labeling_pb2, types_pb2
from labeling.inspect import InspectedPoint, Inspection
from retrieval import Hit, Record


class BadRequest(ValueError):
    """A request field is invalid (INVALID_ARGUMENT); the message names the field or item."""


def _read(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        x = value.number_value
        # Struct carries every number as a double: integral ones come back as ints (ids, counts, ranks).
        return int(x) if math.isfinite(x) and x.is_integer() and abs(x) < 2**53 else x
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: _read(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_read(v) for v in value.list_value.values]
    return None


def struct_to_dict(message: struct_pb2.Struct, present: bool = True) -> dict[str, Any] | None:
    """A Struct field as a dict (None when the field is unset). Integral numbers become ints."""
    if not present:
        return None
    return {k: _read(v) for k, v in message.fields.items()}


def _write(out: struct_pb2.Value, x: Any) -> None:
    if x is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(x, bool):
        out.bool_value = x
    elif isinstance(x, (int, float)):
        out.number_value = x
    elif isinstance(x, str):
        out.string_value = x
    elif isinstance(x, Mapping):
        fields = out.struct_value.fields
        for k, v in x.items():
            _write(fields[str(k)], v)
        if not x:
            out.struct_value.SetInParent()
    elif isinstance(x, (list, tuple)):
        values = out.list_value.values
        for v in x:
            _write(values.add(), v)
        if not x:
            out.list_value.SetInParent()
    elif isinstance(x, np.generic):
        _write(out, x.item())
    else:
        raise BadRequest(f"cannot send a {type(x).__name__} in a payload (use JSON types)")


def dict_to_struct(values: Mapping[str, Any] | None, out: struct_pb2.Struct) -> None:
    """Fill ``out`` from a JSON-like dict (written field by field: ~3x faster than Struct.update)."""
    if values:
        fields = out.fields
        for k, v in values.items():
            _write(fields[str(k)], v)


def vector(message: types_pb2.Vector, *, dim: int, what: str) -> np.ndarray:
    values = np.asarray(message.values, dtype=np.float32)
    if values.shape[0] != dim:
        raise BadRequest(f"{what} has {values.shape[0]} dimensions, expected {dim}")
    if not np.isfinite(values).all():
        raise BadRequest(f"{what} contains NaN or infinite values")
    if not np.any(values):
        raise BadRequest(f"{what} is all zeros (no direction to compare)")
    return values


def item(message: types_pb2.Item, item_id: str | None = None) -> Item:
    """The wire Item as an :class:`Item` (``item_id`` overrides the message's id, e.g. an UpsertPoint's)."""
    return Item(
        id=message.id if item_id is None else item_id,
        image=bytes(message.image) if message.image else None,
        text=message.text if message.text else None,
    )


def fill_vector(out: types_pb2.Vector, values: np.ndarray) -> None:
    out.values.extend(np.asarray(values, dtype=np.float32).tolist())


#: stored for the store's own use, never shown: the id mirror, and a labeling run's undo record (pseudo_prev)
_PRIVATE_KEYS = frozenset({"external_id", "pseudo_prev"})


def _public_payload(payload: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (payload or {}).items() if k not in _PRIVATE_KEYS}


def hit_to_proto(hit: Hit, out: types_pb2.ScoredPoint, with_payload: bool) -> None:
    out.id = hit.id
    out.score = float(hit.score)
    if with_payload and hit.payload:
        dict_to_struct(_public_payload(hit.payload), out.payload)


def record_to_proto(record: Record, out: types_pb2.Point) -> None:
    out.id = record.id
    if record.payload:
        dict_to_struct(_public_payload(record.payload), out.payload)
    if record.vector is not None:
        fill_vector(out.vector, record.vector)


def _inspected(point: InspectedPoint, out: labeling_pb2.InspectedPoint) -> None:
    out.id = point.id
    st = point.state
    out.state.label = st.label or ""
    out.state.label_source = st.label_source or ""
    out.state.pseudo_label = st.pseudo_label or ""
    if st.pseudo_confidence is not None:
        out.state.pseudo_confidence = st.pseudo_confidence
    out.state.pseudo_status = st.pseudo_status or ""
    out.state.effective_label = st.effective_label or ""
    dict_to_struct(point.payload, out.payload)


def inspection_to_proto(result: Inspection) -> labeling_pb2.InspectNeighboursResponse:
    response = labeling_pb2.InspectNeighboursResponse()
    _inspected(result.point, response.point)
    for n in result.neighbours:
        entry = response.neighbours.add()
        _inspected(n.point, entry.point)
        entry.similarity = n.similarity
    a = result.agreement
    response.agreement.label = a.label or ""
    response.agreement.weighted = a.weighted
    response.agreement.unweighted = a.unweighted
    response.agreement.labelled_neighbours = a.labelled_neighbours
    response.agreement.majority_label = a.majority_label or ""
    response.agreement.majority_share = a.majority_share
    return response


def review_item_to_proto(item: Any, out: labeling_pb2.ReviewItem) -> None:
    out.id = item.id
    out.text = item.text or ""
    out.image = item.image or ""
    out.pseudo_label = item.pseudo_label or ""
    if item.pseudo_confidence is not None:
        out.pseudo_confidence = float(item.pseudo_confidence)
    if item.review_score is not None:
        out.review_score = float(item.review_score)
    for label, p in item.top:
        out.top.add(label=label, probability=float(p))
    out.labeling_run = item.labeling_run or ""


def review_item_from_proto(q: labeling_pb2.ReviewItem) -> Any:
    """The client-side :class:`labeling.review.ReviewItem` of a ListReviewQueue entry."""
    from labeling.review import ReviewItem

    return ReviewItem(
        id=q.id,
        text=q.text or None,
        image=q.image or None,
        pseudo_label=q.pseudo_label or None,
        pseudo_confidence=q.pseudo_confidence if q.HasField("pseudo_confidence") else None,
        review_score=q.review_score if q.HasField("review_score") else None,
        top=[(t.label, t.probability) for t in q.top],
        labeling_run=q.labeling_run or None,
    )


def iteration_to_proto(stats: Any, breaker: bool) -> labeling_pb2.IterationSummary:
    out = labeling_pb2.IterationSummary(
        iteration=stats.iteration,
        heldout_macro_f1=stats.heldout_after.macro_f1,
        heldout_ece_raw=stats.heldout_before.ece,
        heldout_ece_calibrated=stats.heldout_after.ece,
        calibration_method=stats.calibration_method,
        accepted=stats.counts.get("accepted", 0),
        quarantined=stats.counts.get("quarantined", 0),
        review=stats.counts.get("review", 0),
        revoked=stats.revoked,
        breaker_tripped=breaker,
    )
    if stats.pseudo_precision is not None:
        out.pseudo_precision = stats.pseudo_precision
    return out


def event_to_proto(event: Any) -> labeling_pb2.LabelingEvent | None:
    """A job event as a stream message (None for the job's own "done": the summary replaces it)."""
    if event.stage == "done":
        return None
    msg = labeling_pb2.LabelingEvent(stage=event.stage, done=event.done, total=event.total, message=event.message)
    if event.stage == "iteration" and "stats" in event.data:
        msg.iteration.CopyFrom(iteration_to_proto(event.data["stats"], bool(event.data.get("breaker"))))
    return msg


def run_summary_to_proto(result: Any) -> labeling_pb2.LabelingEvent:
    from labeling.job import jsonable

    report = result.report
    msg = labeling_pb2.LabelingEvent(stage="done", done=1, total=1, message=result.run_id)
    run = msg.run
    run.run_id = result.run_id
    run.run_dir = str(result.run_dir)
    run.written = result.written
    run.chosen_iteration = report["chosen_iteration"]
    run.stop_reason = report["stop_reason"]
    for key, value in report["final"]["counts"].items():
        run.counts[key] = value
    dict_to_struct(jsonable(report), run.report)
    return msg
