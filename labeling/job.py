"""A labeling job against the store: read, guard, measure drift, self-train, write back as a unit, report.

``run_job(store, collection, config)`` is what ``embedstore label run`` and the
gRPC ``RunLabelingJob`` call. Stages (each reported through ``events``):

``read`` (paged scroll) -> ``guards`` (seed size, classes) -> ``drift`` (classifier
two-sample test; gates harder when the pool has drifted) -> ``neighbours`` (kNN
graph from the store, batched) -> ``train`` (the loop of :mod:`labeling.selftrain`)
-> ``report`` (run directory: ``report.json``, ``reliability.png``,
``iterations.png``) -> ``write`` (per-point payload, as a unit: :mod:`labeling.runs`).
``warning`` events carry a message only (no progress).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from labeling.calibration import macro_f1
from labeling.config import LabelingConfig
from labeling.drift import c2st
from labeling.errors import JobCancelledError, JobPreconditionError, LabelingError, RunStateError
from labeling.gate import ACCEPTED, STATUS_NAMES
from labeling.inspect import spelling_key
from labeling.plots import iteration_curves, reliability_diagram
from labeling.runs import (
    ROLLING_BACK,
    RUN_FIELD,
    BatchHook,
    RunRecord,
    apply_run,
    check_no_live_writer,
    clear_pseudo_state,
    labelled_with_pseudo_state,
    load_registry,
    new_run_id,
    utcnow,
)
from labeling.selftrain import LabelingInput, LabelingOutcome, LearnerFactory, SelfTrainer, check_seed
from labeling.snapshot import neighbour_graph, query_graph, read_snapshot, row_index
from retrieval import Filter, IsEmpty, Match, VectorStore

DEFAULT_RUNS_DIR = Path("./data/runs")
#: collection metadata the embedder writes with the embedding version: how many labels its projection was
#: fitted on (``embedder.indexing`` writes it under the same name; labeling does not import the embedder)
PROJECTION_LABELS_KEY = "projection_labels"
#: the embedding version the embedder records per point and per collection (``embedder.indexing.VERSION_KEY``)
VERSION_KEY = "embedding_version"


def preflight(store: VectorStore, collection: str, runs_dir: Path | str) -> None:
    """What would make a job's work wasted or wrong, checked before any of it (read, graph, training).

    * an interrupted rollback: the collection is half on one run and half on the one before it; a new run
      would record that state as its ``previous``, and the rollback could never be finished;
    * points embedded with another projection than the collection's (an interrupted ``reindex``): the kNN
      graph and features would mix two incomparable vector spaces (search refuses this state too);
    * a runs directory that cannot be written: found only after training, the work was lost;
    * another job writing its labels to the collection now (:func:`labeling.runs.check_no_live_writer`).
    """
    reg = load_registry(store, collection)
    stuck = [r.run_id for r in reg.runs if r.status == ROLLING_BACK]
    if stuck:
        raise RunStateError(
            f"the rollback of run {stuck[-1]} was interrupted: part of the collection is back on the run before "
            f"it and part is not. Finish it first (`embedstore label rollback {stuck[-1]}` again), then run a job"
        )
    check_no_live_writer(store, collection, reg)  # another job writing now: refused before the work, not after
    version = store.collection_metadata(collection).get(VERSION_KEY)
    if isinstance(version, str) and version:
        flt = Filter(must_not=[Match(VERSION_KEY, version), IsEmpty(VERSION_KEY)])
        other = store.count(collection, filter=flt)
        if other:
            raise JobPreconditionError(
                f"{other} point(s) of {collection!r} were embedded with another projection than the collection's "
                f"({version!r}): an interrupted `embedstore reindex`? Run it again to finish; a job over two "
                "vector spaces would take neighbours that are not comparable"
            )
    target = Path(runs_dir) / collection
    made = [p for p in (target, *target.parents) if not p.exists()]  # removed again: a refused job leaves no folder
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write-test-"):
            pass
        for folder in made:  # deepest first
            folder.rmdir()
    except OSError as exc:
        raise JobPreconditionError(
            f"cannot write the run's report under {target} ({exc.strerror or exc}): point the runs directory at "
            "a writable folder (`label run --runs-dir` / EMBEDSTORE_RUNS_DIR; for `embedstore serve`, "
            "EMBEDSTORE_GRPC_RUNS_DIR)"
        ) from None


@dataclass
class JobEvent:
    """A progress event: a stage and how far it is (``total`` 0 = unknown), or a message."""

    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


Events = Callable[[JobEvent], None]


@dataclass
class JobResult:
    run_id: str
    collection: str
    run_dir: Path
    report: dict[str, Any]
    outcome: LabelingOutcome
    written: int
    classes: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list, repr=False)  # the snapshot's point ids, in row order
    config: LabelingConfig | None = None
    # (the ids list it was built from, id -> row): built on the first predict_proba, not on every call
    _row_of: tuple[list[str], dict[str, int]] | None = field(default=None, init=False, repr=False, compare=False)

    def predict_proba(self, store: VectorStore, vectors: Any, *, batch: int = 256) -> np.ndarray:
        """Calibrated class probabilities (columns: ``classes``) for *new* 512D vectors - items that are not
        in the collection - from the written iteration's models; their neighbours come from the store."""
        cfg = self.config or LabelingConfig()
        pred = self.outcome.predictor
        if pred is None:
            raise LabelingError("this result carries no models")
        vecs = np.asarray(vectors, np.float32)
        if vecs.ndim != 2 or vecs.shape[1] < cfg.prefix_dims:
            raise LabelingError(f"vectors must be (m, 512), got shape {vecs.shape}")
        x = vecs[:, : cfg.prefix_dims]
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        index = sims = None
        if pred.use_graph:  # the same search and tie order as the job's own graph
            if self._row_of is None or self._row_of[0] is not self.ids:
                self._row_of = (self.ids, row_index(self.ids))
            graph = query_graph(
                store, self.collection, self._row_of[1], vecs, k=cfg.k, shortlist=cfg.shortlist, batch=batch
            )
            index, sims = graph.index, graph.sims
        return pred.predict_proba(x, index, sims)


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if not np.isfinite(f) else round(f, 6)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def run_job(
    store: VectorStore,
    collection: str,
    config: LabelingConfig | Mapping[str, Any] | None = None,
    *,
    runs_dir: Path | str = DEFAULT_RUNS_DIR,
    events: Events | None = None,
    learner_factory: LearnerFactory | None = None,
    on_write_batch: BatchHook | None = None,
) -> JobResult:
    """Run one labeling job on ``collection`` and write its pseudo-labels back (see the module docstring)."""
    # a dict of LabelingConfig fields is validated here (it failed later with an AttributeError)
    cfg = LabelingConfig(**config) if isinstance(config, Mapping) else (config or LabelingConfig())
    emit = events or (lambda e: None)
    run_id = new_run_id()
    t_job = time.perf_counter()
    timings: dict[str, float] = {}

    def advance(stage: str, done: int, total: int) -> None:
        emit(JobEvent(stage, done, total))

    preflight(store, collection, runs_dir)
    # ---- read
    t0 = time.perf_counter()
    snap = read_snapshot(
        store,
        collection,
        label_field=cfg.label_field,
        source_field=cfg.source_field,
        truth_field=cfg.truth_field,
        prefix_dims=cfg.prefix_dims,
        page_size=cfg.page_size,
        partitions=cfg.read_partitions,
        advance=advance,
    )
    timings["read"] = time.perf_counter() - t0
    if snap.n < 10:
        # the collection's state, not a fault: FAILED_PRECONDITION over gRPC (it was INTERNAL, with a traceback)
        raise JobPreconditionError(f"collection {collection!r} has {snap.n} points; a labeling job needs at least 10")

    # ---- guards
    classes = sorted({lab for lab in snap.labels if lab is not None})
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[lab] if lab is not None else -1 for lab in snap.labels], np.int64)
    warnings = check_seed(y, classes, cfg)
    n_projection_labels = store.collection_metadata(collection).get(PROJECTION_LABELS_KEY)
    if isinstance(n_projection_labels, int) and n_projection_labels > 0:
        warnings.append(
            f"the collection's vectors come from a projection fitted on {n_projection_labels} labels "
            "(fit-projection --labels): where they include this job's ground truth, the projection has pulled "
            "those points toward their classes, so held-out scores, calibration and the gate read optimistic. "
            "A label-free projection (fit-projection's default) avoids it"
        )
    variants: dict[str, list[str]] = {}
    for c in classes:
        variants.setdefault(spelling_key(c), []).append(c)
    for same in (v for v in variants.values() if len(v) > 1):
        # "Flags" and "flags " are two classes to the model: say so, as the user likely meant one
        warnings.append(
            f"labels {same} differ only by case, spacing or Unicode form and are learned as {len(same)} separate "
            "classes; relabel them to one spelling if they mean the same class"
        )
    if snap.truth is not None:
        outside = sorted({t for t in snap.truth if t is not None and t not in index})
        if outside:
            warnings.append(
                f"truth field {cfg.truth_field!r} holds {len(outside)} value(s) that no ground-truth label has "
                f"(e.g. {outside[:3]}): the job cannot propose them; they count as wrong in the accepted labels' "
                "precision and are left out of the pool's macro-F1"
            )
    for w in warnings:
        emit(JobEvent("guards", message=w))
    n_gt = int((y >= 0).sum())

    # ---- drift
    t0 = time.perf_counter()
    drift = c2st(
        snap.x[y >= 0],
        snap.x[y < 0],
        threshold=cfg.drift_auc_threshold,
        max_per_side=cfg.drift_max_per_side,
        seed=cfg.seed,
    )
    timings["drift"] = time.perf_counter() - t0
    gate_threshold, cap_factor = cfg.threshold, 1.0
    if drift.drifted:
        gate_threshold, cap_factor = max(cfg.threshold, cfg.drift_threshold), cfg.drift_cap_factor
        msg = (
            f"DRIFT: the unlabeled pool differs from the ground-truth seed (classifier two-sample AUC "
            f"{drift.auc:.3f} > {cfg.drift_auc_threshold}, z = {drift.z:.1f}). Pseudo-labels are least reliable "
            f"exactly here: gating harder (threshold {gate_threshold:.2f}, class caps x{cap_factor:g}). "
            "Label a sample of the new region to fix the cause."
        )
        warnings.append(msg)
        emit(JobEvent("drift", message=msg))
    emit(JobEvent("drift", 1, 1, data=drift.as_dict()))

    # ---- neighbours
    t0 = time.perf_counter()
    graph = None
    if cfg.neighbourhood_features or cfg.neighbourhood_veto:
        graph = neighbour_graph(
            store,
            collection,
            snap.ids,
            k=cfg.k,
            shortlist=cfg.shortlist,
            page_size=cfg.page_size,
            partitions=cfg.read_partitions,
            advance=advance,
        )
    timings["neighbours"] = time.perf_counter() - t0

    # ---- train
    truth = None
    if snap.truth is not None:
        truth = np.array([-1 if t is None else index.get(t, -2) for t in snap.truth], np.int64)

    def on_progress(kind: str, data: dict[str, Any]) -> None:
        if kind == "model":
            emit(JobEvent("train", message=f"iteration {data['iteration']}: model {data['model']}/{data['models']}"))
        else:
            stats = data["stats"]
            emit(JobEvent("iteration", stats.iteration, cfg.max_iterations, data={"stats": stats, **data}))

    t0 = time.perf_counter()
    trainer = SelfTrainer(cfg, learner_factory=learner_factory, progress=on_progress)
    outcome = trainer.run(
        LabelingInput(snap.x, y, classes, graph, truth), gate_threshold=gate_threshold, cap_factor=cap_factor
    )
    timings["train"] = time.perf_counter() - t0
    written_gate = _written_gate(outcome, cfg.threshold, cfg.threshold_min_support)
    if written_gate["message"]:
        warnings.append(written_gate["message"])
        emit(JobEvent("gate", message=written_gate["message"]))
    elif (unserved := _unserved_classes(outcome, classes)) is not None:
        warnings.append(unserved)
        emit(JobEvent("gate", message=unserved))
    # At the written gate's threshold; when the gate closed, at the configured one: wrong seed labels are one
    # thing that closes it (held-out "truth" that contradicts confident scores reads as over-confidence), and a
    # closed gate then hid the very labels that explained it (10% of a seed flipped closed it on some builds)
    suspect_at = cfg.threshold if written_gate["closed"] else written_gate["threshold"]
    suspect_seed, checked = _suspect_seed(outcome, y, classes, snap.ids, suspect_at)
    if suspect_seed:
        standard = (
            "the configured threshold: the gate closed, and wrong seed labels can be why"
            if written_gate["closed"]
            else "the gate's own standard"
        )
        msg = (
            f"{len(suspect_seed)} ground-truth label(s) of the {checked} checked are contradicted out of fold: models "
            f"that never saw them give another class a calibrated {suspect_at:.2f} or more ({standard}). A run "
            "never changes ground truth: look at them with `embedstore label suspicious --seed` (report.json: "
            "suspect_seed)"
        )
        warnings.append(msg)
        emit(JobEvent("gate", message=msg))

    # ---- report (before the write: a failed write still leaves the evidence)
    run_dir = Path(runs_dir) / collection / run_id
    model_name = f"{cfg.learner}+{outcome.calibration.method}"
    final = _final_metrics(outcome, classes, truth)
    report: dict[str, Any] = {
        "run_id": run_id,
        "collection": collection,
        "backend": store.backend,
        "read_partitions": cfg.read_partitions or store.read_parallelism,
        "created_at": utcnow(),
        "model": model_name,
        "config": cfg.describe(),
        "allow_sparse_seed": cfg.allow_sparse_seed,
        "warnings": warnings,
        "seed": {
            "points": snap.n,
            "ground_truth": n_gt,
            "fraction": n_gt / snap.n,
            "per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
            "sources": _counts([s for s, lab in zip(snap.sources, snap.labels, strict=True) if lab is not None]),
        },
        "drift": drift.as_dict(),
        "eval_mode": outcome.eval_mode,
        "models_per_iteration": outcome.n_models,
        "final_refit": outcome.final_refit,  # the refit chain's share of a new point's probability (0 = none)
        "gate_threshold": outcome.gate_threshold,
        # what the written iteration's gate actually used (raised when held-out truth showed over-confidence)
        "gate_threshold_written": written_gate["threshold"],
        "gate_closed": written_gate["closed"],
        # ground-truth labels the out-of-fold model contradicts at the gate's confidence (never changed by a run)
        "suspect_seed": suspect_seed,
        "suspect_seed_checked": checked,
        "iterations": [asdict(s) for s in outcome.iterations],
        "chosen_iteration": outcome.chosen_iteration,
        "stop_reason": outcome.stop_reason,
        "breaker_tripped": outcome.breaker_tripped,
        "calibration": {
            "method": outcome.calibration.method,
            "cv_log_loss": outcome.calibration.cv_log_loss,
            "before": asdict(outcome.calibration.before),
            "after": asdict(outcome.calibration.after),
            "first_iteration": {
                "method": outcome.first_calibration.method,
                "before": asdict(outcome.first_calibration.before),
                "after": asdict(outcome.first_calibration.after),
            },
        },
        "final": final,
        "timings_s": timings,
    }
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        plots = {
            "reliability": reliability_diagram(
                outcome.calibration.reliability_before,
                outcome.calibration.reliability_after,
                run_dir / "reliability.png",
                title=f"{collection} run {run_id}: held-out reliability, iteration {outcome.chosen_iteration} "
                f"({outcome.calibration.method})",
            ),
            "iterations": iteration_curves(
                report["iterations"],
                run_dir / "iterations.png",
                threshold=outcome.gate_threshold,
                chosen=outcome.chosen_iteration,
            ),
        }
        report["plots"] = {k: str(v) for k, v in plots.items()}
        _save(run_dir / "report.json", report)
    except Exception as exc:
        # a full disk surfaced as two chained tracebacks from the PNG writer ('_idat' has no 'fileno') and left
        # an empty run folder; nothing has been written to the store yet
        cause = _os_error(exc)
        if cause is None:
            raise
        shutil.rmtree(run_dir, ignore_errors=True)
        raise JobPreconditionError(
            f"cannot write the run's report and plots under {run_dir} ({cause.strerror or cause}); nothing was "
            "written to the store: free some space, or point the runs directory elsewhere (`label run "
            "--runs-dir` / EMBEDSTORE_RUNS_DIR; for `embedstore serve`, EMBEDSTORE_GRPC_RUNS_DIR)"
        ) from None
    emit(JobEvent("report", 1, 1, message=str(run_dir)))

    # ---- write back, as a unit
    rows = _WriteRows(outcome, snap.ids, classes, model_name)
    store.create_payload_index(collection, RUN_FIELD)
    record = RunRecord(
        run_id=run_id,
        status="writing",
        created_at=report["created_at"],
        model=model_name,
        counts=final["counts"],
        run_dir=str(run_dir),
        allow_sparse_seed=cfg.allow_sparse_seed,
        summary={
            "heldout_macro_f1": final["heldout_macro_f1"],
            "heldout_ece": final["heldout_ece"],
            "iterations": len(outcome.iterations),
            "chosen_iteration": outcome.chosen_iteration,
            "gate_threshold_written": written_gate["threshold"],
            "gate_closed": written_gate["closed"],
            "suspect_seed": suspect_seed,  # at most MAX_SUSPECT_SEED small entries: `label suspicious --seed`
            "breaker_tripped": outcome.breaker_tripped,
            "drifted": drift.drifted,
        },
    )
    t0 = time.perf_counter()
    n_batches = max(1, -(-len(rows) // store.write_batch_size))

    def on_batch(b: int) -> None:
        emit(JobEvent("write", b + 1, n_batches))
        if on_write_batch is not None:
            on_write_batch(b)

    written = apply_run(
        store,
        collection,
        record,
        rows,
        batch_size=store.write_batch_size,
        on_batch=on_batch,
        label_field=cfg.label_field,
    )
    # The run is committed (active) from here on: a cancellation now cannot undo it, so it no longer fails the
    # job. It did, and its caller was told "cancelled" about a run that was applied and active.
    # Seed points still carrying an older run's verdict (labelled after that run through a manifest, or
    # answered before answers cleared it) would count twice in the status facets: the label is the verdict.
    report["cleared_stale_pseudo"] = clear_pseudo_state(
        store, collection, labelled_with_pseudo_state(store, collection, label_field=cfg.label_field)
    )
    timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_job
    report["written"] = written
    report["timings_s"] = timings
    try:
        _save(run_dir / "report.json", report)
    except OSError as exc:
        # the run is committed: a full disk now must not fail it (report.json keeps the pre-write copy)
        note = f"the run is applied, but its final report.json could not be updated ({exc.strerror or exc})"
        report.setdefault("warnings", []).append(note)
        with contextlib.suppress(JobCancelledError):
            emit(JobEvent("warning", message=note))  # a message stage: the write bar keeps its count
    with contextlib.suppress(JobCancelledError):
        emit(JobEvent("done", 1, 1, message=run_id))
    return JobResult(run_id, collection, run_dir, report, outcome, written, classes, snap.ids, cfg)


class _WriteRows(Sequence[tuple[str, dict[str, Any]]]):
    """The per-point payload of the pool, made a batch at a time as the write-back slices it (all of them at
    once would be a dict per point: ~1.5 KB each, 1.5 GB at 1M points)."""

    def __init__(self, outcome: LabelingOutcome, ids: list[str], classes: list[str], model_name: str) -> None:
        self.outcome, self.ids, self.classes, self.model_name = outcome, ids, classes, model_name
        self.top_n = min(3, len(classes))

    def __len__(self) -> int:
        return len(self.outcome.pool)

    @overload
    def __getitem__(self, index: int) -> tuple[str, dict[str, Any]]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, dict[str, Any]]]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, dict[str, Any]] | list[tuple[str, dict[str, Any]]]:
        if isinstance(index, slice):
            return [self._row(j) for j in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._row(index % len(self))

    def _row(self, j: int) -> tuple[str, dict[str, Any]]:
        out, dec = self.outcome, self.outcome.decision
        status = int(dec.status[j])
        top = out.top_classes(j, self.classes, self.top_n)
        return (
            self.ids[out.pool[j]],
            {
                "pseudo_label": self.classes[int(dec.label[j])],
                "pseudo_confidence": round(float(dec.confidence[j]), 4),
                "pseudo_status": STATUS_NAMES[status],
                "pseudo_iteration": int(out.since[j]) if status == ACCEPTED else out.chosen_iteration,
                "pseudo_top": [[c, round(p, 4)] for c, p in top],
                "review_score": round(float(dec.uncertainty[j]), 4),
                "labeling_model": self.model_name,
            },
        )


#: the most suspect ground-truth labels a run keeps (report and registry), most contradicted first
MAX_SUSPECT_SEED = 50


def _suspect_seed(
    outcome: LabelingOutcome, y: np.ndarray, classes: list[str], ids: list[str], threshold: float
) -> tuple[list[dict[str, Any]], int]:
    """Ground-truth labels the out-of-fold model contradicts at the gate's confidence, and how many rows were
    checked. A flipped seed label stayed invisible before: `label suspicious` looked at pseudo-labels only, and
    the held-out F1 was scored against the very labels that were wrong."""
    rows = outcome.eval_rows
    probs = outcome.calibration.oof_calibrated
    if rows is None or len(rows) == 0 or len(probs) != len(rows):
        return [], 0
    given = y[rows]
    top = probs.argmax(axis=1)
    p_top = probs[np.arange(len(rows)), top]
    p_given = probs[np.arange(len(rows)), given]
    flagged = np.flatnonzero((top != given) & (p_top >= threshold))
    flagged = flagged[np.argsort(p_given[flagged], kind="stable")][:MAX_SUSPECT_SEED]
    out = [
        {
            "id": ids[rows[i]],
            "label": classes[given[i]],
            "model_says": classes[top[i]],
            "confidence": round(float(p_top[i]), 4),
            "label_probability": round(float(p_given[i]), 4),
        }
        for i in flagged
    ]
    return out, len(rows)


def _unserved_classes(outcome: LabelingOutcome, classes: list[str]) -> str | None:
    """A warning naming the classes that got no accepted pseudo-label although the model predicts them for
    part of the pool: the run's overall precision and coverage hide them (a walk-through: 5 of 10 classes,
    43% of the pool, got none, and the summary said only "coverage 16.5%")."""
    dec = outcome.decision
    if len(dec.label) == 0 or not (dec.status == ACCEPTED).any():
        return None  # nothing accepted at all: the gate's own message, or the coverage, says so
    predicted = np.bincount(dec.label, minlength=len(classes))
    accepted = np.bincount(dec.label[dec.status == ACCEPTED], minlength=len(classes))
    empty = [i for i in range(len(classes)) if accepted[i] == 0 and predicted[i] > 0]
    if not empty:
        return None
    share = predicted[empty].sum() / len(dec.label)
    names = ", ".join(f"{classes[i]!r} ({predicted[i]} predicted)" for i in empty[:10])
    more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
    return (
        f"{len(empty)} of {len(classes)} classes got no accepted pseudo-label: {names}{more}; "
        f"{share:.0%} of the pool is predicted as one of them. Their points stay unlabelled (in review or "
        "quarantine): more ground truth for those classes is what opens them"
    )


def _written_gate(outcome: LabelingOutcome, configured: float, min_support: int) -> dict[str, Any]:
    """The threshold the written iteration's gate used, and a warning when it is not the configured one.

    The per-iteration threshold is raised above the configured one when held-out ground truth shows the
    calibrated scores over-confident there (``gate.validated_threshold``); at 1.0 the gate is closed and
    nothing is accepted. Only the per-iteration rows said so: the top-level threshold stayed the configured
    one, so a run that accepted nothing gave no reason."""
    chosen = next((s for s in outcome.iterations if s.iteration == outcome.chosen_iteration), None)
    used = outcome.gate_threshold if chosen is None or chosen.gate_threshold is None else chosen.gate_threshold
    # closed = the held-out check supported no threshold (nothing accepted); a gate at 1.0 that the check
    # supported accepts scores of exactly 1.0, and was reported closed beside its accepted labels
    closed = bool(((chosen.threshold_evidence if chosen is not None else None) or {}).get("closed"))
    base = max(configured, outcome.gate_threshold)  # the drift guard may have raised the configured one
    message = None
    if closed:
        message = (
            f"GATE CLOSED at the written iteration {outcome.chosen_iteration}: at no threshold from {base:.2f} up "
            f"were the held-out ground-truth rows scoring that high at least as accurate as their calibrated "
            f"confidence (with at least {min_support} such rows), so no pseudo-label was accepted. More ground "
            "truth, above all for the classes the model is sure of, lets it open."
        )
    elif used > base + 1e-9:
        ev = (chosen.threshold_evidence if chosen is not None else None) or {}
        detail = ""
        if ev.get("accuracy") is not None:
            detail = (
                f" (at {used:.2f}: {ev['support']} held-out rows, {ev['accuracy']:.1%} correct at a mean confidence "
                f"of {ev['mean_confidence']:.3f})"
            )
        message = (
            f"the gate was raised from {base:.2f} to {used:.2f} at the written iteration {outcome.chosen_iteration}: "
            f"held-out ground truth showed the calibrated scores over-confident below it{detail}"
        )
    return {"threshold": float(used), "closed": bool(closed), "message": message}


def _counts(values: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _final_metrics(outcome: LabelingOutcome, classes: list[str], truth: np.ndarray | None) -> dict[str, Any]:
    dec = outcome.decision
    acc = dec.status == ACCEPTED
    out: dict[str, Any] = {
        "counts": dec.counts(),
        "quarantine_reasons": dec.reasons(),
        "accepted_by_class": {c: int(((dec.label == i) & acc).sum()) for i, c in enumerate(classes)},
        "coverage": float(acc.mean()),
        "mean_accepted_confidence": float(dec.confidence[acc].mean()) if acc.any() else None,
        "heldout_macro_f1": outcome.calibration.after.macro_f1,
        "heldout_ece": outcome.calibration.after.ece,
        "pseudo_precision": None,
        "pool_macro_f1_vs_truth": None,
    }
    if truth is not None:
        t = truth[outcome.pool]
        known = t != -1  # -2: a truth value no seed label has; the job cannot propose it, so it counts as wrong
        if (acc & known).any():
            out["pseudo_precision"] = float((dec.label[acc & known] == t[acc & known]).mean())
        scored = t >= 0  # macro-F1 is over the job's classes
        if scored.any():
            out["pool_macro_f1_vs_truth"] = macro_f1(outcome.probs.argmax(axis=1)[scored], t[scored], len(classes))
        if known.any():
            out["truth_known"] = int(known.sum())
            out["truth_outside_classes"] = int((t == -2).sum())
    return out


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one it was raised while handling (matplotlib's PNG writer fails
    on a full disk with an AttributeError raised during the OSError)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _save(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(jsonable(report), indent=2, default=str))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # no half-written leftover beside the report
        raise
