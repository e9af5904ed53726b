"""One recorder for every entry point (issue #11 item 4): JSON lines, CSV, TensorBoard, summary
and plots, atomic, and a resumed run that lists every round once in each of them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fedctx.results import RunFiles, RunRecorder, clear_results, round_durations, scalars


def tensorboard_steps(out: Path) -> dict[str, list[int]]:
    """Every scalar tag in ``out/tensorboard`` with the steps it was written at, as TensorBoard
    reads them (every event file, in order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def csv_rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def record(r: int) -> dict:
    return {"round": r, "train_loss": 1.0 / r, "clients_sampled": 2, "clients_ok": 2,
            "rejected": 0, "failures": 0, "seconds": 0.1, "sampled": [0, 1],
            "accuracy": 0.5 + r / 10, "accuracy_per_context": {"a": 0.4 + r / 10, "b": 0.6},
            "accuracy_per_client": {"0": 0.1, "1": 0.2}}


def test_scalars_flatten_one_level_and_drop_what_is_not_a_number() -> None:
    assert scalars(record(1), skip=("accuracy_per_client",)) == {
        "round": 1, "train_loss": 1.0, "clients_sampled": 2, "clients_ok": 2, "rejected": 0,
        "failures": 0, "seconds": 0.1, "accuracy": 0.6, "accuracy_per_context/a": 0.5,
        "accuracy_per_context/b": 0.6}


def test_a_resumed_run_lists_every_round_once_in_every_file(tmp_path: Path) -> None:
    first = RunRecorder(tmp_path, 3, stream=open("/dev/null", "w"))  # noqa: SIM115
    first.start({"seed": 0})
    for r in (1, 2, 3):
        first.round(record(r))
    # killed after round 3 reached the files but before its checkpoint: the checkpoint's
    # history (rounds 1-2) is what resume sees
    resumed = RunRecorder(tmp_path, 4, stream=first.stream)
    resumed.start({"seed": 0}, history=first.history[:2])
    for r in (3, 4):
        resumed.round(record(r))
    resumed.finish({"accuracy": 0.9, "accuracy_per_context": {"a": 0.8, "b": 0.6}})

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3, 4]
    rows = csv_rows(tmp_path)
    assert [int(x["round"]) for x in rows] == [1, 2, 3, 4]
    assert float(rows[2]["accuracy_per_context/a"]) == pytest.approx(0.7)
    assert "accuracy_per_client/0" not in rows[0] and "sampled" not in rows[0]
    steps = tensorboard_steps(tmp_path)
    assert steps["accuracy_per_context/a"] == [1, 2, 3, 4]
    assert steps["train_loss"] == [1, 2, 3, 4] and "round" not in steps
    names = {p.name for p in tmp_path.iterdir()}
    assert {"summary.json", "accuracy.png", "metrics.csv", "config.json"} <= names
    assert not [n for n in names if ".tmp" in n]


def test_records_of_one_step_share_its_csv_row(tmp_path: Path) -> None:
    files = RunFiles(tmp_path, "step")
    files.open()
    files.append(1, {"step": 1, "loss": 2.0}, durable=False)
    files.append(2, {"step": 2, "loss": 1.0})
    files.append(2, {"eval": {"step": 2, "target_acc": 0.3}})
    files.close()
    assert csv_rows(tmp_path) == [{"step": "1", "loss": "2.0", "eval/target_acc": ""},
                                  {"step": "2", "loss": "1.0", "eval/target_acc": "0.3"}]
    assert tensorboard_steps(tmp_path) == {"loss": [1, 2], "eval/target_acc": [2]}
    clear_results(tmp_path)  # --overwrite removes the CSV and the event files too
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "tensorboard").exists()


def test_simulate_resume_continues_csv_and_tensorboard(tmp_path: Path, capsys) -> None:
    from fedctx.simulate import main

    torch.set_num_threads(1)
    tiny = ["--backend", "inprocess", "--clients", "4", "--fraction", "1.0", "--width", "4",
            "--out", str(tmp_path)]
    assert main([*tiny, "--rounds", "1"]) == 0
    assert main([*tiny, "--rounds", "2", "--resume"]) == 0
    capsys.readouterr()
    assert [int(r["round"]) for r in csv_rows(tmp_path)] == [1, 2]
    steps = tensorboard_steps(tmp_path)
    assert steps["accuracy"] == [1, 2]
    assert {f"accuracy_per_context/{c}" for c in ("mnist", "usps", "mnistm", "mnist-inverted")
            } <= set(steps)


def test_round_durations_add_the_next_rounds_between_seconds() -> None:
    records = [{"seconds": 1.0}, {"seconds": 2.0, "between_seconds": 0.5},
               {"seconds": 3.0},  # the first round after a resume: no between_seconds
               {"seconds": 4.0, "between_seconds": 0.25}]
    assert round_durations(records) == [1.5, 2.0, 3.25, 4.0]
    assert round_durations([]) == []
