"""``python -m fedctx.adapt``: one AdaMatch run, or ``python -m fedctx.adapt sweep``: a grid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedctx.adamatch.config import (
    AdaptConfig,
    AdaptConfigError,
    add_config_arguments,
    resolve,
)
from fedctx.config import OneLineParser, check_flags

_DESCRIPTION = (
    "AdaMatch (Berthelot et al. 2021) unsupervised domain adaptation on digits, with the domain "
    "as the normalization context (source = context 0, target = context 1). Writes "
    "metrics.jsonl, metrics.csv, tensorboard/, summary.json, model.pt, curves.png, "
    "grad_variance.png and embedding.png to --out.")
_SWEEP_DESCRIPTION = (
    "Run a grid of AdaMatch runs (--norms x --seeds) as concurrent Ray tasks and write a "
    "comparison table (target accuracy per norm, mean ± 95%% CI over seeds, and the paired "
    "difference to batch) to OUT/sweep.md and sweep.json. "
    "Every run option of `python -m fedctx.adapt` is accepted and shared by all runs.")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AdaptConfigError(f"--seeds: invalid value {text!r}; expected comma-separated "
                               "non-negative integers, e.g. 0,1") from None
    if not values or min(values) < 0:
        raise AdaptConfigError(f"--seeds: invalid value {text!r}; expected comma-separated "
                               "non-negative integers, e.g. 0,1")
    return values


def _float(flag: str, text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise AdaptConfigError(f"{flag}: invalid value {text!r}; expected a number in "
                               f"[{low:g}, {high:g}]")
    return value


def build_parser(sweep: bool) -> argparse.ArgumentParser:
    """The parser of a single run, or of a sweep (``sweep=True``)."""
    parser = OneLineParser(
        prog="python -m fedctx.adapt" + (" sweep" if sweep else ""),
        description=_SWEEP_DESCRIPTION if sweep else _DESCRIPTION,
        epilog=None if sweep else "Subcommand: `python -m fedctx.adapt sweep --help` for grids "
        "on Ray.")
    add_config_arguments(parser)
    if not sweep:
        parser.add_argument("--overwrite", action="store_true",
                            help="replace the results of an earlier run in --out (without it, "
                            "such an --out is refused) [default: False]")
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in --out from its last checkpoint (saved at "
                            "every evaluation) with its saved options, bit for bit the run it "
                            "would have been; only --threads, --progress-every, --malloc, "
                            "--data-dir and --download may be given anew [default: False]")
    if sweep:
        parser.add_argument("--norms", default="batch,context",
                            help="comma-separated norm names [default: 'batch,context']")
        parser.add_argument("--seeds", default="0,1",
                            help="comma-separated seeds [default: '0,1']")
        parser.add_argument("--cpus-per-job", default="1",
                            help="CPUs Ray reserves per run (also its torch threads) "
                            "[default: 1]")
        parser.add_argument("--gpus-per-job", default="0",
                            help="GPU fraction Ray reserves per run, e.g. 0.25; > 0 runs on "
                            "CUDA [default: 0]")
        parser.add_argument("--num-cpus", default="0",
                            help="CPUs of the local Ray instance (0: all) [default: 0]")
        parser.add_argument("--ray-address", default="",
                            help="join an existing Ray cluster (e.g. ray://host:10001 or auto) "
                            "instead of starting a local one [default: '']")
    return parser


def _sweep_resources(args: argparse.Namespace) -> dict:
    """The sweep's own flags that need no registry: seeds and Ray resources."""
    return {"seeds": _ints(args.seeds),
            "cpus_per_job": _float("--cpus-per-job", args.cpus_per_job, 0.01, 1024),
            "gpus_per_job": _float("--gpus-per-job", args.gpus_per_job, 0.0, 64),
            "num_cpus": int(_float("--num-cpus", args.num_cpus, 0, 4096))}


def _sweep(args: argparse.Namespace, resources: dict) -> int:
    from fedctx.adamatch.sweep import run_sweep
    from fedctx.norm import available

    base = resolve(args)
    norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    bad = [n for n in norms if n not in available()]
    if bad or not norms:
        raise AdaptConfigError(f"--norms: invalid value(s) {bad or args.norms!r}; valid "
                               f"choices: {', '.join(available())}")
    out = Path(base.out or f"results/adamatch/sweep-{base.source}-{base.target}")
    result = run_sweep(base, norms, out=out, ray_address=args.ray_address, **resources)
    return sweep_status(result, out)


def sweep_status(result: dict, out: Path) -> int:
    """1, with one line on stderr, when every job of the sweep failed; 0 otherwise (a line
    still names the jobs that failed)."""
    failures = result["failures"]
    if not failures:
        return 0
    total = len(failures) + len(result["runs"])
    where = f"their errors are in {out}/<norm>-seed<seed>/error.txt (listed in {out}/sweep.json)"
    if result["runs"]:
        print(f"warning: {len(failures)} of {total} sweep jobs failed, left out of the table; "
              f"{where}", file=sys.stderr)
        return 0
    print(f"error: all {total} sweep jobs failed; {where}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (errors: one line on stderr, status 2 or 1).

    Each flag given is checked on its own (type, bounds, fixed choices) before torch is
    imported, so a mistyped value is told in a fraction of a second; everything else (``--norm``
    against the registry, ``--config``, the combination) is checked after."""
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep = argv[:1] == ["sweep"]
    try:
        parser = build_parser(sweep=sweep)
        args, extra = parser.parse_known_args(argv[1:] if sweep else argv)
        if "sweep" in extra:
            parser.error("'sweep' must come first: python -m fedctx.adapt sweep [options]")
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        check_flags(AdaptConfig, args, AdaptConfigError)
        resources = _sweep_resources(args) if sweep else {}
    except AdaptConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fedctx.data import CorruptDataError, MissingDataError

    try:
        if sweep:
            return _sweep(args, resources)
        from fedctx.adamatch.training import read_run_checkpoint, train

        if args.resume:  # the saved options, then the flags given now
            if not args.out:
                raise AdaptConfigError("--resume continues the run in --out: give --out")
            saved = read_run_checkpoint(Path(args.out))[0]["config"]
            config = resolve(args, base={**saved, "out": args.out})
        else:
            config = resolve(args)
        train(config, overwrite=args.overwrite, resume=args.resume)
        return 0
    except (AdaptConfigError, CorruptDataError) as err:  # the options, or a damaged data file
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MissingDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C: what is saved, and how to go on
        out, step = getattr(err, "out", None), getattr(err, "saved_step", 0)
        print("\ninterrupted; " + (f"steps 1-{step} are saved in {out}; continue with "
                                   f"python -m fedctx.adapt --resume --out {out}" if step else
                                   "no evaluation had been reached, nothing to resume"),
              file=sys.stderr)
        return 130
