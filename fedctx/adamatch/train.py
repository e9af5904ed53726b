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

Evaluation uses the EMA model in eval mode; target images with context 1, source with context 0.
"""

from __future__ import annotations

import copy
import json
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
from fedctx.adamatch.config import AdaptConfig
from fedctx.adamatch.data import (
    BatchSampler,
    DomainSplit,
    default_data_dir,
    load_domain,
    normalize,
    to_float,
)
from fedctx.adamatch.evaluate import accuracy
from fedctx.adamatch.plots import plot_curves, plot_embedding, plot_grad_variance
from fedctx.models import make_model
from fedctx.norm import use_context

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
    """The digits CNN with ``cfg.norm`` layers over 2 contexts (source 0, target 1)."""
    model = make_model("digits-cnn", norm=cfg.norm, num_contexts=2, width=cfg.width)
    if cfg.norm_momentum > 0:
        for module in model.modules():
            if isinstance(getattr(module, "momentum", None), float):
                module.momentum = cfg.norm_momentum
    return model


def make_optimizer(model: nn.Module, cfg: AdaptConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on conv/linear weights only (as the authors)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
    )


def gradient_variance(model: nn.Module) -> float:
    """Variance of all gradient entries of the model, concatenated (UAN paper, Fig. 5)."""
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
    return float(torch.cat(grads).var()) if grads else 0.0


class AdaMatchState:
    """Model, EMA model, optimizer and the running label-distribution estimates."""

    def __init__(self, cfg: AdaptConfig, device: torch.device, num_classes: int = 10) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.device = device
        self.model = build_model(cfg).to(device)
        self.ema_model = copy.deepcopy(self.model)
        for p in self.ema_model.parameters():
            p.requires_grad_(False)
        self.optimizer = make_optimizer(self.model, cfg)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        uniform = torch.full((num_classes,), 1.0 / num_classes, device=device)
        self.p_source = uniform.clone()  # objax ExponentialMovingAverage(momentum=0.999)
        self.p_target_history = uniform.expand(128, -1).clone()  # objax MovingAverage(128)

    def step(self, step: int, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor,
             yt: torch.Tensor) -> dict[str, float]:
        """One AdaMatch step on uint8 batches ``xs (B, 3, H, W)``, ``xt (uB, 3, H, W)``.

        ``yt`` (target labels) is used only to *report* pseudo-label accuracy, never to train.
        Returns the step's metrics.
        """
        cfg, model, gen = self.cfg, self.model, self.gen
        steps = cfg.steps
        xs, xt = to_float(xs.to(self.device)), to_float(xt.to(self.device))
        ys, yt = ys.to(self.device), yt.to(self.device)
        n_s, n_t = len(xs), len(xt)
        source = torch.cat([weak_augment(xs, gen, pad=cfg.pad), strong_augment(xs, gen,
                                                                                pad=cfg.pad)])
        target = torch.cat([weak_augment(xt, gen, pad=cfg.pad), strong_augment(xt, gen,
                                                                                pad=cfg.pad)])
        source, target = normalize(source), normalize(target)

        model.train()
        with use_context(model, A.domain_contexts(2 * n_s, 2 * n_t, self.device)):
            logits = model(torch.cat([source, target]))
        with A.frozen_buffers(model), use_context(model, SOURCE):
            source_only = model(source)
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
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_var = gradient_variance(model)
        self.optimizer.step()
        A.ema_update_(self.ema_model, model, cfg.ema)

        correct = (aligned.argmax(1) == yt).float()
        masked = float(mask.sum())
        return {
            "step": step + 1, "loss": loss.item(), "source_loss": source_loss.item(),
            "target_loss": target_loss.item(), "target_weight": mu, "lr": lr,
            "threshold": float(threshold), "mask_rate": float(mask.mean()),
            "pseudo_label_acc": float((correct * mask).sum() / masked) if masked else float("nan"),
            "grad_var": grad_var,
        }


def _hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform(), "processor": platform.processor()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def default_out(cfg: AdaptConfig) -> Path:
    return Path("results") / "adamatch" / f"{cfg.source}-{cfg.target}-{cfg.norm}-seed{cfg.seed}"


def train(cfg: AdaptConfig, *, domains: Domains | None = None, log: bool = True
          ) -> dict[str, Any]:
    """Run AdaMatch per ``cfg``; write the results folder; return the summary.

    Results in ``cfg.out`` (or :func:`default_out`): ``metrics.jsonl`` (one line per step, plus
    ``{"eval": ...}`` lines), ``summary.json``, ``curves.png``, ``grad_variance.png`` and
    ``embedding.png``.
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    domains = domains or load_domains(cfg)
    state = AdaMatchState(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    src_batches = BatchSampler(len(domains.source_train), cfg.batch_size, gen)
    tgt_batches = BatchSampler(len(domains.target_train), cfg.batch_size * cfg.uratio, gen)

    def say(text: str) -> None:
        if log:
            print(text, flush=True)

    say(f"AdaMatch {cfg.source} -> {cfg.target}, norm={cfg.norm}, {cfg.steps} steps on {device} "
        f"(train {len(domains.source_train)}/{len(domains.target_train)}, test "
        f"{len(domains.source_test)}/{len(domains.target_test)}) -> {out}")
    records: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    start = time.perf_counter()
    with (out / "metrics.jsonl").open("w") as metrics:
        for step in range(cfg.steps):
            si, ti = src_batches.next(), tgt_batches.next()
            rec = state.step(step, domains.source_train.images[si], domains.source_train.labels[si],
                             domains.target_train.images[ti], domains.target_train.labels[ti])
            records.append(rec)
            metrics.write(json.dumps(rec) + "\n")
            if rec["step"] % cfg.eval_every == 0 or rec["step"] == cfg.steps:
                ev = {"step": rec["step"],
                      "target_acc": accuracy(state.ema_model, domains.target_test, TARGET, device),
                      "target_acc_raw": accuracy(state.model, domains.target_test, TARGET, device),
                      "source_acc": accuracy(state.ema_model, domains.source_test, SOURCE, device),
                      "elapsed_s": time.perf_counter() - start}
                evals.append(ev)
                metrics.write(json.dumps({"eval": ev}) + "\n")
                metrics.flush()
                say(f"step {rec['step']:>6}/{cfg.steps}  loss {rec['loss']:.3f}  mask "
                    f"{rec['mask_rate']:.2f}  target acc {ev['target_acc']:.4f} (EMA) "
                    f"{ev['target_acc_raw']:.4f} (raw)  source acc {ev['source_acc']:.4f}  "
                    f"{ev['elapsed_s']:.0f}s")
    train_s = time.perf_counter() - start

    plot_curves(records, evals, out / "curves.png", title=f"{cfg.source}->{cfg.target} "
                f"{cfg.norm}")
    plot_grad_variance({cfg.norm: records}, out / "grad_variance.png")
    plot_embedding(state.ema_model, domains.source_test, domains.target_test, device,
                   out / "embedding.png", samples=cfg.embed_samples, seed=cfg.seed)
    final = evals[-1]
    summary = {
        "method": "AdaMatch (Berthelot et al. 2021)", "config": cfg.to_dict(),
        "final_target_acc": final["target_acc"], "final_target_acc_raw": final["target_acc_raw"],
        "final_source_acc": final["source_acc"],
        "best_target_acc": max(e["target_acc"] for e in evals),
        "train_seconds": train_s, "steps_per_second": cfg.steps / train_s,
        "data": {"root": str(Path(cfg.data_dir) if cfg.data_dir else default_data_dir()),
                 **{k: len(getattr(domains, k)) for k in
                    ("source_train", "target_train", "source_test", "target_test")}},
        "hardware": _hardware(device), "out": str(out),
    }
    _write_json(out / "summary.json", summary)
    say(f"done: target acc {summary['final_target_acc']:.4f} (EMA), source acc "
        f"{summary['final_source_acc']:.4f}, {train_s:.0f}s; results in {out}")
    return summary
