"""The wheel, installed in a fresh virtual environment outside the repository, runs the default
and ``digits5`` scenarios with their configured defaults (the scenario TOML files are package
data, not the repository's ``configs/`` folder).

Nothing is downloaded: the wheel is built without build isolation and installed without
dependencies; the new environment sees the dependencies through a ``.pth`` file naming this
environment's ``site-packages`` (whose own ``.pth`` files, such as the editable install's, are
not run: only a site directory's are).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md")

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def package_dirs() -> dict[str, Path]:
    """Installed package -> repository folder (``[tool.setuptools]`` of ``pyproject.toml``)."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setup.get("package-dir", {})
    return {name: REPO / mapped.get(name, name.replace(".", "/")) for name in setup["packages"]}


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the new environment's python, a working folder outside the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    assert not tmp.resolve().is_relative_to(REPO)
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in {p.relative_to(REPO).parts[0] for p in package_dirs().values()}:
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(dist), str(src)], cwd=tmp)
    (wheel,) = dist.glob("fedctx-*.whl")

    # Only fedctx (and its metadata) at the top; every module of every mapped folder inside it.
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"fedctx", wheel.name.split("-py3")[0]
                                                + ".dist-info"}, sorted(names)
    for package, folder in package_dirs().items():
        for path in list(folder.glob("*.py")) + list(folder.glob("*.toml")):
            assert f"{package.replace('.', '/')}/{path.name}" in names, (package, path.name)
    assert "fedctx/configs/digits5.toml" in names

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          str(wheel)], cwd=tmp)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp).stdout.strip())
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "fedctx-test-deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    work = tmp / "work"
    work.mkdir()
    return python, work


def test_wheel_installs_only_fedctx(wheel_env: tuple[Path, Path]) -> None:
    python, work = wheel_env
    code = ("import importlib.util as u, fedctx, fedctx.strategies, fedctx.scenarios, "
            "fedctx.configs\n"
            "print(fedctx.__file__, fedctx.strategies.__file__, fedctx.scenarios.__file__)\n"
            "print(u.find_spec('strategies'), u.find_spec('simulations'), u.find_spec('configs'))\n"
            "print(fedctx.scenarios.get_scenario('digits5').defaults()['lr'])\n"
            "import fedctx.norm._mixkernel as k; print(k._SOURCE.is_file())")  # uan/mixture kernel
    lines = _run([str(python), "-c", code], cwd=work).stdout.splitlines()
    venv = python.parent.parent
    for file in lines[0].split():
        assert Path(file).resolve().is_relative_to(venv.resolve()), file
    assert lines[1:] == ["None None None", "0.01", "True"]


def _simulate(python: Path, work: Path, out: Path, *flags: str) -> dict:
    _run([str(python), "-m", "fedctx.simulate", "--rounds", "1", "--width", "4",
          "--backend", "inprocess", "--out", str(out), *flags], cwd=work)
    return json.loads((out / "config.json").read_text())


def _toml(name: str) -> dict:
    raw = tomllib.loads((REPO / "configs" / f"{name}.toml").read_text())
    return {k.replace("-", "_"): v for k, v in raw.items()}


def test_wheel_runs_default_scenario(wheel_env: tuple[Path, Path]) -> None:
    python, work = wheel_env
    config = _simulate(python, work, work / "default", "--clients", "4")
    assert config["scenario"] == "digits"
    expected = {k: v for k, v in _toml("digits").items() if k not in ("clients", "rounds")}
    assert {k: config[k] for k in expected} == expected
    summary = json.loads((work / "default" / "summary.json").read_text())
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["clients"] == 4


def test_wheel_runs_digits5_with_fedbn_defaults(wheel_env: tuple[Path, Path],
                                                real_data: Path) -> None:
    python, work = wheel_env
    config = _simulate(python, work, work / "digits5", "--scenario", "digits5",
                       "--data-dir", str(real_data), "--allow-missing-domains",
                       "--clients", "3", "--min-clients", "3")
    assert config["scenario"] == "digits5"
    assert (config["lr"], config["momentum"], config["batch_size"], config["fraction"]) == (
        0.01, 0.0, 32, 1.0)  # FedBN's settings, from the wheel's fedctx/configs/digits5.toml
    overridden = ("clients", "min_clients", "rounds")
    expected = {k: v for k, v in _toml("digits5").items() if k not in overridden}
    assert {k: config[k] for k in expected} == expected
