"""``python -m fedctx.simulate``: run a federated experiment with context normalization on Ray.

Example: ``python -m fedctx.simulate --clients 20`` runs the embedded ``digits`` scenario.
Options: defaults < the scenario's ``configs/<scenario>.toml`` < ``--config FILE`` < flags.
It runs fedctx's Flower App (the same ServerApp and ClientApp as ``flwr run .``) with the
resolved options as Flower's run config. ``--seeds 0,1,2`` runs the experiment once per seed and
reports mean ± 95% CI (:mod:`fedctx.seeds`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedctx.config import (
    ConfigError,
    SimConfig,
    build_parser,
    check_flags,
    load_config_file,
    resolve,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from fedctx.data import FederatedDataset


def command_parser() -> argparse.ArgumentParser:
    """Every :class:`SimConfig` option as a flag, ``--config`` and the driver option
    ``--seeds`` (not an option of a run: it runs several, :mod:`fedctx.seeds`)."""
    parser = build_parser("python -m fedctx.simulate", __doc__.splitlines()[0])
    parser.add_argument("--seeds", default=None, metavar="LIST",
                        help="run the experiment once per seed (comma-separated, e.g. 0,1,2; "
                        "not with --seed), concurrently where the cores allow, each a normal "
                        "resumable run in OUT/seed-<s>; then write OUT/seeds.json and "
                        "OUT/seeds.md: final test accuracy, mean ± 95%% CI per context and "
                        "overall, and per round")
    return parser


def parse_config(argv: list[str] | None = None) -> SimConfig:
    """Resolve the run's configuration from ``argv``; :class:`ConfigError` on bad input."""
    return config_from_args(command_parser().parse_args(argv))


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The run's configuration from parsed flags (with ``--config`` and the scenario's
    defaults); :class:`ConfigError` on bad input."""
    from fedctx import scenarios as simulations
    from fedctx import strategies

    file_values = load_config_file(args.config) if args.config else {}
    scenario_name = args.scenario or file_values.get("scenario") or SimConfig.scenario
    try:
        scenario = simulations.get_scenario(scenario_name)
    except ValueError as err:
        raise ConfigError(f"--scenario: {err}") from None
    base = scenario.defaults()
    config = resolve(args, base)
    scenario.check_model(config.model)
    if config.resume and config.overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite replaces it: "
                          "give one of them")
    try:
        strategies.resolve_strategy(config.strategy, plugin_path=config.plugin_path)
        implied = strategies.implied_norm_policy(config.strategy, plugin_path=config.plugin_path)
    except ValueError as err:
        raise ConfigError(f"--strategy: {err}") from None
    if implied and args.norm_policy is None and "norm_policy" not in file_values:
        config.norm_policy = implied
    if not config.out:
        from fedctx.federated.run_config import numbered_out

        config.out = numbered_out(config)
    if config.resume:
        given = {k for k, v in vars(args).items() if v is not None} | set(file_values)
        config = resumed_config(config, given & set(SimConfig.__dataclass_fields__))
    return config


class RunFinished(Exception):
    """``--resume`` of a run that has finished every round asked for."""


def resumed_config(config: SimConfig, given: set[str]) -> SimConfig:
    """The configuration saved with the run in ``config.out``, with the options ``given`` on
    the command line or in ``--config`` that cannot change results and ``--rounds`` (to extend
    the run); :class:`ConfigError` names an option that contradicts the saved run."""
    from fedctx.federated.run_config import ADDED_OPTIONS, RUNTIME_OPTIONS
    from fedctx.results import CheckpointError, load_checkpoint

    out = Path(config.out)
    try:
        ckpt, _ = load_checkpoint(out)
    except FileNotFoundError:
        raise ConfigError(f"--resume: no checkpoint in {out}; run without --resume first"
                          ) from None
    except CheckpointError as err:
        raise ConfigError(f"--resume: {err}") from None
    known = SimConfig.__dataclass_fields__
    # A run saved before an option existed ran with that option's old value.
    saved = {**ADDED_OPTIONS, **{k: v for k, v in ckpt["config"].items() if k in known}}
    differ = [k for k in sorted(given) if k not in RUNTIME_OPTIONS and k != "rounds"
              and k in saved and getattr(config, k) != saved[k]]
    if differ:
        k = differ[0]
        raise ConfigError(f"--resume: --{k.replace('_', '-')} {getattr(config, k)} contradicts "
                          f"the run in {out} ({k.replace('_', '-')} = {saved[k]!r}); resume "
                          "without it, or start a new run in another --out")
    values = {**saved, **{k: getattr(config, k) for k in given if k in RUNTIME_OPTIONS}}
    values.update(out=config.out, resume=True, overwrite=False)
    if "rounds" in given:
        values["rounds"] = config.rounds
    finished = int(ckpt["round"])
    if values["rounds"] < finished:
        raise ConfigError(f"--resume: --rounds {values['rounds']} is fewer than the "
                          f"{finished} rounds the run in {out} has finished")
    resumed = SimConfig(**values).validate()
    if finished >= resumed.rounds and (out / "summary.json").exists():
        raise RunFinished(f"fedctx: the run in {out} has finished all its {finished} rounds; "
                          f"nothing to resume (--resume --rounds N, N > {finished}, extends it)")
    return resumed


def check_out(config: SimConfig) -> None:
    """One-line :class:`ConfigError` for an ``--out`` that is a file, cannot be written, or
    (without ``--resume`` or ``--overwrite``) holds files already. Changes nothing."""
    from fedctx.results import check_results_folder, results_in

    out = Path(config.out)
    check_results_folder(out, ConfigError)
    if config.resume or config.overwrite or not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    if names:
        found = results_in(out)
        what = (f"another run's results ({', '.join(found)})" if found else
                f"files of yours ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        raise ConfigError(f"--out {out} holds {what}; give a new --out, --resume to continue "
                          "a run, or --overwrite to replace a run's results")


def prepare_out(config: SimConfig) -> None:
    """Create ``--out``; with ``--overwrite``, remove the files a run wrote there (only those).
    Called once every option, the data and the model are known to be valid."""
    from fedctx.results import clear_results

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.overwrite and not config.resume:
        clear_results(out)


def saved_rounds(out: Path) -> int:
    """How many finished rounds ``--resume`` would find in ``out`` (``metrics.jsonl`` lists
    only rounds whose checkpoint is written)."""
    try:
        return sum(1 for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line)
    except OSError:
        return 0


def resume_hint(out: Path, prefix: str = "continue with") -> str:
    """The line that tells how to continue, or ``""`` when no finished round exists."""
    n = saved_rounds(out)
    if not n:
        return ""
    rounds = "round 1 is" if n == 1 else f"rounds 1-{n} are"
    return f"\n{rounds} saved in {out}; {prefix} --resume --out {out}"


def check_resources(config: SimConfig) -> None:
    """One-line :class:`ConfigError`, before Ray starts, for resources no client can get: a GPU
    share with no GPU visible, more CPUs per client than the Ray instance has, a Ray address
    where no cluster answers (a bounded wait)."""
    if config.gpus_per_client > 0 and not config.ray_address:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--gpus-per-client {config.gpus_per_client}: no GPU is visible "
                              "to this process; use --gpus-per-client 0")
    if config.backend != "ray":
        return
    if not config.ray_address:
        cores = config.num_cpus or os.cpu_count() or 1
        if config.cpus_per_client > cores:
            raise ConfigError(f"--cpus-per-client {config.cpus_per_client} exceeds the {cores} "
                              "CPUs of the local Ray instance (--num-cpus, else this machine's "
                              "cores): no client could start")
        return
    from fedctx.federated.engine import connect_ray_cluster

    connect_ray_cluster(config.ray_address, ConfigError, config.verbose)


def _raised_in(error: BaseException, source: str | None) -> bool:
    """Whether ``error`` (or what caused it) passed through code under ``source``."""
    if not source:
        return False
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(source):
                return True
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
    return False


def report_failure(error: BaseException, config: SimConfig, plugin: str | None) -> None:
    """How a run that raised is reported: the user's plugin code with its traceback, anything
    else in one line; the resume line only when a finished round is saved."""
    import traceback

    from fedctx.federated.norm_strategy import StrategyStateError

    if isinstance(error, StrategyStateError):
        print(f"error: {error}", file=sys.stderr)
        return
    if _raised_in(error, plugin):
        print(f"error: strategy plugin {config.strategy!r} raised {type(error).__name__}: "
              f"{error}", file=sys.stderr)
        print("".join(traceback.format_exception(error)).rstrip(), file=sys.stderr)
        print(resume_hint(Path(config.out), "fix the plugin, then continue with").lstrip(),
              file=sys.stderr)
        return
    print(f"error: run failed: {type(error).__name__}: {error}{resume_hint(Path(config.out))}",
          file=sys.stderr)


def _interrupted(config: SimConfig | None) -> int:
    """After Ctrl-C: further ones are ignored; say what is saved (the truth), exit 130."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config is None:
        print("\ninterrupted", file=sys.stderr, flush=True)
    else:
        hint = resume_hint(Path(config.out))
        print("\ninterrupted" + (hint or "; no round had finished, nothing to resume"),
              file=sys.stderr, flush=True)
    return 130


def main(argv: list[str] | None = None) -> int:
    """Run the command; its exit status (0, 1 run failed or every round failed, 2 bad input,
    130 interrupted)."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    holder: list[SimConfig] = []
    if threading_main():
        signal.signal(signal.SIGINT, _first_ctrl_c)
    try:
        status = _main(argv, holder)
    except KeyboardInterrupt:
        # Ctrl-C stays ignored: a second one must not interrupt the way out
        status = _interrupted(holder[0] if holder else None)
        if holder and holder[0].backend == "ray" and _ray_started():
            _exit_now(status)  # Flower's ServerApp thread would keep the process alive
        return status
    if threading_main():
        signal.signal(signal.SIGINT, handler)
    return status


def _first_ctrl_c(signum: int, frame: object) -> None:
    """The first Ctrl-C interrupts the run; any further one is ignored."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _exit_now(status: int, timeout: float = 5.0) -> None:
    """Stop Ray (at most ``timeout`` seconds), then leave at once: Flower's ServerApp thread,
    waiting for replies that will never come, must not keep the process alive."""
    import threading

    def stop() -> None:
        # Ray's own processes, at once (a graceful ray.shutdown() lets the engine's threads
        # see dying actors and exit with their own status first)
        # and everything they started (Ray's agents and workers outlive a killed raylet)
        try:
            import psutil  # a dependency of Ray

            for child in psutil.Process().children(recursive=True):
                try:
                    child.kill()
                except psutil.Error:
                    pass
        except Exception:  # noqa: BLE001, S110 - leaving anyway
            pass

    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    # What is said is said: the engine's threads and Ray's processes, seeing the actors go,
    # would print their errors and tracebacks after it.
    logging.disable(logging.CRITICAL)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    worker = threading.Thread(target=stop, daemon=True)
    worker.start()
    worker.join(timeout)
    os._exit(status)


def _exit_on_ctrl_c(config: SimConfig) -> None:
    """On Ray, Ctrl-C ends the process from the signal handler itself: raised as
    ``KeyboardInterrupt`` inside Flower's engine, it would wait for its worker threads and
    ServerApp thread, which wait for replies that never come."""
    import signal

    def handler(signum: int, frame: object) -> None:
        _exit_now(_interrupted(config))

    if threading_main():
        signal.signal(signal.SIGINT, handler)


def _main(argv: list[str] | None, holder: list[SimConfig]) -> int:
    t0 = time.time()
    try:
        args = command_parser().parse_args(argv)
        if args.seeds is not None:
            from fedctx.seeds import run_seeds

            return run_seeds(args, sys.argv[1:] if argv is None else argv)
        check_flags(SimConfig, args)  # a mistyped value is told at once, before Ray starts
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fedctx.federated.startup import mark

    mark("main", t0)
    early = _local_ray_request(args) if argv is None else None
    if early is not None:  # the command line: Ray starts while the options are resolved
        early_cpus, verbose = early
        prepared = _prepare_beside_ray(lambda: _configure_and_prepare(args, holder),
                                       early_cpus, verbose, exit_on_failure=True)
        if holder and not isinstance(prepared, int) and not _started_as(holder[0], early_cpus):
            _stop_ray()  # the resolved options ask for another Ray: run_on_ray starts it
    else:
        config = _configure(args, holder)
        if isinstance(config, int):
            return config
        local_ray = config.backend == "ray" and not config.ray_address
        prepared = (_prepare_beside_ray(lambda: _prepare(config), config.num_cpus,
                                        config.verbose) if local_ray else _prepare(config))
    if isinstance(prepared, int):
        return prepared
    config = holder[0]
    data, plugin = prepared
    mark("driver-ready")
    print(f"fedctx: scenario {config.scenario!r}: {config.clients} clients over "
          f"{data.num_contexts} contexts ({', '.join(data.context_names)}); norm "
          f"{config.norm!r}, policy {config.norm_policy!r}, strategy {config.strategy!r}; "
          f"{config.rounds} rounds, {config.fraction:.0%} of clients per round", flush=True)
    from fedctx.federated.engine import run_in_process, run_on_ray
    from fedctx.federated.run_config import to_run_config
    from fedctx.federated.server import STARTED_ENV

    os.environ[STARTED_ENV] = str(t0)
    run_config = to_run_config(config)
    error: BaseException | None = None
    try:
        if config.backend == "inprocess":
            run_in_process(run_config, num_clients=config.clients, verbose=config.verbose)
        else:
            print("Starting Ray and the Flower simulation engine...", flush=True)
            _exit_on_ctrl_c(config)
            run_on_ray(run_config, num_clients=config.clients,
                       cpus_per_client=config.cpus_per_client,
                       gpus_per_client=config.gpus_per_client, num_cpus=config.num_cpus,
                       ray_address=config.ray_address, verbose=config.verbose)
    except Exception as err:  # noqa: BLE001 - reported below
        error = err.__cause__ if isinstance(err.__cause__, Exception) else err
    if error is not None:
        report_failure(error, config, plugin)
        return _failed_on_ray(config)
    if not (Path(config.out) / "summary.json").exists():
        print("error: run failed: the simulation engine stopped before the last round"
              + resume_hint(Path(config.out)), file=sys.stderr)
        return _failed_on_ray(config)
    if failed := every_round_failed(Path(config.out)):
        print(f"error: {failed}", file=sys.stderr)
        return 1
    print(f"Done in {time.time() - t0:.1f}s.")
    return 0


def _prepare(config: SimConfig) -> tuple[FederatedDataset, str | None] | int:
    """The driver's part before the engine: data and model (fail fast, before Ray is used), the
    strategy (a plugin's error shown as such), the ``--out`` folder. The data and the strategy
    plugin's source, or the exit status of a run that cannot start."""
    from fedctx import strategies
    from fedctx.data.sources import MissingDataError
    from fedctx.federated.engine import quiet_flower
    from fedctx.federated.run_config import to_run_config
    from fedctx.federated.runtime import get_runtime
    from fedctx.federated.server import make_strategy
    from fedctx.federated.startup import mark

    quiet_flower(config.verbose)  # again: importing Flower sets its logger's level to DEBUG
    mark("imports")
    try:
        rt = get_runtime(to_run_config(config))
    except (MissingDataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plugin = strategies.plugin_source(config.strategy, plugin_path=config.plugin_path)
    try:
        make_strategy(config, rt.model)
    except Exception as err:  # noqa: BLE001 - the plugin's own code: shown with its traceback
        report_failure(err, config, plugin)
        return 1 if _raised_in(err, plugin) else 2
    try:
        prepare_out(config)  # only now: every option, the data and the model are valid
    except OSError as err:
        print(f"error: --out {config.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    return rt.data, plugin


def _configure(args: argparse.Namespace, holder: list[SimConfig]) -> SimConfig | int:
    """The run's checked configuration (also appended to ``holder``), or the exit status of a
    command that ends here, its reason printed (bad options: 2; a finished run: 0)."""
    try:
        config = config_from_args(args)
        holder.append(config)
        check_out(config)
        check_resources(config)
    except RunFinished as done:
        print(done)
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return config


def _configure_and_prepare(args: argparse.Namespace, holder: list[SimConfig]
                           ) -> tuple[FederatedDataset, str | None] | int:
    config = _configure(args, holder)
    return config if isinstance(config, int) else _prepare(config)


def _local_ray_request(args: argparse.Namespace) -> tuple[int, bool] | None:
    """The CPUs of the local Ray instance the flags and ``--config`` file ask for, and
    ``--verbose``, read without resolving the options (which imports torch: about 2 s during
    which Ray can be starting); ``None`` when they ask for no local Ray or the file cannot be
    read (the options' own checks then report it)."""
    try:
        given = {**(load_config_file(args.config) if args.config else {}),
                 **{k: v for k, v in vars(args).items() if v is not None}}
    except ConfigError:
        return None
    if given.get("backend", SimConfig.backend) != "ray" or given.get("ray_address"):
        return None
    try:  # flags are strings here: resolving the options converts (and checks) them
        cpus = int(given.get("num_cpus", SimConfig.num_cpus))
    except (TypeError, ValueError):
        return None
    return (cpus, bool(given.get("verbose", SimConfig.verbose))) if cpus >= 0 else None


def _started_as(config: SimConfig, num_cpus: int) -> bool:
    """Whether the local Ray instance started with ``num_cpus`` is the one ``config`` runs on."""
    return config.backend == "ray" and not config.ray_address and config.num_cpus == num_cpus


def _stop_ray() -> None:
    import ray

    from fedctx.federated.startup import mark

    ray.shutdown()
    mark("ray-stopped")


def _prepare_beside_ray(prepare: Callable[[], tuple[FederatedDataset, str | None] | int],
                        num_cpus: int, verbose: bool, exit_on_failure: bool = False
                        ) -> tuple[FederatedDataset, str | None] | int:
    """``prepare()`` (:func:`_prepare`, possibly preceded by resolving the options) in a thread
    while this thread starts the local Ray instance with ``num_cpus`` CPUs: Ray's processes
    come up while the driver imports torch and Flower and builds its data and model (seconds
    each). Ray is shut down again when the run cannot start (``exit_on_failure``, for the
    command line: its processes killed and the process ended at once with the exit status, the
    reason printed already); a failed Ray start is left to the engine, which retries it and
    reports the failure as the run's."""
    import threading

    from fedctx.federated.engine import init_local_ray, quiet_flower
    from fedctx.federated.startup import mark

    outcome: list[tuple[FederatedDataset, str | None] | int | BaseException] = []

    def work() -> None:
        try:
            outcome.append(prepare())
            if not isinstance(outcome[0], int):
                import flwr.simulation.run_simulation  # noqa: F401 - what run_on_ray imports
        except BaseException as err:  # noqa: BLE001 - raised in this thread below
            outcome.append(err)

    quiet_flower(verbose)
    mark("ray-init")
    import ray  # noqa: F401 - first: the thread's imports (torch) hold the GIL for long stretches

    worker = threading.Thread(target=work, name="fedctx-prepare", daemon=True)
    worker.start()
    try:  # here, in the main thread: Ray's processes end with the thread that started them
        init_local_ray(num_cpus, verbose)
    except Exception:  # noqa: BLE001, S110 - retried and reported by run_on_ray
        pass
    worker.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    if isinstance(outcome[0], int):
        if exit_on_failure:
            _exit_now(outcome[0])
        _stop_ray()
    return outcome[0]


def _failed_on_ray(config: SimConfig) -> int:
    """Status 1 for a run that failed. When Ray or a thread of Flower's engine still runs (e.g.
    the ServerApp thread, waiting for clients whose app failed to load), the process leaves at
    once, Ray's processes killed: those threads would keep it alive after the error."""
    import threading

    engine = [t for t in threading.enumerate()
              if t.is_alive() and not t.daemon and t is not threading.current_thread()]
    if config.backend == "ray" and (engine or _ray_started()):
        _exit_now(1)
    return 1


def every_round_failed(out: Path) -> str:
    """The reason a finished run in ``out`` is a failure: every one of its rounds failed (the
    server lists them as ``failed_rounds`` in ``summary.json``); ``""`` otherwise."""
    import json

    summary = json.loads((out / "summary.json").read_text())
    failed = set(summary.get("failed_rounds") or [])
    rounds = int(summary.get("rounds", 0))
    if not rounds or len(failed) < rounds:
        return ""
    return (f"every round failed ({rounds} of {rounds}: too few valid client replies); the "
            f"rejections and failures of each round are in {out / 'metrics.jsonl'}")


if __name__ == "__main__":
    raise SystemExit(main())
