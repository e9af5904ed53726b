"""Loaders: real files (MNIST, USPS, MNIST-M from FEDCTX_DATA) and tiny files written here in the
exact on-disk formats of SVHN, SynthDigits, CIFAR-10 and CIFAR-100 (never a fake data set under a
real name outside a test's temporary folder)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from fedctx.data.sources import (
    MissingDataError,
    read_cached,
    read_cifar,
    read_cifar100_coarse,
    read_mnistm,
    read_svhn,
    read_synthdigits,
    to_cifar_form,
    to_digits_form,
)


def write_digits_mat(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SVHN's format: ``X`` uint8 (32, 32, 3, n), ``y`` (n, 1) in 1..10 (10 = digit 0).

    Returns the images ``(n, 32, 32, 3)`` and digit labels ``(n,)`` written."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    digits = np.arange(n) % 10
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"X": images.transpose(1, 2, 3, 0),
                        "y": np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]})
    return images, digits


def write_svhn(root: Path, n_train: int, n_test: int) -> None:
    write_digits_mat(root / "SVHN" / "train_32x32.mat", n_train, 1)
    write_digits_mat(root / "SVHN" / "test_32x32.mat", n_test, 2)


def _cifar_pickle(path: Path, images: np.ndarray, labels: dict[str, list[int]]) -> None:
    entry = {"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
             "filenames": [f"img_{i}.png" for i in range(len(images))], **labels}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def write_cifar10(root: Path, per_batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``cifar-10-batches-py/data_batch_1..5`` and ``test_batch`` (``data`` (n, 3072) rows of
    R, G, B planes, ``labels``). Returns the training images ``(5 * per_batch, 32, 32, 3)`` and
    labels written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        _cifar_pickle(folder / name, x, {"labels": y, "batch_label": name})
        if name != "test_batch":
            xs.append(x)
            ys += y
    return np.concatenate(xs), np.asarray(ys)


def test_mnist_real(real_data: Path) -> None:
    x, y = read_cached("mnist", str(real_data), True)
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_usps_real(real_data: Path) -> None:
    x, y = read_cached("usps", str(real_data), True)
    assert x.shape == (7291, 16, 16) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]
    x_te, y_te = read_cached("usps", str(real_data), False)
    assert np.bincount(y_te).tolist() == [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]
    assert x.min() == 0 and x.max() == 255


def test_mnistm_real(real_data: Path) -> None:
    if not (real_data / "mnist_m").is_dir():
        pytest.skip("MNIST-M not in FEDCTX_DATA")
    x, y = read_cached("mnistm", str(real_data), False)
    assert x.shape == (9001, 32, 32, 3) and x.dtype == np.uint8
    assert y[:5].tolist() == [7, 2, 1, 0, 4]
    x_tr, y_tr = read_cached("mnistm", str(real_data), True)
    assert y_tr[:5].tolist() == [5, 0, 4, 1, 9] and len(x_tr) == len(y_tr) >= 20000


def test_mnistm_accepts_its_own_folder(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "mnist_m"
    (folder / "mnist_m_test").mkdir(parents=True)
    img = np.full((32, 32, 3), 7, dtype=np.uint8)
    Image.fromarray(img).save(folder / "mnist_m_test" / "00000000.png")
    (folder / "mnist_m_test_labels.txt").write_text("00000000.png 3\n00000001.png 4\n")
    for root in (tmp_path, folder):  # the data root, or the mnist_m folder itself
        x, y = read_mnistm(root, train=False)
        assert x.shape == (1, 32, 32, 3) and y.tolist() == [3] and (x == 7).all()


@pytest.mark.parametrize("reader,sub,prefix", [(read_svhn, "SVHN", ""),
                                               (read_synthdigits, "SynthDigits", "synth_")])
def test_svhn_format(tmp_path: Path, reader, sub: str, prefix: str) -> None:
    images, digits = write_digits_mat(tmp_path / sub / f"{prefix}train_32x32.mat", 23)
    x, y = reader(tmp_path, train=True)
    assert x.shape == (23, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, digits)  # label 10 read as digit 0
    with pytest.raises(MissingDataError, match=f"{prefix}test_32x32.mat"):
        reader(tmp_path, train=False)


def test_cifar10_format(tmp_path: Path) -> None:
    images, labels = write_cifar10(tmp_path, per_batch=7)
    x, y = read_cifar(tmp_path, train=True)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert read_cifar(tmp_path, train=False)[0].shape == (7, 32, 32, 3)
    t = to_cifar_form(x)
    assert t.shape == (35, 3, 32, 32) and t.dtype == torch.float32
    assert torch.allclose(t[0, 1], torch.from_numpy(images[0, :, :, 1]).float() / 127.5 - 1)


def test_cifar_images_are_contiguous_nchw() -> None:
    """As every source's images: the channels-last view crashed the CPU backward of a width-4
    ResNet-20 (heap corruption in torch 2.14.1)."""
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x = to_cifar_form(images)
    assert x.is_contiguous() and x.stride() == (3072, 1024, 32, 1)


def test_cifar100_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 11), ("test", 5)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        _cifar_pickle(tmp_path / "cifar-100-python" / split, x,
                      {"fine_labels": list(range(89, 89 + n)), "coarse_labels": [19] * n})
    x, y = read_cifar(tmp_path, train=True, num_classes=100)
    assert x.shape == (11, 32, 32, 3) and y.tolist() == list(range(89, 100))
    assert read_cifar100_coarse(tmp_path, train=False).tolist() == [19] * 5


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("usps", "USPS"), ("svhn", "SVHN"),
                                         ("synthdigits", "SynthDigits"), ("mnistm", "mnist_m"),
                                         ("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])
def test_missing_data_is_one_clear_line(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(MissingDataError) as info:
        read_cached(name, str(tmp_path), True)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / folder) in message  # the folder it looked in
    assert "not found" in message and ("--data-dir" in message or "release" in message)


def test_to_digits_form() -> None:
    grey = np.zeros((2, 16, 16), dtype=np.uint8)
    grey[1] = 255
    x = to_digits_form(grey)
    assert x.shape == (2, 3, 28, 28) and x.dtype == torch.float32
    assert torch.all(x[0] == -1) and torch.allclose(x[1], torch.ones_like(x[1]))
    rgb = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    y = to_digits_form(rgb, size=28)
    assert y.shape == (3, 3, 28, 28) and y.min() >= -1 and y.max() <= 1
    same = to_digits_form(rgb, size=32)  # no resize: exact scaling
    assert torch.allclose(same[0, 2], torch.from_numpy(rgb[0, :, :, 2]).float() / 127.5 - 1)
