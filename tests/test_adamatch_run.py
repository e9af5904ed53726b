"""A short real AdaMatch run (MNIST -> MNIST-M subsets) and the CLI's error handling."""

import json
import subprocess
import sys

import pytest

from fedctx.adamatch import AdaptConfig, train
from fedctx.adamatch.config import AdaptConfigError

RESULT_FILES = ("metrics.jsonl", "summary.json", "curves.png", "grad_variance.png",
                "embedding.png")


@pytest.mark.slow  # reads all of MNIST and MNIST-M: ~30 s alone, minutes on a loaded CPU
def test_short_real_run_writes_every_result_file(real_data, tmp_path):
    cfg = AdaptConfig(source="mnist", target="mnistm", norm="context", steps=4, batch_size=16,
                      uratio=2, train_samples=256, eval_samples=100, eval_every=2,
                      embed_samples=40, data_dir=str(real_data), out=str(tmp_path / "run"),
                      device="cpu", threads=1)
    summary = train(cfg, log=False)
    for name in RESULT_FILES:
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    lines = [json.loads(t) for t in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "eval" not in r]
    evals = [r["eval"] for r in lines if "eval" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [e["step"] for e in evals] == [2, 4]
    assert steps[0]["target_weight"] == 0.0 and steps[0]["lr"] == pytest.approx(0.03)
    assert all(r["grad_var"] > 0 for r in steps)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["final_target_acc"] == summary["final_target_acc"] == evals[-1]["target_acc"]
    assert 0.0 <= saved["final_target_acc"] <= 1.0
    assert saved["data"]["target_test"] == 100 and saved["config"]["norm"] == "context"


def test_config_rejects_bad_values():
    with pytest.raises(AdaptConfigError, match="valid choices: .*context"):
        AdaptConfig(norm="nope").validate()
    with pytest.raises(AdaptConfigError, match="--uratio"):
        AdaptConfig(uratio=0).validate()
    with pytest.raises(AdaptConfigError, match="different domains"):
        AdaptConfig(source="usps", target="usps").validate()


@pytest.mark.slow  # a subprocess importing torch: 5-30 s
@pytest.mark.parametrize(("args", "rc", "words"), [
    (["--target", "nowhere"], 2, "valid choices: mnist, usps, mnistm, svhn, synthdigits"),
    (["--source", "svhn", "--target", "mnist", "--data-dir", "{tmp}"], 1, "SVHN not found"),
])
def test_cli_errors_are_one_line(args, rc, words, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "fedctx.adapt", *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == rc
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
