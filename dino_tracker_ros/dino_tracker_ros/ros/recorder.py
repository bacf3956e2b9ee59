"""The recorder node: camera frames into a bounded ring buffer, windows of it into clips.

Subscribes to ``image_topic`` (``sensor_msgs/Image``, or ``CompressedImage`` with
``compressed: true``) with sensor-data QoS (best effort, keep last ``qos_depth``;
``reliability: reliable`` for publishers and transports that need it), converts every frame
to RGB (``cv_bridge``) and keeps the newest frames in a :class:`FrameBuffer` bounded by
``buffer_frames`` and ``buffer_megabytes`` (the oldest are dropped). Frames whose size or
encoding differs from the buffered ones are rejected with a throttled warning; if the new
format persists for ``format_reset_seconds`` the buffer is cleared and the new format
adopted. Lost frames are counted from gaps in the header stamps (against the stream's
frame period, a low percentile of the recent stamp intervals, so it holds even when most
frames are lost) and reported every ``stats_period`` seconds and in ``save_clip``'s
message.

Drop policy (what happens to frames the recorder cannot keep, and where it is counted):

1. **Transport** (``missed``): the camera subscription keeps the newest ``qos_depth``
   samples (KEEP_LAST). When frames arrive faster than the callback converts them, or a
   best-effort transport loses them, the oldest undelivered ones are overwritten. Nothing
   ever queues without bound; such frames are counted from gaps in the header stamps.
2. **Refusal** (``rejected``): a frame that cannot be converted (unknown encoding, wrong
   ``step``/size, empty or corrupt data), has a negative stamp, a stamp that does not
   increase, or a size/encoding other than the buffered frames' (until
   ``format_reset_seconds`` pass) is dropped with a throttled warning.
3. **Ring-buffer overwrite** (``evicted``): the buffer holds the newest ``buffer_frames``
   frames and at most ``buffer_megabytes`` of RGB data; each new frame beyond either bound
   evicts the oldest. This is the buffer's purpose (``save_clip`` looks back in time), so
   memory stays bounded however long the node records.

Every frame that arrives is counted exactly once as buffered, rejected or (later) evicted:
``received == rejected + evicted + buffered``. The counters are logged every
``stats_period`` seconds and appended to every ``save_clip`` answer.

Services (their own callback group, so frames keep arriving while a clip is written):

* ``save_clip`` (``SaveClip``): copies the newest ``duration`` seconds (0: the whole
  buffer), every ``stride``-th frame, out of the buffer and writes them atomically as a clip
  (:class:`~dino_tracker_ros.core.clip.ClipWriter`), then announces it on ``clips``.
* ``list_clips`` (``ListClips``): rescans ``clip_dir`` (clips made by the CLI appear too) and
  reports each clip's training state; malformed clip directories are skipped (logged).

Disk errors (full disk, read-only ``clip_dir``, file size limit) answer ``success: false``
with one line saying why and what to do; the partial clip is removed and the stored clips
are untouched (see :mod:`~dino_tracker_ros.core.storage`). At startup the node removes the
temporaries that a killed process left in ``clip_dir``.

Large frames and best-effort QoS: Fast DDS's default transports lose many large frames
sent best effort between processes (measured: 78 of 150 frames of 640x480 rgb8 at 30 fps);
with the shared-memory profile ``config/fastdds_large_frames.xml`` set through
``FASTDDS_DEFAULT_PROFILES_FILE`` (Jazzy: ``FASTRTPS_DEFAULT_PROFILES_FILE``) for the camera
and the recorder all 150 arrived. Or set
``reliability: reliable`` when the camera publishes reliably. Lost frames show up in the
``missed`` count.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image

from dino_tracker_msgs.msg import ClipInfo
from dino_tracker_msgs.srv import ListClips, SaveClip

from ..core.clip import (
    Clip,
    ClipWriter,
    default_clip_id,
    list_clips,
    sweep_clip_dir,
    validate_clip_id,
)
from ..core.errors import ClipError, DinoTrackerError
from .conversions import CLIP_STATES, ImageConverter, clip_info, stamp_to_ns
from .params import CLIP_DIR, NodeParams, ParamSpec
from .runtime import CLIPS_QOS, DEFAULT_NAMESPACE, camera_qos, create_service, run_nodes

__all__ = ["BufferedFrame", "FrameBuffer", "RECORDER_PARAMS", "RecorderNode", "StreamStats",
           "main"]

RECORDER_PARAMS = (
    CLIP_DIR,
    ParamSpec("image_topic", "/camera/image_raw",
              "camera topic (sensor_msgs/Image, or CompressedImage when compressed is true)",
              read_only=True),
    ParamSpec("compressed", False, "subscribe to sensor_msgs/CompressedImage (JPEG or PNG)",
              read_only=True),
    ParamSpec("reliability", "best_effort",
              "QoS reliability of the camera subscription (best_effort: sensor-data QoS)",
              choices=("best_effort", "reliable"), read_only=True),
    ParamSpec("qos_depth", 5, "QoS history depth of the camera subscription", 1, 1000,
              read_only=True),
    ParamSpec("buffer_frames", 450, "ring buffer length in frames (oldest dropped)", 2,
              1_000_000),
    ParamSpec("buffer_megabytes", 2048, "ring buffer size limit in MiB of RGB frames", 1,
              1_000_000),
    ParamSpec("frame_id_override", "",
              "camera frame id stored with clips; empty: the images' header.frame_id"),
    ParamSpec("format_reset_seconds", 5.0,
              "clear the buffer when frames of a new size/encoding keep arriving this long "
              "(0: never; they are rejected)", 0.0, 86400.0),
    ParamSpec("stats_period", 5.0, "seconds between stream statistics log lines", 0.1,
              3600.0, read_only=True),
)


@dataclass(frozen=True)
class BufferedFrame:
    """One buffered camera frame.

    Attributes:
        stamp_ns: header stamp in nanoseconds.
        rgb: (H, W, 3) uint8 RGB (never modified once buffered).
        frame_id: the image's camera frame id.
    """

    stamp_ns: int
    rgb: np.ndarray
    frame_id: str


@dataclass(frozen=True)
class StreamStats:
    """Counters of the camera stream since the node started.

    Attributes:
        received: frames that arrived (accepted or not).
        rejected: frames refused (conversion failed, format change, stamp not increasing).
        missed: frames the camera sent that never arrived, estimated from stamp gaps.
        evicted: buffered frames dropped to make room (ring-buffer overflow), or cleared
            when the stream switched to a new format.
        buffered: frames in the buffer now.
        buffered_bytes: bytes of RGB data in the buffer now.
    """

    received: int = 0
    rejected: int = 0
    missed: int = 0
    evicted: int = 0
    buffered: int = 0
    buffered_bytes: int = 0

    def line(self) -> str:
        """One human-readable line."""
        return (f"received {self.received}, rejected {self.rejected}, missed {self.missed} "
                f"(stamp gaps), evicted {self.evicted} (buffer full), buffered "
                f"{self.buffered} frames ({self.buffered_bytes / 2**20:.1f} MiB)")


def _gap_frames(interval_ns: int, period_ns: float) -> int:
    """Frames missing in a stamp interval of ``interval_ns`` at a frame period ``period_ns``."""
    return max(0, int(round(interval_ns / period_ns)) - 1) if period_ns > 0 else 0


class FrameBuffer:
    """Thread-safe drop-oldest ring buffer of frames bounded by count and bytes.

    All buffered frames share one format (height, width, source encoding); stamps strictly
    increase. Lost frames are estimated from gaps: a gap of ``k`` frame periods counts
    ``k - 1`` missed frames, the period being the 10th percentile of the last 64 stamp
    intervals (robust to losing most frames); the gaps among the first 8 intervals are
    counted as soon as those 8 give the first estimate.

    Args:
        max_frames: at most this many frames.
        max_bytes: at most this many bytes of frame data (at least one frame is kept).
        format_reset_s: after frames of a new format have arrived for this long (by their
            stamps), clear the buffer and take the new format; 0: never.
    """

    _MIN_PERIODS = 8

    def __init__(self, max_frames: int, max_bytes: int, format_reset_s: float = 5.0) -> None:
        self._lock = threading.Lock()
        self._frames: deque[BufferedFrame] = deque()
        self._bytes = 0
        self._format: tuple | None = None
        self._pending: tuple[tuple, int] | None = None  # (new format, first stamp)
        self._periods: deque[int] = deque(maxlen=64)
        self._last_stamp: int | None = None
        self._stats = StreamStats()
        self.set_limits(max_frames, max_bytes, format_reset_s)

    def set_limits(self, max_frames: int, max_bytes: int, format_reset_s: float) -> None:
        """Change the bounds (evicting at once if needed) and the format-reset delay."""
        with self._lock:
            self._max_frames = max(1, int(max_frames))
            self._max_bytes = max(1, int(max_bytes))
            self._reset_ns = int(format_reset_s * 1e9)
            self._evict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    def stats(self) -> StreamStats:
        """A snapshot of the counters."""
        with self._lock:
            return replace(self._stats, buffered=len(self._frames), buffered_bytes=self._bytes)

    def reject(self, stamp_ns: int | None = None) -> None:
        """Count a frame that arrived but could not be converted (or had a bad stamp).

        Its stamp, when usable, still advances the gap count: a rejected frame is not
        also counted as missed.
        """
        with self._lock:
            self._stats = replace(self._stats, received=self._stats.received + 1,
                                  rejected=self._stats.rejected + 1)
            if stamp_ns is not None:
                self._note_arrival(stamp_ns)

    def push(self, frame: BufferedFrame, fmt: tuple) -> tuple[bool, str]:
        """Add a frame.

        Args:
            frame: the converted frame.
            fmt: its format, e.g. ``(height, width, encoding)``.

        Returns:
            ``(accepted, note)``: ``note`` says why a frame was rejected, or that the buffer
            was reset to a new format; empty otherwise.
        """
        with self._lock:
            s = self._stats
            self._stats = replace(s, received=s.received + 1)
            note = ""
            if self._format is not None and fmt != self._format and self._frames:
                if self._pending is None or self._pending[0] != fmt:
                    self._pending = (fmt, frame.stamp_ns)
                if not self._reset_ns or frame.stamp_ns - self._pending[1] < self._reset_ns:
                    self._count_rejected()
                    self._note_arrival(frame.stamp_ns)
                    return False, (f"frame format {_fmt(fmt)} differs from the buffered "
                                   f"{_fmt(self._format)}; rejected")
                note = (f"frame format changed from {_fmt(self._format)} to {_fmt(fmt)}: "
                        f"buffer cleared ({len(self._frames)} frames dropped)")
                self._stats = replace(self._stats,
                                      evicted=self._stats.evicted + len(self._frames))
                self._clear()
            self._pending = None
            if self._last_stamp is not None and frame.stamp_ns <= self._last_stamp:
                self._count_rejected()
                return False, (f"stamp {frame.stamp_ns} ns does not increase (last "
                               f"{self._last_stamp} ns); rejected")
            self._count_gap(frame.stamp_ns)
            self._format = fmt
            self._frames.append(frame)
            self._bytes += frame.rgb.nbytes
            self._evict()
            return True, note

    def window(self, duration_s: float, stride: int) -> list[BufferedFrame]:
        """The newest frames spanning less than ``duration_s`` (0: all), every ``stride``-th.

        The frames are references (buffered arrays are never modified), copied under the
        lock, so writing them out does not block new frames.
        """
        with self._lock:
            frames = list(self._frames)
        if frames and duration_s > 0:
            newest = frames[-1].stamp_ns
            limit = int(round(duration_s * 1e9))
            frames = [f for f in frames if newest - f.stamp_ns < limit]
        return frames[::max(1, int(stride))]

    # -- internals (lock held) -----------------------------------------------------------
    def _count_rejected(self) -> None:
        self._stats = replace(self._stats, rejected=self._stats.rejected + 1)

    def _note_arrival(self, stamp: int) -> None:
        if self._last_stamp is None or stamp > self._last_stamp:
            self._count_gap(stamp)

    def _count_gap(self, stamp: int) -> None:
        if self._last_stamp is not None:
            dt = stamp - self._last_stamp
            missed = 0
            if len(self._periods) >= self._MIN_PERIODS:
                missed = _gap_frames(dt, float(np.percentile(self._periods, 10)))
            self._periods.append(dt)
            if len(self._periods) == self._MIN_PERIODS:
                # the first estimate of the period: count the gaps seen before it too
                period = float(np.percentile(self._periods, 10))
                missed = sum(_gap_frames(d, period) for d in self._periods)
            if missed:
                self._stats = replace(self._stats, missed=self._stats.missed + missed)
        self._last_stamp = stamp

    def _evict(self) -> None:
        dropped = 0
        while len(self._frames) > 1 and (
            len(self._frames) > self._max_frames or self._bytes > self._max_bytes
        ):
            self._bytes -= self._frames.popleft().rgb.nbytes
            dropped += 1
        if dropped:
            self._stats = replace(self._stats, evicted=self._stats.evicted + dropped)

    def _clear(self) -> None:
        self._frames.clear()
        self._bytes = 0
        self._periods.clear()
        self._last_stamp = None


def _fmt(fmt: tuple) -> str:
    h, w, enc = fmt
    return f"{w}x{h} {enc}"


def _rate(frames: Sequence[BufferedFrame]) -> float:
    span = (frames[-1].stamp_ns - frames[0].stamp_ns) / 1e9 if len(frames) > 1 else 0.0
    return (len(frames) - 1) / span if span > 0 else 0.0


class RecorderNode(Node):
    """ROS adapter of the clip recorder (see the module docstring).

    Args:
        node_name: node name.
        namespace: node namespace (``--ros-args -r __ns:=...`` overrides it).
        kwargs: passed to :class:`rclpy.node.Node` (e.g. ``context``).
    """

    def __init__(self, node_name: str = "recorder", namespace: str = DEFAULT_NAMESPACE,
                 **kwargs: Any) -> None:
        super().__init__(node_name, namespace=namespace, **kwargs)
        self.params = NodeParams(self, RECORDER_PARAMS)
        p = self.params.value
        self._topic = str(p("image_topic"))
        self._compressed = bool(p("compressed"))
        self._reliability = str(p("reliability"))
        self._frame_id_override = str(p("frame_id_override"))
        self._buffer = FrameBuffer(p("buffer_frames"), p("buffer_megabytes") * 2**20,
                                   p("format_reset_seconds"))
        self.add_post_set_parameters_callback(self._on_params)
        self._converter = ImageConverter()
        sweep_clip_dir(self.params.clip_dir())

        camera_group = MutuallyExclusiveCallbackGroup()
        service_group = MutuallyExclusiveCallbackGroup()
        qos = camera_qos(self._reliability, p("qos_depth"))
        msg_type = CompressedImage if self._compressed else Image
        self._sub = self.create_subscription(msg_type, self._topic, self._on_image, qos,
                                             callback_group=camera_group)
        self._clips_pub = self.create_publisher(ClipInfo, "clips", CLIPS_QOS)
        create_service(self, SaveClip, "save_clip", self._on_save_clip,
                       callback_group=service_group)
        create_service(self, ListClips, "list_clips", self._on_list_clips,
                       callback_group=service_group)
        self._last_logged = StreamStats()
        self._last_log_time = time.monotonic()
        self.create_timer(float(p("stats_period")), self._log_stats, callback_group=camera_group)
        self.get_logger().info(
            f"recording {msg_type.__name__} from {self._sub.topic_name} "
            f"({self._reliability}, depth {int(p('qos_depth'))}) into a buffer of "
            f"{int(p('buffer_frames'))} frames / {int(p('buffer_megabytes'))} MiB; "
            f"clips go to {self.params.clip_dir()}"
        )

    @property
    def buffer(self) -> FrameBuffer:
        """The ring buffer (for inspection)."""
        return self._buffer

    # -- parameters ------------------------------------------------------------------------
    def _on_params(self, params: list[Parameter]) -> SetParametersResult:
        p = self.params.value
        self._frame_id_override = str(p("frame_id_override"))
        self._buffer.set_limits(p("buffer_frames"), p("buffer_megabytes") * 2**20,
                                p("format_reset_seconds"))
        return SetParametersResult(successful=True)

    # -- camera ----------------------------------------------------------------------------
    def _on_image(self, msg) -> None:
        log = self.get_logger()
        header_ns = stamp_to_ns(msg.header.stamp)
        stamp = header_ns or self.get_clock().now().nanoseconds  # unstamped: arrival time
        try:
            if self._compressed:
                rgb = self._converter.compressed_to_rgb(msg)
                encoding = msg.format
            else:
                rgb = self._converter.to_rgb(msg)
                encoding = msg.encoding
        except Exception as exc:  # ImageEncodingError, CvBridgeError: keep going
            # only a camera stamp advances the gap count (an arrival time is another clock)
            self._buffer.reject(header_ns if header_ns > 0 else None)
            log.warning(f"frame rejected: {exc}", throttle_duration_sec=5.0)
            return
        if stamp < 0:
            self._buffer.reject()
            log.warning(f"frame rejected: negative header stamp {stamp} ns",
                        throttle_duration_sec=5.0)
            return
        frame = BufferedFrame(stamp, rgb, self._frame_id_override or msg.header.frame_id)
        accepted, note = self._buffer.push(frame, (rgb.shape[0], rgb.shape[1], encoding))
        if not accepted:
            log.warning(note, throttle_duration_sec=5.0)
        elif note:
            log.warning(note)

    def _log_stats(self) -> None:
        stats = self._buffer.stats()
        if stats.received == self._last_logged.received:
            return
        now = time.monotonic()
        rate = (stats.received - self._last_logged.received) / max(now - self._last_log_time,
                                                                    1e-9)
        self._last_logged, self._last_log_time = stats, now
        self.get_logger().info(f"camera {self._sub.topic_name}: {rate:.1f} fps; {stats.line()}")

    # -- services --------------------------------------------------------------------------
    def _on_save_clip(self, request: SaveClip.Request, response: SaveClip.Response):
        t0 = time.monotonic()
        try:
            clip = self._save(request)
        except DinoTrackerError as exc:
            response.success, response.message = False, str(exc)
            return response
        except Exception as exc:  # a bug must not kill the node
            self.get_logger().error(f"save_clip failed: {exc!r}")
            response.success, response.message = False, f"internal error: {exc!r}"
            return response
        meta = clip.meta
        source = f"recorded from {self._sub.topic_name} by {self.get_fully_qualified_name()}"
        info = clip_info(clip, ClipInfo.STATE_RECORDED, source)
        self._clips_pub.publish(info)
        response.success = True
        response.clip = info
        response.message = (
            f"saved clip '{meta.clip_id}': {meta.num_frames} frames {meta.width}x{meta.height} "
            f"at {meta.fps:.2f} fps in {time.monotonic() - t0:.1f} s to {clip.path}; stream: "
            f"{self._buffer.stats().line()}"
        )
        self.get_logger().info(response.message)
        return response

    def _save(self, request: SaveClip.Request) -> Clip:
        duration = float(request.duration)
        if not math.isfinite(duration) or duration < 0:
            raise ClipError(f"duration must be >= 0 seconds (0: whole buffer), got {duration}")
        clip_id = request.clip_id.strip() or None
        if clip_id is not None:
            validate_clip_id(clip_id)
        frames = self._buffer.window(duration, max(1, int(request.stride)))
        if not frames:
            raise ClipError(
                f"the buffer is empty: no frames received on {self._sub.topic_name} yet; check "
                f"that the camera publishes and that its QoS matches (reliability: "
                f"{self._reliability})"
            )
        if len(frames) < 2:
            raise ClipError(
                "the requested window holds only 1 frame; tracking needs at least 2: ask for a "
                "longer duration or a smaller stride"
            )
        clip_id = clip_id or default_clip_id(frames[0].stamp_ns)
        with ClipWriter(self.params.clip_dir(), clip_id, fps=_rate(frames),
                        frame_id=frames[0].frame_id,
                        source=f"ros:{self._sub.topic_name}") as writer:
            for f in frames:
                writer.add(f.rgb, f.stamp_ns)
        assert writer.clip is not None
        return writer.clip

    def _on_list_clips(self, request: ListClips.Request, response: ListClips.Response):
        from ..core.trainer import train_status  # imports torch: only when asked

        infos = []
        try:
            clips = list_clips(self.params.clip_dir())
        except Exception as exc:  # an unreadable clip_dir must not take the node down
            self.get_logger().error(f"list_clips: cannot scan {self.params.clip_dir()}: {exc}")
            clips = []
        for clip in clips:
            try:
                status = train_status(clip)
                state, message = CLIP_STATES[status.state], status.message
            except Exception as exc:  # an unreadable train.json must not hide the others
                state, message = ClipInfo.STATE_FAILED, f"unreadable training state: {exc}"
            infos.append(clip_info(clip, state, message))
        response.clips = infos
        return response


def main(args: list[str] | None = None) -> int:
    """``ros2 run dino_tracker_ros recorder``."""
    return run_nodes([RecorderNode], args)


if __name__ == "__main__":
    raise SystemExit(main())
