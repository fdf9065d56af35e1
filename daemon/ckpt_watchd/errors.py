"""The project's exception hierarchy.

Per-file problems derive from `CheckpointError` and carry a short `kind` (stable, for audit records and
metrics) and a one-line message; the worker turns them into `Outcome` values. Start-up problems derive
from `StartupError`, which the CLI maps to exit code 2. Nothing here imports torch.
"""

from __future__ import annotations


class CkptWatchdError(Exception):
    """Base class for every error this package raises on purpose."""


class StartupError(CkptWatchdError):
    """A bad option, a missing root, an unwritable state dir: the daemon cannot start (exit 2)."""


# Failures that trying an unchanged file again cannot change: reported once, never retried.
FINAL_KINDS = frozenset({"unsafe", "unsupported", "limit", "unrecognised", "not_a_file"})


class CheckpointError(CkptWatchdError):
    """One file could not be inspected or stripped; the file is left as it was."""

    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotARegularFile(CheckpointError):
    """Missing path, directory, symlink, FIFO, device: never opened, never followed."""

    kind = "not_a_file"


class UnreadableFile(CheckpointError):
    """The file exists but cannot be read (permissions, I/O error)."""

    kind = "unreadable"


class EmptyFile(CheckpointError):
    kind = "empty"


class TornWrite(CheckpointError):
    """The file looks like the prefix of a checkpoint: a writer is busy or was killed mid-write."""

    kind = "torn"


class NotACheckpoint(CheckpointError):
    """Random bytes, a TorchScript archive, a zip that torch did not write, ..."""

    kind = "not_a_checkpoint"


class UnsafePickle(CheckpointError):
    """The pickle asks for a global (or a use of one) that could run code; nothing was executed."""

    kind = "unsafe"

    def __init__(self, global_name: str, *, role: str | None = None, why: str | None = None) -> None:
        detail = f" ({role or why})" if (role or why) else ""
        if global_name:
            message = (f"refused unsafe global {global_name!r}{detail} in the pickle "
                       "(nothing was executed)")
        else:
            message = f"refused unsafe pickle: {why or role} (nothing was executed)"
        super().__init__(message)
        self.global_name = global_name


class Unsupported(CheckpointError):
    """A file we cannot strip safely (legacy format, exotic opcodes): reported once, never retried."""

    kind = "unsupported"

    def __init__(self, what: str) -> None:
        super().__init__(f"unsupported: {what}; left untouched")


class LimitExceeded(CheckpointError):
    """The file needs more nesting, memory or CPU than a checkpoint of its size can: refused."""

    kind = "limit"


class UnrecognisedLayout(CheckpointError):
    kind = "unrecognised"


class SourceChanged(CheckpointError):
    """The source file was rewritten while we worked on it (a live run): nothing was replaced."""

    kind = "changed"


class VerifyFailed(CheckpointError):
    """The freshly written file did not read back as the stripped checkpoint: it was discarded."""

    kind = "verify"


class WriteFailed(CheckpointError):
    """Writing the result failed (disk full, permissions, I/O error): the source is untouched."""

    kind = "write"
