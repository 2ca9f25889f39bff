"""`embedstore demo`: the main job on the embedded default store, end to end on real data.

1. Google's emoji (image + name, 9 categories; fetched once with npm, cached).
2. Encoders: EfficientNet-Lite0 (1280D) + all-MiniLM-L6-v2 (384D), features cached on disk.
3. The Matryoshka projection: loaded from ``EMBEDSTORE_PROJECTION`` if it was fitted on
   these encoders, else trained here (80% of items' labels) and saved there.
4. 80% of the items indexed into a Qdrant Edge collection (``./data/store``), the
   other 20% used as queries: recall@10 of the 128D shortlist + 512D rerank against
   exact search, latency, and 10-NN label accuracy; then a few text queries.

It grows into embed -> store -> label -> inspect as labeling lands.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from embedder.config import EmbedderSettings
from embedder.datasets import emoji_items
from embedder.errors import EmbedderError
from embedder.evaluate import stratified_split
from embedder.features import FeatureCache
from embedder.indexing import item_payload, require_version, search_items
from embedder.model import Embedder
from embedder.projection import ProjectionArtifact, TrainConfig, fit_projection
from embedder.training import features_for
from retrieval import StoreSettings, VectorStore, collection_spec, open_store

EXAMPLE_QUERIES = ("red heart", "flag of japan", "slice of pizza", "crying with laughter", "rocket")


@dataclass
class DemoReport:
    projection_version: str
    trained_projection: bool
    n_indexed: int
    n_queries: int
    recall_at_10: float
    p50_ms: float
    p99_ms: float
    exact_p50_ms: float
    knn_accuracy_shortlist: float
    knn_accuracy_exact: float
    knn_accuracy_prefix_only: float
    facets: dict[str, int]
    examples: dict[str, list[str]] = field(default_factory=dict)


def run_demo(
    settings: StoreSettings,
    *,
    embedder_settings: EmbedderSettings | None = None,
    collection: str = "demo_emoji",
    epochs: int = 200,
    feature_cache: FeatureCache | None = None,
    seed: int = 0,
    console: Console | None = None,
) -> DemoReport:
    console = console or Console()
    es = embedder_settings or EmbedderSettings()
    items = emoji_items()
    console.print(
        f"[bold]data[/]: {len(items)} Google emoji (image + name), {len(set(i.label for i in items))} categories"
    )
    embedder = Embedder.from_settings(es.model_copy(update={"projection": Path("/nonexistent")}))
    raw = features_for(items, embedder, cache_name="emoji", cache=feature_cache, progress=True)
    labels = [it.label for it in items]
    train, test = stratified_split(labels, 0.2, seed=seed)

    projection, trained = _projection(es, embedder, raw, labels, train, epochs, seed, console)
    embedder.projection = projection
    vectors = projection.project(raw)

    store: VectorStore = open_store(settings)
    with store:
        store.drop_collection(collection, missing_ok=True)
        store.create_collection(collection, collection_spec(settings))
        version = require_version(store, collection, embedder, claim=True)
        t0 = time.perf_counter()
        for start in track(range(0, len(train), 512), description="upserting", console=console):
            idx = train[start : start + 512]
            store.upsert(
                collection,
                [items[i].id for i in idx],
                vectors[idx],
                [{**item_payload(items[i], version), "split": "train"} for i in idx],
            )
        store.optimize(collection)
        console.print(f"indexed {len(train)} items in {time.perf_counter() - t0:.1f}s")

        queries = vectors[test]
        truth = [labels[i] for i in test]
        fast, lat = _timed(store, collection, queries, exact=False)
        exact, exact_lat = _timed(store, collection, queries, exact=True)
        recall = float(
            np.mean([len({h.id for h in f} & {h.id for h in e}) / 10 for f, e in zip(fast, exact, strict=True)])
        )
        prefix = projection.project(raw, 128)
        prefix_only = _prefix_neighbours(prefix[train], prefix[test], [labels[i] for i in train])
        facets = store.facet(collection, "label")
        examples = {
            q: [
                f"{h.payload['text']} ({h.payload['label']})"
                for h in search_items(store, collection, embedder, q, top_k=3)
            ]
            for q in EXAMPLE_QUERIES
        }

    report = DemoReport(
        projection_version=projection.version,
        trained_projection=trained,
        n_indexed=len(train),
        n_queries=len(test),
        recall_at_10=recall,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        exact_p50_ms=float(np.percentile(exact_lat, 50)),
        knn_accuracy_shortlist=_knn(fast, truth),
        knn_accuracy_exact=_knn(exact, truth),
        knn_accuracy_prefix_only=float(np.mean([_vote(ls) == t for ls, t in zip(prefix_only, truth, strict=True)])),
        facets={str(k): v for k, v in facets.items()},
        examples=examples,
    )
    _print(report, settings, console)
    return report


def _projection(
    es: EmbedderSettings,
    embedder: Embedder,
    raw: object,
    labels: list[str],
    train: np.ndarray,
    epochs: int,
    seed: int,
    console: Console,
) -> tuple[ProjectionArtifact, bool]:
    path = Path(es.projection)
    if (path / "projection.json").is_file():
        try:
            art = ProjectionArtifact.load(path)
            if art.encoders == embedder.encoder_signatures():
                console.print(f"projection {art.version} loaded from {path}")
                return art, False
            console.print(f"[yellow]projection at {path} was fitted on other encoders: training a new one[/]")
        except EmbedderError as exc:
            console.print(f"[yellow]cannot use the projection at {path} ({exc}): training a new one[/]")
    train_set = set(train.tolist())
    train_labels = [labels[i] if i in train_set else None for i in range(len(labels))]
    art = fit_projection(
        raw,  # type: ignore[arg-type]
        train_labels,
        TrainConfig(epochs=epochs, seed=seed),
        encoders=embedder.encoder_signatures(),
        progress=True,
    )
    art.save(path)
    console.print(f"projection {art.version} trained ({art.training['epochs_run']} epochs) and saved to {path}")
    return art, True


def _print(report: DemoReport, settings: StoreSettings, console: Console) -> None:
    where = str(Path(settings.path).resolve()) if settings.backend == "edge" else str(settings.url)
    table = Table(title=f"embedstore demo - {settings.backend} store at {where}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("projection", report.projection_version)
    table.add_row("items indexed / held-out queries", f"{report.n_indexed} / {report.n_queries}")
    table.add_row("recall@10, 128D shortlist + 512D rerank vs exact", f"{report.recall_at_10:.4f}")
    table.add_row("latency p50 / p99 (shortlist + rerank)", f"{report.p50_ms:.2f} / {report.p99_ms:.2f} ms")
    table.add_row("latency p50 (exact 512D scan)", f"{report.exact_p50_ms:.2f} ms")
    table.add_row("10-NN category accuracy: shortlist + rerank", f"{report.knn_accuracy_shortlist:.3f}")
    table.add_row("10-NN category accuracy: exact 512D", f"{report.knn_accuracy_exact:.3f}")
    table.add_row("10-NN category accuracy: 128D prefix alone", f"{report.knn_accuracy_prefix_only:.3f}")
    table.add_row("categories (facet)", ", ".join(f"{k}:{v}" for k, v in report.facets.items()))
    console.print(table)
    for q, hits in report.examples.items():
        console.print(f"[bold]{q!r}[/] -> " + "; ".join(hits))


def _timed(store: VectorStore, collection: str, queries: np.ndarray, *, exact: bool) -> tuple[list, np.ndarray]:
    results, lat = [], []
    for q in queries:
        t0 = time.perf_counter()
        results.append(store.search(collection, q, top_k=10, exact=exact))
        lat.append((time.perf_counter() - t0) * 1000)
    return results, np.asarray(lat)


def _vote(labels: list[str]) -> str:
    return Counter(labels).most_common(1)[0][0]


def _knn(results: list, truth: list[str]) -> float:
    return float(
        np.mean([_vote([h.payload["label"] for h in hits]) == t for hits, t in zip(results, truth, strict=True)])
    )


def _prefix_neighbours(x: np.ndarray, q: np.ndarray, labels: list[str]) -> list[list[str]]:
    top = np.argsort(-(q @ x.T), axis=1)[:, :10]
    return [[labels[j] for j in row] for row in top]
