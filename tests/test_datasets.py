"""The offline dataset readers, on package layouts written here (no registry download in the tests)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedder.datasets import FASHION_CLASSES, DatasetUnavailableError, by_subcategory, fashion_mnist_from_package
from embedder.model import Item


def _package(root, per_class: int, *, short_label: int | None = None):
    clothes = root / "src" / "clothes"
    clothes.mkdir(parents=True)
    for label in range(len(FASHION_CLASSES)):
        n = per_class - 1 if label == short_label else per_class
        # pixel value = label, so a mixed-up file order would show in the labels
        rows = [[label] * 784 for _ in range(n)]
        rows.insert(1, [])  # the real package has empty rows: skipped
        (clothes / f"{label}.json").write_text(json.dumps({"data": rows}))
    return root


def test_fashion_mnist_reader_keeps_the_first_images_of_each_class_with_their_label(tmp_path):
    x, y = fashion_mnist_from_package(_package(tmp_path, 4), per_class=3)
    assert x.shape == (30, 784) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [3] * 10
    assert (x[:, 0] == y).all()  # each image came from its own class file


def test_fashion_mnist_reader_names_the_file_that_is_short_or_missing(tmp_path):
    with pytest.raises(DatasetUnavailableError, match=r"7\.json has 2 28x28 images, fewer than 3"):
        fashion_mnist_from_package(_package(tmp_path / "a", 3, short_label=7), per_class=3)
    with pytest.raises(DatasetUnavailableError, match=r"0\.json is missing"):
        fashion_mnist_from_package(tmp_path / "empty", per_class=3)


def test_emoji_by_subcategory_relabels_and_drops_the_small_subcategories():
    items = [Item(id=f"e{i}", text="x", label="Animals", payload={"subcategory": "animal-mammal"}) for i in range(3)]
    items += [Item(id="f0", text="y", label="Animals", payload={"subcategory": "animal-bird"})]
    items += [Item(id="g0", text="z", label="Flags", payload={})]  # no subcategory: left out
    got = by_subcategory(items, min_items=2)
    assert [(it.id, it.label) for it in got] == [(f"e{i}", "animal-mammal") for i in range(3)]
    assert items[0].label == "Animals"  # the input items are not changed
    with pytest.raises(ValueError, match="min_items must be >= 2"):
        by_subcategory(items, min_items=1)
