"""A disk cache of raw encoder features (memory-mapped numpy), kept out of Qdrant.

Training a projection, benchmarking it and re-indexing with a new one all need
the 1280D image / text features of the same items again and again; encoding
is the slow part. The cache is keyed by a name and the encoders' signatures,
so features from other encoders are never mixed in.

Layout: ``<root>/<name>-<encoders hash>/{image,text,has_image,has_text}.npy`` plus
``ids.json`` and ``meta.json``; arrays are opened with ``mmap_mode="r"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedder.encoders import cache_dir
from embedder.projection import RawFeatures

_ARRAYS = ("image", "text", "has_image", "has_text")


def encoders_key(signatures: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signatures, sort_keys=True).encode()).hexdigest()[:12]


class FeatureCache:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "features"

    def path(self, name: str, signatures: dict[str, Any]) -> Path:
        return self.root / f"{name}-{encoders_key(signatures)}"

    def load(self, name: str, signatures: dict[str, Any], ids: Sequence[str]) -> RawFeatures | None:
        """Cached features of exactly these ids (in this order), or None."""
        path = self.path(name, signatures)
        try:
            cached_ids = json.loads((path / "ids.json").read_text())
        except (OSError, ValueError):
            return None
        if cached_ids != list(ids):
            return None
        arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in _ARRAYS}
        return RawFeatures(**arrays)

    def save(self, name: str, signatures: dict[str, Any], ids: Sequence[str], raw: RawFeatures) -> Path:
        path = self.path(name, signatures)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k in _ARRAYS:
            np.save(tmp / f"{k}.npy", np.ascontiguousarray(getattr(raw, k)))
        (tmp / "ids.json").write_text(json.dumps(list(ids)))
        (tmp / "meta.json").write_text(json.dumps({"name": name, "encoders": signatures, "n": len(ids)}, indent=2))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return path

    def get_or_compute(
        self,
        name: str,
        signatures: dict[str, Any],
        ids: Sequence[str],
        compute: Callable[[], RawFeatures],
    ) -> RawFeatures:
        cached = self.load(name, signatures, ids)
        if cached is not None:
            return cached
        raw = compute()
        self.save(name, signatures, ids, raw)
        return raw
