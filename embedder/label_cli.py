"""``embedstore label ...``: labeling jobs, runs, rollback, review queue, human answers, suspicious labels."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from embedder.environment import remote_collection
from retrieval import StoreError, StoreLockedError, StoreSettings, open_store

label_app = typer.Typer(help="Self-training labeling jobs against the store.", no_args_is_help=True)
console = Console()

PathOpt = Annotated[Optional[Path], typer.Option("--path", help="Edge store directory (EMBEDSTORE_PATH).")]  # noqa: UP045
CollectionOpt = Annotated[Optional[str], typer.Option("--collection", "-c", help="Collection (EMBEDSTORE_COLLECTION).")]  # noqa: UP045
ServerOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--server",
        help="Go through a running `embedstore serve` (host:port) instead of opening the store in-process.",
    ),
]
TokenOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--token", envvar="EMBEDSTORE_TOKEN", help="Bearer token, if the server wants one."),
]
RunsDirOpt = Annotated[
    Path, typer.Option("--runs-dir", help="Where run directories are written.", envvar="EMBEDSTORE_RUNS_DIR")
]


def _settings(path: Path | None, collection: str | None) -> StoreSettings:
    base = StoreSettings()
    update: dict[str, Any] = {}
    if path is not None:
        update["path"] = path
    if collection is not None:
        update["collection"] = collection
    return StoreSettings.model_validate({**base.model_dump(), **update}) if update else base


def _fail(exc: Exception) -> None:
    from embedder.environment import error_text

    msg = error_text(exc)
    if isinstance(exc, StoreLockedError):
        # the holder's command is in the message: the advice depends on which process it is
        if "embedstore ui" in msg:
            msg += (
                ". The web page holds the store (it has no gRPC service to go through): stop `embedstore ui` to "
                "run this here; for the page and jobs at once, use a Qdrant server (EMBEDSTORE_BACKEND=server)"
            )
        else:
            msg += (
                ". The embedded store has one owner process: if `embedstore serve` holds it, add --server "
                "HOST:PORT to go through the server (same logic, over gRPC), or stop the server"
            )
    console.print(f"[red]error:[/] {msg}")
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _remote(server: str, token: str | None, **options: Any) -> Iterator[Any]:
    """A client of ``server`` (TLS from the environment); a service error ends the command with its message."""
    from embedder.client import Client, ServiceError, tls_from_env

    try:
        with Client(server, token=token, **tls_from_env(), **options) as client:
            yield client
    except ServiceError as exc:
        _fail(exc)


def _open(path: Path | None, collection: str | None) -> tuple[Any, str]:
    settings = _settings(path, collection)
    return open_store(settings, create=False), settings.collection


@label_app.command("run")
def run_cmd(
    path: PathOpt = None,
    collection: CollectionOpt = None,
    runs_dir: RunsDirOpt = Path("./data/runs"),
    config: Annotated[Optional[Path], typer.Option(help="JSON file of LabelingConfig fields.")] = None,  # noqa: UP045
    threshold: Annotated[Optional[float], typer.Option(help="State Gate: calibrated P to accept (0.8).")] = None,  # noqa: UP045
    max_iterations: Annotated[Optional[int], typer.Option(help="At most 10.")] = None,  # noqa: UP045
    learner: Annotated[Optional[str], typer.Option(help="xgboost (default) or random_forest.")] = None,  # noqa: UP045
    calibration: Annotated[
        Optional[str], typer.Option(help="auto, platt, beta, isotonic, temperature or none.")  # noqa: UP045
    ] = None,
    k: Annotated[Optional[int], typer.Option("-k", help="Neighbours per point (15).")] = None,  # noqa: UP045
    prefix_dims: Annotated[Optional[int], typer.Option(help="Embedding prefix as features: 128, 256, 512.")] = None,  # noqa: UP045
    truth_field: Annotated[
        Optional[str], typer.Option(help="Payload field with known truth: reported, never trained on.")  # noqa: UP045
    ] = None,
    allow_sparse_seed: Annotated[bool, typer.Option(help="Run below the 5% seed rule (recorded).")] = False,
    mixup: Annotated[Optional[bool], typer.Option("--mixup/--no-mixup")] = None,  # noqa: UP045
    breaker: Annotated[Optional[bool], typer.Option("--breaker/--no-breaker")] = None,  # noqa: UP045
    veto: Annotated[Optional[bool], typer.Option("--veto/--no-veto", help="Neighbourhood veto in the gate.")] = None,  # noqa: UP045
    review_count: Annotated[Optional[int], typer.Option(help="Most uncertain points sent to review.")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option()] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Run a labeling job: neighbourhood features, XGBoost, calibration, State Gate, <= 10 iterations, write-back."""
    from pydantic import ValidationError

    from labeling.config import LabelingConfig
    from labeling.present import print_report

    fields: dict[str, Any] = {}
    if config is not None:
        try:
            fields = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            _fail(ValueError(f"--config {config}: cannot read it as JSON: {exc}"))
        if not isinstance(fields, dict):
            _fail(
                ValueError(
                    f"--config {config}: must hold a JSON object of LabelingConfig fields, got a "
                    f"{type(fields).__name__}"
                )
            )
    given = {
        "threshold": threshold,
        "max_iterations": max_iterations,
        "learner": learner,
        "calibration": calibration,
        "k": k,
        "prefix_dims": prefix_dims,
        "truth_field": truth_field,
        "mixup": mixup,
        "breaker": breaker,
        "neighbourhood_veto": veto,
        "review_count": review_count,
        "seed": seed,
    }
    fields.update({key: v for key, v in given.items() if v is not None})
    if allow_sparse_seed:
        fields["allow_sparse_seed"] = True
    try:
        cfg = LabelingConfig(**fields)
    except ValidationError as exc:
        _fail(ValueError(f"invalid labeling config: {exc}"))
    if server is not None:
        if runs_dir != Path("./data/runs"):
            console.print(
                "[yellow]note:[/] --runs-dir / EMBEDSTORE_RUNS_DIR applies to jobs run here; the server writes its "
                "run directories under its EMBEDSTORE_GRPC_RUNS_DIR"
            )
        report = _run_via_server(server, token, remote_collection(collection), fields, progress and not as_json)
    else:
        report = _run_local(path, collection, cfg, runs_dir, progress and not as_json)
    if as_json:
        console.print_json(json.dumps(report, default=str))
    else:
        print_report(report, console)


def _run_local(path: Path | None, collection: str | None, cfg: Any, runs_dir: Path, progress: bool) -> dict[str, Any]:
    from labeling.errors import LabelingError
    from labeling.job import run_job
    from labeling.present import rich_events

    try:
        store, name = _open(path, collection)
        with store, rich_events(console, enabled=progress) as events:
            result = run_job(store, name, cfg, runs_dir=runs_dir, events=events)
    except (LabelingError, StoreError) as exc:
        _fail(exc)
    return result.report


def _run_via_server(server: str, token: str | None, collection: str, fields: dict[str, Any], progress: bool) -> dict:
    """The same job through gRPC RunLabelingJob, with the same progress bars."""
    from embedder.service.convert import struct_to_dict
    from labeling.job import JobEvent
    from labeling.present import rich_events

    report: dict[str, Any] | None = None
    with _remote(server, token, timeout=None) as client, rich_events(console, enabled=progress) as events:
        for e in client.run_labeling_job(fields, collection=collection):
            if e.stage == "done":
                report = struct_to_dict(e.run.report)
            elif e.stage == "iteration":
                events(JobEvent("iteration", e.done, e.total, e.message, {"summary": e.iteration}))
            else:
                events(JobEvent(e.stage, e.done, e.total, e.message))
    if report is None:
        _fail(RuntimeError("the server ended the job stream without a result"))
    return report  # type: ignore[return-value]


@label_app.command("runs")
def runs_cmd(
    path: PathOpt = None,
    collection: CollectionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry as JSON.")] = False,
) -> None:
    """List the labeling runs of a collection (newest last) and which is active."""
    import dataclasses

    from labeling.runs import WRITING, load_registry, writing_live

    try:
        store, name = _open(path, collection)
        with store:
            reg = load_registry(store, name)
    except StoreError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(dataclasses.asdict(reg)))
        return
    if not reg.runs:
        console.print(f"no labeling run on collection {name!r} yet: start one with `embedstore label run -c {name}`")
        return
    from labeling.present import fitted_table

    headers = [
        "run",
        "status",
        "model",
        "points",
        "accepted",
        "quarantined",
        "review",
        "gate",
        "held-out F1",
        "created",
    ]
    rows = []
    for r in reg.runs:
        mark = " (active)" if r.run_id == reg.active else (" (pending)" if r.run_id == reg.pending else "")
        if r.run_id == reg.pending and r.status == WRITING:
            # live: another job is refused; otherwise it crashed and the next job takes over
            mark += " live" if writing_live(r) else " interrupted"
        f1 = r.summary.get("heldout_macro_f1")
        gate = r.summary.get("gate_threshold_written")  # runs from before the field have none
        gate_cell = "closed" if r.summary.get("gate_closed") else ("" if gate is None else f"{gate:.2f}")
        rows.append(
            [
                r.run_id,
                r.status + mark,
                r.model,
                str(r.points),
                str(r.counts.get("accepted", "")),
                str(r.counts.get("quarantined", "")),
                str(r.counts.get("review", "")),
                gate_cell,
                "" if f1 is None else f"{f1:.3f}",
                r.created_at,
            ]
        )
    # every cell whole at any width (piped output is 80 columns: 'app…', 'wri…'); the date gives way first
    table = fitted_table(headers, rows, width=console.width, shrink="created", min_shrink=10, max_shrink=25)
    console.print(table)
    # the counts are each run's own, at its write: answers given and rollbacks made since do not change them
    console.print(
        "points / accepted / quarantined / review: as each run wrote them; `embedstore store facet pseudo_status` "
        "counts the collection now"
    )
    for r in reg.runs:  # states left by an interrupted command, and what to do about them
        if r.status == "rolling_back":
            console.print(
                f"[yellow]run {r.run_id}: its rollback was interrupted (labels are part on it, part on the run "
                f"before). Finish it: `embedstore label rollback {r.run_id}`[/]"
            )
    if reg.pending:
        console.print(
            f"[yellow]run {reg.pending}: its write was interrupted (or is running now). Readers see the run before "
            "it, whole; the next `embedstore label run` supersedes it[/]"
        )


@label_app.command("rollback")
def rollback_cmd(
    run_id: Annotated[str, typer.Argument(help="The active run to undo.")],
    path: PathOpt = None,
    collection: CollectionOpt = None,
) -> None:
    """Restore the labels the run replaced; the run before it becomes active again."""
    from labeling.errors import LabelingError
    from labeling.runs import load_registry, rollback_run

    try:
        store, name = _open(path, collection)
        with store:
            n = rollback_run(store, name, run_id)
            active = load_registry(store, name).active
    except (LabelingError, StoreError) as exc:
        _fail(exc)
    console.print(f"rolled back {run_id}: {n} points restored; active run is now {active or 'none'}")


@label_app.command("review")
def review_cmd(
    export: Annotated[Path, typer.Option("--export", help="JSONL file to write the review queue to.")],
    limit: Annotated[Optional[int], typer.Option(help="At most this many items.")] = None,  # noqa: UP045
    path: PathOpt = None,
    collection: CollectionOpt = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Export the points sent to review (most uncertain first): id, text, image ref, top classes, empty label."""
    from embedder.service.convert import review_item_from_proto
    from labeling.review import export_review, write_review

    if server is not None:
        with _remote(server, token) as client:
            found = client.review_queue(limit=limit or 100_000, collection=remote_collection(collection))
        n = write_review([review_item_from_proto(q) for q in found], export)
    else:
        try:
            store, name = _open(path, collection)
            with store:
                n = export_review(store, name, export, limit=limit)
        except StoreError as exc:
            _fail(exc)
    console.print(f"wrote {n} review items to {export}; fill in 'label' and run `embedstore label import {export}`")


@label_app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="JSONL or CSV with id and label.")],
    overwrite_human: Annotated[
        bool, typer.Option(help="Replace different existing human labels (and answers of any --source).")
    ] = False,
    source: Annotated[str, typer.Option(help="label_source to record.")] = "human",
    path: PathOpt = None,
    collection: CollectionOpt = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Write human answers as ground truth (all-or-nothing; never silently over another human label)."""
    from labeling.errors import LabelingError
    from labeling.review import import_labels, read_answers

    if server is not None:
        try:
            answers, unanswered = read_answers(file)
        except LabelingError as exc:
            _fail(exc)
        with _remote(server, token) as client:
            written, unchanged = client.submit_labels(
                answers, source=source, overwrite_human=overwrite_human, collection=remote_collection(collection)
            )
        console.print(f"wrote {written} labels as ground truth ({unchanged} already so, {unanswered} unanswered)")
        return
    try:
        store, name = _open(path, collection)
        with store:
            res = import_labels(store, name, file, source=source, overwrite_human=overwrite_human)
    except (LabelingError, StoreError) as exc:
        _fail(exc)
    console.print(
        f"wrote {res.written} labels as ground truth ({res.unchanged} already so, {res.skipped_unanswered} unanswered)"
    )
    thin = {name: n for name, n in res.new_classes.items() if n < 2}
    if res.new_classes:
        console.print(f"[yellow]note:[/] new classes: {res.new_classes}")
    if thin:
        console.print(
            f"[yellow]note:[/] {sorted(thin)} {'has' if len(thin) == 1 else 'have'} one label: a labeling job needs "
            "at least 2 of every class and refuses to run until then (label another, or take it back with "
            "`embedstore label clear ID`)"
        )


@label_app.command("clear")
def clear_cmd(
    ids: Annotated[list[str], typer.Argument(help="Ids of the points whose ground-truth label to take back.")],
    any_source: Annotated[
        bool,
        typer.Option(
            help="Also clear labels the data came with (manifest, dataset, seed); by default only answers "
            "given through embedstore."
        ),
    ] = False,
    path: PathOpt = None,
    collection: CollectionOpt = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Take ground-truth labels back: the points become unlabelled (all-or-nothing)."""
    from labeling.errors import LabelingError
    from labeling.review import clear_labels

    if server is not None:
        with _remote(server, token) as client:
            cleared, unchanged = client.clear_labels(
                ids, any_source=any_source, collection=remote_collection(collection)
            )
    else:
        try:
            store, name = _open(path, collection)
            with store:
                res = clear_labels(store, name, ids, any_source=any_source)
        except (LabelingError, StoreError) as exc:
            _fail(exc)
        cleared, unchanged = res.cleared, res.unchanged
    console.print(f"cleared {cleared} ground-truth labels ({unchanged} had none)")


def _suspect_seed_table(store: Any, name: str, limit: int, as_json: bool) -> None:
    """The active run's suspect ground-truth labels, with their current label (an answer given since shows)."""
    from labeling.present import fitted_table
    from labeling.runs import load_registry

    reg = load_registry(store, name)
    active = next((r for r in reg.runs if r.run_id == reg.active), None)
    if active is None:
        console.print(f"no active labeling run on {name!r}: the check runs with each job (`embedstore label run`)")
        return
    found = list(active.summary.get("suspect_seed") or [])[:limit]
    now = {
        r.id: (r.payload or {}).get("label") for r in store.retrieve(name, [f["id"] for f in found], missing_ok=True)
    }
    for f in found:
        f["label_now"] = now.get(f["id"])
    if as_json:
        console.print_json(json.dumps(found))
        return
    if not found:
        checked = "" if "suspect_seed" in active.summary else " (the run is from before this check)"
        console.print(f"run {active.run_id}: no ground-truth label was contradicted at the gate's confidence{checked}")
        return
    headers = ["id", "label", "model says", "conf", "p(label)", "label now"]
    rows = [
        [
            f["id"],
            f["label"],
            f["model_says"],
            f"{f['confidence']:.3f}",
            f"{f['label_probability']:.3f}",
            str(f["label_now"]),
        ]
        for f in found
    ]
    console.print(fitted_table(headers, rows, width=console.width))
    console.print(
        "a run never changes ground truth: correct a label with `embedstore label import` (--overwrite-human for "
        "human labels) or on the web page"
    )


@label_app.command("suspicious")
def suspicious_cmd(
    k: Annotated[int, typer.Option("-k", help="Neighbours to compare with.")] = 10,
    limit: Annotated[int, typer.Option(help="How many to list.")] = 20,
    path: PathOpt = None,
    collection: CollectionOpt = None,
    seed: Annotated[
        bool,
        typer.Option(
            "--seed",
            help="Ground-truth labels instead: those the active run's out-of-fold models contradicted at the "
            "gate's confidence (a mislabelled seed).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Accepted pseudo-labels that their neighbourhood contradicts most (--seed: suspect ground-truth labels)."""
    import dataclasses

    from labeling.review import suspicious

    try:
        store, name = _open(path, collection)
        with store:
            if seed:
                _suspect_seed_table(store, name, limit, as_json)
                return
            found = suspicious(store, name, k=k, limit=limit)
    except StoreError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps([dataclasses.asdict(s) for s in found]))
        return
    if not found:
        console.print(
            f"no accepted pseudo-label on {name!r} has two or more labelled neighbours to judge it by "
            "(or no run has written any yet)"
        )
        return
    from labeling.present import fitted_table

    headers = ["id", "pseudo-label", "conf", "agreement", "neighbours say", "labelled", "text"]
    rows = [
        [
            s.id,
            s.pseudo_label,
            "" if s.pseudo_confidence is None else f"{s.pseudo_confidence:.3f}",
            f"{s.agreement:.2f}",
            f"{s.majority_label} ({s.majority_share:.2f})",
            str(s.labelled_neighbours),
            s.text or "",
        ]
        for s in found
    ]
    console.print(fitted_table(headers, rows, width=console.width))
