"""The embedded default data set: real digits from three real domains, shipped in the package.

``fedctx/data/embedded/digits.npz`` holds stratified subsets of three real data sets (no download,
no outside folder at run time). Attribution and licences: ``fedctx/data/embedded/README.md``.

=============  ======================================  ==========  ==========
domain         source                                  train       test
=============  ======================================  ==========  ==========
``mnist``      MNIST (LeCun, Cortes, Burges)           100/class   30/class
``usps``       USPS (Hull 1994), resized 16->28        100/class   30/class
``mnistm``     MNIST-M (Ganin & Lempitsky 2015)        100/class   30/class
=============  ======================================  ==========  ==========

A fourth, derived domain, ``mnist-inverted``, is the colour-inverted image of a *disjoint* MNIST
subset (also stored), a standard synthetic domain shift.

Images are stored as uint8, 28x28 (grey) or 28x28x3 (MNIST-M); :func:`load_embedded_digits` turns
them into the common form of the digits scenarios: float32 ``(N, 3, 28, 28)``, grey replicated to
three channels, scaled to [-1, 1] (``(x / 255 - 0.5) / 0.5``, FedBN's convention).

Rebuild from the real data sets with ``python -m fedctx.data.embedded --data-dir DATA``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EMBEDDED_PATH = Path(__file__).parent / "embedded" / "digits.npz"
EMBEDDED_DOMAINS = ("mnist", "usps", "mnistm", "mnist-inverted")
TRAIN_PER_CLASS = 100
TEST_PER_CLASS = 30


@dataclass(frozen=True)
class DomainData:
    """Images ``(N, 3, 28, 28)`` float32 in [-1, 1] and labels ``(N,)`` int64 of one domain."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def to_common_form(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, 3)`` -> float32 ``(N, 3, H, W)`` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.sub(0.5).div(0.5).contiguous()


def load_embedded_digits(path: Path = EMBEDDED_PATH) -> dict[str, DomainData]:
    """Load the four embedded domains in the common form, keyed by domain name."""
    if not path.exists():
        raise FileNotFoundError(
            f"embedded data missing at {path}; reinstall fedctx or rebuild it with "
            "`python -m fedctx.data.embedded --data-dir DIR`"
        )
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    out: dict[str, DomainData] = {}
    for name in ("mnist", "usps", "mnistm"):
        out[name] = DomainData(
            name,
            to_common_form(arrays[f"{name}_x_train"]),
            torch.from_numpy(arrays[f"{name}_y_train"]).long(),
            to_common_form(arrays[f"{name}_x_test"]),
            torch.from_numpy(arrays[f"{name}_y_test"]).long(),
        )
    out["mnist-inverted"] = DomainData(
        "mnist-inverted",
        to_common_form(255 - arrays["mnist2_x_train"]),
        torch.from_numpy(arrays["mnist2_y_train"]).long(),
        to_common_form(255 - arrays["mnist2_x_test"]),
        torch.from_numpy(arrays["mnist2_y_test"]).long(),
    )
    return out


def _stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator,
                exclude: np.ndarray | None = None) -> np.ndarray:
    chosen = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        if exclude is not None:
            idx = np.setdiff1d(idx, exclude)
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def build(data_dir: Path, out: Path = EMBEDDED_PATH, seed: int = 0) -> None:
    """Write ``digits.npz`` from the real MNIST, USPS and MNIST-M under ``data_dir``."""
    from PIL import Image
    from torchvision.datasets import MNIST, USPS

    from fedctx.data.sources import read_mnistm

    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for train in (True, False):
        split = "train" if train else "test"
        per_class = TRAIN_PER_CLASS if train else TEST_PER_CLASS
        mnist = MNIST(str(data_dir), train=train, download=False)
        mx, my = mnist.data.numpy(), mnist.targets.numpy()
        first = _stratified(my, per_class, rng)
        second = _stratified(my, per_class, rng, exclude=first)
        arrays[f"mnist_x_{split}"], arrays[f"mnist_y_{split}"] = mx[first], my[first]
        arrays[f"mnist2_x_{split}"], arrays[f"mnist2_y_{split}"] = mx[second], my[second]

        usps = USPS(str(data_dir / "USPS"), train=train, download=False)
        uy = np.asarray(usps.targets)
        idx = _stratified(uy, per_class, rng)
        arrays[f"usps_x_{split}"] = np.stack(
            [np.asarray(Image.fromarray(usps.data[i]).resize((28, 28), Image.BILINEAR))
             for i in idx])
        arrays[f"usps_y_{split}"] = uy[idx]

        mm_x, mm_y = read_mnistm(data_dir / "mnist_m", train=train)
        idx = _stratified(mm_y, per_class, rng)
        arrays[f"mnistm_x_{split}"] = np.stack(
            [np.asarray(Image.fromarray(mm_x[i]).resize((28, 28), Image.BILINEAR)) for i in idx])
        arrays[f"mnistm_y_{split}"] = mm_y[idx]
    arrays = {k: v.astype(np.uint8 if "_x_" in k else np.int64) for k, v in arrays.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rebuild the embedded digits data set.")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="folder with MNIST/, USPS/ and mnist_m/ (torchvision layout)")
    parser.add_argument("--out", type=Path, default=EMBEDDED_PATH)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.data_dir, args.out, args.seed)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
