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

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
