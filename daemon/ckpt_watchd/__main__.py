"""`python -m ckpt_watchd`: the same entry point as the `ckpt-watchd` script."""

import sys

from ckpt_watchd.cli import main

# Guarded: spawned worker processes import this module as __mp_main__ and must not start a daemon.
if __name__ == "__main__":
    sys.exit(main())
