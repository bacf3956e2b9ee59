"""Clip format: round trips, atomic writes, loaders, ids and paths (real files in tmp_path)."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone

import cv2
import numpy as np
import pytest

from dino_tracker_ros.core.clip import (
    CLIP_FORMAT,
    Clip,
    ClipMeta,
    ClipWriter,
    clip_from_array,
    clip_from_frames_dir,
    clip_from_video,
    default_clip_id,
    list_clips,
    open_clip,
    resolve_clip_path,
    validate_clip_id,
    write_clip,
)
from dino_tracker_ros.core.errors import ClipError, QueryError


def _frames(t: int = 5, h: int = 30, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_round_trip_is_pixel_exact_with_stamps(tmp_path):
    frames = _frames()
    stamps = [1_000, 2_000, 3_500, 7_000, 7_001]
    clip = write_clip(tmp_path, "walk", frames, fps=12.5, stamps_ns=stamps, frame_id="cam0",
                      source="unit test")
    again = open_clip(tmp_path, "walk")
    assert again.path == clip.path == tmp_path.absolute() / "walk"
    assert len(again) == 5 and again.size == (30, 40) and again.clip_id == "walk"
    assert again.meta.fps == 12.5 and again.meta.frame_id == "cam0"
    assert again.meta.source == "unit test" and again.meta.encoding == "png"
    assert again.stamps_ns.dtype == np.int64 and again.stamps_ns.tolist() == stamps
    for i in range(5):
        np.testing.assert_array_equal(again.frame(i), frames[i])
    assert again.meta.created.endswith("Z")
    assert again.work_dir == clip.path / "work" and again.model_dir == clip.path / "model"
    assert again.cache_dir == clip.path / "cache"
    # clip.json is plain JSON in the documented format
    data = json.loads((clip.path / "clip.json").read_text())
    assert data["format"] == CLIP_FORMAT and data["width"] == 40 and data["height"] == 30
    assert ClipMeta.from_dict(data) == again.meta


def test_read_frames_streams_and_resizes_with_inter_area(tmp_path):
    frames = _frames(3, 40, 60)
    clip = clip_from_array(frames, tmp_path, "arr", fps=5.0)
    got = list(clip.read_frames(indices=[2, 0], size=(20, 30)))
    assert [g.shape for g in got] == [(20, 30, 3)] * 2
    np.testing.assert_array_equal(got[0], cv2.resize(frames[2], (30, 20),
                                                     interpolation=cv2.INTER_AREA))
    same = list(clip.read_frames())
    assert len(same) == 3
    np.testing.assert_array_equal(same[1], frames[1])


def test_default_stamps_are_index_over_fps_and_channels_are_converted(tmp_path):
    gray = np.arange(20 * 10, dtype=np.uint8).reshape(20, 10)
    rgba = np.dstack([_frames(1, 20, 10)[0], np.full((20, 10), 7, np.uint8)])
    with ClipWriter(tmp_path, "conv", fps=4.0) as w:
        w.add(gray)
        w.add(gray[:, :, None])
        w.add(rgba)
    clip = w.clip
    assert clip.stamps_ns.tolist() == [0, 250_000_000, 500_000_000]
    np.testing.assert_array_equal(clip.frame(0), np.dstack([gray] * 3))
    np.testing.assert_array_equal(clip.frame(1), np.dstack([gray] * 3))
    np.testing.assert_array_equal(clip.frame(2), rgba[:, :, :3])


def test_writer_rejects_bad_frames_and_stamps(tmp_path):
    with ClipWriter(tmp_path, "bad", fps=10.0) as w:
        w.add(_frames(1)[0], 100)
        with pytest.raises(ClipError, match="same size"):
            w.add(_frames(1, 31, 40)[0], 200)
        with pytest.raises(ClipError, match="uint8"):
            w.add(_frames(1)[0].astype(np.float32), 200)
        with pytest.raises(ClipError):
            w.add(np.zeros((30, 40, 2), np.uint8), 200)
        with pytest.raises(ClipError, match="increase"):
            w.add(_frames(1)[0], 100)
        w.add(_frames(1)[0])  # default stamp: one period after the last explicit one
    assert w.clip.stamps_ns.tolist() == [100, 100 + 100_000_000]


def test_empty_clip_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(ClipError, match="no frames"):
        with ClipWriter(tmp_path, "empty", fps=10.0):
            pass
    assert os.listdir(tmp_path) == []


def test_exception_inside_writer_leaves_no_clip_and_no_temp_dir(tmp_path):
    with pytest.raises(RuntimeError):
        with ClipWriter(tmp_path, "boom", fps=10.0) as w:
            w.add(_frames(1)[0])
            w.add(_frames(1)[0])
            assert len(os.listdir(tmp_path)) == 1  # the temporary dot-directory
            raise RuntimeError("camera unplugged")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ClipError, match="unknown clip id 'boom'"):
        open_clip(tmp_path, "boom")


def test_reader_never_sees_a_half_written_clip(tmp_path):
    write_clip(tmp_path, "done", _frames(2), fps=10.0)
    w = ClipWriter(tmp_path, "partial", fps=10.0)
    w.add(_frames(1)[0])
    staging = w.staging_dir
    assert staging.name.startswith(".") and staging.parent == tmp_path
    assert [c.clip_id for c in list_clips(tmp_path)] == ["done"]
    with pytest.raises(ClipError):
        open_clip(tmp_path, "partial")
    clip = w.commit()
    assert not staging.exists()
    assert [c.clip_id for c in list_clips(tmp_path)] == ["done", "partial"]
    assert len(clip) == 1


def test_abort_removes_everything(tmp_path):
    w = ClipWriter(tmp_path, "gone", fps=10.0)
    w.add(_frames(1)[0])
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ClipError):
        w.add(_frames(1)[0])


def test_existing_clip_needs_overwrite(tmp_path):
    write_clip(tmp_path, "c", _frames(2), fps=10.0)
    with pytest.raises(ClipError, match="already exists"):
        write_clip(tmp_path, "c", _frames(3), fps=10.0)
    assert len(open_clip(tmp_path, "c")) == 2
    write_clip(tmp_path, "c", _frames(3, seed=1), fps=10.0, overwrite=True)
    clip = open_clip(tmp_path, "c")
    assert len(clip) == 3
    np.testing.assert_array_equal(clip.frame(2), _frames(3, seed=1)[2])
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_jpg_encoding_is_close(tmp_path):
    frames = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, None, :, None], 48, 1)
    frames = np.repeat(np.repeat(frames, 3, 3), 2, 0)
    clip = write_clip(tmp_path, "j", frames, fps=10.0, encoding="jpg")
    assert clip.frame_path(0).suffix == ".jpg"
    assert np.abs(clip.frame(1).astype(int) - frames[1]).mean() < 3.0


def test_open_errors(tmp_path):
    clip = write_clip(tmp_path, "x", _frames(3), fps=10.0)
    with pytest.raises(QueryError):
        clip.frame(3)
    with pytest.raises(QueryError):
        clip.frame(-1)
    (clip.path / "frames" / "000001.png").write_bytes(b"not a png")
    with pytest.raises(ClipError, match="unreadable"):
        clip.frame(1)
    (clip.path / "frames" / "000002.png").unlink()
    with pytest.raises(ClipError, match="misses 1 of 3"):
        Clip.open(clip.path)
    with pytest.raises(ClipError, match="not a clip"):
        Clip.open(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "clip.json").write_text(json.dumps({"format": "other/2"}))
    with pytest.raises(ClipError, match="not a dino_tracker clip"):
        Clip.open(foreign)
    (foreign / "clip.json").write_text("{broken")
    with pytest.raises(ClipError, match="cannot read"):
        Clip.open(foreign)


@pytest.mark.parametrize("change", [
    {"stamps_ns": [2, 1]}, {"num_frames": 0}, {"fps": -1.0}, {"encoding": "gif"},
    {"width": "40"}, {"clip_id": "../up"}, {"stamps_ns": [1, 2, 3]},
])
def test_meta_validation(change):
    good = {"format": CLIP_FORMAT, "clip_id": "m", "num_frames": 2, "width": 4, "height": 3,
            "fps": 10.0, "stamps_ns": [1, 2]}
    ClipMeta.from_dict(good)
    with pytest.raises(ClipError):
        ClipMeta.from_dict({**good, **change})


def test_list_clips_sorted_by_first_stamp_and_skips_malformed(tmp_path, caplog):
    assert list_clips(tmp_path / "missing") == []
    write_clip(tmp_path, "b_late", _frames(1), fps=1.0, stamps_ns=[500])
    write_clip(tmp_path, "a_later", _frames(1), fps=1.0, stamps_ns=[900])
    write_clip(tmp_path, "z_early", _frames(1), fps=1.0, stamps_ns=[100])
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "clip.json").write_text("[]")
    (tmp_path / ".tmp_hidden").mkdir()
    (tmp_path / "not_a_clip").mkdir()
    with caplog.at_level(logging.WARNING):
        ids = [c.clip_id for c in list_clips(tmp_path)]
    assert ids == ["z_early", "b_late", "a_later"]
    assert any("broken" in r.getMessage() for r in caplog.records)


def _write_video(path, frames, fps):
    h, w = frames.shape[1:3]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened()
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()


def _smooth_frames(t, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(t):
        r = (xx * 3 + i * 10) % 256
        g = (yy * 4) % 256
        b = np.full_like(xx, 40 + 15 * i) % 256
        out.append(np.dstack([r, g, b]).astype(np.uint8))
    return np.stack(out)


def test_clip_from_video(tmp_path):
    frames = _smooth_frames(12, 48, 64)
    video = tmp_path / "my video.avi"
    _write_video(video, frames, 15.0)
    root = tmp_path / "clips"
    clip = clip_from_video(video, root)
    assert clip.clip_id == "my_video"
    assert len(clip) == 12 and clip.size == (48, 64) and clip.meta.fps == pytest.approx(15.0)
    np.testing.assert_array_equal(clip.stamps_ns, np.round(np.arange(12) * 1e9 / 15.0))
    for i in (0, 5, 11):  # MJPG is lossy but close; RGB order preserved
        assert np.abs(clip.frame(i).astype(int) - frames[i]).mean() < 6.0
    sub = clip_from_video(video, root, "sub", start=3, max_frames=4, stride=2)
    assert len(sub) == 4 and sub.meta.fps == pytest.approx(7.5)
    np.testing.assert_array_equal(sub.stamps_ns, np.round(np.array([3, 5, 7, 9]) * 1e9 / 15.0))
    assert np.abs(sub.frame(1).astype(int) - frames[5]).mean() < 6.0
    assert np.abs(sub.frame(1).astype(int) - frames[4]).mean() > 6.0
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ClipError):
        clip_from_video(junk, root, "junk")
    with pytest.raises(ClipError):
        clip_from_video(tmp_path / "missing.avi", root, "missing")
    assert sorted(c.clip_id for c in list_clips(root)) == ["my_video", "sub"]


def test_clip_from_frames_dir(tmp_path):
    frames = _frames(11, 20, 24)
    src = tmp_path / "imgs"
    src.mkdir()
    for i, f in enumerate(frames):  # natural order: img_2 before img_10
        ext = ".png" if i % 2 else ".bmp"
        cv2.imwrite(str(src / f"img_{i}{ext}"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    (src / "notes.txt").write_text("ignored")
    clip = clip_from_frames_dir(src, tmp_path / "clips", fps=25.0)
    assert clip.clip_id == "imgs" and len(clip) == 11 and clip.meta.fps == 25.0
    for i in range(11):
        np.testing.assert_array_equal(clip.frame(i), frames[i])
    strided = clip_from_frames_dir(src, tmp_path / "clips", "s", stride=3, max_frames=3)
    assert len(strided) == 3
    np.testing.assert_array_equal(strided.frame(2), frames[6])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ClipError, match="no images"):
        clip_from_frames_dir(empty, tmp_path / "clips", "e")


@pytest.mark.parametrize("bad", ["../x", "", "a/b", ".hidden", "a..b", "x" * 129, "-a",
                                 "a b", "..", "/abs", "a\\b", None, 5])
def test_validate_clip_id_rejects(bad):
    with pytest.raises(ClipError, match="A-Z a-z 0-9"):
        validate_clip_id(bad)


@pytest.mark.parametrize("good", ["walk_01", "a.b-c", "X", "x" * 128, "clip_20261123T230000_123"])
def test_validate_clip_id_accepts(good):
    assert validate_clip_id(good) == good


def test_resolve_clip_path_never_escapes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for cid in ["../x", "a/../../b", "/etc", "..", "a/b", ".", "~"]:
        with pytest.raises(ClipError):
            resolve_clip_path(root, cid)
    assert resolve_clip_path(root, "ok").parent == root.absolute()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(ClipError, match="outside"):
        resolve_clip_path(root, "link")


def test_default_clip_id():
    stamp = 1_795_129_200_123_456_789
    dt = datetime.fromtimestamp(stamp // 10**9, tz=timezone.utc)
    assert default_clip_id(stamp) == f"clip_{dt:%Y%m%dT%H%M%S}_123"
    assert validate_clip_id(default_clip_id()).startswith("clip_")
