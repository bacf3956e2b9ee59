"""Plain helper functions shared by test modules (``conftest.py`` puts this directory on
``sys.path``; fixtures stay in the conftest files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def tree_hash(root: Path) -> str:
    """Hash of every path and file content under ``root`` (symlinks by name only)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [d + "/" for d in dirnames]:
            path = Path(dirpath) / name.rstrip("/")
            h.update(str(path.relative_to(root)).encode() + b"\0")
            if path.is_file() and not path.is_symlink():
                h.update(path.read_bytes())
    return h.hexdigest()


def temp_files(root: Path) -> list[Path]:
    """The project's hidden ``.tmp`` files and directories anywhere under ``root``."""
    return [p for p in root.rglob(".*") if p.name.endswith(".tmp")]
