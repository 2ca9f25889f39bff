"""People in the loop: the review queue (export), human answers (import as ground truth), and suspicious labels.

* ``export_review`` writes the points a run sent to review (``pseudo_status = review``),
  most uncertain first, as JSON lines: id, text, image reference, top classes, and an
  empty ``label`` for the person to fill in.
* ``import_labels`` reads such a file (JSON lines or CSV with ``id`` and ``label``)
  and writes each answer as ground truth (``label``, ``label_source = human``,
  ``labeled_at``). The whole file is validated first; nothing is written when any
  row is bad. A point that already has a *human* label with a different value is
  never silently overwritten: the import refuses, naming the conflicts, unless
  ``overwrite_human`` is set. An answered point loses the run's pseudo-label fields: the
  answer is its verdict now (it leaves the review queue and the status counts).
* ``clear_labels`` takes answers back (the point is unlabelled again); a label the data
  came with (a manifest's, a dataset's, a seed) only when asked (``any_source``).
* ``suspicious`` ranks accepted pseudo-labels by how strongly their neighbourhood
  contradicts them (kNN label-quality in the spirit of cleanlab: the point's own
  vote left out, similarity-weighted share of its labelled neighbours agreeing).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labeling.errors import LabelConflictError, ReviewFileError, UnknownAnswerIdsError
from labeling.inspect import (
    REVIEW,
    LabelState,
    Neighbour,
    _inspected,
    agreement,
    finite_number,
    spelling_key,
    top_classes,
)
from labeling.runs import PREV_FIELD, PSEUDO_FIELDS, clear_pseudo_state, load_registry, resolve
from retrieval import Filter, Match, VectorStore
from retrieval.base import json_size

IMAGE_KEYS = ("image_uri", "image", "image_url", "image_path", "thumbnail")


@dataclass(frozen=True)
class ReviewItem:
    id: str
    text: str | None
    image: str | None
    pseudo_label: str | None
    pseudo_confidence: float | None
    review_score: float | None
    top: list[tuple[str, float]]
    labeling_run: str | None

    def as_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "image": self.image,
            "pseudo_label": self.pseudo_label,
            "pseudo_confidence": self.pseudo_confidence,
            "review_score": self.review_score,
            "top": [[c, p] for c, p in self.top],
            "labeling_run": self.labeling_run,
            "label": None,
        }


def image_ref(payload: dict[str, Any]) -> str | None:
    """The item's stored image reference (the first of IMAGE_KEYS holding a non-empty string), or None."""
    for key in IMAGE_KEYS:
        v = payload.get(key)
        if isinstance(v, str) and v:
            return v
    return None


def review_queue(store: VectorStore, collection: str, *, limit: int | None = None) -> list[ReviewItem]:
    """Points whose current run sent them to review, most uncertain first."""
    unapplied = load_registry(store, collection).unapplied
    items = []
    for rec in store.iter_records(collection, filter=Filter(must=[Match("pseudo_status", REVIEW)])):
        p = resolve(rec.payload, unapplied)
        st = LabelState.from_payload(p)
        if st.pseudo_status != REVIEW or st.label is not None:
            continue  # a partial run's view, or already answered by a person
        items.append(
            ReviewItem(
                id=rec.id,
                text=p.get("text") if isinstance(p.get("text"), str) else None,
                image=image_ref(p),
                pseudo_label=st.pseudo_label,
                pseudo_confidence=st.pseudo_confidence,
                review_score=finite_number(p.get("review_score")),
                top=top_classes(p),
                labeling_run=p.get("labeling_run"),
            )
        )
    items.sort(key=lambda it: -(it.review_score or 0.0))
    return items[:limit] if limit is not None else items


def export_review(store: VectorStore, collection: str, path: str | Path, *, limit: int | None = None) -> int:
    """Write the review queue as JSON lines to ``path``; returns how many items."""
    return write_review(review_queue(store, collection, limit=limit), path)


def write_review(items: list[ReviewItem], path: str | Path) -> int:
    """Review items as JSON lines (written to a temporary file, then moved into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for it in items:
            fh.write(json.dumps(it.as_row(), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(items)


def read_answers(path: str | Path) -> tuple[list[tuple[str, str]], int]:
    """(id, label) pairs from a JSONL or CSV answer file, and how many rows had no label (not answered)."""
    path = Path(path)
    if not path.is_file():
        raise ReviewFileError(f"answer file {path} does not exist")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReviewFileError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ReviewFileError(f"{path}:{n}: each line must be a JSON object with 'id' and 'label'")
            rows.append(row)
    out: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    unanswered = 0
    for n, row in enumerate(rows, 1):
        pid = row.get("id")
        label = row.get("label")
        if pid is None or str(pid).strip() == "":
            raise ReviewFileError(f"{path}: row {n} has no 'id'")
        if label is None or (isinstance(label, str) and not label.strip()):
            unanswered += 1
            continue
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise ReviewFileError(f"{path}: row {n} (id {pid}): label must be a string, got {label!r}")
        pid, label = str(pid), str(label).strip()
        if pid in seen and seen[pid] != label:
            raise ReviewFileError(
                f"{path}: id {pid} is answered twice with different labels ({seen[pid]!r}, {label!r})"
            )
        if pid not in seen:
            out.append((pid, label))
        seen[pid] = label
    return out, unanswered


@dataclass(frozen=True)
class ImportResult:
    written: int
    unchanged: int
    skipped_unanswered: int
    #: classes the answers introduced, with how many labels each has now: a job needs 2 of every class
    new_classes: dict[str, int] = field(default_factory=dict)


def import_labels(
    store: VectorStore,
    collection: str,
    path: str | Path,
    *,
    source: str = "human",
    overwrite_human: bool = False,
) -> ImportResult:
    """Write answers from ``path`` as ground truth (see the module docstring). All-or-nothing."""
    answers, unanswered = read_answers(path)
    if not answers:
        raise ReviewFileError(f"{path}: no answered rows (fill in 'label' for the items you reviewed)")
    result = submit_labels(store, collection, answers, source=source, overwrite_human=overwrite_human)
    return ImportResult(result.written, result.unchanged, unanswered, result.new_classes)


MAX_LABEL_CHARS = 200


def label_problem(label: str) -> str | None:
    """Why ``label`` cannot be a class name (None when it can): empty, over ``MAX_LABEL_CHARS``, or holding a
    control or invisible format character (a newline, a zero-width space) that makes two labels look alike."""
    if not label.strip():
        return "the label is empty"
    if len(label) > MAX_LABEL_CHARS:
        return f"the label has {len(label)} characters; at most {MAX_LABEL_CHARS}"
    bad = next((ch for ch in label if unicodedata.category(ch) in ("Cc", "Cf")), None)
    if bad is not None:
        return f"the label holds an invisible or control character {bad!r} ({unicodedata.name(bad, 'unnamed')})"
    return None


def same_class_spelt_otherwise(label: str, known: Iterable[str]) -> str | None:
    """A known class that differs from ``label`` only by case, spacing or Unicode form ("objects",
    "Food  &  Drink"): the job would learn it as a class of its own."""
    key = spelling_key(label)
    return next((k for k in known if k != label and spelling_key(k) == key), None)


def submit_labels(
    store: VectorStore,
    collection: str,
    answers: list[tuple[str, str]],
    *,
    source: str = "human",
    overwrite_human: bool = False,
) -> ImportResult:
    """Write (id, label) answers as ground truth, validated as a whole first. Labels are stored in Unicode's
    composed form (NFC): "café" typed with a combining accent is the class "café", not a second one."""
    bad = [i for i, (pid, label) in enumerate(answers) if not pid or not isinstance(label, str) or not label.strip()]
    if bad:
        raise ReviewFileError(f"answers {bad[:10]} have an empty id or label")
    answers = [(pid, unicodedata.normalize("NFC", label)) for pid, label in answers]
    for pid, label in answers:
        if (why := label_problem(label)) is not None:
            raise ReviewFileError(f"answer for {pid!r}: {why} (nothing was written)")
    if not source or not isinstance(source, str):
        raise ReviewFileError("label_source must be a non-empty string")
    # a class spelt two ways ("Seven" beside "seven") became two classes, silently: the web page refused it,
    # an import did not. Known classes: ground truth and pseudo-labels (indexed keyword fields), then the file's.
    known: dict[str, str] = {}
    for key in ("label", "pseudo_label"):
        for name in store.facet(collection, key, limit=100_000):
            known.setdefault(spelling_key(str(name)), str(name))
    new_classes = Counter(label for _, label in answers if spelling_key(label) not in known)
    for pid, label in answers:
        first = known.setdefault(spelling_key(label), label)
        if first != label:
            raise ReviewFileError(
                f"answer for {pid!r}: {label!r} differs from the class {first!r} only by case, spacing or Unicode "
                f"form; write it as {first!r} (nothing was written)"
            )
    ids = [a[0] for a in answers]
    if len(set(ids)) != len(ids):
        raise ReviewFileError("the same id is answered more than once")
    with store.exclusive():  # no job batch or delete lands between the read, the checks and the write
        result = _submit_checked(store, collection, answers, ids, source, overwrite_human)
    return dataclasses.replace(result, new_classes=dict(new_classes))


def _submit_checked(
    store: VectorStore,
    collection: str,
    answers: list[tuple[str, str]],
    ids: list[str],
    source: str,
    overwrite_human: bool,
) -> ImportResult:
    found = {r.id: r.payload or {} for r in store.retrieve(collection, ids, missing_ok=True)}
    missing = [i for i in ids if i not in found]
    if missing:
        raise UnknownAnswerIdsError(f"{len(missing)} id(s) are not in collection {collection!r}: {missing[:10]}")
    conflicts = []
    updates = []
    unchanged = 0
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    for pid, label in answers:
        p = found[pid]
        old, old_src = p.get("label"), p.get("label_source")
        if old == label:
            unchanged += 1
            continue
        # protected: a human label (a manifest's too), and any answer given through embedstore whatever its
        # --source (an "expert" answer was replaced by the next import without a word)
        if old not in (None, "") and (old_src == "human" or is_answer(p)) and not overwrite_human:
            conflicts.append(f"{pid}: {old!r} -> {label!r}")
            continue
        updates.append((pid, {"label": label, "label_source": source, "labeled_at": now}))
    if conflicts:
        raise LabelConflictError(
            f"{len(conflicts)} answer(s) would overwrite a different label a person gave (nothing was written): "
            f"{conflicts[:10]}; pass --overwrite-human to replace them"
        )
    run_keys = (*PSEUDO_FIELDS, PREV_FIELD)
    stale = [pid for pid, _ in answers if any(k in found[pid] for k in run_keys)]
    # both writes' room at once: a full disk refuses the answer before the label is written, not between the two
    store.check_room(collection, len(updates) + len(stale), 2 * sum(json_size(b) for _, b in updates))
    written = store.set_payload(collection, updates) if updates else 0
    # The answer replaces the run's verdict on the point (see runs.clear_pseudo_state); written after the
    # label, so an interruption between the two leaves the label and a stale verdict, never neither.
    clear_pseudo_state(store, collection, stale)
    return ImportResult(written=written, unchanged=unchanged, skipped_unanswered=0)


@dataclass(frozen=True)
class ClearResult:
    cleared: int
    unchanged: int  # points that had no ground-truth label


#: What a ground-truth answer writes; clearing removes all three.
LABEL_FIELDS = ("label", "label_source", "labeled_at")


def is_answer(payload: dict[str, Any]) -> bool:
    """Whether the point's label is an answer given through embedstore (label import with any ``--source``, the
    web page, SubmitLabels), which write ``labeled_at``: indexing writes a manifest's labels as ``human`` too,
    without it."""
    return payload.get("label") not in (None, "") and bool(payload.get("labeled_at"))


def clear_labels(
    store: VectorStore,
    collection: str,
    ids: list[str],
    *,
    any_source: bool = False,
    expected: dict[str, str] | None = None,
) -> ClearResult:
    """Take back ground-truth labels: the points become unlabelled (the next job may pseudo-label them).

    Only answers given through embedstore (``label import``, the web page, SubmitLabels: they carry
    ``labeled_at``) unless ``any_source``: a label the data came with (a manifest's or dataset's, indexed as
    ``label_source = human`` but without ``labeled_at``; a seed) is the data's own truth, and a person who
    clicked the wrong class should not lose it by accident. All or
    nothing: an unknown id or a label of another source refuses the whole call, naming them. ``expected``
    (id -> the label the caller saw) refuses to clear a label someone changed since (a page loaded earlier).
    """
    if not ids or any(not isinstance(i, str) or not i for i in ids):
        raise ReviewFileError("give the ids of the points whose label to clear (non-empty strings)")
    if len(set(ids)) != len(ids):
        raise ReviewFileError("the same id is given more than once")
    with store.exclusive():  # no job batch or answer lands between the read and the write
        found = {r.id: r.payload or {} for r in store.retrieve(collection, ids, missing_ok=True)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise UnknownAnswerIdsError(f"{len(missing)} id(s) are not in collection {collection!r}: {missing[:10]}")
        changed = [f"{i}: now {found[i].get('label')!r}" for i, seen in (expected or {}).items()
                   if i in found and found[i].get("label") != seen]  # fmt: skip
        if changed:
            raise LabelConflictError(
                f"{len(changed)} label(s) changed since they were shown (nothing was cleared): {changed[:10]}"
            )
        labelled = [i for i in ids if found[i].get("label") not in (None, "")]
        other = [f"{i} ({found[i].get('label_source') or 'no source'})" for i in labelled
                 if not is_answer(found[i])]  # fmt: skip
        if other and not any_source:
            raise LabelConflictError(
                f"{len(other)} label(s) are not answers given through embedstore (nothing was cleared): {other[:10]}; "
                "a label the data came with (a manifest's, a dataset's, a seed) is its own ground truth; pass "
                "--any-source to clear them too"
            )
        touched = [i for i in ids if any(k in found[i] for k in LABEL_FIELDS)]
        if touched:
            store.delete_payload_keys(collection, touched, list(LABEL_FIELDS))
    return ClearResult(cleared=len(labelled), unchanged=len(ids) - len(labelled))


@dataclass(frozen=True)
class Suspect:
    id: str
    pseudo_label: str
    pseudo_confidence: float | None
    agreement: float
    majority_label: str | None
    majority_share: float
    labelled_neighbours: int
    text: str | None


def suspicious_page(
    store: VectorStore,
    collection: str,
    *,
    offset: str | None = None,
    window: int = 512,
    k: int = 10,
    min_labelled: int = 2,
) -> tuple[list[Suspect], str | None]:
    """One window of accepted pseudo-labels (``window`` points from scroll ``offset``), scored against their
    neighbourhood, least agreed first; and the offset of the next window (None at the end). A page of a UI
    costs one scroll and one batched search, however large the collection."""
    unapplied = load_registry(store, collection).unapplied
    page = store.scroll(
        collection,
        filter=Filter(must=[Match("pseudo_status", "accepted")]),
        limit=window,
        offset=offset,
        with_vectors=True,
    )
    out: list[Suspect] = []
    records = page.records
    if records:
        hits = store.search_batch(collection, np.vstack([r.vector for r in records]), top_k=k + 1, with_payload=True)
        for rec, found in zip(records, hits, strict=True):
            me = _inspected(rec.id, resolve(rec.payload, unapplied))
            if me.state.pseudo_status != "accepted" or me.state.label is not None:
                continue
            nbrs = [
                Neighbour(_inspected(h.id, resolve(h.payload, unapplied)), float(h.score))
                for h in found
                if h.id != rec.id
            ][:k]
            a = agreement(me.state.pseudo_label, nbrs)
            if a.labelled_neighbours < min_labelled:
                continue
            out.append(
                Suspect(
                    id=rec.id,
                    pseudo_label=str(me.state.pseudo_label),
                    pseudo_confidence=me.state.pseudo_confidence,
                    agreement=a.weighted,
                    majority_label=a.majority_label,
                    majority_share=a.majority_share,
                    labelled_neighbours=a.labelled_neighbours,
                    text=me.payload.get("text") if isinstance(me.payload.get("text"), str) else None,
                )
            )
    out.sort(key=lambda s: (s.agreement, -(s.pseudo_confidence or 0.0)))
    return out, page.next_offset


def suspicious(
    store: VectorStore, collection: str, *, k: int = 10, limit: int = 50, batch: int = 256, min_labelled: int = 2
) -> list[Suspect]:
    """Accepted pseudo-labels their neighbourhood contradicts most (lowest weighted agreement first), over the
    whole collection (window by window)."""
    out: list[Suspect] = []
    offset: str | None = None
    while True:
        found, offset = suspicious_page(store, collection, offset=offset, window=batch, k=k, min_labelled=min_labelled)
        out.extend(found)
        if offset is None:
            break
    out.sort(key=lambda s: (s.agreement, -(s.pseudo_confidence or 0.0)))
    return out[:limit]
