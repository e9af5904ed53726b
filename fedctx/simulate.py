"""``python -m fedctx.simulate``: run a federated experiment with context normalization on Ray.

Example: ``python -m fedctx.simulate --clients 20`` runs the embedded ``digits`` scenario.
Options: defaults < the scenario's ``configs/<scenario>.toml`` < ``--config FILE`` < flags.
It runs fedctx's Flower App (the same ServerApp and ClientApp as ``flwr run .``) with the
resolved options as Flower's run config.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from fedctx.config import ConfigError, SimConfig, build_parser, load_config_file, resolve


def parse_config(argv: list[str] | None = None) -> SimConfig:
    """Resolve the run's configuration from ``argv``; :class:`ConfigError` on bad input."""
    from fedctx import scenarios as simulations
    from fedctx import strategies

    parser = build_parser("python -m fedctx.simulate", __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    file_values = load_config_file(args.config) if args.config else {}
    scenario_name = args.scenario or file_values.get("scenario") or SimConfig.scenario
    try:
        scenario = simulations.get_scenario(scenario_name)
    except ValueError as err:
        raise ConfigError(f"--scenario: {err}") from None
    base = scenario.defaults()
    config = resolve(args, base)
    scenario.check_model(config.model)
    try:
        strategies.resolve_strategy(config.strategy)
        implied = strategies.implied_norm_policy(config.strategy)
    except ValueError as err:
        raise ConfigError(f"--strategy: {err}") from None
    if implied and args.norm_policy is None and "norm_policy" not in file_values:
        config.norm_policy = implied
    if not config.out:
        from fedctx.federated.run_config import default_out

        config.out = default_out(config)
    return config


def prepare_out(config: SimConfig) -> None:
    out = Path(config.out)
    if config.resume:
        if not (out / "checkpoint.pt").exists():
            raise ConfigError(f"--resume: no checkpoint in {out}; run without --resume first")
        return
    if out.exists():
        for name in ("checkpoint.pt", "metrics.jsonl", "summary.json", "model.pt",
                     "accuracy.png", "config.json"):
            (out / name).unlink(missing_ok=True)
        state = out / "client_state"
        if state.is_dir():
            for f in state.iterdir():
                f.unlink()


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    try:
        config = parse_config(argv)
        prepare_out(config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fedctx.data.sources import MissingDataError
    from fedctx.federated.engine import run_in_process, run_on_ray
    from fedctx.federated.run_config import to_run_config
    from fedctx.federated.runtime import get_runtime
    from fedctx.federated.server import STARTED_ENV

    run_config = to_run_config(config)
    try:
        data = get_runtime(run_config).data  # fail fast on missing data, before Ray starts
    except (MissingDataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"fedctx: scenario {config.scenario!r}: {config.clients} clients over "
          f"{data.num_contexts} contexts ({', '.join(data.context_names)}); norm "
          f"{config.norm!r}, policy {config.norm_policy!r}, strategy {config.strategy!r}; "
          f"{config.rounds} rounds, {config.fraction:.0%} of clients per round", flush=True)
    os.environ[STARTED_ENV] = str(t0)
    error: BaseException | None = None
    try:
        if config.backend == "inprocess":
            run_in_process(run_config, num_clients=config.clients, verbose=config.verbose)
        else:
            print("Starting Ray and the Flower simulation engine...", flush=True)
            run_on_ray(run_config, num_clients=config.clients,
                       cpus_per_client=config.cpus_per_client,
                       gpus_per_client=config.gpus_per_client, num_cpus=config.num_cpus,
                       ray_address=config.ray_address, verbose=config.verbose)
    except Exception as err:  # noqa: BLE001 - reported below with the saved-rounds hint
        error = err.__cause__ or err
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished rounds are saved: resume with --resume --out "
              f"{config.out}", file=sys.stderr)
        return 130
    if error is not None or not (Path(config.out) / "summary.json").exists():
        reason = error or "the simulation engine stopped before the last round"
        print(f"error: run failed: {reason}\nfinished rounds are saved in {config.out}; "
              "continue with --resume", file=sys.stderr)
        return 1
    print(f"Done in {time.time() - t0:.1f}s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
