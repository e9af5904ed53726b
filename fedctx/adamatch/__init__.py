"""AdaMatch (Berthelot et al. 2021) domain adaptation with the domain as normalization context.

``python -m fedctx.adapt --source mnist --target mnistm --norm context`` runs it; see
docs/adamatch.md. Modules: :mod:`~fedctx.adamatch.algorithm` (the method's pure pieces),
:mod:`~fedctx.adamatch.augment` (weak/strong augmentation), :mod:`~fedctx.adamatch.model` (the
digits CNN with the norm everywhere or only at the input), :mod:`~fedctx.adamatch.train` (the
loop), :mod:`~fedctx.adamatch.sweep` (grids on Ray). Where it differs from the authors' code, and
why: docs/adamatch.md.
"""

from fedctx.adamatch.config import AdaptConfig, AdaptConfigError
from fedctx.adamatch.train import train

__all__ = ["AdaptConfig", "AdaptConfigError", "train"]
