"""The console script: the demo on real data, and the store commands."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from embedder.cli import app
from embedder.datasets import pca_matryoshka
from embedder.demo import run_demo
from retrieval import EdgeStore, StoreSettings

runner = CliRunner()


def test_demo_on_real_mnist_finds_the_same_neighbours_as_exact_search(tmp_path):
    report = run_demo(StoreSettings(path=tmp_path / "store"), n_queries=200)
    assert report.n_indexed == 4800 and report.n_queries == 200
    assert report.recall_at_10 >= 0.99
    # Real structure: a 10-NN vote over raw-pixel PCA vectors recognises most digits,
    # and the 128D prefix alone is nearly as good (it is a usable vector on its own).
    assert report.knn_accuracy_exact > 0.85
    assert report.knn_accuracy_prefix_only > report.knn_accuracy_exact - 0.05
    assert sum(report.facets.values()) == 4800 and set(report.facets) == {str(d) for d in range(10)}


def test_pca_prefix_is_ordered_by_variance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 40)) * np.linspace(5, 0.1, 40)
    z = pca_matryoshka(x, 64)
    assert z.shape == (300, 64) and np.all(z[:, 40:] == 0)
    var = z[:, :40].var(axis=0)
    assert np.all(np.diff(var) <= 1e-6)


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
