"""Dataset loaders on fixture files written here in the official formats (IDX, CIFAR
binary), their truncated/corrupt variants, and the built-in sets."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bnorm.study import data as data_module
from bnorm.study.data import (
    DataError,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_mnist,
    make_synthetic,
    read_cifar_binary,
    read_idx,
)
from bnorm.study.spec import TrainSpec
from bnorm.study.train import train_run

# ------------------------------------------------------------------ fixture writers


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding: 0x00 0x00, type 0x08 (ubyte), ndim, big-endian uint32 sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", n) for n in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def write_mnist(
    directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


def cifar_records(labels: list[tuple[int, ...]], seed: int = 0) -> tuple[bytes, np.ndarray]:
    """Records of label byte(s) + 3072 pixel bytes (R plane, G plane, B plane, row-major)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    out = b"".join(bytes(lab) + pixels[i].tobytes() for i, lab in enumerate(labels))
    return out, pixels


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_mnist_loader_reads_the_idx_files_exactly(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz=gz)
    ds = load_mnist(tmp_path)
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.train_images.dtype == torch.uint8
    np.testing.assert_array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.num_classes == 10
    # Inputs scale bytes to [0, 1].
    x = ds.inputs(ds.train_images[:2])
    torch.testing.assert_close(x, ds.train_images[:2].float() / 255)


def test_fashion_mnist_is_found_in_the_torchvision_layout(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.name == "fashion-mnist"
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


FASHION_SYSTEM_DIR = data_module.SYSTEM_DATA_DIRS["fashion-mnist"]
FASHION_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
needs_fashion_mnist = pytest.mark.skipif(
    not all((FASHION_SYSTEM_DIR / f).is_file() for f in FASHION_FILES),
    reason=f"the real Fashion-MNIST files are not in {FASHION_SYSTEM_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)


@needs_fashion_mnist
def test_real_fashion_mnist_is_found_without_a_data_dir_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./data here: the system-wide copy must be found
    ds = load_dataset("fashion-mnist")
    assert ds.name == "fashion-mnist" and ds.num_classes == 10
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (
        10000,
        1,
        28,
        28,
    )
    # The real set: balanced, 6,000 training and 1,000 test images per class.
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    spec = TrainSpec(model="mlp", hidden=[64, 64], activation="relu", init="kaiming",
                     batch_size=60, steps=30, lr=0.1, eval_every=30, probe=False)  # fmt: skip
    record = train_run(spec, ds, norm="bn", seed=0)
    assert record["done"] and record["curve"]["step"] == [0, 30]
    first, last = record["curve"]["test_accuracy"]
    assert last > max(0.5, first + 0.2)  # 30 steps take it well above chance (10%)


def test_missing_fashion_mnist_says_where_it_looked_and_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(data_module.SYSTEM_DATA_DIRS, "fashion-mnist", tmp_path / "nowhere")
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert "\n" not in message
    looked = f"data, data/fashion-mnist, data/FashionMNIST/raw, {tmp_path / 'nowhere'}"
    assert f"train-images-idx3-ubyte or train-images-idx3-ubyte.gz in {looked}" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message


def test_idx_magic_numbers_are_those_of_the_format(tmp_path: Path) -> None:
    labels = idx_bytes(np.zeros(3, np.uint8))
    images = idx_bytes(np.zeros((2, 4, 4), np.uint8))
    assert labels[:4] == bytes.fromhex("00000801")
    assert images[:4] == bytes.fromhex("00000803")
    (tmp_path / "x").write_bytes(images)
    assert read_idx(tmp_path / "x", 3).shape == (2, 4, 4)


def test_truncated_idx_file_names_the_file(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte: truncated: .*12×28×28 = 9408 values \(got 9308 bytes\)",
    ):
        load_mnist(tmp_path)


def test_truncated_gzip_stream_is_reported_as_corrupt(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: corrupt or truncated gzip"):
        load_mnist(tmp_path)


def test_wrong_magic_number_is_rejected(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"PK\x03\x04" + bytes(20))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: not an IDX file"):
        load_mnist(tmp_path)


def test_images_file_given_for_labels_is_rejected_by_its_dimensions(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    images = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(images)
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte: expected a 1-dimensional IDX file \(got 3"
    ):
        load_mnist(tmp_path)


def test_label_and_image_counts_must_match(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(
        DataError, match=r"train-labels-idx1-ubyte: expected 12 labels .* \(got 11\)"
    ):
        load_mnist(tmp_path)


def test_missing_mnist_file_says_where_it_looked(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(
        DataError, match=r"t10k-images-idx3-ubyte: file not found \(looked for .*\.gz in"
    ):
        load_mnist(tmp_path)


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_record_layout_is_label_then_rgb_planes(tmp_path: Path) -> None:
    labels = [(3,), (9,), (0,)]
    data, pixels = cifar_records(labels)
    (tmp_path / "f.bin").write_bytes(data)
    images, got_labels = read_cifar_binary(tmp_path / "f.bin", 1, 10)
    assert images.shape == (3, 3, 32, 32)
    assert got_labels.tolist() == [3, 9, 0]
    # Channel c of image i is bytes [1024c, 1024(c+1)) of its pixels, row-major.
    for i in range(3):
        for c in range(3):
            np.testing.assert_array_equal(
                images[i, c], pixels[i, 1024 * c : 1024 * (c + 1)].reshape(32, 32)
            )
    # Pixel (row 5, column 7) of the green plane of image 1:
    assert images[1, 1, 5, 7] == pixels[1, 1024 + 5 * 32 + 7]


def test_cifar10_loader_concatenates_the_five_training_batches(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    for i in range(1, 6):
        (d / f"data_batch_{i}.bin").write_bytes(cifar_records([(i,), (i + 1,)], seed=i)[0])
    (d / "test_batch.bin").write_bytes(cifar_records([(7,)], seed=9)[0])
    ds = load_cifar10(tmp_path)
    assert ds.train_images.shape == (10, 3, 32, 32)
    assert ds.train_labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert ds.test_labels.tolist() == [7]
    assert ds.image_shape == (3, 32, 32)


def test_cifar100_uses_the_fine_label(tmp_path: Path) -> None:
    (tmp_path / "train.bin").write_bytes(cifar_records([(4, 87), (19, 3)])[0])
    (tmp_path / "test.bin").write_bytes(cifar_records([(0, 99)])[0])
    ds = load_cifar100(tmp_path)
    assert ds.train_labels.tolist() == [87, 3]
    assert ds.test_labels.tolist() == [99]
    assert ds.num_classes == 100


def test_truncated_cifar_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "train.bin").write_bytes(cifar_records([(1, 2), (1, 2)])[0][:-1])
    (tmp_path / "test.bin").write_bytes(cifar_records([(1, 2)])[0])
    with pytest.raises(
        DataError,
        match=r"train\.bin: truncated or not a CIFAR binary file: "
        r"6147 bytes is not a whole number of 3074-byte records",
    ):
        load_cifar100(tmp_path)


def test_cifar_label_out_of_range_is_reported_with_its_record(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(cifar_records([(1,), (12,)])[0])
    with pytest.raises(DataError, match=r"f\.bin: record 1 has label 12 \(expected 0–9\)"):
        read_cifar_binary(tmp_path / "f.bin", 1, 10)


def test_pickled_cifar_batch_is_rejected_not_unpickled(tmp_path: Path) -> None:
    # The "python version" of CIFAR is a pickle; a malicious one would run code when
    # unpickled. The loader must treat it as bytes and reject it.
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("unpickled!",))

    payload = pickle.dumps({"data": Boom(), "labels": [1]})
    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}.bin").write_bytes(payload)
    (tmp_path / "test_batch.bin").write_bytes(payload)
    with pytest.raises(DataError, match=r"data_batch_1\.bin: truncated or not a CIFAR binary file"):
        load_cifar10(tmp_path)


def test_empty_cifar_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"f\.bin: empty file"):
        read_cifar_binary(tmp_path / "f.bin", 1, 10)


# ---------------------------------------------------------------------- built-in sets


def test_digits_split_is_stratified_fixed_and_complete() -> None:
    a, b = load_digits(), load_digits()
    assert a.train_images.shape[0] + a.test_images.shape[0] == 1797
    assert a.image_shape == (1, 8, 8) and a.num_classes == 10
    assert torch.equal(a.test_images, b.test_images) and torch.equal(a.train_labels, b.train_labels)
    from sklearn.datasets import load_digits as sk

    bunch = sk()
    target = np.asarray(bunch.target)
    # Every image of scikit-learn's set is in exactly one split, with its label.
    ours = torch.cat([a.train_images, a.test_images])[:, 0].numpy()
    ours_labels = torch.cat([a.train_labels, a.test_labels]).numpy()
    theirs = np.asarray(bunch.images, dtype=np.uint8)
    key = lambda imgs, labs: sorted(i.tobytes() + bytes([int(lab)]) for i, lab in zip(imgs, labs))  # noqa: E731
    assert key(ours, ours_labels) == key(theirs, target)
    for c in range(10):
        n_c = int((target == c).sum())
        assert int((a.test_labels == c).sum()) == round(0.2 * n_c)
    # Values 0..16 scaled to [0, 1].
    x = a.inputs(a.train_images)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_synthetic_set_is_deterministic_and_cifar_shaped() -> None:
    a, b = make_synthetic(200, 50), make_synthetic(200, 50)
    assert a.train_images.shape == (200, 3, 32, 32) and a.train_images.dtype == torch.uint8
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert set(a.train_labels.tolist()) == set(range(10))
    # Not constant images: the classes differ in their mean colour pattern.
    per_class = torch.stack(
        [a.train_images[a.train_labels == c].float().mean(0) for c in range(10)]
    )
    assert float(per_class.std(0).mean()) > 5.0


def test_standardize_uses_training_channel_statistics() -> None:
    ds = make_synthetic(100, 10)
    x = ds.inputs(ds.train_images, standardize=True)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_unknown_dataset_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"expected a dataset in digits, .* \(got 'imagenet'\)"):
        load_dataset("imagenet")
