"""Proxy Normalization.

Labatie, Masters, Eaton-Rosen & Luschi, "Proxy-Normalizing Activations to Match Batch
Normalization while Removing Batch Dependence", NeurIPS 2021 (arXiv:2106.03743). Proxy Norm
**replaces a norm -> activation pair**: after a batch-independent norm (LayerNorm or GroupNorm)
and the affine + activation, the *post-activation* output is normalized by the moments of the
same activation applied to a Gaussian *proxy*::

    y = GN(x)  (or LN(x)),   z = phi(gamma * y + beta)
    Yt ~ N(betat, (1 + gammat)^2)                               (per channel)
    out = (z - E[phi(gamma Yt + beta)]) / sqrt(Var[phi(gamma Yt + beta)] + proxy_eps)

The proxy moments are computed from ``n`` deterministic standard-normal quantiles
``q_i = sqrt(2) erfinv(2 (i + 0.5) / n - 1)`` (a ``(C, n)`` tensor, no loop), so the layer has no
batch dependence and no running statistics; train and eval compute the same function.

Where it goes in a model (Labatie et al.; Graphcore's code applies it in its
``proxynorm_activation`` only, i.e. where an activation follows the norm): the module's output
is already post-activation, so a model must not add another activation after it; where no
activation follows a norm (the norm before a residual addition, a shortcut's norm, a
transformer's pre-norms) the model uses the plain base norm (GroupNorm / LayerNorm) instead.
:func:`fedctx.norm.make_norm_act` builds exactly that: ``make_norm_act('proxy', C, 'relu')`` is
this module with ``nn.Identity`` as the activation, ``make_norm_act('proxy', C, None)`` the base
norm; every fedctx model builds its norms through it.

Defaults, beside Graphcore's TensorFlow implementation (``get_rand(num_rand=200)``,
``make_pn_optimiser(..., proxy_epsilon=0.03)``, ``proxy_initialiser`` with ``beta, gamma = 0, 1``
and ``betat, gammat = 0, 0``; read from a 2021 Graphcore-copyright file of those utilities in a
public code index; the repository graphcore-research/proxy-norm itself could not be fetched
here, so its exact path and any later change there are unverified):

===============================  ===================  ==========================================
choice                           fedctx               Graphcore
===============================  ===================  ==========================================
quantiles ``n``                  200                  200 (``get_rand``), at ``(i + 0.5) / n``
proxy variance eps               ``proxy_eps=0.03``   ``proxy_epsilon=0.03``
base-norm eps                    ``eps=1e-5``         the base norm's own (not part of the proxy)
``betat, gammat`` init           0, 0                 0, 0
``beta, gamma`` init             0, 1                 0, 1
proxy moments                    recomputed in every  recomputed in the optimiser after each
                                 forward (autograd)   update, gradient by a manual backward
weight decay on ``betat,gammat`` the optimiser's      applied to ``betat, gammat`` only
===============================  ===================  ==========================================

Both eps and the quantile count match Graphcore's (this module used 128 quantiles and one eps of
1e-5 for both before). The moment error of 200 quantiles is below 1e-3 for ReLU (tested against
numerical integration). ``base`` is ``'group'`` (default; ``num_groups`` as fedctx's GroupNorm
default, see :func:`fedctx.norm._common.default_groups`) or ``'layer'`` (one group).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from fedctx.norm._common import check_input, default_groups, describe, init_affine, reset_affine
from fedctx.norm.functional import ACTIVATIONS, gaussian_quantiles, proxy_moments, proxy_norm

__all__ = ["ACTIVATIONS", "ProxyNorm", "gaussian_quantiles", "proxy_moments"]


class ProxyNorm(nn.Module):
    """GroupNorm/LayerNorm + affine + activation + Proxy Normalization (see module docstring).

    The output is post-activation: do not follow it with another activation (see the module
    docstring and :func:`fedctx.norm.make_norm_act`).

    Args:
        num_features: channels ``C``.
        base: ``'group'`` or ``'layer'``.
        num_groups: groups of the GroupNorm (``base='group'``; default
            :func:`~fedctx.norm._common.default_groups`).
        activation: one of :data:`ACTIVATIONS`.
        eps: of the base norm.
        n_quantiles: Gaussian quantiles used for the proxy moments (Graphcore: 200).
        proxy_eps: added to the proxy variance (Graphcore: 0.03).
        device, dtype: of the parameters and buffers, as in ``torch.nn``.
    """

    is_normalization: ClassVar[bool] = True
    expected_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        base: str = "group",
        num_groups: int | None = None,
        activation: str = "relu",
        eps: float = 1e-5,
        n_quantiles: int = 200,
        proxy_eps: float = 0.03,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if base not in ("group", "layer"):
            raise ValueError(f"base must be 'group' or 'layer', got {base!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; valid choices: {', '.join(ACTIVATIONS)}"
            )
        if num_groups is None:
            num_groups = default_groups(num_features)
        if base == "layer":
            num_groups = 1
        if num_features % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_features={num_features}")
        self.num_features = num_features
        self.base = base
        self.num_groups = num_groups
        self.activation = activation
        self.eps = eps
        self.n_quantiles = n_quantiles
        self.proxy_eps = proxy_eps
        init_affine(self, True, (num_features,), device, dtype)
        self.proxy_weight = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.proxy_bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        quantiles = gaussian_quantiles(n_quantiles, dtype or torch.get_default_dtype())
        self.register_buffer("quantiles", quantiles.to(device), persistent=False)

    def reset_parameters(self) -> None:
        reset_affine(self)
        nn.init.zeros_(self.proxy_weight)
        nn.init.zeros_(self.proxy_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        return proxy_norm(
            x, self.num_groups, self.weight, self.bias, self.proxy_weight, self.proxy_bias,
            self.quantiles, self.activation, self.eps, self.proxy_eps,
        )

    def extra_repr(self) -> str:
        return describe(self, "base", "num_groups", "activation", "eps", "n_quantiles", "proxy_eps")
