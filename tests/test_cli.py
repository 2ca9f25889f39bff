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

    monkeypatch.setenv("EMBEDSTORE_PROJECTION", str(tmp_path / "projection"))
    cache = FeatureCache(tmp_path / "features")  # seeded with this session's features: no second encoding
    signatures = Embedder(image_encoder, text_encoder).encoder_signatures()
    cache.save("emoji", signatures, [it.id for it in emoji_items], emoji_features)
    run = dict(epochs=30, feature_cache=cache, embedder_settings=EmbedderSettings())
    report = run_demo(StoreSettings(path=tmp_path / "store"), **run)
    assert report.trained_projection and (tmp_path / "projection" / "projection.json").is_file()
    assert report.n_indexed + report.n_queries == 1906
    assert report.recall_at_10 >= 0.99
    # real structure: a 10-NN vote over the projected vectors recognises most categories,
    # and the 128D prefix alone is nearly as good (it is a usable vector on its own)
    assert report.knn_accuracy_exact > 0.75
    assert report.knn_accuracy_prefix_only > report.knn_accuracy_exact - 0.05
    assert sum(report.facets.values()) == report.n_indexed and len(report.facets) == 9
    assert any("flag" in hit.lower() for hit in report.examples["flag of japan"])
    again = run_demo(StoreSettings(path=tmp_path / "store"), **run)  # reuses the saved projection
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
