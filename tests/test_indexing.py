"""Items into the store with the embedding version enforced; reindex."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedder.errors import EmbeddingVersionMismatchError, InvalidItemError
from embedder.indexing import VERSION_KEY, index_items, reindex, search_items
from embedder.model import Embedder, Item
from embedder.projection import TrainConfig, fit_projection
from tests.conftest import make_edge


@pytest.fixture(scope="module")
def two_embedders(image_encoder, text_encoder, emoji_items, emoji_features):
    labels = [it.label for it in emoji_items]
    sig = Embedder(image_encoder, text_encoder).encoder_signatures()
    a = fit_projection(emoji_features, labels, TrainConfig(epochs=3, seed=1), encoders=sig, progress=False)
    b = fit_projection(emoji_features, labels, TrainConfig(epochs=3, seed=2), encoders=sig, progress=False)
    assert a.version != b.version
    return Embedder(image_encoder, text_encoder, a), Embedder(image_encoder, text_encoder, b)


def test_index_records_the_version_and_search_finds_items(tmp_path, two_embedders, emoji_items):
    emb, _ = two_embedders
    items = emoji_items[:60]
    with make_edge(tmp_path) as store:
        report = index_items(store, "emoji", emb, items)
        assert report.written == 60 and not report.skipped
        assert store.collection_metadata("emoji")[VERSION_KEY] == emb.version
        # what the labeling job reads to warn of optimistic calibration (the fixture's projection used labels)
        from labeling.job import PROJECTION_LABELS_KEY

        n_labeled = emb.projection.training["n_labeled"]
        assert n_labeled > 0 and store.collection_metadata("emoji")[PROJECTION_LABELS_KEY] == n_labeled
        rec = store.retrieve("emoji", [items[0].id])[0]
        assert rec.payload[VERSION_KEY] == emb.version
        assert rec.payload["label"] == items[0].label and rec.payload["label_source"] == "human"
        assert rec.payload["text"] == items[0].text and rec.payload["image_uri"].endswith(".png")
        hits = search_items(store, "emoji", emb, Item("q", image=items[3].image, text=items[3].text), top_k=3)
        assert hits[0].id == items[3].id
        again = index_items(store, "emoji", emb, items[:10])  # idempotent: same ids, same points
        assert again.written == 10 and store.count("emoji") == 60


def test_other_versions_are_refused_until_reindex(tmp_path, two_embedders, emoji_items):
    old, new = two_embedders
    items = emoji_items[:40]
    with make_edge(tmp_path) as store:
        index_items(store, "emoji", old, items)
        with pytest.raises(EmbeddingVersionMismatchError, match="reindex"):
            index_items(store, "emoji", new, items[:2])
        with pytest.raises(EmbeddingVersionMismatchError):
            search_items(store, "emoji", new, "grinning face")
        report = reindex(store, "emoji", new)
        assert report.reembedded == 40 and not report.missing_source
        assert store.collection_metadata("emoji")[VERSION_KEY] == new.version
        assert {r.payload[VERSION_KEY] for r in store.iter_records("emoji")} == {new.version}
        hits = search_items(store, "emoji", new, Item("q", image=items[5].image, text=items[5].text), top_k=1)
        assert hits[0].id == items[5].id
        assert reindex(store, "emoji", new).already_current == 40  # resumable / idempotent


def test_reindex_lists_points_without_a_source(tmp_path, two_embedders, emoji_items):
    old, new = two_embedders
    with make_edge(tmp_path) as store:
        index_items(store, "emoji", old, emoji_items[:5])
        store.delete_payload_keys("emoji", [emoji_items[0].id], ["text", "image_uri"])
        report = reindex(store, "emoji", new)
        assert report.missing_source == [emoji_items[0].id] and report.reembedded == 4
        assert store.collection_metadata("emoji")[VERSION_KEY] == old.version  # not switched


def test_reindex_will_not_re_embed_an_image_it_has_no_source_for(tmp_path, two_embedders, emoji_items):
    """An image given as bytes leaves no image_uri: its text alone would make another kind of vector."""
    old, new = two_embedders
    a, b, c = emoji_items[:3]
    items = [
        Item(a.id, image=Path(a.image).read_bytes(), text=a.text),  # image bytes + text: cannot be redone
        Item(b.id, text=b.text),  # text only: can
        Item(c.id, image=c.image, text=c.text),  # image path + text: can
    ]
    with make_edge(tmp_path) as store:
        index_items(store, "emoji", old, items)
        made_from = {r.id: r.payload["embedded_from"] for r in store.iter_records("emoji")}
        assert made_from == {a.id: "image+text", b.id: "text", c.id: "image+text"}
        store.delete_payload_keys("emoji", [b.id], ["embedded_from"])  # a point stored before the field
        report = reindex(store, "emoji", new)
        assert report.missing_source == [a.id] and report.reembedded == 2
        assert store.collection_metadata("emoji")[VERSION_KEY] == old.version  # not switched
        after = {r.id: r.payload.get("embedded_from") for r in store.iter_records("emoji")}
        assert after == {a.id: "image+text", b.id: "text", c.id: "image+text"}  # reindex records what it used
        store.delete_payload_keys("emoji", [c.id], ["image_uri"])  # a path lost later is caught the same way
        store.set_payload("emoji", {c.id: {VERSION_KEY: old.version}})
        assert sorted(reindex(store, "emoji", new).missing_source) == sorted([a.id, c.id])


def test_indexing_again_keeps_human_answers_and_pseudo_labels(tmp_path, two_embedders, emoji_items):
    """Re-running `index` on the same items replaced whole payloads: answers given through `label import` and
    every run's pseudo-labels were wiped while the run registry still pointed at them."""
    from labeling.review import submit_labels

    emb, _ = two_embedders
    items = emoji_items[:8]
    with make_edge(tmp_path) as store:
        index_items(store, "emoji", emb, items)
        store.set_payload("emoji", {items[1].id: {"pseudo_label": "x", "pseudo_status": "accepted"}})
        submit_labels(store, "emoji", [(items[2].id, "Corrected")], overwrite_human=True)
        report = index_items(store, "emoji", emb, items)
        got = {r.id: r.payload for r in store.iter_records("emoji")}
        assert (got[items[1].id]["pseudo_label"], got[items[1].id]["pseudo_status"]) == ("x", "accepted")
        assert got[items[2].id]["label"] == "Corrected" and got[items[2].id]["labeled_at"]
        assert report.kept_answers == 1
        assert got[items[3].id]["label"] == items[3].label  # untouched points get the item's label as before


def test_a_bad_item_in_a_later_batch_writes_nothing(tmp_path, two_embedders, emoji_items):
    """All or nothing across batches: earlier batches are not written before a later one fails."""
    emb, _ = two_embedders
    good = emoji_items[:10]
    with make_edge(tmp_path) as store:
        index_items(store, "emoji", emb, good[:2])
        before = {r.id: r.payload for r in store.iter_records("emoji")}
        items = [*good, Item("truncated", image=b"\x89PNG\r\n\x1a\n\x00\x00"), *emoji_items[10:13]]
        with pytest.raises(InvalidItemError, match=r"item 10, id 'truncated'"):  # its place in the run
            index_items(store, "emoji", emb, items, batch_size=4)
        assert {r.id: r.payload for r in store.iter_records("emoji")} == before
        # an id given twice, batches apart: refused before anything is embedded, naming both places
        twice = [*good[:6], Item(good[1].id, text="another item with the same id")]
        with pytest.raises(InvalidItemError, match=rf"item 6, id '{good[1].id}': id .* is also item 1's"):
            index_items(store, "emoji", emb, twice, batch_size=4)
        assert store.count("emoji") == 2


def test_bad_items_fail_the_run_or_are_reported(tmp_path, two_embedders, emoji_items):
    emb, _ = two_embedders
    items = [*emoji_items[:3], Item("broken", image=b"not an image"), Item("empty")]
    with make_edge(tmp_path) as store:
        with pytest.raises(InvalidItemError, match=r"id .empty.: item has neither"):
            index_items(store, "emoji", emb, items)
        assert not store.collection_exists("emoji")  # nothing written, not even an empty collection
        report = index_items(store, "emoji", emb, items, skip_bad=True)
        assert report.written == 3
        assert [s[0] for s in report.skipped] == ["broken", "empty"]
        assert "neither" in report.skipped[1][1] and "item 0" not in report.skipped[1][1]  # no per-item index


def test_texts_longer_than_the_model_reads_are_reported(tmp_path, two_embedders, emoji_items):
    """Word pieces past the text model's max_seq_length are cut before the encoder, and nothing said so."""
    emb, _ = two_embedders
    long_text = " ".join(["review"] + ["plot acting music scenery"] * 150)  # ~600 word pieces
    items = [*emoji_items[:3], Item("long", text=long_text)]
    with make_edge(tmp_path) as store:
        report = index_items(store, "emoji", emb, items)
    assert report.written == 4
    assert [i for i, _ in report.truncated] == ["long"] and report.truncated[0][1] > 500
