"""Every ``EMBEDSTORE_*`` variable in one place: `.env` for all of them, typos reported, bad values named.

The settings classes (pydantic-settings) read the environment and ``./.env`` themselves. A few variables
are read elsewhere: the command line's ``--server``/``--token``/``--runs-dir`` defaults (Typer reads only
the process environment) and the model cache (``EMBEDSTORE_CACHE``, read before any settings object
exists). So that `.env` means the same for all of them, the command line first copies the ``EMBEDSTORE_*``
entries of ``./.env`` into its environment, never over a variable that is already set: the environment
wins over `.env`, as pydantic-settings has it, and a command-line flag wins over both.

A misspelt name (``EMBEDSTORE_COLECTION``) would otherwise be ignored without a word, and the default
used; :func:`unknown_variables` lists such names with the nearest known one. A bad value is reported by
:func:`describe_validation_error` as ``EMBEDSTORE_SHORTLIST=-5: ...``, naming the variable a user sets,
not pydantic's field name.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

PREFIX = "EMBEDSTORE_"

#: variables read outside the settings classes (see the module docstring)
OTHER_VARIABLES = {
    "EMBEDSTORE_SERVER": "gRPC server address for search, inspect and label --server (host:port)",
    "EMBEDSTORE_TOKEN": "bearer token sent to that server",
    "EMBEDSTORE_RUNS_DIR": "where `label run` writes its run folders (./data/runs)",
    "EMBEDSTORE_CACHE": "model and data cache (~/.cache/embedstore)",
    "EMBEDSTORE_SERVER_CA": "CA certificate (PEM) the command line verifies a TLS server with",
    "EMBEDSTORE_SERVER_TLS": "true: TLS to the server with the system's root certificates",
    "EMBEDSTORE_SERVER_TLS_NAME": "the name the server's certificate carries, when not the dialled host",
    # read by docker compose, not by embedstore: set beside the tools the compose header says to run
    "EMBEDSTORE_PUBLISH_HOST": "docker compose: where the gRPC and metrics ports are published (127.0.0.1)",
}


def _settings_classes() -> list[type]:
    from embedder.config import EmbedderSettings, ServerSettings
    from embedder.ingest.config import KeyPoolSettings
    from retrieval.config import StoreSettings

    return [StoreSettings, EmbedderSettings, ServerSettings, KeyPoolSettings]


def _prefix(cls: type) -> str:
    return str(cls.model_config.get("env_prefix", ""))  # type: ignore[attr-defined]


def known_variables() -> set[str]:
    """Every ``EMBEDSTORE_*`` name some part of embedstore reads."""
    names = set(OTHER_VARIABLES)
    for cls in _settings_classes():
        names |= {f"{_prefix(cls)}{field}".upper() for field in cls.model_fields}  # type: ignore[attr-defined]
    return names


def dotenv_entries(path: str | os.PathLike[str] = ".env") -> dict[str, str]:
    """The ``EMBEDSTORE_*`` entries of a `.env` file (empty when there is none)."""
    if not Path(path).is_file():
        return {}
    from dotenv import dotenv_values  # python-dotenv: what pydantic-settings reads `.env` with

    return {k: v for k, v in dotenv_values(path).items() if k.upper().startswith(PREFIX) and v is not None}


def load_dotenv(path: str | os.PathLike[str] = ".env", environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Copy `.env`'s ``EMBEDSTORE_*`` entries into ``environ`` (``os.environ``) where not set; the names copied."""
    env = os.environ if environ is None else environ
    copied = []
    for key, value in dotenv_entries(path).items():
        if key not in env:
            env[key] = value
            copied.append(key)
    return copied


def unknown_variables(names: Iterable[str]) -> list[tuple[str, str | None]]:
    """(name, nearest known name or None) for each ``EMBEDSTORE_*`` name that nothing reads."""
    known = known_variables()
    tails = {k[len(PREFIX) :]: k for k in known}
    out = []
    for name in sorted({n for n in names if n.upper().startswith(PREFIX)}):
        if name.upper() in known:
            continue
        close = difflib.get_close_matches(name.upper()[len(PREFIX) :], sorted(tails), n=1, cutoff=0.8)
        out.append((name, tails[close[0]] if close else None))
    return out


def describe_validation_error(exc: Any, environ: Mapping[str, str] | None = None) -> str:
    """A pydantic ``ValidationError`` from a settings class, as one line per bad setting naming its variable."""
    env = os.environ if environ is None else environ
    classes = {cls.__name__: cls for cls in _settings_classes()}
    cls = classes.get(getattr(exc, "title", ""))
    prefix = _prefix(cls) if cls is not None else None
    lines = []
    for err in exc.errors():
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        field = ".".join(str(part) for part in err.get("loc", ()))
        if not field:  # a check across fields: its message names the variables itself
            lines.append(msg)
            continue
        if prefix is None:  # not a settings class (a config file's model): the field and the value given
            given = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            lines.append(f"{field}: {msg}{given}")
            continue
        name = f"{prefix}{field}".upper()
        value = env.get(name)
        if value is not None and _is_secret(cls, field):
            value = "<hidden>"  # a Redis URL's password or an API key is not printed back
        shown = f"{name}={value}" if value is not None else f"{name} (setting {field!r}, or its option)"
        lines.append(f"{shown}: {msg}")
    return "; ".join(lines) if lines else str(exc)


def _is_secret(cls: Any, field: str) -> bool:
    info = getattr(cls, "model_fields", {}).get(field)
    return info is not None and "SecretStr" in repr(info.annotation)


def error_text(exc: BaseException) -> str:
    """What the command line prints for ``exc``: a settings error as :func:`describe_validation_error`."""
    from pydantic import ValidationError

    return describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a port on this machine: ``localhost`` or any loopback address (all of
    127.0.0.0/8, ::1). Only the three usual names counted, so ``ui --host 127.0.0.2`` turned the web page's
    Host check off."""
    import ipaddress

    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remote_collection(collection: str | None) -> str:
    """The collection a command sends to a server: ``-c``, else ``EMBEDSTORE_COLLECTION`` when set (the
    environment or .env), else "" (the server's default). The variable was ignored over ``--server``, and a
    labeling job wrote its pseudo-labels into the server's default collection."""
    return collection or os.environ.get("EMBEDSTORE_COLLECTION", "").strip()
