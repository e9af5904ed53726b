"""``python -m fedctx.scenarios show <scenario> --clients N [--out DIR] [--data-dir D]``.

Builds the scenario's federated data exactly as a simulation would (same seed, same partition)
and writes two PNGs to ``--out`` (default ``results/data-<scenario>``):
``<scenario>-samples.png`` (test images per context) and ``<scenario>-labels.png`` (label counts
per client, each client's context marked). Missing data end the command with one line (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedctx import scenarios
from fedctx.config import ConfigError, OneLineParser, SimConfig
from fedctx.data.sources import MissingDataError
from fedctx.results import check_results_folder


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m fedctx.scenarios",
                           description="Look at a scenario's data.")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="write sample-image and label-count PNGs of a scenario")
    show.add_argument("scenario", choices=scenarios.available())
    show.add_argument("--clients", type=int, default=None,
                      help="number of clients (default: the scenario's config file)")
    show.add_argument("--seed", type=int, default=None, help="partition seed (default: 0)")
    show.add_argument("--out", type=Path, default=None,
                      help="folder for the PNGs (default: results/data-<scenario>)")
    show.add_argument("--data-dir", default=None,
                      help="folder holding real data sets (default: $FEDCTX_DATA, else ./data)")
    show.add_argument("--download", action="store_true", help="allow torchvision downloads")
    show.add_argument("--allow-missing-domains", action="store_true",
                      help="show the domains present when others are missing")
    return parser


def show(args: argparse.Namespace) -> list[Path]:
    """Build ``args.scenario`` and write its two PNGs; returns their paths."""
    from fedctx.data.plots import save_label_heatmap, save_sample_grid

    scenario = scenarios.get_scenario(args.scenario)
    values = {k: v for k, v in scenario.defaults().items() if k in ("clients", "seed")}
    given = {"clients": args.clients, "seed": args.seed, "data_dir": args.data_dir}
    values.update({k: v for k, v in given.items() if v is not None})
    config = SimConfig(scenario=args.scenario, download=args.download,
                       allow_missing_domains=args.allow_missing_domains, **values).validate()
    out = args.out or Path("results") / f"data-{args.scenario}"
    check_results_folder(out, ConfigError)
    data = scenario.build(config)
    return [save_sample_grid(data, out / f"{args.scenario}-samples.png"),
            save_label_heatmap(data, out / f"{args.scenario}-labels.png")]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        paths = show(args)
    except (MissingDataError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
