"""Models for AdaMatch: the digits CNN with ``--norm`` everywhere, or only at the input.

``--norm-scope all`` (default): every normalization layer of the digits CNN is ``--norm``.
``--norm-scope input``: the protocol of the normalization papers built on the Keras AdaMatch
example (SBN/CN arXiv 2405.17027, ACN ICIP 2024, UAN IJCNN 2024; see docs/adamatch.md), where
the context-aware layer replaces only the *input* normalization: one ``--norm`` layer over the 3
input channels, applied to the image before the first conv, and BatchNorm everywhere else
(:class:`InputNormModel`).
"""

from __future__ import annotations

import torch
from torch import nn

from fedctx.models import make_model
from fedctx.norm import make_norm_act


class InputNormModel(nn.Module):
    """``body(input_norm(x))``: a normalization layer on the input image, then a network.

    Context routing needs nothing special: :func:`fedctx.norm.use_context` sets the context on
    every context-aware module inside this module, ``input_norm`` included.
    """

    def __init__(self, input_norm: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.input_norm = input_norm
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.input_norm(x))


def build_digits_model(norm: str, *, scope: str = "all", num_contexts: int = 2, width: int = 16,
                       in_channels: int = 3, **norm_options: object) -> nn.Module:
    """The digits CNN for AdaMatch with ``norm`` over ``num_contexts`` contexts.

    Args:
        norm: any :func:`fedctx.norm.available` name.
        scope: ``"all"`` (every norm layer is ``norm``) or ``"input"`` (:class:`InputNormModel`:
            ``norm`` over the ``in_channels`` input channels, ``batch`` in the CNN).
        norm_options: keyword arguments of every ``norm`` layer (not of the CNN's BatchNorms
            in scope ``input``).
    """
    if scope == "all":
        return make_model("digits-cnn", norm=norm, num_contexts=num_contexts, width=width,
                          in_channels=in_channels, **norm_options)
    if scope == "input":
        return InputNormModel(
            # no activation follows the input norm (proxy: its plain GroupNorm base)
            make_norm_act(norm, in_channels, None, dims=2, num_contexts=num_contexts,
                          **norm_options).norm,
            make_model("digits-cnn", norm="batch", num_contexts=num_contexts, width=width,
                       in_channels=in_channels))
    raise ValueError(f"unknown norm scope {scope!r}; valid choices: all, input")
