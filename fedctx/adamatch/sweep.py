"""A grid of AdaMatch runs (norms x seeds) as concurrent Ray tasks, and their comparison table."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedctx.adamatch.config import AdaptConfig, AdaptConfigError
from fedctx.results import atomic_write_text, check_results_folder


def _run_job(cfg_dict: dict[str, Any], threads: int) -> dict[str, Any]:
    """Body of one Ray task: train one configuration with ``threads`` torch threads; a run of
    it cut short in its folder goes on from its checkpoint, anything else there is replaced."""
    from fedctx.adamatch.training import can_resume, train

    cfg = AdaptConfig(**cfg_dict).replace(threads=threads)
    if can_resume(cfg):
        return train(cfg, log=False, resume=True)
    return train(cfg, log=False, overwrite=True)


def summarize(summaries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per norm, the final target accuracy of the EMA model (and the source accuracy) as mean
    ± half-width of the 95% t-interval over seeds, and the paired difference to the baseline
    norm (``batch`` when the sweep has it, else the first norm): the mean of the per-seed
    differences with its interval, over the seeds both norms finished (:mod:`fedctx.report`).

    Args:
        summaries: ``summary.json`` dicts of finished runs (``config.norm``, ``config.seed``).
    Returns:
        ``{norm: {"n", "seeds", "target_accs", "target_acc", "target_acc_ci95", "source_acc",
        "source_acc_ci95", "train_seconds_mean"}}`` in first-seen norm order; every norm but the
        baseline also has ``"vs"`` (the baseline), ``"delta"``, ``"delta_ci95"``, ``"delta_n"``
        (paired seeds) and ``"verdict"`` (a sentence claiming only what the interval supports).
        A half-width is ``None`` where it is undefined (one value).
    """
    from fedctx.report import mean_ci, paired_difference, verdict

    by_norm: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        by_norm.setdefault(s["config"]["norm"], []).append(s)
    baseline = "batch" if "batch" in by_norm else next(iter(by_norm), None)

    def half_width(est: Any) -> float | None:
        return None if math.isnan(est.half_width) else est.half_width

    def per_seed(norm: str) -> dict[int, float]:
        return {r["config"]["seed"]: r["final_target_acc"] for r in by_norm[norm]}

    table: dict[str, dict[str, Any]] = {}
    for norm, runs in by_norm.items():
        target = mean_ci([r["final_target_acc"] for r in runs])
        source = mean_ci([r["final_source_acc"] for r in runs])
        row = {"n": len(runs), "seeds": [r["config"]["seed"] for r in runs],
               "target_accs": [r["final_target_acc"] for r in runs],
               "target_acc": target.mean, "target_acc_ci95": half_width(target),
               "source_acc": source.mean, "source_acc_ci95": half_width(source),
               "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in runs)}
        if norm != baseline:
            diff = paired_difference(per_seed(norm), per_seed(baseline))
            row |= {"vs": baseline, "delta": diff.mean, "delta_ci95": half_width(diff),
                    "delta_n": diff.n, "verdict": verdict(diff, f"`{norm}`", f"`{baseline}`")}
        table[norm] = row
    return table


def markdown_table(table: dict[str, dict[str, Any]], title: str) -> str:
    """The comparison as a Markdown table (accuracies in %, differences in points), then one
    sentence per norm compared with the baseline."""
    from fedctx.report import Estimate

    def cell(mean: float, ci95: float | None, n: int, signed: bool = False) -> str:
        return Estimate(mean, math.nan if ci95 is None else ci95, n).format(100, 2, signed)

    baseline = next((row["vs"] for row in table.values() if "vs" in row), None)
    lines = [f"### {title}", "",
             "| norm | runs | target acc (%) mean ± 95% CI | Δ vs "
             f"{baseline or 'baseline'} (points, paired) ± 95% CI | source acc (%) mean ± 95% CI "
             "| per-seed target acc (%) | train s/run |",
             "|---|---|---|---|---|---|---|"]
    for norm, row in table.items():
        per_seed = ", ".join(f"{100 * a:.2f}" for a in row["target_accs"])
        delta = ("—" if "vs" not in row else
                 f"{cell(row['delta'], row['delta_ci95'], row['delta_n'], signed=True)} "
                 f"(n = {row['delta_n']})")
        lines.append(
            f"| {norm} | {row['n']} | {cell(row['target_acc'], row['target_acc_ci95'], row['n'])} "
            f"| {delta} | {cell(row['source_acc'], row['source_acc_ci95'], row['n'])} "
            f"| {per_seed} | {row['train_seconds_mean']:.0f} |")
    verdicts = [f"- {row['verdict']}" for row in table.values() if "verdict" in row]
    return "\n".join(lines + ([""] + verdicts if verdicts else [])) + "\n"


def _plot_grad_variance_by_norm(summaries: list[dict[str, Any]], path: Path) -> None:
    """Gradient variance per step of the first run of each norm, on one figure."""
    from fedctx.adamatch.plots import plot_grad_variance

    series: dict[str, list[dict[str, float]]] = {}
    seen: set[str] = set()
    for s in summaries:
        norm = s["config"]["norm"]
        if norm not in seen:
            seen.add(norm)
            lines = (Path(s["out"]) / "metrics.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            series[f"{norm} (seed {s['config']['seed']})"] = [r for r in records
                                                               if "eval" not in r]
    plot_grad_variance(series, path)


def _finished(cfg: AdaptConfig) -> dict[str, Any] | None:
    """The summary of an earlier run of this configuration (up to ``threads``) in ``cfg.out``;
    an earlier run of another configuration there is an :class:`AdaptConfigError` (the sweep
    would replace it)."""
    path = Path(cfg.out) / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    saved = {**summary.get("config", {}), "threads": cfg.threads}
    differ = [k for k, v in cfg.to_dict().items() if saved.get(k) != v]
    if differ:
        k = differ[0]
        raise AdaptConfigError(f"{cfg.out} holds a finished run with {k} = {saved.get(k)!r} "
                               f"(this sweep: {getattr(cfg, k)!r}); give the sweep a new --out")
    return summary


def grid(base: AdaptConfig, norms: list[str], seeds: list[int], out: Path, device: str
         ) -> list[AdaptConfig]:
    """One validated configuration per ``(norm, seed)``, its folder ``out/<norm>-seed<seed>``."""
    configs = [base.replace(norm=n, seed=s, out=str(out / f"{n}-seed{s}"), device=device)
               for n in norms for s in seeds]
    for cfg in configs:
        cfg.validate()
    return configs


@contextlib.contextmanager
def ray_instance(ray_address: str, num_cpus: int, log: bool) -> Iterator[None]:
    """Ray for the sweep's tasks: the running instance, else one joined at ``ray_address`` or
    started locally with ``num_cpus`` (0: all) and shut down on exit."""
    import ray

    if ray.is_initialized():
        yield
        return
    if ray_address:
        from fedctx.federated.engine import connect_ray_cluster

        connect_ray_cluster(ray_address, AdaptConfigError, log_to_driver=log)
    else:
        with warnings.catch_warnings():  # Ray's FutureWarning about accelerator variables
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(num_cpus=num_cpus or None, include_dashboard=False, log_to_driver=log)
    try:
        yield
    finally:
        ray.shutdown()


def job_error(cfg: AdaptConfig, err: BaseException) -> dict[str, Any]:
    """A failed job's record; its whole error (the job's traceback) goes to ``error.txt`` in the
    job's folder."""
    cause = getattr(err, "cause", None) or err  # the job's own exception
    lines = [x for x in str(cause).splitlines() if x.strip()]
    folder = Path(cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "error.txt", f"{err}\n")
    return {"norm": cfg.norm, "seed": cfg.seed, "error_file": str(folder / "error.txt"),
            "error": lines[-1] if lines else type(cause).__name__}


def run_jobs(configs: list[AdaptConfig], finished: list[dict[str, Any] | None],
             cpus_per_job: float, gpus_per_job: float, log: bool
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train every configuration whose ``finished`` summary (:func:`_finished`) is ``None`` as
    a Ray task; the summaries (grid order) and the failures."""
    import ray

    task = ray.remote(_run_job).options(num_cpus=cpus_per_job, num_gpus=gpus_per_job)
    threads = max(1, math.floor(cpus_per_job))
    summaries = [s for s in finished if s is not None]
    done_before = {(s["config"]["norm"], s["config"]["seed"]) for s in summaries}
    pending = {task.remote(cfg.to_dict(), threads): cfg for cfg in configs
               if (cfg.norm, cfg.seed) not in done_before}
    failures: list[dict[str, Any]] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        cfg = pending.pop(done[0])
        try:
            summaries.append(ray.get(done[0]))
            line = f"target acc {summaries[-1]['final_target_acc']:.4f}"
        except (ray.exceptions.RayError, RuntimeError) as err:
            failures.append(job_error(cfg, err))
            line = f"FAILED: {failures[-1]['error']}"
        if log:
            print(f"[{len(summaries) + len(failures)}/{len(configs)}] {cfg.norm} seed "
                  f"{cfg.seed}: {line}", flush=True)
    order = {(c.norm, c.seed): i for i, c in enumerate(configs)}
    summaries.sort(key=lambda s: order[(s["config"]["norm"], s["config"]["seed"])])
    return summaries, failures


def write_sweep(out: Path, result: dict[str, Any]) -> None:
    """``sweep.json``, ``sweep.md`` (the table) and ``grad_variance.png`` (one line per norm,
    when a run finished)."""
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    if result["runs"]:
        _plot_grad_variance_by_norm(result["runs"], out / "grad_variance.png")
    atomic_write_text(out / "sweep.md", markdown_table(result["table"], result["title"])
                      + f"\nWall time of the sweep: {result['wall_seconds']:.0f} s.\n")


def run_sweep(base: AdaptConfig, norms: list[str], seeds: list[int], out: Path, *,
              cpus_per_job: float = 1.0, gpus_per_job: float = 0.0, num_cpus: int = 0,
              ray_address: str = "", log: bool = True) -> dict[str, Any]:
    """Train every ``(norm, seed)`` of the grid as a Ray task; write ``sweep.json`` and
    ``sweep.md`` (the comparison table), ``grad_variance.png`` (one line per norm) and each
    run's folder ``out/<norm>-seed<seed>``. A run whose folder already holds a ``summary.json``
    of the same configuration is reused, not re-run; one of other options is refused
    (:class:`AdaptConfigError`, before any job starts, as is an ``out`` that cannot be
    written); a run cut short there goes on from its checkpoint;
    a run that fails is listed under
    ``failures`` (its error in its folder's ``error.txt``) and left out of the table.

    Args:
        base: options shared by all runs (``norm``, ``seed`` and ``out`` are overridden).
        cpus_per_job, gpus_per_job: Ray resources per task (GPU fractions allowed); a task uses
            ``max(1, floor(cpus_per_job))`` torch threads and CUDA when ``gpus_per_job > 0``.
        num_cpus: CPUs of the local Ray instance (0: all); ignored with ``ray_address``.
        ray_address: join this existing Ray cluster instead of starting a local instance.
    Returns:
        ``{"table": ..., "runs": [summaries], "failures": [...], "wall_seconds": ...}`` (also
        ``sweep.json``).
    """
    check_results_folder(out, AdaptConfigError)
    out.mkdir(parents=True, exist_ok=True)
    configs = grid(base, norms, seeds, out, "cuda" if gpus_per_job > 0 else "cpu")
    finished = [_finished(cfg) for cfg in configs]  # before Ray: other options are refused
    start = time.perf_counter()
    with ray_instance(ray_address, num_cpus, log):
        summaries, failures = run_jobs(configs, finished, cpus_per_job, gpus_per_job, log)
    title = (f"AdaMatch {base.source} → {base.target}, {base.steps} steps, seeds "
             f"{', '.join(map(str, seeds))}")
    result = {"title": title, "table": summarize(summaries), "runs": summaries,
              "failures": failures, "wall_seconds": time.perf_counter() - start,
              "cpus_per_job": cpus_per_job, "gpus_per_job": gpus_per_job}
    write_sweep(out, result)
    if log:
        print(markdown_table(result["table"], title), flush=True)
    return result
