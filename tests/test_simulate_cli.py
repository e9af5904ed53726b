"""``python -m fedctx.simulate`` as a user runs it: options, errors, and real runs on Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedctx.config import ConfigError, SimConfig
from fedctx.simulate import main, parse_config

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--clients", "8", "--rounds", "4", "--fraction", "0.5", "--width", "8", "--seed", "3"]


def simulate(python: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "fedctx.simulate", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_help_documents_every_option(python: str) -> None:
    proc = simulate(python, "--help")
    assert proc.returncode == 0
    for name in SimConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in proc.stdout
    assert "--config" in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["--norm", "bogus"], ["--norm", "bogus", "context"]),
    (["--strategy", "nope"], ["--strategy", "fedavg", "krum"]),
    (["--scenario", "nowhere"], ["--scenario", "digits"]),
    (["--norm-policy", "sometimes"], ["--norm-policy", "per-context", "local"]),
    (["--clients", "zero"], ["--clients", "int"]),
    (["--fraction", "1.5"], ["--fraction", "<= 1.0"]),
])
def test_invalid_values_exit_with_one_line(args: list[str], words: list[str], capsys,
                                           tmp_path: Path) -> None:
    """The command's own code, in this process (the command line's path, which resolves the
    options while Ray starts beside and kills that Ray, runs in a subprocess in
    ``test_startup.py``)."""
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "run").exists()  # nothing started


def test_config_file_and_flags_combine(tmp_path: Path) -> None:
    cfg = tmp_path / "exp.toml"
    cfg.write_text('rounds = 3\nlr = 0.2\nnorm-policy = "local"\n')
    config = parse_config(["--config", str(cfg), "--lr", "0.01"])
    assert (config.rounds, config.lr, config.norm_policy) == (3, 0.01, "local")
    assert config.clients == 20  # the digits scenario's default
    cfg.write_text("roundz = 3\n")
    with pytest.raises(ConfigError, match="unknown option 'roundz'"):
        parse_config(["--config", str(cfg)])


def test_strategy_shorthand_implies_policy() -> None:
    assert parse_config(["--strategy", "fedbn"]).norm_policy == "local"
    assert parse_config(["--strategy", "silobn"]).norm_policy == "stats-local"
    assert parse_config(["--strategy", "fedbn", "--norm-policy", "average"]).norm_policy == \
        "average"


@pytest.mark.slow
def test_end_to_end_on_ray(python: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = simulate(python, *SMALL, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Final test accuracy per context" in proc.stdout
    # without --verbose, neither Flower's nor Ray's own log lines reach the terminal
    assert "WARNING" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    for name in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png", "model.pt",
                 "label_counts.png",
                 "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["accuracy_per_context"]) == {"mnist", "usps", "mnistm", "mnist-inverted"}
    assert summary["accuracy"] > 0.3  # chance is 0.1
    assert len(metrics(out)) == 4
    assert json.loads((out / "config.json").read_text())["clients"] == 8


@pytest.mark.slow
def test_kill_and_resume_on_ray_equals_uninterrupted_inprocess(python: str, tmp_path: Path
                                                               ) -> None:
    """kill -9 a real Ray run mid-way, resume it, and compare with an uninterrupted run of the
    in-process backend: same seed, same sampling, same final metrics."""
    args = [*SMALL, "--norm-policy", "local", "--rounds", "5"]
    ref = tmp_path / "ref"
    proc = simulate(python, *args, "--backend", "inprocess", "--out", str(ref))
    assert proc.returncode == 0, proc.stderr[-2000:]

    out = tmp_path / "killed"
    victim = subprocess.Popen([python, "-m", "fedctx.simulate", *args, "--out", str(out)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2:
            break
        time.sleep(0.2)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    finished = len(metrics(out))
    assert 2 <= finished < 5

    proc = simulate(python, *args, "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Resuming from round" in proc.stdout
    got, want = metrics(out), metrics(ref)
    assert [r["round"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(got, want, strict=True):
        assert a["accuracy_per_context"] == b["accuracy_per_context"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9, abs=1e-12)


def test_every_round_failed_exits_1_and_records_why(python: str, tmp_path: Path) -> None:
    """--max-examples below every client's size: screening rejects every reply, each round keeps
    the model and is listed in failed_rounds, and the run exits 1 with one line (#14 items 6, 8).
    """
    out = tmp_path / "run"
    proc = simulate(python, "--clients", "4", "--rounds", "2", "--width", "4", "--backend",
                    "inprocess", "--max-examples", "1", "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: every round failed (2 of 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((out / "summary.json").read_text())["failed_rounds"] == [1, 2]
    first = metrics(out)[0]
    assert first["failed"] and first["rejected_by_check"] == {"num-examples": first["rejected"]}
