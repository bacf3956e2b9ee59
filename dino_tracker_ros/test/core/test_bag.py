"""clip_from_bag: rosbag2 (MCAP, sqlite3) -> clip, and the image decoders it shares."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from dino_tracker_ros.core.bag import (
    ImageEncodingError,
    clip_from_bag,
    decode_compressed,
    decode_raw,
)
from dino_tracker_ros.core.clip import Clip, default_clip_id, list_clips
from dino_tracker_ros.core.errors import ClipError

TS = get_typestore(Stores.ROS2_JAZZY)
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
T0 = 1_700_000_000_123_456_789
PERIOD = 100_000_000  # 10 fps


def _frames(n: int, h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _header(stamp_ns: int, frame_id: str):
    Time = TS.types["builtin_interfaces/msg/Time"]
    Header = TS.types["std_msgs/msg/Header"]
    return Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id=frame_id)


def _raw_msg(rgb: np.ndarray, stamp_ns: int, encoding: str = "rgb8", pad: int = 0):
    h, w = rgb.shape[:2]
    if encoding == "bgr8":
        pix = rgb[:, :, ::-1]
    elif encoding == "mono8":
        pix = rgb[:, :, :1]
    elif encoding == "rgba8":
        pix = np.concatenate([rgb, np.full((h, w, 1), 7, np.uint8)], axis=2)
    else:
        pix = rgb
    rows = pix.reshape(h, -1)
    if pad:
        rows = np.concatenate([rows, np.zeros((h, pad), np.uint8)], axis=1)
    return TS.types[IMAGE](
        header=_header(stamp_ns, "cam_optical"), height=h, width=w, encoding=encoding,
        is_bigendian=0, step=rows.shape[1], data=np.ascontiguousarray(rows).reshape(-1),
    )


def _write_bag(path: Path, msgs: list, msgtype: str, plugin: StoragePlugin,
               topic: str = "/camera/image_raw") -> Path:
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conn = writer.add_connection(topic, msgtype, typestore=TS)
        other = writer.add_connection("/other", "std_msgs/msg/String", typestore=TS)
        for i, (stamp, msg) in enumerate(msgs):
            # Log times are later than the header stamps (transport delay): the header wins.
            writer.write(conn, stamp + 5_000_000, TS.serialize_cdr(msg, msgtype))
            if i == 0:
                text = TS.types["std_msgs/msg/String"](data="x")
                writer.write(other, stamp, TS.serialize_cdr(text, "std_msgs/msg/String"))
    return path


@pytest.mark.parametrize("plugin", [StoragePlugin.MCAP, StoragePlugin.SQLITE3])
def test_bag_roundtrip_exact_frames_and_stamps(tmp_path, plugin):
    frames = _frames(6)
    stamps = [T0 + i * PERIOD for i in range(6)]
    msgs = [(s, _raw_msg(f, s, pad=3 * (i % 2)))
            for i, (s, f) in enumerate(zip(stamps, frames, strict=True))]
    bag = _write_bag(tmp_path / "bag", msgs, IMAGE, plugin)
    clip = clip_from_bag(bag, tmp_path / "clips", "/camera/image_raw", "walk")
    assert isinstance(clip, Clip) and clip.clip_id == "walk"
    assert len(clip) == 6 and clip.size == (24, 32)
    assert list(clip.meta.stamps_ns) == stamps
    assert clip.meta.frame_id == "cam_optical"
    assert clip.meta.fps == pytest.approx(10.0)
    assert clip.meta.source.startswith("rosbag2:")
    assert clip.meta.source.endswith(":/camera/image_raw")
    for i in range(6):
        np.testing.assert_array_equal(clip.frame(i), frames[i])
    assert [c.clip_id for c in list_clips(tmp_path / "clips")] == ["walk"]


def test_window_stride_and_default_id(tmp_path):
    frames = _frames(20, 8, 8)
    stamps = [T0 + i * PERIOD for i in range(20)]
    msgs = [(s, _raw_msg(f, s, "bgr8")) for s, f in zip(stamps, frames, strict=True)]
    bag = _write_bag(tmp_path / "bag", msgs, IMAGE, StoragePlugin.MCAP)
    # start 0.5 s -> frame 5; duration 1.0 s -> frames 5..14; stride 3 -> 5, 8, 11, 14.
    clip = clip_from_bag(bag, tmp_path / "clips", "/camera/image_raw", start=0.5, duration=1.0,
                         stride=3)
    assert clip.clip_id == default_clip_id(stamps[5])
    assert list(clip.meta.stamps_ns) == [stamps[i] for i in (5, 8, 11, 14)]
    assert clip.meta.fps == pytest.approx(10.0 / 3)
    np.testing.assert_array_equal(clip.frame(3), frames[14])


def test_compressed_topic_sqlite(tmp_path):
    frames = _frames(3, 16, 20)
    msgs = []
    for i, f in enumerate(frames):
        ok, png = cv2.imencode(".png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        assert ok
        msgs.append((T0 + i * PERIOD, TS.types[COMPRESSED](
            header=_header(T0 + i * PERIOD, "cam"), format="rgb8; png compressed bgr8",
            data=png.reshape(-1))))
    bag = _write_bag(tmp_path / "bag", msgs, COMPRESSED, StoragePlugin.SQLITE3, "/cam/compressed")
    clip = clip_from_bag(bag, tmp_path / "clips", "/cam/compressed", "c1")
    assert len(clip) == 3
    for i in range(3):
        np.testing.assert_array_equal(clip.frame(i), frames[i])


def test_unstamped_headers_fall_back_to_log_time(tmp_path):
    frames = _frames(3, 8, 8)
    bag = _write_bag(tmp_path / "bag", [(T0 + i * PERIOD, _raw_msg(f, 0)) for i, f in
                                        enumerate(frames)], IMAGE, StoragePlugin.MCAP)
    clip = clip_from_bag(bag, tmp_path / "clips", "/camera/image_raw", "u")
    assert list(clip.meta.stamps_ns) == [T0 + i * PERIOD + 5_000_000 for i in range(3)]


def test_errors_are_clip_errors(tmp_path):
    frames = _frames(3, 8, 8)
    stamps = [T0 + i * PERIOD for i in range(3)]
    msgs = [(s, _raw_msg(f, s)) for s, f in zip(stamps, frames, strict=True)]
    bag = _write_bag(tmp_path / "bag", msgs, IMAGE, StoragePlugin.MCAP)
    root = tmp_path / "clips"
    with pytest.raises(ClipError, match="image topics there: /camera/image_raw"):
        clip_from_bag(bag, root, "/nope")
    with pytest.raises(ClipError, match="expected sensor_msgs"):
        clip_from_bag(bag, root, "/other")
    with pytest.raises(ClipError, match="no frames"):
        clip_from_bag(bag, root, "/camera/image_raw", start=10.0)
    with pytest.raises(ClipError, match="stride"):
        clip_from_bag(bag, root, "/camera/image_raw", stride=0)
    with pytest.raises(ClipError, match="duration"):
        clip_from_bag(bag, root, "/camera/image_raw", duration=-1.0)
    with pytest.raises(ClipError, match="invalid clip id"):
        clip_from_bag(bag, root, "/camera/image_raw", "../evil")
    with pytest.raises(ClipError, match="not found"):
        clip_from_bag(tmp_path / "missing", root, "/camera/image_raw")
    garbage = tmp_path / "bad.mcap"
    garbage.write_bytes(b"not an mcap file at all")
    with pytest.raises(ClipError, match="cannot read bag"):
        clip_from_bag(garbage, root, "/camera/image_raw")
    clip_from_bag(bag, root, "/camera/image_raw", "once")
    with pytest.raises(ClipError, match="already exists"):
        clip_from_bag(bag, root, "/camera/image_raw", "once")
    assert [c.clip_id for c in list_clips(root)] == ["once"]  # failures left nothing behind


def test_decode_raw_encodings():
    rgb = _frames(1, 5, 7)[0]
    np.testing.assert_array_equal(
        decode_raw("bgr8", 5, 7, 21, rgb[:, :, ::-1].tobytes()), rgb)
    rgba = np.concatenate([rgb, np.zeros((5, 7, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(decode_raw("rgba8", 5, 7, 28, rgba.tobytes()), rgb)
    np.testing.assert_array_equal(
        decode_raw("bgra8", 5, 7, 28, rgba[:, :, [2, 1, 0, 3]].tobytes()), rgb)
    mono = rgb[:, :, 0]
    np.testing.assert_array_equal(decode_raw("mono8", 5, 7, 7, mono.tobytes()),
                                  np.repeat(mono[:, :, None], 3, axis=2))
    m16 = np.array([[0, 257, 65535, 32896]], np.uint16)
    out = decode_raw("mono16", 1, 4, 8, m16.astype("<u2").tobytes())
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 128])
    out_be = decode_raw("mono16", 1, 4, 8, m16.astype(">u2").tobytes(), is_bigendian=True)
    np.testing.assert_array_equal(out_be, out)
    with pytest.raises(ImageEncodingError, match="unsupported image encoding 'yuv422'"):
        decode_raw("yuv422", 1, 4, 8, bytes(8))
    with pytest.raises(ImageEncodingError, match="malformed"):
        decode_raw("rgb8", 5, 7, 21, bytes(20))


def test_decode_compressed_grey_and_garbage():
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    ok, png = cv2.imencode(".png", grey)
    out = decode_compressed(png.tobytes())
    assert out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out[:, :, 1], grey)
    with pytest.raises(ImageEncodingError, match="cannot decode"):
        decode_compressed(b"\x00\x01garbage")
