"""Messages <-> arrays: images, stamps, clip infos, queries and trajectories.

Node-free functions (no rclpy node needed), so they are tested by round trips.
Conventions (CONTRACT.md): points are pixels of the clip's original resolution, x right,
y down, the centre of the top-left pixel at (0, 0); the Python side uses (t, x, y) rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image

from dino_tracker_msgs.msg import (
    ClipInfo,
    QueryPoint,
    TrackPoint,
    Trajectory,
    TrajectoryArray,
)

from ..core.bag import SUPPORTED_ENCODINGS, ImageEncodingError, decode_compressed, decode_raw
from ..core.clip import Clip

__all__ = [
    "CLIP_STATES",
    "ImageConverter",
    "clip_info",
    "fills_slots",
    "ns_to_stamp",
    "queries_from_msg",
    "rgb_to_image",
    "stamp_to_ns",
    "trajectory_array",
]

#: core train_status states -> ClipInfo constants.
CLIP_STATES = {
    "recorded": ClipInfo.STATE_RECORDED,
    "training": ClipInfo.STATE_TRAINING,
    "ready": ClipInfo.STATE_READY,
    "failed": ClipInfo.STATE_FAILED,
}


def stamp_to_ns(stamp: Time) -> int:
    """``builtin_interfaces/Time`` -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    """Integer nanoseconds -> ``builtin_interfaces/Time``."""
    sec, nanosec = divmod(int(ns), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


class ImageConverter:
    """``sensor_msgs/Image`` and ``CompressedImage`` -> (H, W, 3) uint8 RGB frames.

    Raw images go through ``cv_bridge`` (``imgmsg_to_cv2(msg, desired_encoding="rgb8")``)
    for rgb8, bgr8, mono8, rgba8 and bgra8; mono16 is scaled from the full 16-bit range
    (``round(v / 257)``) since cv_bridge has no 16 -> 8 bit conversion to RGB. Padded rows
    (``step`` larger than the pixels) are compacted first. Compressed images (JPEG, PNG) are
    decoded by OpenCV (:func:`~dino_tracker_ros.core.bag.decode_compressed`).

    Raises (from the methods):
        ImageEncodingError: unsupported encoding, malformed or undecodable data.
    """

    def __init__(self) -> None:
        from cv_bridge import CvBridge

        self._bridge = CvBridge()

    def to_rgb(self, msg: Image) -> np.ndarray:
        """Convert a raw image message; returns a new (H, W, 3) uint8 RGB array."""
        enc = msg.encoding
        if enc not in SUPPORTED_ENCODINGS:
            raise ImageEncodingError(
                f"unsupported image encoding {enc!r}; use one of "
                f"{', '.join(SUPPORTED_ENCODINGS)} (or compressed: true for CompressedImage)"
            )
        h, w = int(msg.height), int(msg.width)
        depth = 2 if enc == "mono16" else 1
        channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4}.get(enc, 1)
        row = w * channels * depth
        data = np.frombuffer(msg.data, dtype=np.uint8)
        if h <= 0 or w <= 0 or msg.step < row or data.size < (h - 1) * msg.step + row:
            raise ImageEncodingError(
                f"malformed {enc} image: {w}x{h}, step {msg.step}, {data.size} bytes"
            )
        if enc == "mono16":
            return decode_raw(enc, h, w, int(msg.step), data, bool(msg.is_bigendian))
        src = msg
        if msg.step != row or data.size != h * row or msg.is_bigendian:
            rows = np.lib.stride_tricks.as_strided(data, shape=(h, row), strides=(msg.step, 1))
            src = Image(height=h, width=w, encoding=enc, is_bigendian=0, step=row)
            src.data = np.ascontiguousarray(rows).tobytes()
        rgb = self._bridge.imgmsg_to_cv2(src, desired_encoding="rgb8")
        return np.array(rgb, dtype=np.uint8, copy=True)

    @staticmethod
    def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
        """Decode a compressed image message (JPEG, PNG) to (H, W, 3) uint8 RGB."""
        return decode_compressed(msg.data)


def rgb_to_image(frame: np.ndarray, stamp_ns: int, frame_id: str) -> Image:
    """(H, W, 3) uint8 RGB -> ``sensor_msgs/Image`` rgb8."""
    frame = np.ascontiguousarray(frame, dtype=np.uint8)
    h, w = frame.shape[:2]
    msg = Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3)
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.data = frame.tobytes()
    return msg


def clip_info(clip: Clip, state: int, message: str = "") -> ClipInfo:
    """A :class:`ClipInfo` for a stored clip with the given state constant and detail."""
    meta = clip.meta
    info = ClipInfo(
        clip_id=meta.clip_id, path=str(clip.path), num_frames=meta.num_frames,
        width=meta.width, height=meta.height, fps=float(meta.fps), state=int(state),
        message=message,
    )
    info.header.frame_id = meta.frame_id
    info.header.stamp = ns_to_stamp(meta.stamps_ns[0])
    return info


def queries_from_msg(points: Sequence[QueryPoint]) -> np.ndarray:
    """Query points -> (N, 3) float64 rows (t, x, y) in original clip pixels."""
    out = np.empty((len(points), 3), dtype=np.float64)
    for i, p in enumerate(points):
        out[i] = (p.frame, p.x, p.y)
    return out


def fills_slots(cls: type, sample: dict[str, Any]) -> bool:
    """Whether messages of ``cls`` can be built by setting their ``_<field>`` slots directly.

    rclpy's generated message classes keep each field in a slot ``_<name>`` behind a
    property whose setter checks types when ``ROS_PYTHON_CHECK_FIELDS=1``, and their
    constructors cost ~10 us per message: too slow for the 50,000 points of a 1,000-query
    answer. Direct slot assignment builds the same message (verified here once per class on
    ``sample``, a value for every field, against the constructor). ``False`` (use the
    constructor) when the layout differs or field checks were asked for.
    """
    if os.environ.get("ROS_PYTHON_CHECK_FIELDS", "") == "1":
        return False
    slots = set(getattr(cls, "__slots__", ()))
    if set(cls.get_fields_and_field_types()) != set(sample):
        return False
    if not all(f"_{name}" in slots for name in sample):
        return False
    msg = object.__new__(cls)
    if "_check_fields" in slots:
        msg._check_fields = False
    for name, value in sample.items():
        setattr(msg, f"_{name}", value)
    return bool(msg == cls(**sample))


_FAST_TRACK_POINT = fills_slots(
    TrackPoint, {"stamp": Time(sec=1, nanosec=2), "x": 1.5, "y": 2.5, "visible": True,
                 "visibility": 0.75})
_CHECK_SLOT = "_check_fields" in getattr(TrackPoint, "__slots__", ())


def _track_points(times: Sequence[Time], xs: list, ys: list, vis: list,
                  score: list) -> list[TrackPoint]:
    """One trajectory's ``TrackPoint`` list (Python floats and bools, one per frame)."""
    if not _FAST_TRACK_POINT:
        return [TrackPoint(stamp=t, x=x, y=y, visible=v, visibility=s)
                for t, x, y, v, s in zip(times, xs, ys, vis, score, strict=True)]
    new = object.__new__
    out = []
    for t, x, y, v, s in zip(times, xs, ys, vis, score, strict=True):
        p = new(TrackPoint)
        if _CHECK_SLOT:
            p._check_fields = False
        p._stamp, p._x, p._y, p._visible, p._visibility = t, x, y, v, s
        out.append(p)
    return out


def trajectory_array(
    clip: Clip,
    queries: np.ndarray,
    tracks: np.ndarray,
    visible: np.ndarray,
    visibility: np.ndarray,
    stamps_ns: np.ndarray | None = None,
) -> TrajectoryArray:
    """Tracks of a clip -> ``TrajectoryArray`` (one ``TrackPoint`` per frame per query).

    The points of a frame share one ``Time`` object (messages are values once serialised).

    Args:
        clip: the tracked clip (frame id, size, stamps).
        queries: (N, 3) rows (t, x, y), original pixels; ``id`` is the row index.
        tracks: (N, T, 2) float positions (x, y), original pixels.
        visible: (N, T) bool.
        visibility: (N, T) float scores in [0, 1].
        stamps_ns: (T,) int64 frame stamps; default the clip's.
    """
    meta = clip.meta
    stamps = meta.stamps_ns if stamps_ns is None else [int(s) for s in stamps_ns]
    times: tuple[Time, ...] = tuple(ns_to_stamp(s) for s in stamps)
    out = TrajectoryArray(clip_id=meta.clip_id, width=meta.width, height=meta.height)
    out.header.frame_id = meta.frame_id
    out.header.stamp = ns_to_stamp(stamps[0])
    xs = np.asarray(tracks[..., 0], dtype=np.float32).tolist()
    ys = np.asarray(tracks[..., 1], dtype=np.float32).tolist()
    vis = np.asarray(visible, dtype=bool).tolist()
    score = np.asarray(visibility, dtype=np.float32).tolist()
    trajs = []
    for i, (t, x, y) in enumerate(np.asarray(queries, dtype=np.float64).tolist()):
        traj = Trajectory(id=i, query=QueryPoint(frame=int(round(t)), x=float(x), y=float(y)))
        traj.points = _track_points(times, xs[i], ys[i], vis[i], score[i])
        trajs.append(traj)
    out.trajectories = trajs
    return out
