"""Inspect a label beside its neighbourhood: the point, its k nearest neighbours, and their agreement.

Payload conventions (written by the labeling jobs, read here and by the gRPC
``LabelingService``):

==================  ==========================================================
``label``           ground truth (never overwritten by a labeling job)
``label_source``    where the ground truth came from (``human``, ...)
``pseudo_label``    the job's proposed label
``pseudo_confidence``  its calibrated probability
``pseudo_status``   the State Gate's verdict: ``accepted``, ``quarantined``, ``review``
==================  ==========================================================

A point's *effective label* is its ground truth, else its pseudo-label when
that was accepted, else none. The agreement of a neighbourhood is the
similarity-weighted share of neighbours with an effective label that carry the
label being judged (the point's effective label, else its pseudo-label of any
status, so a quarantined proposal can be checked against its neighbours too).
"""

from __future__ import annotations

import math
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from labeling.runs import load_registry, resolve
from retrieval import EXTERNAL_ID_KEY, VectorStore
from retrieval.errors import InvalidInputError


def spelling_key(label: str) -> str:
    """What two labels share when they differ only by case, spacing or Unicode form ("Flags", "flags ",
    "Food  &  Drink"; "café" written with a combining accent, as macOS and some CSV tools write it; full-width
    "Ｆｌａｇｓ"): the model learns such labels as separate classes, though a person almost surely meant one."""
    return " ".join(unicodedata.normalize("NFKC", label).split()).casefold()


ACCEPTED = "accepted"
QUARANTINED = "quarantined"
REVIEW = "review"
PSEUDO_STATUSES = (ACCEPTED, QUARANTINED, REVIEW)
MAX_K = 1000


@dataclass(frozen=True, slots=True)
class LabelState:
    label: str | None = None
    label_source: str | None = None
    pseudo_label: str | None = None
    pseudo_confidence: float | None = None
    pseudo_status: str | None = None

    @classmethod
    def from_payload(cls, payload: dict[str, Any] | None) -> LabelState:
        p = payload or {}

        def text(key: str) -> str | None:
            value = p.get(key)
            return None if value is None or value == "" else str(value)

        return cls(
            label=text("label"),
            label_source=text("label_source"),
            pseudo_label=text("pseudo_label"),
            pseudo_confidence=finite_number(p.get("pseudo_confidence")),
            pseudo_status=text("pseudo_status"),
        )

    @property
    def effective_label(self) -> str | None:
        if self.label is not None:
            return self.label
        if self.pseudo_status == ACCEPTED:
            return self.pseudo_label
        return None

    @property
    def judged_label(self) -> str | None:
        return self.effective_label or self.pseudo_label


def finite_number(value: Any) -> float | None:
    """A finite int/float payload value, else None (a bool, a string, NaN: not a score)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def top_classes(payload: dict[str, Any] | None) -> list[tuple[str, float]]:
    """The ``pseudo_top`` pairs (class, probability) of a payload, malformed entries left out.

    A payload is anyone's to write (a manifest, an older version, a hand edit); one point whose
    ``pseudo_top`` held a string where a number goes made the review queue fail for everyone (the web page's
    /review and the gRPC ListReviewQueue)."""
    raw = (payload or {}).get("pseudo_top")
    out: list[tuple[str, float]] = []
    if not isinstance(raw, list):
        return out
    for entry in raw:
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (str, int)):
            q = finite_number(entry[1])
            if q is not None and not isinstance(entry[0], bool):
                out.append((str(entry[0]), q))
    return out


@dataclass(frozen=True, slots=True)
class InspectedPoint:
    id: str
    state: LabelState
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Neighbour:
    point: InspectedPoint
    similarity: float


@dataclass(frozen=True, slots=True)
class Agreement:
    label: str | None
    weighted: float
    unweighted: float
    labelled_neighbours: int
    majority_label: str | None
    majority_share: float


@dataclass(frozen=True, slots=True)
class Inspection:
    point: InspectedPoint
    neighbours: list[Neighbour]
    agreement: Agreement


def _inspected(record_id: str, payload: dict[str, Any] | None) -> InspectedPoint:
    body = {k: v for k, v in (payload or {}).items() if k != EXTERNAL_ID_KEY}
    return InspectedPoint(record_id, LabelState.from_payload(body), body)


def agreement(label: str | None, neighbours: list[Neighbour]) -> Agreement:
    """How far ``neighbours`` agree with ``label`` (see the module docstring)."""
    labelled = [(n.point.state.effective_label, max(n.similarity, 0.0)) for n in neighbours]
    labelled = [(lab, w) for lab, w in labelled if lab is not None]
    if not labelled:
        return Agreement(label, 0.0, 0.0, 0, None, 0.0)
    weights: dict[str, float] = defaultdict(float)
    for lab, w in labelled:
        weights[lab] += w
    total = sum(weights.values())
    majority = max(sorted(weights), key=lambda lab: weights[lab])
    same = sum(1 for lab, _ in labelled if lab == label)
    return Agreement(
        label=label,
        weighted=weights.get(label, 0.0) / total if (label is not None and total > 0) else 0.0,
        unweighted=same / len(labelled) if label is not None else 0.0,
        labelled_neighbours=len(labelled),
        majority_label=majority,
        majority_share=weights[majority] / total if total > 0 else 0.0,
    )


def inspect_neighbours(
    store: VectorStore, collection: str, point_id: str, k: int = 10, *, shortlist: int | None = None
) -> Inspection:
    """The point ``point_id`` with its label state, its ``k`` nearest neighbours (itself left out) and their agreement.

    Raises :class:`retrieval.PointNotFoundError` for an unknown id.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidInputError(f"k must be an int in 1..{MAX_K}, got {k!r}")
    unapplied = load_registry(store, collection).unapplied
    record = store.retrieve(collection, [point_id], with_payload=True, with_vectors=True)[0]
    hits = store.search(
        collection,
        record.vector,
        top_k=k + 1,
        shortlist=None if shortlist is None else max(shortlist, k + 1),
        with_payload=True,
    )
    neighbours = [
        Neighbour(_inspected(h.id, resolve(h.payload, unapplied)), float(h.score)) for h in hits if h.id != record.id
    ][:k]
    point = _inspected(record.id, resolve(record.payload, unapplied))
    return Inspection(point, neighbours, agreement(point.state.judged_label, neighbours))
