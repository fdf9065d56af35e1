"""ckpt-watchd: strips the checkpoints of finished training runs.

Importing the package has no side effects and never imports torch.
"""

__version__ = "0.1.0"
