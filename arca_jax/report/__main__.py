"""``python -m arca_jax.report RUN_DIR... --out DIR``: the same as ``arca-jax report``."""

import sys

from arca_jax.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
