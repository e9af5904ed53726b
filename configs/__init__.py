"""Default options of each scenario, one ``<scenario>.toml`` file per scenario (package data of
``fedctx.configs``, read with :mod:`importlib.resources` by :mod:`fedctx.scenarios`)."""
