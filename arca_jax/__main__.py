import sys

from arca_jax.cli import main

sys.exit(main())
