"""Results of a run: resolved config, per-round metrics (JSON lines), summary JSON, plot, table.

Every write is atomic (temporary file + ``os.replace``) or append-and-fsync, so a crash or
``kill -9`` never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A GitHub-flavoured Markdown table (readable in a terminal too)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in rows)])


class RunRecorder:
    """Writes a run's results folder and prints its progress."""

    def __init__(self, out: Path, total_rounds: int, stream=sys.stdout,
                 started: float | None = None) -> None:
        self.out = Path(out)
        self.total_rounds = total_rounds
        self.stream = stream
        self.history: list[dict[str, Any]] = []
        self.started = time.time() if started is None else started
        self.startup_seconds: float | None = None  # start of the command -> clients registered
        self.error: BaseException | None = None
        self.summary: dict[str, Any] | None = None

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, config: dict[str, Any], history: list[dict[str, Any]] | None = None) -> None:
        """Create the folder, write ``config.json``; on resume, rewrite the finished rounds."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.json", json.dumps(config, indent=2) + "\n")
        self.history = list(history or [])
        atomic_write_text(self.metrics_path,
                          "".join(json.dumps(r) + "\n" for r in self.history))

    def round(self, record: dict[str, Any]) -> None:
        """Append one round's metrics (fsynced) and print its progress line."""
        self.history.append(record)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        acc = ""
        if "accuracy" in record:  # rounds between evaluations (--eval-every) have none
            per_ctx = " ".join(f"{k} {v:.3f}"
                               for k, v in record["accuracy_per_context"].items())
            acc = f" | acc {record['accuracy']:.4f} ({per_ctx})"
        bad = record["rejected"] + record["failures"]
        self.say(
            f"[round {record['round']:>3}/{self.total_rounds}] "
            f"train loss {record['train_loss']:.4f}{acc} "
            f"| {record['clients_ok']}/{record['clients_sampled']} clients"
            + (f", {bad} rejected/failed" if bad else "") + f" | {record['seconds']:.1f}s"
        )

    def finish(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` and ``accuracy.png``; print the per-context table."""
        self.summary = summary
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_accuracy(self.history, self.out / "accuracy.png")
        rows = [(name, f"{acc:.4f}") for name, acc in summary["accuracy_per_context"].items()]
        rows.append(("overall", f"{summary['accuracy']:.4f}"))
        self.say("\nFinal test accuracy per context:\n"
                 + format_table(rows, ("context", "accuracy")))
        self.say(f"\nResults in {self.out}/ (config.json, metrics.jsonl, summary.json, "
                 "accuracy.png, label_counts.png, model.pt)")


def plot_accuracy(history: list[dict[str, Any]], path: Path) -> None:
    """Accuracy per round, one line per context plus the overall one (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    history = [r for r in history if "accuracy" in r]  # evaluated rounds only
    rounds = [r["round"] for r in history]
    for name in history[0]["accuracy_per_context"] if history else []:
        ax.plot(rounds, [r["accuracy_per_context"][name] for r in history], marker="o",
                label=name)
    ax.plot(rounds, [r["accuracy"] for r in history], color="black", linewidth=2.5,
            label="overall")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Test accuracy per context")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
