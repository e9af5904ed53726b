"""fedctx.optim: weight decay on conv/linear weights only, and the SGD update itself."""

import pytest
import torch
from torch import nn

from fedctx.models import make_model
from fedctx.norm import WSConv2d, is_norm_module
from fedctx.optim import SGD, decayed_parameters, sgd_step


def _names(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("norm", ["context", "acn", "uan", "batch"])
def test_decayed_parameters_are_the_conv_and_linear_weights(norm):
    model = make_model("digits-cnn", norm=norm, num_contexts=2, width=4)
    expected = {f"{n}.weight" for n, m in model.named_modules()
                if isinstance(m, nn.Conv2d | nn.Linear)}
    assert _names(model, decayed_parameters(model)) == expected


@pytest.mark.parametrize("norm", ["context", "acn"])
def test_zero_gradient_step_shrinks_only_conv_and_linear_weights(norm):
    torch.manual_seed(0)
    model = make_model("digits-cnn", norm=norm, num_contexts=2, width=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norm_params = {n for n, m in model.named_modules()
                   if is_norm_module(m)
                   for n in [f"{n}.{k}" for k, _ in m.named_parameters()]}
    assert norm_params  # gamma_k/beta_k (context), learned mu/log-scale (acn)
    opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in norm_params or n.endswith("bias"):
            torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, msg=n)
        else:  # conv/linear weight: p <- p - lr * wd * p
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5), msg=n)


def test_subclassed_convs_are_decayed_and_norm_submodules_never():
    class NormWithLinear(nn.Module):  # a norm layer that owns a linear map (like ACN's "base")
        is_normalization = True  # what counts as a norm is the class's flag, not its module

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 4)

    model = nn.Sequential(WSConv2d(3, 4, 3), NormWithLinear(), nn.Linear(4, 2),
                          nn.MultiheadAttention(4, 2))
    assert _names(model, decayed_parameters(model)) == {
        "0.weight", "2.weight", "3.in_proj_weight", "3.out_proj.weight"}


@pytest.mark.parametrize("decay_mask", [None, [True, False]])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_step_matches_torch_sgd(nesterov, decay_mask):
    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    b = [t.detach().clone().requires_grad_(True) for t in a]
    decays = [0.01 if m else 0.0 for m in (decay_mask or [True, True])]
    opt = torch.optim.SGD([{"params": [p], "weight_decay": wd}
                           for p, wd in zip(b, decays, strict=True)],
                          lr=0.1, momentum=0.9, nesterov=nesterov)
    bufs: list = [None, None]
    for step in range(3):
        x = torch.randn(3)
        for params in (a, b):
            for p in params:
                p.grad = None
            ((params[0] @ x).square().sum() + params[1].sum() * step).backward()
        sgd_step(a, bufs, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov,
                 decay_mask=decay_mask)
        opt.step()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-7)


def test_local_train_does_not_decay_norm_parameters():
    """One SGD step (one batch, no momentum): weight decay changes conv/linear weights only, so
    the norm parameters after the step are the same with and without it."""
    from fedctx.data import ClientData
    from fedctx.federated.training import local_train

    torch.manual_seed(0)
    data = ClientData(torch.randn(16, 3, 28, 28), torch.randint(0, 10, (16,)),
                      torch.zeros(16, dtype=torch.long))
    after = {}
    for wd in (0.0, 0.5):
        torch.manual_seed(1)
        model = make_model("digits-cnn", norm="context", num_contexts=2, width=4)
        local_train(model, data, epochs=1, batch_size=16, lr=0.1, momentum=0.0,
                    weight_decay=wd, generator=torch.Generator().manual_seed(0))
        after[wd] = dict(model.named_parameters())
    decayed = _names(model, decayed_parameters(model))
    for name, p in after[0.0].items():
        same = torch.equal(p, after[0.5][name])
        assert same != (name in decayed), name
