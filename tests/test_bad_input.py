"""Issue #14, item 12 (partition and config parts) and the model check: bad input stops with one
line (exit 2 from ``python -m fedctx.simulate``) before anything trains: more ``--clients`` than
the data can give a batch each, a ``--config`` path that is not a readable UTF-8 TOML file with
options, a seed out of range, a non-finite float, a ``--model`` unknown or built for other
images."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_corrupt import _write_mnist
from test_data_sources import write_cifar10, write_digits_mat

from fedctx import scenarios as simulations
from fedctx.config import ConfigError, SimConfig, build_parser, load_config_file, resolve
from fedctx.data.partition import check_batch_fits, clients_per_domain, max_clients


def _build(name: str, **options: object):
    return simulations.get_scenario(name).build(SimConfig(scenario=name, **options))


def _simulate(capsys: pytest.CaptureFixture, tmp_path: Path, *argv: str) -> str:
    from fedctx.simulate import main

    rc = main([*argv, "--backend", "inprocess", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("error: "), (rc, err)
    return err


# -- partition: every client holds at least one batch ---------------------------------------------

def test_round_robin_arithmetic_matches_assign_domains() -> None:
    from fedctx.data.partition import assign_domains

    for clients in range(4, 40):
        owner = assign_domains(clients, 4)
        assert clients_per_domain(clients, 4) == np.bincount(owner, minlength=4).tolist()
    caps = [3, 1, 2]
    best = max_clients(caps)
    assert all(c <= cap for c, cap in zip(clients_per_domain(best, 3), caps, strict=True))
    assert any(c > cap for c, cap in zip(clients_per_domain(best + 1, 3), caps, strict=True))


def test_check_batch_fits() -> None:
    check_batch_fits(124, [1000] * 4, 32)  # 31 clients a domain, 32 images each
    with pytest.raises(ValueError, match=r"--clients 125: a client would hold 31 training images, "
                       r"fewer than one batch \(--batch-size 32\); the largest --clients that "
                       r"works is 124"):
        check_batch_fits(125, [1000] * 4, 32)
    with pytest.raises(ValueError, match=r"use --batch-size <= 20"):
        check_batch_fits(2, [20, 1000], 32)


def test_digits_refuses_clients_below_one_batch() -> None:
    with pytest.raises(ValueError, match="hold 20 training images.*works is 124"):
        _build("digits", clients=200)
    start = time.perf_counter()  # arithmetic, no array of a trillion clients
    with pytest.raises(ValueError, match="hold 0 training images"):
        _build("digits", clients=10**12)
    assert time.perf_counter() - start < 2.0


def test_simulate_too_many_clients_is_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    err = _simulate(capsys, tmp_path, "--clients", "4000", "--min-clients", "2")
    assert "a client would hold 1 training images" in err and "124" in err


def test_real_digit_scenarios_name_the_largest_clients(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"  # MNIST written here: 1,500 training images (2 clients)
    _write_mnist(tmp_path, n=30)
    header = np.array([0x803, 1500, 28, 28], dtype=">u4").tobytes()
    (raw / "train-images-idx3-ubyte").write_bytes(header + bytes(1500 * 784))
    (raw / "train-labels-idx1-ubyte").write_bytes(
        np.array([0x801, 1500], dtype=">u4").tobytes()
        + (np.arange(1500) % 10).astype(np.uint8).tobytes())
    write_digits_mat(tmp_path / "SVHN" / "train_32x32.mat", 800)  # 1 client of 743
    write_digits_mat(tmp_path / "SVHN" / "test_32x32.mat", 20)
    root = str(tmp_path)
    assert len(_build("mnist-svhn", clients=3, data_dir=root).clients) == 3
    with pytest.raises(ValueError, match=r"--clients 4: svhn would need 2 clients x 743 images "
                       r"but has 800 training images; the largest --clients that works is 3"):
        _build("mnist-svhn", clients=4, data_dir=root)
    with pytest.raises(ValueError, match=r"--batch-size 800: each client holds 743 training "
                       r"images, fewer than one batch; use --batch-size <= 743"):
        _build("mnist-svhn", clients=2, data_dir=root, batch_size=800)


def test_cifar_dirichlet_refuses_clients_below_one_batch(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=40)  # 200 training images
    assert len(_build("cifar10-dirichlet", clients=6, data_dir=str(tmp_path)).clients) == 6
    with pytest.raises(ValueError, match=r"--clients 7: a client would hold 28 training images "
                       r"on average, fewer than one batch \(--batch-size 32\); the largest "
                       r"--clients that works is 6"):
        _build("cifar10-dirichlet", clients=7, data_dir=str(tmp_path))


# -- config: --config paths, seed range, finite floats --------------------------------------------

def _config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--config: ") and str(path) in message
    return message


def test_config_path_that_is_not_a_readable_toml_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert "is a directory" in _config_error(tmp_path)
    empty = tmp_path / "empty.toml"
    for text in ("", "\n  \n", "# only a comment\n"):
        empty.write_text(text)
        assert "is empty" in _config_error(empty)
    latin = tmp_path / "latin.toml"
    latin.write_bytes('out = "r\xe9sultats"\n'.encode("latin-1"))
    assert "not UTF-8" in _config_error(latin)
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    assert "not valid TOML" in _config_error(bad)
    fifo = tmp_path / "fifo"
    import os

    os.mkfifo(fifo)  # reading it would block forever
    assert "not a regular file" in _config_error(fifo)
    secret = tmp_path / "secret.toml"
    secret.write_text("rounds = 3\n")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads any file: simulate the denial
    assert "cannot read" in _config_error(secret) and "Permission denied" in _config_error(secret)


def test_simulate_config_directory_is_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    err = _simulate(capsys, tmp_path, "--config", str(tmp_path))
    assert "is a directory" in err


def _resolve(*argv: str) -> SimConfig:
    return resolve(build_parser("x", "x").parse_args(list(argv)))


def test_seed_range() -> None:
    assert _resolve("--seed", str(2**32 - 1)).seed == 2**32 - 1
    for seed in (str(2**32), str(10**30), "-1"):
        with pytest.raises(ConfigError, match="--seed: invalid value"):
            _resolve("--seed", seed)
    torch.Generator().manual_seed((2**32 - 1) * 1_000_003 + 10**6 * 10_007 + 10**6)  # in range


@pytest.mark.parametrize("flag", ["--lr", "--momentum", "--fraction", "--weight-decay",
                                  "--cpus-per-client", "--gpus-per-client"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_float_options_must_be_finite(flag: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{flag}: invalid value '{value}'; must be a finite"):
        _resolve(f"{flag}={value}")


def test_non_finite_floats_in_config_files_and_fields(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    for text in ("lr = inf\n", "lr = nan\n", "weight-decay = +inf\n"):
        cfg.write_text(text)
        with pytest.raises(ConfigError, match="must be a finite number"):
            load_config_file(cfg)
    cfg.write_text('model = 3\n')  # a number where a name is expected
    with pytest.raises(ConfigError, match="--model: invalid value 3; expected str"):
        load_config_file(cfg)
    with pytest.raises(ConfigError, match="--weight-decay: invalid value inf; must be a finite"):
        SimConfig(weight_decay=float("inf")).validate()


# -- model: unknown or built for other images ------------------------------------------------------

def test_scenarios_list_the_models_that_fit() -> None:
    from fedctx.models import MODELS

    for name in simulations.available():
        scenario = simulations.get_scenario(name)
        assert scenario.model in scenario.models and set(scenario.models) <= set(MODELS)
        assert scenario.check_model("") == scenario.model
        for model in scenario.models:
            assert scenario.check_model(model) == model
    digits = simulations.get_scenario("digits")
    with pytest.raises(ValueError) as info:
        digits.check_model("vit-tiny")
    assert str(info.value) == ("--model: model 'vit-tiny' does not fit scenario 'digits' (28x28 "
                               "images); compatible models for 'digits': digits-cnn, resnet20, "
                               "resnet32, resnet18")
    with pytest.raises(ValueError, match="unknown model 'vit-huge'.*digits-cnn"):
        digits.check_model("vit-huge")
    with pytest.raises(ValueError, match="'digits-cnn' does not fit scenario 'cifar10-dirichlet' "
                       r"\(32x32 images\)"):
        simulations.get_scenario("cifar10-dirichlet").check_model("digits-cnn")


@pytest.mark.parametrize("shape", [(3, 28, 28), (3, 32, 32)])
def test_model_lists_are_exactly_the_models_that_run(shape: tuple[int, ...]) -> None:
    from fedctx.models import MODELS, make_model

    listed = {s.input_shape: s.models for s in map(simulations.get_scenario,
                                                       simulations.available())}[shape]
    x = torch.randn(2, *shape)
    for name in MODELS:  # small variants: what matters is the image size they accept
        kwargs = ({"width": 4} if "width" in inspect.signature(MODELS[name]).parameters else
                  {"dim": 16, "depth": 1})
        model = make_model(name, norm="batch", num_contexts=1, num_classes=10, **kwargs)
        try:
            with torch.no_grad():
                runs = model(x).shape == (2, 10)
        except RuntimeError:
            runs = False
        assert runs == (name in listed), (name, shape)


def test_simulate_incompatible_model_is_one_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    err = _simulate(capsys, tmp_path, "--model", "vit-tiny", "--clients", "4")
    assert "'vit-tiny' does not fit scenario 'digits'" in err and "digits-cnn" in err


# -- --norm-options ----------------------------------------------------------------------------

def test_norm_options_are_parsed_into_typed_keyword_arguments() -> None:
    from fedctx.config import parse_norm_options

    assert parse_norm_options("") == {}
    assert parse_norm_options("min_batch_values=2, eps=1e-3,affine=false,mode=x") == {
        "min_batch_values": 2, "eps": 1e-3, "affine": False, "mode": "x"}


@pytest.mark.parametrize(("options", "expected"), [
    ("min_batch_values", "expected KEY=VALUE"),
    ("min_batch_values=2,min_batch_values=3", "given twice"),
    ("num_contexts=3", "set by the model"),
    ("foo=1", "unknown option(s) ['foo']"),
    ("min_batch_values=1", "min_batch_values must be an int >= 2"),
])
def test_bad_norm_options_are_one_line(options: str, expected: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    err = _simulate(capsys, tmp_path, "--norm-options", options)
    assert expected in err and "--norm-options" in err


def test_norm_options_reach_every_norm_layer_of_the_model() -> None:
    from fedctx.federated.runtime import build_model
    from fedctx.norm import ContextNorm

    config = SimConfig(norm_options="min_batch_values=3")
    model = build_model(config, _build("digits", clients=4))
    layers = [m for m in model.modules() if isinstance(m, ContextNorm)]
    assert layers and {m.min_batch_values for m in layers} == {3}
    default = build_model(SimConfig(), _build("digits", clients=4))
    assert {m.min_batch_values for m in default.modules() if isinstance(m, ContextNorm)} == {8}
