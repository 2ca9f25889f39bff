"""`embedstore demo`: the main job on the embedded default store, end to end on real data.

Today (store layer): real vectors in, collection built, queries run, recall and
latency printed. It grows into embed -> store -> label -> inspect as those
parts land.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from embedder.datasets import mnist_pca512
from retrieval import PREFIX_DIM, StoreSettings, VectorStore, collection_spec, open_store


@dataclass
class DemoReport:
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


def run_demo(
    settings: StoreSettings,
    *,
    collection: str = "demo_mnist",
    n_queries: int = 500,
    seed: int = 0,
    console: Console | None = None,
) -> DemoReport:
    console = console or Console()
    data = mnist_pca512()
    console.print(f"[bold]data[/]: {data.source} -> {data.vectors.shape}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.ids))
    q_idx, x_idx = order[:n_queries], order[n_queries:]

    store: VectorStore = open_store(settings)
    with store:
        store.drop_collection(collection, missing_ok=True)
        store.create_collection(collection, collection_spec(settings))
        t0 = time.perf_counter()
        batch = 1000
        for start in track(range(0, len(x_idx), batch), description="upserting", console=console):
            idx = x_idx[start : start + batch]
            store.upsert(
                collection,
                [data.ids[i] for i in idx],
                data.vectors[idx],
                [{"label": data.labels[i], "label_source": "human", "split": "train"} for i in idx],
            )
        store.optimize(collection)
        console.print(f"indexed {len(x_idx)} points in {time.perf_counter() - t0:.1f}s (upsert + optimize)")

        queries = data.vectors[q_idx]
        truth_labels = [data.labels[i] for i in q_idx]
        fast, lat = _timed(store, collection, queries, exact=False)
        exact, exact_lat = _timed(store, collection, queries, exact=True)
        recall = float(
            np.mean([len({h.id for h in f} & {h.id for h in e}) / 10 for f, e in zip(fast, exact, strict=True)])
        )
        # What the 128D prefix alone finds (no rerank), to show the prefix is a usable vector on its own.
        prefix_only = _prefix_only_neighbours(data.vectors[x_idx], queries, [data.labels[i] for i in x_idx])
        facets = store.facet(collection, "label")

    report = DemoReport(
        n_indexed=len(x_idx),
        n_queries=len(q_idx),
        recall_at_10=recall,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        exact_p50_ms=float(np.percentile(exact_lat, 50)),
        knn_accuracy_shortlist=_knn_accuracy(fast, truth_labels),
        knn_accuracy_exact=_knn_accuracy(exact, truth_labels),
        knn_accuracy_prefix_only=float(
            np.mean([_vote(ls) == t for ls, t in zip(prefix_only, truth_labels, strict=True)])
        ),
        facets={str(k): v for k, v in facets.items()},
    )
    table = Table(title=f"embedstore demo - {settings.backend} store at {_where(settings)}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("points indexed / held-out queries", f"{report.n_indexed} / {report.n_queries}")
    table.add_row("recall@10, 128D shortlist + 512D rerank vs exact 512D", f"{report.recall_at_10:.4f}")
    table.add_row("latency p50 / p99 (shortlist + rerank)", f"{report.p50_ms:.2f} / {report.p99_ms:.2f} ms")
    table.add_row("latency p50 (exact 512D scan)", f"{report.exact_p50_ms:.2f} ms")
    table.add_row("10-NN vote accuracy: shortlist + rerank", f"{report.knn_accuracy_shortlist:.3f}")
    table.add_row("10-NN vote accuracy: exact 512D", f"{report.knn_accuracy_exact:.3f}")
    table.add_row(f"10-NN vote accuracy: {PREFIX_DIM}D prefix alone", f"{report.knn_accuracy_prefix_only:.3f}")
    table.add_row("labels (facet)", ", ".join(f"{k}:{v}" for k, v in sorted(report.facets.items())))
    console.print(table)
    return report


def _where(settings: StoreSettings) -> str:
    return str(Path(settings.path).resolve()) if settings.backend == "edge" else str(settings.url)


def _timed(store: VectorStore, collection: str, queries: np.ndarray, *, exact: bool) -> tuple[list, np.ndarray]:
    results, lat = [], []
    for q in queries:
        t0 = time.perf_counter()
        results.append(store.search(collection, q, top_k=10, exact=exact))
        lat.append((time.perf_counter() - t0) * 1000)
    return results, np.asarray(lat)


def _vote(labels: list[str]) -> str:
    return Counter(labels).most_common(1)[0][0]


def _knn_accuracy(results: list, truth: list[str]) -> float:
    return float(
        np.mean([_vote([h.payload["label"] for h in hits]) == t for hits, t in zip(results, truth, strict=True)])
    )


def _prefix_only_neighbours(x: np.ndarray, q: np.ndarray, labels: list[str]) -> list[list[str]]:
    xp = x[:, :PREFIX_DIM] / np.linalg.norm(x[:, :PREFIX_DIM], axis=1, keepdims=True)
    qp = q[:, :PREFIX_DIM] / np.linalg.norm(q[:, :PREFIX_DIM], axis=1, keepdims=True)
    top = np.argsort(-(qp @ xp.T), axis=1)[:, :10]
    return [[labels[j] for j in row] for row in top]
