"""The console script: the demo on real data, and the store commands."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from embedder.cli import app
from embedder.demo import run_demo
from retrieval import EdgeStore, StoreSettings

runner = CliRunner()


def test_demo_end_to_end_on_real_emoji(tmp_path, monkeypatch, emoji_items, emoji_features, image_encoder, text_encoder):
    from embedder.config import EmbedderSettings
    from embedder.features import FeatureCache
    from embedder.model import Embedder
    from labeling.config import LabelingConfig, XGBoostParams

    monkeypatch.setenv("EMBEDSTORE_PROJECTION", str(tmp_path / "projection"))
    cache = FeatureCache(tmp_path / "features")  # seeded with this session's features: no second encoding
    signatures = Embedder(image_encoder, text_encoder).encoder_signatures()
    cache.save("emoji", signatures, [it.id for it in emoji_items], emoji_features)
    quick = LabelingConfig(
        truth_field="hidden_label", max_iterations=3, cv_folds=2, xgboost=XGBoostParams(max_rounds=60, eta=0.1)
    )
    run = dict(
        epochs=30,
        feature_cache=cache,
        embedder_settings=EmbedderSettings(),
        labeling_config=quick,
        runs_dir=tmp_path / "runs",
    )
    report = run_demo(StoreSettings(path=tmp_path / "store"), **run)
    assert report.trained_projection and (tmp_path / "projection" / "projection.json").is_file()
    assert report.n_items == 1906 and 190 <= report.n_seed <= 200
    assert report.recall_at_10 >= 0.99
    assert any("flag" in hit.lower() for hit in report.examples["flag of japan"])
    final = report.labeling["final"]
    assert final["counts"]["accepted"] > 100 and final["pseudo_precision"] > 0.85
    assert report.labeling["seed"]["ground_truth"] == report.n_seed
    assert (report.run_dir / "report.json").is_file() and (report.run_dir / "reliability.png").is_file()
    view = report.inspection
    assert view is not None and view.point.state.pseudo_status == "accepted" and len(view.neighbours) == 8
    again = run_demo(
        StoreSettings(path=tmp_path / "store"),
        **{**run, "labeling_config": quick.model_copy(update={"max_iterations": 1})},
    )
    assert not again.trained_projection and again.projection_version == report.projection_version


def test_store_info_and_facet_commands(tmp_path):
    path = tmp_path / "store"
    with EdgeStore(path) as store:
        store.create_collection("items")
        x = np.random.default_rng(1).normal(size=(6, 512))
        store.upsert("items", list("abcdef"), x, [{"label": "cat"}] * 4 + [{"label": "dog"}] * 2)
    result = runner.invoke(app, ["store", "info", "--path", str(path)])
    assert result.exit_code == 0, result.output
    assert '"points": 6' in result.output
    result = runner.invoke(app, ["store", "facet", "label", "--path", str(path), "-c", "items"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"cat": 4, "dog": 2}
    result = runner.invoke(app, ["store", "facet", "label", "--path", str(path), "-c", "items", "--filter", "{bad"])
    assert result.exit_code == 2 and "not JSON" in result.output


def test_store_commands_report_errors_cleanly(tmp_path):
    result = runner.invoke(app, ["store", "facet", "label", "--path", str(tmp_path), "-c", "missing"])
    assert result.exit_code == 2
    assert "collection 'missing' does not exist" in result.output
    with EdgeStore(tmp_path):
        result = runner.invoke(app, ["store", "info", "--path", str(tmp_path)])
    assert result.exit_code == 2 and "in use by" in result.output
