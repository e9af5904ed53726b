"""Cross-Iteration Batch Normalization (CBN), simplified.

Yao, Cao, Zheng, Huang & Lin, "Cross-Iteration Batch Normalization", CVPR 2021
(arXiv:2002.05712). Statistics are averaged over the current and the ``window - 1`` previous
iterations, which helps with small batches::

    mu_bar  = 1/k sum_tau mu_{t-tau}
    nu_bar  = 1/k sum_tau max(nu_{t-tau}, mu_{t-tau}^2)        (nu = E[x^2])
    var_bar = max(nu_bar - mu_bar^2, 0)
    y = gamma * (x - mu_bar) / sqrt(var_bar + eps) + beta

**Simplification:** the paper compensates the stale statistics ``mu_{t-tau}(theta_{t-tau})``
for the weight change with a first-order Taylor term in ``theta_t - theta_{t-tau}`` (which needs
the preceding layer's weight gradients). This layer does not: stale statistics are used as
stored (the paper's "naive" cross-iteration baseline) and carry no gradient; only the current
iteration's ``mu_t, nu_t`` are differentiated.

Other choices (each tested): ``window = 4``; history is only used after ``burnin`` training
iterations (default 0) and only from entries already filled. No loop over the window: the
history is a ``(window - 1, C)`` buffer rolled each step.

Running statistics for evaluation (``running_stats=``): ``"batch"`` (default, the authors' code,
``CBatchNorm2d``): updated from the **current** batch's mean and unbiased variance, as
``nn.BatchNorm``; ``"window"`` (fedctx's former default): from ``mu_bar`` and ``var_bar``
(variance made unbiased with the current batch's count). Both use ``nn.BatchNorm``'s momentum
convention.

The history (``hist_mean``, ``hist_sqmean``, ``hist_valid``) is **transient**: statistics of
the last iterations of *this* model's own training, as the authors' code keeps them (Python
lists, not saved). The buffers are registered non-persistent, so they are not in
``state_dict()``: they are never sent, averaged across clients or checkpointed (averaging
another client's stale statistics would mix domains and iterations), and loading a state
(``load_state_dict``: new weights, e.g. a federated round's global model) clears them, since
statistics computed under the old weights are stale.

Other differences from the authors' code: entries whose ``nu - mu^2`` is negative are clamped
with the paper's ``max(nu, mu^2)`` (the code drops them from the average); ``eps`` is added to
the variance as ``nn.BatchNorm`` (the code's default adds it to the standard deviation).

The math is :func:`fedctx.norm.functional.cross_iteration_batch_norm` (window statistics by the
parallel-variance rule, one pass out, closed-form backward).
"""

from __future__ import annotations

from typing import Any

import torch

from fedctx.norm._common import BatchStatsNorm, check_input, describe
from fedctx.norm.functional import cross_iteration_batch_norm


class CrossIterationBatchNorm(BatchStatsNorm):
    """Cross-Iteration BatchNorm (no Taylor compensation) over ``(N, C, *spatial)``.

    Args:
        num_features: channels ``C``.
        window: iterations averaged, the current one included.
        burnin: training iterations before the history is used.
        eps, momentum, affine: as in ``nn.BatchNorm``.
        running_stats: ``"batch"`` (the current batch's statistics, the authors' code) or
            ``"window"`` (the window's ``mu_bar, var_bar``).
        device, dtype: of the parameters and buffers, as in ``torch.nn``.
    """

    #: Buffers that are per-process training state, never model state (non-persistent: not in
    #: ``state_dict``, so never aggregated across clients; cleared by ``load_state_dict``).
    transient_buffers: tuple[str, ...] = ("hist_mean", "hist_sqmean", "hist_valid")

    def __init__(
        self,
        num_features: int,
        window: int = 4,
        burnin: int = 0,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        running_stats: str = "batch",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if running_stats not in ("batch", "window"):
            raise ValueError(f"running_stats must be 'batch' or 'window', got {running_stats!r}")
        super().__init__(num_features, eps, momentum, affine, device=device, dtype=dtype)
        self.window = window
        self.burnin = burnin
        self.running_stats = running_stats
        h = window - 1
        for name, value in (
            ("hist_mean", torch.zeros(h, num_features, device=device, dtype=dtype)),
            ("hist_sqmean", torch.zeros(h, num_features, device=device, dtype=dtype)),
            ("hist_valid", torch.zeros(h, dtype=torch.bool, device=device)),
        ):
            self.register_buffer(name, value, persistent=False)

    def reset_history(self) -> None:
        """Forget the previous iterations' statistics."""
        self.hist_mean.zero_()
        self.hist_sqmean.zero_()
        self.hist_valid.zero_()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.reset_history()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.reset_history()  # statistics computed under the previous weights are stale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.num_features, self.expected_dims)
        use_history = self.training and int(self.num_batches_tracked) >= self.burnin
        if self.training:
            self.num_batches_tracked.add_(1)
        return cross_iteration_batch_norm(
            x, self.running_mean, self.running_var, self.hist_mean, self.hist_sqmean,
            self.hist_valid, self.weight, self.bias, self.training, self.momentum, self.eps,
            use_history, self.running_stats,
        )

    def extra_repr(self) -> str:
        return describe(self, "window", "burnin", "eps", "momentum", "affine", "running_stats")
