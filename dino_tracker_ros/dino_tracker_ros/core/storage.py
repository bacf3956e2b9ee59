"""Atomic files and memory-mapped arrays: the only way the core writes to disk.

Every writer creates a temporary sibling and renames it into place, so a reader (or a
process restarted after ``kill -9``) sees either the old file or the complete new one.
Large tensors go to ``.npy`` files opened as memory maps, so RAM does not grow with
clip length.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

__all__ = [
    "atomic_dir",
    "atomic_path",
    "create_array",
    "open_array",
    "read_json",
    "write_bytes_atomic",
    "write_json_atomic",
]

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) files; published files get the usual modes.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success rename it to ``path``.

    Args:
        path: the final directory; must not exist unless ``overwrite``.
        overwrite: replace an existing directory (the old one is removed after the rename).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(str(path))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        os.chmod(tmp, _DIR_MODE)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _ArrayWriter:
    """A ``.npy`` memory map being filled; :meth:`commit` renames it into place."""

    def __init__(self, path: Path, shape: Sequence[int], dtype: Any) -> None:
        self.path = path
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.array = np.lib.format.open_memmap(
            self.tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(int(s) for s in shape)
        )

    def commit(self) -> None:
        self.array.flush()
        del self.array
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(self.tmp, _FILE_MODE)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        with contextlib.suppress(AttributeError):
            del self.array
        with contextlib.suppress(OSError):
            self.tmp.unlink()


@contextlib.contextmanager
def create_array(path: PathLike, shape: Sequence[int], dtype: Any) -> Iterator[np.memmap]:
    """Create a ``.npy`` file as a writable memory map and publish it atomically on exit.

    Example::

        with create_array(dir / "features.npy", (T, C, h, w), np.float16) as feats:
            for t in range(T):
                feats[t] = compute(t)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _ArrayWriter(path, shape, dtype)
    try:
        yield writer.array
    except BaseException:
        writer.abort()
        raise
    writer.commit()


def open_array(path: PathLike, mode: str = "r") -> np.ndarray:
    """Open a ``.npy`` file as a read-only memory map (``mode='r'``) or read it (``mode=''``)."""
    if mode:
        return np.load(path, mmap_mode=mode)
    return np.load(path)


def save_torch_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` atomically (checkpoints stay readable after ``kill -9``)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_optional_json(path: PathLike) -> Any | None:
    """Read a JSON file, or return ``None`` when it does not exist."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


__all__ += ["load_optional_json", "save_torch_atomic"]
