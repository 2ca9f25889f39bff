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
    queries: Annotated[int, typer.Option(help="Held-out query points.")] = 500,
) -> None:
    """Run the main job on the embedded default store and print what it measured."""
    from embedder.demo import run_demo

    try:
        run_demo(_settings(path), n_queries=queries, console=console)
    except StoreError as exc:
        _fail(exc)


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
