"""The tracker node: ``query_tracks`` over :class:`core.predictor.Predictor`.

* ``query_tracks`` (``QueryTracks``): tracks the given query points (and, with
  ``grid_step > 0``, a regular grid on frame ``grid_frame``) through every frame of a
  trained clip (empty ``clip_id``: the clip trained most recently, by the time its training
  state was last updated). Bad requests (unknown or untrained clip, frames or points out of
  range, no queries, too many queries) answer ``success: false`` with the core's one-line
  message.
* Each answer is also published on ``trajectories`` (``TrajectoryArray``: ``header.frame_id``
  the clip's camera frame, ``header.stamp`` its first frame's stamp, one ``TrackPoint`` per
  frame with that frame's stamp), on ``markers`` (RViz, see :mod:`.markers` for the
  image-plane frame), and replayed once on ``overlay`` (``sensor_msgs/Image`` rgb8: the clip's
  frames with the tracks drawn, at ``overlay_rate`` Hz, each frame with its original stamp;
  a new answer replaces a replay in progress).
* Opened predictors (model + memory-mapped refined-feature cache) are kept in an LRU cache
  of ``cache_size`` clips. An entry is dropped when ``clips`` announces the clip as
  TRAINING or READY (retrained) or when its model file changes on disk; changing a
  ``track.*`` parameter empties the cache. READY announcements also preload the predictor
  on a background thread, off the service path.

* ``track_live`` (``TrackLive``): starts (``enable: true``) or stops live tracking of query
  points given on a trained clip's frames (empty ``clip_id``: the latest trained clip).
  While on, the tracker subscribes to the camera (``image_topic``, ``compressed``,
  ``reliability``, ``qos_depth``: the recorder's parameters, sensor-data QoS by default);
  the camera callback only drops each frame into a one-slot hand-off (a newer frame
  replaces one not yet taken: drop-oldest, counted as dropped) and ONE worker thread runs
  :meth:`core.live.LivePredictor.step` on the newest frame and publishes, per processed
  frame, a ``TrajectoryArray`` on ``live`` (``header``: the camera frame's stamp and frame
  id; ``width``/``height``: the camera frame's size, the pixels of the positions; one
  ``TrackPoint`` per trajectory, ``id`` = the query's index in the request), the markers
  (a trail of the last ``overlay_trail`` live frames) and, when subscribed, the frame with
  the points drawn on ``overlay``. Every ``live_stats_period`` seconds a log line reports
  the processed rate, the stamp-to-publication latency (median, p90; the node's clock
  against the camera stamps), the arrival-to-publication latency and the dropped and
  rejected frames (also :meth:`TrackerNode.live_stats`). ``enable: false`` unsubscribes;
  nothing is published for that session after the answer. Refusals (``success: false``):
  unknown or untrained clip, bad queries, no queries.

The tracker mirrors the whole core schema as parameters so one params file serves trainer
and tracker alike, but only ``device`` and ``track.*`` affect it (a model's own settings
come from its checkpoint); ``backbone.random_init: true`` makes it warn at startup.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from visualization_msgs.msg import MarkerArray

from dino_tracker_msgs.msg import ClipInfo, TrajectoryArray
from dino_tracker_msgs.srv import QueryTracks, TrackLive

from ..core.clip import Clip, list_clips, open_clip
from ..core.errors import DinoTrackerError, NotTrainedError, QueryError
from ..core.live import LivePredictor, LiveResult
from ..core.predictor import Predictor, TrackResult, grid_queries, validate_queries
from ..core.render import draw_tracks
from ..core.trainer import train_status
from .conversions import (
    ImageConverter,
    queries_from_msg,
    rgb_to_image,
    stamp_to_ns,
    trajectory_array,
)
from .markers import track_markers
from .params import CLIP_DIR, DEVICE, PROFILE, NodeParams, ParamSpec
from .recorder import RECORDER_PARAMS
from .runtime import (
    CLIPS_QOS,
    DEFAULT_NAMESPACE,
    StoppableNode,
    camera_qos,
    create_service,
    run_nodes,
)
from .trainer import CONFIG_SECTIONS, RANDOM_INIT_WARNING

__all__ = ["CAMERA_PARAMS", "LiveStats", "TRACKER_PARAMS", "TrackerNode", "latest_trained_clip",
           "main"]

#: The camera parameters live tracking shares with the recorder (same names and meaning).
CAMERA_PARAMS = tuple(s for s in RECORDER_PARAMS
                      if s.name in ("image_topic", "compressed", "reliability", "qos_depth"))
_LATENCY_WINDOW = 256  # recent frames the reported rate and latencies are computed over

TRACKER_PARAMS = (
    CLIP_DIR,
    PROFILE,
    DEVICE,
    ParamSpec("cache_size", 2, "trained clips whose predictors stay open (LRU)", 1, 64),
    ParamSpec("max_queries", 20000, "largest number of points one request may track", 1,
              10_000_000),
    ParamSpec("max_track_points", 5_000_000,
              "largest points x frames of one query_tracks answer (one TrackPoint each, 24 "
              "bytes on the wire)", 1, 1_000_000_000),
    ParamSpec("overlay_rate", 10.0, "frames per second of the overlay replay (0: no overlay)",
              0.0, 120.0, read_only=True),
    ParamSpec("overlay_trail", 8, "frames of trail drawn behind each point in the overlay", 0,
              1000),
    ParamSpec("marker_scale", 0.01, "metres per image pixel in the RViz markers", 1e-6,
              100.0),
    ParamSpec("preload", True, "open a clip's predictor in the background when it becomes "
              "READY"),
    *CAMERA_PARAMS,
    ParamSpec("live_stats_period", 5.0, "seconds between live-tracking statistics log lines",
              0.1, 3600.0, read_only=True),
)


@dataclass(frozen=True)
class LiveStats:
    """Counters of the current live-tracking session (:meth:`TrackerNode.live_stats`).

    Attributes:
        active: live tracking is on.
        clip_id: the clip whose model and queries are used.
        queries: number of query points.
        received: camera frames that arrived.
        processed: frames tracked and published on ``live``.
        dropped: frames replaced in the hand-off before the worker took them.
        rejected: frames that could not be converted or tracked.
        fps: processed frames per second over the recent window.
        latency_ms: median stamp-to-publication latency (node clock - camera stamp).
        latency_p90_ms: its 90th percentile.
        pipeline_ms: median arrival-to-publication time inside the node.
    """

    active: bool = False
    clip_id: str = ""
    queries: int = 0
    received: int = 0
    processed: int = 0
    dropped: int = 0
    rejected: int = 0
    fps: float = 0.0
    latency_ms: float = float("nan")
    latency_p90_ms: float = float("nan")
    pipeline_ms: float = float("nan")

    def line(self) -> str:
        """One human-readable line."""
        return (f"live '{self.clip_id}' ({self.queries} points): {self.fps:.2f} fps, latency "
                f"stamp->publication median {self.latency_ms:.0f} ms (p90 "
                f"{self.latency_p90_ms:.0f} ms), arrival->publication {self.pipeline_ms:.0f} "
                f"ms; received {self.received}, processed {self.processed}, dropped "
                f"{self.dropped}, rejected {self.rejected}")


def latest_trained_clip(root: Path) -> Clip:
    """The trained clip under ``root`` whose training state was updated last.

    Raises:
        NotTrainedError: no clip under ``root`` has a trained model.
    """
    best: tuple[int, Clip] | None = None
    for clip in list_clips(root):
        if train_status(clip).state != "ready":
            continue
        paths = [Path(clip.model_dir) / "train.json", Path(clip.model_dir) / "model.pt"]
        mtime = max((p.stat().st_mtime_ns for p in paths if p.exists()), default=0)
        if best is None or mtime > best[0]:
            best = (mtime, clip)
    if best is None:
        raise NotTrainedError(
            f"no trained clip in {root} yet; train one (train_clip action) or name a clip"
        )
    return best[1]


def _model_stamp(clip: Clip) -> int:
    path = Path(clip.model_dir) / "model.pt"
    return path.stat().st_mtime_ns if path.exists() else 0


class TrackerNode(StoppableNode):
    """ROS adapter of the core predictor (see the module docstring).

    Args:
        node_name: node name.
        namespace: node namespace (``--ros-args -r __ns:=...`` overrides it).
        kwargs: passed to :class:`rclpy.node.Node` (e.g. ``context``).
    """

    def __init__(self, node_name: str = "tracker", namespace: str = DEFAULT_NAMESPACE,
                 **kwargs: Any) -> None:
        # Set before the node exists: a failed construction still calls stop().
        self._cache: OrderedDict[str, tuple[int, Predictor]] = OrderedDict()
        self._cache_lock = threading.RLock()
        self._overlay_lock = threading.Lock()
        self._overlay: tuple[Clip, TrackResult, int] | None = None
        self._preload_queue: list[str] = []
        self._preload_wake = threading.Condition()
        self._stopping = False
        self._preloader = threading.Thread(target=self._preload_loop, name="tracker-preload",
                                           daemon=True)
        # live tracking: the session, the one-slot hand-off, the worker and its counters
        self._live_lock = threading.Condition()
        self._live: LivePredictor | None = None
        self._live_clip: Clip | None = None
        self._live_session = 0
        self._live_slot: tuple[int, Any, float] | None = None  # (session, msg, arrival)
        self._live_trail: deque[LiveResult] = deque(maxlen=1)
        self._live_counts = {"received": 0, "processed": 0, "dropped": 0, "rejected": 0}
        self._live_times: deque[tuple[float, float, float]] = deque(maxlen=_LATENCY_WINDOW)
        self._camera_sub = None
        self._live_worker = threading.Thread(target=self._live_loop, name="tracker-live",
                                             daemon=True)
        super().__init__(node_name, namespace=namespace, **kwargs)
        self.params = NodeParams(self, TRACKER_PARAMS, CONFIG_SECTIONS)
        cfg = self.params.config()
        if cfg.backbone.random_init:
            self.get_logger().warning(RANDOM_INIT_WARNING)
        self._device = cfg.device
        self.add_post_set_parameters_callback(self._on_params)

        self._traj_pub = self.create_publisher(TrajectoryArray, "trajectories", 10)
        self._markers_pub = self.create_publisher(MarkerArray, "markers", 10)
        self._overlay_pub = self.create_publisher(
            Image, "overlay", QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        create_service(self, QueryTracks, "query_tracks", self._on_query,
                       callback_group=MutuallyExclusiveCallbackGroup())
        self.create_subscription(ClipInfo, "clips", self._on_clip_info, CLIPS_QOS,
                                 callback_group=MutuallyExclusiveCallbackGroup())
        rate = float(self.params.value("overlay_rate"))
        if rate > 0:
            self.create_timer(1.0 / rate, self._overlay_tick,
                              callback_group=MutuallyExclusiveCallbackGroup())
        self._live_pub = self.create_publisher(TrajectoryArray, "live", 10)
        self._camera_group = MutuallyExclusiveCallbackGroup()
        self._converter = ImageConverter()
        create_service(self, TrackLive, "track_live", self._on_track_live,
                       callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(float(self.params.value("live_stats_period")), self._log_live,
                          callback_group=MutuallyExclusiveCallbackGroup())
        self._preloader.start()
        self._live_worker.start()
        self.get_logger().info(f"ready: device {cfg.device}; clips in {self.params.clip_dir()}")

    # -- parameters ------------------------------------------------------------------------
    def _on_params(self, params: list[Parameter]) -> SetParametersResult:
        if any(p.name.startswith("track.") for p in params):
            with self._cache_lock:
                self._cache.clear()
        with self._cache_lock:
            self._trim()
        return SetParametersResult(successful=True)

    # -- predictors ------------------------------------------------------------------------
    def _predictor(self, clip: Clip) -> Predictor:
        """The clip's predictor from the LRU cache, opened (or reopened) when needed."""
        stamp = _model_stamp(clip)
        with self._cache_lock:
            entry = self._cache.get(clip.clip_id)
            if entry is not None and entry[0] == stamp and stamp:
                self._cache.move_to_end(clip.clip_id)
                return entry[1]
            self._cache.pop(clip.clip_id, None)
            predictor = Predictor.open(clip, device=self._device,
                                       track_cfg=self.params.config().track)
            self._cache[clip.clip_id] = (stamp, predictor)
            self._trim()
            return predictor

    def _trim(self) -> None:
        while len(self._cache) > int(self.params.value("cache_size")):
            self._cache.popitem(last=False)

    def _on_clip_info(self, info: ClipInfo) -> None:
        if info.state not in (ClipInfo.STATE_TRAINING, ClipInfo.STATE_READY):
            return
        with self._cache_lock:
            self._cache.pop(info.clip_id, None)
        if info.state == ClipInfo.STATE_READY and self.params.value("preload"):
            with self._preload_wake:
                # Only the newest few: at startup the transient-local history replays many.
                if info.clip_id in self._preload_queue:
                    self._preload_queue.remove(info.clip_id)
                self._preload_queue.append(info.clip_id)
                del self._preload_queue[:-int(self.params.value("cache_size"))]
                self._preload_wake.notify()

    def _preload_loop(self) -> None:
        while True:
            with self._preload_wake:
                while not self._preload_queue and not self._stopping:
                    self._preload_wake.wait()
                if self._stopping:
                    return
                clip_id = self._preload_queue.pop(0)
            try:
                self._predictor(open_clip(self.params.clip_dir(), clip_id))
            except Exception as exc:  # preloading is best effort; the query reports errors
                self.get_logger().info(f"preload of '{clip_id}' skipped: {exc}")

    # -- the service -----------------------------------------------------------------------
    def _on_query(self, request: QueryTracks.Request, response: QueryTracks.Response):
        t0 = time.monotonic()
        try:
            clip, result = self._track(request)
            response.tracks = trajectory_array(clip, result.queries, result.tracks,
                                               result.visible, result.visibility,
                                               result.stamps_ns)
        except DinoTrackerError as exc:
            response.success, response.message = False, str(exc)
            return response
        except Exception as exc:  # a bug must not kill the node
            self.get_logger().error(f"query_tracks failed: {exc!r}")
            response.success, response.message = False, f"internal error: {exc!r}"
            return response
        n, num_t = result.visible.shape
        response.success = True
        response.message = (f"tracked {n} points through {num_t} frames of '{clip.clip_id}' in "
                            f"{time.monotonic() - t0:.2f} s; {int(result.visible.sum())} of "
                            f"{result.visible.size} positions visible")
        self._publish_answer(response.tracks, clip, result)
        with self._overlay_lock:
            self._overlay = (clip, result, 0)
        return response

    def _publish_answer(self, tracks: TrajectoryArray, clip: Clip, result: TrackResult) -> None:
        """Publish an answer on ``trajectories`` and ``markers`` off the service thread.

        The response goes out without waiting (an answer of 1,000 points over 50 frames
        costs ~0.5 s to publish and ~0.2 s to draw as markers); answers are published in
        order, each from its own thread that first waits for the previous one. A topic
        without subscribers is skipped, its message not even built.
        """
        previous: threading.Thread | None = getattr(self, "_publishing", None)
        scale = float(self.params.value("marker_scale"))

        def publish() -> None:
            if previous is not None:
                previous.join()
            try:
                if self._traj_pub.get_subscription_count() > 0:
                    self._traj_pub.publish(tracks)
                if self._markers_pub.get_subscription_count() > 0:
                    self._markers_pub.publish(track_markers(
                        result.tracks, result.visible, result.visibility,
                        frame_id=clip.meta.frame_id, image_size=clip.size, scale=scale))
            except Exception as exc:  # e.g. the node was destroyed meanwhile
                self.get_logger().warning(f"publishing an answer failed: {exc!r}")

        self._publishing = threading.Thread(target=publish, name="tracker-publish", daemon=True)
        self._publishing.start()

    def _track(self, request: QueryTracks.Request) -> tuple[Clip, TrackResult]:
        root = self.params.clip_dir()
        clip = open_clip(root, request.clip_id) if request.clip_id else latest_trained_clip(root)
        queries = queries_from_msg(request.queries)
        if request.grid_step > 0:
            if request.grid_frame >= len(clip):
                raise QueryError(f"grid_frame {request.grid_frame} is outside the clip (frames "
                                 f"0..{len(clip) - 1})")
            grid = grid_queries(clip.size, int(request.grid_step), int(request.grid_frame))
            queries = np.concatenate([queries, grid], axis=0)
        if len(queries) == 0:
            raise QueryError("no queries: give query points or a grid_step > 0")
        limit = int(self.params.value("max_queries"))
        if len(queries) > limit:
            raise QueryError(f"{len(queries)} query points exceed max_queries={limit}; use a "
                             "larger grid_step or fewer points")
        cells, cap = len(queries) * len(clip), int(self.params.value("max_track_points"))
        if cells > cap:
            raise QueryError(f"{len(queries)} points x {len(clip)} frames = {cells} track "
                             f"points exceed max_track_points={cap}; query fewer points")
        return clip, self._predictor(clip).track(queries)

    # -- overlay ---------------------------------------------------------------------------
    def _overlay_tick(self) -> None:
        with self._overlay_lock:
            if self._overlay is None:
                return
            clip, result, t = self._overlay
            self._overlay = (clip, result, t + 1) if t + 1 < len(clip) else None
        try:
            frame = draw_tracks(clip.frame(t), result.tracks, result.visible, t,
                                trail=int(self.params.value("overlay_trail")))
        except Exception as exc:  # e.g. the clip vanished from disk meanwhile
            self.get_logger().warning(f"overlay stopped: {exc}")
            with self._overlay_lock:
                self._overlay = None
            return
        self._overlay_pub.publish(rgb_to_image(frame, int(result.stamps_ns[t]),
                                               clip.meta.frame_id))

    # -- live tracking ---------------------------------------------------------------------
    def live_stats(self) -> LiveStats:
        """A snapshot of the live-tracking counters (rate and latencies over recent frames)."""
        with self._live_lock:
            live, times = self._live, list(self._live_times)
            counts = dict(self._live_counts)
        fps = 0.0
        if len(times) > 1 and times[-1][0] > times[0][0]:
            fps = (len(times) - 1) / (times[-1][0] - times[0][0])
        lat = np.array([t[1] for t in times]) * 1e3
        pipe = np.array([t[2] for t in times]) * 1e3
        nan = float("nan")
        return LiveStats(
            active=live is not None, clip_id=live.clip_id if live else "",
            queries=live.num_queries if live else 0, fps=fps,
            latency_ms=float(np.median(lat)) if len(lat) else nan,
            latency_p90_ms=float(np.percentile(lat, 90)) if len(lat) else nan,
            pipeline_ms=float(np.median(pipe)) if len(pipe) else nan, **counts)

    def _on_track_live(self, request: TrackLive.Request, response: TrackLive.Response):
        try:
            response.message = (self._start_live(request) if request.enable
                                else self._stop_live())
            response.success = True
        except DinoTrackerError as exc:
            response.success, response.message = False, str(exc)
        except Exception as exc:  # a bug must not kill the node
            self.get_logger().error(f"track_live failed: {exc!r}")
            response.success, response.message = False, f"internal error: {exc!r}"
        if response.success:
            self.get_logger().info(response.message)
        return response

    def _start_live(self, request: TrackLive.Request) -> str:
        root = self.params.clip_dir()
        clip = open_clip(root, request.clip_id) if request.clip_id else latest_trained_clip(root)
        queries = queries_from_msg(request.queries)
        if len(queries) == 0:
            raise QueryError("no queries: give query points on the clip's frames to track live "
                             "(enable: false stops live tracking)")
        limit = int(self.params.value("max_queries"))
        if len(queries) > limit:
            raise QueryError(f"{len(queries)} query points exceed max_queries={limit}; give "
                             "fewer points")
        validate_queries(queries, len(clip), clip.size)
        live = LivePredictor.open(clip, queries, device=self._device,
                                  track_cfg=self.params.config().track,
                                  predictor=self._predictor(clip))
        with self._live_lock:
            self._live, self._live_clip = live, clip
            self._live_session += 1
            self._live_slot = None
            self._live_trail = deque(maxlen=int(self.params.value("overlay_trail")) + 1)
            self._live_counts = dict.fromkeys(self._live_counts, 0)
            self._live_times.clear()
            if self._camera_sub is None:
                self._camera_sub = self._subscribe_camera()
            topic = self._camera_sub.topic_name
        kind = "CompressedImage" if self.params.value("compressed") else "Image"
        return (f"live tracking {len(queries)} points of '{clip.clip_id}' on {topic} ({kind}, "
                f"{self.params.value('reliability')}); results on {self._live_pub.topic_name}")

    def _stop_live(self) -> str:
        with self._live_lock:
            was = self._live
            stats = self.live_stats() if was is not None else None
            self._live, self._live_clip = None, None
            self._live_session += 1
            self._live_slot = None
            sub, self._camera_sub = self._camera_sub, None
        if sub is not None:
            self.destroy_subscription(sub)
        if stats is None:
            return "live tracking was not running"
        return f"live tracking stopped; {stats.line()}"

    def _subscribe_camera(self):
        p = self.params.value
        qos = camera_qos(str(p("reliability")), p("qos_depth"))
        msg_type = CompressedImage if p("compressed") else Image
        return self.create_subscription(msg_type, str(p("image_topic")), self._on_camera, qos,
                                        callback_group=self._camera_group)

    def _on_camera(self, msg) -> None:
        """Hand the newest frame to the worker (drop-oldest, one slot)."""
        with self._live_lock:
            if self._live is None:
                return
            self._live_counts["received"] += 1
            if self._live_slot is not None:
                self._live_counts["dropped"] += 1
            self._live_slot = (self._live_session, msg, time.monotonic())
            self._live_lock.notify()

    def _live_loop(self) -> None:
        while True:
            with self._live_lock:
                while self._live_slot is None and not self._stopping:
                    self._live_lock.wait()
                if self._stopping:
                    return
                (session, msg, arrival), self._live_slot = self._live_slot, None
                live, clip = self._live, self._live_clip
            if live is None or clip is None:
                continue
            try:
                self._process_live(live, clip, session, msg, arrival)
            except Exception as exc:  # a bad frame must not end live tracking
                with self._live_lock:
                    self._live_counts["rejected"] += 1
                self.get_logger().warning(f"live frame rejected: {exc}",
                                          throttle_duration_sec=5.0)

    def _process_live(self, live: LivePredictor, clip: Clip, session: int, msg: Any,
                      arrival: float) -> None:
        if isinstance(msg, CompressedImage):
            rgb = self._converter.compressed_to_rgb(msg)
        else:
            rgb = self._converter.to_rgb(msg)
        stamp = stamp_to_ns(msg.header.stamp) or self.get_clock().now().nanoseconds
        result = live.step(rgb, stamp)
        frame_id = msg.header.frame_id or clip.meta.frame_id
        out = trajectory_array(clip, live.queries, result.positions[:, None],
                               result.visible[:, None], result.visibility[:, None], [stamp])
        out.width, out.height = result.size_hw[1], result.size_hw[0]
        out.header.frame_id = frame_id  # the stamp is the frame's (stamps_ns above)
        with self._live_lock:
            if session != self._live_session:
                return  # stopped or restarted meanwhile: publish nothing of the old session
            trail = self._live_trail
            if trail and trail[-1].size_hw != result.size_hw:
                trail.clear()
            trail.append(result)
            tracks = np.stack([r.positions for r in trail], axis=1)  # (N, K, 2)
            visible = np.stack([r.visible for r in trail], axis=1)
            score = np.stack([r.visibility for r in trail], axis=1)
            self._live_pub.publish(out)
            now = time.monotonic()
            self._live_counts["processed"] += 1
            self._live_times.append(
                (now, (self.get_clock().now().nanoseconds - stamp) / 1e9, now - arrival))
        if self._markers_pub.get_subscription_count():
            self._markers_pub.publish(track_markers(
                tracks, visible, score, frame_id=frame_id, image_size=result.size_hw,
                scale=float(self.params.value("marker_scale"))))
        if self._overlay_pub.get_subscription_count():
            img = draw_tracks(rgb, tracks, visible, tracks.shape[1] - 1,
                              trail=tracks.shape[1] - 1)
            self._overlay_pub.publish(rgb_to_image(img, stamp, frame_id))

    def _log_live(self) -> None:
        stats = self.live_stats()
        if stats.active and stats.received:
            self.get_logger().info(stats.line())

    # -- shutdown --------------------------------------------------------------------------
    def stop(self) -> None:
        """End the preloading and live-tracking threads."""
        with self._preload_wake:
            self._stopping = True
            self._preload_wake.notify_all()
        with self._live_lock:
            self._live_lock.notify_all()
        for thread in (self._preloader, self._live_worker):
            if thread.is_alive() and threading.current_thread() is not thread:
                thread.join(30.0)


def main(args: list[str] | None = None) -> int:
    """``ros2 run dino_tracker_ros tracker``."""
    return run_nodes([TrackerNode], args)


if __name__ == "__main__":
    raise SystemExit(main())
