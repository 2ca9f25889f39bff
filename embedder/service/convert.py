"""Between protobuf messages and the Python types of embedder/retrieval/labeling."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import json_format, struct_pb2

from embedder.model import Item
from embedstore.v1 import labeling_pb2, types_pb2
from labeling.inspect import InspectedPoint, Inspection
from retrieval import Hit, Record


class BadRequest(ValueError):
    """A request field is invalid (INVALID_ARGUMENT); the message names the field or item."""


def _integral(value: Any) -> Any:
    """Struct carries every number as a double: give integral ones back as ints (ids, counts, ranks)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def struct_to_dict(message: struct_pb2.Struct, present: bool = True) -> dict[str, Any] | None:
    """A Struct field as a dict (None when the field is unset). Integral numbers become ints."""
    if not present:
        return None
    return _integral(json_format.MessageToDict(message))


def dict_to_struct(values: Mapping[str, Any] | None, out: struct_pb2.Struct) -> None:
    if values:
        out.update(_jsonable(values))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def vector(message: types_pb2.Vector, *, dim: int, what: str) -> np.ndarray:
    values = np.asarray(message.values, dtype=np.float32)
    if values.shape[0] != dim:
        raise BadRequest(f"{what} has {values.shape[0]} dimensions, expected {dim}")
    if not np.isfinite(values).all():
        raise BadRequest(f"{what} contains NaN or infinite values")
    if not np.any(values):
        raise BadRequest(f"{what} is all zeros (no direction to compare)")
    return values


def item(message: types_pb2.Item, index: int | None = None) -> Item:
    return Item(
        id=message.id,
        image=bytes(message.image) if message.image else None,
        text=message.text if message.text else None,
    )


def fill_vector(out: types_pb2.Vector, values: np.ndarray) -> None:
    out.values.extend(np.asarray(values, dtype=np.float32).tolist())


def _public_payload(payload: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (payload or {}).items() if k != "external_id"}


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
