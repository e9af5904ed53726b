"""Confidence intervals and the sentences built from them (fedctx.report)."""

from __future__ import annotations

import math

import pytest

from fedctx.report import flatness, late_change, mean_ci, paired_difference, verdict


def test_mean_ci_is_the_t_interval() -> None:
    est = mean_ci([0.80, 0.84, 0.82])
    # mean 0.82, sample sd 0.02, t(0.975, 2) = 4.302653
    assert est.mean == pytest.approx(0.82)
    assert est.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert est.format(100, 1) == "82.0 ± 5.0"


def test_one_value_has_no_interval_and_says_so() -> None:
    est = mean_ci([0.5])
    assert math.isnan(est.half_width) and est.format() == "0.500 ± n/a"
    assert not est.excludes_zero()


def test_paired_difference_uses_common_seeds_only() -> None:
    a = {0: 0.90, 1: 0.92, 2: 0.94, 3: 0.5}
    b = {0: 0.80, 1: 0.81, 2: 0.85}
    diff = paired_difference(a, b)
    assert diff.n == 3 and diff.mean == pytest.approx((0.10 + 0.11 + 0.09) / 3)
    assert diff.excludes_zero()
    assert verdict(diff, "A", "B").startswith("A is higher than B by 10.0 points")


def test_verdict_does_not_claim_a_difference_the_interval_does_not_support() -> None:
    diff = paired_difference({0: 0.9, 1: 0.7, 2: 0.85}, {0: 0.8, 1: 0.8, 2: 0.8})
    assert not diff.excludes_zero()
    assert "not distinguishable" in verdict(diff, "A", "B")


def test_verdict_states_no_comparison_from_two_paired_seeds() -> None:
    # Two seeds whose interval excludes zero: still no claim (comparisons carry >= 3 seeds).
    diff = paired_difference({0: 0.90, 1: 0.91}, {0: 0.80, 1: 0.805})
    assert diff.n == 2 and diff.excludes_zero()
    sentence = verdict(diff, "A", "B")
    assert sentence == "A vs B: 2 paired seeds, too few to compare (a comparison needs 3)."


def _fake_run(root, name: str, seed: int, policy: str, accs: dict[str, float]) -> str:
    import json

    folder = root / name
    folder.mkdir()
    config = {"scenario": "digits", "norm": "context", "norm_policy": policy, "seed": seed,
              "out": str(folder), "backend": "inprocess"}
    overall = sum(accs.values()) / len(accs)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "summary.json").write_text(json.dumps(
        {"accuracy": overall, "accuracy_per_context": accs}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"round": r, "accuracy": overall * r / 2, "accuracy_per_context": accs}) + "\n"
        for r in (1, 2)))
    return str(folder)


def test_report_pools_seeds_and_labels_by_the_options_that_differ(tmp_path, capsys) -> None:
    from fedctx.report import main

    runs = [_fake_run(tmp_path, f"a{s}", s, "average", {"mnist": 0.80 + s / 100, "usps": 0.6})
            for s in range(3)]
    runs += [_fake_run(tmp_path, f"b{s}", s, "per-context", {"mnist": 0.9, "usps": 0.7})
             for s in range(2)]
    plot = tmp_path / "rounds.png"
    assert main([*runs, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "norm_policy=average" in out and "norm_policy=per-context" in out
    assert "| 0,1,2 " in out and "81.0 ± 2.5" in out  # mnist mean 81, t(2) * 1 / sqrt(3)
    assert "90.0 ± 0.0" in out
    assert plot.stat().st_size > 0


def test_report_rejects_a_folder_that_is_not_a_run_in_one_line(tmp_path, capsys) -> None:
    from fedctx.report import main

    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a finished fedctx run" in err and "\n" not in err


@pytest.mark.parametrize("plot", ["under-a-file", "a-folder"])
def test_report_refuses_a_plot_it_cannot_write_in_one_line_before_the_tables(
        tmp_path, capsys, plot) -> None:
    """``--plot`` under a file or naming a folder: one line, status 2, no table printed (the
    tables were printed, then a traceback from matplotlib); a plot in a new folder is written."""
    from fedctx.report import main

    run = _fake_run(tmp_path, "a0", 0, "average", {"mnist": 0.8})
    (tmp_path / "file").write_text("mine\n")
    path = tmp_path / "file" / "rounds.png" if plot == "under-a-file" else tmp_path
    assert main([run, "--plot", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: --plot {path}")
    assert len(captured.err.strip().splitlines()) == 1
    assert main([run, "--plot", str(tmp_path / "new" / "rounds.png")]) == 0
    assert (tmp_path / "new" / "rounds.png").stat().st_size > 0


def test_report_tells_a_usage_mistake_in_one_line(capsys) -> None:
    from fedctx.report import main

    with pytest.raises(SystemExit) as info:
        main([])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: ") and "\n" not in err


def test_late_change_spans_the_last_fifth_and_skips_points_without_the_key() -> None:
    # FedBN-style records: train loss every round, accuracy every 10th round
    curve = [{"round": r, "train_loss": 1.0 / r} | ({"accuracy": 0.5 + r / 1000} if r % 10 == 0
                                                     else {}) for r in range(1, 101)]
    change, start, end = late_change(curve, "accuracy", x="round")
    assert (start, end) == (80, 100) and change == pytest.approx(0.02)
    assert late_change(curve[:9], "accuracy", x="round") is None  # no accuracy at all
    assert late_change([{"round": 10, "accuracy": 0.5}], "accuracy", x="round") is None


def test_flatness_names_the_runs_that_still_rise() -> None:
    assert "**flat** in all 2 runs" in flatness([("a", 0.004), ("b", -0.009)], "the last 20")
    text = flatness([("a", 0.004), ("b", 0.012), ("c", -0.03)], "the last 20 rounds")
    assert "**not flat** in 2 of 3 runs" in text and "b +1.20" in text and "c -3.00" in text
    assert "a +0.40" not in text
    assert "no run" in flatness([], "the last 20 rounds")


def test_report_pools_adamatch_runs_and_a_sweep_folder_stands_for_its_runs(tmp_path, capsys):
    """``fedctx.report`` on AdaMatch runs (it refused them: "lacks config.json (not a finished
    fedctx run)"): real tiny runs, pooled by the options that change results (not ``threads``),
    final target and source accuracy as mean ± 95% CI over seeds, then per evaluation step; a
    sweep's folder stands for its runs; runs of the two commands are not mixed."""
    from test_adamatch_train import _synthetic_domains

    from fedctx.adamatch import AdaptConfig, train
    from fedctx.report import main

    domains = _synthetic_domains()
    base = AdaptConfig(source="mnist", target="usps", steps=4, batch_size=8, uratio=1, width=4,
                       eval_every=2, embed_samples=10, device="cpu")
    sweep = tmp_path / "sweep"
    summaries = {}
    for norm, seed in (("batch", 0), ("batch", 1), ("context", 0)):
        cfg = base.replace(norm=norm, seed=seed, threads=1 + seed,
                           out=str(sweep / f"{norm}-seed{seed}"))
        summaries[norm, seed] = train(cfg, domains=domains, log=False)
    (sweep / "sweep.json").write_text("{}\n")

    assert main([str(sweep / "batch-seed0"), str(sweep / "batch-seed1"), "--plot",
                 str(tmp_path / "steps.png")]) == 0
    out = capsys.readouterr().out
    want = mean_ci([summaries["batch", s]["final_target_acc"] for s in (0, 1)]).format(100, 1)
    assert f"| all runs   | 0,1   | {want} " in out  # threads differ: still one experiment
    assert "| step | target (EMA) | target (raw) | source (EMA) |" in out
    assert (tmp_path / "steps.png").stat().st_size > 0

    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "(3 runs)" in out and "| norm=batch   | 0,1 " in out and "| norm=context | 0 " in out

    simulate_run = _fake_run(tmp_path, "fed", 0, "average", {"mnist": 0.8})
    assert main([str(sweep / "batch-seed0"), simulate_run]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: runs of fedctx.simulate and of fedctx.adapt") and "\n" not in err


def test_report_gives_the_paired_difference_to_a_baseline(tmp_path, capsys) -> None:
    """``--baseline norm-policy=average``: each other experiment's difference in overall
    accuracy, seed by seed, with its interval and a sentence that claims only what it supports;
    a baseline that names no experiment, or several, is one line."""
    from fedctx.report import main

    runs = [_fake_run(tmp_path, f"a{s}", s, "average", {"mnist": 0.80 + s / 100})
            for s in range(3)]
    runs += [_fake_run(tmp_path, f"b{s}", s, "per-context", {"mnist": 0.90 + s / 50})
             for s in range(3)]
    runs += [_fake_run(tmp_path, f"c{s}", s, "local", {"mnist": 0.81}) for s in range(2)]
    assert main([*runs, "--baseline", "norm-policy=average"]) == 0
    out = capsys.readouterr().out
    diff = paired_difference({s: 0.90 + s / 50 for s in range(3)},
                             {s: 0.80 + s / 100 for s in range(3)})
    assert f"| norm_policy=per-context | 3            | +{diff.format(100, 1)} " in out
    assert "- norm_policy=per-context is higher than norm_policy=average by 11.0 points" in out
    assert "norm_policy=local vs norm_policy=average: 2 paired seeds, too few" in out
    for spec in ("norm=context", "norm=batch"):
        assert main([*runs, "--baseline", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --baseline '{spec}' matches") and "\n" not in err
