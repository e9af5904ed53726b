"""Issue #14 items 1, 2, 3, 7, 10 (checkpoints), 11, 12 (``--out``): nothing a user has is
deleted or overwritten silently, ``--resume`` continues exactly the run that was started,
checkpoints hold only tensors and plain types, a config file cannot run code from the working
directory, errors say what happened (a plugin's with its traceback)."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from fedctx.config import ConfigError, SimConfig
from fedctx.federated.norm_strategy import StrategyStateError
from fedctx.federated.run_config import default_out, to_run_config
from fedctx.federated.server import Experiment
from fedctx.results import CheckpointError, RunRecorder, load_checkpoint, read_checkpoint
from fedctx.simulate import main, parse_config

REPO = Path(__file__).resolve().parent.parent
TINY = ["--backend", "inprocess", "--clients", "4", "--rounds", "2", "--fraction", "1.0",
        "--width", "4", "--seed", "5"]


def simulate(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    torch.set_num_threads(1)
    rc = main([*TINY, *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip()


def one_line(err: str) -> str:
    assert "\n" not in err and err.startswith("error: ") and "Traceback" not in err, err
    return err


def rounds_in(out: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-round run (shared by the tests that only read it or copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# -- item 1: nothing is deleted or overwritten silently ------------------------------------------

def test_a_second_run_into_a_used_out_is_refused_unless_overwrite(
        capsys: pytest.CaptureFixture, finished_run: Path, tmp_path: Path) -> None:
    out = copy_run(finished_run, tmp_path / "run")
    before = (out / "metrics.jsonl").read_bytes()
    rc, _, err = simulate(capsys, "--out", str(out), "--lr", "0.01")
    assert rc == 2 and "another run's results" in one_line(err) and "--overwrite" in err
    assert (out / "metrics.jsonl").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    rc, _, err = simulate(capsys, "--out", str(out), "--lr", "0.01", "--overwrite")
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only a run's files


def test_a_folder_of_the_users_files_is_refused(capsys: pytest.CaptureFixture,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("...")
    rc, _, err = simulate(capsys, "--out", str(out))
    assert rc == 2 and "files of yours (chapter1.tex)" in one_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.tex"]


def test_a_typo_in_the_data_options_wipes_nothing(capsys: pytest.CaptureFixture,
                                                   finished_run: Path, tmp_path: Path) -> None:
    out = copy_run(finished_run, tmp_path / "run")
    names = sorted(p.name for p in out.iterdir())
    for overwrite in ([], ["--overwrite"]):
        rc, _, err = simulate(capsys, "--out", str(out), *overwrite, "--scenario", "mnist-usps",
                              "--data-dir", str(tmp_path / "no-such-folder"))
        assert rc == 2, err
        one_line(err)
        assert sorted(p.name for p in out.iterdir()) == names
    assert rounds_in(out) == [1, 2]


def test_default_out_names_identify_the_experiment(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    a = parse_config(["--clients", "4"]).out
    assert parse_config(["--clients", "4", "--lr", "0.01"]).out != a
    assert parse_config(["--clients", "4", "--local-epochs", "2"]).out != a
    assert parse_config(["--clients", "4", "--verbose"]).out == a  # does not change results
    assert a == default_out(SimConfig(clients=4))
    Path(a).mkdir(parents=True)
    (Path(a) / "metrics.jsonl").write_text("{}\n")
    assert parse_config(["--clients", "4"]).out == a + "-2"  # the same experiment again
    from fedctx.federated.run_config import numbered_out

    assert numbered_out(SimConfig(clients=4, resume=True)) == a  # --resume: the last one used


# -- item 12: --out that is a file or cannot be written ----------------------------------------

def test_out_that_is_a_file_or_unwritable_is_one_line(capsys: pytest.CaptureFixture,
                                                      tmp_path: Path) -> None:
    afile = tmp_path / "results.txt"
    afile.write_text("x")
    rc, _, err = simulate(capsys, "--out", str(afile))
    assert rc == 2 and "is a file, not a folder" in one_line(err)
    rc, _, err = simulate(capsys, "--out", str(afile / "run"))
    assert rc == 2 and "is a file, not a folder" in one_line(err)
    rc, _, err = simulate(capsys, "--out", "/sys/fedctx-run")  # EACCES, even for root
    assert rc == 2 and "not writable" in one_line(err)


# -- item 2: --resume resumes the experiment that was started ------------------------------------

def test_resume_reads_the_saved_config_and_refuses_contradictions(
        capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc, _, err = simulate(capsys, "--out", str(out), "--lr", "0.02", "--rounds", "1")
    assert rc == 0, err
    rc, _, err = simulate(capsys, "--out", str(out), "--resume", "--lr", "0.05")
    assert rc == 2 and "--lr 0.05 contradicts" in one_line(err) and "0.02" in err
    rc, _, err = simulate(capsys, "--out", str(out), "--resume", "--norm-policy", "local")
    assert rc == 2 and "--norm-policy local contradicts" in one_line(err)
    rc, out_text, err = simulate(capsys, "--out", str(out), "--resume", "--rounds", "2",
                                 "--verbose")
    assert rc == 0, err
    assert "Resuming from round 1" in out_text
    assert json.loads((out / "config.json").read_text())["lr"] == 0.02
    assert rounds_in(out) == [1, 2]
    rc, out_text, err = simulate(capsys, "--out", str(out), "--resume")
    assert rc == 0 and "has finished all its 2 rounds" in out_text, err
    rc, _, err = simulate(capsys, "--out", str(out), "--resume", "--rounds", "1")
    assert rc == 2 and "fewer than the 2 rounds" in one_line(err)


def test_resume_of_a_run_saved_before_an_option_existed_reads_its_old_value(
        capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """A checkpoint written before ``--cohort-sums`` existed has no such key: the run used the
    option's old value, so ``--resume --cohort-sums`` contradicts it (not silently ignored)."""
    out = tmp_path / "run"
    rc, _, err = simulate(capsys, "--out", str(out), "--rounds", "1")
    assert rc == 0, err
    ckpt = read_checkpoint(out / "checkpoint.pt")
    del ckpt["config"]["cohort_sums"]
    torch.save(ckpt, out / "checkpoint.pt")
    rc, _, err = simulate(capsys, "--out", str(out), "--resume", "--rounds", "2",
                          "--cohort-sums")
    assert rc == 2 and "--cohort-sums True contradicts" in one_line(err)
    rc, _, err = simulate(capsys, "--out", str(out), "--resume", "--rounds", "2")
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["cohort_sums"] is False
    assert rounds_in(out) == [1, 2]


def test_resume_without_a_checkpoint_is_one_line(capsys: pytest.CaptureFixture,
                                                 tmp_path: Path) -> None:
    rc, _, err = simulate(capsys, "--out", str(tmp_path / "nothing"), "--resume")
    assert rc == 2 and "no checkpoint" in one_line(err)


def test_a_corrupt_checkpoint_is_named_and_the_previous_round_is_used(
        capsys: pytest.CaptureFixture, finished_run: Path, tmp_path: Path) -> None:
    out = copy_run(finished_run, tmp_path / "run")
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="checkpoint.pt is corrupt"):
        read_checkpoint(ckpt)
    state, note = load_checkpoint(out)
    assert state["round"] == 1 and note.startswith("checkpoint.pt is corrupt: ")
    rc, text, err = simulate(capsys, "--out", str(out), "--resume", "--rounds", "3")
    assert rc == 0, err
    assert "checkpoint.pt is corrupt" in text and "Resuming from round 1" in text
    assert rounds_in(out) == [1, 2, 3]
    assert read_checkpoint(out / "checkpoint.prev.pt")["round"] == 2

    (out / "checkpoint.prev.pt").write_bytes(b"not a checkpoint")
    ckpt.write_bytes(b"")
    rc, _, err = simulate(capsys, "--out", str(out), "--resume", "--rounds", "4")
    assert rc == 2 and "checkpoint.pt is corrupt" in one_line(err)


def _experiment(tmp_path: Path, **overrides) -> tuple[SimConfig, Experiment]:
    values = dict(clients=4, rounds=2, fraction=1.0, min_clients=2, width=4,
                  out=str(tmp_path / "run"), backend="inprocess")
    values.update(overrides)
    config = SimConfig(**values).validate()
    run_config = to_run_config(config)
    return config, Experiment(config, run_config, RunRecorder(Path(config.out), config.rounds))


def _run(config: SimConfig, experiment: Experiment) -> None:
    from fedctx.federated.client import app as client_app
    from fedctx.federated.local import InProcessGrid

    torch.set_num_threads(1)
    experiment.run(InProcessGrid(client_app, config.clients, run_config=to_run_config(config)))


class Killed(BaseException):
    pass


def test_a_round_is_recorded_only_with_its_checkpoint(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """A kill while round 2's checkpoint is written: metrics.jsonl and the console show only the
    rounds that --resume sees."""
    config, experiment = _experiment(tmp_path)
    save = experiment.save_checkpoint

    def save_then_die(server_round: int) -> None:
        if server_round == 2:
            raise Killed
        save(server_round)

    experiment.save_checkpoint = save_then_die
    with pytest.raises(Killed):
        _run(config, experiment)
    out = Path(config.out)
    assert rounds_in(out) == [1]
    assert read_checkpoint(out / "checkpoint.pt")["round"] == 1
    assert "[round   2/2]" not in capsys.readouterr().out


# -- items 3 and 10: strategy state in checkpoints -----------------------------------------------

PLUGIN = '''
import threading

from flwr.serverapp.strategy import FedAvg


class Locked(FedAvg):
    """Keeps a lock it creates while training: a checkpoint cannot hold it."""

    def aggregate_train(self, server_round, replies):
        self.guard = threading.Lock()
        return super().aggregate_train(server_round, replies)


class Counting(FedAvg):
    """Declares its state: the rounds it aggregated (and keeps an unsaveable lock)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.guard = threading.Lock()
        self.count = 0

    def aggregate_train(self, server_round, replies):
        self.count += 1
        return super().aggregate_train(server_round, replies)

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class Failing(FedAvg):
    """Raises in the round given by the environment variable FAIL_ROUND."""

    def aggregate_train(self, server_round, replies):
        import os

        if server_round == int(os.environ["FAIL_ROUND"]):
            raise ZeroDivisionError("my plugin divided by zero")
        return super().aggregate_train(server_round, replies)
'''


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "myplugin.py").write_text(PLUGIN)
    return folder


def test_unsaveable_strategy_state_is_an_error_naming_the_attribute(
        tmp_path: Path, plugin_dir: Path) -> None:
    config, experiment = _experiment(tmp_path, strategy="myplugin:Locked",
                                     plugin_path=str(plugin_dir))
    with pytest.raises(StrategyStateError, match=r"Locked\.guard \(lock\)"):
        _run(config, experiment)
    assert not (Path(config.out) / "checkpoint.pt").exists()


def test_declared_strategy_state_survives_resume(tmp_path: Path, plugin_dir: Path) -> None:
    config, experiment = _experiment(tmp_path, strategy="myplugin:Counting",
                                     plugin_path=str(plugin_dir), rounds=1)
    _run(config, experiment)
    config, experiment = _experiment(tmp_path, strategy="myplugin:Counting",
                                     plugin_path=str(plugin_dir), rounds=3, resume=True)
    _run(config, experiment)
    assert experiment.strategy.strategy.count == 3


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    config, experiment = _experiment(tmp_path, strategy="fedadam", rounds=1)
    _run(config, experiment)
    state = torch.load(Path(config.out) / "checkpoint.pt", weights_only=True)
    assert state["round"] == 1 and state["strategy"]["inner"]["attributes"]["m_t"]
    # a checkpoint that needs arbitrary unpickling is refused, not executed
    torch.save({"round": 0, "arrays": {}, "strategy": {}, "history": [], "config": {},
                "payload": Killed()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt is corrupt"):
        read_checkpoint(tmp_path / "evil.pt")


# -- item 7: a plugin's error with its traceback, the resume line only when it helps -------------

@pytest.mark.parametrize("fail_round", [1, 2])
def test_plugin_errors_show_their_traceback(capsys: pytest.CaptureFixture, tmp_path: Path,
                                           plugin_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                           fail_round: int) -> None:
    monkeypatch.setenv("FAIL_ROUND", str(fail_round))
    out = tmp_path / "run"
    rc, _, err = simulate(capsys, "--out", str(out), "--strategy", "myplugin:Failing",
                          "--plugin-path", str(plugin_dir))
    assert rc == 1
    assert "ZeroDivisionError: my plugin divided by zero" in err
    assert "Traceback" in err and "myplugin.py" in err
    if fail_round == 1:
        assert "--resume" not in err  # nothing finished: resuming cannot help
    else:
        assert "round 1 is saved" in err and "--resume" in err


def test_a_run_error_without_finished_rounds_has_no_resume_hint(
        capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedctx.federated.server as server

    def broken(self, grid) -> None:  # noqa: ANN001
        raise RuntimeError("engine broke")

    monkeypatch.setattr(server.Experiment, "run", broken)
    rc, _, err = simulate(capsys, "--out", str(tmp_path / "run"))
    assert rc == 1 and "engine broke" in one_line(err) and "--resume" not in err


# -- item 11: a config file is data ---------------------------------------------------------------

def test_a_config_file_cannot_import_code_from_the_working_directory(python: str,
                                                                     tmp_path: Path) -> None:
    work = tmp_path / "downloads"
    work.mkdir()
    marker = tmp_path / "ran"
    (work / "evil.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("imported")
        from flwr.serverapp.strategy import FedAvg as Thing
    """))
    (work / "exp.toml").write_text('strategy = "evil:Thing"\nrounds = 1\n')
    args = [python, "-m", "fedctx.simulate", "--config", "exp.toml", *TINY,
            "--out", str(tmp_path / "run")]
    proc = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--plugin-path" in one_line(proc.stderr.strip())
    assert not marker.exists()
    proc = subprocess.run([*args, "--plugin-path", "."], cwd=work, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.exists()


def test_resume_and_overwrite_together_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give one of them"):
        parse_config(["--resume", "--overwrite", "--out", str(tmp_path)])
