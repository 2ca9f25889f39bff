"""Two write-backs on one collection: a live writer is not taken over; a dead one is, and then stops.

On a Qdrant server two `label run` processes (or two service replicas) can reach one collection at once. These
tests interleave two runs' write-backs in one process, through the batch hook, on qdrant-client's engine."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from labeling.errors import RunStateError
from labeling.runs import (
    ABANDONED,
    APPLIED,
    RUN_FIELD,
    RunRecord,
    apply_run,
    load_registry,
    resolve,
    save_registry,
    utcnow,
)
from retrieval import QdrantServerStore

N = 30


@pytest.fixture
def store():
    s = QdrantServerStore(location=":memory:")
    s.create_collection("c")
    rng = np.random.default_rng(0)
    s.upsert("c", [f"p{i}" for i in range(N)], rng.standard_normal((N, 512)), [{"text": str(i)} for i in range(N)])
    yield s
    s.close()


def run(run_id: str, label: str) -> tuple[RunRecord, list[tuple[str, dict]]]:
    rows = [(f"p{i}", {"pseudo_label": label, "pseudo_status": "accepted"}) for i in range(N)]
    return RunRecord(run_id=run_id, status="new", created_at=utcnow(), model="test"), rows


def seen_labels(store) -> set[str]:
    unapplied = load_registry(store, "c").unapplied
    return {resolve(r.payload, unapplied).get("pseudo_label") for r in store.iter_records("c")}


def test_a_second_write_back_is_refused_while_a_run_is_writing(store):
    first, first_rows = run("A", "a")
    second, second_rows = run("B", "b")
    refused = []

    def meanwhile(batch: int) -> None:
        if batch == 1:
            with pytest.raises(RunStateError, match="run A is writing its labels") as exc:
                apply_run(store, "c", second, second_rows, batch_size=5)
            refused.append(str(exc.value))

    assert apply_run(store, "c", first, first_rows, batch_size=5, on_batch=meanwhile) == N
    reg = load_registry(store, "c")
    assert refused and reg.active == "A" and reg.pending is None and [r.run_id for r in reg.runs] == ["A"]
    assert reg.get("A").status == APPLIED and reg.get("A").heartbeat_at is None
    assert seen_labels(store) == {"a"}


def test_a_writer_silent_too_long_is_taken_over_and_then_stops_without_committing(store):
    first, first_rows = run("A", "a")
    second, second_rows = run("B", "b")

    def killed_and_replaced(batch: int) -> None:
        if batch == 1:  # as if A's process had hung: its heartbeat is old, so B takes the collection over
            reg = load_registry(store, "c")
            reg.get("A").heartbeat_at = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
            save_registry(store, "c", reg)
            apply_run(store, "c", second, second_rows, batch_size=5)

    with pytest.raises(RunStateError, match="run B took collection 'c' over while run A was writing"):
        apply_run(store, "c", first, first_rows, batch_size=5, on_batch=killed_and_replaced)
    reg = load_registry(store, "c")
    assert reg.active == "B" and reg.pending is None
    assert reg.get("B").status == APPLIED and reg.get("A").status == ABANDONED
    # A stopped at its next look: no point shows its labels, and B's hold everywhere
    assert seen_labels(store) == {"b"}
    assert {r.payload[RUN_FIELD] for r in store.iter_records("c")} <= {"A", "B"}


def test_an_interrupted_writer_lets_the_next_run_take_over_at_once(store):
    first, first_rows = run("A", "a")
    second, second_rows = run("B", "b")

    def ctrl_c(batch: int) -> None:
        if batch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        apply_run(store, "c", first, first_rows, batch_size=5, on_batch=ctrl_c)
    reg = load_registry(store, "c")
    assert reg.pending == "A" and reg.get("A").heartbeat_at is None  # interrupted in its own process: not live
    assert apply_run(store, "c", second, second_rows, batch_size=5) == N
    reg = load_registry(store, "c")
    assert reg.active == "B" and reg.get("A").status == ABANDONED and seen_labels(store) == {"b"}


def test_label_runs_says_whether_a_pending_write_is_live_or_interrupted(tmp_path):
    from typer.testing import CliRunner

    from embedder.cli import app
    from tests.conftest import make_edge

    path = tmp_path / "store"
    with make_edge(path) as edge:
        edge.create_collection("c")
        edge.upsert("c", ["p0"], np.ones((1, 512)))
        record, _ = run("A", "a")
        reg = load_registry(edge, "c")
        record.status, record.heartbeat_at, reg.pending = "writing", utcnow(), "A"
        reg.runs.append(record)
        save_registry(edge, "c", reg)
    out = CliRunner().invoke(app, ["label", "runs", "--path", str(path), "-c", "c"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "writing (pending) live" in out.output, out.output
    with make_edge(path) as edge:
        reg = load_registry(edge, "c")
        reg.get("A").heartbeat_at = None
        save_registry(edge, "c", reg)
    out = CliRunner().invoke(app, ["label", "runs", "--path", str(path), "-c", "c"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "writing (pending) interrupted" in out.output, out.output
