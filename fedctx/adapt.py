"""``python -m fedctx.adapt``: AdaMatch domain adaptation (see :mod:`fedctx.adamatch.cli`)."""

from fedctx.adamatch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
