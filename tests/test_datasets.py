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


# ------------------------------------------------------------------ manifests
def test_manifest_jsonl_keeps_extra_columns_as_payload(tmp_path):
    from embedder.datasets import manifest_items

    (tmp_path / "img").mkdir()
    rows = [
        {"id": 0, "text": "a cat", "label": "cat", "source": "shop", "meta": {"year": 2021}, "truth": "cat"},
        {"id": "b", "image": "img/b.png", "label": "", "truth": "dog", "rating": 4.5},
        {"id": "c", "image": str(tmp_path / "abs.png"), "text": "", "split": "test"},
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    a, b, c = manifest_items(path)
    assert (a.id, a.text, a.image, a.label) == ("0", "a cat", None, "cat")  # id 0 is an id, not a missing one
    assert a.payload == {"source": "shop", "meta": {"year": 2021}, "truth": "cat"}
    assert b.image == tmp_path / "img" / "b.png" and b.label is None and b.text is None
    assert b.payload == {"truth": "dog", "rating": 4.5, "image_uri": str(tmp_path / "img" / "b.png")}
    assert c.image == tmp_path / "abs.png" and c.payload["split"] == "test"


def test_manifest_csv_leaves_empty_cells_out_of_the_payload(tmp_path):
    from embedder.datasets import manifest_items

    path = tmp_path / "items.csv"
    path.write_text("id,text,label,truth,source\nr1,great film,fresh,fresh,\nr2,dull,,rotten,web\n")
    r1, r2 = manifest_items(path)
    assert r1.label == "fresh" and r1.payload == {"truth": "fresh"}
    assert r2.label is None and r2.payload == {"truth": "rotten", "source": "web"}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "a.jsonl",
            '{"id": "x", "text": "t", "pseudo_label": "cat"}\n',
            r"a.jsonl:1 \(id 'x'\): sets \['pseudo_label'\]",
        ),
        ("a.jsonl", '{"id": "x", "text": "t", "embedding_version": "v"}\n', "embedding_version"),
        ("a.csv", "id,text,external_id\nx,t,y\n", r"sets \['external_id'\]"),
        ("a.csv", "id,text\nx,t,extra\n", r"a.csv:2 \(id 'x'\): more cells than the header"),
        ("a.csv", "id,text\n,t\n", "a.csv:2: no id"),
        ("a.csv", "id,text\nx,t\ny,u\nx,v\n", "a.csv:4: id 'x' is also on line 2; ids must be unique"),
        ("a.jsonl", '{"id": "x", "text": "t"}\n{"id": "x", "text": "u"}\n', "a.jsonl:2: id 'x' is also on line 1"),
        ("a.jsonl", '{"id": true, "text": "t"}\n', "a.jsonl:1: id must be a string or an integer, got True"),
        ("a.jsonl", '{"id": {"a": 1}, "text": "t"}\n', "id must be a string or an integer"),
        ("a.jsonl", '{"id": "x", "text": 0}\n', r"a.jsonl:1 \(id 'x'\): text must be a string, got 0"),
        ("a.jsonl", '{"id": "x", "image": 5}\n', "image must be a string, got 5"),
        ("a.jsonl", '{"id": "x", "text": "t", "label": {"k": "v"}}\n', "label must be a string or an integer"),
        ("a.jsonl", '{"id": "x", "image": "https://e.org/a.png"}\n', "is a URL; a manifest's images are files"),
        ("a.jsonl", '{"id": "x"}\n[1, 2]\n', "a.jsonl:2: each line must be a JSON object"),
        ("a.jsonl", '{"id": "x"\n', "a.jsonl:1: not JSON"),
        ("a.txt", "id\nx\n", "must be .jsonl or .csv"),
    ],
)
def test_manifest_errors_name_the_row_and_what_is_wrong(tmp_path, name, content, message):
    from embedder.datasets import manifest_items

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetUnavailableError, match=message):
        manifest_items(path)


def test_manifest_encodings_and_line_ends(tmp_path, monkeypatch):
    from embedder.datasets import manifest_items

    # Excel's "CSV UTF-8" starts with a byte-order mark; CRLF line ends and a quoted multi-line cell
    path = tmp_path / "bom.csv"
    path.write_bytes('\ufeffid,text,label\r\nr1,"two\r\nlines",fresh\r\nr2,caf\u00e9,rotten\r\n'.encode())
    r1, r2 = manifest_items(path)
    assert (r1.id, r1.text, r1.label) == ("r1", "two\r\nlines", "fresh") and (r2.id, r2.text) == ("r2", "caf\u00e9")
    # JSON written with ensure_ascii=False keeps U+2028 / U+0085 inside its strings: not line breaks
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "one\u2028two\x85three"}, ensure_ascii=False) + "\r\n")
    (a,) = manifest_items(path)
    assert a.text == "one\u2028two\x85three"
    # not UTF-8: the line and the byte, not a traceback
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(DatasetUnavailableError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9"):
        manifest_items(path)
    # image_uri is absolute even when the manifest was named relative to the working folder
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "r.jsonl").write_text('{"id": "a", "image": "pics/a.png"}\n')
    monkeypatch.chdir(tmp_path)
    (a,) = manifest_items("m/r.jsonl")
    assert a.payload["image_uri"] == str(tmp_path / "m" / "pics" / "a.png") and a.image.is_absolute()


def test_a_missing_manifest_is_named(tmp_path):
    from embedder.datasets import manifest_items

    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        manifest_items(tmp_path / "nope.jsonl")


def test_the_cli_names_every_bundled_dataset():
    from embedder.cli import DATASET_HELP
    from embedder.datasets import DATASETS

    assert all(name in DATASET_HELP for name in DATASETS)
