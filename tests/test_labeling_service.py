"""LabelingService over gRPC: RunLabelingJob (streamed progress), ListReviewQueue, SubmitLabels, cancellation."""

from __future__ import annotations

import time

import grpc
import pytest

from embedder.client import Aborted, Client, FailedPrecondition, InvalidArgument, NotFound
from embedder.model import Embedder
from embedder.service.server import BackgroundServer
from embedstore.v1 import labeling_pb2
from labeling.runs import load_registry
from tests.test_labeling_job import load
from tests.test_service import make_server

QUICK = {"max_iterations": 2, "cv_folds": 2, "xgboost": {"max_rounds": 40, "eta": 0.1}, "review_count": 15}


@pytest.fixture(scope="module")
def served(tmp_path_factory, image_encoder, text_encoder, fitted_projection, emoji_features, emoji_items):
    tmp = tmp_path_factory.mktemp("labeling-served")
    # load the collection through a store handle first, then hand the directory to the server
    from tests.conftest import make_edge

    store = make_edge(tmp / "store")
    vectors = fitted_projection.project(emoji_features)
    data = (
        vectors,
        [it.label for it in emoji_items],
        [it.id for it in emoji_items],
        [it.text or "" for it in emoji_items],
    )
    load(store, "items", data, n=900, seed_fraction=0.12)
    load(store, "sparse", data, n=900, seed_fraction=0.02)
    store.close()
    embedder = Embedder(image_encoder, text_encoder, fitted_projection)
    server = make_server(tmp, embedder, runs_dir=tmp / "runs")
    with BackgroundServer(server) as bg, Client(bg.target, timeout=60) as client:
        yield bg, client, server


def test_run_labeling_job_streams_progress_and_ends_with_the_run(served):
    _bg, client, server = served
    events = list(client.run_labeling_job({**QUICK, "truth_field": "hidden_label"}))
    stages = [e.stage for e in events]
    for stage in ("read", "neighbours", "iteration", "report", "write"):
        assert stage in stages
    assert stages[-1] == "done" and stages.count("done") == 1
    its = [e.iteration for e in events if e.stage == "iteration"]
    assert [i.iteration for i in its] == list(range(1, len(its) + 1)) and len(its) <= 2
    assert all(0 <= i.heldout_macro_f1 <= 1 for i in its) and its[0].HasField("pseudo_precision")
    run = events[-1].run
    assert run.run_id and run.written == sum(run.counts.values()) and run.counts["review"] == 15
    assert run.report.fields["run_id"].string_value == run.run_id
    assert load_registry(server.rt.store, "items").active == run.run_id


def test_review_queue_and_submitted_labels_become_ground_truth(served):
    _, client, server = served
    if load_registry(server.rt.store, "items").active is None:
        list(client.run_labeling_job(QUICK))
    queue = client.review_queue(limit=10)
    assert 0 < len(queue) <= 10 and isinstance(queue[0], labeling_pb2.ReviewItem)
    assert [q.review_score for q in queue] == sorted((q.review_score for q in queue), reverse=True)
    assert queue[0].top and queue[0].image.startswith("img/")
    answers = {q.id: q.top[0].label for q in queue[:3]}
    assert client.submit_labels(answers) == (3, 0)
    assert client.submit_labels(answers) == (0, 3)  # idempotent
    view = client.inspect(queue[0].id, k=3)
    assert view.point.state.label == answers[queue[0].id] and view.point.state.label_source == "human"
    other = "Flags" if answers[queue[0].id] != "Flags" else "Objects"
    with pytest.raises(FailedPrecondition, match="different label a person gave"):
        client.submit_labels({queue[0].id: other, queue[5].id: "Flags"})
    assert client.inspect(queue[5].id, k=1).point.state.label is None  # all-or-nothing
    assert client.submit_labels({queue[0].id: other}, overwrite_human=True) == (1, 0)
    # human answers taken back, all or nothing (the seed-label refusal is the library's test, same code)
    with pytest.raises(NotFound, match="no-such-point"):
        client.clear_labels([queue[1].id, "no-such-point"])
    assert client.inspect(queue[1].id, k=1).point.state.label == answers[queue[1].id]
    assert client.clear_labels([queue[0].id, queue[1].id, queue[5].id]) == (2, 1)
    assert client.inspect(queue[0].id, k=1).point.state.label is None


def test_bad_requests_get_clear_status_codes(served):
    _, client, _ = served
    with pytest.raises(InvalidArgument, match="max_iterations"):
        list(client.run_labeling_job({"max_iterations": 11}))
    with pytest.raises(InvalidArgument, match="treshold"):
        list(client.run_labeling_job({"treshold": 0.8}))
    # the scheduler and thread counts are the operator's: a token holder made the server dial any address
    # (and trust its pickled replies), or asked for thousands of threads
    with pytest.raises(InvalidArgument, match="dask_scheduler is the server's setting"):
        list(client.run_labeling_job({"learner": "xgboost_dask", "dask_scheduler": "tcp://127.0.0.1:9"}))
    with pytest.raises(InvalidArgument, match=r"forest.n_jobs=5000 is more than this server's \d+ CPUs"):
        list(client.run_labeling_job({"forest": {"n_jobs": 5000}}))
    # this seed has classes with one label: that is named first, since --allow-sparse-seed cannot help it
    with pytest.raises(FailedPrecondition, match="fewer than 2 ground-truth examples"):
        list(client.run_labeling_job(QUICK, collection="sparse"))
    with pytest.raises(InvalidArgument, match="empty id or label"):
        client.submit_labels({"x": ""})
    # too few points is the collection's state, not a server fault (it was INTERNAL, logged with a traceback)
    _, _, server = served
    if "tiny" not in server.rt.store.list_collections():
        server.rt.store.create_collection("tiny")
    with pytest.raises(FailedPrecondition, match="has 0 points; a labeling job needs at least 10"):
        list(client.run_labeling_job(QUICK, collection="tiny"))


def test_one_job_per_collection_and_cancel_frees_it(served, monkeypatch):
    import threading

    from embedder.service import servicers

    _bg, client, server = served
    # The job thread stops at its next event once cancelled, which can be milliseconds later: a test that polled
    # for the "stopping" state in between failed on a loaded host (the thread ended between two polls). So the
    # thread is held at its next event until the test has seen that state.
    hold, release = threading.Event(), threading.Event()
    real_run_job = servicers.run_job

    def held_run_job(*args, events, **kwargs):
        def on_event(e):
            if hold.is_set():
                release.wait(60)
            return events(e)

        return real_run_job(*args, events=on_event, **kwargs)

    monkeypatch.setattr(servicers, "run_job", held_run_job)
    request = labeling_pb2.RunLabelingJobRequest(collection="items")
    from embedder.service.convert import dict_to_struct

    dict_to_struct({**QUICK, "max_iterations": 10, "stop_change": 0.0, "breaker": False}, request.config)
    call = client._labeling.RunLabelingJob(request)
    first = next(call)
    assert first.stage == "read"
    with pytest.raises(Aborted, match="already running"):
        list(client.run_labeling_job(QUICK))
    before = load_registry(server.rt.store, "items").active
    hold.set()
    call.cancel()
    deadline = time.monotonic() + 10
    while "items" not in server.rt.labeling_stopping:
        time.sleep(0.01)
        assert time.monotonic() < deadline, "a cancelled job that has not stopped is marked stopping"
    assert "items" in server.rt.labeling_jobs  # the job thread is still running: the collection is not free yet
    with pytest.raises(Aborted, match="was cancelled and is stopping"):  # said so, not "already running"
        list(client.run_labeling_job(QUICK))
    hold.clear()
    release.set()
    deadline = time.monotonic() + 60
    while "items" in server.rt.labeling_jobs and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "items" not in server.rt.labeling_jobs  # the job thread stopped at its next step
    assert load_registry(server.rt.store, "items").active == before  # nothing was committed
    events = list(client.run_labeling_job(QUICK))
    assert events[-1].stage == "done"
    # a job past its deadline is counted as the caller saw it: DEADLINE_EXCEEDED (it was CANCELLED)
    counted = server.metrics.requests.labels("RunLabelingJob", "DEADLINE_EXCEEDED")
    was = counted._value.get()
    with pytest.raises(grpc.RpcError) as err:
        list(client._labeling.RunLabelingJob(request, timeout=1.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 60
    while ("items" in server.rt.labeling_jobs or counted._value.get() == was) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counted._value.get() == was + 1 and "items" not in server.rt.labeling_jobs


def test_ctrl_c_while_waiting_for_the_next_event_cancels_the_job_at_once(served):
    """The client blocked inside grpc between events (a training step is silent for tens of seconds), and a
    Ctrl-C there could go unseen until the job had finished and written its labels."""
    import os
    import signal
    import threading

    _bg, client, server = served
    before = load_registry(server.rt.store, "items").active
    config = {**QUICK, "max_iterations": 10, "stop_change": 0.0, "breaker": False}
    stages: list[str] = []
    ctrl_c = threading.Timer(4.0, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for event in client.run_labeling_job(config):
                stages.append(event.stage)
    finally:
        ctrl_c.cancel()
    assert time.monotonic() - start < 8 and "done" not in stages
    deadline = time.monotonic() + 60
    while "items" in server.rt.labeling_jobs and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "items" not in server.rt.labeling_jobs  # the call was cancelled, so the job stopped
    assert load_registry(server.rt.store, "items").active == before  # and nothing was committed


def test_label_cli_goes_through_the_server(served, tmp_path):
    import json

    from typer.testing import CliRunner

    from embedder.cli import app

    bg, _, server = served
    runner = CliRunner()
    config = tmp_path / "quick.json"
    config.write_text(json.dumps(QUICK))
    # the server owns the embedded store: the in-process command says so and how to go through the server
    locked = runner.invoke(app, ["label", "run", "--path", str(server.rt.store.path), "-c", "items"])
    assert locked.exit_code == 2 and "--server" in locked.output
    result = runner.invoke(
        app, ["label", "run", "--server", bg.target, "-c", "items", "--config", str(config), "--json", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["run_id"] == load_registry(server.rt.store, "items").active
    out = tmp_path / "review.jsonl"
    result = runner.invoke(app, ["label", "review", "--export", str(out), "--server", bg.target, "-c", "items"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and rows[0]["label"] is None
    rows[0]["label"] = rows[0]["top"][0][0]
    out.write_text(json.dumps(rows[0]) + "\n")
    result = runner.invoke(app, ["label", "import", str(out), "--server", bg.target, "-c", "items"])
    assert result.exit_code == 0 and "wrote 1 labels" in result.output, result.output
