"""Real data set readers with torchvision semantics (``root``, ``train``, ``download``).

Every reader takes the *data root* (``--data-dir``) and looks in the data set's own folder under
it, returning raw numpy arrays ``(images uint8 (N, H, W) or (N, H, W, 3), labels int64 (N,))``:

============  ==========================================================  ================
data set      on-disk layout under ``root``                               image
============  ==========================================================  ================
MNIST         ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``  28x28 grey
USPS          ``USPS/usps.bz2``, ``USPS/usps.t.bz2`` (libsvm, values in   16x16 grey
              [-1, 1])
SVHN          ``SVHN/{train,test}_32x32.mat``: ``X`` uint8 (32, 32, 3, N),  32x32 RGB
              ``y`` (N, 1) with digit 0 stored as 10
SynthDigits   ``SynthDigits/synth_{train,test}_32x32.mat`` (Ganin &         32x32 RGB
              Lempitsky's SynNumbers release): same keys and shapes as SVHN
MNIST-M       ``mnist_m/mnist_m_{train,test}/*.png`` and                    32x32 RGB
              ``mnist_m/mnist_m_{train,test}_labels.txt`` (``name label``)
CIFAR-10      ``cifar-10-batches-py/data_batch_{1..5}``, ``test_batch``:    32x32 RGB
              pickles with ``data`` uint8 (N, 3072) CHW rows and ``labels``
CIFAR-100     ``cifar-100-python/{train,test}``: pickles with ``data`` and  32x32 RGB
              ``fine_labels`` (and ``coarse_labels``, the 20 superclasses)
============  ==========================================================  ================

MNIST and USPS are read by torchvision's own classes. SVHN and CIFAR are *downloaded* by
torchvision (``download=True``: it fetches and md5-checks the files) but *parsed* here, with the
same logic as torchvision: torchvision's classes refuse any file whose md5 differs from the
official release, so they could not read a locally trimmed copy nor the tiny files the tests write
in the exact format. MNIST-M and SynthDigits have no torchvision class and no stable download URL;
they are read by the project's own loaders and must be put on disk by hand.

A data set that is neither on disk nor downloadable raises :class:`MissingDataError` with a
one-line message naming the data set, the folder looked in and how to get it.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class MissingDataError(FileNotFoundError):
    """A data set is not on disk and cannot be downloaded; the message says how to get it."""


def _missing(name: str, folder: Path, expected: str, how: str) -> MissingDataError:
    return MissingDataError(f"{name} not found in {folder} (expected {expected}); {how}")


_DOWNLOAD_HINT = "pass --data-dir to a folder holding it, or --download on a machine with internet"


def read_mnist(root: Path, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MNIST through ``torchvision.datasets.MNIST``: ``(N, 28, 28)`` uint8, ``(N,)`` int64."""
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(str(root), train=train, download=download)
    except (RuntimeError, OSError) as err:
        raise _missing("MNIST", Path(root) / "MNIST", "raw/*-ubyte IDX files",
                       _DOWNLOAD_HINT) from err
    return ds.data.numpy(), ds.targets.numpy().astype(np.int64)


def read_usps(root: Path, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """USPS through ``torchvision.datasets.USPS`` (``root/USPS``): ``(N, 16, 16)`` uint8, ``(N,)``.

    7,291 training and 2,007 test images; torchvision maps the libsvm values ``v`` in [-1, 1] to
    ``(v + 1) / 2 * 255``.
    """
    from torchvision.datasets import USPS

    folder = Path(root) / "USPS"
    try:
        ds = USPS(str(folder), train=train, download=download)
    except (RuntimeError, OSError) as err:
        raise _missing("USPS", folder, "usps.bz2 and usps.t.bz2", _DOWNLOAD_HINT) from err
    return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)


def _read_digits_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) -> ``(N, 32, 32, 3)`` uint8, ``(N,)`` int64.

    Label 10 stands for digit 0 (SVHN's convention) and is mapped to 0.
    """
    from scipy.io import loadmat

    mat = loadmat(str(path))
    images = np.ascontiguousarray(np.transpose(mat["X"], (3, 0, 1, 2))).astype(np.uint8)
    labels = mat["y"].astype(np.int64).reshape(-1)
    labels[labels == 10] = 0
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def read_svhn(root: Path, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits (``root/SVHN/{train,test}_32x32.mat``): ``(N, 32, 32, 3)``, ``(N,)``.

    73,257 training and 26,032 test images. ``download=True`` fetches the missing file through
    ``torchvision.datasets.SVHN`` (extra split not used).
    """
    split = "train" if train else "test"
    folder = Path(root) / "SVHN"
    path = folder / f"{split}_32x32.mat"
    if not path.exists() and download:
        from torchvision.datasets import SVHN

        try:
            SVHN(str(folder), split=split, download=True)
        except (RuntimeError, OSError) as err:
            raise _missing("SVHN", folder, path.name, f"download failed ({err}); "
                           "fetch http://ufldl.stanford.edu/housenumbers/ by hand") from err
    if not path.exists():
        raise _missing("SVHN", folder, path.name, _DOWNLOAD_HINT)
    return _read_digits_mat(path)


def read_synthdigits(root: Path, train: bool,
                     download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """SynthDigits (``root/SynthDigits/synth_{train,test}_32x32.mat``): ``(N, 32, 32, 3)``.

    Ganin & Lempitsky's (2015) SynNumbers release, the "SynthDigits"/"SynDigits" of FedBN: 479,400
    training and 9,553 test images in SVHN's ``.mat`` format (``X`` (32, 32, 3, N), ``y``). It has
    no stable download URL, so ``download`` cannot fetch it.
    """
    split = "train" if train else "test"
    folder = Path(root) / "SynthDigits"
    path = folder / f"synth_{split}_32x32.mat"
    if not path.exists():
        how = ("it has no download URL (download=True cannot help); " if download else "") + (
            "get synth_train_32x32.mat / synth_test_32x32.mat from Ganin & Lempitsky's "
            "SynNumbers release and put them there")
        raise _missing("SynthDigits", folder, path.name, how)
    return _read_digits_mat(path)


def read_mnistm(root: Path, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-M in its original release layout: ``(N, 32, 32, 3)`` uint8, ``(N,)`` int64.

    ``root`` is the data root holding ``mnist_m/`` (or the ``mnist_m`` folder itself). Files
    ``mnist_m_{train,test}/NNNNNNNN.png`` and ``mnist_m_{split}_labels.txt`` with lines
    ``<file name> <label>``; only the files listed *and* present are read, so a partial copy
    (e.g. the first 20,000 training images) works. There is no download.
    """
    from PIL import Image

    root = Path(root)
    split = "train" if train else "test"
    folder = root if (root / f"mnist_m_{split}_labels.txt").exists() else root / "mnist_m"
    labels_file = folder / f"mnist_m_{split}_labels.txt"
    images_dir = folder / f"mnist_m_{split}"
    if not labels_file.exists() or not images_dir.is_dir():
        how = ("it has no download URL (download=True cannot help); " if download else "") + (
            "get the original release (Ganin & Lempitsky 2015) and unpack it there")
        raise _missing("MNIST-M", folder, f"{images_dir.name}/ and {labels_file.name}", how)
    names, labels = [], []
    for line in labels_file.read_text().splitlines():
        if not line.strip():
            continue
        name, label = line.split()
        if (images_dir / name).exists():
            names.append(name)
            labels.append(int(label))
    if not names:
        raise _missing("MNIST-M", images_dir, f"the PNGs listed in {labels_file.name}",
                       "unpack the original release there")
    images = np.stack([np.asarray(Image.open(images_dir / n).convert("RGB")) for n in names])
    return images, np.asarray(labels, dtype=np.int64)


_CIFAR = {
    10: ("CIFAR-10", "cifar-10-batches-py", "labels",
         [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    100: ("CIFAR-100", "cifar-100-python", "fine_labels", ["train"], ["test"]),
}


def read_cifar(root: Path, train: bool, download: bool = False,
               num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10/100 (python pickles, torchvision's layout): ``(N, 32, 32, 3)`` uint8, ``(N,)``.

    ``num_classes`` 10 or 100 (CIFAR-100's fine labels; use :func:`read_cifar100_coarse` for the
    20 superclasses). ``download=True`` fetches the archive through torchvision.
    """
    if num_classes not in _CIFAR:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    name, sub, key, train_files, test_files = _CIFAR[num_classes]
    folder = Path(root) / sub
    files = [folder / f for f in (train_files if train else test_files)]
    if not all(f.exists() for f in files) and download:
        from torchvision.datasets import CIFAR10, CIFAR100

        try:
            (CIFAR10 if num_classes == 10 else CIFAR100)(str(root), train=train, download=True)
        except (RuntimeError, OSError) as err:
            raise _missing(name, folder, ", ".join(f.name for f in files),
                           f"download failed ({err}); fetch it from "
                           "https://www.cs.toronto.edu/~kriz/cifar.html by hand") from err
    absent = [f.name for f in files if not f.exists()]
    if absent:
        raise _missing(name, folder, ", ".join(absent), _DOWNLOAD_HINT)
    return _read_cifar_files(files, key)


def read_cifar100_coarse(root: Path, train: bool) -> np.ndarray:
    """CIFAR-100's 20 superclass labels ``(N,)`` int64, aligned with :func:`read_cifar` (100)."""
    folder = Path(root) / "cifar-100-python"
    path = folder / ("train" if train else "test")
    if not path.exists():
        raise _missing("CIFAR-100", folder, path.name, _DOWNLOAD_HINT)
    return _read_cifar_files([path], "coarse_labels")[1]


def _read_cifar_files(files: list[Path], key: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = [], []
    for f in files:
        with open(f, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        data.append(np.asarray(entry["data"], dtype=np.uint8))
        labels.extend(entry[key])
    images = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def to_digits_form(images: np.ndarray, size: int = 28) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, 3)`` -> float32 ``(N, 3, size, size)`` in [-1, 1].

    Grey images are replicated to three channels; values are scaled ``(x / 255 - 0.5) / 0.5``
    (FedBN's normalisation). Resize rule: when ``H, W != size``, bilinear interpolation with
    antialiasing (``torch.nn.functional.interpolate(..., antialias=True)``, PIL's BILINEAR
    resampling) straight to ``size x size`` — no crop, the aspect ratio of these square images is
    kept.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True).clamp_(0.0, 1.0)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return x.sub(0.5).div(0.5).contiguous()


def to_cifar_form(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 32, 32, 3)`` -> float32 ``(N, 3, 32, 32)`` in [-1, 1] (``(x/255 - 0.5)/0.5``)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)


Reader = Callable[[Path, bool, bool], tuple[np.ndarray, np.ndarray]]

#: Domain name -> reader ``(root, train, download) -> (images uint8, labels int64)``.
READERS: dict[str, Reader] = {
    "mnist": read_mnist,
    "usps": read_usps,
    "svhn": read_svhn,
    "synthdigits": read_synthdigits,
    "mnistm": read_mnistm,
    "cifar10": read_cifar,
    "cifar100": functools.partial(read_cifar, num_classes=100),
}


#: Domain name -> its folder under the data root.
FOLDERS: dict[str, str] = {
    "mnist": "MNIST", "usps": "USPS", "svhn": "SVHN", "synthdigits": "SynthDigits",
    "mnistm": "mnist_m", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
}


def read_cached(name: str, root: Path | str, train: bool,
                download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``READERS[name](root, train, download)``, read once per process; arrays are read-only.

    The cache is keyed by the data set's resolved folder, so two roots linking the same files
    share one read. USPS (bz2 text) and MNIST-M (PNGs) take seconds to parse.
    """
    if name not in READERS:
        raise ValueError(f"unknown data set {name!r}; valid choices: {', '.join(READERS)}")
    folder = (Path(root) / FOLDERS[name]).resolve()
    return _read_folder(name, folder if folder.exists() else Path(root).resolve(), train,
                        download)


@functools.lru_cache(maxsize=16)
def _read_folder(name: str, folder: Path, train: bool,
                 download: bool) -> tuple[np.ndarray, np.ndarray]:
    root = folder.parent if folder.name == FOLDERS[name] else folder
    images, labels = READERS[name](root, train, download)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def default_data_dir() -> Path:
    """Where scenarios look for real data when ``--data-dir`` is empty: ``$FEDCTX_DATA``, else
    ``./data`` (torchvision's usual root)."""
    return Path(os.environ.get("FEDCTX_DATA") or "data")
