"""Fusion of image and text features, and the trained Matryoshka projection to 512D.

Fusion (:class:`FeatureSpace`)
    ``[image block (1280) | text block (text dim) | has_image | has_text]``.
    Each block is standardised per dimension with statistics of the training
    items that have that modality, then scaled so its expected squared norm is
    1 (so neither modality dominates by size). A missing modality is an all-zero
    block plus a 0 flag: the projection's weights on the flag columns act as a
    learned "missing image" / "missing text" embedding, so an item with one
    modality lands where such items lie in training, not at a garbage point.

Projection (:class:`MatryoshkaProjection`)
    ``Linear(in_dim -> 512)``; the nested views {128, 256, 512} are prefixes of
    the output, each L2-normalised. Trained with the Matryoshka loss: for each
    nested size m, a supervised term (a cosine-softmax classifier head per m on
    the labeled items) plus an unsupervised neighbourhood-preservation term on all
    items (the softmax over in-batch similarities of the m-prefix must match that
    of the input features: a SNE-style KL), so the projection keeps the encoder's
    structure where there are few labels. PCA initialisation (optional, default
    on) starts from the principal directions, which are ordered by variance: a
    natural Matryoshka start.

Artefact (:class:`ProjectionArtifact`)
    A directory with ``projection.safetensors`` (weights and feature statistics)
    and ``projection.json`` (encoders, dims, training data hash, config, history,
    and a version id derived from the weights). Every stored point records the
    version; the pipeline refuses to mix versions in one collection.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedder.errors import EmbedderError, ProjectionNotFittedError

NESTED_DIMS: tuple[int, ...] = (128, 256, 512)
FORMAT = "embedstore-projection"
FORMAT_VERSION = 1


# --------------------------------------------------------------------- fusion
@dataclass
class RawFeatures:
    """Encoder outputs for a batch of items; rows of a missing modality are zeros with a False flag."""

    image: np.ndarray  # (n, image_dim) float32
    text: np.ndarray  # (n, text_dim) float32
    has_image: np.ndarray  # (n,) bool
    has_text: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def take(self, idx: Any) -> RawFeatures:
        return RawFeatures(self.image[idx], self.text[idx], self.has_image[idx], self.has_text[idx])

    @classmethod
    def concat(cls, parts: Sequence[RawFeatures]) -> RawFeatures:
        return cls(
            np.concatenate([p.image for p in parts]),
            np.concatenate([p.text for p in parts]),
            np.concatenate([p.has_image for p in parts]),
            np.concatenate([p.has_text for p in parts]),
        )

    def raw_concat(self) -> np.ndarray:
        """The plain concatenation [image | text] (zeros where missing): the 'raw' baseline."""
        return np.concatenate([self.image, self.text], axis=1).astype(np.float32)


@dataclass
class FeatureSpace:
    """Per-modality standardisation statistics, fitted on training items."""

    image_mean: np.ndarray
    image_std: np.ndarray
    text_mean: np.ndarray
    text_std: np.ndarray

    @property
    def image_dim(self) -> int:
        return int(self.image_mean.shape[0])

    @property
    def text_dim(self) -> int:
        return int(self.text_mean.shape[0])

    @property
    def in_dim(self) -> int:
        return self.image_dim + self.text_dim + 2

    @property
    def fitted_modalities(self) -> tuple[str, ...]:
        """The modalities the training items had (a modality absent from them keeps identity statistics,
        and the projection learned nothing from it: its block of the input is noise to the weights)."""

        def fitted(mean: np.ndarray, std: np.ndarray) -> bool:
            return bool(np.any(mean != 0.0) or np.any(std != 1.0))

        return tuple(
            m
            for m, on in (
                ("image", fitted(self.image_mean, self.image_std)),
                ("text", fitted(self.text_mean, self.text_std)),
            )
            if on
        )

    @classmethod
    def fit(cls, raw: RawFeatures) -> FeatureSpace:
        def stats(block: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            rows = block[present]
            if len(rows) < 2:  # modality absent from training: identity statistics
                return np.zeros(block.shape[1], np.float32), np.ones(block.shape[1], np.float32)
            mean = rows.mean(axis=0)
            std = rows.std(axis=0)
            floor = max(1e-6, float(np.median(std)) * 1e-3)
            return mean.astype(np.float32), np.maximum(std, floor).astype(np.float32)

        im, istd = stats(raw.image, raw.has_image)
        tm, tstd = stats(raw.text, raw.has_text)
        return cls(im, istd, tm, tstd)

    def fuse(self, raw: RawFeatures) -> np.ndarray:
        """(n, in_dim) float32 fused input of the projection."""
        if raw.image.shape[1] != self.image_dim or raw.text.shape[1] != self.text_dim:
            raise EmbedderError(
                f"features have image/text dims {raw.image.shape[1]}/{raw.text.shape[1]}, but this projection "
                f"was trained on {self.image_dim}/{self.text_dim}: the encoders differ from the ones it was fitted with"
            )
        img = (raw.image - self.image_mean) / self.image_std / math.sqrt(self.image_dim)
        txt = (raw.text - self.text_mean) / self.text_std / math.sqrt(self.text_dim)
        img = np.where(raw.has_image[:, None], img, 0.0)
        txt = np.where(raw.has_text[:, None], txt, 0.0)
        flags = np.stack([raw.has_image, raw.has_text], axis=1).astype(np.float32)
        return np.concatenate([img, txt, flags], axis=1).astype(np.float32)


# ------------------------------------------------------------------ projection
def nested_views(z: np.ndarray, dims: Sequence[int] = NESTED_DIMS) -> dict[int, np.ndarray]:
    """{m: L2-normalised z[:, :m]} for each nested size."""
    out = {}
    for m in dims:
        head = z[:, :m]
        norms = np.linalg.norm(head, axis=1, keepdims=True)
        out[m] = (head / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


@dataclass
class TrainConfig:
    """How a projection is trained. Defaults are general, not tuned to one dataset."""

    out_dim: int = 512
    nested_dims: tuple[int, ...] = NESTED_DIMS
    dim_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # c_m in the MRL loss
    supervised_weight: float = 1.0
    unsupervised_weight: float = 1.0
    temperature: float = 0.1  # of the cosine-softmax heads and the neighbourhood term
    pca_init: bool = True
    epochs: int = 200
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-2  # AdamW's usual default
    val_fraction: float = 0.1
    patience: int = 15
    seed: int = 0
    # Share of the training items with both an image and a text whose image or text (one of the two, at random)
    # is hidden in each training step, the neighbourhood target staying the whole item's: the missing-modality
    # flag columns only learn where a lone image or a lone text belongs when some items lack one. Without it, on
    # emoji (every item has both) a text query ranked the image-only point of its own emoji in the top 10 of a
    # mixed store 16-19% of the time, 80-82% with 0.3 (3 seeds; held-out kNN of image+text vectors moved
    # 0.0 to +2.4 points). 0 turns it off.
    modality_dropout: float = 0.3

    def __post_init__(self) -> None:
        self.nested_dims = tuple(int(d) for d in self.nested_dims)
        self.dim_weights = tuple(float(w) for w in self.dim_weights)
        if list(self.nested_dims) != sorted(set(self.nested_dims)) or self.nested_dims[-1] != self.out_dim:
            raise ValueError(f"nested_dims must increase and end at out_dim={self.out_dim}, got {self.nested_dims}")
        if len(self.dim_weights) != len(self.nested_dims):
            raise ValueError("dim_weights needs one weight per nested dim")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")


@dataclass
class ProjectionArtifact:
    """A fitted projection: feature statistics, weights, and what it was made from."""

    space: FeatureSpace
    weight: np.ndarray  # (out_dim, in_dim)
    bias: np.ndarray  # (out_dim,)
    nested_dims: tuple[int, ...] = NESTED_DIMS
    encoders: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    @property
    def out_dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def version(self) -> str:
        """Content hash of everything that determines the vectors: weights, statistics, encoders."""
        h = hashlib.sha256()
        for arr in (self.weight, self.bias, self.space.image_mean, self.space.image_std,
                    self.space.text_mean, self.space.text_std):  # fmt: skip
            h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
        h.update(json.dumps(self.encoders, sort_keys=True).encode())
        return "mrl-" + h.hexdigest()[:12]

    def project(self, raw: RawFeatures, dims: int | None = None) -> np.ndarray:
        """Unit-norm (n, dims) Matryoshka vectors (default: all out_dim dims)."""
        dims = dims or self.out_dim
        if dims not in self.nested_dims:
            raise EmbedderError(f"dims must be one of {self.nested_dims}, got {dims}")
        z = self.space.fuse(raw) @ self.weight.T + self.bias
        return nested_views(z, (dims,))[dims]

    def project_views(self, raw: RawFeatures, dims: Sequence[int]) -> dict[int, np.ndarray]:
        """Unit-norm views for several prefix lengths from one projection (e.g. a batch of mixed requests)."""
        bad = [d for d in dims if d not in self.nested_dims]
        if bad:
            raise EmbedderError(f"dims must be in {self.nested_dims}, got {bad}")
        z = self.space.fuse(raw) @ self.weight.T + self.bias
        return nested_views(z, tuple(sorted(set(dims))))

    # ------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            "weight": self.weight.astype(np.float32),
            "bias": self.bias.astype(np.float32),
            "image_mean": self.space.image_mean,
            "image_std": self.space.image_std,
            "text_mean": self.space.text_mean,
            "text_std": self.space.text_std,
        }
        save_file(tensors, str(path / "projection.safetensors"))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "created_at": self.created_at or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "in_dim": self.space.in_dim,
            "out_dim": self.out_dim,
            "nested_dims": list(self.nested_dims),
            "fusion": {
                "layout": ["image", "text", "has_image", "has_text"],
                "image_dim": self.space.image_dim,
                "text_dim": self.space.text_dim,
                "missing_modality": "zero block + flag column",
            },
            "encoders": self.encoders,
            "training": self.training,
        }
        (path / "projection.json").write_text(json.dumps(meta, indent=2) + "\n")
        # safetensors writes its file 0600: a service running as another user (the image's uid 10001, with the
        # folder mounted read-only) could not read it. It gets the mode the umask gives the json beside it.
        os.chmod(path / "projection.safetensors", (path / "projection.json").stat().st_mode & 0o777)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ProjectionArtifact:
        from safetensors.numpy import load_file

        path = Path(directory)
        meta_path, weights_path = path / "projection.json", path / "projection.safetensors"
        if not meta_path.is_file() or not weights_path.is_file():
            # `fit-projection --force` moves the old projection aside before moving the new one in; killed
            # between the two renames, it leaves the old one hidden beside the path, and a new fit would make
            # every indexed collection need a reindex
            aside = sorted(
                (d for d in path.parent.glob(f".{path.name}.old-*") if (d / "projection.json").is_file()),
                key=lambda d: d.stat().st_mtime,
            )
            if aside:
                raise ProjectionNotFittedError(
                    f"no projection at {path}, but an interrupted `embedstore fit-projection --force` left the "
                    f"previous one at {aside[-1]}: move it back (`mv {aside[-1]} {path}`) to keep using it"
                )
            raise ProjectionNotFittedError(
                f"no projection at {path} (expected projection.json and projection.safetensors); "
                "train one with `embedstore fit-projection`"
            )
        damaged = f"the projection at {path} is damaged"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:  # ValueError: JSON and UTF-8 decoding
            raise EmbedderError(f"{damaged}: {meta_path} cannot be read ({exc}); fit it again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise EmbedderError(f"{meta_path} is not an {FORMAT} v{FORMAT_VERSION} artefact")
        try:
            t = load_file(str(weights_path))
            art = cls(
                space=FeatureSpace(t["image_mean"], t["image_std"], t["text_mean"], t["text_std"]),
                weight=t["weight"],
                bias=t["bias"],
                nested_dims=tuple(int(d) for d in meta["nested_dims"]),
                encoders=meta.get("encoders", {}),
                training=meta.get("training", {}),
                created_at=meta.get("created_at", ""),
            )
        except Exception as exc:  # safetensors' own error on a truncated file, a missing tensor or field
            raise EmbedderError(f"{damaged}: {type(exc).__name__}: {exc}; fit it again") from None
        # shapes the version hash does not cover: dims promised by the json, widths the statistics imply
        dims = art.nested_dims
        if not dims or list(dims) != sorted(set(dims)) or dims[-1] != art.weight.shape[0] or dims[0] < 1:
            raise EmbedderError(
                f"{damaged}: nested_dims {list(dims)} do not end at the weights' {art.weight.shape[0]} outputs"
            )
        if art.weight.ndim != 2 or art.weight.shape[1] != art.space.in_dim or art.bias.shape != (art.weight.shape[0],):
            raise EmbedderError(
                f"{damaged}: weights {art.weight.shape} / bias {art.bias.shape} do not fit the {art.space.in_dim} "
                "fused input dims of its feature statistics"
            )
        if art.version != meta.get("version"):
            raise EmbedderError(
                f"{path}: weights do not match the recorded version {meta.get('version')} (got {art.version}); "
                "the artefact was modified or is corrupt"
            )
        return art


def data_hash(raw: RawFeatures, labels: Sequence[str | None]) -> str:
    """A fingerprint of the training data (features and labels)."""
    h = hashlib.sha256()
    for arr in (raw.image, raw.text, raw.has_image, raw.has_text):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(json.dumps([None if v is None else str(v) for v in labels]).encode())
    return h.hexdigest()


# -------------------------------------------------------------------- training
def fit_projection(
    raw: RawFeatures,
    labels: Sequence[str | None] | None = None,
    config: TrainConfig | None = None,
    *,
    encoders: dict[str, Any] | None = None,
    progress: bool = True,
) -> ProjectionArtifact:
    """Train a Matryoshka projection on ``raw`` features.

    ``labels`` (same length; None for unlabeled items) feed the supervised term;
    without any labels only the unsupervised term trains. Seeded and
    reproducible; stops early on a held-out validation split.
    """
    import torch

    config = config or TrainConfig()
    n = len(raw)
    labels = list(labels) if labels is not None else [None] * n
    if len(labels) != n:
        raise EmbedderError(f"got {n} feature rows but {len(labels)} labels")
    if n < 20:
        raise EmbedderError(f"need at least 20 items to train a projection, got {n}")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)

    classes = sorted({str(v) for v in labels if v is not None})
    class_index = {c: i for i, c in enumerate(classes)}
    y = np.array([class_index[str(v)] if v is not None else -1 for v in labels], dtype=np.int64)

    order = rng.permutation(n)
    n_val = max(1, round(config.val_fraction * n))
    val_idx, train_idx = order[:n_val], order[n_val:]

    space = FeatureSpace.fit(raw.take(train_idx))
    x = space.fuse(raw)
    in_dim = x.shape[1]
    out_dim = config.out_dim

    model = torch.nn.Linear(in_dim, out_dim)
    if config.pca_init:
        _pca_init(model, x[train_idx], rng)
    heads = torch.nn.ModuleList([torch.nn.Linear(m, max(1, len(classes)), bias=False) for m in config.nested_dims])
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    supervised = len(classes) >= 2 and config.supervised_weight > 0
    both = raw.has_image.astype(bool) & raw.has_text.astype(bool)
    img_cols = torch.zeros(in_dim, dtype=torch.bool)
    img_cols[: space.image_dim] = True
    img_cols[-2] = True
    txt_cols = torch.zeros(in_dim, dtype=torch.bool)
    txt_cols[space.image_dim : space.image_dim + space.text_dim] = True
    txt_cols[-1] = True
    drop_gen = torch.Generator().manual_seed(config.seed)

    def hide_a_modality(idx: np.ndarray, xb: torch.Tensor) -> torch.Tensor:
        """The batch's input with the image or the text (and its flag) of some two-modality items zeroed."""
        eligible = torch.from_numpy(both[idx])
        hide = eligible & (torch.rand(len(idx), generator=drop_gen) < config.modality_dropout)
        if not bool(hide.any()):
            return xb
        image_side = torch.rand(len(idx), generator=drop_gen) < 0.5
        mask = torch.where(image_side[:, None], img_cols[None, :], txt_cols[None, :]) & hide[:, None]
        return xb.masked_fill(mask, 0.0)

    def loss_on(idx: np.ndarray, augment: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        xb, yb = xt[idx], yt[idx]
        # the neighbourhood target stays the full item's: a hidden modality must land where the whole item does
        z = model(hide_a_modality(idx, xb) if augment and config.modality_dropout > 0 else xb)
        target_sim = _cosine(xb[:, :-2]) / config.temperature  # neighbourhoods of the input features
        eye = torch.eye(len(idx), dtype=torch.bool)
        p_target = torch.softmax(target_sim.masked_fill(eye, -1e9), dim=1)
        total = torch.zeros(())
        parts: dict[str, float] = {}
        for m, c_m, head in zip(config.nested_dims, config.dim_weights, heads, strict=True):
            zm = torch.nn.functional.normalize(z[:, :m], dim=1)
            if config.unsupervised_weight > 0:
                log_q = torch.log_softmax((zm @ zm.T / config.temperature).masked_fill(eye, -1e9), dim=1)
                kl = (p_target * (torch.log(p_target + 1e-12) - log_q)).sum(dim=1).mean()
                total = total + c_m * config.unsupervised_weight * kl
                parts[f"unsup_{m}"] = float(kl.detach())
            labeled = yb >= 0
            if supervised and bool(labeled.any()):
                w = torch.nn.functional.normalize(head.weight, dim=1)
                logits = zm[labeled] @ w.T / config.temperature
                ce = torch.nn.functional.cross_entropy(logits, yb[labeled])
                total = total + c_m * config.supervised_weight * ce
                parts[f"sup_{m}"] = float(ce.detach())
        return total, parts

    history: list[dict[str, float]] = []
    best = (math.inf, -1, None)
    bar = _progress(progress, config.epochs)
    for epoch in range(config.epochs):
        model.train()
        perm = rng.permutation(train_idx)
        for start in range(0, len(perm), config.batch_size):
            idx = perm[start : start + config.batch_size]
            if len(idx) < 4:
                continue
            opt.zero_grad()
            loss, _ = loss_on(idx, augment=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_loss, parts = _mean_loss(loss_on, val_idx, config.batch_size)
            train_loss, _ = _mean_loss(loss_on, train_idx[: max(len(val_idx) * 4, 512)], config.batch_size)
        # Stop on the held-out labels' loss when there are labels (what overfits is the
        # supervised term; the unsupervised one keeps falling), else on the whole loss.
        sup = [v for k, v in parts.items() if k.startswith("sup_")]
        monitor = sum(sup) if sup else val_loss
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "monitor": monitor, **parts})
        if monitor < best[0] - 1e-5:
            best = (monitor, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        bar.update(epoch, val_loss)
        if epoch - best[1] >= config.patience:
            break
    bar.close()
    assert best[2] is not None
    model.load_state_dict(best[2])

    cfg = asdict(config)
    return ProjectionArtifact(
        space=space,
        weight=model.weight.detach().numpy().astype(np.float32),
        bias=model.bias.detach().numpy().astype(np.float32),
        nested_dims=config.nested_dims,
        encoders=encoders or {},
        training={
            "data_sha256": data_hash(raw, labels),
            "n_items": n,
            "n_labeled": int((y >= 0).sum()),
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "classes": classes,
            "config": cfg,
            "epochs_run": len(history),
            "best_epoch": best[1],
            "best_monitor": best[0],
            "history": history,
        },
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )


def _cosine(x: Any) -> Any:
    import torch

    xn = torch.nn.functional.normalize(x, dim=1)
    return xn @ xn.T


def _mean_loss(loss_on: Any, idx: np.ndarray, batch: int) -> tuple[float, dict[str, float]]:
    total, weight = 0.0, 0
    parts: dict[str, float] = {}
    for start in range(0, len(idx), batch):
        chunk = idx[start : start + batch]
        if len(chunk) < 4:
            continue
        loss, p = loss_on(chunk)
        total += float(loss) * len(chunk)
        weight += len(chunk)
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v * len(chunk)
    weight = max(weight, 1)
    return total / weight, {k: v / weight for k, v in parts.items()}


def _pca_init(model: Any, x: np.ndarray, rng: np.random.Generator) -> None:
    """Rows of the weight = principal directions of ``x`` in order of variance (random where there are too few)."""
    import torch

    out_dim, in_dim = model.weight.shape
    centred = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(out_dim, vt.shape[0])
    w = rng.normal(scale=1e-3, size=(out_dim, in_dim)).astype(np.float32)
    # scale each direction by its singular value so the prefix keeps the variance ordering
    scale = s[:k] / max(float(s[0]), 1e-12)
    w[:k] = vt[:k] * scale[:, None] * math.sqrt(in_dim)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w))
        model.bias.copy_(torch.from_numpy(-(x.mean(axis=0) @ w.T).astype(np.float32)))


class _progress:
    """A Rich progress bar over epochs (or nothing)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import Progress

            self.bar = Progress(transient=False)
            self.task = self.bar.add_task("training projection", total=total)
            self.bar.start()

    def update(self, epoch: int, val_loss: float) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task, completed=epoch + 1, description=f"training projection (val loss {val_loss:.4f})"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
