"""Evaluating a domain no client trained on (``--holdout-domain``, leave-one-domain-out): the
server evaluates its test set with the global shared weights under each rule of
:data:`fedctx.config.UNSEEN_RULES` for the normalization it has no entry for.

The server's candidates are its **entries**: for each training context ``k``, the norm tensors
it evaluates context ``k`` with (``NormPolicyStrategy.norm_for_context(k)``), seen through
context ``k`` (:func:`context_view`: a context-aware layer's per-context rows all become row
``k``, so an entry means the same for ``batch`` norms, whose tensors have no context axis, and
for ``context`` norms). The held-out images carry no context id of their own.

* ``bank-mean``: the mean of the entries (for ``batch`` norm under ``per-context``, today's rule
  for a context the bank has not seen; for ``context`` norms, the mean of each context's own
  row, which is the layer's own rule for an unknown context, Faye et al. 2024).
* ``batch-stats``: test-time batch statistics (Nado et al. 2020, "prediction-time batch
  normalization"): normalization layers normalize each test batch (:data:`BATCH` images) with
  its own statistics, with ``bank-mean``'s affine parameters; nothing is updated.
* ``nearest``: per test batch, the entry whose running statistics at the **first normalization
  layer with running statistics** best match the batch there: the entry minimising
  ``KL(N(mu_b, var_b) || N(mu_k, var_k))`` between diagonal Gaussians, summed over channels,
  ``mu_b``/``var_b`` the batch's per-channel mean and (biased) variance of that layer's input,
  ``mu_k``/``var_k`` the entry's running mean and variance. The input of that layer does not
  depend on the normalization tensors (no norm layer precedes it), so one truncated forward
  pass per batch decides.

A rule a model or policy cannot follow is left out: ``nearest`` needs running statistics;
under ``local`` (FedBN) and ``stats-local`` (SiloBN) the server holds no statistics, so only
``batch-stats`` remains, and only under ``stats-local``, whose affine parameters the server
averages (under ``local`` it holds no learnt normalization tensor at all).
"""

from __future__ import annotations

import torch
from torch import nn

from fedctx.federated.params import weighted_average
from fedctx.norm import ContextAware, is_norm_module, use_context

Tensors = dict[str, torch.Tensor]
BATCH = 256


def context_view(model: nn.Module, norm: Tensors, k: int) -> Tensors:
    """``norm`` (norm tensors of ``model``) with the per-context tensors of every
    :class:`ContextAware` module (shape ``(K, ...)``, ``K`` its ``num_contexts``, at least 2
    dimensions) replaced by row ``k`` repeated ``K`` times; other tensors unchanged."""
    out = dict(norm)
    for prefix, module in model.named_modules():
        if not isinstance(module, ContextAware) or module.num_contexts < 2:
            continue
        for name, value in list(module.named_parameters(recurse=False)) + list(
                module.named_buffers(recurse=False)):
            key = f"{prefix}.{name}" if prefix else name
            if (value is not None and key in out and out[key].dim() >= 2
                    and out[key].shape[0] == module.num_contexts):
                out[key] = out[key][k].unsqueeze(0).expand_as(out[key]).clone()
    return out


def _first_stats_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, module in model.named_modules():
        if is_norm_module(module) and getattr(module, "running_mean", None) is not None:
            return name, module
    return None


class _Stop(Exception):
    pass


def _layer_input(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``layer`` when ``model`` (eval mode) runs on ``x``; the forward stops there."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        with use_context(model, 0):
            model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def gaussian_kl(mu0: torch.Tensor, var0: torch.Tensor, mu1: torch.Tensor, var1: torch.Tensor,
                eps: float = 1e-5) -> torch.Tensor:
    """``KL(N(mu0, var0) || N(mu1, var1))`` of diagonal Gaussians, summed over the last axis."""
    var0, var1 = var0 + eps, var1 + eps
    return 0.5 * (var0 / var1 + (mu1 - mu0).square() / var1 - 1 + (var1 / var0).log()).sum(-1)


def nearest_entry(model: nn.Module, entries: dict[int, Tensors], x: torch.Tensor) -> int | None:
    """The context whose entry's statistics at the first normalization layer with running
    statistics best match the batch ``x`` (smallest :func:`gaussian_kl`); ``None`` if the model
    has no such layer. ``model`` must hold the shared weights."""
    found = _first_stats_layer(model)
    if found is None:
        return None
    name, layer = found
    model.eval()
    with torch.no_grad():
        h = _layer_input(model, layer, x).to(torch.float64)
    dims = [0, *range(2, h.dim())]
    mu, var = h.mean(dims), h.var(dims, correction=0)
    prefix = f"{name}." if name else ""
    best, best_kl = None, float("inf")
    for k, entry in sorted(entries.items()):
        mean_k = entry[prefix + "running_mean"].to(torch.float64)
        var_k = entry[prefix + "running_var"].to(torch.float64)
        if mean_k.dim() == 2:  # a context-aware layer seen through context k: rows are equal
            mean_k, var_k = mean_k[0], var_k[0]
        kl = float(gaussian_kl(mu, var, mean_k, var_k))
        if kl < best_kl:
            best, best_kl = k, kl
    return best


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | str,
              batch_stats: bool, state_of_batch) -> float:  # noqa: ANN001 - callable
    correct = 0
    for start in range(0, len(y), BATCH):
        xb, yb = x[start:start + BATCH].to(device), y[start:start + BATCH].to(device)
        model.load_state_dict(state_of_batch(xb))
        model.eval()
        if batch_stats:
            for module in model.modules():
                if is_norm_module(module):
                    module.train()
        with use_context(model, 0):
            correct += int((model(xb).argmax(1) == yb).sum())
    model.eval()
    return correct / max(len(y), 1)


def evaluate_unseen(model: nn.Module, shared: Tensors, entries: dict[int, Tensors] | None,
                    server_norm: Tensors | None, x: torch.Tensor, y: torch.Tensor, *,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Accuracy of ``model`` with the ``shared`` weights on ``(x, y)`` under every rule it can
    follow (see the module docstring), in batches of :data:`BATCH`.

    ``entries``: context -> norm tensors the server evaluates that context with (``None`` when
    the server holds none: ``local``, ``stats-local``); ``server_norm``: the norm tensors the
    server holds otherwise (the averaged affine parameters under ``stats-local``; ``None``
    under ``local``). ``model``'s state is overwritten.
    """
    results: dict[str, float] = {}
    if entries:
        views = {k: context_view(model, v, k) for k, v in entries.items()}
        mean = {**shared, **weighted_average(list(views.values()), [1.0] * len(views))}
        results["bank-mean"] = _accuracy(model, x, y, device, False, lambda xb: mean)
        results["batch-stats"] = _accuracy(model, x, y, device, True, lambda xb: mean)
        model.load_state_dict(mean)
        if _first_stats_layer(model) is not None:
            def nearest(xb: torch.Tensor) -> Tensors:
                model.load_state_dict(mean)  # the shared weights decide the first layer's input
                return {**shared, **views[nearest_entry(model, views, xb)]}

            results["nearest"] = _accuracy(model, x, y, device, False, nearest)
    elif server_norm is not None:
        state = {**shared, **server_norm}
        results["batch-stats"] = _accuracy(model, x, y, device, True, lambda xb: state)
    return results
