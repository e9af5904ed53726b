"""fedctx: federated learning and domain adaptation with context-aware normalization."""

__version__ = "0.1.0"
