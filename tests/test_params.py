"""The state split leaves transient buffers out of every role (never sent nor aggregated)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedctx.federated.params import split_state, transient_keys
from fedctx.models import make_model


class _Leaky(nn.Module):
    transient_buffers = ("scratch",)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scratch", torch.zeros(3))  # persistent: a contract violation


def test_transient_buffers_are_declared_and_excluded() -> None:
    model = make_model("resnet20", norm="crossiter", width=4)
    declared = transient_keys(model)
    assert "stem.1.hist_mean" in declared and len(declared) == 3 * 21  # resnet20: 21 norms
    split = split_state(model)
    assert not set(declared) & set(split.shared + split.norm)


def test_persistent_transient_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="persistent=False"):
        split_state(nn.Sequential(nn.Linear(2, 3), _Leaky()))
