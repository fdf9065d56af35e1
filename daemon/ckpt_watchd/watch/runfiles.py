"""Reading the small files a run folder holds (results.csv, args.yaml, claims) from the daemon's loop.

Anyone who can create a file in a run folder can make it a FIFO, a symlink to one, or a device: a
plain `open()` then blocks the whole daemon. Every such read goes through `read_small`: no
symlink is followed, a FIFO never blocks (O_NONBLOCK), only a regular file is read (fstat after
the open), and never more than a bound. No torch, no clock.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegular(OSError):
    """The path exists but is not a regular file (a FIFO, a socket, a device, a folder)."""


def read_small(path: Path | str, limit: int) -> bytes:
    """At most `limit` bytes of the regular file at `path`; OSError (NotRegular) otherwise."""
    fd = os.open(path, _FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular(f"{path} is not a regular file")
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
