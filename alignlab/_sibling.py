"""Hidden names next to a file or folder that is being replaced: where the new one is written, or the old one kept.

``.{name}.{tag}`` in the same folder (same file system, so a rename moves it into place). The name is cut so
the result fits the 255 bytes a file name may have (``NAME_MAX`` on Linux and macOS, in UTF-8): a valid
``out_dir`` of 250 characters got a partial folder 268 long, and the merge failed with "File name too long"
for a name the user could create.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["sibling"]

_NAME_MAX = 255


def sibling(path: Path, tag: str) -> Path:
    """``path.parent / f".{path.name}.{tag}"``, with ``path.name`` shortened (whole UTF-8 characters) to fit."""
    room = _NAME_MAX - len(f"..{tag}".encode())
    name = path.name.encode()[:room].decode(errors="ignore")
    return path.parent / f".{name}.{tag}"
