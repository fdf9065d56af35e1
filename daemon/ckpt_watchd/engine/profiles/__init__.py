"""Trainer profiles: one module per trainer, each owning its discovery, detection and strip rule.

`registry` lists them; `engine.strip` dispatches to them. A profile imports only `common`.
"""
