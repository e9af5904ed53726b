"""Scenarios build (real data where present, tiny written files for SVHN/SynthDigits/CIFAR), the
missing-data path, and ``python -m fedctx.data show``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_sources import write_cifar10, write_digits_mat, write_svhn

from fedctx import scenarios as simulations
from fedctx.config import SimConfig, build_parser, resolve
from fedctx.data import FederatedDataset, MissingDataError
from fedctx.scenarios.__main__ import main as data_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _build(name: str, **options: object) -> FederatedDataset:
    return simulations.get_scenario(name).build(SimConfig(scenario=name, **options))


def _check(data: FederatedDataset, clients: int, per_client: int | None = None) -> None:
    assert len(data.clients) == clients
    for c in data.clients:
        assert c.x.shape[1:] == data.input_shape and c.x.dtype == torch.float32
        assert -1.0 <= float(c.x.min()) and float(c.x.max()) <= 1.0
        assert per_client is None or len(c) == per_client
    assert set(data.test) == set(range(data.num_contexts))


def _linked_root(real: Path, tmp: Path, *names: str) -> Path:
    """A data root holding links to real data sets (``names``) beside tiny written files."""
    for name in names:
        if not (real / name).exists():
            pytest.skip(f"{name} not in FEDCTX_DATA")
        (tmp / name).symlink_to(real / name)
    return tmp


def test_registry_lists_all_scenarios() -> None:
    assert set(simulations.available()) >= {"digits", "digits5", "mnist-usps", "mnist-mnistm",
                                             "mnist-svhn", "cifar10-dirichlet"}
    for name in simulations.available():
        assert simulations.get_scenario(name).defaults(), f"configs/{name}.toml missing"


def test_digits_embedded_default() -> None:
    data = _build("digits", clients=8)
    _check(data, 8)
    assert data.context_names == ["mnist", "usps", "mnistm", "mnist-inverted"]


@pytest.mark.parametrize("name,target", [("mnist-usps", "usps"), ("mnist-mnistm", "mnistm")])
def test_adaptation_pairs_real(real_data: Path, name: str, target: str) -> None:
    data = _build(name, clients=4, data_dir=str(real_data))
    _check(data, 4, per_client=743)
    assert data.context_names == ["mnist", target] == data.real_domains
    assert [c.context for c in data.clients] == [0, 1, 0, 1]
    assert all(len(y) == 2000 for _, y in data.test.values())
    again = _build(name, clients=4, data_dir=str(real_data))
    assert all(torch.equal(a.y, b.y) and torch.equal(a.x, b.x)
               for a, b in zip(data.clients, again.clients, strict=True))


def test_mnist_svhn_with_written_svhn(real_data: Path, tmp_path: Path) -> None:
    root = _linked_root(real_data, tmp_path, "MNIST")
    write_svhn(root, n_train=800, n_test=50)
    data = _build("mnist-svhn", clients=2, data_dir=str(root))
    _check(data, 2, per_client=743)
    assert len(data.test[1][1]) == 50  # the whole (tiny) test split


def test_digits5_all_domains(real_data: Path, tmp_path: Path) -> None:
    root = _linked_root(real_data, tmp_path, "MNIST", "USPS", "mnist_m")
    write_svhn(root, n_train=743, n_test=30)
    for split, n in (("train", 743), ("test", 30)):
        write_digits_mat(root / "SynthDigits" / f"synth_{split}_32x32.mat", n)
    data = _build("digits5", clients=5, data_dir=str(root))
    _check(data, 5, per_client=743)
    assert data.context_names == ["mnist", "svhn", "usps", "synthdigits", "mnistm"]
    assert [c.context for c in data.clients] == [0, 1, 2, 3, 4] and not data.missing_domains


def test_digits5_missing_domains(real_data: Path, tmp_path: Path) -> None:
    root = _linked_root(real_data, tmp_path, "MNIST", "USPS", "mnist_m")
    with pytest.raises(MissingDataError, match="SVHN not found in .*--allow-missing-domains"):
        _build("digits5", clients=5, data_dir=str(root))
    data = _build("digits5", clients=6, data_dir=str(root), allow_missing_domains=True)
    _check(data, 6, per_client=743)
    assert data.real_domains == data.context_names == ["mnist", "usps", "mnistm"]
    assert data.missing_domains == ["svhn", "synthdigits"]


def test_nothing_on_disk_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = data_main(["show", "digits5", "--data-dir", str(tmp_path), "--allow-missing-domains"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith("error: MNIST not found in") and str(tmp_path / "MNIST") in err


def test_show_tells_a_mistake_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An unknown scenario (argparse printed its usage first) and an ``--out`` under a file
    (a traceback from ``mkdir``, after the data were built): one line, status 2."""
    with pytest.raises(SystemExit) as info:
        data_main(["show", "nope"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: ") and "\n" not in err
    assert "'nope'" in err and "digits" in err
    (tmp_path / "file").write_text("mine\n")
    assert data_main(["show", "digits", "--out", str(tmp_path / "file" / "pngs")]) == 2
    err = capsys.readouterr().err.strip()
    out, file = tmp_path / "file" / "pngs", tmp_path / "file"
    assert err == f"error: --out {out}: {file} is a file, not a folder"


def test_cifar10_dirichlet_with_written_cifar(tmp_path: Path) -> None:
    _, labels = write_cifar10(tmp_path, per_batch=40)
    data = _build("cifar10-dirichlet", clients=4, data_dir=str(tmp_path))
    _check(data, 4)
    assert data.input_shape == (3, 32, 32) and data.context_names == ["cifar10"]
    counts = data.label_counts().sum(0).numpy()
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=10))


def test_allow_missing_domains_flag() -> None:
    args = build_parser("x", "x").parse_args(["--allow-missing-domains"])
    assert resolve(args).allow_missing_domains is True
    assert SimConfig().allow_missing_domains is False


def test_show_writes_pngs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert data_main(["show", "digits", "--clients", "8", "--out", str(tmp_path)]) == 0
    for kind in ("samples", "labels"):
        path = tmp_path / f"digits-{kind}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out


def test_show_real_scenario(real_data: Path, tmp_path: Path) -> None:
    rc = data_main(["show", "mnist-usps", "--clients", "4", "--out", str(tmp_path),
                    "--data-dir", str(real_data)])
    assert rc == 0 and (tmp_path / "mnist-usps-labels.png").read_bytes()[:8] == PNG_MAGIC
