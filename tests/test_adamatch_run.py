"""A short real AdaMatch run (MNIST -> MNIST-M subsets) and the CLI's error handling."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedctx.adamatch import AdaptConfig, train
from fedctx.adamatch.config import AdaptConfigError

RESULT_FILES = ("metrics.jsonl", "summary.json", "model.pt", "curves.png", "grad_variance.png",
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


@pytest.mark.parametrize("bad", [["--steps", "zero"], ["--lr", "inf"], ["--target", "nowhere"],
                                 ["sweep", "--uratio", "0"], ["sweep", "--seeds", "x"]])
def test_a_bad_flag_value_is_told_before_torch_is_imported(bad):
    """What a flag alone can tell ends the command line before torch is imported (it took 3-5 s
    to say ``--steps zero`` was not a number); the message is the one the full check gives."""
    code = ("import sys; from fedctx.adamatch.cli import main; status = main(sys.argv[1:]); "
            "print(status, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, *bad], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split() == ["2", "False"], proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: {_full_check_error(bad)}"


@pytest.mark.parametrize(("argv", "told"), [
    (["--data-dir", "d", "sweep", "--norms", "batch"],
     "error: 'sweep' must come first: python -m fedctx.adapt sweep [options]"),
    (["--bogus", "1"], "error: unrecognized arguments: --bogus 1"),
    (["sweep", "--bogus"], "error: unrecognized arguments: --bogus"),
])
def test_a_misplaced_subcommand_or_unknown_flag_is_told_in_one_line(argv, told, capsys):
    """``sweep`` after an option was reported as an unrecognized argument, which did not say
    what to do; an unknown flag is reported as argparse does."""
    from fedctx.adamatch.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(told), err


def _full_check_error(argv):
    from fedctx.adamatch.cli import build_parser
    from fedctx.adamatch.config import resolve

    sweep = argv[:1] == ["sweep"]
    args = build_parser(sweep=sweep).parse_args(argv[1:] if sweep else argv)
    with pytest.raises(AdaptConfigError) as info:
        resolve(args)
        if sweep:
            from fedctx.adamatch.cli import _sweep_resources

            _sweep_resources(args)
    return str(info.value)


@pytest.mark.parametrize("sweep", [False, True])
@pytest.mark.parametrize("where", ["under-a-file", "unwritable"])
def test_an_out_that_cannot_be_written_is_told_in_one_line(tmp_path, capsys, sweep, where):
    """A run and a sweep refuse an ``--out`` under a file or in a folder that cannot be written,
    in one line before any data is read (they ended in a traceback from ``mkdir``)."""
    from fedctx.adamatch.cli import main

    if where == "unwritable":
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux's /proc, where no folder can be made")
        out = Path("/proc/fedctx-no-such-folder/run")
    else:
        (tmp_path / "file").write_text("mine\n")
        out = tmp_path / "file" / "run"
    argv = (["sweep", "--norms", "batch", "--seeds", "0"] if sweep else []) + [
        "--out", str(out), "--data-dir", str(tmp_path / "no-data"), "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out}") and len(err.splitlines()) == 1, err
    assert ("is a file, not a folder" if where == "under-a-file" else "is not writable") in err
    assert not (tmp_path / "no-data").exists()


def _holding_a_run(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f"earlier {name}\n")
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_an_earlier_run_is_never_replaced_without_overwrite(tmp_path, monkeypatch):
    from fedctx.adamatch.training import default_out, results_folder

    out = tmp_path / "run"
    before = _holding_a_run(out, "metrics.jsonl", "notes.txt")
    with pytest.raises(AdaptConfigError, match=r"holds another run's results \(metrics.jsonl\)"
                       r".*--overwrite"):
        results_folder(AdaptConfig(out=str(out)))
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    assert results_folder(AdaptConfig(out=str(out)), overwrite=True) == out
    with pytest.raises(AdaptConfigError, match="is a file"):
        results_folder(AdaptConfig(out=str(out / "notes.txt")))
    # the default folder takes a counter: a repeated command lands beside the earlier run
    monkeypatch.chdir(tmp_path)
    cfg = AdaptConfig(norm="acn", seed=3)
    base = default_out(cfg)
    assert results_folder(cfg) == base
    _holding_a_run(base, "stdout.log")  # no run's results: still free
    assert results_folder(cfg) == base
    _holding_a_run(base, "summary.json")
    assert results_folder(cfg) == base.with_name(base.name + "-2")


@pytest.mark.slow  # a subprocess importing torch: 5-30 s
def test_cli_refuses_an_out_holding_a_run_in_one_line(tmp_path):
    out = tmp_path / "run"
    before = _holding_a_run(out, "summary.json")
    proc = subprocess.run([sys.executable, "-m", "fedctx.adapt", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --out {out} holds another run's results (summary.json); give a new --out, "
        "or --overwrite to replace them"]
    assert {p.name: p.read_text() for p in out.iterdir()} == before


def test_overwrite_replaces_only_the_earlier_runs_files(tmp_path):
    import torch

    from fedctx.adamatch.data import DomainSplit
    from fedctx.adamatch.training import Domains

    def split(name, n, seed):
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=g)
        return DomainSplit(name, images, torch.randint(0, 10, (n,), generator=g))

    out = tmp_path / "run"
    _holding_a_run(out, "metrics.jsonl", "summary.json", "curves.png", "notes.txt")
    cfg = AdaptConfig(source="mnist", target="usps", norm="batch", steps=2, batch_size=4,
                      uratio=1, width=4, eval_every=2, embed_samples=10, out=str(out),
                      device="cpu", threads=1)
    domains = Domains(split("mnist", 16, 0), split("usps", 16, 1), split("mnist", 12, 2),
                      split("usps", 12, 3))
    train(cfg, domains=domains, log=False, overwrite=True)
    lines = [json.loads(t) for t in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval" not in r] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["config"]["steps"] == 2
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "notes.txt").read_text() == "earlier notes.txt\n"  # not a run's file: kept
    # model.pt: the final EMA model, rebuilt from its config, gives the summary's accuracy
    from fedctx.adamatch.evaluate import accuracy
    from fedctx.adamatch.training import build_model, memory_format, target_context

    saved = torch.load(out / "model.pt", weights_only=True)
    rebuilt = AdaptConfig(**saved["config"])
    model = build_model(rebuilt).to(memory_format=memory_format(rebuilt, torch.device("cpu")))
    model.load_state_dict(saved["ema_model"])
    acc = accuracy(model, domains.target_test, target_context(rebuilt), torch.device("cpu"),
                   memory_format(rebuilt, torch.device("cpu")))
    assert acc == json.loads((out / "summary.json").read_text())["final_target_acc"]


def test_a_sweep_refuses_a_folder_holding_a_finished_run_of_other_options(tmp_path):
    from fedctx.adamatch.sweep import _finished

    cfg = AdaptConfig(norm="batch", seed=0, steps=6, out=str(tmp_path / "batch-seed0"))
    assert _finished(cfg) is None  # nothing there: run it
    (tmp_path / "batch-seed0").mkdir()
    summary = {"config": cfg.replace(steps=5).to_dict(), "final_target_acc": 0.5}
    (tmp_path / "batch-seed0" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(AdaptConfigError, match=r"finished run with steps = 5 \(this sweep: 6\)"):
        _finished(cfg)
    summary["config"] = cfg.replace(threads=4).to_dict()  # threads do not change results
    (tmp_path / "batch-seed0" / "summary.json").write_text(json.dumps(summary))
    assert _finished(cfg) == summary
