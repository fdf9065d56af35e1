"""End-to-end tests: the ckpt-watchd CLI as a subprocess (see conftest.py for the harness)."""
