"""Reliability, disk errors (issue 7): real OS failures, no mocks.

Failures used (we run as root, so ``chmod`` does not stop writes):

* ``RLIMIT_FSIZE`` set in a child process (``resource.setrlimit`` before ``exec``, with
  ``SIGXFSZ`` ignored so the kernel returns ``EFBIG`` instead of killing it): a real
  "file too large" on any file system.
* a ``clip_dir`` whose parent is a regular file (``ENOTDIR``).
* a small ``tmpfs`` mount that fills up (``ENOSPC``) and a read-only bind mount (``EROFS``),
  where ``mount`` is permitted (root with ``CAP_SYS_ADMIN``); skipped elsewhere.

Each must give a one-line error (CLI: exit status 1, one stderr line, no traceback; library:
:class:`~dino_tracker_ros.core.errors.StorageError`), leave no clip or stage half-written,
leave no temporary behind, and leave the clips stored before byte-identical. A full disk
while a memory-mapped stage is written must be an error, not a ``SIGBUS`` that kills the
process (this is what it was before the arrays were preallocated).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from suite_helpers import temp_files, tree_hash

from dino_tracker_ros.core.clip import ClipWriter, clip_from_array, list_clips, open_clip
from dino_tracker_ros.core.config import load_config
from dino_tracker_ros.core.errors import DinoTrackerError, StorageError
from dino_tracker_ros.core.preprocess import preprocess_clip
from dino_tracker_ros.core.storage import (
    atomic_path,
    create_array,
    save_torch_atomic,
    write_bytes_atomic,
)
from dino_tracker_ros.core.trainer import train_status


def cli(*args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    """Run ``dino-tracker`` in a child, optionally under RLIMIT_FSIZE (bytes)."""

    def limit() -> None:
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    code = "import sys; from dino_tracker_ros.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, "--log-level", "error", *args],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)


def assert_one_line_exit_1(proc: subprocess.CompletedProcess, *words: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "clips"
    frames = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    clip_from_array(frames, root, "old", fps=10.0)
    return root


# -- RLIMIT_FSIZE (EFBIG) -------------------------------------------------------------------
def test_file_size_limit_while_importing_and_preprocessing(store, tmp_path):
    before = tree_hash(store)
    proc = cli("synth", str(store), "--clip-id", "new", "--frames", "6", "--height", "128",
               "--width", "128", fsize=20_000)
    line = assert_one_line_exit_1(proc, "file size limit", "new")
    assert [c.clip_id for c in list_clips(store)] == ["old"] and not temp_files(store)
    assert tree_hash(store) == before
    # the first stage's array (5 x 112 x 112 x 3 bytes) exceeds the limit when created
    proc = cli("train", str(store / "old"), "--profile", "tiny", "--random-backbone", "--quiet",
               fsize=100_000)
    line2 = assert_one_line_exit_1(proc, "file size limit", "frames.npy")
    assert not (store / "old" / "work" / "frames.npy").exists() and not temp_files(store)
    status = train_status(open_clip(store, "old"))
    assert status.state == "failed" and "file size limit" in status.message
    old = open_clip(store, "old")
    assert old.frame(4).shape == (64, 64, 3)
    print(f"EFBIG: {line} | {line2}")


# -- a parent that is a regular file (ENOTDIR) ----------------------------------------------
def test_clip_dir_below_a_regular_file(store, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file")
    proc = cli("synth", str(blocker / "clips"), "--clip-id", "x", "--frames", "3")
    line = assert_one_line_exit_1(proc, "not a directory")
    with pytest.raises(StorageError, match="not a directory"):
        ClipWriter(blocker / "clips", "x", fps=10.0).add(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(StorageError):
        write_bytes_atomic(blocker / "f.json", b"{}")
    assert blocker.read_text() == "I am a file"
    print(f"ENOTDIR: {line}")


def test_special_files_are_never_replaced(tmp_path):
    """atomic_path renames over its target; it must refuse a device node or a directory
    (``--out /dev/null`` as root would otherwise replace the device with a file)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (fifo, tmp_path):
        with pytest.raises(StorageError, match="not a regular file"), atomic_path(target) as t:
            t.write_bytes(b"x")
    assert fifo.exists() and not fifo.is_file()
    assert not temp_files(tmp_path)


# -- tmpfs (ENOSPC) and a read-only bind mount (EROFS) ---------------------------------------
def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount is not permitted here ({proc.stderr.strip()})")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Path]:
    """A 160 KiB tmpfs: room for a small clip, not for its preprocessing arrays."""
    path = tmp_path / f"tmpfs_{uuid.uuid4().hex[:6]}"
    path.mkdir()
    _mount("-t", "tmpfs", "-o", "size=160k", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


def test_full_disk(small_tmpfs, tmp_path):
    root = small_tmpfs / "clips"
    frames = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    clip_from_array(frames, root, "old", fps=10.0)  # ~62 KB of PNGs
    before = tree_hash(root)
    big = np.random.default_rng(2).integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(StorageError, match="disk is full") as info:
        clip_from_array(big, root, "new", fps=10.0)
    assert "\n" not in str(info.value)
    assert tree_hash(root) == before and not temp_files(small_tmpfs)
    with pytest.raises(StorageError, match="disk is full"):
        with create_array(root / "old" / "big.npy", (400_000,), np.uint8) as a:
            a[:] = 1
    with pytest.raises(StorageError, match="disk is full"):
        save_torch_atomic({"x": np.zeros(200_000, np.uint8)}, root / "old" / "x.pt")
    assert tree_hash(root) == before and not temp_files(small_tmpfs)
    # Filling a memory map on a full disk used to be SIGBUS (exit -7): now an error at once.
    code = ("import sys, numpy as np\n"
            "from dino_tracker_ros.core.storage import create_array\n"
            "try:\n"
            "    with create_array(sys.argv[1], (300_000,), np.uint8) as a:\n"
            "        a[:] = 7\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    child = subprocess.run([sys.executable, "-c", code, str(root / "f.npy")],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0 and child.stdout.startswith("StorageError"), child
    proc = cli("synth", str(root), "--clip-id", "new", "--frames", "20", "--height", "128",
               "--width", "128")
    line = assert_one_line_exit_1(proc, "disk is full")
    assert tree_hash(root) == before and not temp_files(small_tmpfs)
    assert open_clip(root, "old").frame(4).tolist() == frames[4].tolist()
    print(f"ENOSPC: {line} | {child.stdout.strip()}")


@pytest.fixture
def read_only_store(store, tmp_path) -> Iterator[Path]:
    """``store`` mounted read-only (bind mount) at another path."""
    view = tmp_path / f"ro_{uuid.uuid4().hex[:6]}"
    view.mkdir()
    _mount("--bind", str(store), str(view))
    try:
        _mount("-o", "remount,ro,bind", str(view))
        yield view
    finally:
        _umount(view)


def test_read_only_clip_directory(read_only_store, store):
    before = tree_hash(store)
    with pytest.raises(StorageError, match="read-only"):
        clip_from_array(np.zeros((3, 8, 8, 3), np.uint8), read_only_store, "new")
    proc = cli("synth", str(read_only_store), "--clip-id", "new", "--frames", "3")
    line = assert_one_line_exit_1(proc, "read-only")
    cfg = load_config(profile="tiny", device="cpu", overrides=["backbone.random_init=true"])
    with pytest.raises(StorageError, match="read-only") as info:
        preprocess_clip(open_clip(read_only_store, "old"), cfg)
    line2 = str(info.value)
    # reading still works
    clips = list_clips(read_only_store)
    assert [c.clip_id for c in clips] == ["old"] and clips[0].frame(0).shape == (64, 64, 3)
    assert train_status(clips[0]).state == "recorded"
    assert tree_hash(store) == before
    with pytest.raises(DinoTrackerError):
        open_clip(read_only_store, "new")
    print(f"EROFS: {line} | {line2}")
