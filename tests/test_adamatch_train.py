"""AdaMatch training pieces: optimizer (decay, momentum), EMA warm-up, input-scope model,
batched augmentation, progress output (issue #10: 1.1, 1.6, 1.8, 2.3)."""

import json

import pytest
import torch
from test_recorder import csv_rows, tensorboard_steps
from torch import nn

from fedctx.adamatch import AdaptConfig, train
from fedctx.adamatch import algorithm as A
from fedctx.adamatch.data import DomainSplit
from fedctx.adamatch.model import InputNormModel
from fedctx.adamatch.training import AdaMatchState, Domains, build_model, make_optimizer
from fedctx.norm import ContextAware, use_context


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads run these tiny steps 15x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("norm", ["context", "acn"])
def test_adamatch_optimizer_never_decays_norm_parameters(norm):
    cfg = AdaptConfig(norm=norm, width=4, weight_decay=0.5, lr=0.1)
    model = build_model(cfg)
    norm_layers = [m for m in model.modules() if isinstance(m, ContextAware)]
    assert norm_layers and all(m.num_contexts == 2 for m in norm_layers)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    norm_names = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, ContextAware)
                  for k, _ in m.named_parameters()}
    for n, p in model.named_parameters():
        if n in norm_names:
            assert torch.equal(p, before[n]), n
        elif n.endswith("weight"):
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5), msg=n)


def test_default_momentum_is_plain_as_the_authors():
    cfg = AdaptConfig(width=4, norm="batch")
    assert cfg.nesterov is False and cfg.momentum == 0.9
    torch.manual_seed(0)
    model, ref = build_model(cfg), build_model(cfg)
    ref.load_state_dict(model.state_dict())
    ours = make_optimizer(model, cfg)
    ref_params = list(ref.parameters())
    theirs = torch.optim.SGD(
        [{"params": [p for p, d in zip(ref_params, ours.decay_mask, strict=True) if d],
          "weight_decay": cfg.weight_decay},
         {"params": [p for p, d in zip(ref_params, ours.decay_mask, strict=True) if not d],
          "weight_decay": 0.0}], lr=cfg.lr, momentum=0.9, nesterov=False)
    x = torch.randn(8, 3, 28, 28)
    for _ in range(3):
        for m, opt in ((model, ours), (ref, theirs)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(_flat(model), _flat(ref), rtol=0, atol=1e-6)


def test_weak_shift_default_is_the_authors_size_over_8():
    assert AdaptConfig().pad == 28 >> 3 == 3


def test_ema_decay_warm_up():
    assert A.ema_decay(0.999, 0) == pytest.approx(0.1)
    assert A.ema_decay(0.999, 8) == pytest.approx(0.5)
    assert A.ema_decay(0.999, 100_000) == 0.999
    assert A.ema_decay(0.999, 0, "none") == 0.999


@pytest.mark.parametrize(("warmup", "near_trained"), [("num-updates", True), ("none", False)])
def test_short_run_ema_is_near_the_trained_model_not_the_init(warmup, near_trained):
    cfg = AdaptConfig(norm="context", width=4, steps=20, batch_size=8, uratio=1,
                      ema_warmup=warmup, device="cpu")
    state = AdaMatchState(cfg, torch.device("cpu"))
    init = _flat(state.model)
    xs, ys = _synthetic(8, 0)
    xt, yt = _synthetic(8, 1)
    for step in range(cfg.steps):
        rec = state.step(step, xs, ys, xt, yt)
    assert rec["ema_decay"] == (0.999 if warmup == "none" else pytest.approx(20 / 29))
    trained, ema = _flat(state.model), _flat(state.ema_model)
    to_trained, to_init = (ema - trained).norm(), (ema - init).norm()
    if near_trained:
        assert to_trained < 0.25 * to_init
    else:
        assert to_init < to_trained


def test_input_scope_model_has_the_norm_only_on_the_input():
    model = build_model(AdaptConfig(norm="acn", norm_scope="input", width=4))
    assert isinstance(model, InputNormModel)
    aware = [n for n, m in model.named_modules() if isinstance(m, ContextAware)]
    assert aware == ["input_norm"]
    assert model.input_norm.num_contexts == 2
    body_norms = [m for m in model.body.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    assert len(body_norms) == 5
    x = torch.randn(6, 3, 28, 28)
    model.eval()
    with use_context(model, 0):
        a = model(x)
    with use_context(model, 1):
        b = model(x)
    assert not torch.allclose(a, b)  # the context reaches the input layer


def test_augment_is_batched_and_ordered():
    cfg = AdaptConfig(norm="batch", width=4, batch_size=4, uratio=2, device="cpu")
    state = AdaMatchState(cfg, torch.device("cpu"))
    xs, _ = _synthetic(4, 0)
    xt, _ = _synthetic(8, 1)
    batch = state.augment(xs, xt)
    assert batch.shape == (2 * 4 + 2 * 8, 3, 28, 28)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert batch.min() >= -1 and batch.max() <= 1


def test_short_run_input_scope_source_context_records_ema_and_raw(tmp_path, capsys):
    def split(name: str, n: int, seed: int) -> DomainSplit:
        return DomainSplit(name, *_synthetic(n, seed))

    domains = Domains(split("mnist", 32, 0), split("usps", 32, 1), split("mnist", 40, 2),
                      split("usps", 40, 3))
    cfg = AdaptConfig(source="mnist", target="usps", norm="context", norm_scope="input",
                      target_eval_context="source", steps=4, batch_size=8, uratio=1, width=4,
                      eval_every=2, embed_samples=20, out=str(tmp_path / "run"), device="cpu",
                      threads=1, progress_every=1e-9)
    summary = train(cfg, domains=domains, log=True)
    text = capsys.readouterr().out
    assert "step/s" in text and "ETA" in text  # progress lines between evaluations
    assert "(EMA)" in text and "(raw)" in text
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [e["step"] for e in saved["evals"]] == [2, 4]
    for key in ("target_acc", "target_acc_raw", "source_acc", "source_acc_raw"):
        assert all(0.0 <= e[key] <= 1.0 for e in saved["evals"]), key
    assert saved["final_target_acc_raw"] == saved["evals"][-1]["target_acc_raw"]
    assert saved["config"]["norm_scope"] == "input" and summary["seconds_per_step"] > 0
    # the same recorder as simulate: CSV (evaluations on their step's row) and TensorBoard
    rows = csv_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["eval/target_acc"] != "" for r in rows] == [False, True, False, True]
    steps = tensorboard_steps(tmp_path / "run")
    assert steps["loss"] == [1, 2, 3, 4] and steps["eval/target_acc"] == [2, 4]
    assert not [p.name for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("norm", ["context", "uan"])
def test_evaluating_changes_no_step_of_training(tmp_path, norm):
    """An evaluation (eval mode, both models, both test sets) leaves the training untouched:
    the same run evaluated after every step and only after its last records the same steps,
    ends with the same model and EMA model (parameters and buffers, running statistics
    included) and the same final evaluation: ``--eval-every`` trades only the curve's
    resolution."""
    from fedctx.adamatch.training import Batches, Progress, run_steps
    from fedctx.results import RunFiles

    def split(name: str, n: int, seed: int) -> DomainSplit:
        return DomainSplit(name, *_synthetic(n, seed))

    runs = {}
    for every in (1, 6):
        domains = Domains(split("mnist", 48, 0), split("usps", 48, 1), split("mnist", 30, 2),
                          split("usps", 30, 3))
        cfg = AdaptConfig(source="mnist", target="usps", norm=norm, steps=6, batch_size=8,
                          uratio=2, width=4, eval_every=every, device="cpu", threads=1)
        state = AdaMatchState(cfg, torch.device("cpu"))
        files = RunFiles(tmp_path / f"every{every}", "step")
        files.open()
        try:
            progress = run_steps(state, domains, files, lambda text, **_: None,
                                 Batches(cfg, domains), Progress([], []))
        finally:
            files.close()
        runs[every] = progress, state
    (p1, s1), (p6, s6) = runs[1], runs[6]
    assert len(p1.records) == 6 and json.dumps(p1.records) == json.dumps(p6.records)  # NaN
    assert len(p1.evals) == 6 and len(p6.evals) == 1
    drop = {"elapsed_s"}
    assert ({k: v for k, v in p1.evals[-1].items() if k not in drop}
            == {k: v for k, v in p6.evals[-1].items() if k not in drop})
    for a, b in ((s1.model, s6.model), (s1.ema_model, s6.ema_model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa
                                                            if not torch.equal(sa[k], sb[k])]


def test_input_scope_proxy_puts_no_activation_on_the_input() -> None:
    # Proxy Norm fuses a ReLU; at the input no activation follows, so its base norm is used.
    from fedctx.adamatch.model import build_digits_model
    from fedctx.norm.proxy import ProxyNorm

    model = build_digits_model("proxy", scope="input")
    x = -torch.ones(2, 3, 28, 28)
    x[:, :, :14] = 1.0
    out = model.input_norm(x)
    assert not isinstance(model.input_norm, ProxyNorm)
    assert (out < 0).any()  # a ReLU would have cut every negative value


def test_norm_options_reach_the_norm_layers_in_both_scopes() -> None:
    from fedctx.adamatch.config import AdaptConfig
    from fedctx.adamatch.training import build_model
    from fedctx.norm import ContextNorm

    for scope in ("all", "input"):
        model = build_model(AdaptConfig(norm="context", norm_scope=scope,
                                        norm_options="min_batch_values=3"))
        layers = [m for m in model.modules() if isinstance(m, ContextNorm)]
        assert layers and {m.min_batch_values for m in layers} == {3}, scope


_MALLOC_RUN = """
import json, sys, torch
from fedctx.adamatch import AdaptConfig, train
from fedctx.adamatch.data import DomainSplit
from fedctx.adamatch.training import Domains, reuse_freed_memory

def split(name, n, seed):
    g = torch.Generator().manual_seed(seed)
    return DomainSplit(name, torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8,
                                           generator=g), torch.randint(0, 10, (n,), generator=g))

malloc, out = sys.argv[1], sys.argv[2]
cfg = AdaptConfig(source="mnist", target="usps", norm="acn", steps=6, batch_size=64, uratio=3,
                  width=8, eval_every=3, embed_samples=20, out=out, device="cpu", threads=1,
                  malloc=malloc)
train(cfg, domains=Domains(split("mnist", 300, 0), split("usps", 300, 1), split("mnist", 50, 2),
                           split("usps", 50, 3)), log=False)
print(json.dumps({"applied_again": reuse_freed_memory()}))
"""


@pytest.mark.slow  # two subprocesses importing torch: 10-40 s
def test_malloc_reuse_changes_where_memory_comes_from_not_a_result(tmp_path):
    """``--malloc reuse`` (the default) against the C library's settings, each in a fresh
    process (``mallopt`` is process-wide): every step's metrics and every evaluation equal."""
    import subprocess
    import sys

    runs = {}
    for malloc in ("default", "reuse"):
        out = tmp_path / malloc
        proc = subprocess.run([sys.executable, "-c", _MALLOC_RUN, malloc, str(out)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.splitlines()[-1]) == {"applied_again": True}  # glibc here
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[malloc] = [{k: v for k, v in x.items() if "seconds" not in k and k != "eval"}
                        | {k: v for k, v in x.get("eval", {}).items() if k != "elapsed_s"}
                        for x in lines]
    assert len(runs["reuse"]) >= 6 and runs["reuse"] == runs["default"]


def _synthetic_domains():
    def split(name, n, seed):
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=g)
        return DomainSplit(name, images, torch.randint(0, 10, (n,), generator=g))

    return Domains(split("mnist", 200, 0), split("usps", 200, 1), split("mnist", 40, 2),
                   split("usps", 40, 3))


def _lines(out):
    """metrics.jsonl without its clocks."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k != "eval"}
            | {k: v for k, v in x.get("eval", {}).items() if k != "elapsed_s"} for x in lines]


@pytest.mark.parametrize("norm", ["context", "acn"])
def test_a_run_interrupted_and_resumed_is_bit_for_bit_the_run_not_interrupted(
        tmp_path, monkeypatch, norm):
    """Ctrl-C after step 5 of 8 (checkpoints at steps 3 and 6: steps 4-5 are lost and taken
    again), then ``resume``: every step's metrics, every evaluation, both final models and the
    summary's accuracies equal those of the run that was never interrupted; the interruption
    names the step saved."""
    from fedctx.adamatch import training

    domains = _synthetic_domains()
    cfg = AdaptConfig(source="mnist", target="usps", norm=norm, steps=8, batch_size=16,
                      uratio=2, width=8, eval_every=3, embed_samples=20, device="cpu",
                      threads=1)
    whole = train(cfg.replace(out=str(tmp_path / "whole")), domains=domains, log=False)

    step = training.AdaMatchState.step

    def interrupted(self, k, *args):
        if k == 5:
            raise KeyboardInterrupt
        return step(self, k, *args)

    out = tmp_path / "cut"
    monkeypatch.setattr(training.AdaMatchState, "step", interrupted)
    with pytest.raises(training.RunInterrupted) as info:
        train(cfg.replace(out=str(out)), domains=domains, log=False)
    assert info.value.saved_step == 3 and info.value.out == out
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(training.AdaMatchState, "step", step)
    resumed = train(cfg.replace(out=str(out)), domains=domains, log=False, resume=True)

    assert _lines(out) == _lines(tmp_path / "whole") and len(_lines(out)) == 8 + 3
    for key in ("final_target_acc", "final_target_acc_raw", "final_source_acc", "evals"):
        if key == "evals":
            assert [{k: v for k, v in e.items() if k != "elapsed_s"} for e in resumed[key]] == [
                {k: v for k, v in e.items() if k != "elapsed_s"} for e in whole[key]]
        else:
            assert resumed[key] == whole[key]
    a = torch.load(out / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    for part in ("model", "ema_model"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)


def test_resume_keeps_the_runs_options_and_says_what_it_cannot_do(tmp_path, capsys,
                                                                  monkeypatch):
    """Through the command line: ``--resume`` without ``--out`` or without a checkpoint, or with
    an option that changes the computation, is one line (status 2); a finished run has nothing
    to resume (status 0); Ctrl-C says what is saved and how to go on (status 130)."""
    from fedctx.adamatch import cli, training

    domains = _synthetic_domains()
    out = tmp_path / "run"
    cfg = AdaptConfig(source="mnist", target="usps", norm="batch", steps=4, batch_size=16,
                      uratio=2, width=8, eval_every=2, embed_samples=20, device="cpu",
                      threads=1, out=str(out))
    train(cfg, domains=domains, log=False)

    def status(*argv):
        code = cli.main(list(argv))
        return code, capsys.readouterr()

    code, told = status("--resume")
    assert code == 2 and told.err == "error: --resume continues the run in --out: give --out\n"
    code, told = status("--resume", "--out", str(tmp_path / "empty"))
    assert code == 2 and "no checkpoint in" in told.err and len(told.err.splitlines()) == 1
    code, told = status("--resume", "--out", str(out), "--lr", "0.1")
    assert code == 2 and "--lr 0.1 (the run's: 0.03)" in told.err
    code, told = status("--resume", "--out", str(out), "--threads", "2")
    assert code == 0 and "finished all its 4 steps; nothing to resume" in told.out

    def stopped(config, **_):
        raise training.RunInterrupted(out, 2)

    monkeypatch.setattr(training, "train", stopped)
    code, told = status("--out", str(tmp_path / "other"))
    assert code == 130 and told.err.strip() == (
        f"interrupted; steps 1-2 are saved in {out}; continue with python -m fedctx.adapt "
        f"--resume --out {out}")
