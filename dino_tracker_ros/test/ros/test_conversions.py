"""Messages <-> arrays (no DDS traffic): images, stamps, trajectories, markers, buffer."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image
from visualization_msgs.msg import Marker

from dino_tracker_msgs.msg import ClipInfo, QueryPoint
from dino_tracker_ros.core.bag import ImageEncodingError, decode_raw
from dino_tracker_ros.core.clip import write_clip
from dino_tracker_ros.ros.conversions import (
    ImageConverter,
    clip_info,
    ns_to_stamp,
    queries_from_msg,
    rgb_to_image,
    stamp_to_ns,
    trajectory_array,
)
from dino_tracker_ros.ros.markers import track_markers
from dino_tracker_ros.ros.recorder import BufferedFrame, FrameBuffer

RNG = np.random.default_rng(3)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def _image(pix: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False) -> Image:
    h, w = pix.shape[:2]
    rows = pix.reshape(h, -1).view(np.uint8) if pix.dtype != np.uint8 else pix.reshape(h, -1)
    if pad:
        rows = np.concatenate([rows, np.full((h, pad), 255, np.uint8)], axis=1)
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian),
                step=rows.shape[1])
    msg.data = np.ascontiguousarray(rows).tobytes()
    return msg


@pytest.mark.parametrize("encoding,pix", [
    ("rgb8", RGB), ("bgr8", RGB[:, :, ::-1]), ("mono8", RGB[:, :, 0]),
    ("rgba8", np.dstack([RGB, np.full((5, 7), 9, np.uint8)])),
    ("bgra8", np.dstack([RGB[:, :, ::-1], np.full((5, 7), 9, np.uint8)])),
])
@pytest.mark.parametrize("pad", [0, 5])
def test_image_to_rgb_matches_bag_decoder(encoding, pix, pad):
    msg = _image(np.ascontiguousarray(pix), encoding, pad)
    out = ImageConverter().to_rgb(msg)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    # the recorder (cv_bridge) and the bag importer (numpy) store identical frames
    np.testing.assert_array_equal(
        out, decode_raw(encoding, 5, 7, msg.step, bytes(msg.data), False))
    if encoding != "mono8":
        np.testing.assert_array_equal(out, RGB)


def test_mono16_scaled_and_big_endian():
    mono = np.array([[0, 257, 65535, 32896]], np.uint16)
    little = ImageConverter().to_rgb(_image(mono.astype("<u2"), "mono16"))
    big = ImageConverter().to_rgb(_image(mono.astype(">u2"), "mono16", bigendian=True))
    np.testing.assert_array_equal(little[0, :, 0], [0, 1, 255, 128])
    np.testing.assert_array_equal(big, little)


def test_unsupported_and_malformed_images_raise():
    conv = ImageConverter()
    with pytest.raises(ImageEncodingError, match="unsupported image encoding 'yuv422'"):
        conv.to_rgb(Image(height=2, width=2, encoding="yuv422", step=4, data=bytes(8)))
    with pytest.raises(ImageEncodingError, match="malformed"):
        conv.to_rgb(Image(height=5, width=7, encoding="rgb8", step=21, data=bytes(10)))
    with pytest.raises(ImageEncodingError, match="cannot decode"):
        conv.compressed_to_rgb(CompressedImage(format="jpeg", data=b"garbage"))


def test_compressed_png_roundtrip():
    ok, png = cv2.imencode(".png", cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR))
    msg = CompressedImage(format="rgb8; png compressed bgr8", data=png.tobytes())
    np.testing.assert_array_equal(ImageConverter.compressed_to_rgb(msg), RGB)


def test_stamps_and_rgb_image():
    ns = 1_700_000_001_999_999_999
    assert stamp_to_ns(ns_to_stamp(ns)) == ns
    msg = rgb_to_image(RGB, ns, "cam")
    assert (msg.width, msg.height, msg.encoding, msg.step) == (7, 5, "rgb8", 21)
    assert msg.header.frame_id == "cam" and stamp_to_ns(msg.header.stamp) == ns
    np.testing.assert_array_equal(ImageConverter().to_rgb(msg), RGB)


def test_trajectory_array_and_clip_info(tmp_path):
    stamps = [10**18 + k * 33_000_000 for k in range(4)]
    clip = write_clip(tmp_path, "c", [RGB] * 4, fps=30.0, stamps_ns=stamps, frame_id="cam")
    info = clip_info(clip, ClipInfo.STATE_READY, "ok")
    assert (info.clip_id, info.num_frames, info.width, info.height, info.state) == \
        ("c", 4, 7, 5, ClipInfo.STATE_READY)
    assert info.header.frame_id == "cam" and stamp_to_ns(info.header.stamp) == stamps[0]
    q = queries_from_msg([QueryPoint(frame=1, x=2.5, y=3.0), QueryPoint(frame=0, x=0.0, y=4.0)])
    np.testing.assert_array_equal(q, [[1, 2.5, 3.0], [0, 0.0, 4.0]])
    tracks = RNG.uniform(0, 5, (2, 4, 2)).astype(np.float32)
    vis = np.array([[True, False, True, True], [True, True, False, False]])
    score = vis * 0.9 + 0.05
    msg = trajectory_array(clip, q, tracks, vis, score)
    assert msg.clip_id == "c" and (msg.width, msg.height) == (7, 5)
    assert msg.header.frame_id == "cam" and stamp_to_ns(msg.header.stamp) == stamps[0]
    assert [t.id for t in msg.trajectories] == [0, 1]
    assert msg.trajectories[0].query.frame == 1 and msg.trajectories[0].query.x == 2.5
    for i, traj in enumerate(msg.trajectories):
        assert [stamp_to_ns(p.stamp) for p in traj.points] == stamps
        np.testing.assert_allclose([[p.x, p.y] for p in traj.points], tracks[i])
        assert [p.visible for p in traj.points] == vis[i].tolist()
        np.testing.assert_allclose([p.visibility for p in traj.points], score[i], rtol=1e-6)


def test_fast_message_building_equals_the_constructors(tmp_path, monkeypatch):
    from rclpy.serialization import deserialize_message, serialize_message

    import dino_tracker_ros.ros.conversions as conv
    import dino_tracker_ros.ros.markers as mk
    from dino_tracker_msgs.msg import TrackPoint, TrajectoryArray

    stamps = [10**18 + k * 33_000_000 for k in range(6)]
    clip = write_clip(tmp_path, "c", [RGB] * 6, fps=30.0, stamps_ns=stamps, frame_id="cam")
    q = np.array([[1, 2.5, 3.0], [0, 0.0, 4.0], [5, 6.0, 1.0]])
    tracks = RNG.uniform(0, 5, (3, 6, 2)).astype(np.float32)
    vis = RNG.random((3, 6)) > 0.4
    score = RNG.random((3, 6)).astype(np.float32)
    assert conv._FAST_TRACK_POINT and mk._FAST_POINT and mk._FAST_COLOUR  # rclpy's layout
    fast = conv.trajectory_array(clip, q, tracks, vis, score)
    fast_markers = track_markers(tracks, vis, score, frame_id="cam", image_size=(5, 7),
                                 scale=0.01)
    for module, flag in ((conv, "_FAST_TRACK_POINT"), (mk, "_FAST_POINT"),
                         (mk, "_FAST_COLOUR")):
        monkeypatch.setattr(module, flag, False)
    plain = conv.trajectory_array(clip, q, tracks, vis, score)
    assert fast == plain
    assert deserialize_message(serialize_message(fast), TrajectoryArray) == plain
    assert fast_markers == track_markers(tracks, vis, score, frame_id="cam", image_size=(5, 7),
                                         scale=0.01)
    sample = {"stamp": ns_to_stamp(5), "x": 1.0, "y": 2.0, "visible": False,
              "visibility": 0.25}
    assert conv.fills_slots(TrackPoint, sample)
    assert not conv.fills_slots(TrackPoint, {**sample, "extra": 1})
    assert not conv.fills_slots(QueryPoint, sample)
    monkeypatch.setenv("ROS_PYTHON_CHECK_FIELDS", "1")  # checks asked for: the constructors
    assert not conv.fills_slots(TrackPoint, sample)


def test_markers_layout():
    tracks = np.array([[[0.0, 0.0], [10.0, 20.0], [30.0, 40.0]],
                       [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]])
    vis = np.array([[True, True, False], [True, False, False]])
    score = np.array([[1.0, 0.6, 0.1], [0.9, 0.2, 0.0]])
    arr = track_markers(tracks, vis, score, frame_id="cam", image_size=(48, 64), scale=0.01)
    kinds = [(m.ns, m.id, m.type, m.action) for m in arr.markers]
    assert kinds[0][3] == Marker.DELETEALL
    # border, then track 0: line (2 visible frames) + points; track 1: points only
    assert kinds[1:] == [("frame", 0, Marker.LINE_STRIP, Marker.ADD),
                         ("tracks", 0, Marker.LINE_STRIP, Marker.ADD),
                         ("points", 0, Marker.POINTS, Marker.ADD),
                         ("points", 1, Marker.POINTS, Marker.ADD)]
    assert all(m.header.frame_id == "cam" for m in arr.markers)
    line = arr.markers[2]
    assert [(p.x, p.y) for p in line.points] == [(0.0, -0.0), (0.1, -0.2)]
    dots = arr.markers[3]
    assert len(dots.points) == len(dots.colors) == 3
    assert dots.colors[0].g == 1.0 and dots.colors[2].r == pytest.approx(0.9)
    assert dots.colors[2].a < 1.0 < dots.colors[0].a + 1e-9


def _frame(stamp: int, value: int = 0, hw=(4, 4)) -> BufferedFrame:
    return BufferedFrame(stamp, np.full((*hw, 3), value, np.uint8), "cam")


def test_frame_buffer_bounds_window_and_gaps():
    buf = FrameBuffer(max_frames=10, max_bytes=10**6, format_reset_s=0.0)
    period = 100_000_000
    for k in range(12):
        assert buf.push(_frame(k * period, k), (4, 4, "rgb8")) == (True, "")
    stats = buf.stats()
    assert (stats.received, stats.evicted, stats.buffered, stats.missed) == (12, 2, 10, 0)
    # duration d at 10 fps: the newest d * 10 frames (less than d seconds before the newest)
    assert [f.rgb[0, 0, 0] for f in buf.window(0.5, 1)] == [7, 8, 9, 10, 11]
    assert len(buf.window(100.0, 1)) == 10
    assert [f.rgb[0, 0, 0] for f in buf.window(0.0, 3)] == [2, 5, 8, 11]
    # a gap of three periods counts two missed frames
    buf.push(_frame(14 * period, 14), (4, 4, "rgb8"))
    assert buf.stats().missed == 2
    # non-increasing stamps and format changes are rejected (no reset when 0)
    assert not buf.push(_frame(14 * period), (4, 4, "rgb8"))[0]
    ok, note = buf.push(_frame(15 * period, hw=(5, 5)), (5, 5, "rgb8"))
    assert not ok and "differs" in note
    assert buf.stats().rejected == 2 and len(buf) == 10


def test_lost_frames_counted_even_when_most_are_lost():
    buf = FrameBuffer(max_frames=1000, max_bytes=10**9, format_reset_s=0.0)
    period = 33_333_333
    sent = [k for k in range(300) if k % 10 in (0, 1, 5)]  # 70 % of the frames are lost
    for k in sent:
        assert buf.push(_frame(k * period), (4, 4, "rgb8"))[0]
    lost = (sent[-1] - sent[0]) - (len(sent) - 1)  # the first intervals' gaps included
    assert buf.stats().missed == lost
    assert buf.stats().received == len(sent)


def test_gaps_before_the_period_is_known_are_counted():
    # frames 1-3 lost right after the first one (seen in a CI run: the count missed them)
    buf = FrameBuffer(max_frames=100, max_bytes=10**9, format_reset_s=0.0)
    period = 33_333_333
    sent = [0, 4, *range(5, 12), 14, *range(15, 20)]
    for i, k in enumerate(sent):
        assert buf.push(_frame(k * period), (4, 4, "rgb8"))[0]
        if i == 7:
            assert buf.stats().missed == 0  # 7 intervals: no estimate yet
    assert buf.stats().missed == 3 + 2


def test_frame_buffer_byte_bound_and_format_reset():
    frame_bytes = 4 * 4 * 3
    buf = FrameBuffer(max_frames=100, max_bytes=3 * frame_bytes, format_reset_s=0.25)
    for k in range(5):
        buf.push(_frame(k * 10**8), (4, 4, "rgb8"))
    assert len(buf) == 3 and buf.stats().buffered_bytes == 3 * frame_bytes
    assert not buf.push(_frame(6 * 10**8), (4, 4, "bgr8"))[0]  # new encoding: rejected
    assert not buf.push(_frame(8 * 10**8), (4, 4, "bgr8"))[0]  # 0.2 s < 0.25 s
    ok, note = buf.push(_frame(9 * 10**8), (4, 4, "bgr8"))     # 0.3 s: reset, accepted
    assert ok and "buffer cleared" in note and len(buf) == 1
    buf.set_limits(1, 10**6, 0.0)
    assert len(buf) == 1
