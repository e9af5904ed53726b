"""AdaMatch (Berthelot et al. 2021) domain adaptation with the domain as normalization context.

``python -m fedctx.adapt --source mnist --target mnistm --norm context`` runs it; see
docs/adamatch.md. Modules: :mod:`~fedctx.adamatch.algorithm` (the method's pure pieces),
:mod:`~fedctx.adamatch.augment` (weak/strong augmentation), :mod:`~fedctx.adamatch.model` (the
digits CNN with the norm everywhere or only at the input), :mod:`~fedctx.adamatch.training` (the
loop), :mod:`~fedctx.adamatch.sweep` (grids on Ray). Where it differs from the authors' code, and
why: docs/adamatch.md.
"""

from typing import Any

from fedctx.adamatch.config import AdaptConfig, AdaptConfigError

__all__ = ["AdaptConfig", "AdaptConfigError", "train"]


def __getattr__(name: str) -> Any:
    """``train`` is imported on first use (it imports torch), so the options and their checks
    (:mod:`~fedctx.adamatch.config`) load without torch: a mistyped flag is told at once."""
    if name == "train":
        from fedctx.adamatch.training import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
