"""Clips from rosbag2 recordings (MCAP or sqlite3), read with the ``rosbags`` library.

No ROS installation is needed: ``rosbags`` parses the bag and deserialises the CDR
messages itself. The clip is written with :class:`~.clip.ClipWriter`, so it is identical
in format to one stored by the recorder node (frames as RGB, stamps from the message
headers, the header's ``frame_id``).

Image decoding lives here too (pure numpy / OpenCV), shared by the importer and by the
recorder's ``CompressedImage`` path:

* ``sensor_msgs/Image``: ``rgb8``, ``bgr8``, ``mono8``, ``rgba8``, ``bgra8`` and ``mono16``
  (scaled from the full 16-bit range to 8 bits: ``round(v / 257)``); rows may be padded
  (``step``); 16-bit data may be big-endian.
* ``sensor_msgs/CompressedImage``: anything OpenCV decodes (JPEG, PNG), always returned as
  8-bit RGB (grey images are expanded, 16-bit PNGs reduced by OpenCV).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .clip import Clip, ClipWriter, default_clip_id, validate_clip_id
from .errors import ClipError, DinoTrackerError

__all__ = [
    "IMAGE_TYPES",
    "ImageEncodingError",
    "SUPPORTED_ENCODINGS",
    "clip_from_bag",
    "decode_compressed",
    "decode_raw",
]

LOG = logging.getLogger(__name__)

#: Raw ``sensor_msgs/Image`` encodings this package converts to RGB.
SUPPORTED_ENCODINGS = ("rgb8", "bgr8", "mono8", "rgba8", "bgra8", "mono16")

#: Message types :func:`clip_from_bag` reads (ROS 2 and ROS 1 spellings).
IMAGE_TYPES = {
    "sensor_msgs/msg/Image": "raw",
    "sensor_msgs/Image": "raw",
    "sensor_msgs/msg/CompressedImage": "compressed",
    "sensor_msgs/CompressedImage": "compressed",
}

_CHANNELS = {"rgb8": 3, "bgr8": 3, "mono8": 1, "rgba8": 4, "bgra8": 4, "mono16": 1}


class ImageEncodingError(ClipError):
    """An image message has an encoding this package cannot convert, or malformed data."""


def decode_raw(
    encoding: str,
    height: int,
    width: int,
    step: int,
    data: bytes | bytearray | memoryview | np.ndarray,
    is_bigendian: bool = False,
) -> np.ndarray:
    """Convert the fields of a ``sensor_msgs/Image`` to an RGB frame.

    Args:
        encoding: one of :data:`SUPPORTED_ENCODINGS`.
        height, width: image size in pixels.
        step: bytes per row (may exceed ``width * bytes_per_pixel``: padding is dropped).
        data: the pixel bytes, at least ``height * step`` of them.
        is_bigendian: byte order of 16-bit data.

    Returns:
        ``(height, width, 3) uint8`` RGB frame (a new array).

    Raises:
        ImageEncodingError: unsupported encoding or too little data.
    """
    if encoding not in _CHANNELS:
        raise ImageEncodingError(
            f"unsupported image encoding {encoding!r}; use one of "
            f"{', '.join(SUPPORTED_ENCODINGS)} (or a CompressedImage topic)"
        )
    channels = _CHANNELS[encoding]
    depth = 2 if encoding == "mono16" else 1
    row = width * channels * depth
    buf = np.frombuffer(data, dtype=np.uint8)
    if height <= 0 or width <= 0 or step < row or buf.size < (height - 1) * step + row:
        raise ImageEncodingError(
            f"malformed {encoding} image: {width}x{height}, step {step}, {buf.size} bytes"
        )
    rows = np.lib.stride_tricks.as_strided(buf, shape=(height, row), strides=(step, 1))
    if depth == 2:
        dtype = np.dtype(">u2" if is_bigendian else "<u2")
        mono16 = np.ascontiguousarray(rows).view(dtype).reshape(height, width)
        mono = np.round(mono16.astype(np.float32) / 257.0).astype(np.uint8)
        return np.repeat(mono[:, :, None], 3, axis=2)
    pix = rows.reshape(height, width, channels)
    if encoding == "mono8":
        return np.repeat(pix, 3, axis=2)
    if encoding in ("bgr8", "bgra8"):
        return np.ascontiguousarray(pix[:, :, 2::-1])
    return np.ascontiguousarray(pix[:, :, :3])


def decode_compressed(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Decode the payload of a ``sensor_msgs/CompressedImage`` (JPEG, PNG) to RGB.

    Returns:
        ``(H, W, 3) uint8`` RGB frame.

    Raises:
        ImageEncodingError: OpenCV cannot decode the bytes.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None:
        raise ImageEncodingError(
            f"cannot decode a compressed image of {buf.size} bytes (JPEG or PNG expected)"
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _stamp_ns(msg: Any, log_time_ns: int) -> int:
    """Header stamp of a message in ns; the bag's log time when the header is unstamped."""
    stamp = msg.header.stamp
    ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    return ns if ns > 0 else int(log_time_ns)


def _decode(kind: str, msg: Any) -> np.ndarray:
    if kind == "compressed":
        return decode_compressed(msg.data)
    return decode_raw(
        msg.encoding, int(msg.height), int(msg.width), int(msg.step), msg.data,
        bool(msg.is_bigendian),
    )


def _check_window(start: float | None, duration: float | None, stride: int) -> None:
    if start is not None and (not math.isfinite(start) or start < 0):
        raise ClipError(f"--start must be a finite number of seconds >= 0, got {start}")
    if duration is not None and (not math.isfinite(duration) or duration <= 0):
        raise ClipError(f"--duration must be a finite number of seconds > 0, got {duration}")
    if stride < 1:
        raise ClipError(f"--stride must be >= 1, got {stride}")


def clip_from_bag(
    bag_path: str | Path,
    root: str | Path,
    topic: str,
    clip_id: str | None = None,
    *,
    start: float | None = None,
    duration: float | None = None,
    stride: int = 1,
    overwrite: bool = False,
) -> Clip:
    """Make a clip from the image messages of one topic of a rosbag2 (or ROS 1) bag.

    Two passes over the topic: the first reads only the header stamps (to select the
    window and measure the frame rate), the second decodes the selected frames one at a
    time into the clip writer, so memory does not grow with the bag's length.

    Args:
        bag_path: a rosbag2 directory (with ``metadata.yaml``), or a single ``.mcap`` /
            ``.db3`` file (or a ROS 1 ``.bag``).
        root: the clip directory (clips are stored in ``root/<clip_id>``).
        topic: an image topic of type ``sensor_msgs/msg/Image`` or ``CompressedImage``.
        clip_id: name of the new clip; ``None``: generated from the first kept frame's stamp.
        start: seconds after the topic's first frame where the clip starts (default 0).
        duration: seconds of frames to keep from ``start`` (default: to the end).
        stride: keep every ``stride``-th frame of the window.
        overwrite: replace an existing clip of the same id.

    Returns:
        The stored :class:`~.clip.Clip`.

    Raises:
        ClipError: unreadable bag, unknown topic or type, empty window, bad arguments,
            unsupported encoding (:class:`ImageEncodingError`), or the clip exists.
    """
    from rosbags.highlevel import AnyReader, AnyReaderError
    from rosbags.rosbag2 import ReaderError
    from rosbags.typesys import Stores, get_typestore

    _check_window(start, duration, stride)
    if clip_id is not None:
        validate_clip_id(clip_id)
    bag_path = Path(bag_path).expanduser()
    if not bag_path.exists():
        raise ClipError(f"bag not found: {bag_path}")
    try:
        with AnyReader([bag_path], default_typestore=get_typestore(Stores.LATEST)) as reader:
            conns = [c for c in reader.connections if c.topic == topic]
            if not conns:
                topics = sorted({c.topic for c in reader.connections if c.msgtype in IMAGE_TYPES})
                raise ClipError(
                    f"topic {topic!r} is not in {bag_path}; image topics there: "
                    f"{', '.join(topics) or 'none'}"
                )
            kinds = {IMAGE_TYPES.get(c.msgtype) for c in conns}
            if None in kinds or len(kinds) != 1:
                types = ", ".join(sorted({c.msgtype for c in conns}))
                raise ClipError(
                    f"topic {topic!r} has type {types}; expected sensor_msgs/msg/Image or "
                    "sensor_msgs/msg/CompressedImage"
                )
            kind = kinds.pop()

            # Pass 1: stamps (and header details) only.
            heads: list = []
            for conn, log_ns, raw in reader.messages(connections=conns):
                msg = reader.deserialize(raw, conn.msgtype)
                heads.append((_stamp_ns(msg, log_ns), msg.header.frame_id))
            stamps = [h[0] for h in heads]
            keep = _select(stamps, start, duration, stride)
            if not keep:
                raise ClipError(
                    f"no frames of {topic!r} in the window start={start or 0} s, "
                    f"duration={duration if duration is not None else 'all'} s "
                    f"({len(stamps)} frames in the bag)"
                )
            first = heads[keep[0]]
            fps = _rate([stamps[i] for i in keep]) or _rate(stamps) or 1.0
            cid = clip_id if clip_id is not None else default_clip_id(first[0])

            # Pass 2: decode the kept frames straight into the writer.
            wanted = set(keep)
            with ClipWriter(
                root, cid, fps=fps, frame_id=first[1], source=f"rosbag2:{bag_path}:{topic}",
                overwrite=overwrite,
            ) as writer:
                for i, (conn, _, raw) in enumerate(reader.messages(connections=conns)):
                    if i in wanted:
                        writer.add(_decode(kind, reader.deserialize(raw, conn.msgtype)), stamps[i])
                return writer.commit()
    except DinoTrackerError:  # ours, already one line (bad topic, disk full, ...)
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure on a truncated/foreign file
        kind = "" if isinstance(exc, (AnyReaderError, ReaderError)) else f"{type(exc).__name__}: "
        reason = (str(exc).splitlines() or [""])[0]
        raise ClipError(f"cannot read bag {bag_path}: {kind}{reason}; is it a complete "
                        "rosbag2 (MCAP or sqlite3) or ROS 1 bag?") from None


def _rate(stamps: list) -> float:
    """Mean frame rate of increasing stamps (ns); 0 when undefined."""
    span = (stamps[-1] - stamps[0]) / 1e9 if len(stamps) > 1 else 0.0
    return (len(stamps) - 1) / span if span > 0 else 0.0


def _select(
    stamps: list, start: float | None, duration: float | None, stride: int
) -> list:
    """Indices of the frames to keep: increasing stamps inside the window, every stride-th.

    Frames whose stamp does not increase over the previous kept one are skipped (logged).
    """
    if not stamps:
        return []
    t0 = stamps[0]
    lo = t0 + round((start or 0.0) * 1e9)
    hi = lo + round(duration * 1e9) if duration is not None else None
    window: list = []
    last = None
    skipped = 0
    for i, t in enumerate(stamps):
        if t < lo or (hi is not None and t >= hi):
            continue
        if last is not None and t <= last:
            skipped += 1
            continue
        window.append(i)
        last = t
    if skipped:
        LOG.warning("skipped %d frames whose header stamps did not increase", skipped)
    return window[::stride]
