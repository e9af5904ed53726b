"""AdaMatch training loop with the domain as the normalization context.

Berthelot et al., "AdaMatch" (ICLR 2022), Algorithm 1, with the authors' code's details
(docs/adamatch.md). Each step:

1. source batch ``x_s`` (``B`` labelled) and target batch ``x_t`` (``uratio * B`` unlabelled),
   each augmented weakly and strongly;
2. one training-mode pass over ``[src weak, src strong, tgt weak, tgt strong]`` with per-sample
   contexts ``0`` (source) and ``1`` (target), so context-aware norms keep per-domain statistics;
3. a second pass over ``[src weak, src strong]`` alone (context 0) whose running-statistics updates
   are undone, and random logit interpolation of the two sets of source logits;
4. distribution alignment of the target weak predictions, the relative confidence threshold, the
   loss with the warmed-up target weight, SGD with the cosine schedule, EMA model update.

Evaluation uses the EMA model (and, reported beside it, the raw model) in eval mode; target
images with context 1 (``--target-eval-context target``) or 0 (``source``), source with context 0.

Where this differs from the authors' code, with the reasons, is listed in docs/adamatch.md
("Where fedctx differs from the authors"); the main points: plain momentum as the authors (Nesterov
optional), weak shift by ``size >> 3`` = 3 px as the authors but no mirror for digits, RandAugment
instead of CTAugment, an EMA model that starts from the initial weights with TensorFlow's
``num_updates`` warm-up instead of the authors' zero-initialised, uncorrected objax EMA, and the
digits CNN on 28x28 inputs instead of WRN-28-2 on 32x32.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedctx.adamatch import algorithm as A
from fedctx.adamatch.augment import strong_augment, weak_augment
from fedctx.adamatch.config import AdaptConfig, AdaptConfigError
from fedctx.adamatch.data import (
    BatchSampler,
    DomainSplit,
    load_domain,
    normalize,
    to_float,
)
from fedctx.adamatch.evaluate import accuracy
from fedctx.adamatch.model import build_digits_model
from fedctx.config import flag_of, parse_norm_options
from fedctx.data.sources import default_data_dir
from fedctx.norm import use_context
from fedctx.optim import SGD
from fedctx.results import (
    CheckpointError,
    RunFiles,
    atomic_torch_save,
    check_results_folder,
    clear_results,
    cpu_name,
    load_checkpoint,
    numbered,
    results_in,
    save_checkpoint,
)

SOURCE, TARGET = 0, 1


@dataclass
class Domains:
    """Training and test splits of the source and the target."""

    source_train: DomainSplit
    target_train: DomainSplit
    source_test: DomainSplit
    target_test: DomainSplit


def load_domains(cfg: AdaptConfig) -> Domains:
    """Read the four splits named by ``cfg`` (subsets per ``train_samples``/``eval_samples``)."""
    root = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()

    def load(name: str, train: bool) -> DomainSplit:
        limit = cfg.train_samples if train else cfg.eval_samples
        return load_domain(name, root, train=train, limit=limit, seed=cfg.seed,
                           download=cfg.download)

    return Domains(load(cfg.source, True), load(cfg.target, True),
                   load(cfg.source, False), load(cfg.target, False))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: AdaptConfig) -> nn.Module:
    """The digits CNN with ``cfg.norm`` over 2 contexts (source 0, target 1), in every norm layer
    (``--norm-scope all``) or only on the input (``input``, :class:`InputNormModel`)."""
    model = build_digits_model(cfg.norm, scope=cfg.norm_scope, num_contexts=2, width=cfg.width,
                               **parse_norm_options(cfg.norm_options))
    if cfg.norm_momentum > 0:
        for module in model.modules():
            if isinstance(getattr(module, "momentum", None), float):
                module.momentum = cfg.norm_momentum
    return model


def make_optimizer(model: nn.Module, cfg: AdaptConfig) -> SGD:
    """SGD with plain momentum (the authors' ``objax.optimizer.Momentum``; ``--nesterov`` for
    FixMatch's), weight decay on conv/linear weights only (:func:`fedctx.optim.decayed_parameters`,
    as the authors' ``'.w'`` variables); never on normalization parameters or biases."""
    return SGD(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               nesterov=cfg.nesterov)


def memory_format(cfg: AdaptConfig, device: torch.device) -> torch.memory_format:
    """``channels_last`` on CPU under ``auto`` (measured faster there: docs/results/adamatch.md)."""
    if cfg.memory_format == "channels-last" or (cfg.memory_format == "auto"
                                                and device.type == "cpu"):
        return torch.channels_last
    return torch.contiguous_format


def gradient_variance(model: nn.Module) -> float:
    """Variance of all gradient entries of the model, concatenated (UAN paper, Fig. 5)."""
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
    return float(torch.cat(grads).var()) if grads else 0.0


class AdaMatchState:
    """Model, EMA model, optimizer and the running label-distribution estimates.

    The EMA model starts as a copy of the initial model and is updated after every optimizer step
    with the decay :func:`~fedctx.adamatch.algorithm.ema_decay` (``--ema``, warmed up per
    ``--ema-warmup``); it averages parameters and buffers (running statistics) alike.
    """

    def __init__(self, cfg: AdaptConfig, device: torch.device, num_classes: int = 10) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.device = device
        self.memory_format = memory_format(cfg, device)
        self.model = build_model(cfg).to(device=device, memory_format=self.memory_format)
        self.ema_model = copy.deepcopy(self.model)
        for p in self.ema_model.parameters():
            p.requires_grad_(False)
        self.optimizer = make_optimizer(self.model, cfg)
        self.ema_updates = 0
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        uniform = torch.full((num_classes,), 1.0 / num_classes, device=device)
        self.p_source = uniform.clone()  # objax ExponentialMovingAverage(momentum=0.999)
        self.p_target_history = uniform.expand(128, -1).clone()  # objax MovingAverage(128)

    def augment(self, xs: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """``[src weak, src strong, tgt weak, tgt strong]`` of uint8 ``xs``, ``xt``, normalized to
        ``[-1, 1]``: each augmentation runs once on the whole ``[xs, xt]`` batch (vectorized, no
        loop over images), and the result is laid out in the model's memory format."""
        cfg, gen, n_s = self.cfg, self.gen, len(xs)
        x = to_float(torch.cat([xs, xt]).to(self.device))
        weak = weak_augment(x, gen, pad=cfg.pad)
        strong = strong_augment(x, gen, pad=cfg.pad)
        # assembled in the model's layout, then normalized in place: one pass to lay it out
        batch = torch.empty((2 * len(x), *x.shape[1:]), dtype=x.dtype, device=x.device,
                            memory_format=self.memory_format)
        start = 0
        for part in (weak[:n_s], strong[:n_s], weak[n_s:], strong[n_s:]):
            batch[start:start + len(part)].copy_(part)
            start += len(part)
        return normalize(batch, inplace=True)

    def step(self, step: int, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor,
             yt: torch.Tensor) -> dict[str, float]:
        """One AdaMatch step on uint8 batches ``xs (B, 3, H, W)``, ``xt (uB, 3, H, W)``.

        ``yt`` (target labels) is used only to *report* pseudo-label accuracy, never to train.
        Returns the step's metrics.
        """
        cfg, model, gen = self.cfg, self.model, self.gen
        steps = cfg.steps
        ys, yt = ys.to(self.device), yt.to(self.device)
        n_s, n_t = len(xs), len(xt)
        batch = self.augment(xs, xt)

        model.train()
        with use_context(model, A.domain_contexts(2 * n_s, 2 * n_t, self.device)):
            logits = model(batch)
        with A.frozen_buffers(model), use_context(model, SOURCE):
            source_only = model(batch[:2 * n_s])
        lam = torch.rand(source_only.shape, generator=gen, device=self.device)
        src = A.interpolate_logits(logits[:2 * n_s], source_only, lam)
        src_weak, src_strong = src[:n_s], src[n_s:]
        tgt_weak, tgt_strong = logits[2 * n_s:2 * n_s + n_t], logits[2 * n_s + n_t:]

        probs_src = F.softmax(src_weak.detach(), dim=1)
        probs_tgt = F.softmax(tgt_weak.detach(), dim=1)
        self.p_source = A.update_ema_vector(self.p_source, probs_src.mean(0), 0.999)
        self.p_target_history, p_target = A.update_moving_average(
            self.p_target_history, probs_tgt.mean(0), step)
        aligned = A.align_distribution(probs_tgt, self.p_source, p_target)
        threshold = A.relative_threshold(probs_src, cfg.tau)
        mask = A.pseudo_label_mask(aligned, threshold)
        mu = A.warmup_weight(step, steps)
        loss, source_loss, target_loss = A.adamatch_loss(
            src_weak, src_strong, tgt_strong, ys, aligned, mask, mu)

        lr = A.cosine_lr(step, steps, cfg.lr, cfg.lr_final_ratio)
        self.optimizer.lr = lr
        self.optimizer.zero_grad()
        loss.backward()
        grad_var = gradient_variance(model)
        self.optimizer.step()
        ema = A.ema_decay(cfg.ema, self.ema_updates, cfg.ema_warmup)
        A.ema_update_(self.ema_model, model, ema)
        self.ema_updates += 1

        correct = (aligned.argmax(1) == yt).float()
        masked = float(mask.sum())
        return {
            "step": step + 1, "loss": loss.item(), "source_loss": source_loss.item(),
            "target_loss": target_loss.item(), "target_weight": mu, "lr": lr,
            "threshold": float(threshold), "mask_rate": float(mask.mean()),
            "pseudo_label_acc": float((correct * mask).sum() / masked) if masked else float("nan"),
            "grad_var": grad_var, "ema_decay": ema,
        }

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of this state: both models, the optimizer's momentum
        buffers, the EMA's update count, the augmentation generator and the label-distribution
        estimates (tensors and plain types: ``torch.load(weights_only=True)`` reads them)."""
        return {"model": self.model.state_dict(), "ema_model": self.ema_model.state_dict(),
                "momentum_buffers": list(self.optimizer.momentum_buffers),
                "ema_updates": self.ema_updates, "gen": self.gen.get_state(),
                "p_source": self.p_source, "p_target_history": self.p_target_history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next step is the one the saved run took next."""
        self.model.load_state_dict(state["model"])
        self.ema_model.load_state_dict(state["ema_model"])
        self.optimizer.momentum_buffers = [None if b is None else b.to(self.device)
                                           for b in state["momentum_buffers"]]
        self.ema_updates = int(state["ema_updates"])
        self.gen.set_state(state["gen"])
        self.p_source = state["p_source"].to(self.device)
        self.p_target_history = state["p_target_history"].to(self.device)

    def evaluate(self, domains: Domains, target_context: int) -> dict[str, float]:
        """Test accuracy of the EMA and the raw model on both domains (eval mode)."""
        fmt, dev = self.memory_format, self.device
        return {
            "target_acc": accuracy(self.ema_model, domains.target_test, target_context, dev, fmt),
            "target_acc_raw": accuracy(self.model, domains.target_test, target_context, dev, fmt),
            "source_acc": accuracy(self.ema_model, domains.source_test, SOURCE, dev, fmt),
            "source_acc_raw": accuracy(self.model, domains.source_test, SOURCE, dev, fmt),
        }


#: glibc ``mallopt`` parameters (``malloc.h``) and the values ``--malloc reuse`` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
REUSE_MMAP_THRESHOLD, REUSE_TRIM_THRESHOLD = 32 << 20, 1 << 30


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse in this process: blocks up to 32 MiB come
    from the heap instead of fresh ``mmap`` pages, and up to 1 GiB freed at the heap's top is
    kept instead of returned. With the defaults, the multi-megabyte activations and gradients
    of every AdaMatch step are new pages each time, and zero-filling them costs as much as the
    arithmetic on some tensors (``fill_`` of a ``(512, 16, 28, 28)`` gradient: 28 ms). Changes
    where memory comes from, never a result. Returns whether it applied (``False`` off Linux
    or on a C library without ``mallopt``, e.g. musl)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, REUSE_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD))


def _hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform(), "processor": cpu_name(),
                            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def default_out(cfg: AdaptConfig) -> Path:
    scope = "" if cfg.norm_scope == "all" else f"-{cfg.norm_scope}"
    name = f"{cfg.source}-{cfg.target}-{cfg.norm}{scope}-seed{cfg.seed}"
    return Path("results") / "adamatch" / name


def results_folder(cfg: AdaptConfig, overwrite: bool = False) -> Path:
    """Where :func:`train` writes: ``cfg.out``, or the first of :func:`default_out`, then
    ``-2``, ``-3``, ... that holds no run's results (a repeated command never replaces a run).
    An ``out`` that is a file, or that holds another run's results (``metrics.jsonl``,
    ``summary.json``) without ``overwrite``, or that cannot be written, is an
    :class:`AdaptConfigError`. Changes nothing."""
    out = Path(cfg.out or next(n for n in numbered(str(default_out(cfg)))
                               if not results_in(Path(n))))
    check_results_folder(out, AdaptConfigError)
    found = results_in(out) if out.is_dir() else []  # none in a default folder
    if found and not overwrite:
        raise AdaptConfigError(f"--out {out} holds another run's results ({', '.join(found)}); "
                               "give a new --out, or --overwrite to replace them")
    return out


@dataclass
class Progress:
    """What the training loop measured: every step's metrics and every evaluation; the times
    add up over the sessions of a resumed run."""

    records: list[dict[str, float]]
    evals: list[dict[str, float]]
    total_seconds: float = 0.0
    eval_seconds: float = 0.0
    cpu_seconds: float = 0.0  # all threads of this process, evaluation included
    saved_step: int = 0  # the step the last checkpoint holds

    @property
    def train_seconds(self) -> float:
        return self.total_seconds - self.eval_seconds

    def seconds(self) -> dict[str, float]:
        return {"total_seconds": self.total_seconds, "eval_seconds": self.eval_seconds,
                "cpu_seconds": self.cpu_seconds}

    def lines(self) -> list[tuple[int, dict[str, Any]]]:
        """``metrics.jsonl``'s records in their order: each step, then its evaluation."""
        evals = {e["step"]: e for e in self.evals}
        out: list[tuple[int, dict[str, Any]]] = []
        for rec in self.records:
            out.append((rec["step"], rec))
            if rec["step"] in evals:
                out.append((rec["step"], {"eval": evals[rec["step"]]}))
        return out


class Batches:
    """The run's source and target batch samplers and the generator they share."""

    def __init__(self, cfg: AdaptConfig, domains: Domains) -> None:
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.source = BatchSampler(len(domains.source_train), cfg.batch_size, self.gen)
        self.target = BatchSampler(len(domains.target_train), cfg.batch_size * cfg.uratio,
                                   self.gen)

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "source": self.source.state_dict(),
                "target": self.target.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.source.load_state_dict(state["source"])
        self.target.load_state_dict(state["target"])


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: the run's folder and the last step its checkpoint holds
    (0: none yet)."""

    def __init__(self, out: Path, saved_step: int) -> None:
        super().__init__(f"interrupted; step {saved_step} saved in {out}")
        self.out, self.saved_step = out, saved_step


#: Options a resumed run may take anew: they change where and how fast it runs, not what it
#: computes (another ``threads`` may change float rounding: bit for bit only with the same).
RESUME_MAY_CHANGE = ("threads", "progress_every", "malloc", "data_dir", "download", "out")


def read_run_checkpoint(out: Path) -> tuple[dict[str, Any], str | None]:
    """The last good checkpoint of the AdaMatch run in ``out`` (and a note when it is
    ``checkpoint.prev.pt``), or an :class:`AdaptConfigError` saying why there is none."""
    try:
        return load_checkpoint(out, "step")
    except FileNotFoundError:
        raise AdaptConfigError(f"--resume: no checkpoint in {out}; a run saves one at every "
                               "evaluation (--eval-every)") from None
    except CheckpointError as err:
        raise AdaptConfigError(f"--resume: {err}") from None


def can_resume(cfg: AdaptConfig) -> bool:
    """Whether ``cfg.out`` holds a readable checkpoint of this run (its options, but for those a
    resumed run may change), so that :func:`train` can continue it (``resume=True``)."""
    if not cfg.out:
        return False
    try:
        saved = read_run_checkpoint(Path(cfg.out))[0]["config"]
    except AdaptConfigError:  # none, or unreadable
        return False
    return not resume_changes(saved, cfg)


def resume_changes(saved: dict[str, Any], cfg: AdaptConfig) -> list[str]:
    """The options of ``cfg`` that differ from the saved run's and may not change on resume."""
    return [f"{flag_of(k)} {v!r} (the run's: {saved.get(k)!r})"
            for k, v in cfg.to_dict().items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v]


def train(cfg: AdaptConfig, *, domains: Domains | None = None, log: bool = True,
          overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run AdaMatch per ``cfg``; write the results folder; return the summary.

    A checkpoint (``checkpoint.pt``: models, optimizer, generators, samplers, the records so
    far) is saved at every evaluation; ``resume`` continues the run in ``cfg.out`` from it with
    the saved options (:data:`RESUME_MAY_CHANGE` aside; others that differ are an
    :class:`AdaptConfigError`), bit for bit the run it would have been. Ctrl-C raises
    :class:`RunInterrupted`, naming the last step saved.

    Results in :func:`results_folder` (``cfg.out``, refused when it holds another run's results
    unless ``overwrite``: then those are removed once the data are loaded and the model built),
    through :class:`fedctx.results.RunFiles`
    as every fedctx run: ``metrics.jsonl`` (one line per step, plus ``{"eval": ...}`` lines with
    EMA and raw accuracies), ``metrics.csv`` (a row per step, the evaluations' columns
    ``eval/...`` on their step), TensorBoard events in ``tensorboard/``, ``summary.json``
    (final and best EMA and raw accuracies, the eval curve, seconds per training step without
    evaluation), ``model.pt`` (the final model's and EMA model's ``state_dict``, the config),
    ``curves.png``, ``grad_variance.png`` and ``embedding.png``. With ``log``, one
    line per evaluation and a progress line (step/s, ETA) at most every ``cfg.progress_every``
    seconds.
    """
    cfg.validate()
    checkpoint: dict[str, Any] | None = None
    say = print if log else (lambda text, **_: None)
    if resume:
        if overwrite or not cfg.out:
            raise AdaptConfigError("--resume continues the run in --out: give --out, without "
                                   "--overwrite")
        out = Path(cfg.out)
        checkpoint, note = read_run_checkpoint(out)
        if changed := resume_changes(checkpoint["config"], cfg):
            may = ", ".join(flag_of(k) for k in RESUME_MAY_CHANGE if k != "out")
            raise AdaptConfigError(f"--resume keeps the run's options; these differ: "
                                   f"{'; '.join(changed)} (only {may} may)")
        if checkpoint["step"] == cfg.steps and (out / "summary.json").exists():
            say(f"the run in {out} has finished all its {cfg.steps} steps; nothing to resume",
                flush=True)
            return json.loads((out / "summary.json").read_text())
        if note:
            say(f"note: {note}", flush=True)
    else:
        out = results_folder(cfg, overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.malloc == "reuse":
        reuse_freed_memory()
    device = resolve_device(cfg.device)
    domains = domains or load_domains(cfg)
    state, batches, progress = AdaMatchState(cfg, device), Batches(cfg, domains), Progress([], [])
    if checkpoint is not None:
        state.load_state_dict(checkpoint["state"])
        batches.load_state_dict(checkpoint["batches"])
        torch.set_rng_state(checkpoint["torch_rng"])
        progress = Progress(list(checkpoint["history"]), list(checkpoint["evals"]),
                            **checkpoint["seconds"], saved_step=checkpoint["step"])
    if overwrite:
        clear_results(out)
    say(f"AdaMatch {cfg.source} -> {cfg.target}, norm={cfg.norm} (scope {cfg.norm_scope}), "
        f"{cfg.steps} steps on {device} ({torch.get_num_threads()} threads; train "
        f"{len(domains.source_train)}/{len(domains.target_train)}, test "
        f"{len(domains.source_test)}/{len(domains.target_test)}) -> {out}"
        + (f"; resumed after step {progress.saved_step}" if checkpoint else ""), flush=True)
    files = RunFiles(out, "step")
    files.open(progress.lines())
    try:
        progress = run_steps(state, domains, files, say, batches, progress)
        atomic_torch_save({"model": state.model.state_dict(),
                           "ema_model": state.ema_model.state_dict(),
                           "config": cfg.to_dict(), "steps": cfg.steps}, out / "model.pt")
        write_figures(state, domains, progress, out)
        summary = make_summary(state, domains, progress, out)
        files.write_json("summary.json", summary)
    except KeyboardInterrupt:
        raise RunInterrupted(out, progress.saved_step) from None
    finally:
        files.close()
    say(f"done: target acc {summary['final_target_acc']:.4f} (EMA) "
        f"{summary['final_target_acc_raw']:.4f} (raw), source acc "
        f"{summary['final_source_acc']:.4f} (EMA), {summary['seconds_per_step']:.3f} s/step, "
        f"{progress.total_seconds:.0f}s; results in {out}", flush=True)
    return summary


def target_context(cfg: AdaptConfig) -> int:
    """The context the target's test images are evaluated with (``--target-eval-context``)."""
    return TARGET if cfg.target_eval_context == "target" else SOURCE


def run_steps(state: AdaMatchState, domains: Domains, files: RunFiles, say: Any,
              batches: Batches, progress: Progress) -> Progress:
    """The training loop from the step after ``progress.records`` to ``cfg.steps``, each step
    recorded in ``files``; an evaluation every ``cfg.eval_every`` steps and after the last
    (recorded durably, printed, then a checkpoint of the run in ``files.out``); a progress line
    at most every ``cfg.progress_every`` seconds in between."""
    cfg = state.cfg
    first, before = len(progress.records), progress.seconds()
    start = last_progress = time.perf_counter()
    cpu_start = time.process_time()

    def add_times() -> None:  # this session's times on top of the earlier sessions'
        progress.total_seconds = before["total_seconds"] + time.perf_counter() - start
        progress.cpu_seconds = before["cpu_seconds"] + time.process_time() - cpu_start

    for step in range(first, cfg.steps):
        si, ti = batches.source.next(), batches.target.next()
        rec = state.step(step, domains.source_train.images[si], domains.source_train.labels[si],
                         domains.target_train.images[ti], domains.target_train.labels[ti])
        progress.records.append(rec)
        files.append(rec["step"], rec, durable=False)
        now = time.perf_counter()
        if rec["step"] % cfg.eval_every == 0 or rec["step"] == cfg.steps:
            ev = {"step": rec["step"], **state.evaluate(domains, target_context(cfg))}
            progress.eval_seconds += time.perf_counter() - now
            add_times()
            ev["elapsed_s"] = progress.total_seconds
            progress.evals.append(ev)
            files.append(rec["step"], {"eval": ev})
            save_checkpoint({"step": rec["step"], "config": cfg.to_dict(),
                             "state": state.state_dict(), "batches": batches.state_dict(),
                             "torch_rng": torch.get_rng_state(), "history": progress.records,
                             "evals": progress.evals, "seconds": progress.seconds()}, files.out)
            progress.saved_step = rec["step"]
            last_progress = time.perf_counter()
            say(f"step {rec['step']:>6}/{cfg.steps}  loss {rec['loss']:.3f}  mask "
                f"{rec['mask_rate']:.2f}  target acc {ev['target_acc']:.4f} (EMA) "
                f"{ev['target_acc_raw']:.4f} (raw)  source acc {ev['source_acc']:.4f} (EMA) "
                f"{ev['source_acc_raw']:.4f} (raw)  {ev['elapsed_s']:.0f}s", flush=True)
        elif cfg.progress_every and now - last_progress >= cfg.progress_every:
            last_progress = now
            training = now - start - (progress.eval_seconds - before["eval_seconds"])
            rate = (rec["step"] - first) / max(training, 1e-9)
            eta = (cfg.steps - rec["step"]) / rate
            say(f"step {rec['step']:>6}/{cfg.steps}  loss {rec['loss']:.3f}  mask "
                f"{rec['mask_rate']:.2f}  {rate:.2f} step/s  ETA {_duration(eta)}", flush=True)
    add_times()
    return progress


def write_figures(state: AdaMatchState, domains: Domains, progress: Progress, out: Path
                  ) -> None:
    """``curves.png``, ``grad_variance.png`` and ``embedding.png`` (of the EMA model)."""
    # here, not at import: matplotlib costs every process that imports fedctx.adamatch ~0.5 s
    from fedctx.adamatch.plots import plot_curves, plot_embedding, plot_grad_variance

    cfg = state.cfg
    plot_curves(progress.records, progress.evals, out / "curves.png",
                title=f"{cfg.source}->{cfg.target} {cfg.norm} ({cfg.norm_scope})")
    plot_grad_variance({cfg.norm: progress.records}, out / "grad_variance.png")
    plot_embedding(state.ema_model, domains.source_test, domains.target_test, state.device,
                   out / "embedding.png", samples=cfg.embed_samples, seed=cfg.seed,
                   target_context=target_context(cfg))


def make_summary(state: AdaMatchState, domains: Domains, progress: Progress, out: Path
                 ) -> dict[str, Any]:
    """The run's ``summary.json``: final and best accuracies, timings, data and hardware."""
    cfg, evals, final = state.cfg, progress.evals, progress.evals[-1]
    train_s = progress.train_seconds
    return {
        "method": "AdaMatch (Berthelot et al. 2021)", "config": cfg.to_dict(),
        "final_target_acc": final["target_acc"], "final_target_acc_raw": final["target_acc_raw"],
        "final_source_acc": final["source_acc"], "final_source_acc_raw": final["source_acc_raw"],
        "best_target_acc": max(e["target_acc"] for e in evals),
        "best_target_acc_raw": max(e["target_acc_raw"] for e in evals),
        "evals": evals,
        "train_seconds": train_s, "eval_seconds": progress.eval_seconds,
        "total_seconds": progress.total_seconds, "cpu_seconds": progress.cpu_seconds,
        "seconds_per_step": train_s / cfg.steps, "steps_per_second": cfg.steps / train_s,
        "data": {"root": str(Path(cfg.data_dir) if cfg.data_dir else default_data_dir()),
                 **{k: len(getattr(domains, k)) for k in
                    ("source_train", "target_train", "source_test", "target_test")}},
        "hardware": _hardware(state.device), "out": str(out),
    }


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
