"""``python -m fedctx.simulate --seeds``: one run per seed, then mean ± 95% CI per context and
per round (issue #11 item 5), and ``fedctx.report`` on its folder; a run whose every round
failed exits 1 (issue #14 item 6)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedctx.report import mean_ci
from fedctx.simulate import every_round_failed, main

TINY = ["--clients", "4", "--rounds", "2", "--fraction", "1.0", "--width", "4"]


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args, words", [
    (["--seeds", "0,x"], ["--seeds", "'0,x'", "e.g. 0,1,2"]),
    (["--seeds", "1,1"], ["--seeds", "distinct"]),
    (["--seeds", "-3"], ["--seeds", "[0, 4294967295]"]),
    (["--seeds", ""], ["--seeds"]),
    (["--seeds", "0,1", "--seed", "4"], ["--seed 4", "--seeds 0,1", "give one of them"]),
    (["--seeds", "0,1", "--lr", "inf"], ["--lr"]),
])
def test_bad_seeds_are_one_line(args: list[str], words: list[str], capsys, tmp_path: Path
                                ) -> None:
    assert main([*args, "--out", str(tmp_path / "s")]) == 2
    err = one_error_line(capsys)
    for word in words:
        assert word in err
    assert not (tmp_path / "s").exists()  # nothing started


def test_seeds_refuse_a_folder_with_files_and_resume_of_nothing(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["--seeds", "0,1", "--out", str(tmp_path)]) == 2
    assert "holds files (notes.txt)" in one_error_line(capsys)
    assert main(["--seeds", "0,1", "--resume", "--out", str(tmp_path / "new")]) == 2
    assert "no seed runs" in one_error_line(capsys)


@pytest.mark.slow  # two child runs, twice (~20 s on an idle 2-core machine)
def test_seeds_run_each_seed_then_report_mean_and_interval(tmp_path: Path, capsys) -> None:
    from fedctx.report import main as report

    torch.set_num_threads(1)
    out = tmp_path / "seeds"
    assert main(["--seeds", "3,4", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "seeds.json").read_text())
    finals = {s: json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (3, 4)}
    assert {s: f["seed"] for s, f in finals.items()} == {3: 3, 4: 4}
    assert finals[3]["accuracy"] != finals[4]["accuracy"]  # different seeds, different runs
    est = mean_ci([finals[3]["accuracy"], finals[4]["accuracy"]])
    assert saved["accuracy"]["mean"] == pytest.approx(est.mean)
    assert saved["accuracy"]["half_width"] == pytest.approx(est.half_width)
    ctx = saved["accuracy_per_context"]["usps"]
    assert ctx["mean"] == pytest.approx(mean_ci(
        [f["accuracy_per_context"]["usps"] for f in finals.values()]).mean)
    assert saved["rounds"] == [2]
    assert est.format(100, 1) in printed and est.format(100, 1) in (out / "seeds.md").read_text()
    assert "| round |" in printed  # per round, per context

    # the folder as a whole is one experiment for fedctx.report
    assert report([str(out), "--plot", str(tmp_path / "r.png")]) == 0
    printed = capsys.readouterr().out
    assert "| 3,4 " in printed and est.format(100, 1) in printed and "per round" in printed
    assert (tmp_path / "r.png").stat().st_size > 0

    # a seed that never ran is run by --resume; the finished one is kept as it is
    shutil.rmtree(out / "seed-4")
    before = (out / "seed-3" / "metrics.jsonl").read_text()
    assert main(["--seeds", "3,4", *TINY, "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    assert (out / "seed-3" / "metrics.jsonl").read_text() == before
    assert json.loads((out / "seeds.json").read_text())["accuracy"]["mean"] == \
        pytest.approx(est.mean)


def test_every_round_failed_reads_failed_rounds_from_the_summary(tmp_path: Path) -> None:
    def summary(**values) -> Path:
        (tmp_path / "summary.json").write_text(json.dumps({"rounds": 3, **values}))
        return tmp_path

    assert every_round_failed(summary()) == ""  # absent: none failed
    assert every_round_failed(summary(failed_rounds=[1, 3])) == ""
    reason = every_round_failed(summary(failed_rounds=[1, 2, 3]))
    assert reason.startswith("every round failed (3 of 3") and "metrics.jsonl" in reason
