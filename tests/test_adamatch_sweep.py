"""AdaMatch sweeps on a local Ray instance (2 CPUs): a two-job grid and its comparison table, a
grid whose jobs all fail (exit status 1, their errors kept)."""

import json
from pathlib import Path

import pytest

from fedctx.adamatch import AdaptConfig
from fedctx.adamatch.sweep import markdown_table, run_sweep, summarize


def _summary(norm: str, seed: int, acc: float) -> dict:
    return {"config": {"norm": norm, "seed": seed}, "final_target_acc": acc,
            "final_source_acc": 1.0, "train_seconds": 10.0}


def test_summarize_gives_intervals_and_the_paired_difference_to_batch():
    """The table follows the project's rule for comparisons (it gave mean ± sample std and no
    difference): mean ± 95% t-interval, the difference paired by seed, a sentence from it."""
    accs = {"context": [0.90, 0.93, 0.92], "batch": [0.80, 0.84, 0.81], "uan": [0.81, 0.80]}
    table = summarize([_summary(norm, seed, acc) for norm, values in accs.items()
                       for seed, acc in enumerate(values)])
    assert list(table) == ["context", "batch", "uan"] and "vs" not in table["batch"]
    t = 4.302653  # t(0.975, 2 dof)
    assert table["batch"]["target_acc"] == pytest.approx(0.8166667, rel=1e-6)
    assert table["batch"]["target_acc_ci95"] == pytest.approx(t * 0.0208167 / 3 ** 0.5, rel=1e-5)
    # context - batch, seed by seed: 0.10, 0.09, 0.11
    assert table["context"]["vs"] == "batch" and table["context"]["delta_n"] == 3
    assert table["context"]["delta"] == pytest.approx(0.10)
    assert table["context"]["delta_ci95"] == pytest.approx(t * 0.01 / 3 ** 0.5, rel=1e-5)
    assert table["context"]["verdict"].startswith("`context` is higher than `batch` by 10.0")
    assert table["uan"]["delta_n"] == 2 and "too few to compare" in table["uan"]["verdict"]
    md = markdown_table(table, "t")
    assert "| batch | 3 | 81.67 ± 5.17 | — |" in md
    assert "| context | 3 | 91.67 ± 3.79 | +10.00 ± 2.48 (n = 3) |" in md
    assert "- `context` is higher than `batch` by 10.0 points" in md
    one = summarize([_summary("batch", 0, 0.5), _summary("acn", 0, 0.6)])
    assert one["batch"]["target_acc_ci95"] is None  # undefined with one seed, never ± 0
    assert "| acn | 1 | 60.00 ± n/a | +10.00 ± n/a (n = 1) |" in markdown_table(one, "t")


def test_two_job_sweep_on_local_ray_and_one_whose_jobs_all_fail(real_data, tmp_path, capsys):
    import ray

    from fedctx.adamatch.cli import sweep_status

    base = AdaptConfig(source="usps", target="mnist", steps=2, batch_size=8, uratio=1,
                       train_samples=64, eval_samples=50, embed_samples=20, eval_every=2,
                       data_dir=str(real_data))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one Ray for both sweeps
    try:
        good = tmp_path / "good"
        result = run_sweep(base, ["batch", "context"], [0], good, cpus_per_job=1.0, log=False)
        empty = tmp_path / "no-data"
        empty.mkdir()
        failed = run_sweep(base.replace(data_dir=str(empty)), ["batch", "context"], [0],
                           tmp_path / "bad", log=False)
    finally:
        ray.shutdown()
    assert set(result["table"]) == {"batch", "context"} and not result["failures"]
    saved = json.loads((good / "sweep.json").read_text())
    assert [r["config"]["norm"] for r in saved["runs"]] == ["batch", "context"]
    assert "| context | 1 |" in (good / "sweep.md").read_text()
    assert json.loads((good / "sweep.json").read_text())["table"]["context"]["vs"] == "batch"
    assert (good / "grad_variance.png").stat().st_size > 0
    for norm in ("batch", "context"):
        assert (good / f"{norm}-seed0" / "summary.json").exists()
        assert (good / f"{norm}-seed0" / "metrics.csv").exists()
    assert sweep_status(result, good) == 0

    assert failed["runs"] == [] and len(failed["failures"]) == 2
    for f in failed["failures"]:
        assert "USPS" in Path(f["error_file"]).read_text()  # the job's own error, kept
    capsys.readouterr()
    assert sweep_status(failed, tmp_path / "bad") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: all 2 sweep jobs failed") and "error.txt" in err
    assert "\n" not in err


def test_a_sweep_with_some_failed_jobs_says_so_and_succeeds(tmp_path, capsys):
    from fedctx.adamatch.cli import sweep_status

    result = {"runs": [_summary("batch", 0, 0.5)], "failures": [{"norm": "context", "seed": 0}]}
    assert sweep_status(result, tmp_path) == 0
    assert capsys.readouterr().err.startswith("warning: 1 of 2 sweep jobs failed")


@pytest.mark.parametrize(("address", "words"), [
    ("nowhere", "expected HOST:PORT"),
    ("127.0.0.1:9", "no Ray cluster answers there"),  # nothing listens: refused at once
])
def test_a_sweep_told_a_ray_address_where_no_cluster_answers_says_so_in_one_line(
        tmp_path, capsys, address, words):
    """As ``simulate --ray-address``: one line and status 2 before any job (the sweep waited
    on Ray's retries, printing them, with no end)."""
    import ray

    from fedctx.adamatch.cli import main

    out = tmp_path / "sweep"
    assert main(["sweep", "--norms", "batch", "--seeds", "0", "--steps", "1", "--ray-address",
                 address, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --ray-address ") and address in err and words in err, err
    assert len(err.splitlines()) == 1
    assert not ray.is_initialized()


@pytest.mark.parametrize("checkpoint", ["same-run", "other-options", "none"])
def test_a_sweep_job_cut_short_goes_on_from_its_checkpoint(tmp_path, monkeypatch, checkpoint):
    """A job whose folder holds a checkpoint of its own run resumes it; a checkpoint of other
    options, or none, and the job starts afresh (replacing what a run left there)."""
    from fedctx.adamatch import sweep, training
    from fedctx.results import save_checkpoint

    cfg = AdaptConfig(norm="batch", steps=40, out=str(tmp_path / "batch-seed0"))
    if checkpoint != "none":
        saved = cfg.replace(lr=0.1) if checkpoint == "other-options" else cfg.replace(threads=3)
        (tmp_path / "batch-seed0").mkdir()
        save_checkpoint({"step": 1, "state": {}, "batches": {}, "torch_rng": None,
                         "history": [{}], "evals": [], "seconds": {},
                         "config": saved.to_dict()}, tmp_path / "batch-seed0")
    calls = []
    monkeypatch.setattr(training, "train", lambda config, **kw: calls.append((config, kw)))
    sweep._run_job(cfg.to_dict(), threads=1)
    (config, kwargs), = calls
    assert config.threads == 1
    assert kwargs == ({"log": False, "resume": True} if checkpoint == "same-run"
                      else {"log": False, "overwrite": True})
