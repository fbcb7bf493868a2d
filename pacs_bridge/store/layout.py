"""Where stored files are, relative to the data folder.

Rows keep file paths relative to ``[storage] data_dir`` so that several nodes
sharing one data folder (an NFS or SMB share) may mount it in different
places; rows written by older versions hold absolute paths, which are kept.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["relative_to_data", "resolve_stored"]


def relative_to_data(path: Path, data_dir: Path) -> str:
    """``path`` relative to ``data_dir`` when it lies inside it, else as given."""
    path, data_dir = Path(path), Path(data_dir)
    if path.is_absolute() and data_dir.is_absolute() and ".." not in path.parts:
        # A spool path is built from the data folder: no file system walk needed to relate the two.
        try:
            return str(path.relative_to(data_dir))
        except ValueError:
            pass
    try:
        return str(Path(path).resolve().relative_to(Path(data_dir).resolve()))
    except ValueError:
        return str(path)


def resolve_stored(data_dir: Path, stored: str) -> Path:
    """The file a row's path names on this node."""
    path = Path(stored)
    return path if path.is_absolute() else Path(data_dir) / path
