"""Results of a run: resolved config, per-round metrics (JSON lines, CSV, TensorBoard), summary
JSON, plots, table, checkpoints.

:class:`RunFiles` is the one writer every entry point records through (``python -m
fedctx.simulate`` via :class:`RunRecorder`, ``python -m fedctx.adapt`` and its sweeps). Every
file that is rewritten is written atomically (temporary file + ``os.replace``); ``metrics.jsonl``
is appended and fsynced; TensorBoard's event files are append-only by design and are rebuilt
from the recorded history when a run resumes. A crash or ``kill -9`` never leaves a half-written
file behind.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically (as PNG), then close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # the round before: kept to fall back on
# Everything a run writes in its folder (``--overwrite`` removes these and nothing else): a
# simulation's and an AdaMatch run's (``curves.png``, ``grad_variance.png``, ``embedding.png``).
RESULT_FILES = (CHECKPOINT, PREVIOUS_CHECKPOINT, "metrics.jsonl", "metrics.csv", "summary.json",
                "model.pt", "accuracy.png", "label_counts.png", "config.json", "curves.png",
                "grad_variance.png", "embedding.png")
CLIENT_STATE = "client_state"
TENSORBOARD = "tensorboard"  # TensorBoard's event files (``tensorboard --logdir OUT``)


def results_in(out: Path) -> list[str]:
    """The files of a run's results that ``out`` holds (a run's record, not just its plots)."""
    out = Path(out)
    return [n for n in (CHECKPOINT, PREVIOUS_CHECKPOINT, "metrics.jsonl", "summary.json")
            if (out / n).exists()]


def check_results_folder(out: Path, error: type[Exception], flag: str = "--out") -> None:
    """Raise ``error`` with one line (naming ``flag``) when ``out`` cannot become a results
    folder: it is a file, it lies under a file, or its nearest existing folder cannot be written
    (tried with a temporary file, removed at once). Creates nothing else."""
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise error(f"{flag} {out} is a file, not a folder")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{flag} {out}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise error(f"{flag} {out} is not writable ({parent}: {err.strerror or err})") from None


def numbered(base: str) -> list[str]:
    """``base``, then ``base-2``, ``base-3``, ...: the names a default results folder takes so
    that a repeated experiment never lands in a used one."""
    return [base] + [f"{base}-{n}" for n in range(2, 10_000)]


def clear_results(out: Path) -> None:
    """Remove what a run wrote in ``out`` (``--overwrite``): :data:`RESULT_FILES` and the
    clients' kept state; any other file stays."""
    out = Path(out)
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
        (out / (name + ".tmp")).unlink(missing_ok=True)
    for folder, pattern in ((out / CLIENT_STATE, "client*.*"),
                            (out / TENSORBOARD, "events.out.tfevents.*")):
        if folder.is_dir():
            for f in folder.glob(pattern):
                f.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and why."""


def save_checkpoint(state: dict[str, Any], out: Path, keep_previous: bool = True) -> None:
    """Write ``out/checkpoint.pt`` atomically; the one it replaces becomes
    ``checkpoint.prev.pt`` (unless ``keep_previous`` is false: it is not a good one)."""
    path, previous = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    if keep_previous and path.exists():
        link = previous.with_name(previous.name + ".tmp")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links
            import shutil

            shutil.copyfile(path, link)
        os.replace(link, previous)
    os.replace(tmp, path)


#: What a checkpoint holds, by the unit its run counts: a federated run's rounds
#: (``fedctx.simulate``) or an AdaMatch run's steps (``fedctx.adapt``); the unit's key counts
#: the records of ``history``.
CHECKPOINT_KEYS = {"round": ("round", "arrays", "strategy", "history", "config"),
                   "step": ("step", "state", "batches", "torch_rng", "history", "evals",
                            "seconds", "config")}


def read_checkpoint(path: Path, unit: str = "round") -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, loaded with ``weights_only=True`` (only
    tensors and plain types); :class:`CheckpointError` names a corrupt or truncated one, or one
    that lacks the keys of its ``unit`` (:data:`CHECKPOINT_KEYS`)."""
    import zipfile

    if path.exists() and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path.name} is corrupt: truncated or not a PyTorch file "
                              f"({path.stat().st_size} bytes)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated zip, unpickling error, unsafe type
        reason = " ".join((str(err).strip().splitlines() or [type(err).__name__])[0].split())
        raise CheckpointError(f"{path.name} is corrupt: {reason[:300]}") from None
    keys = CHECKPOINT_KEYS[unit]
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise CheckpointError(f"{path.name} is corrupt: not a fedctx checkpoint (it lacks "
                              f"{', '.join(missing)})")
    if len(state["history"]) != state[unit]:
        raise CheckpointError(f"{path.name} is corrupt: {unit} {state[unit]} with "
                              f"{len(state['history'])} recorded {unit}s")
    return state


def load_checkpoint(out: Path, unit: str = "round") -> tuple[dict[str, Any], str | None]:
    """The run's last good checkpoint and, when ``checkpoint.pt`` could not be used, a note that
    says so and which ``checkpoint.prev.pt`` is used instead (``unit``: see
    :func:`read_checkpoint`). ``FileNotFoundError`` if there is none; :class:`CheckpointError`
    if neither can be read."""
    out = Path(out)
    path, previous = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    try:
        return read_checkpoint(path, unit), None
    except FileNotFoundError:
        if not previous.exists():
            raise FileNotFoundError(f"no checkpoint in {out}") from None
        problem = f"{CHECKPOINT} is missing"
    except CheckpointError as err:
        problem = str(err)
        if not previous.exists():
            raise CheckpointError(f"{problem} (in {out}); no earlier checkpoint to fall "
                                  "back on") from None
    try:
        state = read_checkpoint(previous, unit)
    except (CheckpointError, FileNotFoundError) as err:
        raise CheckpointError(f"{problem} (in {out}), and {err}") from None
    return state, (f"{problem}; resuming from the checkpoint before it, "
                   f"{PREVIOUS_CHECKPOINT} ({unit} {state[unit]})")


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A GitHub-flavoured Markdown table (readable in a terminal too)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in rows)])


def scalars(record: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The numbers of a metrics record, one level of nesting flattened: ``{"train_loss": ..,
    "accuracy_per_context": {"mnist": ..}}`` -> ``{"train_loss": .., "accuracy_per_context/mnist":
    ..}`` (the CSV's columns and TensorBoard's tags). Lists, strings, booleans and the keys in
    ``skip`` are left out (``metrics.jsonl`` keeps everything)."""
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    flat: dict[str, float] = {}
    for key, value in record.items():
        if key in skip:
            continue
        if number(value):
            flat[key] = value
        elif isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in value.items() if number(v)})
    return flat


def round_durations(records: Sequence[dict[str, Any]]) -> list[float]:
    """Each round's whole wall time, from ``metrics.jsonl``'s records in order: its ``seconds``
    (training, aggregation, evaluation) plus the next record's ``between_seconds`` (this round's
    recording — checkpoint, metrics files — and Flower's loop until the next round starts). A
    round whose next record has no ``between_seconds`` (the last round, the last one before a
    resume, runs recorded before the field existed) gives its ``seconds`` alone."""
    following = [*records[1:], {}]
    return [float(r["seconds"]) + float(following[i].get("between_seconds", 0.0))
            for i, r in enumerate(records)]


class RunFiles:
    """The files a run is recorded in, the same for every entry point.

    - ``metrics.jsonl``: one JSON line per record, appended (fsynced when ``durable``);
    - ``metrics.csv``: one row per step (a round, or a training step), one column per scalar of
      :func:`scalars` (per-context accuracy as ``accuracy_per_context/<context>``); records of
      the same step share its row; rewritten atomically;
    - ``tensorboard/``: TensorBoard event files (``torch.utils.tensorboard.SummaryWriter``), one
      scalar per CSV column, tagged with the column's name, at that step;
    - :meth:`write_json` and :meth:`figure`: atomic JSON and PNG files.

    :meth:`open` with the records a resumed run already holds rewrites all three from them, so
    a resumed run lists every step once (TensorBoard's old event files are replaced, not
    appended to: they may hold a step that the checkpoint never committed).
    """

    def __init__(self, out: Path, step_key: str, skip: tuple[str, ...] = ()) -> None:
        self.out = Path(out)
        self.step_key = step_key  # the CSV's first column: "round" or "step"
        self.skip = skip  # record keys kept out of the CSV and TensorBoard
        self.rows: dict[int, dict[str, float]] = {}
        self._jsonl: Any = None
        self._tb: Any = None

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def open(self, records: Sequence[tuple[int, dict[str, Any]]] = ()) -> None:
        """Start the files afresh from ``records`` (``(step, record)`` pairs, in order)."""
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for _, r in records))
        events = self.out / TENSORBOARD
        for old in events.glob("events.out.tfevents.*"):
            old.unlink()
        self._tb = SummaryWriter(log_dir=str(events))
        self.rows = {}
        for step, record in records:
            self._add(step, record)
        self._jsonl = self.metrics_path.open("a")
        self.flush()

    def _add(self, step: int, record: dict[str, Any]) -> None:
        values = {k: v for k, v in scalars(record, self.skip).items()
                  if k.rsplit("/", 1)[-1] != self.step_key}  # the step is the row and the x
        self.rows.setdefault(step, {self.step_key: step}).update(values)
        for tag, value in values.items():
            self._tb.add_scalar(tag, value, step)

    def append(self, step: int, record: dict[str, Any], durable: bool = True) -> None:
        """Record ``record`` at ``step``; with ``durable``, every file is on disk on return."""
        self._jsonl.write(json.dumps(record) + "\n")
        self._add(step, record)
        if durable:
            self.flush()

    def flush(self) -> None:
        """``metrics.jsonl`` fsynced, ``metrics.csv`` rewritten, TensorBoard's events flushed."""
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        self.write_csv()
        self._tb.flush()

    def write_csv(self) -> None:
        import csv
        import io

        columns = list(dict.fromkeys(c for row in self.rows.values() for c in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows[s] for s in sorted(self.rows))
        atomic_write_text(self.out / "metrics.csv", text.getvalue())

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.out / name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._jsonl is not None:
            self.flush()
            self._jsonl.close()
            self._tb.close()
        self._jsonl = self._tb = None


class RunRecorder:
    """Records a federated run (through :class:`RunFiles`: ``metrics.jsonl``, ``metrics.csv``,
    ``tensorboard/``, ``summary.json``, ``accuracy.png``) and prints its progress."""

    def __init__(self, out: Path, total_rounds: int, stream=None,
                 started: float | None = None) -> None:
        self.out = Path(out)
        self.total_rounds = total_rounds
        self.stream = stream
        self.history: list[dict[str, Any]] = []
        self.started = time.time() if started is None else started
        self.startup_seconds: float | None = None  # start of the command -> clients registered
        self.summary: dict[str, Any] | None = None
        # per-client accuracy stays in metrics.jsonl: hundreds of columns/tags otherwise
        self.files = RunFiles(self.out, "round", skip=("accuracy_per_client",))

    def say(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def start(self, config: dict[str, Any], history: list[dict[str, Any]] | None = None) -> None:
        """Create the folder, write ``config.json``; on resume, rewrite the finished rounds."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.json", json.dumps(config, indent=2) + "\n")
        self.history = list(history or [])
        self.files.open([(r["round"], r) for r in self.history])

    def round(self, record: dict[str, Any], commit: Any = None) -> None:
        """Record one round: first ``commit()`` (the checkpoint, whose history holds the round),
        then append its metrics (fsynced) and print its progress line, so a round shown or
        listed in ``metrics.jsonl`` is always one that ``--resume`` sees."""
        self.history.append(record)
        if commit is not None:
            try:
                commit()
            except BaseException:
                self.history.pop()
                raise
        self.files.append(record["round"], record)
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
        """Write ``summary.json`` and ``accuracy.png``, close the files; print the per-context
        table."""
        self.summary = summary
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_accuracy(self.history, self.out / "accuracy.png")
        self.files.close()
        rows = [(name, f"{acc:.4f}") for name, acc in summary["accuracy_per_context"].items()]
        rows.append(("overall", f"{summary['accuracy']:.4f}"))
        self.say("\nFinal test accuracy per context:\n"
                 + format_table(rows, ("context", "accuracy")))
        self.say(f"\nResults in {self.out}/ (config.json, metrics.jsonl, metrics.csv, "
                 "summary.json, accuracy.png, label_counts.png, model.pt, tensorboard/)")


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
    save_figure(fig, path)
