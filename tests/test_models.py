"""fedctx models take norm= and num_contexts=; contexts route through use_context."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fedctx.norm as fn
from fedctx.models import MODELS, make_model
from fedctx.norm import ContextAware, make_norm_act, use_context

INPUT = {"digits-cnn": (3, 28, 28)}


CASES = [(name, "context") for name in sorted(MODELS)] + [
    ("resnet20", "batch"), ("resnet20", "acn"), ("resnet20", "group"), ("vit-tiny", "layer"),
    ("vit-tiny", "acn"), ("digits-cnn", "batch"),
]


@pytest.mark.parametrize("name,norm", CASES)
def test_model_trains_with_norm_and_contexts(name: str, norm: str) -> None:
    kwargs: dict[str, object] = {"norm": norm, "num_contexts": 2}
    if name.startswith("resnet"):
        kwargs["width"] = 4  # same code path, small enough for CI
    if name == "vit-tiny":
        kwargs.update(dim=32, depth=2)
    if name == "digits-cnn":
        kwargs["width"] = 4
    model = make_model(name, **kwargs)
    aware = [m for m in model.modules() if isinstance(m, ContextAware)]
    assert bool(aware) == (norm in ("context", "acn"))
    assert all(m.num_contexts == 2 for m in aware)
    x = torch.randn(4, *INPUT.get(name, (3, 16, 16) if name.startswith("resnet") else (3, 32, 32)))
    with use_context(model, torch.tensor([0, 1, 1, 0])):
        out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    model.eval()
    with torch.no_grad(), use_context(model, 1):
        assert model(x[:1]).shape == (1, 10)


def test_default_sizes() -> None:
    assert 0.26e6 < sum(p.numel() for p in make_model("resnet20").parameters()) < 0.28e6
    assert 10e6 < sum(p.numel() for p in make_model("resnet18").parameters()) < 12e6


def test_unknown_model_or_norm() -> None:
    with pytest.raises(ValueError, match="valid choices"):
        make_model("nope")
    with pytest.raises(ValueError, match="valid choices"):
        make_model("resnet20", norm="nope")


def test_vit_token_context_norm_is_per_feature() -> None:
    model = make_model("vit-tiny", norm="context", num_contexts=3, dim=16, depth=1, heads=2)
    norm = model.blocks[0].norm1.norm
    assert norm.weight.shape == (3, 16)  # statistics per feature D, over N_k * T


# --- where each norm goes: norm -> activation pairs, weight-standardized convs --------------

SMALL = {"digits-cnn": {"width": 4}, "resnet20": {"width": 4}, "resnet18": {"width": 4},
         "vit-tiny": {"dim": 16, "depth": 1, "heads": 2}}


def _followed_by_activation(model: torch.nn.Module) -> dict[str, bool]:
    """For every norm module (by name): is its output fed straight into an activation?"""
    import torch.fx

    acts = (torch.nn.ReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.LeakyReLU, torch.nn.Tanh)
    class Tracer(torch.fx.Tracer):  # fedctx norms are leaves, as torch.nn's
        def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
            return isinstance(m, fn.ProxyNorm) or super().is_leaf_module(m, qualname)

    graph = Tracer().trace(model)
    mods = dict(model.named_modules())
    out = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        if isinstance(mods[node.target], (torch.nn.modules.batchnorm._NormBase,
                                          torch.nn.GroupNorm, fn.ProxyNorm)):
            users = list(node.users)
            out[node.target] = bool(users) and all(
                (u.op == "call_module" and isinstance(mods[u.target], acts))
                or (u.op == "call_function" and u.target in (torch.relu, F.relu, F.gelu))
                for u in users)
    return out


@pytest.mark.parametrize("name", ["digits-cnn", "resnet20", "vit-tiny"])
def test_proxy_only_where_an_activation_follows(name: str) -> None:
    """Labatie et al. 2021: Proxy Norm replaces norm -> activation pairs; elsewhere its base."""
    torch.manual_seed(0)
    reference = _followed_by_activation(make_model(name, norm="batch", **SMALL[name]))
    assert reference  # the tracer found the norms
    model = make_model(name, norm="proxy", **SMALL[name])
    mods = dict(model.named_modules())
    for key, activated in reference.items():
        assert isinstance(mods[key], fn.ProxyNorm) == activated, key
        if not activated:
            assert type(mods[key]) is torch.nn.GroupNorm, key
    # and nothing activates a Proxy Norm's (already post-activation) output a second time
    proxied = _followed_by_activation(model)
    assert not any(v for k, v in proxied.items() if isinstance(mods[k], fn.ProxyNorm))
    if name == "digits-cnn":
        assert sum(isinstance(m, fn.ProxyNorm) for m in model.modules()) == 5
    if name == "resnet20":  # stem + the first norm of 9 blocks; bn2 and shortcuts are GroupNorm
        assert sum(isinstance(m, fn.ProxyNorm) for m in model.modules()) == 10
        assert type(model.layers[0].bn2) is torch.nn.GroupNorm
    if name == "vit-tiny":  # no norm -> activation pair in a pre-norm transformer
        assert not any(isinstance(m, fn.ProxyNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["digits-cnn", "resnet20", "vit-tiny"])
def test_weightstd_standardizes_every_conv_and_differs_from_group(name: str) -> None:
    torch.manual_seed(0)
    ws = make_model(name, norm="weightstd", **SMALL[name])
    torch.manual_seed(0)
    gn = make_model(name, norm="group", **SMALL[name])
    convs = [m for m in ws.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, fn.WSConv2d) for m in convs)
    assert not any(isinstance(m, fn.WSConv2d) for m in gn.modules())
    ws.load_state_dict(gn.state_dict())  # same weights: only the standardization differs
    x = torch.randn(2, *INPUT.get(name, (3, 32, 32)))
    with torch.no_grad():
        assert (ws(x) - gn(x)).abs().max() > 1e-3


def test_group_counts_leave_at_least_16_features_per_group_without_spatial_dims() -> None:
    from fedctx.norm import make_norm

    assert make_norm("group", 64, dims=2).num_groups == 32  # images: GroupNorm's 32 groups
    assert make_norm("group", 64, dims=0).num_groups == 4   # (N, C): groups of 16
    assert make_norm("group", 128, dims=0).num_groups == 8
    assert make_norm("group", 20, dims=0).num_groups == 1   # < 32 features: LayerNorm
    assert make_norm("weightstd", 64, dims=0).num_groups == 4
    assert make_norm_act("proxy", 64, "relu", dims=0).norm.num_groups == 4
    assert make_norm_act("proxy", 64, None, dims=0).norm.num_groups == 4
    cnn = make_model("digits-cnn", norm="group", width=16)
    fc_norms = [m for m in cnn.classifier if isinstance(m, torch.nn.GroupNorm)]
    assert [m.num_channels // m.num_groups for m in fc_norms] == [16, 16]


def test_norm_act_rules() -> None:
    relu = make_norm_act("batch", 8, "relu")
    assert isinstance(relu.norm, torch.nn.BatchNorm2d) and isinstance(relu.act, torch.nn.ReLU)
    fused = make_norm_act("proxy", 8, "gelu", num_groups=2)
    assert isinstance(fused.norm, fn.ProxyNorm) and fused.norm.activation == "gelu"
    assert isinstance(fused.act, torch.nn.Identity)
    plain = make_norm_act("proxy", 8, None, base="layer", n_quantiles=64)
    assert type(plain.norm) is torch.nn.GroupNorm and plain.norm.num_groups == 1
    with pytest.raises(ValueError, match="valid choices: relu"):
        make_norm_act("batch", 8, "swish")
    with pytest.raises(ValueError, match="unknown option"):
        make_norm_act("proxy", 8, None, nope=1)


def test_digits_cnn_keeps_the_signal_without_a_norm() -> None:
    """He init: with ``none`` the features reaching the output layer keep the input's scale
    (PyTorch's default init shrank them to RMS 0.04 for unit inputs; the net then barely
    trained, 0.17 accuracy after the default scenario's 8 rounds)."""
    torch.manual_seed(0)
    model = make_model("digits-cnn", norm="none")
    with torch.no_grad():
        h = model.classifier[:-1](model.features(torch.randn(64, 3, 28, 28)))
    assert 0.5 < float(h.square().mean().sqrt()) < 10
    conv = model.features[0]
    expected = (2 / (conv.in_channels * 25)) ** 0.5  # Kaiming-normal, fan-in, ReLU gain
    assert abs(float(conv.weight.detach().std()) / expected - 1) < 0.15
    assert float(conv.bias.detach().abs().max()) == 0.0


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("norm", ["context", "proxy", "weightstd", "layer"])
def test_models_take_device_and_dtype(name: str, norm: str) -> None:
    size = {"dim": 16, "depth": 1, "heads": 2} if name == "vit-tiny" else {"width": 4}
    meta = make_model(name, norm=norm, num_contexts=2, device="meta", **size)
    tensors = list(meta.parameters()) + list(meta.buffers())
    assert all(t.device.type == "meta" for t in tensors)
    if name != "digits-cnn":
        return
    model = make_model(name, norm=norm, num_contexts=2, dtype=torch.float64, **size)
    assert {t.dtype for t in model.parameters()} == {torch.float64}
    with use_context(model, torch.tensor([0, 1])):
        assert model(torch.randn(2, 3, 28, 28, dtype=torch.float64)).dtype == torch.float64
