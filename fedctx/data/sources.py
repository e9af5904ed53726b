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

MNIST (IDX) and USPS (bzip2 libsvm text) are parsed here with torchvision's logic, every header,
size and line checked, and downloaded by torchvision's classes. SVHN and CIFAR are *downloaded* by
torchvision (``download=True``: it fetches and md5-checks the files) but *parsed* here, with the
same logic as torchvision: torchvision's classes refuse any file whose md5 differs from the
official release, so they could not read a locally trimmed copy nor the tiny files the tests write
in the exact format. MNIST-M and SynthDigits have no torchvision class and no stable download URL;
they are read by the project's own loaders and must be put on disk by hand.

A data set that is neither on disk nor downloadable raises :class:`MissingDataError` with a
one-line message naming the data set, the folder looked in and how to get it. A file that is on
disk but cannot be what it claims (a truncated IDX file, a bad ``usps.bz2``, an unreadable PNG, a
malformed labels file, a pickle that asks to run code) raises :class:`CorruptDataError`, one line
naming the file (and the line, for text files). Pickles (CIFAR) are read with
:mod:`fedctx.data.safe_pickle`, which builds only dicts, lists, strings, numbers and plain numpy
arrays; file names listed in a labels file must stay inside the data folder.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable
from pathlib import Path, PurePath

import numpy as np
import torch
import torch.nn.functional as F


class MissingDataError(FileNotFoundError):
    """A data set is not on disk and cannot be downloaded; the message says how to get it."""


def _missing(name: str, folder: Path, expected: str, how: str) -> MissingDataError:
    return MissingDataError(f"{name} not found in {folder} (expected {expected}); {how}")


_DOWNLOAD_HINT = "pass --data-dir to a folder holding it, or --download on a machine with internet"


class CorruptDataError(ValueError):
    """A data file is on disk but is not what it should be; one line naming the file (and the
    line of a text file) and what is wrong with it."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _corrupt(name: str, path: Path, what: object, line: int | None = None) -> CorruptDataError:
    where = f"{path}, line {line}" if line is not None else f"{path}"
    return CorruptDataError(f"{name} file {where} is corrupt: {_one_line(what)}; replace it with "
                            "the original release file")


def _check_labels(name: str, path: Path, labels: np.ndarray, num_classes: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise _corrupt(name, path, f"label {int(labels[bad[0]])} of sample {int(bad[0])} is not "
                       f"in 0..{num_classes - 1}")


_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes, 3 (images) or 1 (labels) dims


def _check_idx(path: Path, ndim: int) -> list[int]:
    """Check the IDX header and size of an MNIST file; return its dimensions."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header = fh.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim:
        raise _corrupt("MNIST", path, f"{size} bytes, shorter than an IDX header")
    magic, *dims = np.frombuffer(header, dtype=">u4").tolist()
    if magic != _IDX_MAGIC[ndim]:
        raise _corrupt("MNIST", path, f"IDX magic number {magic:#010x}, expected "
                       f"{_IDX_MAGIC[ndim]:#010x}")
    expected = 4 + 4 * ndim + int(np.prod(dims, dtype=object))
    if size != expected:
        raise _corrupt("MNIST", path, f"{size} bytes but its header {tuple(dims)} needs "
                       f"{expected} ({'truncated' if size < expected else 'trailing bytes'})")
    return dims


def read_mnist(root: Path, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's IDX files (``root/MNIST/raw``): ``(N, 28, 28)`` uint8, ``(N,)`` int64.

    The split's two files are checked (IDX header, size, image/label counts, labels 0-9) and
    parsed here, so a damaged file is named as corrupt and a copy holding one split reads.
    Without them, ``torchvision.datasets.MNIST`` downloads them (``download=True``) or reads its
    legacy ``processed/`` files.
    """
    raw = Path(root) / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    files = (raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte")
    if not all(f.is_file() for f in files):
        if not (download or (raw.parent / "processed").is_dir()):
            raise _missing("MNIST", raw.parent, "raw/*-ubyte IDX files", _DOWNLOAD_HINT)
        from torchvision.datasets import MNIST

        try:
            ds = MNIST(str(root), train=train, download=download)
        except (RuntimeError, OSError) as err:
            raise _missing("MNIST", Path(root) / "MNIST", "raw/*-ubyte IDX files",
                           _DOWNLOAD_HINT) from err
        if not all(f.is_file() for f in files):  # legacy processed/ files
            return ds.data.numpy(), ds.targets.numpy().astype(np.int64)
    (n, *size), (n_labels,) = _check_idx(files[0], 3), _check_idx(files[1], 1)
    if size != [28, 28]:
        raise _corrupt("MNIST", files[0], f"images of {size[0]}x{size[1]} pixels, expected 28x28")
    if n != n_labels:
        raise _corrupt("MNIST", files[1], f"{n_labels} labels for the {n} images of "
                       f"{files[0].name}")
    images = np.fromfile(files[0], dtype=np.uint8, offset=16).reshape(n, 28, 28)
    labels = np.fromfile(files[1], dtype=np.uint8, offset=8).astype(np.int64)
    _check_labels("MNIST", files[1], labels, 10)
    return images, labels


def read_usps(root: Path, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """USPS (``root/USPS/usps.bz2``, ``usps.t.bz2``): ``(N, 16, 16)`` uint8, ``(N,)`` int64.

    7,291 training and 2,007 test images. Parsed here exactly as ``torchvision.datasets.USPS``
    does (libsvm lines ``label i:v ...``, labels 1-10 -> 0-9, values ``v`` in [-1, 1] ->
    ``uint8((v + 1) / 2 * 255)``), with every line checked; torchvision downloads the files
    (``download=True``).
    """
    folder = Path(root) / "USPS"
    path = folder / ("usps.bz2" if train else "usps.t.bz2")
    if not path.is_file() and download:
        from torchvision.datasets import USPS

        try:
            USPS(str(folder), train=train, download=True)
        except (RuntimeError, OSError) as err:
            raise _missing("USPS", folder, path.name, f"download failed ({err})") from err
    if not path.is_file():
        raise _missing("USPS", folder, "usps.bz2 and usps.t.bz2", _DOWNLOAD_HINT)
    return _read_usps_file(path)


def _read_usps_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import bz2

    try:
        with bz2.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, EOFError, ValueError) as err:  # not bzip2, truncated, not text
        raise _corrupt("USPS", path, f"not bzip2-compressed libsvm text ({type(err).__name__}: "
                       f"{err})") from err
    numbered = [(i, line.split()) for i, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise _corrupt("USPS", path, "it holds no image")
    for number, tokens in numbered:
        if len(tokens) != 257:
            raise _corrupt("USPS", path, f"{len(tokens) - 1} pixel values, expected 256 "
                           "(<label> 1:<v> ... 256:<v>)", number)
    try:
        values = np.asarray([[t.rpartition(":")[2] for t in tokens[1:]]
                             for _, tokens in numbered], dtype=np.float32)
        labels = np.asarray([tokens[0] for _, tokens in numbered], dtype=np.int64) - 1
    except ValueError:  # find the first bad line
        for number, tokens in numbered:
            try:
                int(tokens[0])
                [float(t.rpartition(":")[2]) for t in tokens[1:]]
            except ValueError as err:
                raise _corrupt("USPS", path, f"not a number ({err})", number) from None
        raise
    bad = np.flatnonzero(~np.isfinite(values).all(1) | (values.min(1) < -1) | (values.max(1) > 1)
                         | (labels < 0) | (labels > 9))
    if len(bad):
        raise _corrupt("USPS", path, "label not in 1..10 or pixel value not in [-1, 1]",
                       numbered[bad[0]][0])
    images = ((values.reshape(-1, 16, 16) + 1) / 2 * 255).astype(np.uint8)
    return images, labels


def _read_digits_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) -> ``(N, 32, 32, 3)`` uint8, ``(N,)`` int64.

    Label 10 stands for digit 0 (SVHN's convention) and is mapped to 0.
    """
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    name = path.parent.name
    try:
        mat = loadmat(str(path))
        x, y = mat["X"], mat["y"]
    except (MatReadError, OSError, EOFError, ValueError, TypeError, NotImplementedError,
            IndexError) as err:
        raise _corrupt(name, path, f"not a MATLAB v5 file ({type(err).__name__}: {err})"
                       ) from err
    except KeyError as err:
        raise _corrupt(name, path, f"no variable {err} (expected X and y)") from err
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise _corrupt(name, path, f"X has shape {x.shape}, expected (32, 32, 3, N)")
    images = np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2))).astype(np.uint8)
    labels = y.astype(np.int64).reshape(-1)
    labels[labels == 10] = 0
    if len(images) != len(labels):
        raise _corrupt(name, path, f"{len(images)} images but {len(labels)} labels")
    _check_labels(name, path, labels, 10)
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
    for _, name, label in _read_labels_file("MNIST-M", labels_file, 10):
        if (images_dir / name).exists():
            names.append(name)
            labels.append(label)
    if not names:
        raise _missing("MNIST-M", images_dir, f"the PNGs listed in {labels_file.name}",
                       "unpack the original release there")
    images = np.stack([_read_png("MNIST-M", images_dir / n, (32, 32, 3)) for n in names])
    return images, np.asarray(labels, dtype=np.int64)


def _read_labels_file(name: str, path: Path, num_classes: int) -> list[tuple[int, str, int]]:
    """``(line number, file name, label)`` of each line ``<file name> <label>`` of ``path``.

    A file name must be relative and stay inside the folder it names files of (no ``..``, no
    absolute path); a label must be an integer in ``0..num_classes-1``. Blank lines are skipped.

    Raises:
        CorruptDataError: one line naming ``path``, the line number and the problem.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise _corrupt(name, path, f"unreadable labels file ({type(err).__name__}: {err})"
                       ) from err
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise _corrupt(name, path, f"{len(fields)} columns, expected 2 (<file name> <label>)",
                           number)
        file_name, label = fields
        parts = PurePath(file_name).parts
        if PurePath(file_name).is_absolute() or ".." in parts or file_name.startswith("~"):
            raise _corrupt(name, path, f"file name {file_name!r} leaves the data folder", number)
        try:
            value = int(label)
        except ValueError:
            raise _corrupt(name, path, f"label {label!r} is not an integer", number) from None
        if not 0 <= value < num_classes:
            raise _corrupt(name, path, f"label {value} is not in 0..{num_classes - 1}", number)
        out.append((number, file_name, value))
    return out


def _read_png(name: str, path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The RGB pixels of image ``path``; :class:`CorruptDataError` if unreadable or not
    ``shape``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise _corrupt(name, path, f"not a readable image ({type(err).__name__}: {err})"
                       ) from err
    if pixels.shape != shape:
        raise _corrupt(name, path, f"image of shape {pixels.shape}, expected {shape}")
    return pixels


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
    """Images and ``key`` labels of CIFAR pickles, read with :mod:`fedctx.data.safe_pickle`
    (never ``pickle.load``: a pickle can run any code it names)."""
    from fedctx.data import safe_pickle

    name = "CIFAR-10" if files and files[0].parent.name == "cifar-10-batches-py" else "CIFAR-100"
    classes = {"labels": 10, "fine_labels": 100, "coarse_labels": 20}[key]
    data, labels = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                entry = safe_pickle.load(fh, encoding="latin1")
        except safe_pickle.UnsafePickleError as err:
            raise CorruptDataError(
                f"{name} file {f} is refused: {_one_line(err)}, which a data file never needs "
                "(only dicts, lists, strings, numbers and numpy arrays are built); not loaded"
            ) from err
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                IndexError, KeyError, MemoryError, RecursionError) as err:
            raise _corrupt(name, f, f"not a complete pickle ({type(err).__name__}: {err})"
                           ) from err
        if not isinstance(entry, dict) or "data" not in entry or key not in entry:
            raise _corrupt(name, f, f"expected a dict with 'data' and {key!r}")
        x = entry["data"]
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2
                and x.shape[1] == 3072):
            what = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise _corrupt(name, f, f"'data' is {what}, expected uint8 (N, 3072)")
        y = entry[key]
        if not (isinstance(y, list | np.ndarray) and len(y) == len(x)
                and all(type(v) is int or isinstance(v, np.integer) for v in y)):
            raise _corrupt(name, f, f"{key!r} is not a list of {len(x)} integers")
        y = np.asarray(y, dtype=np.int64)
        _check_labels(name, f, y, classes)
        data.append(x)
        labels.append(y)
    images = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.concatenate(labels)


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
    """uint8 ``(N, 32, 32, 3)`` -> float32 ``(N, 3, 32, 32)`` in [-1, 1] (``(x/255 - 0.5)/0.5``),
    contiguous in NCHW like every other source: the permuted (channels-last) tensor crashed
    torch 2.14.1's CPU backward of a width-4 ResNet-20 with heap corruption
    (``tests/test_data_sources.py::test_cifar_images_are_contiguous_nchw``)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)
    return x.contiguous()


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
