"""A two-job AdaMatch sweep on a local Ray instance (2 CPUs), and its comparison table."""

import json

import pytest

from fedctx.adamatch import AdaptConfig
from fedctx.adamatch.sweep import markdown_table, run_sweep, summarize


def _summary(norm: str, seed: int, acc: float) -> dict:
    return {"config": {"norm": norm, "seed": seed}, "final_target_acc": acc,
            "final_source_acc": 1.0, "train_seconds": 10.0}


def test_summarize_mean_and_sample_std():
    table = summarize([_summary("batch", 0, 0.5), _summary("batch", 1, 0.7),
                       _summary("context", 0, 0.9)])
    assert table["batch"]["target_acc_mean"] == pytest.approx(0.6)
    assert table["batch"]["target_acc_std"] == pytest.approx(0.1414213, rel=1e-5)
    assert table["context"]["target_acc_std"] == 0.0
    md = markdown_table(table, "t")
    assert "| batch | 2 | 60.00 ± 14.14 |" in md


def test_two_job_sweep_on_local_ray(real_data, tmp_path):
    base = AdaptConfig(source="usps", target="mnist", steps=2, batch_size=8, uratio=1,
                       train_samples=64, eval_samples=50, embed_samples=20, eval_every=2,
                       data_dir=str(real_data))
    result = run_sweep(base, ["batch", "context"], [0], tmp_path, cpus_per_job=1.0,
                       num_cpus=2, log=False)
    assert set(result["table"]) == {"batch", "context"}
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["config"]["norm"] for r in saved["runs"]] == ["batch", "context"]
    assert "| context | 1 |" in (tmp_path / "sweep.md").read_text()
    assert (tmp_path / "grad_variance.png").stat().st_size > 0
    for norm in ("batch", "context"):
        assert (tmp_path / f"{norm}-seed0" / "summary.json").exists()
