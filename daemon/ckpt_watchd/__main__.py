"""`python -m ckpt_watchd`: the same entry point as the `ckpt-watchd` script."""

import sys

from ckpt_watchd.cli import main

sys.exit(main())
