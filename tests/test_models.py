"""fedctx models take norm= and num_contexts=; contexts route through use_context."""

from __future__ import annotations

import pytest
import torch

from fedctx.models import MODELS, make_model
from fedctx.norm import ContextAware, use_context

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
