"""``embedstore keys ...``: manage the API key pool of a named API (keys are shown by id only)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Column, Table

if TYPE_CHECKING:  # imported where used: the CLI starts without redis
    from embedder.ingest.keypool import KeyPool

T = TypeVar("T")
keys_app = typer.Typer(help="API keys shared through Redis by ingestion workers.", no_args_is_help=True)
console = Console()

ApiArg = Annotated[str, typer.Argument(help="The API (pool) name, e.g. 'catalog'.")]
KeyIdArg = Annotated[str, typer.Argument(help="The key's id (k_...), as `keys list` shows it.")]


def _pool(api: str) -> KeyPool:
    from embedder.ingest import KeyPoolError
    from embedder.ingest.config import KeyPoolSettings

    try:
        return KeyPoolSettings().pool(api)
    except (KeyPoolError, ValueError) as exc:
        _fail(exc)


def _fail(exc: Exception) -> NoReturn:
    from embedder.environment import error_text

    console.print(f"[red]error:[/] {error_text(exc)}")
    raise typer.Exit(code=2)


def _run(fn: Callable[..., T], *args: object, **kw: object) -> T:
    from embedder.ingest import KeyPoolError

    try:
        return fn(*args, **kw)
    except KeyPoolError as exc:
        _fail(exc)


@keys_app.command("add")
def add_cmd(
    api: ApiArg,
    key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="The raw key; prompted for (hidden) when not given, so it stays out of shell history."),
    ] = None,
    budget: Annotated[Optional[int], typer.Option(help="Requests allowed per window.")] = None,  # noqa: UP045
    window_s: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Budget window in seconds (60 for a new key; a key added again keeps its own)."),
    ] = None,
) -> None:
    """Add a key (idempotent); prints its id."""
    raw = key if key is not None else typer.prompt("API key", hide_input=True)
    pool = _pool(api)
    console.print(_run(pool.add, raw, budget=budget, window_s=window_s))
    if not pool.encrypts:
        console.print(
            "[yellow]warning:[/] the key is stored in plain text in Redis: anyone who can read Redis (or its dump "
            "files) can read it. Set EMBEDSTORE_KEY_SECRET (a long random string) to store keys encrypted."
        )


@keys_app.command("list")
def list_cmd(api: ApiArg, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every key's id, state and counters."""
    from embedder.ingest.keypool import when_text

    keys = _run(_pool(api).list)
    if as_json:
        console.print_json(json.dumps([dataclasses.asdict(k) for k in keys]))
        return
    table = Table(
        Column("id", no_wrap=True, min_width=max((len(k.key_id) for k in keys), default=0)),
        Column("state", no_wrap=True, min_width=len("deactivated")),
        "leases",
        "ok",
        "failed",
        "in a row",
        "cooling until",
        "last status",
        Column("budget used", no_wrap=True),
    )
    for k in keys:
        until = when_text(k.cooldown_until) if k.cooldown_until else ""
        budget = f"{k.window_used}/{k.budget} per {k.window_s:g}s" if k.budget else ""
        table.add_row(
            k.key_id,
            k.state,
            str(k.leases),
            str(k.successes),
            str(k.failures),
            str(k.consecutive_failures),
            until,
            str(k.last_status or ""),
            budget,
        )
    console.print(table)


@keys_app.command("disable")
def disable_cmd(api: ApiArg, key_id: KeyIdArg) -> None:
    """Take a key out of rotation."""
    _run(_pool(api).disable, key_id)
    console.print(f"{key_id} disabled")


@keys_app.command("enable")
def enable_cmd(api: ApiArg, key_id: KeyIdArg) -> None:
    """Put a disabled or deactivated (401) key back into rotation."""
    _run(_pool(api).enable, key_id)
    console.print(f"{key_id} enabled")


@keys_app.command("remove")
def remove_cmd(api: ApiArg, key_id: KeyIdArg) -> None:
    """Delete a key and its counters."""
    _run(_pool(api).remove, key_id)
    console.print(f"{key_id} removed")
