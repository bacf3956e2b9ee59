"""Atomic storage helpers and coordinate conventions."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dino_tracker_ros.core.geometry import GridGeometry, rescale_points, working_size
from dino_tracker_ros.core.storage import (
    atomic_dir,
    create_array,
    open_array,
    read_json,
    write_json_atomic,
)


def test_create_array_is_atomic(tmp_path):
    path = tmp_path / "a.npy"
    with create_array(path, (3, 4), np.float16) as arr:
        arr[:] = 1.5
        assert not path.exists()
    assert open_array(path).dtype == np.float16
    assert float(open_array(path).sum()) == 18.0
    with pytest.raises(RuntimeError), create_array(path, (2,), np.int32) as arr:
        arr[:] = 7
        raise RuntimeError("killed")
    assert open_array(path).shape == (3, 4)  # the old file survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_atomic_dir_and_json(tmp_path):
    target = tmp_path / "clip"
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "x").write_text("partial")
        raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        write_json_atomic(tmp / "meta.json", {"a": 1})
    assert read_json(target / "meta.json") == {"a": 1}
    with pytest.raises(FileExistsError), atomic_dir(target):
        pass


def test_atomic_dir_flushes_every_file_before_the_rename(tmp_path, monkeypatch):
    """Each file's data (and each directory) is fsynced before the directory appears."""
    before_rename: set[int] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the real fsync, recording what it flushed before the rename
        real_fsync(fd)
        if not (tmp_path / "clip").exists():
            before_rename.add(os.fstat(fd).st_ino)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_dir(tmp_path / "clip") as tmp:
        (tmp / "frames").mkdir()
        for k in range(3):
            (tmp / "frames" / f"{k:06d}.png").write_bytes(b"x" * 1000 * (k + 1))
        (tmp / "clip.json").write_text("{}")
    inodes = {p.stat().st_ino for p in (tmp_path / "clip").rglob("*")}
    inodes.add((tmp_path / "clip").stat().st_ino)
    assert len(inodes) == 6 and inodes <= before_rename, "not flushed before the rename"


def test_working_size_tiles_the_token_grid():
    assert working_size((480, 854), 476, 854, 7) == (476, 854)
    h, w = working_size((480, 640), 224, 0, 7)
    assert (h - 14) % 7 == 0 and (w - 14) % 7 == 0
    assert abs(w / h - 640 / 480) < 0.05
    assert GridGeometry(476, 854, 7).grid_hw == (67, 121)  # METHOD.md's grid


def test_rescale_points_pixel_centres():
    pts = np.array([[-0.5, -0.5], [99.5, 49.5], [10.0, 20.0]])
    out = rescale_points(pts, (50, 100), (100, 200))
    np.testing.assert_allclose(out[0], [-0.5, -0.5])
    np.testing.assert_allclose(out[1], [199.5, 99.5])
    np.testing.assert_allclose(rescale_points(out, (100, 200), (50, 100)), pts)


def test_grid_normalisation_round_trip_and_sampling():
    g = GridGeometry(112, 140, 14)
    centres = torch.from_numpy(g.token_centres())
    norm = g.pixel_to_norm(centres)
    assert torch.allclose(norm[0, 0], torch.tensor([-1.0, -1.0]))
    assert torch.allclose(norm[-1, -1], torch.tensor([1.0, 1.0]))
    assert torch.allclose(g.norm_to_pixel(norm), centres, atol=1e-4)
    # grid_sample at a token centre returns exactly that token
    h, w = g.grid_hw
    feats = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    out = torch.nn.functional.grid_sample(feats, norm[2:3, 3:4].reshape(1, 1, 1, 2),
                                          align_corners=True)
    assert out.item() == feats[0, 0, 2, 3].item()
