"""The two adapters side by side: one random sequence of writes and reads, applied to a Qdrant Edge store and to
qdrant-client's engine, must give the same answers (or the same error class) at every step.

The contract suite checks behaviours one at a time, each on a case someone thought of. This test looks for the
cases nobody wrote down: payload values of every JSON type (unicode, negative and large ints, floats that are
whole numbers, nested objects, lists, nulls), merges and key deletions on nested paths, filters on all of them,
ids that exist and ids that do not. An answer is compared by its JSON text, so an int that comes back as a float
on one side is a difference. Vectors are random (no ties), so exact search, the default two-stage search and
scroll have one right answer each. A failure prints the step and the operation that diverged.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from retrieval import (
    Filter,
    HasId,
    IsEmpty,
    Match,
    MatchAny,
    QdrantServerStore,
    Range,
    StoreError,
    VectorStore,
)
from tests.conftest import make_edge

IDS = [f"p{i}" for i in range(24)] + ["ünï-ç😀de", "42"]
LABELS = ["cat", "dog", "émoji 😀", "日本", "Cat"]
KEYS = ["label", "n", "score", "flag", "tags", "meta", "meta.k", "note", "split"]


def _value(rng: np.random.Generator, key: str) -> Any:
    """A payload value for ``key``: mostly of the field's usual type, sometimes of another or null."""
    r = rng.random()
    if r < 0.08:
        return None
    if key == "label" or (r < 0.15 and key != "meta"):
        return LABELS[rng.integers(len(LABELS))]
    if key == "n":
        return int(rng.choice([-3, 0, 1, 2, 7, 2**40, -(2**40)]))
    if key == "score":
        return float(rng.choice([0.5, -1.25, 2.0, 1e-9, 3.0e12]))
    if key == "flag":
        return bool(rng.integers(2))
    if key == "tags":
        pool = ["a", "b", "ç", 1, 2]
        return [pool[i] for i in rng.choice(len(pool), size=rng.integers(0, 4), replace=False)]
    if key == "meta":
        return {"k": LABELS[rng.integers(len(LABELS))], "depth": {"x": int(rng.integers(3))}}
    if key == "split":
        return str(rng.choice(["train", "test"]))
    odd = ["", {}, [], [{"k": "cat"}, {"k": 2}], 2**63 - 1, -(2**63), 0.0, -0.0, "x" * 300, [[1, 2], ["a"]]]
    return odd[rng.integers(len(odd))] if r > 0.85 else "free text ∑ " + str(rng.integers(100))


def _payload(rng: np.random.Generator) -> dict[str, Any]:
    keys = [k for k in KEYS if "." not in k]
    chosen = rng.choice(len(keys), size=rng.integers(0, len(keys) + 1), replace=False)
    body = {keys[i]: _value(rng, keys[i]) for i in chosen}
    if rng.random() < 0.1:  # field names a path would read differently
        body[str(rng.choice(["a b", "naïve", "x-y", "meta.k", "tags[0]", "0"]))] = _value(rng, "note")
    return body


def _filter(rng: np.random.Generator) -> Filter | dict[str, Any]:
    def cond() -> Any:
        kind = rng.integers(13)
        if kind == 0:
            return Match("label", LABELS[rng.integers(len(LABELS))])
        if kind == 1:
            return Match("n", int(rng.choice([0, 1, 2, 7, 2**40])))
        if kind == 2:
            return Match("flag", bool(rng.integers(2)))
        if kind == 3:
            return MatchAny("label", [LABELS[i] for i in rng.choice(len(LABELS), size=2, replace=False)])
        if kind == 4:
            return Range("n", gte=int(rng.integers(-3, 3)), lt=float(rng.choice([2.5, 8, 1e13])))
        if kind == 5:
            return Range("score", gt=float(rng.choice([-2.0, 0.0, 1.0])))
        if kind == 6:
            return IsEmpty(str(rng.choice(["tags", "label", "meta", "note"])))
        if kind == 7:
            return HasId([IDS[i] for i in rng.choice(len(IDS), size=4, replace=False)] + ["never-stored"])
        if kind == 8:
            return Match(
                str(rng.choice(["meta.k", "tags", "n", "note"])), str(rng.choice(["a", "ç", "cat", "日本", ""]))
            )
        if kind == 9:
            return Match(str(rng.choice(["meta.depth.x", "tags", "note"])), int(rng.choice([0, 1, 2, 2**63 - 1])))
        if kind == 10:
            return MatchAny(str(rng.choice(["tags", "n"])), [1, 2, -3])
        if kind == 11:
            return Range(str(rng.choice(["label", "meta.depth.x", "tags", "note"])), lte=float(rng.choice([0, 1.5])))
        return IsEmpty(str(rng.choice(["meta.k", "tags[]", "meta.depth", '"a b"', '"meta.k"'])))

    if rng.random() < 0.2:  # the dict form, as the CLI and gRPC callers write it
        return {"split": str(rng.choice(["train", "test"])), "n": {"gte": 0}}
    parts: dict[str, list[Any]] = {"must": [], "should": [], "must_not": []}
    for _ in range(rng.integers(1, 4)):
        parts[str(rng.choice(list(parts)))].append(cond())
    if rng.random() < 0.2:
        parts["must"].append(Filter(should=[cond(), cond()]))
    return Filter(**parts)


def _canon(value: Any) -> Any:
    """An answer in a form two adapters can be compared by: JSON text for payloads, rounded scores."""
    if isinstance(value, list):
        return [_canon(v) for v in value]
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    if hasattr(value, "records"):  # a scroll page
        return {"records": _canon(value.records), "next": value.next_offset}
    if hasattr(value, "score"):
        return (value.id, float(value.score), _canon(value.payload) if value.payload is not None else None)
    if hasattr(value, "point_id"):
        return (value.id, _canon(value.payload) if value.payload is not None else None)
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal answers; similarity scores within 1e-4 (the two engines sum the dot product in different orders)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _outcome(fn: Callable[[VectorStore], Any], store: VectorStore) -> Any:
    try:
        return ("ok", _canon(fn(store)))
    except StoreError as exc:  # the class is the contract; the wording may differ between adapters
        return ("error", type(exc).__name__)


def _operations(rng: np.random.Generator, coll: str) -> tuple[str, Callable[[VectorStore], Any]]:
    """One random operation as (description, call)."""
    op = rng.integers(12)
    ids = [IDS[i] for i in rng.choice(len(IDS), size=rng.integers(1, 6), replace=False)]
    missing_ok = bool(rng.random() < 0.5)
    if op <= 2:
        vecs = rng.standard_normal((len(ids), 512)).astype(np.float32)
        pls = [_payload(rng) for _ in ids]
        return f"upsert {ids} {pls}", lambda s: s.upsert(coll, ids, vecs, pls)
    if op == 3:
        upd = {i: _payload(rng) or {"note": "x"} for i in ids}
        return f"set_payload {upd} missing_ok={missing_ok}", lambda s: s.set_payload(coll, upd, missing_ok=missing_ok)
    if op == 4:
        keys = [str(k) for k in rng.choice(KEYS, size=rng.integers(1, 3), replace=False)]
        return (
            f"delete_payload_keys {ids} {keys} missing_ok={missing_ok}",
            lambda s: s.delete_payload_keys(coll, ids, keys, missing_ok=missing_ok),
        )
    if op == 5 and rng.random() < 0.5:
        return f"delete {ids} missing_ok={missing_ok}", lambda s: s.delete(coll, ids, missing_ok=missing_ok)
    flt = _filter(rng) if rng.random() < 0.7 else None
    if op in (5, 6):
        return f"count {flt}", lambda s: s.count(coll, flt)
    if op == 7:
        key = str(rng.choice(["label", "n", "split"]))
        return f"facet {key} {flt}", lambda s: list(s.facet(coll, key, filter=flt).items())
    if op == 8:
        return (
            f"retrieve {ids} missing_ok={missing_ok}",
            lambda s: s.retrieve(coll, ids, missing_ok=missing_ok),
        )
    if op == 9:
        limit = int(rng.integers(1, 8))

        def scroll_all(s: VectorStore) -> list[Any]:
            pages, offset = [], None
            while True:
                page = s.scroll(coll, filter=flt, limit=limit, offset=offset)
                pages.append(page)
                if page.next_offset is None:
                    return pages
                offset = page.next_offset

        return f"scroll limit={limit} {flt}", scroll_all
    q = rng.standard_normal(512).astype(np.float32)
    top_k = int(rng.integers(1, 8))
    exact = bool(op == 10)
    threshold = float(rng.choice([-1.0, 0.0, 0.05])) if rng.random() < 0.3 else None
    return (
        f"search exact={exact} top_k={top_k} threshold={threshold} {flt}",
        lambda s: s.search(coll, q, top_k=top_k, filter=flt, exact=exact, score_threshold=threshold),
    )


# qdrant-client's local mode always; a real server too when QDRANT_URL names one (as in the contract suite)
OTHERS = ["memory"] + (["server"] if os.environ.get("QDRANT_URL") else [])


@pytest.mark.parametrize("other", OTHERS)
@pytest.mark.parametrize("seed", range(6))
def test_edge_and_qdrant_client_give_the_same_answers(tmp_path: os.PathLike[str], seed: int, other: str) -> None:
    rng = np.random.default_rng(seed)
    client = (
        QdrantServerStore(location=":memory:")
        if other == "memory"
        else QdrantServerStore(os.environ["QDRANT_URL"], api_key=os.environ.get("QDRANT_API_KEY"))
    )
    stores: list[VectorStore] = [make_edge(tmp_path / "edge"), client]  # Edge first: reopened in place
    coll = f"t_parity_{uuid.uuid4().hex[:12]}"
    try:
        for s in stores:
            s.create_collection(coll)
            s.create_payload_index(coll, "n", "integer")
        log: list[str] = []
        for step in range(200):
            if rng.random() < 0.03:  # Edge closed and opened again: what it wrote must be what it reads back
                stores[0].close()
                stores[0] = make_edge(tmp_path / "edge")
                log.append(f"{step}: Edge reopened")
            what, call = _operations(rng, coll)
            log.append(f"{step}: {what}")
            edge, theirs = (_outcome(call, s) for s in stores)
            assert _same(edge, theirs), (
                f"Edge and {other} diverged at\n" + "\n".join(log[-6:]) + f"\nedge:  {edge}\n{other}: {theirs}"
            )
    finally:
        client.drop_collection(coll, missing_ok=True)
        for s in stores:
            s.close()
