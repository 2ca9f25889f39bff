"""Key pool settings (environment prefix ``EMBEDSTORE_``).

================================  =========================================================
``EMBEDSTORE_REDIS_URL``          ``redis://localhost:6379/0``; ``rediss://`` (TLS) and passwords work
``EMBEDSTORE_KEY_SECRET``         optional: encrypt raw API keys at rest in Redis (Fernet)
``EMBEDSTORE_KEY_BACKOFF_BASE_S`` first cooldown of a rate-limited key without a reset header (60)
``EMBEDSTORE_KEY_BACKOFF_CAP_S``  longest such cooldown (3600, the article's one hour)
================================  =========================================================
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class KeyPoolSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDSTORE_", env_file=".env", extra="ignore")

    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    key_secret: SecretStr | None = None
    key_backoff_base_s: float = Field(60.0, gt=0)
    key_backoff_cap_s: float = Field(3600.0, gt=0)

    def pool(self, name: str):  # -> KeyPool
        from embedder.ingest.keypool import KeyPool

        return KeyPool(
            name,
            self.redis_url.get_secret_value(),
            secret=self.key_secret.get_secret_value() if self.key_secret else "",
            backoff_base_s=self.key_backoff_base_s,
            backoff_cap_s=self.key_backoff_cap_s,
        )
