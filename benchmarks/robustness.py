"""One attacking client against each aggregation strategy (#14 item 9), written to
docs/results/robustness.md: final test accuracy with and without the attacker, mean ± 95% CI over
seeds, plus the table of the failure cases fedctx handles (#14 items 4-12) with their tests.

    python benchmarks/robustness.py [--data-dir DATA] [--seeds 0,1,2] [--budget-minutes 20]

Each run is the default ``digits`` scenario, short (``FLAGS`` below), in one process with
fedctx's own ClientApp wrapped so that partition ``ATTACKER``'s train replies are altered
(:class:`Attacker`); the server is fedctx's, unchanged (screening, the strategy's robust rule for
the norm tensors). A finished run is kept in ``docs/results/runs/robustness/`` and skipped
later, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import json
import re
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import REPO, Budget, benchmark_parser, by_seed, estimate, machine, seeds_and_budget
from flwr.app import ArrayRecord, Context, Message, MessageType

from fedctx.report import paired_difference, verdict
from fedctx.results import atomic_write_text

RESULTS = REPO / "docs" / "results"
RUNS = RESULTS / "runs" / "robustness"
STRATEGIES = ("fedavg", "fedmedian", "krum", "fedtrimmedavg")
ATTACKS = {
    "none": "no attacker",
    "norm-x1e6": "norm tensors × 10⁶",
    "shared-x1e6": "shared weights × 10⁶",
    "sign-flip": "update × −10 (sign flip)",
    "examples-x1000": "num-examples × 1000",
}
ORDER = (("none", "norm-x1e6"), ("shared-x1e6", "examples-x1000"), ("sign-flip",))
ATTACKER = 0  # the attacking partition
FLAGS = ["--rounds", "2", "--clients", "12", "--fraction", "1.0", "--width", "8",
         "--eval-every", "4"]


class Attacker:
    """fedctx's ClientApp; the train replies of partition :data:`ATTACKER` are altered by
    ``attack`` (a key of :data:`ATTACKS`) after honest training."""

    def __init__(self, attack: str) -> None:
        from fedctx.federated.client import app

        self.app, self.attack = app, attack

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = self.app(msg, context)
        if (self.attack == "none" or msg.metadata.message_type != MessageType.TRAIN
                or int(context.node_config["partition-id"]) != ATTACKER or reply.has_error()):
            return reply
        from fedctx.federated.runtime import get_runtime

        split = get_runtime(context.run_config).split
        sent = reply.content["arrays"].to_torch_state_dict()
        received = msg.content["arrays"].to_torch_state_dict()
        floats = [k for k, v in sent.items() if v.is_floating_point()]
        if self.attack == "norm-x1e6":
            sent.update({k: sent[k] * 1e6 for k in floats if k in split.norm})
        elif self.attack == "shared-x1e6":
            sent.update({k: sent[k] * 1e6 for k in floats if k in split.shared})
        elif self.attack == "sign-flip":
            sent.update({k: received[k] - 10 * (sent[k] - received[k])
                         for k in floats if k in split.shared})
        elif self.attack == "examples-x1000":
            metrics = reply.content["metrics"]
            metrics["num-examples"] = int(metrics["num-examples"]) * 1000
            if "context-counts" in metrics:
                metrics["context-counts"] = [int(c) * 1000 for c in metrics["context-counts"]]
        reply.content["arrays"] = ArrayRecord(sent)
        return reply


def run_attack(cell: str, strategy: str, attack: str, seed: int, budget: Budget | None,
               data_dir: str) -> dict[str, Any] | None:
    """The record of one run: read from ``RUNS/<cell>-seed<seed>.json``, else run now and
    keep it (unless ``budget`` is ``None`` or spent)."""
    path = RUNS / f"{cell}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    if budget is None or not budget.allows(seed):
        return None
    from fedctx.federated.engine import run_in_process
    from fedctx.federated.run_config import to_run_config
    from fedctx.simulate import command_parser, config_from_args

    flags = [*FLAGS, "--strategy", strategy, "--seed", str(seed)]
    with tempfile.TemporaryDirectory(prefix="fedctx-robust-") as tmp:
        out = Path(tmp) / "run"
        argv = [*flags, "--backend", "inprocess", "--out", str(out),
                *(["--data-dir", data_dir] if data_dir else [])]
        config = config_from_args(command_parser().parse_args(argv))
        t0 = time.time()
        run_in_process(to_run_config(config), num_clients=config.clients,
                       client_app=Attacker(attack))
        summary = json.loads((out / "summary.json").read_text())
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    record = {
        "cell": cell, "seed": seed, "strategy": strategy, "attack": attack,
        "command": "python -m fedctx.simulate " + shlex.join(flags)
                   + f"  # partition {ATTACKER}: {ATTACKS[attack]}",
        "accuracy": summary["accuracy"], "accuracy_per_context": summary["accuracy_per_context"],
        "failed_rounds": summary.get("failed_rounds", []),
        "rejected": sum(r.get("rejected", 0) for r in history),
        "rejections": [x["reason"] for r in history for x in r.get("rejections", [])][:4],
        "curve": [{k: r[k] for k in ("round", "train_loss", "accuracy") if k in r}
                  for r in history],
        "wall_seconds": time.time() - t0, "machine": machine(),
    }
    RUNS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    print(f"{cell} seed {seed}: accuracy {record['accuracy']:.4f} "
          f"({record['wall_seconds']:.0f} s)", flush=True)
    return record


# (#14 item, what is handled, test files and test functions that cover it)
FAILURE_CASES = [
    ("4", "Ctrl-C exits promptly, in process and on Ray, with the true message",
     "tests/test_interrupts.py", ["test_ctrl_c_exits_promptly_with_the_true_message"]),
    ("5", "impossible resources and an unreachable Ray address fail before Ray, in one line",
     "tests/test_interrupts.py", ["test_impossible_resources_fail_before_ray",
                                  "test_unreachable_ray_address_ends_the_process"]),
    ("6", "a hung or dead client is a failure; too few replies: failed round, model kept; a "
     "killed Ray worker is restarted; every round failed: exit 1",
     "tests/test_round_timeout.py tests/test_interrupts.py tests/test_simulate_cli.py", [
         "test_in_process_grid_stops_waiting_at_the_timeout",
         "test_hung_and_dead_clients_are_failures_and_the_round_goes_on",
         "test_a_round_with_too_few_sound_replies_fails_and_keeps_the_model",
         "test_a_killed_ray_worker_fails_its_clients_then_is_replaced",
         "test_every_round_failed_exits_1_and_records_why"]),
    ("7", "resume hint only when a round is saved; plugin errors with their traceback",
     "tests/test_resume.py", ["test_a_run_error_without_finished_rounds_has_no_resume_hint",
                              "test_plugin_errors_show_their_traceback"]),
    ("8", "hostile replies rejected and counted per check, the round goes on",
     "tests/test_screening.py", [
         "test_num_examples_must_be_a_positive_finite_integer",
         "test_num_examples_bounded_by_the_registered_size_or_max_examples",
         "test_missing_or_extra_records_are_rejected", "test_missing_or_extra_metrics_are_rejected",
         "test_context_out_of_range_or_not_the_registered_one",
         "test_non_finite_train_loss_is_rejected",
         "test_context_counts_of_wrong_length_sign_type_or_sum",
         "test_round_goes_on_and_counts_rejections_per_check"]),
    ("9", "norm tensors merged by the strategy's robust rule (this page's table)",
     "tests/test_robust_norm.py", [
         "test_robust_strategies_keep_norm_tensors_in_the_honest_range",
         "test_the_weighted_mean_is_poisoned"]),
    ("10", "no pickle with code execution from files the run did not write",
     "tests/test_resume.py tests/test_data_corrupt.py", [
         "test_checkpoints_load_with_weights_only", "test_cifar_pickle_that_runs_code_is_refused",
         "test_mnistm_file_names_cannot_leave_the_data_folder"]),
    ("11", "a config file cannot import code from the working directory",
     "tests/test_resume.py", ["test_a_config_file_cannot_import_code_from_the_working_directory"]),
    ("12", "bad input is one line (exit 2): config path, --out, corrupt data, model, seed, "
     "non-finite floats, too many clients",
     "tests/test_bad_input.py tests/test_data_corrupt.py tests/test_resume.py", [
         "test_config_path_that_is_not_a_readable_toml_file",
         "test_out_that_is_a_file_or_unwritable_is_one_line",
         "test_simulate_names_a_corrupt_file_in_one_line",
         "test_simulate_incompatible_model_is_one_line", "test_seed_range",
         "test_float_options_must_be_finite", "test_simulate_too_many_clients_is_one_line"]),
]


def failure_table() -> list[str]:
    """The failure-case table; each test named must exist (else this raises)."""
    lines = ["| #14 item | handled | covered by |", "|---|---|---|"]
    for item, what, files, tests in FAILURE_CASES:
        source = "".join((REPO / f).read_text() for f in files.split())
        missing = [t for t in tests if not re.search(rf"^def {t}\(", source, re.M)]
        if missing:
            raise SystemExit(f"item {item}: no test {missing} in {files}")
        lines.append(f"| {item} | {what} | `{files}`: " + ", ".join(f"`{t}`" for t in tests)
                     + " |")
    return lines


def attack_table(records: dict[tuple[str, str], list[dict]]) -> tuple[list[str], list[str]]:
    header = "| strategy | " + " | ".join(ATTACKS.values()) + " |"
    lines = [header, "|---|" + "---|" * len(ATTACKS)]
    sentences = []
    for strategy in STRATEGIES:
        cells = []
        for attack in ATTACKS:
            recs = records[strategy, attack]
            cells.append(f"{estimate(recs).format(100, 1)} (n={len(recs)})" if recs else "—")
            base = records[strategy, "none"]
            if attack != "none" and len(recs) >= 2 and len(base) >= 2:
                diff = paired_difference(by_seed(recs), by_seed(base))
                sentences.append(f"- {strategy}, {ATTACKS[attack]}: " + verdict(
                    diff, "with the attacker", "without"))
        lines.append(f"| `{strategy}` | " + " | ".join(cells) + " |")
    return lines, sentences


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="", help="real data sets (default: fedctx's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, budget = seeds_and_budget(parser, args, RUNS)
    records: dict[tuple[str, str], list[dict]] = {(s, a): [] for s in STRATEGIES
                                                  for a in ATTACKS}
    for group in ORDER:  # a spent budget leaves every cell of the first groups comparable
        for seed in seeds:
            for attack in group:
                for strategy in STRATEGIES:
                    rec = run_attack(f"{strategy}-{attack}", strategy, attack, seed, budget,
                                     args.data_dir)
                    if rec is not None:
                        records[strategy, attack].append(rec)
    done = [r for rs in records.values() for r in rs]
    missing = sum(len(seeds) - len(rs) for rs in records.values())
    attacks, sentences = attack_table(records)
    rejected = sorted({reason.split(" above ")[0].split(" ")[0] for r in done
                       for reason in r["rejections"]})
    lines = [
        "# Robustness: one attacking client, and the failure cases handled", "",
        f"Command: `nice -n 10 python benchmarks/robustness.py --seeds {','.join(map(str, seeds))} "
        "--data-dir DATA`; each run is `python -m fedctx.simulate "
        + " ".join(FLAGS) + " --strategy <strategy> --seed <k>` (the default `digits` scenario: "
        "4 real-image digit domains, one domain per client, `context` norm with the "
        "`per-context` policy), run in process with fedctx's ClientApp wrapped so that "
        f"partition {ATTACKER} alters its train replies after honest training (`Attacker` in "
        "the script); the server is fedctx's own: it screens replies and merges the norm "
        "tensors with the strategy's rule (median, trimmed mean, Krum), per context.",
        f"Machine: {machine()}; one torch thread, `nice -n 10`, other jobs sharing the cores.",
        "", "## Final test accuracy (%) with and without the attacker", "",
        "Mean ± 95% CI (t, n−1 dof) over seeds, overall over the 4 contexts (300 test images "
        "each). Krum is Flower's with `num_malicious_nodes=0` (fedctx's built-in), "
        "FedTrimmedAvg `beta=0.2`.", "", *attacks, "",
        "How to read it: with 12 clients over 4 domains, each context's norm tensors are "
        "merged over its 3 holders (the attacker's context included). The median and Krum "
        "outvote one attacker among 3; a trimmed mean with `beta = 0.2` trims "
        "`int(0.2 × 3) = 0` values there, so it averages the attacker's norm tensors in (its "
        "shared weights, merged over all 12 clients, are trimmed). Krum keeps one client's "
        "shared weights each round, so its model learns from one domain's client at a "
        "time, with or without an attacker.", "",
        "What the intervals support (paired over seeds, attacked − not attacked):", "",
        *(sentences or ["- fewer than 2 finished seeds per cell: no comparison yet"]), "",
        "Replies the server rejected in these runs, by the first word of the reason: "
        + (", ".join(f"`{w}`" for w in rejected) or "none") + ". With `num-examples × 1000` "
        "the reply claims more than the client registered, so screening rejects it and the "
        "round goes on without it.",
    ]
    if missing:
        lines += ["", f"{missing} of {len(seeds) * len(records)} runs are not finished (time "
                  "budget); the same command resumes them."]
    seconds = [r["wall_seconds"] for r in done]
    if seconds:
        lines += ["", f"Seconds per run: mean {sum(seconds) / len(seconds):.0f} "
                  f"({len(seconds)} runs)."]
    lines += ["", "## Failure cases handled (#14 items 4–12)", "", *failure_table(), "",
              "Every test above runs in CI (`python -m pytest`); the Ctrl-C and Ray ones are "
              "marked slow.", ""]
    page = RESULTS / "robustness.md"
    atomic_write_text(page, "\n".join(lines))
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
