"""Store settings, read from the environment (prefix ``EMBEDSTORE_``) or a ``.env`` file.

================================  =========================================
``EMBEDSTORE_BACKEND``            ``edge`` (embedded, default) or ``server``
``EMBEDSTORE_PATH``               Edge store directory (``./data/store``)
``EMBEDSTORE_URL``                Qdrant server URL (backend ``server``)
``EMBEDSTORE_API_KEY``            Qdrant API key
``EMBEDSTORE_COLLECTION``         default collection (``items``)
``EMBEDSTORE_SHORTLIST``          candidates taken on ``mrl128`` before the rerank (100)
``EMBEDSTORE_PREFER_GRPC``        talk gRPC to the server (true)
``EMBEDSTORE_SHARD_NUMBER``       shards for new server collections (1)
``EMBEDSTORE_REPLICATION_FACTOR`` replicas for new server collections (1)
================================  =========================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from retrieval.schema import check_collection_name


def safe_url(url: str) -> str:
    """A URL without its password, for messages and logs: in the user part (``http://admin:pw@host``, Qdrant's
    and Redis's), or as ``?password=`` (redis-py reads both)."""
    from urllib.parse import parse_qsl, urlencode, urlunsplit

    try:
        parts = urlsplit(url)
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k.lower() == "password" for k, _ in pairs):
                query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
        netloc = parts.netloc
        if parts.password is not None:
            host = parts.hostname or ""
            host = f"[{host}]" if ":" in host else host  # an IPv6 address keeps its brackets
            netloc = (parts.username + ":***@" if parts.username else ":***@") + host
            if parts.port:
                netloc += f":{parts.port}"
    except ValueError:  # a port that is not a number: say nothing of the netloc
        return "<a URL that cannot be parsed>"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_server_url(value: str | None) -> str | None:
    """``http(s)://host[:port]`` or ``:memory:`` (qdrant-client's local mode). Without this check a bare host
    name ("qdrant") reached qdrant-client, which dialled it and failed later with a resolver error."""
    if value is None or value == ":memory:":
        return value
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be a URL such as http://localhost:6333 (scheme http or https, and a host), or :memory:")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in 0-65535
    except ValueError as exc:
        raise ValueError(f"bad port in the URL: {exc}") from None
    return value


class StoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDSTORE_", env_file=".env", extra="ignore")

    backend: Literal["edge", "server"] = "edge"
    path: Path = Path("./data/store")
    url: str | None = None
    api_key: SecretStr | None = None
    collection: str = "items"
    shortlist: int = Field(100, ge=1, le=10_000)
    prefer_grpc: bool = True
    # the port qdrant-client dials for gRPC; the URL's port is the REST one (Qdrant: 6333 REST, 6334 gRPC)
    qdrant_grpc_port: int = Field(6334, ge=1, le=65535)
    timeout: int = Field(60, ge=1)
    shard_number: int = Field(1, ge=1)
    replication_factor: int = Field(1, ge=1)

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, value: str) -> str:
        return check_collection_name(value)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return check_server_url(value)

    @model_validator(mode="after")
    def _server_needs_url(self) -> StoreSettings:
        if self.backend == "server" and not self.url:
            raise ValueError("EMBEDSTORE_BACKEND=server needs EMBEDSTORE_URL (e.g. http://localhost:6333)")
        return self
