"""The store contract, run unchanged against every adapter (see conftest.STORE_KINDS)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval import (
    EXTERNAL_ID_KEY,
    CollectionExistsError,
    CollectionNotFoundError,
    DimensionError,
    DuplicateIdError,
    EmptyBatchError,
    Filter,
    HasId,
    InvalidCollectionNameError,
    InvalidFilterError,
    InvalidInputError,
    InvalidPayloadError,
    InvalidVectorError,
    IsEmpty,
    Match,
    MatchAny,
    PointNotFoundError,
    Range,
    StoreError,
    StoreUnavailableError,
    VectorStore,
    point_id,
)
from retrieval.synthetic import clustered_vectors
from tests.conftest import clustered, exact_topk


def ids_of(n: int, prefix: str = "item") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def load(store: VectorStore, collection: str, n: int = 200, seed: int = 0) -> tuple[list[str], np.ndarray]:
    x, labels = clustered(n, seed=seed)
    ids = ids_of(n)
    payloads = [
        {
            "label": f"c{labels[i] % 4}",
            "split": "train" if i % 5 else "test",
            "n": i,
            "tags": ["even"] if i % 2 == 0 else [],
        }
        for i in range(n)
    ]
    assert store.upsert(collection, ids, x, payloads) == n
    return ids, x


# ------------------------------------------------------------------ round trips
def test_round_trip_keeps_ids_payload_and_normalised_vectors(store, collection):
    ids, x = load(store, collection, 50)
    recs = store.retrieve(collection, [ids[7], ids[3]], with_vectors=True)
    assert [r.id for r in recs] == [ids[7], ids[3]]  # order asked
    assert recs[0].point_id == point_id(ids[7])
    assert recs[0].payload["n"] == 7 and recs[0].payload[EXTERNAL_ID_KEY] == ids[7]
    expected = x[7] / np.linalg.norm(x[7])
    np.testing.assert_allclose(recs[0].vector, expected, atol=1e-6)
    assert recs[0].vector.shape == (512,)


def test_prefix_vector_is_renormalised_first_128_dims(store, collection):
    ids, x = load(store, collection, 10)
    rec = store.retrieve(collection, [ids[2]], with_vectors="mrl128")[0]
    assert rec.vector.shape == (128,)
    np.testing.assert_allclose(rec.vector, x[2, :128] / np.linalg.norm(x[2, :128]), atol=1e-6)


def test_upsert_is_idempotent_and_replaces_payload(store, collection):
    ids, x = load(store, collection, 30)
    store.upsert(collection, ids[:10], x[:10], [{"label": "new"}] * 10)
    assert store.count(collection) == 30
    rec = store.retrieve(collection, [ids[0]])[0]
    assert rec.payload["label"] == "new" and "n" not in rec.payload


def test_int_and_str_external_ids_are_the_same_item(store, collection):
    x, _ = clustered(2)
    store.upsert(collection, [7], x[:1])
    store.upsert(collection, ["7"], x[1:2], [{"label": "again"}])
    assert store.count(collection) == 1
    assert store.retrieve(collection, [7])[0].payload["label"] == "again"


# --------------------------------------------------------------------- search
def test_shortlist_rerank_matches_exact_top10_on_clustered_data(store, collection):
    n = 3000
    x, _ = clustered(n, n_clusters=30, seed=1)
    store.upsert(collection, ids_of(n), x)
    store.optimize(collection)
    if store.backend == "edge":
        assert store.collection_info(collection).indexed_vectors_count > 0, "HNSW was not built"
    q, _ = clustered_vectors(40, n_clusters=30, seed=99, centres_seed=1)  # same centres, fresh points
    truth = exact_topk(x, q, 10)
    recalls = []
    for i, hits in enumerate(store.search_batch(collection, q, top_k=10)):
        got = {h.id for h in hits}
        recalls.append(len(got & {f"item-{j}" for j in truth[i]}) / 10)
    assert np.mean(recalls) >= 0.99, recalls
    exact = store.search(collection, q[0], top_k=10, exact=True)
    assert [h.id for h in exact] == [f"item-{j}" for j in truth[0]]


def test_search_scores_are_cosine_and_sorted(store, collection):
    ids, x = load(store, collection, 100)
    hits = store.search(collection, x[5] * 3.0, top_k=5)
    assert hits[0].id == ids[5]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    by_id = {ids[i]: float(unit[i] @ unit[5]) for i in range(100)}
    for h in hits:
        assert h.score == pytest.approx(by_id[h.id], abs=1e-4)


def test_equal_scores_come_in_point_id_order_on_both_paths_and_the_threshold_is_exclusive(store, collection):
    """The engines ordered ties their own way: Edge's exact and rerank paths and the server adapter all differed."""
    x, _ = clustered(40, seed=3)
    same = np.tile(x[0], (5, 1))  # five copies of one vector: equal scores
    ids = [f"tie-{i}" for i in range(5)]
    store.upsert(collection, ids + ids_of(40)[1:], np.vstack([same, x[1:]]))
    want = sorted(ids, key=point_id)
    for exact in (False, True):
        hits = store.search(collection, x[0], top_k=5, exact=exact)
        assert len({h.score for h in hits}) == 1, [h.score for h in hits]  # ties indeed
        assert [h.id for h in hits] == want, exact
        assert [h.point_id for h in hits] == sorted(h.point_id for h in hits)
    below = store.search(collection, x[0], top_k=50, exact=True)[5]
    kept = store.search(collection, x[0], top_k=50, exact=True, score_threshold=below.score)
    assert [h.id for h in kept] == want  # a hit at exactly the threshold is left out


def test_search_batch_equals_single_searches(store, collection):
    _, x = load(store, collection, 120)
    batch = store.search_batch(collection, x[:6], top_k=4)
    for i in range(6):
        assert [h.id for h in batch[i]] == [h.id for h in store.search(collection, x[i], top_k=4)]


def test_search_without_payload_still_names_the_item(store, collection):
    ids, x = load(store, collection, 20)
    hit = store.search(collection, x[4], top_k=1, with_payload=False, with_vectors=True)[0]
    assert hit.id == ids[4] and hit.payload is None
    assert hit.vector.shape == (512,)


def test_top_k_above_default_shortlist_widens_shortlist(store, collection):
    load(store, collection, 300)
    x, _ = clustered(1, seed=3)
    assert len(store.search(collection, x[0], top_k=150)) == 150


# -------------------------------------------------------------------- filters
def test_filters_restrict_search_count_and_scroll(store, collection):
    ids, x = load(store, collection, 200)
    hits = store.search(collection, x[0], top_k=20, filter={"label": "c1"})
    assert hits and all(h.payload["label"] == "c1" for h in hits)
    assert store.count(collection, {"split": "test"}) == 40
    assert store.count(collection, {"split": ["test", "train"]}) == 200
    assert store.count(collection, {"n": {"gte": 10, "lt": 20}}) == 10
    assert store.count(collection, Filter(must=[Range("n", lte=4)], must_not=[Match("split", "test")])) == 4
    assert store.count(collection, Filter(should=[Match("n", 1), Match("n", 2)])) == 2
    assert store.count(collection, Filter(must=[MatchAny("label", ["c0", "c1"])])) == store.count(
        collection, {"label": "c0"}
    ) + store.count(collection, {"label": "c1"})
    assert store.count(collection, Filter(must=[IsEmpty("tags")])) == 100
    assert store.count(collection, {"missing_field": None}) == 200
    assert store.count(collection, Filter(must=[HasId([ids[1], ids[2], "nope"])])) == 2
    assert store.count(collection, {"must": {"split": "test"}, "must_not": {"label": "c0"}}) == store.count(
        collection, Filter(must=[Match("split", "test")], must_not=[Match("label", "c0")])
    )
    page = store.scroll(collection, filter={"split": "test"}, limit=100)
    assert len(page.records) == 40 and all(r.payload["split"] == "test" for r in page.records)


def test_bools_and_ints_match_as_themselves(store, collection):
    """On Edge a bool match value was read as an int: {"flag": True} matched the int 1 and never True."""
    x, _ = clustered(4, seed=5)
    store.upsert(collection, ["t", "f", "one", "zero"], x, [{"flag": True}, {"flag": False}, {"flag": 1}, {"flag": 0}])
    found = {
        repr(v): sorted(r.id for r in store.scroll(collection, filter={"flag": v}, limit=10).records)
        for v in (True, False, 1, 0)
    }
    assert found == {"True": ["t"], "False": ["f"], "1": ["one"], "0": ["zero"]}
    assert [h.id for h in store.search(collection, x[2], top_k=4, filter=Filter(must=[Match("flag", True)]))] == ["t"]
    assert store.count(collection, Filter(must_not=[Match("flag", False)])) == 3


def test_filter_keys_are_payload_paths_and_a_quoted_name_reaches_any_key(store, collection):
    """A key Qdrant cannot parse was a bare ValueError on Edge (INTERNAL over gRPC) and matched nothing on the
    other adapter; a payload key with a space (a manifest's "product name" column) could not be filtered on."""
    x, _ = clustered(6, seed=5)
    store.upsert(collection, ids_of(6), x, [{"product name": "mug" if i % 2 else "cup", "n": i} for i in range(6)])
    assert store.count(collection, filter={'"product name"': "mug"}) == 3
    assert {r.id for r in store.scroll(collection, filter={'"product name"': "cup"}).records} == {
        "item-0",
        "item-2",
        "item-4",
    }
    # names in any script are names (a regex of ours refused Hindi and Arabic keys); a non-ASCII digit or an
    # index beyond any integer is not an index
    # (not in qdrant-client's local mode: its Python path parser refuses them, where a Qdrant server's, the same
    # Rust code as Edge's, takes them)
    if not getattr(store, "local", False):
        store.set_payload(collection, {"item-0": {"हिंदी": "x", "عَرَبِي": "y"}})
        assert store.count(collection, filter={"हिंदी": "x"}) == 1 == store.count(collection, filter={"عَرَبِي": "y"})
    for key in (
        "product name",
        "$bogus",
        "x[",
        "x[]y",
        "label.",
        ".label",
        "a..b",
        "a:b",
        "tags[٣]",
        "a[99999999999999999999]",
    ):
        with pytest.raises(InvalidFilterError, match="not a payload path"):
            store.count(collection, filter={key: "a"})
        with pytest.raises(InvalidFilterError, match="not a payload path"):
            store.search(collection, x[0], filter={key: "a"})
    # the same paths everywhere a key is named: indexes and payload deletes (a quoted name reaches the key)
    with pytest.raises(InvalidInputError, match="not a payload path"):
        store.create_payload_index(collection, "product name")
    with pytest.raises(InvalidInputError, match="not payload paths"):
        store.delete_payload_keys(collection, ["item-1"], ["product name"])
    store.create_payload_index(collection, '"product name"')
    assert store.facet(collection, '"product name"') == {"mug": 3, "cup": 3}
    store.delete_payload_keys(collection, ["item-1"], ['"product name"'])
    assert "product name" not in store.retrieve(collection, ["item-1"])[0].payload


def test_exact_search_honours_filter(store, collection):
    _, x = load(store, collection, 150)
    hits = store.search(collection, x[0], top_k=10, exact=True, filter={"split": "test"})
    assert len(hits) == 10 and all(h.payload["split"] == "test" for h in hits)


@pytest.mark.parametrize(
    "bad",
    [
        {"label": 1.5},
        {"n": {"between": 3}},
        {"n": {"gte": float("nan")}},
        {"tags": []},
        {"": "x"},
        {"label": ["a", 1]},
        {"must": "label"},
        "label=c1",
    ],
)
def test_bad_filters_are_refused(store, collection, bad):
    load(store, collection, 5)
    with pytest.raises(InvalidFilterError):
        store.count(collection, bad)


def test_two_natural_filter_mistakes_get_messages_that_say_what_to_do(store, collection):
    """Both read "unknown range bound(s)" before, which sent the user looking at ranges."""
    load(store, collection, 5)
    with pytest.raises(InvalidFilterError, match=r"mixes must/should/must_not with field names \['n'\]"):
        store.count(collection, {"must": {"split": "test"}, "n": 1})
    with pytest.raises(InvalidFilterError, match=r"use a dotted key, e.g. \{'meta.a': 1\}"):
        store.count(collection, {"meta": {"a": 1}})


def test_range_bounds_past_2_53_are_refused_and_up_to_it_compare_exactly(store, collection):
    """Both engines compare ranges as doubles: with 2**60 + 1 and 2**60 + 3 stored, gte 2**60 + 2 counted both."""
    v = _vec(5)
    big, edge = 2**60, 2**53
    payloads = [{"n": big + 1}, {"n": big + 3}, {"n": edge - 1}, {"n": edge}, {"n": edge + 1}]
    store.upsert(collection, list("abcde"), v, payloads)
    for bound in (big + 2, -(big + 2), edge, -edge, 10**400):  # on Edge, gt 2**53 counted 0 of 2**53 + 1
        with pytest.raises(InvalidFilterError, match=r"range bound gte=.* is 2\*\*53 or more.*64-bit floats"):
            store.count(collection, {"n": {"gte": bound}})
    assert store.count(collection, {"n": {"gte": edge - 1}}) == 5  # the largest bound allowed, and exact
    assert store.count(collection, {"n": {"gt": edge - 1}}) == 4
    assert store.count(collection, {"n": {"lte": edge - 1}}) == 1
    assert store.count(collection, {"n": {"gte": float(big)}}) == 2  # a float bound is the caller's own double


# ----------------------------------------------------------------------- scroll
def test_paged_scroll_visits_every_point_once(store, collection):
    ids, _ = load(store, collection, 700)
    seen = []
    offset = None
    pages = 0
    while True:
        page = store.scroll(collection, limit=128, offset=offset, with_payload=False)
        seen.extend(r.id for r in page.records)
        pages += 1
        if page.next_offset is None:
            break
        offset = page.next_offset
    assert pages == 6
    assert sorted(seen) == sorted(ids)
    assert len([r.id for r in store.iter_records(collection, page_size=50, filter={"split": "train"})]) == 560
    # a made-up offset: a bare ValueError on Edge and a silent empty page ("the end") on the server adapter
    with pytest.raises(InvalidInputError, match="offset must be a next_offset"):
        store.scroll(collection, limit=10, offset="page-2")
    # numpy integers, as user code makes them, are ints
    assert len(store.scroll(collection, limit=np.int64(7)).records) == 7
    x0 = store.retrieve(collection, [ids[0]], with_vectors=True)[0].vector
    assert len(store.search(collection, x0, top_k=np.int64(3), shortlist=np.int32(50))) == 3


def test_scroll_partitions_are_disjoint_id_ranges_that_cover_the_collection_in_order(store, collection):
    ids, _ = load(store, collection, 700)
    in_order = [r.point_id for r in store.iter_records(collection, page_size=100, with_payload=False)]
    assert len(in_order) == len(ids) == 700
    parts = [
        [r.point_id for r in store.iter_partition(collection, p, 5, page_size=64, with_payload=False)] for p in range(5)
    ]
    assert [pid for part in parts for pid in part] == in_order  # disjoint, complete, id order kept
    assert all(60 <= len(part) <= 220 for part in parts)  # UUIDv5 ids spread evenly over the id space
    train = [r.id for p in range(3) for r in store.iter_partition(collection, p, 3, filter={"split": "train"})]
    assert len(train) == 560 and len(set(train)) == 560
    one = store.iter_partition(collection, 0, 1, with_vectors="full512")
    assert sum(1 for r in one if r.vector is not None and r.vector.shape == (512,)) == 700
    with pytest.raises(InvalidInputError, match="part must be"):
        list(store.iter_partition(collection, 5, 5))
    with pytest.raises(InvalidInputError, match="parts must be"):
        list(store.iter_partition(collection, 0, 0))


# ------------------------------------------------------------------ set_payload
def test_set_payload_merges_a_different_payload_per_point(store, collection):
    ids, _ = load(store, collection, 40)
    updates = {ids[i]: {"pseudo_label": f"c{i % 3}", "confidence": 0.5 + i / 100} for i in range(30)}
    updates[ids[30]] = {"pseudo_status": "quarantined"}
    assert store.set_payload(collection, updates) == 31
    recs = {r.id: r.payload for r in store.retrieve(collection, ids[:31])}
    for i in range(30):
        assert recs[ids[i]]["pseudo_label"] == f"c{i % 3}"
        assert recs[ids[i]]["confidence"] == pytest.approx(0.5 + i / 100)
        assert recs[ids[i]]["n"] == i  # merged, not replaced
    assert recs[ids[30]]["pseudo_status"] == "quarantined"
    assert store.count(collection, {"pseudo_status": "quarantined"}) == 1


def test_set_payload_with_unknown_id_writes_nothing(store, collection):
    ids, _ = load(store, collection, 10)
    with pytest.raises(PointNotFoundError) as err:
        store.set_payload(collection, [(ids[0], {"pseudo_label": "x"}), ("ghost", {"pseudo_label": "y"})])
    assert "ghost" in str(err.value) and err.value.missing == ["ghost"]
    assert "pseudo_label" not in store.retrieve(collection, [ids[0]])[0].payload
    assert store.set_payload(collection, {ids[0]: {"x": 1}, "ghost": {"x": 2}}, missing_ok=True) == 1


def test_set_payload_refuses_bad_payloads_before_writing(store, collection):
    ids, _ = load(store, collection, 5)
    for bad in ({"pseudo_label": 3}, {"confidence": float("nan")}, {EXTERNAL_ID_KEY: "other"}, {}, "x"):
        with pytest.raises(InvalidPayloadError) as err:
            store.set_payload(collection, [(ids[0], {"ok": 1}), (ids[1], bad)])
        assert "item 1" in str(err.value)
    assert "ok" not in store.retrieve(collection, [ids[0]])[0].payload


def test_delete_payload_keys(store, collection):
    ids, _ = load(store, collection, 5)
    store.set_payload(collection, {ids[0]: {"pseudo_label": "a", "confidence": 0.9}})
    assert store.delete_payload_keys(collection, [ids[0]], ["pseudo_label"]) == 1
    payload = store.retrieve(collection, [ids[0]])[0].payload
    assert "pseudo_label" not in payload and payload["confidence"] == 0.9
    with pytest.raises(InvalidPayloadError):
        store.delete_payload_keys(collection, [ids[0]], [EXTERNAL_ID_KEY])


# ---------------------------------------------------------------- count & facet
def test_count_and_facet(store, collection):
    load(store, collection, 200)
    facets = store.facet(collection, "label")
    assert sum(facets.values()) == 200
    assert list(facets.values()) == sorted(facets.values(), reverse=True)
    assert facets == {v: store.count(collection, {"label": v}) for v in facets}
    test_facets = store.facet(collection, "split", filter={"label": "c0"})
    assert test_facets["test"] + test_facets["train"] == facets["c0"]
    with pytest.raises(InvalidInputError, match="no payload index"):
        store.facet(collection, "colour")
    store.upsert(
        collection, ["p1", "p2", "p3"], clustered(3)[0], [{"colour": "red"}, {"colour": "red"}, {"colour": "blue"}]
    )
    store.create_payload_index(collection, "colour")
    assert store.facet(collection, "colour") == {"red": 2, "blue": 1}
    store.create_payload_index(collection, "size", "float")
    kinds = store.collection_info(collection).payload_index_kinds
    assert kinds["colour"] == "keyword" and kinds["size"] == "float"
    # a value no point holds any more is not listed (Edge listed "blue": 0 after these two writes)
    store.delete_payload_keys(collection, ["p3"], ["colour"])
    store.set_payload(collection, {"p2": {"colour": "green"}})
    assert store.facet(collection, "colour") == {"red": 1, "green": 1}


def test_facets_count_the_index_type_alike_on_every_adapter(store, collection):
    """A keyword index holding "red", 5 and True gave {'red': 1} on Edge and all three on qdrant-client; an
    integer index holding 1 and True merged them into one key (True == 1); a float index failed inside the
    engine on Edge; and `label` could be re-indexed as integer, after which Edge's facet was empty."""
    vecs = clustered(6)[0]
    payloads = [
        {"colour": "red", "n": 1, "flag": True},
        {"colour": 5, "n": True, "flag": 1},
        {"colour": True, "n": True, "flag": False},
        {"colour": "red", "n": 2, "flag": True},
        {"colour": "blue", "n": 1, "flag": "yes"},
        {"n": 1.5},
    ]
    store.upsert(collection, [f"m{i}" for i in range(6)], vecs, payloads)
    for key, kind in (("colour", "keyword"), ("n", "integer"), ("flag", "bool")):
        store.create_payload_index(collection, key, kind)
    assert store.facet(collection, "colour") == {"red": 2, "blue": 1}
    assert store.facet(collection, "n") == {1: 2, 2: 1}  # the two True values are not counted as 1
    facet = store.facet(collection, "flag")
    assert facet == {True: 2, False: 1} and all(isinstance(k, bool) for k in facet)
    store.create_payload_index(collection, "size", "float")
    with pytest.raises(InvalidInputError, match="its index is 'float'"):
        store.facet(collection, "size")
    with pytest.raises(InvalidInputError, match="its index stays 'keyword'"):
        store.create_payload_index(collection, "label", "integer")
    assert store.collection_info(collection).payload_index_kinds["label"] == "keyword"


def test_arguments_are_checked_alike_on_every_adapter(store, collection):
    """Filter values the engine cannot take (a lone surrogate, an int beyond int64) raised bare TypeError /
    UnicodeEncodeError on Edge and matched nothing on qdrant-client; with_vectors=1 passed as True on one and
    as a vector name on the other; with_payload="no" returned payloads; score_threshold="0.5" a numpy error."""
    ids, x = load(store, collection, 20)
    bad_filters = [{"label": "a\ud800"}, {"n": 2**63}, {"label": {"any": ["c0", "b\udfff"]}}, {"k\ud800": "v"}]
    calls = (
        lambda f: store.search(collection, x[0], filter=f),
        lambda f: store.scroll(collection, filter=f),
        lambda f: store.count(collection, f),
        lambda f: store.facet(collection, "label", filter=f),
    )
    for flt in bad_filters:
        for call in calls:
            with pytest.raises(InvalidFilterError):
                call(flt)
    assert store.count(collection, {"n": 2**63 - 1}) == 0  # the largest int64 is fine
    for bad in (1, 0, "yes", None):
        with pytest.raises(InvalidInputError, match="with_vectors must be a bool"):
            store.retrieve(collection, ids[:1], with_vectors=bad)
    (rec,) = store.retrieve(collection, ids[:1], with_vectors=np.True_)
    assert rec.vector is not None and rec.vector.shape == (512,)
    with pytest.raises(InvalidInputError, match="with_payload must be a bool"):
        store.scroll(collection, with_payload="no")
    with pytest.raises(InvalidInputError, match="score_threshold must be a number"):
        store.search(collection, x[0], score_threshold="0.5")
    assert store.search(collection, x[0], score_threshold=np.float32(0.5))[0].id == ids[0]


# ---------------------------------------------------------------------- delete
def test_delete_by_id(store, collection):
    ids, x = load(store, collection, 20)
    assert store.delete(collection, ids[:5]) == 5
    assert store.count(collection) == 15
    assert store.retrieve(collection, ids[:6], missing_ok=True)[0].id == ids[5]
    assert ids[0] not in {h.id for h in store.search(collection, x[0], top_k=5)}
    with pytest.raises(PointNotFoundError):
        store.delete(collection, [ids[0], ids[6]])
    assert store.count(collection) == 15  # nothing deleted by the refused call
    assert store.delete(collection, [ids[0], ids[6]], missing_ok=True) == 1


# ---------------------------------------------------------------- collections
def test_collection_lifecycle(store):
    assert store.create_collection("t_life") is True
    with pytest.raises(CollectionExistsError):
        store.create_collection("t_life")
    assert store.ensure_collection("t_life") is False
    assert "t_life" in store.list_collections()
    info = store.collection_info("t_life")
    assert info.points_count == 0 and {"label", "pseudo_label", "pseudo_status", "split"} <= set(info.payload_indexes)
    assert set(info.payload_index_kinds) == set(info.payload_indexes)
    assert {info.payload_index_kinds[k] for k in ("label", "pseudo_label", "pseudo_status", "split")} == {"keyword"}
    store.drop_collection("t_life")
    assert not store.collection_exists("t_life")
    with pytest.raises(CollectionNotFoundError):
        store.drop_collection("t_life")
    store.drop_collection("t_life", missing_ok=True)


def test_collection_metadata_merges_and_persists(store, collection):
    assert store.collection_metadata(collection) == {}
    assert store.update_collection_metadata(collection, {"embedding_version": "mrl-1", "n": 3}) == {
        "embedding_version": "mrl-1",
        "n": 3,
    }
    store.update_collection_metadata(collection, {"embedding_version": "mrl-2", "n": None})
    assert store.collection_metadata(collection) == {"embedding_version": "mrl-2"}
    with pytest.raises(InvalidInputError):
        store.update_collection_metadata(collection, {})
    with pytest.raises(InvalidPayloadError):
        store.update_collection_metadata(collection, {"x": float("nan")})


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.upsert("t_none", ["a"], np.ones((1, 512))),
        lambda s: s.search("t_none", np.ones(512)),
        lambda s: s.retrieve("t_none", ["a"]),
        lambda s: s.scroll("t_none"),
        lambda s: s.set_payload("t_none", {"a": {"x": 1}}),
        lambda s: s.count("t_none"),
        lambda s: s.facet("t_none", "label"),
        lambda s: s.delete("t_none", ["a"]),
        lambda s: s.collection_info("t_none"),
        lambda s: s.collection_metadata("t_none"),
    ],
)
def test_unknown_collection_is_a_clear_error(store, call):
    with pytest.raises(CollectionNotFoundError, match="t_none"):
        call(store)


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "slash/name", "../up"])
def test_bad_collection_names(store, name):
    with pytest.raises(InvalidCollectionNameError):
        store.create_collection(name)


# ------------------------------------------------------------------ bad input
def _vec(n: int = 3) -> np.ndarray:
    return clustered(n, seed=5)[0]


@pytest.mark.parametrize(
    ("mutate", "error", "needle"),
    [
        (lambda v: v[:, :511], DimensionError, "512"),
        (lambda v: [v[0], v[1][:100], v[2]], DimensionError, "item 1"),
        (lambda v: _set(v, 2, 7, np.nan), InvalidVectorError, "item 2"),
        (lambda v: _set(v, 1, 300, np.inf), InvalidVectorError, "item 1"),
        (lambda v: _zero(v, 2, slice(None)), InvalidVectorError, "all zeros"),
        (lambda v: _zero(v, 0, slice(0, 128)), InvalidVectorError, "first 128 dims"),
        (lambda v: v.astype(np.complex64), InvalidVectorError, "real"),
    ],
)
def test_bad_vectors_are_refused_and_nothing_is_written(store, collection, mutate, error, needle):
    v = mutate(_vec())
    with pytest.raises(error, match=needle):
        store.upsert(collection, ["a", "b", "c"], v)
    assert store.count(collection) == 0


def _set(v: np.ndarray, i: int, j: int, value: float) -> np.ndarray:
    v = v.copy()
    v[i, j] = value
    return v


def _zero(v: np.ndarray, i: int, cols: slice) -> np.ndarray:
    v = v.copy()
    v[i, cols] = 0
    return v


def test_bad_batches_are_refused(store, collection):
    v = _vec()
    with pytest.raises(EmptyBatchError):
        store.upsert(collection, [], np.zeros((0, 512)))
    with pytest.raises(DuplicateIdError, match="item 2"):
        store.upsert(collection, ["a", "b", "a"], v)
    with pytest.raises(InvalidInputError, match="3 ids but 2 vectors"):
        store.upsert(collection, ["a", "b", "c"], v[:2])
    with pytest.raises(InvalidInputError, match="payloads"):
        store.upsert(collection, ["a", "b", "c"], v, [{}])
    with pytest.raises(InvalidPayloadError, match="item 1"):
        store.upsert(collection, ["a", "b", "c"], v, [{}, {"label": 3}, {}])
    with pytest.raises(InvalidPayloadError, match="item 2"):
        store.upsert(collection, ["a", "b", "c"], v, [{}, {}, {"score": float("inf")}])
    with pytest.raises(InvalidPayloadError):
        store.upsert(collection, ["a", "b", "c"], v, [{}, {}, {"blob": object()}])
    with pytest.raises(InvalidPayloadError, match="reserved"):
        store.upsert(collection, ["a", "b", "c"], v, [{}, {}, {EXTERNAL_ID_KEY: "z"}])
    with pytest.raises(InvalidInputError):
        store.upsert(collection, ["a", None, "c"], v)
    # what the engines cannot keep is refused up front, not failed (or altered) mid-write: a lone surrogate
    # (Edge raised a bare TypeError after earlier batches were written), an int past int64 (Edge made it a float)
    with pytest.raises(InvalidPayloadError, match=r"item 2, id 'c'.*payload\['t'\] is not valid Unicode"):
        store.upsert(collection, ["a", "b", "c"], v, [{}, {}, {"t": "bad \ud800"}])
    with pytest.raises(InvalidPayloadError, match=r"item 1.*not a valid string"):
        store.upsert(collection, ["a", "b", "c"], v, [{}, {"meta": {"k\udc80": 1}}, {}])
    with pytest.raises(InvalidPayloadError, match=r"item 0.*outside the 64-bit integers"):
        store.upsert(collection, ["a", "b", "c"], v, [{"n": 2**64 + 1}, {}, {}])
    with pytest.raises(InvalidInputError, match=r"item 1.*external id is not valid Unicode"):
        store.upsert(collection, ["a", "b\ud800", "c"], v)
    assert store.count(collection) == 0
    store.upsert(collection, ["a", "b"], v[:2], [{"n": 2**63 - 1, "m": -(2**63)}, {"t": "emoji \U0001f600 ok"}])
    got = {r.id: r.payload for r in store.retrieve(collection, ["a", "b"])}
    assert (got["a"]["n"], got["a"]["m"], got["b"]["t"]) == (2**63 - 1, -(2**63), "emoji \U0001f600 ok")
    store.delete(collection, ["a", "b"])
    # numpy scalars in payloads are fine: they become plain JSON numbers
    store.upsert(collection, ["a"], v[:1], [{"confidence": np.float32(0.75), "k": np.int64(3)}])
    assert store.retrieve(collection, ["a"])[0].payload["k"] == 3


def test_bad_queries_are_refused(store, collection):
    load(store, collection, 20)
    q = _vec(1)[0]
    with pytest.raises(DimensionError):
        store.search(collection, q[:128])
    with pytest.raises(InvalidVectorError):
        store.search(collection, np.full(512, np.nan))
    with pytest.raises(InvalidVectorError):
        store.search(collection, np.zeros(512))
    with pytest.raises(InvalidInputError, match="top_k"):
        store.search(collection, q, top_k=0)
    with pytest.raises(InvalidInputError, match="shortlist"):
        store.search(collection, q, top_k=10, shortlist=5)
    with pytest.raises(InvalidInputError, match="with_vectors"):
        store.search(collection, q, with_vectors="both")
    with pytest.raises(InvalidInputError, match="search_batch"):
        store.search(collection, np.stack([q, q]))


def test_unknown_ids_are_named(store, collection):
    ids, _ = load(store, collection, 5)
    with pytest.raises(PointNotFoundError, match="'nope'"):
        store.retrieve(collection, [ids[0], "nope"])
    assert [r.id for r in store.retrieve(collection, [ids[0], "nope"], missing_ok=True)] == [ids[0]]


def test_every_store_error_is_a_store_error(store):
    for exc in (CollectionNotFoundError, InvalidVectorError, PointNotFoundError, StoreUnavailableError):
        assert issubclass(exc, StoreError)


def test_closed_store_refuses_calls(store, collection):
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreUnavailableError, match="closed"):
        store.count(collection)


def test_point_ids_are_the_rfc_4122_uuid5_of_the_external_id():
    # the fast path must equal uuid.uuid5 exactly: a different id would orphan every stored point
    import uuid

    from retrieval.schema import POINT_ID_NAMESPACE

    rng = np.random.default_rng(0)
    names = ["0", "7", "item-42", "é", "猫/🐈", "x" * 1024, " lead", "a\nb"]
    names += ["".join(map(chr, rng.integers(32, 0x2FFF, size=int(rng.integers(1, 40))))) for _ in range(500)]
    for name in names:
        assert point_id(name) == str(uuid.uuid5(POINT_ID_NAMESPACE, name))
    assert point_id(7) == point_id("7")


def test_deletes_racing_payload_writes_never_fail_them_half_done(store, collection):
    """A labeling job's write-back (set_payload, missing_ok) died with "No point with id" when a client deleted
    one of its points between the existence check and the write, and left the batch half-written."""
    import threading

    ids, _ = load(store, collection, 600)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            while not done.is_set():
                store.set_payload(collection, {i: {"pseudo_label": "x"} for i in ids}, missing_ok=True)
                store.delete_payload_keys(collection, ids, ["pseudo_label"], missing_ok=True)
        except BaseException as exc:  # the test reports whatever the race raised
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for i in ids[::3]:
            store.delete(collection, [i], missing_ok=True)
    finally:
        done.set()
        thread.join(60)
    assert not errors, errors[0]
    assert store.count(collection) == 400
