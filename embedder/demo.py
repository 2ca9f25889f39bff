"""`embedstore demo`: the main job on the embedded default store, end to end on real data.

1. Google's emoji (image + name, 9 categories; fetched once with npm, cached).
2. Encoders: EfficientNet-Lite0 (1280D) + all-MiniLM-L6-v2 (384D), features cached on disk.
3. The Matryoshka projection, fitted *without labels* (its unsupervised objective only), so
   no label the labeling job is judged on has shaped the vectors. Loaded from
   ``EMBEDSTORE_PROJECTION`` when a label-free one fitted on these encoders is there.
4. Every item stored in a Qdrant Edge collection (``./data/store``); the labels of a
   stratified 10% seed are kept as ground truth (``label_source = human``), the rest are
   hidden (kept in ``hidden_label`` only to score the result). Search is checked on
   the way: recall@10 of the 128D shortlist + 512D rerank against exact search, latency.
5. A labeling job (:mod:`labeling.job`): per-iteration table, precision of the accepted
   pseudo-labels against the hidden truth, the run directory with its report and plots,
   and one inspection: a pseudo-labelled point beside its nearest neighbours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from embedder.config import EmbedderSettings
from embedder.datasets import emoji_items
from embedder.errors import EmbedderError
from embedder.features import FeatureCache
from embedder.indexing import item_payload, require_version, search_items
from embedder.model import Embedder
from embedder.projection import ProjectionArtifact, TrainConfig, fit_projection
from embedder.training import features_for
from labeling.config import LabelingConfig
from labeling.inspect import Inspection, inspect_neighbours
from labeling.job import run_job
from labeling.present import agreement_line, neighbour_table, print_report, rich_events
from retrieval import StoreSettings, VectorStore, collection_spec, open_store
from retrieval.config import safe_url

EXAMPLE_QUERIES = ("red heart", "flag of japan", "slice of pizza", "crying with laughter", "rocket")
SEED_FRACTION = 0.10


@dataclass
class DemoReport:
    projection_version: str
    trained_projection: bool
    n_items: int
    n_seed: int
    recall_at_10: float
    p50_ms: float
    p99_ms: float
    exact_p50_ms: float
    labeling: dict[str, Any]
    run_dir: Path
    inspection: Inspection | None
    examples: dict[str, list[str]] = field(default_factory=dict)


def stratified_seed(labels: list[str], fraction: float, seed: int) -> np.ndarray:
    """ceil(fraction x class size) random members of every class."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for c in sorted(set(labels)):
        members = np.flatnonzero(np.asarray(labels) == c)
        out.extend(rng.permutation(members)[: int(np.ceil(fraction * len(members)))].tolist())
    return np.sort(np.asarray(out))


def run_demo(
    settings: StoreSettings,
    *,
    embedder_settings: EmbedderSettings | None = None,
    collection: str = "demo_emoji",
    epochs: int = 200,
    feature_cache: FeatureCache | None = None,
    labeling_config: LabelingConfig | None = None,
    runs_dir: Path | str = Path("./data/runs"),
    seed: int = 0,
    console: Console | None = None,
) -> DemoReport:
    console = console or Console()
    es = embedder_settings or EmbedderSettings()
    items = emoji_items()
    labels = [str(it.label) for it in items]
    console.print(f"[bold]data[/]: {len(items)} Google emoji (image + name), {len(set(labels))} categories")
    embedder = Embedder.from_settings(es.model_copy(update={"projection": Path("/nonexistent")}))
    raw = features_for(items, embedder, cache_name="emoji", cache=feature_cache, progress=True)

    projection, trained = _projection(es, embedder, raw, epochs, seed, console)
    embedder.projection = projection
    vectors = projection.project(raw)
    # an independent generator: the seed must not coincide with the projection's own validation split
    seed_rows = set(stratified_seed(labels, SEED_FRACTION, seed + 7919).tolist())
    console.print(
        f"[bold]ground truth[/]: a stratified {SEED_FRACTION:.0%} seed, {len(seed_rows)} labels; "
        f"{len(items) - len(seed_rows)} labels hidden from the job (kept only to score it)"
    )

    store: VectorStore = open_store(settings)
    with store:
        store.drop_collection(collection, missing_ok=True)
        store.create_collection(collection, collection_spec(settings))
        version = require_version(store, collection, embedder, claim=True)
        t0 = time.perf_counter()
        for start in track(range(0, len(items), 512), description="storing", console=console):
            idx = range(start, min(start + 512, len(items)))
            payloads = []
            for i in idx:
                p = item_payload(items[i], version)
                p["hidden_label"] = p.pop("label", labels[i])
                p.pop("label_source", None)
                if i in seed_rows:
                    p.update(label=labels[i], label_source="human")
                payloads.append(p)
            store.upsert(collection, [items[i].id for i in idx], vectors[list(idx)], payloads)
        store.optimize(collection)
        console.print(f"stored {len(items)} items in {time.perf_counter() - t0:.1f}s")

        queries = vectors[np.random.default_rng(seed).permutation(len(items))[:200]]
        fast, lat = _timed(store, collection, queries, exact=False)
        exact, exact_lat = _timed(store, collection, queries, exact=True)
        recall = float(
            np.mean([len({h.id for h in f} & {h.id for h in e}) / 10 for f, e in zip(fast, exact, strict=True)])
        )
        examples = {
            q: [f"{h.payload['text']}" for h in search_items(store, collection, embedder, q, top_k=3)]
            for q in EXAMPLE_QUERIES
        }
        _print_search(recall, lat, exact_lat, examples, settings, console)

        cfg = labeling_config or LabelingConfig(truth_field="hidden_label")
        console.rule("[bold]labeling job")
        with rich_events(console) as events:
            result = run_job(store, collection, cfg, runs_dir=runs_dir, events=events)
        print_report(result.report, console)
        inspection = _inspect_one(store, collection, result.report, console)

    return DemoReport(
        projection_version=projection.version,
        trained_projection=trained,
        n_items=len(items),
        n_seed=len(seed_rows),
        recall_at_10=recall,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        exact_p50_ms=float(np.percentile(exact_lat, 50)),
        labeling=result.report,
        run_dir=result.run_dir,
        inspection=inspection,
        examples=examples,
    )


def _projection(
    es: EmbedderSettings, embedder: Embedder, raw: object, epochs: int, seed: int, console: Console
) -> tuple[ProjectionArtifact, bool]:
    """A label-free projection on these encoders: loaded if one is saved, else fitted and saved."""
    path = Path(es.projection)
    if (path / "projection.json").is_file():
        try:
            art = ProjectionArtifact.load(path)
            if art.encoders == embedder.encoder_signatures() and art.training.get("n_labeled") == 0:
                console.print(f"projection {art.version} (label-free) loaded from {path}")
                return art, False
            console.print(
                f"[yellow]the projection at {path} was fitted on other encoders or with labels; the demo needs a "
                f"label-free one (labels would leak into the job's evaluation): fitting one in {path}-label-free[/]"
            )
            path = path.with_name(path.name + "-label-free")
            if (path / "projection.json").is_file():
                art = ProjectionArtifact.load(path)
                if art.encoders == embedder.encoder_signatures():
                    return art, False
        except EmbedderError as exc:
            console.print(f"[yellow]cannot use the projection at {path} ({exc}): fitting a new one[/]")
    art = fit_projection(
        raw,  # type: ignore[arg-type]
        None,
        TrainConfig(epochs=epochs, seed=seed),
        encoders=embedder.encoder_signatures(),
        progress=True,
    )
    art.save(path)
    console.print(
        f"projection {art.version} fitted without labels ({art.training['epochs_run']} epochs), saved to {path}"
    )
    return art, True


def _print_search(
    recall: float,
    lat: np.ndarray,
    exact_lat: np.ndarray,
    examples: dict[str, list[str]],
    settings: StoreSettings,
    console: Console,
) -> None:
    where = str(Path(settings.path).resolve()) if settings.backend == "edge" else safe_url(str(settings.url))
    table = Table(title=f"search - {settings.backend} store at {where}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("recall@10, 128D shortlist + 512D rerank vs exact", f"{recall:.4f}")
    table.add_row(
        "latency p50 / p99 (shortlist + rerank)", f"{np.percentile(lat, 50):.2f} / {np.percentile(lat, 99):.2f} ms"
    )
    table.add_row("latency p50 (exact 512D scan)", f"{np.percentile(exact_lat, 50):.2f} ms")
    console.print(table)
    for q, hits in examples.items():
        console.print(f"[bold]{q!r}[/] -> " + "; ".join(hits))


def _inspect_one(store: VectorStore, collection: str, report: dict[str, Any], console: Console) -> Inspection | None:
    """Show one accepted pseudo-label (the least confident one: the most telling) beside its neighbours."""
    hits = store.scroll(collection, filter={"pseudo_status": "accepted"}, limit=2000).records
    if not hits:
        console.print("no accepted pseudo-labels to inspect")
        return None
    pick = min(hits, key=lambda r: (r.payload or {}).get("pseudo_confidence", 1.0))
    view = inspect_neighbours(store, collection, pick.id, k=8)
    st = view.point.state
    truth = view.point.payload.get("hidden_label")
    console.rule(f"[bold]inspection: {pick.id}")
    console.print(
        f"{view.point.payload.get('text')!r}: pseudo-label [bold]{st.pseudo_label}[/] ({st.pseudo_status}, "
        f"calibrated P = {st.pseudo_confidence}); hidden truth: {truth}"
    )
    console.print(neighbour_table(view, text_width=32))
    console.print(agreement_line(view))
    return view


def _timed(store: VectorStore, collection: str, queries: np.ndarray, *, exact: bool) -> tuple[list, np.ndarray]:
    results, lat = [], []
    for q in queries:
        t0 = time.perf_counter()
        results.append(store.search(collection, q, top_k=10, exact=exact))
        lat.append((time.perf_counter() - t0) * 1000)
    return results, np.asarray(lat)
