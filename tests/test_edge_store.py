"""What only the embedded adapter has: a directory it owns, durability across reopen, optimize policy."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from retrieval import (
    CollectionSpec,
    EdgeStore,
    InvalidInputError,
    QdrantServerStore,
    SchemaMismatchError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreUnavailableError,
)
from retrieval.edge import BYTES_PER_POINT, MIN_FREE_BYTES
from tests.conftest import clustered, exact_topk, make_edge


def test_second_opener_gets_a_clear_error_naming_the_holder(tmp_path):
    with make_edge(tmp_path) as first:
        first.create_collection("c")
        with pytest.raises(StoreLockedError) as err:
            EdgeStore(tmp_path)
        msg = str(err.value)
        assert str(tmp_path) in msg and f"pid {os.getpid()}" not in msg and "this same process" in msg
    # released on close: a new owner can open it
    with EdgeStore(tmp_path) as again:
        assert again.list_collections() == ["c"]


def test_a_folder_it_cannot_write_is_a_clear_error_not_a_traceback(tmp_path):
    """A read-only mount (or a path under a file) raised a bare OSError from the lock file."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"cannot open the embedded store at .*It needs a writable folder"):
        EdgeStore(tmp_path / "file" / "store")


def test_too_little_free_space_is_refused_before_qdrant_edge_can_die_of_it(tmp_path):
    """Qdrant Edge maps its files: on a full disk every command, even `store info`, died of SIGBUS without a
    word. The adapter checks the free space first, at open and before each write, and says why."""
    import shutil

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(StoreError, match=r"opening the store: only \d+ MiB free on the device .*SIGBUS"):
        EdgeStore(tmp_path / "s", min_free_bytes=free + 2**40)
    with EdgeStore(tmp_path / "s") as store:  # the refused open released its lock
        store.create_collection("c")
        vectors, _ = clustered(600, seed=3)
        store.min_free_bytes = shutil.disk_usage(tmp_path).free - 5 * BYTES_PER_POINT
        with pytest.raises(StoreError, match=r"upsert of 600 points into .c.: only"):
            store.upsert("c", [str(i) for i in range(600)], vectors)
        store.min_free_bytes = MIN_FREE_BYTES
        assert store.count("c") == 0  # nothing written
        store.upsert("c", [str(i) for i in range(600)], vectors)
        assert store.count("c") == 600

        def room(n_bytes: int) -> None:  # leave `n_bytes` above the reserve
            store.min_free_bytes = shutil.disk_usage(tmp_path).free - n_bytes

        # big payloads count by their size: 300 x 200 KB passed a per-point estimate and died of SIGBUS
        room(50 * 2**20)
        big = [{"blob": "x" * 200_000} for _ in range(300)]
        with pytest.raises(StoreFullError, match=r"upsert of 300 points into .c.: only"):
            store.upsert("c", [f"b{i}" for i in range(300)], vectors[:300], big)
        # every other write checks too (a full disk killed the server on a SubmitLabels): set_payload by its
        # bodies' size, delete_payload (points copied out of their segment), delete, indexes, metadata
        ids = [str(i) for i in range(600)]
        before = {r.id: r.payload for r in store.iter_records("c")}
        with pytest.raises(StoreFullError, match=r"set_payload on 600 points in .c.: only"):
            store.set_payload("c", [(i, {"note": "y" * 100_000}) for i in ids])
        room(2**20)  # 600 points copied out of their segment need ~5 MiB
        with pytest.raises(StoreFullError, match=r"delete_payload on 600 points"):
            store.delete_payload_keys("c", ids, ["x"])
        # the same check, asked ahead by a caller about to make several writes as one answer (SubmitLabels)
        with pytest.raises(StoreFullError, match=r"set_payload on 600 points in .c.: only"):
            store.check_room("c", 600)
        with pytest.raises(InvalidInputError, match="op must be"):
            store.check_room("c", 1, op="nope")
        from labeling.review import submit_labels

        with pytest.raises(StoreFullError):
            submit_labels(store, "c", [(i, "cat") for i in ids])
        room(-64 * 2**20)  # below the reserve already (by a margin: other files on the device come and go)
        for write in (
            lambda: store.delete("c", ids),
            lambda: store.create_payload_index("c", "colour", "keyword"),
            lambda: store.update_collection_metadata("c", {"k": "v"}),
        ):
            with pytest.raises(StoreFullError):
                write()
        store.min_free_bytes = MIN_FREE_BYTES
        assert {r.id: r.payload for r in store.iter_records("c")} == before and store.count("c") == 600
        assert not (tmp_path / "s" / "collections" / "c" / "meta.json.tmp").exists()


def test_a_lock_file_that_cannot_be_written_still_locks_and_is_released(tmp_path, monkeypatch):
    """On a full device the holder's description could not be written: the OSError escaped with the lock's fd
    open, and the same process was then refused its own store as "in use by another process"."""
    import errno

    from retrieval import _lock

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(_lock.os, "pwrite", full)
        with EdgeStore(tmp_path / "s") as store:
            store.create_collection("c")
            with pytest.raises(StoreLockedError):  # still the one owner
                EdgeStore(tmp_path / "s")
    with EdgeStore(tmp_path / "s") as again:  # released: the same process opens it again
        assert again.list_collections() == ["c"]


def test_a_damaged_collection_settings_file_is_named(tmp_path):
    with EdgeStore(tmp_path / "s") as store:
        store.create_collection("c")
    meta = tmp_path / "s" / "collections" / "c" / "meta.json"
    meta.write_text(meta.read_text()[:40])
    with (
        EdgeStore(tmp_path / "s") as store,
        pytest.raises(StoreError, match=r"settings file .*meta.json. cannot be read"),
    ):
        store.count("c")


def test_lock_held_by_another_process_names_its_pid(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from retrieval import EdgeStore
        s = EdgeStore({str(tmp_path)!r})
        print("ready", flush=True)
        sys.stdin.readline()
        s.close()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=f"pid {child.pid} on host"):
            EdgeStore(tmp_path)
    finally:
        child.communicate("\n", timeout=60)
    assert child.returncode == 0
    EdgeStore(tmp_path).close()  # the child's exit released it


def test_lock_is_released_when_the_holder_dies(tmp_path):
    code = f"from retrieval import EdgeStore; s = EdgeStore({str(tmp_path)!r}); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    EdgeStore(tmp_path).close()


def test_reopen_after_close_keeps_points_payload_and_index(tmp_path):
    x, labels = clustered(2500, seed=4)
    ids = [f"p{i}" for i in range(len(x))]
    with make_edge(tmp_path) as s:
        s.create_collection("c")
        s.upsert("c", ids, x, [{"label": f"c{v}"} for v in labels])
        s.set_payload("c", {"p1": {"pseudo_label": "c9"}})
        s.update_collection_metadata("c", {"embedding_version": "mrl-abc"})
        before = [h.id for h in s.search("c", x[10], top_k=10)]
    with make_edge(tmp_path) as s:
        info = s.collection_info("c")
        assert info.points_count == 2500 and info.indexed_vectors_count > 0
        assert info.spec["pending_optimize"] == 0
        assert s.retrieve("c", ["p1"])[0].payload["pseudo_label"] == "c9"
        assert s.collection_metadata("c") == {"embedding_version": "mrl-abc"}
        assert [h.id for h in s.search("c", x[10], top_k=10)] == before
        assert s.facet("c", "label") == {
            f"c{v}": int(n) for v, n in zip(*np.unique(labels, return_counts=True), strict=True)
        }


def test_auto_optimize_after_enough_pending_writes(tmp_path):
    x, _ = clustered(1200, seed=2)
    with make_edge(tmp_path, optimize_min_pending=1000) as s:
        s.create_collection("c")
        s.upsert("c", [f"a{i}" for i in range(600)], x[:600])
        assert s.collection_info("c").spec["pending_optimize"] == 600
        s.upsert("c", [f"b{i}" for i in range(600)], x[600:])
        info = s.collection_info("c")
        assert info.spec["pending_optimize"] == 0 and info.indexed_vectors_count > 0


@contextlib.contextmanager
def _optimized_edge(tmp_path, **kw):
    """An Edge store with 1,200 points in collection "c", upserted in one batch (which crosses the threshold)."""
    x, _ = clustered(1200, seed=2)
    with make_edge(tmp_path, **kw) as s:
        s.create_collection("c")
        ids = [f"a{i}" for i in range(1200)]
        s.upsert("c", ids, x)
        yield s, ids


def test_payload_updates_count_towards_the_auto_optimize(tmp_path):
    # a payload update moves the point out of its optimized segment; unoptimized, search on the moved
    # points was measured 4.3x slower (100k points), so payload writes must trigger the optimize too
    with _optimized_edge(tmp_path, optimize_min_pending=1000) as (s, ids):
        assert s.collection_info("c").spec["pending_optimize"] == 0  # 1200 >= 1000: optimized
        s.set_payload("c", {i: {"pseudo_label": "x"} for i in ids[:600]})
        assert s.collection_info("c").spec["pending_optimize"] == 600
        s.delete_payload_keys("c", ids[600:1000], ["label"], missing_ok=True)
        assert s.collection_info("c").spec["pending_optimize"] == 0  # 600 + 400 reached the threshold
        s.set_payload("c", {i: {"pseudo_label": "y"} for i in ids[:10]})
        assert s.collection_info("c").spec["pending_optimize"] == 10
    with make_edge(tmp_path) as s:  # close optimized what was pending
        assert s.collection_info("c").spec["pending_optimize"] == 0
        assert s.retrieve("c", ["a3"])[0].payload["pseudo_label"] == "y"


def test_no_auto_optimize_when_disabled_but_flush_optimizes(tmp_path):
    x, _ = clustered(1200, seed=2)
    with make_edge(tmp_path, optimize_min_pending=100, auto_optimize=False) as s:
        s.create_collection("c")
        s.upsert("c", [f"a{i}" for i in range(1200)], x)
        assert s.collection_info("c").spec["pending_optimize"] == 1200
        s.flush()
        assert s.collection_info("c").spec["pending_optimize"] == 0


def test_ensure_collection_refuses_a_foreign_layout(tmp_path):
    with make_edge(tmp_path) as s:
        s.create_collection("c")
    meta = tmp_path / "collections" / "c" / "meta.json"
    body = json.loads(meta.read_text())
    body["layout"]["vectors"]["full512"] = 768
    meta.write_text(json.dumps(body))
    with make_edge(tmp_path) as s, pytest.raises(SchemaMismatchError, match="768"):
        s.ensure_collection("c")


def test_server_adapter_refuses_a_foreign_collection():
    client = QdrantClient(location=":memory:")
    client.create_collection("foreign", vectors_config=qm.VectorParams(size=384, distance=qm.Distance.DOT))
    store = QdrantServerStore(client=client)
    with pytest.raises(SchemaMismatchError, match="single unnamed vector"):
        store.ensure_collection("foreign")


def test_concurrent_searches_and_writes_from_threads(tmp_path):
    """The gRPC service calls the store from a thread pool: searches and writes must interleave safely."""
    x, _ = clustered(2000, seed=6)
    ids = [f"p{i}" for i in range(2000)]
    errors: list[BaseException] = []
    with make_edge(tmp_path) as s:
        s.create_collection("c")
        s.upsert("c", ids[:1000], x[:1000])

        def reader() -> None:
            try:
                for i in range(60):
                    hits = s.search("c", x[i], top_k=5)
                    assert hits and hits[0].id == ids[i]
            except BaseException as exc:
                errors.append(exc)

        def writer() -> None:
            try:
                for start in range(1000, 2000, 100):
                    s.upsert("c", ids[start : start + 100], x[start : start + 100])
                    s.set_payload("c", {ids[start]: {"pseudo_status": "review"}})
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert s.count("c") == 2000 and s.count("c", {"pseudo_status": "review"}) == 10


def test_a_bulk_write_optimizes_once_at_its_end(tmp_path):
    with _optimized_edge(tmp_path, optimize_min_pending=500) as (s, ids):
        with s.bulk_write():
            for start in range(0, 1200, 200):  # crosses the threshold twice: deferred both times
                s.set_payload("c", {i: {"pseudo_label": "x"} for i in ids[start : start + 200]})
            assert s.collection_info("c").spec["pending_optimize"] == 1200
        assert s.collection_info("c").spec["pending_optimize"] == 0
        assert s.count("c", {"pseudo_label": "x"}) == 1200


def _segment_configs(path, collection: str) -> list[dict]:
    """What the engine itself wrote for each segment (its on-disk segment.json)."""
    segments = (path / "collections" / collection / "shard" / "segments").glob("*/segment.json")
    return [json.loads(p.read_text())["config"]["vector_data"] for p in segments]


def test_prefix_is_int8_quantized_in_ram_with_float_originals_on_disk(tmp_path):
    x, _ = clustered(3000, seed=8)
    with make_edge(tmp_path) as s:
        s.create_collection("c")
        s.upsert("c", list(range(len(x))), x)
        s.optimize("c")
        assert s.collection_info("c").spec["prefix_quantization"] == "int8"
        top = [int(h.id) for h in s.search("c", x[3], top_k=10)]
    configs = _segment_configs(tmp_path, "c")
    indexed = [c for c in configs if c["mrl128"]["index"]["options"].get("m")]
    assert indexed, "optimize built no mrl128 graph"
    for c in indexed:
        assert c["mrl128"]["quantization_config"] == {"scalar": {"type": "int8", "quantile": 0.99, "memory": "cached"}}
        assert c["mrl128"]["storage_type"] == "Mmap"  # the float originals: on disk, not in RAM
        assert c["full512"]["quantization_config"] is None and c["full512"]["index"]["options"]["m"] == 0
    truth = exact_topk(x, x[3:4], 10)[0]
    assert len(set(top) & set(truth.tolist())) >= 9  # the shortlist on int8, reranked on float full512


def test_a_collection_from_before_quantization_reopens_unquantized(tmp_path):
    x, _ = clustered(2000, seed=9)
    with make_edge(tmp_path) as s:
        s.create_collection("c", CollectionSpec(prefix_quantization="none"))
        s.upsert("c", [f"p{i}" for i in range(len(x))], x)
        before = [h.id for h in s.search("c", x[5], top_k=10)]
    meta_path = tmp_path / "collections" / "c" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["spec"]["prefix_quantization"]  # as written by an embedstore without the field
    meta_path.write_text(json.dumps(meta))
    with make_edge(tmp_path) as s:
        assert s.collection_info("c").spec["prefix_quantization"] == "none"
        assert [h.id for h in s.search("c", x[5], top_k=10)] == before
        s.upsert("c", ["new"], x[:1] + 0.01)
        s.optimize("c")
    assert all(c["mrl128"]["quantization_config"] is None for c in _segment_configs(tmp_path, "c"))


def test_collection_spec_refuses_an_unknown_quantization():
    with pytest.raises(InvalidInputError, match="prefix_quantization must be one of"):
        CollectionSpec(prefix_quantization="int4")


def test_server_adapter_asks_for_the_same_quantized_prefix():
    req = QdrantServerStore.create_request(CollectionSpec())
    prefix = req.vectors["mrl128"]
    assert prefix.quantization_config.scalar.type == qm.ScalarType.INT8
    assert prefix.quantization_config.scalar.always_ram is True and prefix.on_disk is True
    plain = QdrantServerStore.create_request(CollectionSpec(prefix_quantization="none")).vectors["mrl128"]
    assert plain.quantization_config is None and plain.on_disk is False


class _FailingEdge(EdgeStore):
    """The real Edge adapter whose third write fails the way an unreachable engine does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes = 0

    def _write_upsert(self, name, request, n_points):
        self.writes += 1
        if self.writes == 3:
            raise StoreUnavailableError("engine went away")
        super()._write_upsert(name, request, n_points)


def test_a_pipelined_upsert_that_fails_midway_reports_what_was_written(tmp_path):
    x, _ = clustered(1000, seed=10)
    with _FailingEdge(tmp_path, write_batch_size=200) as s:
        s.create_collection("c")
        with pytest.raises(StoreUnavailableError, match="400 of 1000 points were written before the failure"):
            s.upsert("c", list(range(1000)), x)
        assert s.writes == 3  # nothing sent after the failed batch
        assert s.count("c") == 400  # the two batches before it, in order
        assert {r.id for r in s.retrieve("c", list(range(400)))} == {str(i) for i in range(400)}
        s.upsert("c", list(range(1000)), x)  # retrying the whole batch is safe
        assert s.count("c") == 1000
