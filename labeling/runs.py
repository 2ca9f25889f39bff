"""Labeling runs as units: the run registry, write-back, rollback, and the consistent view of a partial write.

The registry lives in the collection's metadata under ``labeling``::

    {"active": RUN_ID | None, "pending": RUN_ID | None, "runs": [RunRecord, ...]}

**Write-back protocol.** A run is first *announced* (``pending`` = the run, status
``writing``), then its per-point payload is merged in batches, then it is
*committed* (``active`` = the run, ``pending`` cleared, status ``applied``). Each
point written keeps the fields it had before in ``pseudo_prev`` (one level of undo).

* A crash mid-write leaves ``pending`` set. Points not yet reached still carry the
  previous run's labels; points already written carry ``labeling_run`` = the pending
  run and the previous labels in ``pseudo_prev``. :func:`resolve` (used by every
  reader here) shows ``pseudo_prev`` for points of a run that is not applied, so
  readers see the previous run, whole.
* Re-running replaces it cleanly: the next run marks the unfinished one
  ``abandoned`` and takes each point's true previous state from ``pseudo_prev``
  where the abandoned run had reached it. Writing the same run twice is a no-op
  (idempotent): a point already carrying this run keeps its ``pseudo_prev``.
* ``rollback RUN`` (the active run only) restores ``pseudo_prev`` on every point the
  run wrote (or removes the pseudo fields where there was nothing before), and the
  run before it becomes active again. A crash mid-rollback is finished by running
  the rollback again.

Ground-truth fields (``label``, ``label_source``) are never written here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from typing import Any

from labeling.errors import RunNotFoundError, RunStateError
from retrieval import Filter, IsEmpty, Match, VectorStore

REGISTRY_KEY = "labeling"
MAX_RUNS_KEPT = 100
RUN_FIELD = "labeling_run"
PREV_FIELD = "pseudo_prev"
#: Fields a labeling run writes on a point (besides ``pseudo_prev``).
PSEUDO_FIELDS = (
    "pseudo_label",
    "pseudo_confidence",
    "pseudo_status",
    "pseudo_iteration",
    "pseudo_top",
    "review_score",
    RUN_FIELD,
    "labeling_model",
)
WRITING, APPLIED, ABANDONED, ROLLING_BACK, ROLLED_BACK = (
    "writing",
    "applied",
    "abandoned",
    "rolling_back",
    "rolled_back",
)

BatchHook = Callable[[int], None]

#: A run writing its labels refreshes ``heartbeat_at`` at most every HEARTBEAT_S while it writes; a pending run
#: whose heartbeat is younger than LIVE_WRITER_S is taken to be writing still, and a second job's write-back is
#: refused instead of marking it abandoned. (Two jobs at once on a server collection left the points split
#: between them, both runs recorded as applied, and a rollback that landed on the wrong labels.) A write that
#: fails or is interrupted in its own process clears its heartbeat, so a rerun takes over at once; only a
#: process killed outright holds the collection for up to LIVE_WRITER_S. Clocks of the writing machines are
#: compared, so they should agree to well within a minute (NTP).
HEARTBEAT_S = 10.0
LIVE_WRITER_S = 120.0


def new_run_id() -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{now}-{uuid.uuid4().hex[:6]}"


def utcnow() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class RunRecord:
    run_id: str
    status: str
    created_at: str
    model: str
    previous: str | None = None
    finished_at: str | None = None
    points: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    run_dir: str | None = None
    allow_sparse_seed: bool = False
    undo: bool = True  # False once a later run was rolled back onto this one (one level of undo per point)
    summary: dict[str, Any] = field(default_factory=dict)
    heartbeat_at: str | None = None  # while writing: when it last showed it was alive (see LIVE_WRITER_S)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass
class Registry:
    active: str | None = None
    pending: str | None = None
    runs: list[RunRecord] = field(default_factory=list)

    def get(self, run_id: str) -> RunRecord:
        for r in self.runs:
            if r.run_id == run_id:
                return r
        raise RunNotFoundError(run_id, [r.run_id for r in self.runs])

    @property
    def unapplied(self) -> set[str]:
        """Runs whose partial writes readers must see through (written, but never committed)."""
        return {r.run_id for r in self.runs if r.status in (WRITING, ABANDONED)}


def load_registry(store: VectorStore, collection: str) -> Registry:
    raw = store.collection_metadata(collection).get(REGISTRY_KEY)
    raw = {} if raw is None else raw  # an empty list or string is damage, not "no history"

    def damaged(what: str) -> RunStateError:
        # a hand-edited or truncated registry raised AttributeError / TypeError tracebacks from every command
        return RunStateError(
            f"the labeling run registry of collection {collection!r} (collection metadata key {REGISTRY_KEY!r}) is "
            f"damaged: {what}. Restore it from a backup, or remove the key to start a new history (the points "
            "keep their labels)"
        )

    if not isinstance(raw, dict):
        raise damaged(f"it holds a {type(raw).__name__}, not an object")
    runs = raw.get("runs", [])
    if not isinstance(runs, list):
        raise damaged(f"'runs' holds a {type(runs).__name__}, not a list")
    records = []
    for i, r in enumerate(runs):
        try:
            if not isinstance(r, dict):
                raise TypeError(f"a {type(r).__name__}")
            rec = RunRecord.from_dict(r)
            for name, kind in (("run_id", str), ("status", str), ("counts", dict), ("summary", dict)):
                if not isinstance(getattr(rec, name), kind):
                    raise TypeError(f"{name!r} holds {getattr(rec, name)!r}")
            records.append(rec)
        except TypeError as exc:
            raise damaged(f"run #{i} is not a run record ({exc})") from None
    for key in ("active", "pending"):
        if raw.get(key) is not None and not isinstance(raw.get(key), str):
            raise damaged(f"{key!r} holds {raw.get(key)!r}, not a run id")
    return Registry(active=raw.get("active"), pending=raw.get("pending"), runs=records)


def save_registry(store: VectorStore, collection: str, reg: Registry) -> None:
    runs = reg.runs[-MAX_RUNS_KEPT:]
    body = {"active": reg.active, "pending": reg.pending, "runs": [asdict(r) for r in runs]}
    store.update_collection_metadata(collection, {REGISTRY_KEY: body})


def resolve(payload: dict[str, Any] | None, unapplied: AbstractSet[str]) -> dict[str, Any]:
    """The payload as readers should see it: a point written by an unapplied run shows its previous labels."""
    p = dict(payload or {})
    if p.get(RUN_FIELD) in unapplied:
        prev = p.get(PREV_FIELD) or {}
        for key in PSEUDO_FIELDS:
            p.pop(key, None)
        p.update(prev)
    p.pop(PREV_FIELD, None)
    return p


def _previous_state(payload: dict[str, Any], run_id: str, unapplied: set[str]) -> dict[str, Any] | None:
    cur_run = payload.get(RUN_FIELD)
    if cur_run == run_id or cur_run in unapplied:
        return payload.get(PREV_FIELD)  # already written by this run, or by an unfinished one: keep the true prev
    fields = {k: payload[k] for k in PSEUDO_FIELDS if k in payload}
    return fields or None


def seconds_since(stamp: str | None) -> float | None:
    """Seconds since an ISO-8601 time written by :func:`utcnow` (None when absent or unreadable)."""
    if not stamp:
        return None
    try:
        then = _dt.datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=_dt.UTC)
    return (_dt.datetime.now(_dt.UTC) - then).total_seconds()


def writing_live(rec: RunRecord) -> bool:
    """Whether ``rec`` is a write-back that showed it was alive within LIVE_WRITER_S (another job must wait)."""
    age = seconds_since(rec.heartbeat_at)
    return rec.status == WRITING and age is not None and age < LIVE_WRITER_S


def check_no_live_writer(store: VectorStore, collection: str, reg: Registry | None = None, mine: str = "") -> None:
    """Raise :class:`RunStateError` when another run is writing its labels to ``collection`` now."""
    reg = load_registry(store, collection) if reg is None else reg
    if not reg.pending or reg.pending == mine:
        return
    try:
        other = reg.get(reg.pending)
    except RunNotFoundError:
        return
    if writing_live(other):
        age = seconds_since(other.heartbeat_at) or 0.0
        raise RunStateError(
            f"run {other.run_id} is writing its labels to collection {collection!r} now (last heartbeat "
            f"{max(age, 0):.0f} s ago): two jobs writing at once would mix their labels. Wait for it to finish; if "
            f"its process was killed, a new job can take over {LIVE_WRITER_S - max(age, 0):.0f} s from now"
        )


def _beat(store: VectorStore, collection: str, run_id: str, alive: bool) -> None:
    """Refresh (or, ``alive=False``, clear) the run's heartbeat; raise if another run took the collection over."""
    reg = load_registry(store, collection)
    rec = reg.get(run_id)
    if alive and (reg.pending != run_id or rec.status != WRITING):
        taker = reg.pending or reg.active
        raise RunStateError(
            f"run {taker} took collection {collection!r} over while run {run_id} was writing (it judged this run "
            f"dead: no heartbeat for {LIVE_WRITER_S:.0f} s); this run stops, left abandoned (readers do not see "
            "its writes). Run the job again once the other has finished"
        )
    if reg.pending == run_id:
        rec.heartbeat_at = utcnow() if alive else None
        save_registry(store, collection, reg)


def apply_run(
    store: VectorStore,
    collection: str,
    record: RunRecord,
    rows: Sequence[tuple[str, dict[str, Any]]],
    *,
    batch_size: int = 512,
    on_batch: BatchHook | None = None,
    label_field: str = "label",
) -> int:
    """Write a run's per-point fields as a unit (see the module docstring). Returns points written.

    A point whose ``label_field`` was set since the job's snapshot (answered meanwhile) is not written."""
    reg = load_registry(store, collection)
    check_no_live_writer(store, collection, reg, mine=record.run_id)
    if reg.pending and reg.pending != record.run_id:
        with contextlib.suppress(RunNotFoundError):
            reg.get(reg.pending).status = ABANDONED
    existing = {r.run_id for r in reg.runs}
    if record.run_id not in existing:
        record.previous = reg.active
        reg.runs.append(record)
    rec = reg.get(record.run_id)
    rec.status = WRITING
    rec.heartbeat_at = utcnow()
    reg.pending = record.run_id
    save_registry(store, collection, reg)
    unapplied = reg.unapplied - {record.run_id}
    last_beat = time.monotonic()

    def batch_done(b: int) -> None:
        nonlocal last_beat
        if time.monotonic() - last_beat >= HEARTBEAT_S:
            _beat(store, collection, record.run_id, alive=True)
            last_beat = time.monotonic()
        if on_batch is not None:
            on_batch(b)

    try:
        with store.bulk_write():  # one optimize at the end (Edge), not one midway as well
            written = _write_rows(store, collection, record, rows, unapplied, batch_size, batch_done, label_field)
        store.flush()
        _beat(store, collection, record.run_id, alive=True)  # the last look: still ours to commit?
    except BaseException:
        # failed or interrupted here, in its own process: not a live writer any more, so a rerun need not wait
        with contextlib.suppress(Exception):
            _beat(store, collection, record.run_id, alive=False)
        raise
    reg = load_registry(store, collection)
    rec = reg.get(record.run_id)
    rec.status = APPLIED
    rec.finished_at = utcnow()
    rec.points = written
    rec.counts = record.counts
    rec.summary = record.summary
    rec.run_dir = record.run_dir
    rec.heartbeat_at = None
    reg.active = record.run_id
    reg.pending = None
    save_registry(store, collection, reg)
    return written


def _write_rows(
    store: VectorStore,
    collection: str,
    record: RunRecord,
    rows: Sequence[tuple[str, dict[str, Any]]],
    unapplied: set[str],
    batch_size: int,
    on_batch: BatchHook | None,
    label_field: str = "label",
) -> int:
    written = 0
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        # read, check and write as one step for this store's other writers (a label or a delete landing between
        # the read and the write made the write fail half-done, or put a pseudo-label on an answered point)
        with store.exclusive():
            current = {
                r.id: r.payload or {} for r in store.retrieve(collection, [i for i, _ in chunk], missing_ok=True)
            }
            updates = []
            for point, fields in chunk:
                if point not in current:
                    continue  # deleted since the snapshot
                if current[point].get(label_field) not in (None, ""):
                    continue  # answered since the snapshot: ground truth is the verdict
                prev = _previous_state(current[point], record.run_id, unapplied)
                updates.append((point, {**fields, RUN_FIELD: record.run_id, PREV_FIELD: prev}))
            if updates:
                written += store.set_payload(collection, updates, missing_ok=True)
        if on_batch is not None:
            on_batch(b)
    return written


def clear_pseudo_state(store: VectorStore, collection: str, ids: Sequence[str]) -> int:
    """Drop the pseudo-label fields of points that now have ground truth. Returns points changed.

    A human answer replaces the run's verdict on that point: left in place, a ``review`` status on an
    answered point kept counting in facets, the web page's overview and its status filter, and a later
    rollback would have restored a pseudo-label onto ground truth. The point's label and the run's own
    record (counts, report) are untouched."""
    if not ids:
        return 0
    return store.delete_payload_keys(collection, list(ids), [*PSEUDO_FIELDS, PREV_FIELD], missing_ok=True)


def labelled_with_pseudo_state(
    store: VectorStore, collection: str, page_size: int = 512, *, label_field: str = "label"
) -> list[str]:
    """Ids of points that have a ground-truth label (``label_field``) and still carry a run's pseudo-label
    fields (answered before answers cleared them, or labelled through a manifest after a run)."""
    flt = Filter(must_not=[IsEmpty(label_field), IsEmpty("pseudo_status")])
    return [
        r.id
        for r in store.iter_records(collection, filter=flt, page_size=page_size)
        if (r.payload or {}).get(label_field) not in (None, "")
    ]


def run_points(store: VectorStore, collection: str, run_id: str, page_size: int = 512) -> Iterable[list[Any]]:
    """Pages of the points a run wrote (payload included)."""
    page_buf: list[Any] = []
    for rec in store.iter_records(collection, filter=Filter(must=[Match(RUN_FIELD, run_id)]), page_size=page_size):
        page_buf.append(rec)
        if len(page_buf) >= page_size:
            yield page_buf
            page_buf = []
    if page_buf:
        yield page_buf


def rollback_run(store: VectorStore, collection: str, run_id: str, *, on_batch: BatchHook | None = None) -> int:
    """Restore the labels a run replaced; the run before it becomes active. Returns points restored."""
    reg = load_registry(store, collection)
    rec = reg.get(run_id)
    if rec.status == ROLLED_BACK:
        raise RunStateError(f"run {run_id} was already rolled back")
    if rec.status not in (APPLIED, ROLLING_BACK) or reg.active != run_id:
        raise RunStateError(
            f"only the active run can be rolled back: {run_id} is {rec.status!r}, the active run is {reg.active!r}"
        )
    if reg.pending and reg.pending != run_id:
        # The pending run's points hold this run's labels as their `pseudo_prev`, without this run's own
        # undo record: rolling back here would leave them showing the labels being removed.
        raise RunStateError(
            f"run {reg.pending} was interrupted while writing over run {run_id}'s labels, so part of {run_id}'s "
            f"undo record may be gone: {run_id} cannot be rolled back now. Start a new `embedstore label run` (it "
            "supersedes the interrupted one); the new run can then be rolled back onto this one"
        )
    if not rec.undo:
        raise RunStateError(
            f"run {run_id} cannot be rolled back: the run after it was rolled back, and rollback keeps one level "
            "of undo per point (start a new run instead)"
        )
    rec.status = ROLLING_BACK
    save_registry(store, collection, reg)
    restored = 0
    # Collect first: restoring changes the field we filter on, which would shift scroll pages.
    pages = [[(r.id, r.payload or {}) for r in page] for page in run_points(store, collection, run_id)]
    with store.bulk_write():
        for b, page in enumerate(pages):
            back = [(pid, p[PREV_FIELD]) for pid, p in page if p.get(PREV_FIELD)]
            gone = [pid for pid, p in page if not p.get(PREV_FIELD)]
            if back:
                restored += store.set_payload(collection, back, missing_ok=True)
                store.delete_payload_keys(collection, [pid for pid, _ in back], [PREV_FIELD], missing_ok=True)
            if gone:
                restored += store.delete_payload_keys(collection, gone, [*PSEUDO_FIELDS, PREV_FIELD], missing_ok=True)
            if on_batch is not None:
                on_batch(b)
    store.flush()
    reg = load_registry(store, collection)
    rec = reg.get(run_id)
    rec.status = ROLLED_BACK
    rec.finished_at = utcnow()
    reg.active = rec.previous
    if rec.previous is not None:
        with contextlib.suppress(RunNotFoundError):
            reg.get(rec.previous).undo = False
    if reg.pending == run_id:
        reg.pending = None
    save_registry(store, collection, reg)
    return restored
