"""benchmarks/adamatch_digits.py: statistics, grid order, resume, and the generated page."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "adamatch_digits.py"
_spec = importlib.util.spec_from_file_location("adamatch_digits", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("adamatch_digits", bench)  # dataclasses look their module up
_spec.loader.exec_module(bench)


def _record(pair: str, norm: str, scope: str, seed: int, acc: float, steps: int = 1000) -> dict:
    return {"pair": pair, "norm": norm, "scope": scope, "seed": seed, "steps": steps,
            "batch_size": bench.BATCH, "uratio": bench.URATIO, "final_target_acc": acc,
            "final_target_acc_raw": acc + 0.01, "final_source_acc": 0.98,
            "curve": [{"step": 500, "target_acc": acc - 0.1}, {"step": steps, "target_acc": acc}],
            "seconds_per_step": 0.5, "total_seconds": 0.6 * steps, "cpu_seconds": 0.4 * steps,
            "hardware": {"processor": "test CPU", "cpu_count": 2, "torch": "x",
                         "torch_threads": 1}}


def _write(runs_dir: Path, records: list[dict]) -> None:
    runs_dir.mkdir(parents=True, exist_ok=True)
    for r in records:
        name = f"{r['pair']}-{r['norm']}-{r['scope']}-seed{r['seed']}-steps{r['steps']}.json"
        (runs_dir / name).write_text(json.dumps(r))


def test_grid_priority_and_input_scope_has_no_batch():
    cells = bench.grid(["mnist-mnistm", "usps-mnist"], ["batch", "context"], ["all", "input"],
                       [0, 1])
    names = [c.name for c in cells]
    assert names[:4] == ["mnist-mnistm-batch-all-seed0", "mnist-mnistm-batch-all-seed1",
                         "mnist-mnistm-context-all-seed0", "mnist-mnistm-context-all-seed1"]
    assert "mnist-mnistm-batch-input-seed0" not in names
    assert names[4] == "mnist-mnistm-context-input-seed0" and len(cells) == 12
    args = cells[4].args(100, 1, "", Path("o"))
    assert args[args.index("--norm-scope") + 1] == "input"
    assert args[args.index("--target-eval-context") + 1] == "source"


def test_every_budget_is_evaluated_where_the_flatness_criterion_reads():
    for steps in bench.PAIR_STEPS.values():
        args = bench.Cell("mnist-mnistm", "batch", "all", 0).args(steps, 1, "", Path("o"))
        every = int(args[args.index("--eval-every") + 1])
        assert steps // every == bench.EVALS_PER_RUN
        curve = [{"step": k, "target_acc": 0.5} for k in range(every, steps + 1, every)]
        _, start, end = bench.report.late_change(curve, "target_acc")
        assert (start, end) == (steps * 4 // 5, steps)  # the 80% point is an evaluation
    assert bench.eval_every(8000) == 400 and bench.eval_every(5) == 1


def test_resume_skips_finished_runs_of_the_same_budget(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    _write(runs, [_record("mnist-mnistm", "batch", "all", 0, 0.6),
                  _record("mnist-mnistm", "context", "all", 0, 0.7, steps=500)])
    started = []
    monkeypatch.setattr(bench, "run_cell", lambda cell, **kw: started.append(cell.name) or
                        _record(cell.pair, cell.norm, cell.scope, cell.seed, 0.5))
    bench.run_benchmark(pairs=["mnist-mnistm"], norms=["batch", "context"], scopes=["all"],
                        seeds=[0], steps=1000, jobs=1, runs_dir=runs, page=tmp_path / "p.md",
                        log=False)
    assert started == ["mnist-mnistm-context-all-seed0"]  # other budget: not a finished cell


def test_budget_stops_starting_runs(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    _write(runs, [_record("mnist-mnistm", "batch", "all", 0, 0.6)])  # 0.6 s/step known
    monkeypatch.setattr(bench, "run_cell", lambda cell, **kw: pytest.fail("started"))
    bench.run_benchmark(pairs=["mnist-mnistm"], norms=["batch"], scopes=["all"], seeds=[0, 1],
                        steps=1000, budget_minutes=5, jobs=1, runs_dir=runs,
                        page=tmp_path / "p.md", log=False)  # 600 s projected > 300 s


def test_page_has_ci_paired_delta_missing_cells_and_curves(tmp_path):
    runs = tmp_path / "runs" / "adamatch"
    _write(runs, [_record("mnist-mnistm", "batch", "all", s, a) for s, a in
                  ((0, 0.60), (1, 0.62), (2, 0.64))]
           + [_record("mnist-mnistm", "context", "all", s, a) for s, a in
              ((0, 0.65), (1, 0.66), (2, 0.70))]
           + [_record("mnist-mnistm", "acn", "input", 0, 0.55)])
    page = tmp_path / "adamatch.md"
    text = bench.write_page(runs, page, steps=1000, pairs=["mnist-mnistm", "usps-mnist"],
                            norms=["batch", "context", "acn"], scopes=["all", "input"],
                            seeds=[0, 1, 2])
    half = 4.302653 * 0.02 / math.sqrt(3)
    assert f"| batch | all (target) | 0, 1, 2 | 62.00 ± {100 * half:.2f} |" in text
    assert "+5.00 ± " in text  # context - batch, paired over 3 seeds
    assert "| acn | input (source) | 0 | 55.00 (n = 1) |" in text
    assert "| usps-mnist | batch | all | 0, 1, 2 | 7 min | 10 min |" in text  # CPU, wall
    # 23 missing runs of 1,000 steps at 0.4 CPU-s and 0.6 wall-s per step
    assert "**2.6 h** of one free core" in text and "measured here 3.8 h" in text
    assert "No run yet." in text and "as transcribed from the paper" in text
    assert (tmp_path / "adamatch_curves.png").stat().st_size > 0


def test_summary_table_is_written_into_the_readme_between_its_markers(tmp_path):
    runs = tmp_path / "runs"
    batch = [_record("usps-mnist", "batch", "all", s, a) for s, a in ((0, 0.60), (1, 0.62),
                                                                     (2, 0.64))]
    batch[2]["curve"][0]["target_acc"] = 0.64  # flat: the other runs rose 10 points
    higher = [_record("usps-mnist", "context", "all", s, a + 0.05) for s, a in
              ((0, 0.60), (1, 0.62), (2, 0.645))]
    _write(runs, [*batch, *higher, _record("usps-mnist", "acn", "all", 0, 0.5)])
    start, end = bench.SUMMARY_MARKERS
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nBefore.\n\n{start}\nold table\n{end}\n\nAfter.\n")
    bench.write_page(runs, tmp_path / "p.md", steps=1000, pairs=["usps-mnist", "mnist-mnistm"],
                     norms=["batch", "context", "acn"], scopes=["all"], seeds=[0, 1, 2],
                     readme=readme)
    text = readme.read_text()
    assert text.startswith("# Title\n\nBefore.\n\n" + start + "\n| norm (scope) |")
    assert text.endswith(end + "\n\nAfter.\n") and "old table" not in text
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in text.splitlines()
            if line.startswith("| `")}
    assert rows["| `batch` (all)"][0].endswith(" ‡")  # two of its seeds not flat
    assert "**Δ +5.17 ± " in rows["| `context` (all)"][0]  # separated: bold
    assert rows["| `acn` (all)"][0] == "50.00 (n = 1) ‡"  # one seed: no difference given
    assert rows["| `acn` (all)"][1] == "not run |"
    assert text.count("| `") == 3  # one row per norm and scope, nothing else
    page = (tmp_path / "p.md").read_text()
    assert "\n".join(text.split(start + "\n")[1].split("\n" + end)[0].splitlines()) in page

    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not bench.sync_readme(plain, ["| x |"]) and plain.read_text() == "no markers\n"


def test_the_readme_follows_only_the_default_page_of_the_whole_grid(monkeypatch, tmp_path):
    given: list = []
    monkeypatch.setattr(bench, "write_page", lambda *a, **k: given.append(k["readme"]))
    monkeypatch.setattr(bench, "run_benchmark", lambda **k: given.append(k["readme"]))
    bench.main(["--page-only"])
    bench.main(["--page-only", "--pairs", "usps-mnist"])  # a part of the grid
    bench.main(["--page-only", "--steps", "500"])  # another budget
    bench.main(["--page-only", "--page", str(tmp_path / "p.md")])  # another page
    bench.main(["--pairs", "usps-mnist", "--seeds", "1"])  # runs some cells, writes the whole page
    assert given == [bench.README, None, None, None, bench.README]


def test_page_shows_other_budgets_in_their_own_section(tmp_path):
    runs = tmp_path / "runs"
    _write(runs, [_record("mnist-mnistm", "batch", "all", 0, 0.60, steps=500),
                  _record("mnist-mnistm", "batch", "all", 0, 0.70, steps=3000)])
    text = bench.write_page(runs, tmp_path / "p.md", steps=3000, pairs=["mnist-mnistm"],
                            norms=["batch"], scopes=["all"], seeds=[0])
    assert text.index("## Results at 3,000 steps") < text.index(
        "## Results at 500 steps (not the pair's budget)")
    assert "| 70.00 (n = 1) |" in text and "| 60.00 (n = 1) |" in text
    assert "None." in text  # the one cell of the 3000-step grid exists


def test_convergence_is_judged_from_each_runs_own_curve(tmp_path):
    def curve(late: float) -> list[dict]:  # accuracy at steps 0..1000; the last 200 add `late`
        return [{"step": k * 100, "target_acc": 0.5 + 0.02 * min(k, 8) + (late if k == 10 else 0),
                 "source_acc": 0.99} for k in range(11)]

    assert bench.late_change(curve(0.0)) == pytest.approx((0.0, 800, 1000))
    assert bench.late_change(curve(0.03))[0] == pytest.approx(0.03)
    assert bench.late_change([{"step": 1000, "target_acc": 0.5}]) is None  # nothing that early
    flat = [dict(_record("usps-mnist", "batch", "all", s, 0.66), curve=curve(0.005))
            for s in (0, 1)]
    assert "**flat**" in bench.convergence_line(flat)
    rising = flat + [dict(_record("usps-mnist", "context", "all", 0, 0.69), curve=curve(0.03))]
    line = bench.convergence_line(rising)
    assert "**not flat** in 1 of 3 runs" in line and "context/all seed 0 +3.00" in line
    runs = tmp_path / "runs"
    _write(runs, rising)
    text = bench.write_page(runs, tmp_path / "p.md", steps=1000, pairs=["usps-mnist"],
                            norms=["batch", "context"], scopes=["all"], seeds=[0, 1])
    assert "| +0.50, +0.50 |" in text and "| +3.00 |" in text  # per-seed change column
    assert line in text


def test_calibration_reading_is_computed_from_its_curve():
    cal = {"curve": [{"step": 100 * k, "target_acc": 0.6 + 0.01 * k, "source_acc": 0.99}
                     for k in range(1, 11)]}
    text = bench._calibration_reading(cal)
    assert "had not flattened at 1,000 steps" in text and "+2.00 points from step 800" in text
    cal["curve"][-1]["target_acc"] = cal["curve"][-3]["target_acc"] + 0.002
    assert "**the target curve was flat**" in bench._calibration_reading(cal)


def test_each_pair_runs_and_is_reported_at_its_own_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "PAIR_STEPS", {"mnist-mnistm": 800, "mnist-usps": 300,
                                              "usps-mnist": 300})
    assert bench.budget_of("mnist-mnistm", None) == 800 and bench.budget_of("usps-mnist", 0) == 300
    assert bench.budget_of("mnist-mnistm", 500) == 500  # --steps overrides every pair
    runs = tmp_path / "runs"
    _write(runs, [_record("mnist-mnistm", "batch", "all", 0, 0.90, steps=800),
                  _record("mnist-mnistm", "batch", "all", 0, 0.70, steps=300),
                  _record("usps-mnist", "batch", "all", 0, 0.95, steps=300)])
    text = bench.write_page(runs, tmp_path / "p.md", pairs=["mnist-mnistm", "usps-mnist"],
                            norms=["batch"], scopes=["all"], seeds=[0])
    main = text[text.index("## Results at each pair's budget"):
                text.index("## Results at 300 steps (not the pair's budget)")]
    assert "### MNIST → MNIST-M (800 steps)" in main and "| 90.00 (n = 1) |" in main
    assert "### USPS → MNIST (300 steps)" in main and "| 95.00 (n = 1) |" in main
    assert "| 70.00 (n = 1) |" not in main and "| 70.00 (n = 1) |" in text
    assert "None." in text  # both cells of the grid exist at their pair's budget
    calls = []
    monkeypatch.setattr(bench, "run_cell", lambda cell, **kw: calls.append((cell.pair,
                                                                             kw["steps"])))
    bench.run_benchmark(pairs=["mnist-mnistm", "usps-mnist"], norms=["batch"], scopes=["all"],
                        seeds=[0, 1], jobs=1, runs_dir=runs, page=tmp_path / "q.md", log=False)
    assert calls == [("mnist-mnistm", 800), ("usps-mnist", 300)]  # seed 1 of each, own budget


def test_a_run_of_some_cells_keeps_the_others_on_the_page(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setattr(bench, "PAIR_STEPS", {"mnist-mnistm": 1000, "mnist-usps": 1000,
                                              "usps-mnist": 1000})
    _write(runs, [_record("mnist-mnistm", "batch", "all", 0, 0.81)])
    monkeypatch.setattr(bench, "run_cell", lambda cell, **kw: _write(runs, [_record(
        cell.pair, cell.norm, cell.scope, cell.seed, 0.97)]))
    bench.run_benchmark(pairs=["usps-mnist"], norms=["batch"], scopes=["all"], seeds=[0],
                        jobs=1, runs_dir=runs, page=tmp_path / "p.md", log=False)
    text = (tmp_path / "p.md").read_text()
    assert "| 97.00 (n = 1) |" in text  # the cell run now
    assert "| 81.00 (n = 1) |" in text  # and the one run before, not chosen this time


def test_paper_figure_sets_the_batch_runs_beside_the_quoted_figure():
    paper = bench.PAPER_TRANSCRIBED["mnist-usps"]
    near = [_record("mnist-usps", "batch", "all", s, (paper + d) / 100) for s, d in
            enumerate((-0.3, 0.0, 0.3))]
    line = bench.paper_figure("mnist-usps", 3000, near)
    assert f"{paper:.1f}% target accuracy for MNIST → USPS" in line
    assert "not checked against the paper itself" in line and "instead of 3,000" in line
    assert f"{paper:.2f} ± " in line and "inside their 95% interval" in line
    far = [_record("mnist-usps", "batch", "all", s, (paper - 5 + d) / 100) for s, d in
           enumerate((-0.1, 0.0, 0.1))]
    assert "5.00 points below it" in bench.paper_figure("mnist-usps", 3000, far)
    assert "outside their 95% interval" in bench.paper_figure("mnist-usps", 3000, far)
    # other norms and a single batch run give no interval to compare with
    other = [_record("mnist-usps", "context", "all", s, 0.9) for s in range(3)]
    assert "`batch` runs above" not in bench.paper_figure("mnist-usps", 3000, other + near[:1])


def test_a_pair_not_flat_at_its_budget_gets_the_cost_of_a_longer_one():
    rising = _record("usps-mnist", "batch", "all", 0, 0.9)  # +10 points over its last half
    flat = dict(rising, curve=[{"step": 500, "target_acc": 0.9}, {"step": 1000,
                                                                   "target_acc": 0.9}])
    cells = bench.grid(["usps-mnist"], ["batch", "context"], ["all"], [0, 1])
    assert bench._longer_budget_note("usps-mnist", [flat], 1000, cells, [flat]) is None
    note = bench._longer_budget_note("usps-mnist", [rising, flat], 1000, cells, [rising, flat])
    # 4 runs x 1,500 steps x 0.4 CPU-s/step (the records' own) = 2,400 s
    assert "1 of its 2 runs are not flat at 1,000 steps" in note
    assert "(4 runs) at 1.5× the budget (1,500 steps" in note and "**0.7 h**" in note
    uan = bench.grid(["usps-mnist"], ["uan"], ["all"], [0])
    assert "not counted: uan" in bench._longer_budget_note("usps-mnist", [rising], 1000, uan,
                                                           [rising])


def test_a_record_names_the_commit_its_run_started_from(tmp_path, monkeypatch):
    """HEAD may move while a run trains (hours on this CPU): the record keeps the commit of the
    code the run's process imported, read before it starts."""
    head = ["c0ffee1"]

    def fake_run(argv, **kw):  # noqa: ANN001, ANN202
        if argv[0] == "git":
            return type("P", (), {"stdout": head[0] + "\n", "returncode": 0})()
        head[0] = "beef002"  # a commit lands while the run trains
        out = Path(argv[argv.index("--out") + 1])
        cfg = {"source": "usps", "target": "mnist", "target_eval_context": "target",
               "steps": 10, "batch_size": 64, "uratio": 3}
        acc = {k: 0.5 for k in ("final_target_acc", "final_target_acc_raw", "best_target_acc",
                                "best_target_acc_raw", "final_source_acc",
                                "final_source_acc_raw")}
        (out / "summary.json").write_text(json.dumps({
            "config": cfg, **acc, "evals": [], "seconds_per_step": 0.1, "total_seconds": 1.0,
            "cpu_seconds": 1.0, "hardware": {}, "data": {}}))
        return type("P", (), {"returncode": 0})()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    cell = bench.grid(["usps-mnist"], ["batch"], ["all"], [0])[0]
    record = bench.run_cell(cell, steps=10, threads=1, data_dir="", runs_dir=tmp_path / "runs",
                            work_dir=tmp_path / "work", log=False)
    assert record["commit"] == "c0ffee1"


def test_a_cell_cut_short_is_run_afresh_in_its_folder(tmp_path, monkeypatch):
    """A cell without a record whose folder holds a run cut short: the run starts afresh there
    (``python -m fedctx.adapt`` refuses an --out holding another run's results)."""
    from fedctx.results import results_in

    cell = bench.grid(["mnist-usps"], ["batch"], ["all"], [0])[0]
    out = tmp_path / "work" / cell.name
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    seen = []
    real_run = bench.subprocess.run

    class Stop(Exception):
        pass

    def run(cmd, *args, **kwargs):
        if cmd[:3] != [sys.executable, "-m", "fedctx.adapt"]:
            return real_run(cmd, *args, **kwargs)  # git rev-parse
        seen.append(results_in(out))
        raise Stop  # the run itself is not the point here

    monkeypatch.setattr(bench.subprocess, "run", run)
    with pytest.raises(Stop):
        bench.run_cell(cell, steps=10, threads=1, data_dir="", runs_dir=tmp_path / "runs",
                       work_dir=tmp_path / "work", log=False)
    assert seen == [[]]


@pytest.mark.parametrize("checkpoint", ["same-run", "other-budget", "none"])
def test_a_cell_cut_short_continues_from_its_checkpoint(tmp_path, monkeypatch, checkpoint):
    """A cell whose folder holds a checkpoint of the same run goes on with ``--resume`` (its
    log appended, every session's commit in the record); a checkpoint of other options, or
    none, starts the run afresh."""
    from fedctx.adamatch.cli import build_parser
    from fedctx.adamatch.config import resolve
    from fedctx.results import save_checkpoint

    cell = bench.Cell("usps-mnist", "batch", "all", 0)
    work = tmp_path / "bench"
    out = work / cell.name
    out.mkdir(parents=True)
    (out / "stdout.log").write_text("first session\n")
    (out / "commits.txt").write_text("abc1234\n")
    if checkpoint != "none":
        steps = 3000 if checkpoint == "same-run" else 2000
        config = resolve(build_parser(sweep=False).parse_args(
            cell.args(steps, 1, "", out))).to_dict()
        save_checkpoint({"step": 1, "state": {}, "batches": {}, "torch_rng": None,
                         "history": [{}], "evals": [], "seconds": {},
                         "config": config}, out)
    called = []

    def fake_run(argv, **kwargs):
        called.append(argv)
        kwargs["stdout"].write("a session\n")
        summary = {"config": resolve(build_parser(sweep=False).parse_args(
            [a for a in argv[3:] if a != "--resume"])).to_dict(),
            "final_target_acc": 0.9, "final_target_acc_raw": 0.9, "best_target_acc": 0.9,
            "best_target_acc_raw": 0.9, "final_source_acc": 0.99, "final_source_acc_raw": 0.99,
            "evals": [], "seconds_per_step": 0.3, "total_seconds": 900.0, "cpu_seconds": 800.0,
            "hardware": {}, "data": {}}
        (out / "summary.json").write_text(json.dumps(summary))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "_commit", lambda: "def5678")
    record = bench.run_cell(cell, steps=3000, threads=1, data_dir="", runs_dir=tmp_path / "runs",
                            work_dir=work, log=False)
    resumed = checkpoint == "same-run"
    assert ("--resume" in called[0]) == resumed
    log = (out / "stdout.log").read_text()
    assert log == ("first session\na session\n" if resumed else "a session\n")
    assert record["commit"] == ("abc1234,def5678" if resumed else "def5678")
    assert (out / "checkpoint.pt").exists() == resumed  # afresh: the old results are cleared
