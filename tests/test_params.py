"""The state split leaves transient buffers out of every role (never sent nor aggregated)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedctx.federated.params import context_indexed, split_state, transient_keys
from fedctx.models import make_model
from fedctx.norm import ContextNorm1d


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


class _Declared(nn.Module):
    """A layer of one's own whose ``table`` rows serve one context each."""

    is_normalization = True
    context_indexed = ("table",)

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(3, 4))
        self.scale = nn.Parameter(torch.ones(4))


def test_context_indexed_tensors() -> None:
    split = split_state(make_model("digits-cnn", norm="context", num_contexts=3, width=4))
    assert split.by_context and set(split.by_context) == set(split.norm)
    shared_affine = split_state(nn.Sequential(ContextNorm1d(4, num_contexts=3,
                                                            shared_affine=True)))
    assert set(shared_affine.by_context) == {"0.running_mean", "0.running_var",
                                             "0.num_batches_tracked"}
    assert split_state(make_model("digits-cnn", norm="batch", width=4)).by_context == ()
    assert context_indexed(_Declared()) == ("table",)
