"""Key pool settings (environment prefix ``EMBEDSTORE_``).

================================  =========================================================
``EMBEDSTORE_REDIS_URL``          ``redis://localhost:6379/0``; ``rediss://`` (TLS) and passwords work
``EMBEDSTORE_KEY_SECRET``         optional: encrypt raw API keys at rest in Redis (Fernet)
``EMBEDSTORE_KEY_BACKOFF_BASE_S`` first cooldown of a rate-limited key without a reset header (60)
``EMBEDSTORE_KEY_BACKOFF_CAP_S``  longest such cooldown (3600, the article's one hour)
================================  =========================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # imported where used: settings load without redis
    from embedder.ingest.keypool import KeyPool


class KeyPoolSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDSTORE_", env_file=".env", extra="ignore")

    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    key_secret: SecretStr | None = None
    key_backoff_base_s: float = Field(60.0, gt=0)
    key_backoff_cap_s: float = Field(3600.0, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        # redis-py's own message ("Redis URL must specify one of the following schemes") named no variable;
        # the value itself may carry a password, so it is not echoed back
        scheme = value.get_secret_value().strip().partition("://")[0].lower()
        if "://" not in value.get_secret_value() or scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a URL such as redis://localhost:6379/0 (scheme redis://, rediss:// or unix://)")
        return value

    def pool(self, name: str) -> KeyPool:
        """The key pool ``name`` in this Redis, with these secret and back-off settings."""
        from embedder.ingest.keypool import KeyPool

        return KeyPool(
            name,
            self.redis_url.get_secret_value(),
            secret=self.key_secret.get_secret_value() if self.key_secret else "",
            backoff_base_s=self.key_backoff_base_s,
            backoff_cap_s=self.key_backoff_cap_s,
        )
