"""A small Vision Transformer for 32x32 images whose normalization layers are chosen by name.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021: pre-norm encoder blocks on
4x4 patches with a class token and learned position embeddings.

Token norms: ``norm='layer'`` is ``nn.LayerNorm`` over the embedding ``D`` of each token (the
standard ViT). Any other name is built with ``dims=1`` and applied to the tokens as
``(N, D, T)``, so batch-style norms (``batch``, ``context``, ...) take statistics per feature
``D`` over ``N * T`` (over ``N_k * T`` for context ``k``), as in the Context Normalization paper
(whose PyTorch port normalized over ``T`` instead, a bug).

No norm in this ViT is followed by an activation (pre-norms feed attention and the MLP, whose
GELU follows a linear layer), so every token norm is built with
``fedctx.norm.make_norm_act(norm, D, None)``: ``proxy`` (Proxy Norm replaces a norm ->
activation pair) is therefore its plain base GroupNorm here. With ``weightstd`` the patch
embedding is a weight-standardized convolution (``WSConv2d``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedctx.norm import conv2d_class, make_norm_act


class TokenNorm(nn.Module):
    """Apply a fedctx norm to tokens ``(N, T, D)``."""

    def __init__(self, dim: int, norm: str, num_contexts: int, **options: object) -> None:
        """``options``: the norm's, ``device``/``dtype`` included."""
        super().__init__()
        self.layer_norm = norm == "layer"
        if self.layer_norm:
            self.norm = nn.LayerNorm(dim, **options)
        else:
            self.norm = make_norm_act(norm, dim, None, dims=1, num_contexts=num_contexts,
                                      **options).norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_norm:
            return self.norm(x)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, make: Callable[[int], nn.Module],
        **factory_kwargs: Any,
    ) -> None:
        super().__init__()
        self.norm1 = make(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, **factory_kwargs)
        self.norm2 = make(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, **factory_kwargs), nn.GELU(),
                                 nn.Linear(hidden, dim, **factory_kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small ViT for ``(N, C, 32, 32)`` inputs (default: 4x4 patches, D=128, 6 blocks, 4 heads).

    ``norm`` is any :func:`fedctx.norm.available` name (default ``'layer'``); ``num_contexts``
    sizes context-aware norms; extra keyword arguments are that norm's options;
    ``device``/``dtype`` place every parameter and buffer, as in ``torch.nn``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        norm: str = "layer",
        num_contexts: int = 1,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        in_channels: int = 3,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **norm_options: object,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError("patch_size must divide image_size")
        fk = {"device": device, "dtype": dtype}

        def make(d: int) -> nn.Module:
            return TokenNorm(d, norm, num_contexts, **fk, **norm_options)

        self.patch = conv2d_class(norm)(in_channels, dim, patch_size, patch_size, **fk)
        tokens = (image_size // patch_size) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim, **fk))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim, **fk) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, make, **fk)
                                      for _ in range(depth)])
        self.norm = make(dim)
        self.head = nn.Linear(dim, num_classes, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, T, D)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = self.norm(self.blocks(t))
        return self.head(t[:, 0])


def vit_tiny(num_classes: int = 10, **kwargs: object) -> ViT:
    """ViT with D=128, 6 blocks, 4 heads, 4x4 patches (about 0.8 M parameters)."""
    return ViT(num_classes, **kwargs)
