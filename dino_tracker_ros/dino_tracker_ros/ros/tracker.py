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

The tracker mirrors the whole core schema as parameters so one params file serves trainer
and tracker alike, but only ``device`` and ``track.*`` affect it (a model's own settings
come from its checkpoint); ``backbone.random_init: true`` makes it warn at startup.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from visualization_msgs.msg import MarkerArray

from dino_tracker_msgs.msg import ClipInfo, TrajectoryArray
from dino_tracker_msgs.srv import QueryTracks

from ..core.clip import Clip, list_clips, open_clip
from ..core.errors import DinoTrackerError, NotTrainedError, QueryError
from ..core.predictor import Predictor, TrackResult, grid_queries
from ..core.render import draw_tracks
from ..core.trainer import train_status
from .conversions import queries_from_msg, rgb_to_image, trajectory_array
from .markers import track_markers
from .params import CLIP_DIR, DEVICE, PROFILE, NodeParams, ParamSpec
from .runtime import CLIPS_QOS, DEFAULT_NAMESPACE, StoppableNode, run_nodes
from .trainer import CONFIG_SECTIONS, RANDOM_INIT_WARNING

__all__ = ["TRACKER_PARAMS", "TrackerNode", "latest_trained_clip", "main"]

TRACKER_PARAMS = (
    CLIP_DIR,
    PROFILE,
    DEVICE,
    ParamSpec("cache_size", 2, "trained clips whose predictors stay open (LRU)", 1, 64),
    ParamSpec("max_queries", 20000, "largest number of points one request may track", 1,
              10_000_000),
    ParamSpec("overlay_rate", 10.0, "frames per second of the overlay replay (0: no overlay)",
              0.0, 120.0, read_only=True),
    ParamSpec("overlay_trail", 8, "frames of trail drawn behind each point in the overlay", 0,
              1000),
    ParamSpec("marker_scale", 0.01, "metres per image pixel in the RViz markers", 1e-6,
              100.0),
    ParamSpec("preload", True, "open a clip's predictor in the background when it becomes "
              "READY"),
)


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
        self.create_service(QueryTracks, "query_tracks", self._on_query,
                            callback_group=MutuallyExclusiveCallbackGroup())
        self.create_subscription(ClipInfo, "clips", self._on_clip_info, CLIPS_QOS,
                                 callback_group=MutuallyExclusiveCallbackGroup())
        rate = float(self.params.value("overlay_rate"))
        if rate > 0:
            self.create_timer(1.0 / rate, self._overlay_tick,
                              callback_group=MutuallyExclusiveCallbackGroup())
        self._preloader.start()
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
            markers = track_markers(
                result.tracks, result.visible, result.visibility, frame_id=clip.meta.frame_id,
                image_size=clip.size, scale=float(self.params.value("marker_scale")))
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
        self._traj_pub.publish(response.tracks)
        self._markers_pub.publish(markers)
        with self._overlay_lock:
            self._overlay = (clip, result, 0)
        return response

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

    # -- shutdown --------------------------------------------------------------------------
    def stop(self) -> None:
        """End the preloading thread."""
        with self._preload_wake:
            self._stopping = True
            self._preload_wake.notify_all()
        if self._preloader.is_alive() and threading.current_thread() is not self._preloader:
            self._preloader.join(30.0)


def main(args: list[str] | None = None) -> int:
    """``ros2 run dino_tracker_ros tracker``."""
    return run_nodes([TrackerNode], args)


if __name__ == "__main__":
    raise SystemExit(main())
