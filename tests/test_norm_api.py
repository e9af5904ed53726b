"""Public API: factory, routing through any model (torchvision included), convert_norms."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fedctx.norm as fn
from fedctx.norm import (
    ContextAware,
    ContextNorm,
    available,
    convert_norms,
    make_norm,
    norm_layer,
    use_context,
)

ALL = [
    "acn", "adain", "batch", "batchgroup", "context", "crossiter", "ghost", "group", "instance",
    "layer", "mixture", "none", "proxy", "scb", "uan", "weightstd",
]
CONTEXT_AWARE = {"context", "acn", "scb", "adain"}


def test_available_lists_every_layer() -> None:
    assert available() == sorted(ALL)


def test_unknown_name_or_option_names_valid_choices() -> None:
    with pytest.raises(ValueError, match="valid choices: acn, adain, batch"):
        make_norm("nope", 8)
    with pytest.raises(ValueError, match=r"valid options: .*momentum"):
        make_norm("context", 8, momentun=0.1)
    with pytest.raises(ValueError, match=r"valid options: .*num_components"):
        make_norm("uan", 8, k=3)
    with pytest.raises(ValueError, match="num_contexts"):
        make_norm("context", 8, num_contexts=0)
    with pytest.raises(ValueError, match="dims"):
        make_norm("batch", 8, dims=7)
    with pytest.raises(ValueError, match="valid choices"):
        norm_layer("nope")


@pytest.mark.parametrize("name", sorted(CONTEXT_AWARE))
def test_context_aware_layers_check_contexts(name: str) -> None:
    m = make_norm(name, 4, dims=2, num_contexts=3)
    assert isinstance(m, ContextAware)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="no context was set"):
        m(x)
    with pytest.raises(RuntimeError, match="out of range"), use_context(m, 3):
        m(x)
    with pytest.raises(RuntimeError, match="context ids must lie in 0..2"), \
            use_context(m, torch.tensor([0, 5])):
        m(x)
    with use_context(m, torch.tensor([0, 2])):
        assert m(x).shape == x.shape


def test_use_context_nests_and_rejects_bad_types() -> None:
    m = nn.Sequential(make_norm("context", 4, num_contexts=2), nn.ReLU())
    with use_context(m, 1):
        with use_context(m, 0):
            assert m[0]._active_contexts == 0
        assert m[0]._active_contexts == 1
    assert m[0]._active_contexts is None
    with pytest.raises(TypeError):
        with use_context(m, 1.5):  # type: ignore[arg-type]
            pass
    with pytest.raises(TypeError):
        with use_context(m, torch.tensor([0.0, 1.0])):
            pass


def test_torchvision_model_with_norm_layer_and_contexts() -> None:
    model = torchvision.models.resnet18(num_classes=5, norm_layer=norm_layer("context",
                                                                             num_contexts=2))
    assert sum(isinstance(m, ContextNorm) for m in model.modules()) == 20
    x = torch.randn(4, 3, 32, 32)
    with use_context(model, torch.tensor([0, 1, 1, 0])):
        model(x).sum().backward()
    with pytest.raises(RuntimeError, match="no context"):
        model(x)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 5)  # no context in eval: mean of entries


def test_convert_norms_copies_into_every_context() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    bn1 = model.bn1
    converted = convert_norms(model, "context", num_contexts=3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert converted.bn1.weight.shape == (3, 64)
    torch.testing.assert_close(converted.bn1.running_var[2], bn1.running_var)
    assert converted.bn1.num_batches_tracked.tolist() == [7, 7, 7]
    assert not converted.bn1.training
    with torch.no_grad():
        for k in range(3):
            with use_context(converted, k):
                torch.testing.assert_close(converted(x), ref, atol=1e-5, rtol=1e-5)
    root = convert_norms(nn.BatchNorm1d(4), "acn", num_contexts=2)
    assert isinstance(root, fn.AdaptiveContextNorm)
    gn = convert_norms(nn.Sequential(nn.BatchNorm2d(4)), "group")
    assert isinstance(gn[0], nn.GroupNorm)


def test_docs_table_lists_every_layer() -> None:
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "norms.md"
    text = doc.read_text()
    for name in ALL:
        assert f"`{name}`" in text, name


def test_norm_train_defaults_sit_between_scenario_defaults_and_config_file(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """defaults < scenario < the norm's declared train_defaults < --config file < flags."""
    from fedctx import config
    from fedctx.norm import factory

    spec = factory.NormSpec(factory.norm_spec("batch").builder, {"lr": 0.007, "momentum": 0.5},
                            "test")
    monkeypatch.setitem(factory._REGISTRY, "test-norm", spec)
    assert fn.train_defaults("test-norm") == {"lr": 0.007, "momentum": 0.5}
    parser = config.build_parser("t", "t")
    scenario = {"lr": 0.05, "momentum": 0.9, "rounds": 3}

    def resolved(*argv: str) -> config.SimConfig:
        return config.resolve(parser.parse_args(list(argv)), scenario)

    c = resolved("--norm", "test-norm")
    assert (c.lr, c.momentum, c.rounds) == (0.007, 0.5, 3)  # above the scenario's defaults
    assert c.to_dict()["lr"] == 0.007  # what config.json records
    assert resolved("--norm", "batch").lr == 0.05  # other norms: the scenario's value
    assert resolved("--norm", "test-norm", "--lr", "0.2").lr == 0.2  # a flag wins
    cfg = tmp_path / "c.toml"
    cfg.write_text('norm = "test-norm"\nmomentum = 0.8\n')
    c = resolved("--config", str(cfg))  # the norm named in a config file counts too
    assert (c.lr, c.momentum) == (0.007, 0.8)  # and the file's own values win
    bad = factory.NormSpec(spec.builder, {"learning_rate": 1.0})
    monkeypatch.setitem(factory._REGISTRY, "bad-norm", bad)
    with pytest.raises(config.ConfigError, match="unknown options"):
        resolved("--norm", "bad-norm")


def test_every_norm_declares_its_training_defaults_in_the_docs() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "norms.md").read_text()
    section = text.split("## Training defaults per norm", 1)[1].split("\n## ", 1)[0]
    for name in available():
        for key, value in fn.train_defaults(name).items():
            assert f"| `{name}` |" in section and f"`{key} = {value}`" in section, (name, key)


@pytest.mark.parametrize("name", sorted(set(ALL) - {"instance"}))  # instance: torch's own
def test_channels_last_input_gives_channels_last_output_with_the_same_values(name: str) -> None:
    """A model in channels-last (fedctx.adapt's default on CPU) stays in it through every norm,
    as through torch's BatchNorm2d; outputs and gradients do not depend on the layout."""
    torch.manual_seed(0)
    norm = make_norm(name, 8, dims=2, **({"num_contexts": 2} if name in CONTEXT_AWARE else {}))
    x = torch.randn(6, 8, 5, 5)
    contexts = torch.tensor([0, 1, 0, 1, 0, 1])
    g = torch.randn(6, 8, 5, 5)
    outs, grads = [], []
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.clone(memory_format=layout).requires_grad_()
        m = copy.deepcopy(norm)  # the same state (running statistics, history) for both
        with use_context(m, contexts):
            out = m(xl)
        out.backward(g.contiguous(memory_format=layout))
        outs.append(out)
        grads.append([xl.grad] + [p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert outs[1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outs[1], outs[0])
    for in_layout, nchw in zip(grads[1], grads[0], strict=True):  # input and parameter grads
        torch.testing.assert_close(in_layout, nchw)
