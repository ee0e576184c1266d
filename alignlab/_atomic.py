"""What every atomic write here shares: hidden names beside the target, and fsync before and after the rename.

A file (or folder) is replaced by writing the new one under :func:`sibling`'s name, ``.{name}.{tag}`` in the
same folder (same file system, so a rename moves it into place), then renaming it over the target. The name
is cut so the result fits the 255 bytes a file name may have (``NAME_MAX`` on Linux and macOS, in UTF-8): a
valid ``out_dir`` of 250 characters got a partial folder 268 long, and the merge failed with "File name
too long" for a name the user could create.

The rename is atomic for a running system, not for a crash: the file system may commit the rename before
the new file's data, so after a power cut the target can be an empty or truncated file where the previous
good one was (ext4 with ``data=ordered`` orders only renames over an existing file; XFS, btrfs and others
not even those). So the new file's bytes are flushed (:func:`fsync_file`) before the rename, and the folder
holding the new entry (:func:`fsync_dir`) after it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "fsync_file", "sibling"]

_NAME_MAX = 255


def sibling(path: Path, tag: str) -> Path:
    """``path.parent / f".{path.name}.{tag}"``, with ``path.name`` shortened (whole UTF-8 characters) to fit."""
    room = _NAME_MAX - len(f"..{tag}".encode())
    name = path.name.encode()[:room].decode(errors="ignore")
    return path.parent / f".{name}.{tag}"


def fsync_file(path: str | os.PathLike) -> None:
    """Flush the data of the file at ``path`` to its disk (``os.fsync``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush folder ``path``'s entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder (EINVAL); the data itself is already flushed
        pass
    finally:
        os.close(fd)
