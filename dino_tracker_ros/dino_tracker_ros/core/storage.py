"""Atomic files and memory-mapped arrays: the only way the core writes to disk.

Every writer creates a temporary sibling and renames it into place, so a reader (or a
process restarted after ``kill -9``) sees either the old file or the complete new one.
Large tensors go to ``.npy`` files opened as memory maps, so RAM does not grow with
clip length.

Disk errors (full disk, read-only file system, no permission, file size limit, a parent
that is not a directory) raise :class:`~.errors.StorageError` with one line naming the path,
the reason and what to do; the temporary file is removed and the destination is left as it
was. Memory-mapped arrays are preallocated (``posix_fallocate``), so a full disk is an error
when the array is created, not a ``SIGBUS`` that kills the process while it is filled.

Temporary names are ``.<name>.<host>-<pid>.<random>.tmp`` (``<host>``: 8 hex digits of a
hash of the host name); :func:`sweep_temps` removes those whose process on this host is
gone (left behind by ``kill -9``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from .errors import StorageError

__all__ = [
    "atomic_dir",
    "atomic_path",
    "create_array",
    "disk_error",
    "is_disk_error",
    "open_array",
    "read_json",
    "sweep_temps",
    "temp_file",
    "write_bytes_atomic",
    "write_json_atomic",
]

PathLike = Union[str, "os.PathLike[str]"]

#: errno values that mean "this location cannot take the write" (not a bug, not a race).
_DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full: free space or choose another clip_dir",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another clip_dir",
    errno.EROFS: "the file system is read-only: remount it writable or choose another clip_dir",
    errno.EACCES: "no permission: make the directory writable or choose another clip_dir",
    errno.EPERM: "not permitted: make the directory writable or choose another clip_dir",
    errno.EFBIG: "the file size limit was reached (ulimit -f): raise it or store less",
    errno.EIO: "the disk reported an I/O error: check the device",
    errno.ENOTDIR: "a parent of it is not a directory: check clip_dir",
    errno.ENAMETOOLONG: "the path is too long: use a shorter clip_dir or clip id",
}
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TMP_RE = re.compile(r"^\..+\.([0-9a-f]{8})-([0-9]+)\.[A-Za-z0-9_]+\.tmp$")


def disk_error(path: PathLike, exc: OSError) -> StorageError:
    """A one-line :class:`StorageError` for an :class:`OSError` met while writing ``path``."""
    hint = _DISK_ERRNOS.get(exc.errno or -1, "check the disk and clip_dir")
    reason = exc.strerror or str(exc).splitlines()[0] or type(exc).__name__
    err = StorageError(f"cannot write {path}: {reason}; {hint}")
    err.errno = exc.errno
    return err


def is_disk_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an :class:`OSError` saying a location cannot take a write (full,
    read-only, no permission, size limit, ...), not yet turned into a StorageError."""
    return (isinstance(exc, OSError) and not isinstance(exc, StorageError)
            and exc.errno in _DISK_ERRNOS)


def _tmp_prefix(name: str) -> str:
    return f".{name}.{_HOST}-{os.getpid()}."


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # the parent (or an ancestor) is a regular file
        raise disk_error(path, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))) from exc
    except OSError as exc:
        raise disk_error(path, exc) from None


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


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk, then the directories (deepest first).

    Before a directory is renamed into place its files' data must be on disk too: a
    directory entry alone survives a power cut with empty or short files behind it.
    """
    for dirpath, _dirs, files in sorted(os.walk(root), key=lambda e: -len(e[0])):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.

    Raises:
        StorageError: the file cannot be written (also for a disk error in the caller's block).
    """
    path = Path(path)
    _make_parent(path)
    if os.path.lexists(path) and not path.is_file():  # never rename over /dev/null, a dir
        raise StorageError(f"cannot write {path}: it exists and is not a regular file; "
                           "choose a file path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise disk_error(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if is_disk_error(exc):
            raise disk_error(path, exc) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success flush it to disk (files and
    directories) and rename it to ``path``.

    Args:
        path: the final directory; must not exist unless ``overwrite``.
        overwrite: replace an existing directory. On Linux the two are exchanged in one
            step (``renameat2(RENAME_EXCHANGE)``), so a crash leaves the old or the new one
            in place, never neither; the old one is removed afterwards.

    Raises:
        FileExistsError: ``path`` exists (also when another process created it meanwhile)
            and ``overwrite`` is false; the temporary directory is removed.
        StorageError: the directory cannot be written.
    """
    path = Path(path)
    _make_parent(path)
    if path.exists() and not overwrite:
        raise FileExistsError(str(path))
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path.name), suffix=".tmp",
                                    dir=path.parent))
    except OSError as exc:
        raise disk_error(path, exc) from None
    try:
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, _DIR_MODE)
        if overwrite and path.exists():
            _swap_in(tmp, path)
        else:
            try:
                os.rename(tmp, path)  # fails on a non-empty directory: never replaces a clip
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FileExistsError(str(path)) from None
                raise
        _fsync_dir(path.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_error(exc):
            raise disk_error(path, exc) from None
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """Put directory ``tmp`` at ``path`` (which exists) and delete the old ``path``."""
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # holds the old directory now
        return
    old = path.with_name(f"{_tmp_prefix(path.name)}old.tmp")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
    """A ``.npy`` memory map being filled; :meth:`commit` renames it into place.

    The file is preallocated, so a full disk raises here instead of ``SIGBUS`` later.
    """

    def __init__(self, path: Path, shape: Sequence[int], dtype: Any) -> None:
        self.path = path
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        try:
            self.array = np.lib.format.open_memmap(
                self.tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(int(s) for s in shape)
            )
            _preallocate(self.tmp)
        except BaseException:
            self.abort()
            raise

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


def _preallocate(path: Path) -> None:
    """Reserve the disk blocks of ``path``'s current size (where the OS supports it)."""
    size = path.stat().st_size
    if not size or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def create_array(path: PathLike, shape: Sequence[int], dtype: Any) -> Iterator[np.memmap]:
    """Create a ``.npy`` file as a writable memory map and publish it atomically on exit.

    Example::

        with create_array(dir / "features.npy", (T, C, h, w), np.float16) as feats:
            for t in range(T):
                feats[t] = compute(t)

    Raises:
        StorageError: the file cannot be created or preallocated (e.g. the disk is full).
    """
    path = Path(path)
    _make_parent(path)
    try:
        writer = _ArrayWriter(path, shape, dtype)
    except OSError as exc:
        if is_disk_error(exc):
            raise disk_error(path, exc) from None
        raise
    try:
        yield writer.array
    except BaseException:
        writer.abort()
        raise
    try:
        writer.commit()
    except BaseException as exc:
        writer.abort()
        if is_disk_error(exc):
            raise disk_error(path, exc) from None
        raise


def open_array(path: PathLike, mode: str = "r") -> np.ndarray:
    """Open a ``.npy`` file as a read-only memory map (``mode='r'``) or read it (``mode=''``)."""
    if mode:
        return np.load(path, mmap_mode=mode)
    return np.load(path)


def save_torch_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` atomically (checkpoints stay readable after ``kill -9``).

    The object is serialised in memory first, so a disk error surfaces as a
    :class:`StorageError` with its real reason (torch's own writer reports only a position).
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())


def load_optional_json(path: PathLike) -> Any | None:
    """Read a JSON file, or return ``None`` when it does not exist."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


def temp_file(directory: PathLike, name: str) -> Path:
    """Create an empty scratch file in ``directory`` named so that :func:`sweep_temps` can
    remove it if this process dies; the caller deletes it when done."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(name), suffix=".tmp", dir=directory)
    except OSError as exc:
        raise disk_error(Path(directory) / name, exc) from None
    os.close(fd)
    return Path(tmp)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but not ours (EPERM), or unknown: keep its files
    return True


def sweep_temps(directory: PathLike) -> list[Path]:
    """Remove the temporary files and directories in ``directory`` (not recursive) that a
    process of this host left behind when it died (``kill -9``, power loss).

    Temporaries of live processes, of other hosts (shared storage) and every other entry
    are kept. Returns the removed paths.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m is None or m.group(1) != _HOST or _pid_alive(int(m.group(2))):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        if not os.path.lexists(path):
            removed.append(path)
    return removed


__all__ += ["load_optional_json", "save_torch_atomic"]
