"""The benchmark scripts keep running and keep their result format (no timing is asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    """``benchmarks/<name>.py`` imported as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROW_KEYS = {"method", "recall_at_10", "p50_ms", "p99_ms", "qps", "build_s", "rss_mb"}


def test_search_benchmark_writes_the_documented_format(tmp_path):
    out = tmp_path / "search.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "search.py"), "--n", "3000", "--queries", "20",
         "--methods", "edge_prefetch,edge_full512_hnsw,edge_full512_hnsw_same_points,numpy_exact", "--out", str(out)],
        check=True, cwd=ROOT, timeout=1800, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["n"] == 3000
    methods = {r["method"]: r for r in result["rows"]}
    assert set(methods) == {
        "edge_prefetch",
        "edge_prefetch_engine",
        "edge_full512_hnsw",
        "edge_full512_hnsw_same_points",
        "numpy_exact",
    }
    for row in methods.values():
        assert set(row) >= ROW_KEYS, row
        assert 0.0 <= row["recall_at_10"] <= 1.0
    assert methods["numpy_exact"]["recall_at_10"] == 1.0  # the ground truth agrees with itself
    assert set(result["targets"]["checks"]) == {
        "recall_at_10 >= 0.99",
        "p50 <= full512 HNSW p50",
        "build_s <= 0.5 x full512 HNSW",
        "ram_mb <= 0.5 x full512 HNSW",
    }
    # the same baseline over the same points (UUID ids, payload): found, and only reported beside the verdict
    assert methods["edge_full512_hnsw_same_points"]["recall_at_10"] >= 0.9
    assert set(result["targets"]["ratios_vs_full512_hnsw_same_points"]) >= {"p50_ms", "build_s", "ram_mb"}


def test_embed_benchmark_rows_have_the_documented_format(
    emoji_items, image_encoder, text_encoder, emoji_features, tmp_path
):
    from embedder.features import FeatureCache
    from embedder.model import Embedder
    from embedder.projection import TrainConfig, fit_projection

    bench = _bench_module("embed")
    embedder = Embedder(image_encoder, text_encoder)
    embedder.projection = fit_projection(
        emoji_features, [it.label for it in emoji_items], TrainConfig(epochs=2),
        encoders=embedder.encoder_signatures(), progress=False,
    )  # fmt: skip
    tp = bench.throughput(embedder, emoji_items[:40], naive_n=3)
    assert [r["path"] for r in tp] == ["image", "text", "mixed", "image_naive_lite0_loop"]
    assert all(r["items_per_s"] > 0 and r["raw_items_per_s"] > 0 for r in tp)
    subset = emoji_items[::5]
    q = bench.quality(embedder, "emoji-subset", subset, seeds=[0], epochs=3, cache=FeatureCache(tmp_path))
    assert {r["dims"] for r in q} == {"128", "256", "512", "raw", "pca128", "untrained128"}
    assert all(0.0 <= r["knn_acc"] <= 1.0 and 0.0 <= r["probe_acc"] <= 1.0 for r in q)
    targets = bench.check_targets(q, tp)
    assert "emoji-subset: knn_acc 128 >= 0.97 x 512" in targets and "image: >= 2 x naive Lite0 loop" in targets


def test_grpc_benchmark_writes_the_documented_format(tmp_path, emoji_items):
    out = tmp_path / "grpc.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "grpc_load.py"), "--n", "2000", "--seconds", "0.5",
         "--embed-items", "64", "--epochs", "2", "--out", str(out)],
        check=True, cwd=ROOT, timeout=1800, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["n"] == 2000
    for row in result["rows"]:
        assert {"rpc", "clients", "qps", "p50_ms", "p99_ms"} <= set(row), row
        assert row["qps"] > 0 and row["p50_ms"] > 0
    search = {(r["rpc"], r["clients"]) for r in result["rows"] if r["rpc"] == "Search"}
    assert search == {("Search", 1), ("Search", 8), ("Search", 32)}
    assert isinstance(result["search_overhead_p50_ms"], float)
    assert result["embed_stream_vs_inprocess"] > 0
    # the compiled client's rows are there exactly when it could be built here, and say why when not
    cpp = {r["rpc"] for r in result["rows"] if "C++" in r["rpc"]}
    if result["cpp_client"] == "built":
        assert cpp == {"Health.Check (C++ client)", "Search (C++ client)"}
        assert isinstance(result["search_overhead_p50_ms_cpp_client"], float)
    else:
        assert result["cpp_client"].startswith("not built:") and not cpp
        assert result["search_overhead_p50_ms_cpp_client"] is None


def test_grpc_benchmark_says_why_the_compiled_client_was_not_built(tmp_path, monkeypatch):
    bench = _bench_module("grpc_load")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, protoc or grpc_cpp_plugin on it
    binary, why = bench.build_cpp_client(tmp_path / "cache")
    assert binary is None
    assert why.startswith("not built:") and "g++" in why and "grpc_cpp_plugin" in why
    assert not (tmp_path / "cache").exists()


def test_labeling_job_benchmark_writes_the_documented_format(tmp_path):
    out = tmp_path / "labeling_job.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "labeling_job.py"), "--n", "3000", "--seed-fraction", "0.9",
         "--classes", "2", "--iterations", "2", "--out", str(out)],
        check=True, cwd=ROOT, timeout=1800, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    # 1,350 labels per class and a 540-row slice: above the 250 per class and 500 in all below which the
    # job runs the cross-validation chains
    assert result["n_points"] == 3000 and result["iterations"] == 2 and result["eval_mode"] == "holdout"
    assert result["models_per_iteration"] == 2
    assert set(result["stage_s"]) >= {"read", "drift", "neighbours", "train", "write", "total"}
    assert set(result["train_breakdown_s"]) == {"features", "fit", "predict", "calibrate", "gate"}
    assert result["met"] is False  # a 2,000-point run says nothing about the 100k target
    assert 0.0 <= result["quality"]["pseudo_precision"] <= 1.0


def test_keys_benchmark_writes_the_documented_format(redis_server, tmp_path):
    out = tmp_path / "keys.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "keys.py"), "--keys", "10,50", "--seconds", "0.2",
         "--redis-url", redis_server.url, "--out", str(out)],
        check=True, cwd=ROOT, timeout=300, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert {(r["keys"], r["method"]) for r in result["rows"]} == {(10, "lua"), (10, "scan"), (50, "lua"), (50, "scan")}
    assert all(set(r) == {"keys", "method", "ops_per_s"} and r["ops_per_s"] > 0 for r in result["rows"])
    assert result["machine"]["cpus"] >= 1 and result["machine"]["packages"]["numpy"]  # what it ran on


def test_self_training_benchmark_writes_the_documented_format(tmp_path):
    out = tmp_path / "self_training.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "self_training.py"), "--quick", "--epochs", "5",
         "--methods", "embedstore_no_neighbourhood,supervised_xgb,label_spreading", "--out", str(out)],
        check=True, cwd=ROOT, timeout=1800, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    keys = {"dataset", "seed_fraction", "method", "seed", "macro_f1", "pseudo_precision", "mean_confidence",
            "coverage", "ece", "iterations", "wall_s"}  # fmt: skip
    assert {r["method"] for r in result["rows"]} == {"embedstore_no_neighbourhood", "supervised_xgb", "label_spreading"}
    for r in result["rows"]:
        assert set(r) >= keys and r["dataset"] == "emoji" and r["seed_fraction"] == 0.05
        assert 0.0 <= r["macro_f1"] <= 1.0
    ours = next(r for r in result["rows"] if r["method"] == "embedstore_no_neighbourhood")
    assert ours["iterations"] >= 1 and 0.0 <= ours["coverage"] <= 1.0
    assert 0.0 <= ours["test_ece"] <= 1.0 and 0.0 <= ours["pool_ece"] <= 1.0
    assert abs(ours["test_gap"]) <= ours["test_ece"] + 1e-4  # |mean gap| never exceeds the binned ECE
    assert (tmp_path / "self_training_f1.png").stat().st_size > 0 and "targets" in result
    # every row names the environment it ran in; the file keeps that environment's CPU and package versions
    env = result["rows"][0]["env"]
    assert {r["env"] for r in result["rows"]} == {env} and set(result["environments"]) == {env}
    assert result["environments"][env] == result["machine"]
    assert result["machine"]["packages"]["xgboost"] and result["machine"]["python"]
    assert len({r["vectors"] for r in result["rows"]}) == 1 and "jitter" not in result["rows"][0]  # one dataset
    # --resume keeps what is there and runs only what is missing (here: nothing)
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "self_training.py"), "--quick", "--epochs", "5", "--resume",
         "--methods", "embedstore_no_neighbourhood,supervised_xgb,label_spreading", "--out", str(out)],
        check=True, cwd=ROOT, timeout=1800, capture_output=True,
    )  # fmt: skip
    assert json.loads(out.read_text())["rows"] == result["rows"]
    # --refresh reruns only the selected rows another commit or another environment produced, each written in
    # place of its old one
    stale = json.loads(out.read_text())
    at = next(i for i, r in enumerate(stale["rows"]) if r["method"] == "supervised_xgb")
    stale["rows"][at].update(commit="0000000", macro_f1=-1.0)
    moved = next(i for i, r in enumerate(stale["rows"]) if r["method"] == "label_spreading")
    stale["rows"][moved].update(env="0000000000", macro_f1=-1.0)  # same commit, another machine
    stale["environments"]["0000000000"] = {"cpu": "elsewhere", "packages": {}}
    out.write_text(json.dumps(stale))
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "self_training.py"), "--quick", "--epochs", "5", "--refresh",
         "--methods", "supervised_xgb,label_spreading", "--out", str(out)],
        check=True, cwd=ROOT, timeout=1800, capture_output=True,
    )  # fmt: skip
    saved = json.loads(out.read_text())
    refreshed = saved["rows"]
    assert [r["method"] for r in refreshed] == [r["method"] for r in result["rows"]]  # same rows, same places
    assert refreshed[at]["commit"] == result["rows"][at]["commit"] != "0000000"
    for i in (at, moved):  # one machine, one environment: the same scores again
        assert refreshed[i]["macro_f1"] == result["rows"][i]["macro_f1"] and refreshed[i]["env"] == env
    assert [r for i, r in enumerate(refreshed) if i not in (at, moved)] == [
        r for i, r in enumerate(result["rows"]) if i not in (at, moved)
    ]
    assert set(saved["environments"]) == {env}  # no row is left from the other one
    table = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "self_training.py"), "--table", "--out", str(out)],
        check=True, cwd=ROOT, timeout=120, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "| label_spreading |" in table and "**emoji**" in table
    commit = result["rows"][0]["commit"]  # which commit produced each cell's rows, by what they depend on
    assert f"| emoji | 5% | - | {commit} (1) | {commit} (2) | {env} (3) |" in table
    assert f"- `{env}`: " in table and f"xgboost {result['machine']['packages']['xgboost']}" in table


def test_labeling_scale_benchmark_measures_each_size_in_its_own_process(tmp_path):
    out = tmp_path / "labeling_scale.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "labeling_scale.py"), "--sizes", "1500:1", "3000:2",
         "--out", str(out)],
        check=True, cwd=ROOT, timeout=1800, capture_output=True,
        env={**os.environ, "EMBEDSTORE_BENCH_CACHE": str(tmp_path)},
    )  # fmt: skip
    result = json.loads(out.read_text())
    runs = {r["n_points"]: r for r in result["runs"]}
    assert set(runs) == {1500, 3000} and [runs[1500]["iterations"], runs[3000]["iterations"]] == [1, 2]
    for r in runs.values():
        assert r["points_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert {"read", "neighbours", "train", "write"} <= set(r["peak_rss_by_stage_mb"])
        assert 0.5 < r["quality"]["pseudo_precision"] <= 1.0
    assert runs[3000]["ten_iteration_wall_s"] > runs[3000]["wall_s"]  # extrapolated from 2 iterations
    ext = result["extrapolation_100m"]
    assert ext["measured_sizes"] == [1500, 3000] and ext["ten_iteration_is_extrapolated"] and ext["assumptions"]
    assert (tmp_path / "labeling-scale-3000-s0" / "built.json").exists()  # the store is cached for reruns


def test_labeling_classes_benchmark_times_every_fit_as_the_class_count_grows(tmp_path):
    out = tmp_path / "labeling_classes.json"
    printed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "labeling_classes.py"), "--classes", "3,6", "--points", "240",
         "--iterations", "2", "--learners", "xgboost,random_forest", "--out", str(out)],
        check=True, cwd=ROOT, timeout=1800, capture_output=True, text=True,
    ).stdout  # fmt: skip
    runs = {(r["learner"], r["classes"]): r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {(lr, c) for lr in ("xgboost", "random_forest") for c in (3, 6)}
    for (learner, c), r in runs.items():
        assert r["iterations"] == 2 and len(r["seconds_per_iteration"]) == 2  # no early stop: comparable runs
        assert len(r["fit_s_per_iteration"]) == 2 and all(s > 0 for s in r["fit_s_per_iteration"])
        assert sum(r["fit_s_per_iteration"]) <= r["wall_s"]
        assert r["ground_truth"] >= 2 * c and 0.0 <= r["pool_macro_f1"] <= 1.0
        assert f"| {learner} | {c} | {r['features']} |" in printed
    # the neighbourhood features are per class: the same number of columns per extra class, on top of the prefix
    f3, f6 = runs["xgboost", 3]["features"], runs["xgboost", 6]["features"]
    per_class = (f6 - f3) // 3
    assert per_class >= 3 and f6 - f3 == 3 * per_class and f3 - 3 * per_class >= 128


def test_self_training_calibration_fields_score_test_and_pool_against_the_hidden_truth():
    import types

    bench = _bench_module("self_training")
    labels = ["a", "b", "a", "b", "a", "b"]
    item_of_id = {f"ds-{i}": i for i in (0, 1, 2, 3, 5)}  # item 4 is in the test split
    # the job's snapshot order differs from item order: rows map back through the external ids
    ids = ["ds-5", "ds-0", "ds-3", "ds-1", "ds-2"]
    outcome = types.SimpleNamespace(
        pool=np.array([0, 2, 4]),  # items 5, 3, 2: truth b, b, a
        probs=np.array([[0.4, 0.6], [0.3, 0.7], [0.1, 0.9]]),  # right, right, wrong
    )
    result = types.SimpleNamespace(outcome=outcome, ids=ids, classes=["a", "b"])
    test_probs = np.array([[0.6, 0.4], [0.7, 0.3]])
    out = bench.calibration_fields(result, test_probs, np.array([0, 0]), item_of_id, labels)
    # test: both right at mean confidence 0.65 -> under-confident by 0.35
    assert out["test_gap"] == pytest.approx(-0.35) and out["test_ece"] == pytest.approx(0.35)
    # pool: accuracy 2/3 at mean confidence 0.733; bins 0.6 (right), 0.7 (right), 0.9 (wrong)
    assert out["pool_gap"] == pytest.approx(round(0.7333333 - 2 / 3, 4))
    assert out["pool_ece"] == pytest.approx(round((0.4 + 0.3 + 0.9) / 3, 4))
    # an item of a class the job never saw (no seed label) counts as wrong, not left out
    labels[5] = "c"
    out = bench.calibration_fields(result, test_probs, np.array([0, 0]), item_of_id, labels)
    assert out["pool_gap"] == pytest.approx(round(0.7333333 - 1 / 3, 4))


def test_self_training_calibration_table_averages_the_rows_that_record_it():
    bench = _bench_module("self_training")
    base = {"dataset": "mnist", "seed_fraction": 0.05, "method": "embedstore", "ece": 0.05}
    rows = [
        {**base, "seed": 0, "test_ece": 0.02, "test_gap": -0.02, "pool_ece": 0.04, "pool_gap": -0.04},
        {**base, "seed": 1, "test_ece": 0.06, "test_gap": 0.01, "pool_ece": None, "pool_gap": None},
        {**base, "seed": 2},  # an older row without the fields: left out
        {**base, "seed": 0, "seed_fraction": 0.1, "test_ece": 0.5, "test_gap": 0.5},  # another fraction
    ]
    table = bench.calibration_table(rows)
    assert table[-1] == "| mnist | embedstore | 2 | 0.050 | 0.040 | -0.005 | 0.040 | -0.040 |"
    assert bench.calibration_table(rows[2:3]) == []


def test_self_training_ablation_table_pairs_each_ablation_with_ours_by_seed():
    bench = _bench_module("self_training")

    def row(method, seed, f1, dataset="mnist", fraction=0.05):
        return {"dataset": dataset, "seed_fraction": fraction, "method": method, "seed": seed, "macro_f1": f1}

    rows = [
        *(row("embedstore", s, f1) for s, f1 in enumerate([0.90, 0.80, 0.70, 0.99])),  # seed 3: ours only
        *(row("embedstore_no_linear", s, f1) for s, f1 in enumerate([0.88, 0.81, 0.66])),
        row("embedstore_no_mixup", 1, 0.80),
        row("embedstore_no_linear", 0, 0.10, fraction=0.10),  # another fraction: not in the 5% table
        row("embedstore_no_linear", 0, 0.10, dataset="emoji"),  # no `embedstore` row to pair with
    ]
    table = "\n".join(bench.ablation_table(rows))
    assert "| removed | emoji | mnist |" in table  # datasets in the benchmark's order
    # (-2 + 1 - 4) / 3 points, not against seed 3's 0.99; t = -1.667 / (s.d. 2.517 / sqrt 3) = -1.15
    assert "| linear | - | -1.7 (1/3, t -1.1) |" in table
    assert "| mixup | - | +0.0 (0/1) |" in table and "| breaker | - | - |" in table
    # after a new projection, rows on other vectors do not pair: ours rerun on "new", one ablation not
    moved = [{**r, "vectors": "new"} if r["method"] in ("embedstore", "embedstore_no_mixup") else r for r in rows]
    table = "\n".join(bench.ablation_table(moved))
    assert "| linear | - | - |" in table and "| mixup | - | +0.0 (0/1) |" in table
    (t,) = [t for t in bench.targets([*moved, row("rf_loop", 0, 0.5), {**row("rf_loop", 1, 0.5), "vectors": "new"}])]
    assert t["vs_best_baseline_paired"]["seeds"] == 1  # seed 1 only: seed 0's rf_loop row ran on the old vectors
    # after a change to the loop, ablations of the older loop do not pair with the new pipeline (rows without the
    # field are version 1), and the table names the dataset that needs a rerun
    fixed = [{**r, "loop": 2} if r["method"] in ("embedstore", "embedstore_no_mixup") else r for r in rows]
    table = "\n".join(bench.ablation_table(fixed))
    assert "| linear | - | - |" in table and "| mixup | - | +0.0 (0/1) |" in table
    assert "ablation rows of mnist ran an older version of the loop" in table  # emoji: no `embedstore` rows
    assert "older version" not in "\n".join(bench.ablation_table(rows))
    # a file without ablation rows at 5% has no ablation table (it printed a header with no columns)
    plain = [r for r in rows if not r["method"].startswith("embedstore_no_") or r["seed_fraction"] != 0.05]
    assert bench.ablation_table(plain) == [] and "Ablations" not in bench.markdown({"rows": plain})


def test_self_training_targets_compare_only_rows_on_ours_vectors():
    """The target columns (vs supervised, best baseline, oracle) averaged rows of other projections in."""
    bench = _bench_module("self_training")

    def row(method, seed, f1, vectors):
        return {
            "dataset": "emoji",
            "seed_fraction": 0.05,
            "method": method,
            "seed": seed,
            "macro_f1": f1,
            "vectors": vectors,
        }

    rows = [
        *(row("embedstore", s, 0.80, "new") for s in range(3)),
        *(row("supervised_xgb", s, 0.70, "old") for s in range(3)),
        *(row("rf_loop", s, 0.75, "old") for s in range(3)),
        *(row("supervised_linear", s, 0.78, "new") for s in range(3)),
    ]
    (t,) = bench.targets(rows)
    assert t["best_baseline"] == "supervised_linear" and t["vs_best_baseline"] == 0.02
    assert t["vs_supervised"] is None  # supervised_xgb only ran on the old vectors
    table = bench.markdown({"rows": rows})
    assert "*Mixed vectors at 5%*: rows on 2 embeddings (new, old)." in table


def test_self_training_targets_pair_ours_with_the_best_baseline_by_seed():
    bench = _bench_module("self_training")

    def row(method, seed, f1, precision=None, confidence=None):
        return {
            "dataset": "mnist",
            "seed_fraction": 0.05,
            "method": method,
            "seed": seed,
            "macro_f1": f1,
            "pseudo_precision": precision,
            "mean_confidence": confidence,
        }

    rows = [
        row("embedstore", 0, 0.90, 0.95, 0.90),
        row("embedstore", 1, 0.80, 0.90, 0.93),  # under its confidence
        row("embedstore", 2, 0.70),  # accepted nothing
        row("embedstore", 3, 0.60, 0.99, 0.98),  # no rf_loop row for seed 3: not paired
        *(row("rf_loop", s, f1) for s, f1 in enumerate([0.88, 0.80, 0.74])),  # best baseline on the mean
        *(row("supervised_xgb", s, 0.5) for s in range(3)),
        row("oracle", 0, 0.95),
    ]
    (t,) = bench.targets(rows)
    assert t["best_baseline"] == "rf_loop"
    # per seed +0.02, 0.00, -0.04: the mean of those three, not of ours' four seeds against rf_loop's three
    assert t["vs_best_baseline_paired"] == {
        "seeds": 3,
        "mean": -0.0067,
        "se": 0.0176,  # s.d. 0.0306 (n - 1 in the denominator) / sqrt(3)
        "ahead": 1,
        "level": 1,
        "behind": 1,
    }
    assert (t["seeds_under_confidence"], t["seeds_accepting"]) == (1, 3)
    # ours 0.75 on the mean: +0.25 over supervised XGBoost, rf_loop 0.807 ahead of it, precision 0.947 against
    # confidence 0.937, oracle 0.95 (-0.20)
    assert t["met"] == {
        "over_supervised_xgb_by_2": True,
        "at_or_above_every_baseline": False,
        "precision_at_least_confidence": True,
        "within_3_of_oracle": False,
    }
    table = bench.markdown({"rows": rows})
    assert "| -0.007 +- 0.018 (1 / 1 / 1) |" in table and "(1 / 3) |" in table
    # judged before rounding: 0.00003 behind rounds to -0.0, which is not "at or above"
    (t,) = bench.targets([row("embedstore", 0, 0.69665), row("rf_loop", 0, 0.69668)])
    assert t["vs_best_baseline"] == 0 and t["met"]["at_or_above_every_baseline"] is False


def test_self_training_vectors_cache_is_keyed_by_features_and_training_config():
    """The cache was keyed by the epochs alone: a new default (modality dropout) read back the old vectors."""
    from embedder.projection import RawFeatures, TrainConfig

    bench = _bench_module("self_training")
    rng = np.random.default_rng(0)
    raw = RawFeatures(
        rng.standard_normal((6, 4)).astype(np.float32),
        rng.standard_normal((6, 3)).astype(np.float32),
        np.ones(6, bool),
        np.ones(6, bool),
    )
    key = bench.vectors_key(raw, TrainConfig(epochs=5))
    assert key == bench.vectors_key(raw, TrainConfig(epochs=5)) and len(key) == 12  # stable across calls
    assert key != bench.vectors_key(raw, TrainConfig(epochs=5, modality_dropout=0.0))
    assert key != bench.vectors_key(raw, TrainConfig(epochs=6))
    moved = RawFeatures(raw.image, raw.text, raw.has_image, np.array([True] * 5 + [False]))
    assert key != bench.vectors_key(moved, TrainConfig(epochs=5))


def test_self_training_jitter_moves_vectors_by_the_given_scale_and_changes_their_digest():
    bench = _bench_module("self_training")
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((200, 512)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    moved = bench.jittered(vecs, 1e-3)
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-6)
    shift = np.linalg.norm(moved - vecs, axis=1)
    assert 0.5e-3 < np.median(shift) < 2e-3  # about the scale asked for, relative to unit norm
    assert np.array_equal(moved, bench.jittered(vecs, 1e-3))  # the same noise every run
    assert bench.digest(moved) != bench.digest(vecs) == bench.digest(vecs.copy())
    assert len(bench.digest(vecs)) == 10


def test_self_training_jitter_refuses_a_negative_scale_and_the_benchmarks_own_file():
    script = str(ROOT / "benchmarks" / "self_training.py")
    negative = subprocess.run(
        [sys.executable, script, "--jitter", "-1", "--out", "/tmp/elsewhere.json"], capture_output=True, text=True
    )
    assert negative.returncode == 2 and "--jitter must be >= 0, got -1.0" in negative.stderr
    default_out = subprocess.run([sys.executable, script, "--jitter", "1e-6"], capture_output=True, text=True)
    assert default_out.returncode == 2 and "give them their own --out" in default_out.stderr


def test_self_training_config_variant_is_applied_and_recorded_on_our_rows_only(tmp_path):
    out = tmp_path / "variant.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "self_training.py"), "--quick", "--epochs", "5",
         "--methods", "embedstore_no_neighbourhood,supervised_xgb", "--config", '{"max_iterations": 1}',
         "--out", str(out)],
        check=True, cwd=ROOT, timeout=1800, capture_output=True,
    )  # fmt: skip
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["embedstore_no_neighbourhood"]["config"] == {"max_iterations": 1}
    assert rows["embedstore_no_neighbourhood"]["iterations"] == 1  # the variant ran, with the ablation's own setting
    assert "config" not in rows["supervised_xgb"]
    assert (tmp_path / "variant_f1.png").is_file() and not (tmp_path / "self_training_f1.png").exists()


@pytest.mark.parametrize(
    ("config", "own_out", "message"),
    [
        ('{"cv_repeats": 2}', False, "give its rows their own --out"),
        ("[2]", True, "argument --config: must be a JSON object"),
        ("{cv_repeats: 2}", True, "argument --config: not JSON"),
        ('{"seed": 3}', True, "['seed'] are set by the benchmark"),
        ('{"cv_repeats": 0}', True, "cv_repeats"),
        ('{"no_such_field": 1}', True, "no_such_field"),
    ],
)
def test_self_training_config_refuses_a_bad_variant_before_running(config, own_out, message, tmp_path):
    out = tmp_path / "variant.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "self_training.py"), "--config", config]
    done = subprocess.run(
        [*cmd, *(["--out", str(out)] if own_out else [])], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not out.exists()


def _result_file(rows, *, env="e1", args=None):
    return {"environments": {env: {"cpus": 2}}, "args": args or {}, "rows": rows, "traces": []}


def _st_row(method, seed, f1, *, dataset="emoji", fraction=0.05, vectors="v1", **extra):
    return {
        "dataset": dataset,
        "seed_fraction": fraction,
        "method": method,
        "seed": seed,
        "vectors": vectors,
        "macro_f1": f1,
        **extra,
    }


def test_merge_results_keeps_one_copy_of_a_row_and_recomputes_summary_and_targets():
    merge = _bench_module("merge_results")
    a = _result_file(
        [_st_row("embedstore", s, 0.80 + s / 100, commit="aaa", config={"final_refit": 0.5}) for s in range(3)],
        args={"run": "a"},
    )
    a["traces"] = [{"dataset": "emoji", "seed_fraction": 0.05, "method": "embedstore", "seed": 0, "f1": [0.7]}]
    # the same three measurements run again at another commit without --config, plus a baseline and another dataset
    b = _result_file(
        [
            *(_st_row("embedstore", s, 0.80 + s / 100, commit="bbb", wall_s=9.0) for s in range(3)),
            *(_st_row("supervised_xgb", s, 0.70) for s in range(3)),
            _st_row("embedstore", 0, 0.5, dataset="mnist"),
        ],
        env="e2",
        args={"run": "b"},
    )
    out = merge.merge([("a.json", a), ("b.json", b)], datasets={"emoji"}, note="two runs")
    assert len(out["rows"]) == 6 and {r["dataset"] for r in out["rows"]} == {"emoji"}
    ours = [r for r in out["rows"] if r["method"] == "embedstore"]
    assert {r["commit"] for r in ours} == {"aaa"}  # the first source's copy
    assert len(out["traces"]) == 1 and set(out["environments"]) == {"e1", "e2"}
    assert [m["rows"] for m in out["merged_from"]] == [3, 3] and out["note"] == "two runs"
    (t,) = out["targets"]
    assert t["embedstore"] == 0.81 and t["vs_supervised"] == 0.11 and t["met"]["over_supervised_xgb_by_2"]
    assert {(s["method"], s["runs"]) for s in out["summary"]} == {("embedstore", 3), ("supervised_xgb", 3)}


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (_st_row("embedstore", 0, 0.81), r"a\.json and b\.json disagree on 'macro_f1' \(0\.8 vs 0\.81\)"),
        (_st_row("embedstore", 0, 0.80, vectors="v2"), "disagree on 'vectors'"),
        (_st_row("embedstore", 0, 0.80, iterations=4), "disagree on 'iterations'"),
    ],
)
def test_merge_results_refuses_two_measurements_under_one_key(second, message):
    merge = _bench_module("merge_results")
    a = _result_file([_st_row("embedstore", 0, 0.80)])
    with pytest.raises(merge.MergeError, match=message):
        merge.merge([("a.json", a), ("b.json", _result_file([second]))])


def test_merge_results_refuses_mixed_vectors_unless_told_and_a_file_of_another_format():
    merge = _bench_module("merge_results")
    a = _result_file([_st_row("embedstore", 0, 0.80), _st_row("rf_loop", 0, 0.79, vectors="v2")])
    with pytest.raises(merge.MergeError, match=r"more than one set of vectors: \{'emoji': \['v1', 'v2'\]\}"):
        merge.merge([("a.json", a)])
    assert len(merge.merge([("a.json", a)], allow_mixed_vectors=True)["rows"]) == 2
    with pytest.raises(merge.MergeError, match=r"search\.json: not a self_training result file"):
        merge.merge([("search.json", {"n": 10, "rows": None})])
    with pytest.raises(merge.MergeError, match="no row of the sources matches"):
        merge.merge([("a.json", a)], methods={"oracle"})


def test_merge_results_cli_writes_the_file_whole_or_leaves_the_old_one(tmp_path):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "merged.json"
    a.write_text(json.dumps(_result_file([_st_row("embedstore", s, 0.8) for s in range(2)])))
    b.write_text(json.dumps(_result_file([_st_row("embedstore", 0, 0.9)])))
    out.write_text("old")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "merge_results.py"), "--out", str(out)]
    bad = subprocess.run([*cmd, str(a), str(b)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode != 0 and "disagree on 'macro_f1'" in bad.stderr
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    ok = subprocess.run([*cmd, "--fractions", "0.05", str(a)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(out.read_text())["rows"]) == 2 and "emoji 5%: 2 rows" in ok.stdout
