"""The ``embedstore`` command line (Typer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from retrieval import StoreError, StoreSettings, open_store

app = typer.Typer(help="embedstore: an embedding store for self-correcting pseudo-labeling.", no_args_is_help=True)
store_app = typer.Typer(help="Inspect and manage the vector store.", no_args_is_help=True)
app.add_typer(store_app, name="store")
console = Console()

PathOpt = Annotated[Optional[Path], typer.Option("--path", help="Edge store directory (EMBEDSTORE_PATH).")]  # noqa: UP045
CollectionOpt = Annotated[Optional[str], typer.Option("--collection", "-c", help="Collection (EMBEDSTORE_COLLECTION).")]  # noqa: UP045


def _settings(path: Path | None = None, **overrides: object) -> StoreSettings:
    settings = StoreSettings()
    update = {k: v for k, v in overrides.items() if v is not None}
    if path is not None:
        update["path"] = path
    return StoreSettings.model_validate({**settings.model_dump(), **update}) if update else settings


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/] {exc}")
    raise typer.Exit(code=2)


@app.command()
def demo(
    path: PathOpt = None,
    epochs: Annotated[int, typer.Option(help="Most epochs if a projection has to be trained.")] = 200,
) -> None:
    """Run the main job on the embedded default store and print what it measured."""
    from embedder.demo import run_demo
    from embedder.errors import EmbedderError

    try:
        run_demo(_settings(path), epochs=epochs, console=console)
    except (StoreError, EmbedderError) as exc:
        _fail(exc)


def _embedder(require_projection: bool = True):
    from embedder.config import EmbedderSettings
    from embedder.model import Embedder
    from embedder.projection import ProjectionArtifact

    settings = EmbedderSettings()
    embedder = Embedder.from_settings(settings.model_copy(update={"projection": Path("/nonexistent")}))
    if require_projection:
        embedder.projection = ProjectionArtifact.load(settings.projection)
        embedder._check_projection(embedder.projection)
    return embedder


@app.command("index")
def index_cmd(
    dataset: Annotated[Optional[str], typer.Option(help="emoji, rotten_tomatoes or mnist.")] = None,  # noqa: UP045
    manifest: Annotated[Optional[Path], typer.Option(help="JSONL/CSV manifest: id, image, text, label.")] = None,  # noqa: UP045
    path: PathOpt = None,
    collection: CollectionOpt = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip (and list) bad items instead of failing.")] = False,
) -> None:
    """Embed items with the fitted projection and upsert them into the store."""
    from embedder.datasets import load_items, manifest_items
    from embedder.errors import EmbedderError
    from embedder.indexing import index_items

    if (dataset is None) == (manifest is None):
        _fail(ValueError("give exactly one of --dataset or --manifest"))
    settings = _settings(path, collection=collection)
    try:
        items = load_items(dataset) if dataset else manifest_items(manifest)  # type: ignore[arg-type]
        embedder = _embedder()
        with open_store(settings) as store:
            report = index_items(store, settings.collection, embedder, items, skip_bad=skip_bad, progress=True)
    except (EmbedderError, StoreError) as exc:
        _fail(exc)
    console.print(f"indexed {report.written} items into {settings.collection!r} ({embedder.version})")
    for item_id, why in report.skipped:
        console.print(f"[yellow]skipped[/] {item_id}: {why}")


@app.command("search")
def search_cmd(
    text: Annotated[Optional[str], typer.Option(help="Query text.")] = None,  # noqa: UP045
    image: Annotated[Optional[Path], typer.Option(help="Query image file.")] = None,  # noqa: UP045
    top_k: Annotated[int, typer.Option(help="Neighbours to return.")] = 10,
    path: PathOpt = None,
    collection: CollectionOpt = None,
    filter: Annotated[Optional[str], typer.Option("--filter", help="JSON payload filter.")] = None,  # noqa: UP045
) -> None:
    """Nearest items to a text and/or image query."""
    from embedder.errors import EmbedderError
    from embedder.indexing import search_items
    from embedder.model import Item

    if text is None and image is None:
        _fail(ValueError("give --text and/or --image"))
    settings = _settings(path, collection=collection)
    try:
        flt = json.loads(filter) if filter else None
        with open_store(settings) as store:
            hits = search_items(store, settings.collection, _embedder(), Item("query", image=image, text=text),
                                top_k=top_k, filter=flt)  # fmt: skip
    except json.JSONDecodeError as exc:
        _fail(ValueError(f"--filter is not JSON: {exc}"))
    except (EmbedderError, StoreError) as exc:
        _fail(exc)
    for h in hits:
        p = h.payload or {}
        console.print(f"{h.score:.3f}  {h.id}  label={p.get('label')!s}  {str(p.get('text', ''))[:60]}")


@app.command("reindex")
def reindex_cmd(path: PathOpt = None, collection: CollectionOpt = None) -> None:
    """Re-embed a collection with the current projection (resumable), then switch its version."""
    from embedder.errors import EmbedderError
    from embedder.indexing import reindex

    settings = _settings(path, collection=collection)
    try:
        embedder = _embedder()
        with open_store(settings) as store:
            report = reindex(store, settings.collection, embedder)
    except (EmbedderError, StoreError) as exc:
        _fail(exc)
    console.print(
        f"re-embedded {report.reembedded}, already current {report.already_current}, version {report.version}"
    )
    if report.missing_source:
        console.print(
            f"[red]{len(report.missing_source)} point(s) have no stored text or image_uri and were not re-embedded "
            f"(e.g. {report.missing_source[:5]}); the collection keeps its old version until they are re-ingested[/]"
        )
        raise typer.Exit(code=1)


@store_app.command("info")
def store_info(path: PathOpt = None, collection: CollectionOpt = None) -> None:
    """Collections, point counts and indexes."""
    settings = _settings(path)
    try:
        with open_store(settings) as store:
            names = [collection] if collection else store.list_collections()
            for name in names:
                info = store.collection_info(name)
                body = {
                    "name": info.name,
                    "backend": info.backend,
                    "points": info.points_count,
                    "indexed_vectors": info.indexed_vectors_count,
                    "payload_indexes": list(info.payload_indexes),
                    "spec": info.spec,
                }
                console.print_json(json.dumps(body))
    except StoreError as exc:
        _fail(exc)


@store_app.command("facet")
def store_facet(
    key: Annotated[str, typer.Argument(help="Indexed payload field, e.g. label or pseudo_status.")],
    path: PathOpt = None,
    collection: CollectionOpt = None,
    filter: Annotated[Optional[str], typer.Option("--filter", help='JSON filter, e.g. \'{"split": "train"}\'.')] = None,  # noqa: UP045
) -> None:
    """Counts of each value of a payload field."""
    settings = _settings(path, collection=collection)
    try:
        flt = json.loads(filter) if filter else None
    except json.JSONDecodeError as exc:
        _fail(ValueError(f"--filter is not JSON: {exc}"))
    try:
        with open_store(settings) as store:
            console.print_json(json.dumps(store.facet(settings.collection, key, filter=flt)))
    except StoreError as exc:
        _fail(exc)


if __name__ == "__main__":  # pragma: no cover
    app()
