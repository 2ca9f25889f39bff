"""Embedder settings (environment prefix ``EMBEDSTORE_``, like the store's).

=================================  ====================================================
``EMBEDSTORE_IMAGE_MODEL``         ``efficientnet-lite0`` (default, offline) or ``efficientnet-b0``
``EMBEDSTORE_IMAGE_SIZE``          input size in pixels, a multiple of 32 (224)
``EMBEDSTORE_IMAGE_BACKEND``       ``auto`` (ONNX Runtime if installed), ``onnx`` or ``torch``
``EMBEDSTORE_IMAGE_WEIGHTS``       local weights file (B0 offline, or custom Lite0 weights)
``EMBEDSTORE_TEXT_MODEL``          local sentence-transformers model directory (default: all-MiniLM-L6-v2)
``EMBEDSTORE_PROJECTION``          directory of the fitted projection (``./data/projection``)
``EMBEDSTORE_THREADS``             intra-op threads for the models (default: min(4, CPUs))
``EMBEDSTORE_CACHE``               cache for exported models and datasets (``~/.cache/embedstore``)
=================================  ====================================================
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class EmbedderSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDSTORE_", env_file=".env", extra="ignore")

    image_model: Literal["efficientnet-lite0", "efficientnet-b0"] = "efficientnet-lite0"
    image_size: int = Field(224, ge=32, le=1024)
    image_backend: Literal["auto", "onnx", "torch"] = "auto"
    image_weights: Path | None = None
    text_model: Path | None = None
    projection: Path = Path("./data/projection")
    threads: int | None = Field(None, ge=1, le=256)

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"image size must be a multiple of 32, got {value}")
        return value


def check_tls_pair(cert: Path, key: Path) -> None:
    """Load the certificate chain and key as a TLS server does, so that a key that is not PEM, or that does not
    match the certificate, is named as such: grpc reported both as "cannot bind gRPC port ... Failed to bind"."""
    import ssl

    try:
        # an encrypted key would make OpenSSL prompt on the terminal: the empty password fails it instead
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"EMBEDSTORE_GRPC_TLS_CERT={cert} and EMBEDSTORE_GRPC_TLS_KEY={key} cannot be used: they must be a PEM "
            f"certificate chain and its matching, unencrypted private key ({exc.strerror or exc})"
        ) from None


class ServerSettings(BaseSettings):
    """gRPC server settings (environment prefix ``EMBEDSTORE_GRPC_``).

    ===================================  ==================================================
    ``EMBEDSTORE_GRPC_HOST``             interface to bind (``127.0.0.1``; ``0.0.0.0`` in containers)
    ``EMBEDSTORE_GRPC_PORT``             port (50051; 0 picks a free one)
    ``EMBEDSTORE_GRPC_TOKENS``           comma-separated bearer tokens; empty = no auth
    ``EMBEDSTORE_GRPC_TLS_CERT`` / _KEY  PEM certificate chain and private key: TLS on
    ``EMBEDSTORE_GRPC_MAX_MESSAGE_MB``   largest request/response message (64)
    ``EMBEDSTORE_GRPC_MAX_CONCURRENT``   RPCs in flight before RESOURCE_EXHAUSTED (256)
    ``EMBEDSTORE_GRPC_MAX_HEALTH_WATCHES`` open health ``Watch`` streams before RESOURCE_EXHAUSTED (1024)
    ``EMBEDSTORE_GRPC_MAX_BATCH``        items per model call (64)
    ``EMBEDSTORE_GRPC_MAX_DELAY_MS``     how long an idle batcher waits to fill a batch (2)
    ``EMBEDSTORE_GRPC_MAX_QUEUE``        items waiting to be embedded before RESOURCE_EXHAUSTED (4096)
    ``EMBEDSTORE_GRPC_METRICS_PORT``     Prometheus /metrics port (9464; 0 = off)
    ``EMBEDSTORE_GRPC_GRACE_S``          seconds in-flight calls get to finish on shutdown (10)
    ``EMBEDSTORE_GRPC_DRAIN_S``          seconds of NOT_SERVING health, still taking calls, before that (0)
    ``EMBEDSTORE_GRPC_STORE_WORKERS``    threads for store writes and large reads (4)
    ``EMBEDSTORE_GRPC_INLINE_READS``     small reads (top_k/ids <= 100) on the event loop (true)
    ``EMBEDSTORE_GRPC_RUNS_DIR``         where RunLabelingJob writes run directories (``./data/runs``)
    ``EMBEDSTORE_GRPC_LOG_LEVEL``        DEBUG, INFO (default), WARNING or ERROR
    ``EMBEDSTORE_GRPC_DASK_SCHEDULER``   the Dask scheduler ``xgboost_dask`` jobs use (none: a local cluster);
                                         a job's own config may not name one
    ===================================  ==================================================
    """

    model_config = SettingsConfigDict(env_prefix="EMBEDSTORE_GRPC_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_mb: int = Field(64, ge=1, le=2047)
    max_concurrent: int = Field(256, ge=1)
    # Health is exempt from the token and from max_concurrent (probes must answer a busy server), so without its
    # own cap anyone who could reach the port held memory with open Watch streams (~17 KB each: 5,000 = 86 MB).
    # A client channel with health checking on holds one stream, hence the generous default.
    max_health_watches: int = Field(1024, ge=1)
    max_batch: int = Field(64, ge=1, le=4096)
    max_delay_ms: float = Field(2.0, ge=0, le=1000)
    max_queue: int = Field(4096, ge=1)
    metrics_port: int = Field(9464, ge=0, le=65535)
    grace_s: float = Field(10.0, ge=0)
    # Behind a load balancer: on SIGTERM, health turns NOT_SERVING at once but calls are still taken for this long,
    # so the balancer sees the probe fail and routes away before the port closes (instead of a preStop sleep).
    drain_s: float = Field(0.0, ge=0, le=600)
    store_workers: int = Field(4, ge=1, le=64)
    inline_reads: bool = True
    runs_dir: Path = Path("./data/runs")
    dask_scheduler: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("host", mode="before")
    @classmethod
    def _host(cls, value: object) -> object:
        """An IP address (brackets around an IPv6 one are dropped) or a host name. "not a host" had reached the
        bind and come back as a port error naming EMBEDSTORE_GRPC_PORT."""
        if not isinstance(value, str):
            return value
        host = value.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            pass
        label = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
        if len(host.rstrip(".")) <= 253 and re.fullmatch(rf"{label}(?:\.{label})*\.?", host):
            return host
        raise ValueError(f"{value!r} is not an IP address or a host name (127.0.0.1, 0.0.0.0, ::, localhost, ...)")

    @field_validator("tls_cert", "tls_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # compose passes unset host variables on as "" (EMBEDSTORE_GRPC_TLS_CERT: ${EMBEDSTORE_GRPC_TLS_CERT:-}):
        # that is "no TLS", not a file named ""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            tokens = [t.strip() for t in value.split(",") if t.strip()]
            if value.strip() and not tokens:  # "," or ", ,": meant as tokens, would silently turn auth off
                raise ValueError("holds no token: give comma-separated tokens, or leave it empty for no auth")
            for t in tokens:
                # what a metadata value can carry (printable ASCII, no spaces), less quotes and brackets: a JSON
                # list ('["a","b"]') became tokens with its brackets and quotes, which no client sends
                if not re.fullmatch(r"""[!#-&(-Z\\^-~]+""", t):
                    raise ValueError(
                        "a token is printable ASCII without spaces, quotes or brackets; separate tokens with commas"
                    )
            return tokens
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both EMBEDSTORE_GRPC_TLS_CERT and EMBEDSTORE_GRPC_TLS_KEY")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")
        if self.tls_cert is not None and self.tls_key is not None:
            check_tls_pair(self.tls_cert, self.tls_key)
        if self.max_queue < self.max_batch:
            raise ValueError("EMBEDSTORE_GRPC_MAX_QUEUE must be >= EMBEDSTORE_GRPC_MAX_BATCH")
        return self

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def address(self) -> str:
        """``host:port`` as grpc binds it: an IPv6 address in brackets (``[::]:50051``; ``:::50051`` failed)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
