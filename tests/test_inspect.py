"""labeling.inspect on real stores: label state, effective labels, neighbourhood agreement."""

from __future__ import annotations

import numpy as np
import pytest

from labeling.inspect import InspectedPoint, LabelState, Neighbour, agreement, inspect_neighbours
from retrieval import PointNotFoundError
from retrieval.errors import InvalidInputError


def _n(label=None, pseudo=None, status=None, sim=1.0):
    state = LabelState(label=label, pseudo_label=pseudo, pseudo_status=status)
    return Neighbour(InspectedPoint("x", state, {}), sim)


def test_effective_label_prefers_ground_truth_then_accepted_pseudo_labels():
    assert LabelState(label="a", pseudo_label="b", pseudo_status="accepted").effective_label == "a"
    assert LabelState(pseudo_label="b", pseudo_status="accepted").effective_label == "b"
    assert LabelState(pseudo_label="b", pseudo_status="quarantined").effective_label is None
    assert LabelState(pseudo_label="b", pseudo_status="quarantined").judged_label == "b"
    assert LabelState.from_payload({"pseudo_confidence": True}).pseudo_confidence is None
    assert LabelState.from_payload({"label": "", "pseudo_confidence": 0.8}).label is None


def test_agreement_weights_by_similarity_and_ignores_unlabelled():
    ns = [_n("a", sim=0.9), _n("b", sim=0.3), _n(None, "a", "quarantined", 0.99), _n(None, "a", "accepted", 0.6)]
    a = agreement("a", ns)
    assert a.labelled_neighbours == 3
    assert a.weighted == pytest.approx(1.5 / 1.8) and a.unweighted == pytest.approx(2 / 3)
    assert a.majority_label == "a" and a.majority_share == pytest.approx(1.5 / 1.8)
    none = agreement("a", [_n(None)])
    assert none.labelled_neighbours == 0 and none.weighted == 0.0 and none.majority_label is None
    assert agreement(None, ns).weighted == 0.0


def test_inspect_neighbours_on_the_store(store, collection):
    rng = np.random.default_rng(3)
    centre = rng.normal(size=512)
    vecs = np.vstack([centre + 0.01 * rng.normal(size=(6, 512)), rng.normal(size=(20, 512))])
    ids = [f"p{i}" for i in range(26)]
    payloads = (
        [{"label": "cat", "label_source": "human"}] * 3
        + [
            {"pseudo_label": "cat", "pseudo_status": "accepted", "pseudo_confidence": 0.9},
            {"pseudo_label": "dog", "pseudo_status": "review", "pseudo_confidence": 0.6},
            {"label": "dog"},
        ]
        + [None] * 20
    )
    store.upsert(collection, ids, vecs, payloads)
    view = inspect_neighbours(store, collection, "p4", k=5)
    assert view.point.state.pseudo_label == "dog" and view.point.state.effective_label is None
    assert {n.point.id for n in view.neighbours} == {"p0", "p1", "p2", "p3", "p5"}
    assert "external_id" not in view.point.payload
    assert view.agreement.label == "dog" and view.agreement.labelled_neighbours == 5
    assert view.agreement.unweighted == pytest.approx(0.2) and view.agreement.majority_label == "cat"
    with pytest.raises(PointNotFoundError):
        inspect_neighbours(store, collection, "nope")
    with pytest.raises(InvalidInputError, match="k must be"):
        inspect_neighbours(store, collection, "p0", k=0)
