"""The ``embedstore`` command line (Typer)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer
from rich.console import Console

from embedder.environment import is_loopback, remote_collection
from embedder.keys_cli import keys_app
from embedder.label_cli import label_app
from retrieval import StoreError, StoreSettings, collection_spec, open_store

if TYPE_CHECKING:  # imported where used: the CLI starts without torch, grpc or redis
    from embedder.client import Client
    from embedder.indexing import IndexReport
    from embedder.ingest.http_source import HttpSourceConfig
    from embedder.model import Embedder, Item
    from embedder.projection import ProjectionArtifact
    from retrieval import VectorStore

app = typer.Typer(help="embedstore: an embedding store for self-correcting pseudo-labeling.", no_args_is_help=True)
store_app = typer.Typer(help="Inspect and manage the vector store.", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(label_app, name="label")
app.add_typer(keys_app, name="keys")
console = Console()

PathOpt = Annotated[Optional[Path], typer.Option("--path", help="Edge store directory (EMBEDSTORE_PATH).")]  # noqa: UP045
DATASET_HELP = "A bundled dataset: emoji, emoji_subcategory, rotten_tomatoes, mnist or fashion_mnist."
CollectionOpt = Annotated[Optional[str], typer.Option("--collection", "-c", help="Collection (EMBEDSTORE_COLLECTION).")]  # noqa: UP045


def _settings(path: Path | None = None, **overrides: object) -> StoreSettings:
    settings = StoreSettings()
    update = {k: v for k, v in overrides.items() if v is not None}
    if path is not None:
        update["path"] = path
    return StoreSettings.model_validate({**settings.model_dump(), **update}) if update else settings


def _fail(exc: Exception) -> NoReturn:
    from embedder.environment import error_text

    console.print(f"[red]error:[/] {error_text(exc)}")
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


def _index(
    store: VectorStore, settings: StoreSettings, embedder: Embedder, items: Sequence[Item], skip_bad: bool
) -> IndexReport:
    """Embed and upsert ``items`` with a progress bar; a new collection gets the configured shards/replicas."""
    from embedder.indexing import index_items

    return index_items(
        store, settings.collection, embedder, items, skip_bad=skip_bad, progress=True, spec=collection_spec(settings)
    )


def _embedder(require_projection: bool = True) -> Embedder:
    from embedder.config import EmbedderSettings
    from embedder.model import Embedder
    from embedder.projection import ProjectionArtifact

    settings = EmbedderSettings()
    embedder = Embedder.from_settings(settings.model_copy(update={"projection": Path("/nonexistent")}))
    if require_projection:
        embedder.projection = ProjectionArtifact.load(settings.projection)
        embedder._check_projection(embedder.projection)
    return embedder


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write_projection(artifact: ProjectionArtifact, out: Path) -> None:
    """Save ``artifact`` to ``out`` whole or not at all: written beside it, then swapped in by renames."""
    import os
    import shutil

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.new-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    for stale in out.parent.glob(f".{out.name}.new-*"):  # half-written by a fit that was killed: never used
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    moved_aside = False
    try:
        artifact.save(tmp)
        if out.exists():
            os.replace(out, old)
            moved_aside = True
        os.replace(tmp, out)
    except BaseException:
        if moved_aside and not out.exists():
            os.replace(old, out)  # the swap failed half-way: the old projection goes back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # only after the new one is in place


@app.command("fit-projection")
def fit_projection_cmd(
    dataset: Annotated[Optional[str], typer.Option(help=DATASET_HELP)] = None,  # noqa: UP045
    manifest: Annotated[Optional[Path], typer.Option(help="JSONL/CSV manifest: id, image, text, label.")] = None,  # noqa: UP045
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", help="Directory to write (EMBEDSTORE_PROJECTION, ./data/projection)."),
    ] = None,
    labels: Annotated[
        bool,
        typer.Option(
            "--labels/--no-labels",
            help="Train the classifier heads on the items' labels too. Off by default: a labeling job calibrates "
            "on its ground-truth labels, and a projection that learned them makes those scores look better than "
            "the pool's.",
        ),
    ] = False,
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs (early stopping on a validation split).")] = 200,
    holdout: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Share of the labelled items held out to measure the result.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split and the training.")] = 0,
    modality_dropout: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.95,
            help="Share of image+text items whose image or text is hidden in each training step, so that "
            "image-only and text-only items land beside the whole item (0 = off).",
        ),
    ] = 0.3,
    force: Annotated[bool, typer.Option(help="Replace a projection already at --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the fit report as JSON.")] = False,
) -> None:
    """Train the Matryoshka projection (512D, usable 128D and 256D prefixes) on items, and save it."""
    from embedder.config import EmbedderSettings
    from embedder.datasets import load_items, manifest_items
    from embedder.errors import EmbedderError
    from embedder.projection import ProjectionArtifact, TrainConfig
    from embedder.training import fit_on_items

    if (dataset is None) == (manifest is None):
        _fail(ValueError("give exactly one of --dataset or --manifest"))
    target = out if out is not None else EmbedderSettings().projection
    if (target / "projection.json").is_file() and not force:
        try:
            current = f" ({ProjectionArtifact.load(target).version})"
        except EmbedderError:
            current = ""
        _fail(
            ValueError(
                f"a projection is already saved at {target}{current}; pass --force to replace it (collections "
                "indexed with it then need `embedstore reindex`), or --out DIR to write elsewhere"
            )
        )
    try:
        items = load_items(dataset) if dataset else manifest_items(manifest)  # type: ignore[arg-type]
        if not items:
            raise ValueError(f"no items in {dataset or manifest}")
        embedder = _embedder(require_projection=False)
        artifact, report = fit_on_items(
            items,
            embedder,
            config=TrainConfig(epochs=epochs, seed=seed, modality_dropout=modality_dropout),
            holdout=holdout,
            use_labels=labels,
            cache_name=f"dataset-{dataset}" if dataset else None,
            progress=not as_json,
        )
        _write_projection(artifact, target)
    except (EmbedderError, ValueError, OSError) as exc:
        _fail(exc)
    if as_json:
        modalities = list(artifact.space.fitted_modalities)
        console.print_json(json.dumps({**report.as_dict(), "modalities": modalities, "path": str(target)}))
        return
    how = f"on {report.n_labels_used} labels and" if report.n_labels_used else "without labels, on"
    console.print(
        f"projection {report.version} fitted {how} {report.n_items} items "
        f"({'+'.join(artifact.space.fitted_modalities)}; {report.epochs_run} epochs), saved to {target}"
    )
    if len(artifact.space.fitted_modalities) < 2:
        console.print(
            f"[yellow]its items had no {'image' if 'image' not in artifact.space.fitted_modalities else 'text'}: "
            "it will refuse items that have one[/]"
        )
    if report.knn:
        from rich.table import Table

        table = Table(title=f"held-out kNN accuracy (k = 10; {report.n_test} labelled items held out)")
        table.add_column("vector")
        table.add_column("accuracy", justify="right")
        for dims, acc in report.knn.items():
            table.add_row(f"{dims}D prefix" if dims != "raw" else "raw encoder features", f"{acc:.3f}")
        console.print(table)
    else:
        console.print("no held-out measure: it needs --holdout > 0 and at least 10 labelled items")


@app.command("index")
def index_cmd(
    dataset: Annotated[Optional[str], typer.Option(help=DATASET_HELP)] = None,  # noqa: UP045
    manifest: Annotated[Optional[Path], typer.Option(help="JSONL/CSV manifest: id, image, text, label.")] = None,  # noqa: UP045
    path: PathOpt = None,
    collection: CollectionOpt = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip (and list) bad items instead of failing.")] = False,
    seed_fraction: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            help="Keep labels on a stratified share of the items only (e.g. 0.1); the others' labels go to the "
            "payload field 'truth' (for `label run --truth-field truth`). Default: keep every label."
        ),
    ] = None,
) -> None:
    """Embed items with the fitted projection and upsert them into the store."""
    from embedder.datasets import load_items, manifest_items
    from embedder.errors import EmbedderError

    if (dataset is None) == (manifest is None):
        _fail(ValueError("give exactly one of --dataset or --manifest"))
    settings = _settings(path, collection=collection)
    try:
        items = load_items(dataset) if dataset else manifest_items(manifest)  # type: ignore[arg-type]
        if seed_fraction is not None:
            items = _hold_back_labels(items, seed_fraction)
        with open_store(settings) as store:  # first: a store another process holds is said before the models load
            embedder = _embedder()
            report = _index(store, settings, embedder, items, skip_bad)
    except (EmbedderError, StoreError, ValueError) as exc:
        _fail(exc)
    except KeyboardInterrupt:
        # Embedding is all or nothing, the write is batched: interrupted while writing, the collection holds part
        # of the items. Indexing is idempotent (ids are UUIDv5 of the item ids), so the same command finishes it.
        console.print(
            f"[yellow]interrupted:[/] {settings.collection!r} may hold part of these items if the write had "
            "begun; run the same command again to finish (it is idempotent)"
        )
        raise typer.Exit(130) from None
    console.print(f"indexed {report.written} items into {settings.collection!r} ({embedder.version})")
    if report.kept_answers:
        console.print(
            f"kept {report.kept_answers} human answer(s) given since (label import / the web page) over the "
            "items' own labels; labeling runs' pseudo-labels are kept too"
        )
    for item_id, why in report.skipped:
        console.print(f"[yellow]skipped[/] {item_id}: {why}")
    _say_truncated(report.truncated)


def _hold_back_labels(items: list, fraction: float) -> list:
    """A labeling job needs unlabelled points: a bundled dataset labels every item, so `label run` after a plain
    `index --dataset` had nothing to label. Keeps a stratified ``fraction`` of the labels (as the demo's seed);
    the others move to the payload field ``truth``, so a run can be scored against them."""
    import dataclasses

    from embedder.demo import stratified_seed

    if not 0 < fraction <= 1:
        raise ValueError(f"--seed-fraction must be in (0, 1], got {fraction}")
    labelled = [i for i, it in enumerate(items) if it.label]
    keep = {labelled[j] for j in stratified_seed([items[i].label for i in labelled], fraction, 7919).tolist()}
    return [
        it
        if i in keep or not it.label
        else dataclasses.replace(it, label=None, payload={**it.payload, "truth": it.label})
        for i, it in enumerate(items)
    ]


def _say_truncated(truncated: list[tuple[str, int]]) -> None:
    if truncated:
        first_id, pieces = truncated[0]
        console.print(
            f"[yellow]note:[/] {len(truncated)} text(s) are longer than the text model reads (its max_seq_length); "
            f"only their beginning is embedded (e.g. {first_id!r}: {pieces} pieces). Split long documents into "
            "passages to embed all of them"
        )


@app.command("ingest")
def ingest_cmd(
    source: Annotated[
        str,
        typer.Option(
            help="An HTTP source config (a JSON file of HttpSourceConfig fields), manifest:PATH or dataset:NAME."
        ),
    ],
    path: PathOpt = None,
    collection: CollectionOpt = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip (and list) bad items instead of failing.")] = False,
    restart: Annotated[bool, typer.Option(help="HTTP: forget the checkpoint and start from the first page.")] = False,
) -> None:
    """Ingest items (embed + upsert, idempotent by id): from a paginated HTTP API through the key pool,
    resumable from its checkpoint in Redis; or from a manifest or a bundled dataset."""
    import redis as redis_lib
    from pydantic import ValidationError

    from embedder.datasets import load_items, manifest_items
    from embedder.errors import EmbedderError
    from embedder.ingest import KeyPoolError
    from embedder.ingest.config import KeyPoolSettings
    from embedder.ingest.http_source import Checkpoint, HttpSource, IngestError, ingest_http

    settings = _settings(path, collection=collection)
    kind, _, arg = source.partition(":")
    try:
        if kind in ("manifest", "dataset") and arg:
            items = manifest_items(arg) if kind == "manifest" else load_items(arg)
            embedder = _embedder()
            with open_store(settings) as store:
                report = _index(store, settings, embedder, items, skip_bad)
            console.print(f"ingested {report.written} items into {settings.collection!r}")
            _say_truncated(report.truncated)
            skipped = report.skipped
        else:
            config = _source_config(source)  # before the models load: a config mistake shows at once
            ks = KeyPoolSettings()
            url = ks.redis_url.get_secret_value()
            pool = ks.pool(config.pool) if config.pool else None
            target = settings.url if settings.backend == "server" else str(Path(settings.path).resolve())
            checkpoint = Checkpoint(
                redis_lib.Redis.from_url(url, socket_timeout=5),
                config.name,
                url,  # masked by the checkpoint in its messages
                scope=json.dumps([settings.backend, target, settings.collection, config.url]),
            )
            src = HttpSource(config, pool=pool, checkpoint=checkpoint)
            embedder = _embedder()
            with open_store(settings) as store:
                try:
                    rep = ingest_http(
                        src, store, settings.collection, embedder, skip_bad=skip_bad, restart=restart, progress=True
                    )
                except KeyboardInterrupt:
                    console.print(
                        f"[yellow]stopped:[/] every page written so far is checkpointed; the same command goes on "
                        f"from there (source {config.name!r})"
                    )
                    raise typer.Exit(130) from None
            if rep.stale_checkpoint:
                console.print(
                    f"[yellow]note:[/] the checkpoint of source {config.name!r} had progress, but "
                    f"{settings.collection!r} is missing or empty in this store: read again from the start"
                )
            if rep.already_done:
                console.print(
                    f"source {config.name!r} was already ingested to its end into {settings.collection!r}; "
                    "--restart reads it again"
                )
            console.print(
                f"ingested {rep.written} items from {rep.pages} pages into {settings.collection!r}"
                + (f" (resumed at cursor {rep.resumed_from})" if rep.resumed_from else "")
            )
            skipped = rep.skipped
    except (EmbedderError, StoreError, KeyPoolError, IngestError, ValidationError, ValueError) as exc:
        _fail(exc)
    for item_id, why in skipped:
        console.print(f"[yellow]skipped[/] {item_id}: {why}")


def _source_config(source: str) -> HttpSourceConfig:
    """The HTTP source config file ``source``, every mistake named with the file."""
    from embedder.ingest.http_source import HttpSourceConfig

    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--source {source!r}: not a config file, manifest:PATH or dataset:NAME")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"source config {source}: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"source config {source}: must be a JSON object of HttpSourceConfig fields")
    try:
        return HttpSourceConfig(**raw)
    except (TypeError, ValueError) as exc:
        from embedder.environment import error_text

        raise ValueError(f"source config {source}: {error_text(exc)}") from None


def _source_fetcher(source: str) -> Callable[[str], bytes]:
    """GET an image URL the way the ingest of ``source`` did: its retries, and a key from its pool when the
    source's images need one (``image_auth``)."""
    import redis as redis_lib

    from embedder.ingest.config import KeyPoolSettings
    from embedder.ingest.http_source import Checkpoint, HttpSource

    config = _source_config(source)
    ks = KeyPoolSettings()
    pool = ks.pool(config.pool) if config.pool else None
    # a checkpoint object is part of a source; reindex never reads or writes it
    unused = Checkpoint(redis_lib.Redis.from_url(ks.redis_url.get_secret_value(), socket_timeout=5), config.name)
    src = HttpSource(config, pool=pool, checkpoint=unused)
    return lambda url: src.get(url, keyed=config.image_auth, image=True).content


ServerOpt = Annotated[
    str, typer.Option("--server", envvar="EMBEDSTORE_SERVER", help="gRPC server address (host:port).")
]
TokenOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--token", envvar="EMBEDSTORE_TOKEN", help="Bearer token, if the server wants one."),
]


def _client(server: str, token: str | None) -> Client:
    from embedder.client import Client, tls_from_env

    return Client(server, token=token, **tls_from_env())  # EMBEDSTORE_SERVER_CA / _TLS / _TLS_NAME


@app.command("search")
def search_cmd(
    text: Annotated[Optional[str], typer.Argument(help="Query text.")] = None,  # noqa: UP045
    image: Annotated[Optional[Path], typer.Option(help="Query image file.")] = None,  # noqa: UP045
    top_k: Annotated[int, typer.Option(help="Neighbours to return.")] = 10,
    collection: CollectionOpt = None,
    filter: Annotated[Optional[str], typer.Option("--filter", help="JSON payload filter.")] = None,  # noqa: UP045
    server: ServerOpt = "localhost:50051",
    token: TokenOpt = None,
    local: Annotated[bool, typer.Option("--local", help="Search the store in-process, not via the server.")] = False,
    path: PathOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits (id, score, payload) as JSON.")] = False,
) -> None:
    """Nearest items to a text and/or image query (through the gRPC server, or --local)."""
    from embedder.client import ServiceError
    from embedder.errors import EmbedderError
    from embedder.indexing import search_items
    from embedder.model import Item

    if text is None and image is None:
        _fail(ValueError("give a query text and/or --image"))
    try:
        flt = json.loads(filter) if filter else None
    except json.JSONDecodeError as exc:
        _fail(ValueError(f"--filter is not JSON: {exc}"))
    rows: list[tuple[float, str, dict]] = []
    try:
        if local:
            settings = _settings(path, collection=collection)
            with open_store(settings, create=False) as store:
                query = Item("query", image=image, text=text)
                hits = search_items(store, settings.collection, _embedder(), query, top_k=top_k, filter=flt)
            rows = [(h.score, h.id, h.payload or {}) for h in hits]
        else:
            with _client(server, token) as client:
                found = client.search(text, image, top_k=top_k, filter=flt, collection=remote_collection(collection))
            rows = [(h.score, h.id, h.payload or {}) for h in found]
    except (EmbedderError, StoreError, ServiceError) as exc:
        _fail(exc)
    if as_json:
        hits_json = [{"id": i, "score": score, "payload": {k: v for k, v in p.items() if k != "external_id"}}
                     for score, i, p in rows]  # fmt: skip
        console.print_json(json.dumps(hits_json))
        return
    if not rows:
        console.print("no matches" + (f" for the filter {filter}" if filter else " (the collection is empty)"))
    for score, item_id, p in rows:
        console.print(f"{score:.3f}  {item_id}  label={p.get('label')!s}  {str(p.get('text', ''))[:60]}")


@app.command("inspect")
def inspect_cmd(
    point_id: Annotated[str, typer.Argument(help="The point's external id.")],
    k: Annotated[int, typer.Option("-k", help="Neighbours to show.")] = 10,
    collection: CollectionOpt = None,
    server: ServerOpt = "localhost:50051",
    token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    local: Annotated[bool, typer.Option("--local", help="Read the store in-process, not via the server.")] = False,
    path: PathOpt = None,
) -> None:
    """A point's label / pseudo-label beside its nearest neighbours, and how far they agree."""
    import dataclasses

    from embedder.client import ServiceError
    from labeling.inspect import inspect_neighbours
    from labeling.present import agreement_line, neighbour_table

    try:
        if local:
            settings = _settings(path, collection=collection)
            with open_store(settings, create=False) as store:
                view = inspect_neighbours(store, settings.collection, point_id, k)
        else:
            with _client(server, token) as client:
                view = client.inspect(point_id, k=k, collection=remote_collection(collection))
    except (ServiceError, StoreError) as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(dataclasses.asdict(view), default=str))
        return
    st = view.point.state
    conf = "" if st.pseudo_confidence is None else f"{st.pseudo_confidence:.3f}"
    console.print(
        f"[bold]{view.point.id}[/]  label={st.label}  source={st.label_source}  "
        f"pseudo={st.pseudo_label} ({st.pseudo_status} {conf})  text={str(view.point.payload.get('text', ''))[:60]!r}"
    )
    console.print(neighbour_table(view, width=console.width))
    console.print(agreement_line(view))


@app.command("serve")
def serve_cmd(
    host: Annotated[Optional[str], typer.Option(help="Interface (EMBEDSTORE_GRPC_HOST).")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="Port (EMBEDSTORE_GRPC_PORT).")] = None,  # noqa: UP045
    metrics_port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Prometheus port, 0 = off (EMBEDSTORE_GRPC_METRICS_PORT)."),
    ] = None,
    path: PathOpt = None,
    collection: CollectionOpt = None,
) -> None:
    """Serve the embedding, store and labeling services over gRPC until SIGINT, SIGTERM or SIGHUP.

    Every other setting comes from the EMBEDSTORE_GRPC_* variables (README, "Configuration"). On the signal,
    health turns NOT_SERVING; calls are still taken for EMBEDSTORE_GRPC_DRAIN_S (0), then in-flight ones get
    EMBEDSTORE_GRPC_GRACE_S (10) to finish, and the store is flushed and closed."""
    import asyncio
    import logging

    from embedder.config import EmbedderSettings, ServerSettings
    from embedder.errors import EmbedderError
    from embedder.model import Embedder
    from embedder.service.server import EmbedstoreServer

    try:
        overrides = {"host": host, "port": port, "metrics_port": metrics_port}
        server_settings = ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        _fail(exc)
    logging.basicConfig(
        level=getattr(logging, server_settings.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    store_settings = _settings(path, collection=collection)
    try:
        embedder_settings = EmbedderSettings()
    except ValueError as exc:
        _fail(exc)
    chosen = embedder_settings.projection
    if "projection" in embedder_settings.model_fields_set and chosen is not None and not Path(chosen).exists():
        # set on purpose but pointing nowhere (a typo): the server came up without embedding, and the container's
        # health check stayed green. An existing empty folder (a bind mount before the first fit) and an unset
        # variable still mean store-only mode.
        _fail(
            ValueError(
                f"EMBEDSTORE_PROJECTION={chosen} does not exist: fix the path, or unset it to serve stored vectors "
                "without embedding"
            )
        )
    if not is_loopback(server_settings.host) and not server_settings.tokens:
        logging.getLogger("embedstore.server").warning(
            "listening on %s without a bearer token: anyone who can reach the port can read and write the store "
            "(set EMBEDSTORE_GRPC_TOKENS)",
            server_settings.host,
        )
    elif not is_loopback(server_settings.host) and server_settings.tls_cert is None:
        logging.getLogger("embedstore.server").warning(
            "listening on %s without TLS: the bearer tokens cross the network in clear text (set "
            "EMBEDSTORE_GRPC_TLS_CERT and EMBEDSTORE_GRPC_TLS_KEY, or terminate TLS in front of the service)",
            server_settings.host,
        )
    server = EmbedstoreServer(
        server_settings,
        embedder_factory=lambda: Embedder.from_settings(embedder_settings),
        store_factory=lambda: open_store(store_settings),
        collection=store_settings.collection,
        collection_spec=collection_spec(store_settings),
    )
    try:
        asyncio.run(server.serve())
    except (EmbedderError, StoreError, OSError) as exc:
        _fail(exc)


@app.command("migrate")
def migrate_cmd(
    to_server: Annotated[str, typer.Option("--to-server", help="Qdrant server/cluster URL, e.g. http://qdrant:6333.")],
    api_key: Annotated[Optional[str], typer.Option(help="Qdrant API key of the target.")] = None,  # noqa: UP045
    path: PathOpt = None,
    collection: CollectionOpt = None,
    target_collection: Annotated[Optional[str], typer.Option(help="Name on the server (default: the same).")] = None,  # noqa: UP045
    shards: Annotated[Optional[int], typer.Option(help="shard_number (EMBEDSTORE_SHARD_NUMBER).")] = None,  # noqa: UP045
    replicas: Annotated[Optional[int], typer.Option(help="replication_factor (EMBEDSTORE_REPLICATION_FACTOR).")] = None,  # noqa: UP045
    workers: Annotated[int, typer.Option(help="Parallel upsert batches.")] = 4,
    page_size: Annotated[int, typer.Option(help="Points per batch.")] = 1024,
    restart: Annotated[bool, typer.Option(help="Ignore a saved checkpoint; copy from the start.")] = False,
) -> None:
    """Copy the embedded store's collection to a Qdrant server or cluster (parallel batches, resumable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from retrieval.migrate import migrate

    if not to_server.strip():
        _fail(ValueError("--to-server needs the Qdrant server's URL, e.g. http://qdrant:6333"))
    if to_server.strip() == ":memory:":  # kept for trying the command (and for its test), but said plainly
        console.print(
            "[yellow]warning:[/] --to-server :memory: is qdrant-client's in-process test mode: the copy is "
            "discarded when this command exits"
        )
    try:
        source_settings = _settings(path, collection=collection, backend="edge")
        target_settings = _settings(
            None,
            backend="server",
            url=to_server,
            api_key=api_key,
            shard_number=shards,
            replication_factor=replicas,
        )
        columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with (
            open_store(source_settings, create=False) as source,
            open_store(target_settings) as target,
            Progress(*columns, console=console) as bar,
        ):
            task = bar.add_task(f"copying {source_settings.collection}", total=None)
            report = migrate(
                source,
                target,
                source_settings.collection,
                target_collection=target_collection,
                spec=collection_spec(target_settings),
                page_size=page_size,
                workers=workers,
                restart=restart,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except (StoreError, ValueError) as exc:
        _fail(exc)
    if report.already_done:
        console.print(
            f"{report.target_collection!r} on {to_server} already holds a finished copy of "
            f"{source_settings.collection!r} ({report.total} points); nothing copied. A migration is a copy, not a "
            "sync: --restart copies the collection again, with any changes made since"
        )
        return
    how = "resumed, " if report.resumed else ""
    console.print(
        f"copied {report.copied} points ({how}{report.pages} batches); "
        f"{report.target_collection!r} on {to_server} now holds {report.total}"
    )


@app.command("ui")
def ui_cmd(
    host: Annotated[str, typer.Option(help="Interface; localhost by default (set a token before exposing it).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
    path: PathOpt = None,
    collection: CollectionOpt = None,
    image_root: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option(help="Directories local thumbnails may be served from (repeatable; default: the current one)."),
    ] = None,
    k: Annotated[int, typer.Option(help="Neighbours shown per point.")] = 12,
    allowed_host: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            help="Host names the page answers to (repeatable). Default: loopback names when bound to loopback "
            "(stops DNS rebinding), any otherwise."
        ),
    ] = None,
) -> None:
    """Serve the inspection web page: runs, points with their neighbours, review queue, corrections."""
    import uvicorn

    from embedder.config import ServerSettings
    from embedder.ui.app import create_app

    settings = _settings(path, collection=collection)
    tokens = [t.get_secret_value() for t in ServerSettings().tokens]
    loopback = is_loopback(host)
    if not loopback and not tokens:
        console.print("[yellow]warning:[/] serving beyond localhost without a token (set EMBEDSTORE_GRPC_TOKENS)")
    try:
        store = open_store(settings, create=False)
    except StoreError as exc:
        _fail(exc)
    hosts = allowed_host or (sorted({"127.0.0.1", "localhost", "::1", host}) if loopback else None)
    with store:
        if not store.collection_exists(settings.collection):
            _fail(
                StoreError(
                    f"no collection {settings.collection!r} in this store (collections: {store.list_collections()}); "
                    "pick one with -c / EMBEDSTORE_COLLECTION"
                )
            )
        web = create_app(
            store,
            settings.collection,
            tokens=tokens,
            image_roots=image_root or [Path.cwd()],
            k=k,
            allowed_hosts=hosts,
        )
        console.print(f"embedstore ui on http://{host}:{port} (collection {settings.collection!r})")
        uvicorn.run(web, host=host, port=port, log_level="warning")


@app.command("health")
def health_cmd(
    target: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="host:port of the gRPC service (default: EMBEDSTORE_GRPC_HOST, or loopback when that is a "
            "wildcard or unset, and port EMBEDSTORE_GRPC_PORT or 50051)."
        ),
    ] = None,
    service: Annotated[str, typer.Option(help="Service name to check; empty = the whole server.")] = "",
    timeout: Annotated[float, typer.Option(help="Seconds before giving up.")] = 3.0,
) -> None:
    """Ask the service's gRPC health service; exit 0 when SERVING, 1 otherwise (the container healthcheck).

    Beside the server (its container) it follows the server's own settings: the port from
    EMBEDSTORE_GRPC_PORT, and TLS when EMBEDSTORE_GRPC_TLS_CERT is set, verifying the server with that
    certificate (a self-signed one, or a file holding the chain) unless EMBEDSTORE_SERVER_CA names the CA;
    EMBEDSTORE_SERVER_TLS_NAME when the certificate does not name the dialled host."""
    import os

    from embedder.client import Client, ServiceError, tls_from_env

    port = os.environ.get("EMBEDSTORE_GRPC_PORT", "50051").strip()
    if not port.isdigit() or not 0 < int(port) < 65536:
        _fail(ValueError(f"EMBEDSTORE_GRPC_PORT={port!r}: not a port number (1-65535)"))
    own_cert = os.environ.get("EMBEDSTORE_GRPC_TLS_CERT", "").strip()  # "" or blank: no TLS, as the server reads it
    if not target:
        # the interface the server binds (EMBEDSTORE_GRPC_HOST): a wildcard one answers on loopback; a
        # specific one (10.0.0.5) does not, so dial that address itself (it was always 127.0.0.1)
        bound = os.environ.get("EMBEDSTORE_GRPC_HOST", "").strip().strip("[]")
        if bound in ("", "0.0.0.0", "::", "127.0.0.1", "localhost"):
            host = "localhost" if own_cert else "127.0.0.1"
        else:
            host = f"[{bound}]" if ":" in bound else bound
        target = f"{host}:{port}"
    try:
        tls = tls_from_env()
        if own_cert and "root_certificates" not in tls and not tls.get("tls"):
            tls["root_certificates"] = Path(own_cert)
        with Client(target, **tls) as client:
            status = client.health(service, timeout=timeout)
    except ServiceError as exc:
        console.print(f"[red]{target}: {exc.code.name}: {exc.message}[/]")
        raise typer.Exit(1) from None
    console.print(f"{target}: {status}")
    if status != "SERVING":
        raise typer.Exit(1)


@app.command("reindex")
def reindex_cmd(
    path: PathOpt = None,
    collection: CollectionOpt = None,
    source: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="The HTTP source config the collection was ingested with: image URLs are fetched again through "
            "its key pool (for APIs whose images need a key, `image_auth`); without it, plain GETs."
        ),
    ] = None,
) -> None:
    """Re-embed a collection with the current projection (resumable), then switch its version."""
    from embedder.errors import EmbedderError
    from embedder.indexing import reindex
    from embedder.ingest import KeyPoolError
    from embedder.ingest.http_source import IngestError

    settings = _settings(path, collection=collection)
    try:
        fetch = _source_fetcher(source) if source else None
        embedder = _embedder()
        with open_store(settings, create=False) as store:
            report = reindex(store, settings.collection, embedder, fetch=fetch)
    except (EmbedderError, StoreError, KeyPoolError, IngestError, ValueError) as exc:
        _fail(exc)
    console.print(
        f"re-embedded {report.reembedded}, already current {report.already_current}, version {report.version}"
    )
    if report.missing_source:
        console.print(
            f"[red]{len(report.missing_source)} point(s) have no stored source (text / image_uri) for what their "
            "vector was made from and were not re-embedded "
            f"(e.g. {report.missing_source[:5]}); the collection keeps its old version until they are re-ingested[/]"
        )
    for pid, why in report.unreadable[:20]:
        console.print(f"[red]unreadable[/] {pid}: {why}")
    if len(report.unreadable) > 20:
        console.print(f"[red]... and {len(report.unreadable) - 20} more unreadable[/]")
    if report.unreadable:
        console.print("[red]the collection keeps its old version until every point is re-embedded: fix or re-ingest[/]")
    if report.missing_source or report.unreadable:
        raise typer.Exit(code=1)


@store_app.command("info")
def store_info(path: PathOpt = None, collection: CollectionOpt = None) -> None:
    """Collections, point counts and indexes."""
    settings = _settings(path)
    try:
        with open_store(settings, create=False) as store:
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
        with open_store(settings, create=False) as store:
            console.print_json(json.dumps(store.facet(settings.collection, key, filter=flt)))
    except StoreError as exc:
        if "has no payload index" in str(exc):
            _fail(ValueError(f"{exc} (from the command line: embedstore store index {key})"))
        _fail(exc)


@store_app.command("index")
def store_index(
    key: Annotated[str, typer.Argument(help="Payload field to index, e.g. source.")],
    kind: Annotated[str, typer.Option(help="keyword, integer, float or bool.")] = "keyword",
    path: PathOpt = None,
    collection: CollectionOpt = None,
) -> None:
    """Index a payload field, so it can be faceted on and filtered on fast (idempotent)."""
    settings = _settings(path, collection=collection)
    try:
        with open_store(settings, create=False) as store:
            store.create_payload_index(settings.collection, key, kind)
            indexed = sorted(store.collection_info(settings.collection).payload_indexes)
    except StoreError as exc:
        _fail(exc)
    console.print(f"indexed {key!r} ({kind}) in {settings.collection!r}; indexed fields: {indexed}")


def main(argv: list[str] | None = None) -> None:
    """The ``embedstore`` console script: `.env` for every ``EMBEDSTORE_*`` variable, a warning for a name
    nothing reads, and a bad setting reported by its variable (exit 2) rather than as a traceback."""
    import os

    from pydantic import ValidationError

    from embedder.environment import describe_validation_error, load_dotenv, unknown_variables

    load_dotenv()
    warn = Console(stderr=True)
    for name, near in unknown_variables(os.environ):
        hint = f" (did you mean {near}?)" if near else ""
        warn.print(f"[yellow]warning:[/] {name} is not an embedstore setting{hint}; it is ignored")
    try:
        app(args=argv, prog_name="embedstore")
    except ValidationError as exc:
        console.print(f"[red]error:[/] {describe_validation_error(exc)}")
        raise SystemExit(2) from None


def _reflow_help(group: typer.Typer) -> None:
    """Rich help keeps a docstring's line breaks, so a paragraph wrapped at the source's width came out ragged
    ("...the port from" / "EMBEDSTORE_GRPC_PORT, and ..."): each paragraph's lines are joined and the terminal
    wraps them. No command's help holds a list or an indented block that this would flatten."""
    for command in group.registered_commands:
        doc = command.help or inspect.getdoc(command.callback) or ""
        paragraphs = (" ".join(line.strip() for line in para.splitlines()) for para in doc.split("\n\n"))
        command.help = "\n\n".join(paragraphs)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _reflow_help(sub.typer_instance)


_reflow_help(app)

if __name__ == "__main__":  # pragma: no cover
    main()
