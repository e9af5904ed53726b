"""Issue #14, items 10 and 12 (data): no pickle is loaded with code execution, file names listed in
a labels file stay in the data folder, and a damaged data file is named as corrupt (one line, the
file and, for text files, the line), never as "not found". Every file here is written by the test
in its temporary folder, in the exact on-disk format of the release."""

from __future__ import annotations

import bz2
import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
from test_data_sources import _cifar_pickle, write_cifar10, write_digits_mat

from fedctx.data import safe_pickle
from fedctx.data.sources import (
    CorruptDataError,
    MissingDataError,
    read_cifar,
    read_mnist,
    read_mnistm,
    read_svhn,
    read_usps,
)


def _one_line_corrupt(info: pytest.ExceptionInfo, path: Path, line: int | None = None) -> str:
    err = info.value
    message = str(err)
    assert isinstance(err, ValueError) and not isinstance(err, MissingDataError)
    assert "\n" not in message and "not found" not in message
    assert str(path) in message
    if line is not None:
        assert f"line {line}" in message
    return message


# -- pickles (CIFAR) -------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=3)
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(pickle.dumps({"data": _RunsCode(marker), "labels": [1]}, protocol=2))
    with pytest.raises(CorruptDataError) as info:
        read_cifar(tmp_path, train=False)
    message = _one_line_corrupt(info, bad)
    assert "refused" in message and "system" in message
    assert not marker.exists()  # nothing ran
    assert read_cifar(tmp_path, train=True)[0].shape == (15, 32, 32, 3)  # the good files still read


@pytest.mark.parametrize("payload", [
    pickle.dumps(eval, protocol=2),  # a builtin callable
    pickle.dumps({"data": np.array([None, 1], dtype=object)}, protocol=2),  # object array
    pickle.dumps(np.zeros(2, dtype=[("a", "u1"), ("b", "f4")]), protocol=2),  # structured dtype
    pickle.dumps(np.float32(1.5), protocol=2),  # numpy scalar: another global
    b"\x80\x02X\x01\x00\x00\x00xQ.",  # persistent id
])
def test_safe_pickle_builds_nothing_else(payload: bytes) -> None:
    with pytest.raises(safe_pickle.UnsafePickleError):
        safe_pickle.loads(payload)


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_safe_pickle_reads_arrays_as_pickle_does(protocol: int) -> None:
    value = {"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072), "labels": [3, 9],
             "wide": np.arange(6, dtype=">i8").reshape(2, 3), "f": np.ones((2, 3), order="F"),
             "name": "batch 1", "raw": b"\x00\xff", "t": (1, 2.5, None, True)}
    got = safe_pickle.loads(pickle.dumps(value, protocol=protocol))
    assert got.keys() == value.keys()
    for key, want in value.items():
        if isinstance(want, np.ndarray):
            assert got[key].dtype == want.dtype and np.array_equal(got[key], want)
        else:
            assert got[key] == want


def test_cifar_real_files_read_without_pickle_load(real_data: Path) -> None:
    folder = real_data / "cifar-10-batches-py"
    if not folder.is_dir():
        pytest.skip("CIFAR-10 not in FEDCTX_DATA")
    x, y = read_cifar(real_data, train=False)
    assert x.shape == (10000, 32, 32, 3) and np.bincount(y).tolist() == [1000] * 10
    with open(folder / "test_batch", "rb") as fh:  # the shared release copy, trusted
        entry = pickle.load(fh, encoding="latin1")
    assert np.array_equal(x[:5].transpose(0, 3, 1, 2).reshape(5, -1), entry["data"][:5])
    assert y.tolist() == entry["labels"]


def test_cifar_truncated_and_malformed(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=4)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CorruptDataError) as info:
        read_cifar(tmp_path, train=False)
    assert "corrupt" in _one_line_corrupt(info, path)
    x = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    for labels in ({"labels": [1, 10]}, {"labels": [1]}, {"labels": ["a", "b"]}, {"nolabels": 1}):
        _cifar_pickle(path, x, labels)
        with pytest.raises(CorruptDataError) as info:
            read_cifar(tmp_path, train=False)
        _one_line_corrupt(info, path)


# -- MNIST-M: labels file and PNGs -----------------------------------------------------------------

def _mnistm(root: Path, labels: str, n_png: int = 2) -> Path:
    from PIL import Image

    folder = root / "mnist_m"
    (folder / "mnist_m_test").mkdir(parents=True, exist_ok=True)
    for i in range(n_png):
        Image.fromarray(np.full((32, 32, 3), i, dtype=np.uint8)).save(
            folder / "mnist_m_test" / f"{i:08d}.png")
    path = folder / "mnist_m_test_labels.txt"
    path.write_text(labels)
    return path


@pytest.mark.parametrize("name", ["../../outside.png", "ABSOLUTE"])
def test_mnistm_file_names_cannot_leave_the_data_folder(tmp_path: Path, name: str) -> None:
    from PIL import Image

    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(outside)
    name = str(outside) if name == "ABSOLUTE" else name
    labels = _mnistm(tmp_path, f"00000000.png 3\n{name} 4\n")
    with pytest.raises(CorruptDataError) as info:
        read_mnistm(tmp_path, train=False)
    assert "leaves the data folder" in _one_line_corrupt(info, labels, line=2)


@pytest.mark.parametrize("line,problem", [
    ("00000001.png", "1 columns"),
    ("00000001.png 4 extra", "3 columns"),
    ("00000001.png four", "not an integer"),
    ("00000001.png 10", "not in 0..9"),
    ("00000001.png -1", "not in 0..9"),
])
def test_mnistm_malformed_labels_file(tmp_path: Path, line: str, problem: str) -> None:
    labels = _mnistm(tmp_path, f"00000000.png 3\n\n{line}\n")
    with pytest.raises(CorruptDataError) as info:
        read_mnistm(tmp_path, train=False)
    assert problem in _one_line_corrupt(info, labels, line=3)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "size"])
def test_mnistm_corrupt_png(tmp_path: Path, damage: str) -> None:
    from PIL import Image

    _mnistm(tmp_path, "00000000.png 3\n00000001.png 4\n")
    png = tmp_path / "mnist_m" / "mnist_m_test" / "00000001.png"
    if damage == "garbage":
        png.write_bytes(b"this is not a PNG file")
    elif damage == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
                        ).save(png)
        png.write_bytes(png.read_bytes()[:300])
    else:
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(png)
    with pytest.raises(CorruptDataError) as info:
        read_mnistm(tmp_path, train=False)
    assert "corrupt" in _one_line_corrupt(info, png)


# -- MNIST IDX, USPS bz2, SVHN .mat ----------------------------------------------------------------

def _write_mnist(root: Path, n: int = 5) -> tuple[Path, Path]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    header = np.array([0x803, n, 28, 28], dtype=">u4").tobytes()
    images.write_bytes(header + np.arange(n * 784, dtype=np.uint32).astype(np.uint8).tobytes())
    labels.write_bytes(np.array([0x801, n], dtype=">u4").tobytes()
                       + (np.arange(n) % 10).astype(np.uint8).tobytes())
    return images, labels


def test_mnist_idx_written_here_reads(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    x, y = read_mnist(tmp_path, train=False)
    assert x.shape == (5, 28, 28) and y.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["truncated", "magic", "count", "label"])
def test_mnist_corrupt_idx(tmp_path: Path, damage: str) -> None:
    images, labels = _write_mnist(tmp_path)
    bad = images
    if damage == "truncated":
        images.write_bytes(images.read_bytes()[:1000])
    elif damage == "magic":
        images.write_bytes(b"\x00\x00\x08\x01" + images.read_bytes()[4:])
    elif damage == "count":  # 4 labels for 5 images
        bad = labels
        labels.write_bytes(np.array([0x801, 4], dtype=">u4").tobytes() + bytes(4))
    else:
        bad = labels
        labels.write_bytes(labels.read_bytes()[:-1] + bytes([12]))
    with pytest.raises(CorruptDataError) as info:
        read_mnist(tmp_path, train=False)
    message = _one_line_corrupt(info, bad)
    assert "corrupt" in message and (damage != "truncated" or "truncated" in message)


def _usps_line(label: int) -> str:
    return f"{label + 1} " + " ".join(f"{i + 1}:{(i % 3) - 1}" for i in range(256))


def test_usps_corrupt_bz2(tmp_path: Path) -> None:
    path = tmp_path / "USPS" / "usps.t.bz2"
    path.parent.mkdir()
    path.write_bytes(bz2.compress("\n".join(_usps_line(c) for c in range(3)).encode()))
    x, y = read_usps(tmp_path, train=False)  # the format written here reads
    assert x.shape == (3, 16, 16) and y.tolist() == [0, 1, 2]
    good = path.read_bytes()
    for damage in (b"not bzip2 at all", good[: len(good) // 2],
                   bz2.compress(b"1 1:0.5 2:0.5\n"),  # not 16x16
                   bz2.compress(_usps_line(10).encode())):  # label 11 in the file
        path.write_bytes(damage)
        with pytest.raises(CorruptDataError) as info:
            read_usps(tmp_path, train=False)
        assert "corrupt" in _one_line_corrupt(info, path)
    for line, problem in ((_usps_line(1)[:-40], "pixel values"),
                          (_usps_line(1).replace("3:", "3:x"), "not a number"),
                          (_usps_line(1).replace(":1 ", ":7 "), "not in [-1, 1]")):
        path.write_bytes(bz2.compress(f"{_usps_line(0)}\n{line}\n".encode()))
        with pytest.raises(CorruptDataError) as info:
            read_usps(tmp_path, train=False)
        assert problem in _one_line_corrupt(info, path, line=2)


def test_svhn_corrupt_mat(tmp_path: Path) -> None:
    path = tmp_path / "SVHN" / "test_32x32.mat"
    write_digits_mat(path, 4)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptDataError) as info:
        read_svhn(tmp_path, train=False)
    _one_line_corrupt(info, path)


def test_simulate_names_a_corrupt_file_in_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from fedctx.simulate import main

    images, _ = _write_mnist(tmp_path / "data")
    (images.parent / "train-images-idx3-ubyte").write_bytes(images.read_bytes()[:100])
    (images.parent / "train-labels-idx1-ubyte").write_bytes(
        (images.parent / "t10k-labels-idx1-ubyte").read_bytes())
    rc = main(["--scenario", "mnist-usps", "--clients", "2", "--data-dir", str(tmp_path / "data"),
               "--backend", "inprocess", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.startswith("error: MNIST file") and "corrupt" in err and "truncated" in err
