"""Datasets for the study, read from local files only (no network, ever).

* ``digits`` — scikit-learn's bundled 8×8 digits (1,797 images, values 0–16), split
  into train/test with a fixed seed, stratified by class (20% test).
* ``mnist`` / ``fashion-mnist`` — the four IDX files (gzipped or not). Without a data
  directory, Fashion-MNIST is also looked for where Debian's ``dataset-fashion-mnist``
  package installs the real files (:data:`SYSTEM_DATA_DIRS`).
* ``cifar10`` / ``cifar100`` — the official *binary* files. The "python version" of
  CIFAR is a pickle and is never read: unpickling runs arbitrary code.
* ``synthetic`` — a small deterministic image set of CIFAR shape (3×32×32, 10 classes)
  for quick runs without downloads.

Images are kept as ``uint8`` tensors (N, C, H, W); :meth:`Dataset.inputs` turns a batch
into floats in [0, 1] (``value · scale``), optionally standardized per channel with
the training set's mean and standard deviation.

Every problem with a file (missing, truncated, corrupt, wrong format) raises
:class:`DataError` naming the file and what was wrong.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "make_synthetic",
    "read_cifar_binary",
    "read_idx",
]


class DataError(ValueError):
    """A dataset file is missing, truncated or not in the expected format."""


@dataclass
class Dataset:
    """Train and test images (uint8, (N, C, H, W)) with int64 labels (N,).

    ``scale`` maps the stored integers to [0, 1]; ``mean``/``std`` (per channel, of the
    training images after scaling) are used when :meth:`inputs` standardizes.
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    scale: float
    mean: Tensor = field(init=False)
    std: Tensor = field(init=False)

    def __post_init__(self) -> None:
        x = self.train_images.to(torch.float64) * self.scale
        self.mean = x.mean(dim=(0, 2, 3)).to(torch.float32)
        self.std = x.std(dim=(0, 2, 3)).clamp_min(1e-6).to(torch.float32)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_images.shape[1:]
        return int(c), int(h), int(w)

    def inputs(self, images: Tensor, standardize: bool = False) -> Tensor:
        """uint8 images (N, C, H, W) → float32 in [0, 1], or standardized per channel."""
        x = images.to(torch.float32) * self.scale
        if standardize:
            x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return x

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "train": int(self.train_labels.shape[0]),
            "test": int(self.test_labels.shape[0]),
            "classes": self.num_classes,
            "shape": list(self.image_shape),
        }


# ----------------------------------------------------------------------------- digits


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (images (1797, 8, 8) uint8, labels (1797,)).

    Read straight from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``:
    64 pixel values 0–16 then the label, per row), which spares importing scikit-learn
    (about a second); through ``sklearn.datasets.load_digits`` if the file is elsewhere.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataError("the digits dataset needs scikit-learn (install bnorm[study])")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8).astype(np.uint8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sk_load_digits  # pragma: no cover

    bunch = sk_load_digits()  # pragma: no cover
    return np.asarray(bunch.images, dtype=np.uint8), np.asarray(
        bunch.target, dtype=np.int64
    )  # pragma: no cover


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits, stratified train/test split with a fixed seed."""
    images_np, labels_np = _digits_arrays()
    images = torch.from_numpy(images_np).unsqueeze(1)
    labels = torch.from_numpy(labels_np)
    gen = torch.Generator().manual_seed(split_seed)
    test_idx: list[Tensor] = []
    train_idx: list[Tensor] = []
    for c in range(10):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_test = round(test_fraction * len(members))
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    tr = torch.cat(train_idx).sort().values
    te = torch.cat(test_idx).sort().values
    return Dataset("digits", images[tr], labels[tr], images[te], labels[te], 10, 1.0 / 16.0)


# -------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.dtype(np.uint8)}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by magic number, whatever its name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: corrupt or truncated gzip data ({err})") from None
    return raw


def read_idx(path: str | Path, expected_ndim: int) -> np.ndarray:
    """An IDX file (MNIST's format) as a uint8 array.

    Layout: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions
    d, then d big-endian uint32 sizes, then the values in row-major order. So the magic
    number is 0x00000801 for a label file (d = 1) and 0x00000803 for images (d = 3).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(
            f"{path}: truncated IDX file ({len(raw)} bytes, expected a 4-byte magic number)"
        )
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{path}: not an IDX file (expected magic number 0x0000080{expected_ndim} "
            f"got 0x{raw[:4].hex()})"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(
            f"{path}: unsupported IDX value type 0x{type_code:02x} (expected 0x08, unsigned bytes)"
        )
    if ndim != expected_ndim:
        raise DataError(
            f"{path}: expected a {expected_ndim}-dimensional IDX file (got {ndim} dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: the header promises {'×'.join(map(str, dims))} = {expected} "
            f"values (got {got} bytes)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# Where the data files are looked for when no data directory is given.
DEFAULT_DATA_DIR = Path("data")
# Further directories searched when no data directory is given: the system-wide copies
# of OS packages (Debian/Ubuntu: ``apt-get install dataset-fashion-mnist``).
SYSTEM_DATA_DIRS: dict[str, Path] = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
# How to get a dataset's files without a download by hand, for the "file not found" error.
INSTALL_HINTS: dict[str, str] = {
    "fashion-mnist": "install the real files with `apt-get install dataset-fashion-mnist` "
    "(Debian/Ubuntu; they go to /usr/share/datasets/fashion-mnist), or pass --data-dir DIR",
}


def _find(
    data_dir: Path,
    names: Sequence[str],
    subdirs: Sequence[str],
    extra_dirs: Sequence[Path] = (),
    hint: str | None = None,
) -> Path:
    """The first existing ``dir/name`` over ``data_dir``, its ``subdirs``, then
    ``extra_dirs``; else a :class:`DataError` saying where it looked (and ``hint``)."""
    dirs = [data_dir, *(data_dir / s for s in subdirs), *extra_dirs]
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    looked = ", ".join(str(d) for d in dirs)
    message = f"{data_dir / names[0]}: file not found (looked for {' or '.join(names)} in {looked})"
    raise DataError(message + (f"; {hint}" if hint else ""))


def load_mnist(data_dir: str | Path | None, name: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST from the four IDX files (``.gz`` or not) in ``data_dir``
    (or its ``mnist/``, ``MNIST/raw/``, ``fashion-mnist/``, ``FashionMNIST/raw/``).
    ``data_dir=None``: :data:`DEFAULT_DATA_DIR` (and its subdirectories), then the
    dataset's :data:`SYSTEM_DATA_DIRS` entry."""
    extra: tuple[Path, ...] = ()
    if data_dir is None:
        data_dir = DEFAULT_DATA_DIR
        extra = (SYSTEM_DATA_DIRS[name],) if name in SYSTEM_DATA_DIRS else ()
    data_dir = Path(data_dir)
    subdirs = (
        ("mnist", "MNIST/raw") if name == "mnist" else ("fashion-mnist", "FashionMNIST/raw")
    )
    arrays: dict[str, np.ndarray] = {}
    paths: dict[str, Path] = {}
    for key, base in _MNIST_FILES.items():
        paths[key] = _find(data_dir, (base, base + ".gz"), subdirs, extra, INSTALL_HINTS.get(name))
        arrays[key] = read_idx(paths[key], 3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        n_img = arrays[f"{split}_images"].shape[0]
        n_lab = arrays[f"{split}_labels"].shape[0]
        if n_img != n_lab:
            raise DataError(
                f"{paths[f'{split}_labels']}: expected {n_img} labels to match "
                f"{paths[f'{split}_images'].name} (got {n_lab})"
            )
        labels = arrays[f"{split}_labels"]
        if labels.size and labels.max() > 9:
            raise DataError(
                f"{paths[f'{split}_labels']}: expected labels 0–9 (got {int(labels.max())})"
            )

    def images(key: str) -> Tensor:
        return torch.from_numpy(arrays[key].copy()).unsqueeze(1)

    def labels_of(key: str) -> Tensor:
        return torch.from_numpy(arrays[key].astype(np.int64))

    return Dataset(
        name,
        images("train_images"),
        labels_of("train_labels"),
        images("test_images"),
        labels_of("test_labels"),
        10,
        1.0 / 255.0,
    )


# ------------------------------------------------------------------------------ CIFAR

_CIFAR_PIXELS = 3 * 32 * 32


def read_cifar_binary(
    path: str | Path, label_bytes: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR binary file → (images uint8 (N, 3, 32, 32), labels int64 (N,)).

    Each record is ``label_bytes`` label bytes (CIFAR-10: the label; CIFAR-100: coarse
    then fine label — the last one is returned) followed by 3,072 pixel bytes: the 1,024
    red values, then green, then blue, each a row-major 32×32 plane.
    """
    path = Path(path)
    raw = _read_bytes(path)
    record = label_bytes + _CIFAR_PIXELS
    if len(raw) == 0:
        raise DataError(f"{path}: empty file (expected {record}-byte records)")
    if len(raw) % record:
        raise DataError(
            f"{path}: truncated or not a CIFAR binary file: {len(raw)} bytes is not a whole "
            f"number of {record}-byte records"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = records[:, label_bytes - 1].astype(np.int64)
    if labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DataError(
            f"{path}: record {bad} has label {int(labels[bad])} (expected 0–{num_classes - 1}); "
            "is this the right dataset?"
        )
    if label_bytes == 2 and records[:, 0].max() >= 20:
        raise DataError(f"{path}: coarse labels above 19: not a CIFAR-100 binary file")
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _load_cifar(
    data_dir: Path,
    name: str,
    train_files: Sequence[str],
    test_file: str,
    subdir: str,
    label_bytes: int,
    num_classes: int,
) -> Dataset:
    def read(files: Sequence[str]) -> tuple[Tensor, Tensor]:
        parts = [
            read_cifar_binary(_find(data_dir, (f, f + ".gz"), (subdir,)), label_bytes, num_classes)
            for f in files
        ]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(images), torch.from_numpy(labels)

    train_x, train_y = read(train_files)
    test_x, test_y = read([test_file])
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes, 1.0 / 255.0)


def load_cifar10(data_dir: str | Path) -> Dataset:
    """CIFAR-10 from ``data_batch_1.bin`` … ``data_batch_5.bin`` and ``test_batch.bin``
    in ``data_dir`` (or ``data_dir/cifar-10-batches-bin``)."""
    files = [f"data_batch_{i}.bin" for i in range(1, 6)]
    return _load_cifar(
        Path(data_dir), "cifar10", files, "test_batch.bin", "cifar-10-batches-bin", 1, 10
    )


def load_cifar100(data_dir: str | Path) -> Dataset:
    """CIFAR-100 (fine labels) from ``train.bin`` and ``test.bin`` in ``data_dir`` (or
    ``data_dir/cifar-100-binary``)."""
    return _load_cifar(
        Path(data_dir), "cifar100", ["train.bin"], "test.bin", "cifar-100-binary", 2, 100
    )


# -------------------------------------------------------------------------- synthetic


def make_synthetic(num_train: int = 2000, num_test: int = 500, seed: int = 0) -> Dataset:
    """A deterministic CIFAR-shaped set: 10 classes of 3×32×32 uint8 images.

    Each class has a smooth random colour template (a 4×4 pattern upsampled
    bilinearly); an image is its class template, shifted by up to 4 pixels, with a
    random brightness offset and per-pixel Gaussian noise — learnable, not trivial.
    """
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(10, 3, 4, 4, generator=gen)
    templates = torch.nn.functional.interpolate(
        coarse, size=(40, 40), mode="bilinear", align_corners=False
    )

    def draw(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, 10, (n,), generator=gen)
        dy = torch.randint(0, 9, (n,), generator=gen)
        dx = torch.randint(0, 9, (n,), generator=gen)
        rows = dy.view(n, 1, 1) + torch.arange(32).view(1, 32, 1)
        cols = dx.view(n, 1, 1) + torch.arange(32).view(1, 1, 32)
        # (n, 40, 40, 3) indexed by (n, 32, 32) index grids → (n, 32, 32, 3).
        crops = templates[labels].permute(0, 2, 3, 1)[torch.arange(n).view(n, 1, 1), rows, cols]
        crops = crops.permute(0, 3, 1, 2)
        offset = 0.15 * torch.randn(n, 1, 1, 1, generator=gen)
        noise = 0.25 * torch.randn(n, 3, 32, 32, generator=gen)
        x = (crops + offset + noise).clamp(0, 1)
        return (x * 255).round().to(torch.uint8), labels

    train_x, train_y = draw(num_train)
    test_x, test_y = draw(num_test)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, 10, 1.0 / 255.0)


# --------------------------------------------------------------------------- registry

# A loader gets the data directory, or None when none was given (its default search).
DATASETS: dict[str, Callable[[Path | None], Dataset]] = {
    "digits": lambda data_dir: load_digits(),
    "mnist": lambda data_dir: load_mnist(data_dir, "mnist"),
    "fashion-mnist": lambda data_dir: load_mnist(data_dir, "fashion-mnist"),
    "cifar10": lambda data_dir: load_cifar10(data_dir or DEFAULT_DATA_DIR),
    "cifar100": lambda data_dir: load_cifar100(data_dir or DEFAULT_DATA_DIR),
    "synthetic": lambda data_dir: make_synthetic(),
}


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name (one of :data:`DATASETS`). ``data_dir=None``: the default
    search — :data:`DEFAULT_DATA_DIR`, and for Fashion-MNIST also the system-wide copy
    of Debian's ``dataset-fashion-mnist`` package (:data:`SYSTEM_DATA_DIRS`)."""
    if name not in DATASETS:
        raise DataError(f"expected a dataset in {', '.join(DATASETS)} (got {name!r})")
    return DATASETS[name](None if data_dir is None else Path(data_dir))
