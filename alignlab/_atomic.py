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

A replaced file keeps its permission bits (:func:`keep_mode`), as it would if it were rewritten in place with
``open(path, "w")``: a 0600 file stays private. A new file gets what its writer gives it, the umask's.
:func:`write_atomically` does all of this for one file. Folders created on the way to the target are
removed again when the write fails (:func:`made_folder`), so a failed write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["fsync_dir", "fsync_file", "keep_mode", "made_folder", "sibling", "write_atomically"]

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


def keep_mode(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Give the file ``new`` the permission bits of ``target``, the file it is about to replace (a rename does not
    carry them over: a private 0600 file came back with the umask's 0644). Nothing when ``target`` does not exist."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return
    os.chmod(new, mode & 0o777)


@contextlib.contextmanager
def made_folder(folder: Path) -> Iterator[Path]:
    """Create ``folder`` and its missing parents; if that or the block raises, remove again the ones created here
    that are still empty (a failed write left them behind, empty, for a path the user mistyped)."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        # inside the try: a mkdir that fails part way (a name too long below a new folder) made the ones above it
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
    except BaseException:
        for p in made:
            if not os.path.isdir(p):  # never made: the mkdir failed at it or above it
                continue
            try:
                p.rmdir()
            except OSError:  # not empty (someone else wrote there meanwhile): it and its parents stay
                break
        raise


def write_atomically(path: Path, write: Callable[[str], Any]) -> Path:
    """``write(tmp)`` to a fresh name beside ``path``, then rename it over ``path``; returns ``path``.

    ``write`` must create the file (``open(tmp, "x")``, ``savefig(tmp)``), so that a new file gets the umask's
    permissions; a replaced one keeps its own (:func:`keep_mode`). The file is fsynced before the rename and
    the folder after it; parent folders are created. On any error the temporary file is removed and a
    previous ``path`` is left as it was, and so are the folders above it (:func:`made_folder`). A ``path`` that
    is a symlink is written through, as ``open`` would: the file it points to is replaced and the link stays.
    ``ValueError`` if ``path`` is a folder (the rename failed with ``IsADirectoryError`` naming the temporary file).
    """
    target = Path(os.path.realpath(path)) if path.is_symlink() else path  # the rename replaced the link itself
    if target.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; a file was to be written there (give its file name)")
    tmp = str(sibling(target, f"{uuid.uuid4().hex[:12]}.tmp"))
    with made_folder(target.parent):
        try:
            write(tmp)
            fsync_file(tmp)  # before keep_mode: the read-only open fails on a file that mode makes unreadable (0200)
            keep_mode(tmp, target)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path
