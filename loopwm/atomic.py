"""Atomic file writes: temp file in the same folder, fsync, rename; and the clean-up of temp files a kill left."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what `atomic_write` names its temp files: .NAME.XXXXXXXX.tmp


def _default_mode() -> int:
    """The mode `open()` would give a new file: 0o666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write` to a temp file in the same folder, fsync, then rename: a crash or an error
    never leaves half a file, and whatever was at `path` before survives a failed write. The file gets
    the usual permissions (0o666 less the umask), not the temp file's private 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files that writes killed before their rename left in `folder`; returns them.

    Only safe while no other process writes there (a run folder's lock guarantees it).
    """
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file() and _TEMP.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
