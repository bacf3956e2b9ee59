"""The trainer node: the ``train_clip`` action over :func:`core.trainer.train_clip`.

Jobs run one at a time, in acceptance order, on one worker thread of the node, so the
executor keeps serving (feedback, cancel requests, other nodes in the same process)
while a clip trains. The pattern follows ros2/examples' action servers:

* ``handle_accepted_callback`` queues each accepted goal; the worker calls
  ``goal_handle.execute()`` when the goal's turn comes, and the execute callback (in a
  reentrant group) only waits for the job and sets the terminal state, so at most one
  executor thread waits at a time however many goals are queued;
* feedback is republished every ``feedback_period`` seconds (at least once a second) from
  the latest core progress: stage (``queued`` while waiting), progress over the whole job,
  iteration, total iterations, loss;
* cancel sets the job's :class:`~dino_tracker_ros.core.progress.CancelToken`; the core
  stops before its next iteration, keeps the last checkpoint (``train again to resume``)
  and the goal ends canceled. A queued goal is canceled at once.

Errors (unknown clip, iterations out of range, missing weights, ...) abort the goal with
``success: false`` and the core's one-line message. The node publishes the clip's state on
``clips`` (TRAINING when a job starts, READY or FAILED when it ends; RECORDED again after a
cancel).

``auto_train: true`` trains every clip announced on ``clips`` as RECORDED whose stored
state is still ``recorded`` (so a clip is never trained twice, and the node's own state
updates are ignored), and, at startup, resumes clips whose last training was interrupted
(the process died mid-job) from their checkpoint.

A randomly initialised backbone (``backbone.random_init: true``) is only used when set
explicitly; the node then warns at startup and in every result message.

Crashes and disk errors: a job interrupted by ``kill -9`` leaves the clip's last checkpoint
and the finished preprocessing stages; ``list_clips`` then reports the clip FAILED with
``interrupted at iteration k; train again to resume``, and the next ``train_clip`` (or the
restart with ``auto_train``) resumes from that checkpoint, skipping finished stages. A full
or read-only disk aborts the goal with the one-line reason (nothing half-written is kept).
The worker thread survives any error of a job. At startup the node removes temporaries that
a killed process left in ``clip_dir``.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup

from dino_tracker_msgs.action import TrainClip
from dino_tracker_msgs.msg import ClipInfo

from ..core.clip import Clip, list_clips, open_clip, sweep_clip_dir
from ..core.config import Config
from ..core.errors import Cancelled, DinoTrackerError
from ..core.progress import CancelToken, Progress
from ..core.storage import disk_error, load_optional_json
from ..core.trainer import train_clip, train_status
from .conversions import CLIP_STATES, clip_info
from .params import CLIP_DIR, DEVICE, PROFILE, NodeParams, ParamSpec
from .runtime import CLIPS_QOS, DEFAULT_NAMESPACE, SERVICE_QOS, StoppableNode, run_nodes

__all__ = ["CONFIG_SECTIONS", "RANDOM_INIT_WARNING", "TRAINER_PARAMS", "TrainerNode", "main"]

#: Core schema sections the trainer and the tracker mirror as dotted parameters.
CONFIG_SECTIONS = ("backbone", "preprocess", "model", "train", "track")

TRAINER_PARAMS = (
    CLIP_DIR,
    PROFILE,
    DEVICE,
    ParamSpec("auto_train", False,
              "train every newly announced clip, and resume interrupted jobs at startup"),
    ParamSpec("feedback_period", 0.5, "seconds between action feedback messages", 0.05, 1.0,
              read_only=True),
)

RANDOM_INIT_WARNING = (
    "WARNING: backbone.random_init is true: the DINOv2 backbone is RANDOMLY INITIALISED "
    "(tests/offline demo only); tracks are far less accurate than with real weights"
)

_STOP_WAIT_S = 30.0


@dataclass
class _Job:
    """One training job (from a goal, or from auto_train when ``goal`` is None)."""

    clip_id: str
    iterations: int | None
    goal: ServerGoalHandle | None = None
    token: CancelToken = field(default_factory=CancelToken)
    done: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    total: int = 0  # iterations the job trains to
    iteration: int = 0  # latest training iteration reported
    progress: Progress | None = None
    outcome: str = ""  # succeeded | aborted | canceled
    result: TrainClip.Result = field(default_factory=TrainClip.Result)

    def finish(self, outcome: str, message: str, **fields) -> None:
        self.outcome = outcome
        self.result.success = outcome == "succeeded"
        self.result.message = message
        for key, value in fields.items():
            setattr(self.result, key, value)
        self.done.set()


class TrainerNode(StoppableNode):
    """ROS adapter of the core trainer (see the module docstring).

    Args:
        node_name: node name.
        namespace: node namespace (``--ros-args -r __ns:=...`` overrides it).
        kwargs: passed to :class:`rclpy.node.Node` (e.g. ``context``).
    """

    def __init__(self, node_name: str = "trainer", namespace: str = DEFAULT_NAMESPACE,
                 **kwargs: Any) -> None:
        # Set before the node exists: a failed construction still calls stop().
        self._lock = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._jobs: dict[bytes, _Job] = {}
        self._current: _Job | None = None
        self._stopping = False
        self._auto_seen: set = set()
        self._worker = threading.Thread(target=self._work, name="trainer-worker", daemon=True)
        super().__init__(node_name, namespace=namespace, **kwargs)
        self.params = NodeParams(self, TRAINER_PARAMS, CONFIG_SECTIONS)
        cfg = self.params.config()
        if cfg.backbone.random_init:
            self.get_logger().warning(RANDOM_INIT_WARNING)

        group = ReentrantCallbackGroup()
        self._action = ActionServer(
            self, TrainClip, "train_clip",
            execute_callback=self._execute,
            goal_callback=lambda _goal: GoalResponse.ACCEPT,
            handle_accepted_callback=self._on_accepted,
            cancel_callback=self._on_cancel,
            callback_group=group,
            goal_service_qos_profile=SERVICE_QOS,
            result_service_qos_profile=SERVICE_QOS,
            cancel_service_qos_profile=SERVICE_QOS,
            result_timeout=3600,
        )
        self._clips_pub = self.create_publisher(ClipInfo, "clips", CLIPS_QOS)
        self.create_subscription(ClipInfo, "clips", self._on_clip_info, CLIPS_QOS,
                                 callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(float(self.params.value("feedback_period")), self._publish_feedback,
                          callback_group=group)
        sweep_clip_dir(self.params.clip_dir())
        self._worker.start()
        if self.params.value("auto_train"):
            self._resume_interrupted()
        self.get_logger().info(
            f"ready: profile {cfg.profile}, device {cfg.device}, backbone {cfg.backbone.model}, "
            f"{cfg.train.iterations} iterations by default; clips in {self.params.clip_dir()}"
        )

    # -- action callbacks ------------------------------------------------------------------
    def _on_accepted(self, goal: ServerGoalHandle) -> None:
        request = goal.request
        job = _Job(request.clip_id, int(request.iterations) or None, goal)
        with self._lock:
            self._jobs[bytes(goal.goal_id.uuid)] = job
            error = self._check(job)
            if error is None:
                self._queue.append(job)
                self._lock.notify_all()
        if error is not None:
            job.finish("aborted", error)
            goal.execute()

    def _check(self, job: _Job) -> str | None:
        """Why a job cannot be queued (lock held), or None."""
        if self._stopping:
            return "the trainer is shutting down"
        try:
            open_clip(self.params.clip_dir(), job.clip_id)
            cfg = self.params.config()
            if job.iterations is not None:
                cfg = cfg.replace(**{"train.iterations": job.iterations})
            job.total = cfg.train.iterations
        except DinoTrackerError as exc:
            return str(exc)
        except Exception as exc:  # a bug must not kill the node
            return f"internal error: {exc!r}"
        busy = [j for j in [self._current, *self._queue] if j and j.clip_id == job.clip_id]
        if busy:
            return (f"clip '{job.clip_id}' is already queued or training; wait for that job "
                    "or cancel it")
        return None

    def _on_cancel(self, goal: ServerGoalHandle) -> CancelResponse:
        job = self._jobs.get(bytes(goal.goal_id.uuid))
        if job is None or job.done.is_set():
            return CancelResponse.REJECT
        job.token.cancel()
        with self._lock:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
        if queued:
            job.finish("canceled", f"training of '{job.clip_id}' canceled before it started")
            goal.execute()
        return CancelResponse.ACCEPT

    def _execute(self, goal: ServerGoalHandle) -> TrainClip.Result:
        job = self._jobs[bytes(goal.goal_id.uuid)]
        job.done.wait()
        if job.outcome == "canceled":
            # A cancel accepted in _on_cancel reaches CANCELING just after it returns.
            deadline = time.monotonic() + 2.0
            while not goal.is_cancel_requested and time.monotonic() < deadline:
                time.sleep(0.01)
        if job.outcome == "succeeded":
            goal.succeed()
        elif job.outcome == "canceled" and goal.is_cancel_requested:
            goal.canceled()
        else:
            goal.abort()
        with self._lock:
            self._jobs.pop(bytes(goal.goal_id.uuid), None)
        return job.result

    def _publish_feedback(self) -> None:
        with self._lock:
            jobs = [j for j in [self._current, *self._queue] if j is not None and j.goal]
        for job in jobs:
            p = job.progress
            fb = TrainClip.Feedback(iteration=job.iteration, total_iterations=job.total)
            if not job.started:
                fb.stage = "queued"
            elif p is None:
                fb.stage = "starting"
            else:
                fb.stage, fb.progress, fb.loss = p.stage, float(p.fraction), float(p.loss)
            job.goal.publish_feedback(fb)

    # -- clips topic -------------------------------------------------------------------------
    def _on_clip_info(self, info: ClipInfo) -> None:
        if info.state != ClipInfo.STATE_RECORDED or not self.params.value("auto_train"):
            return
        if info.clip_id in self._auto_seen:
            return
        self._auto_seen.add(info.clip_id)
        try:
            clip = open_clip(self.params.clip_dir(), info.clip_id)
            state = train_status(clip).state
        except Exception as exc:  # unknown here, unreadable state: skip, keep the node alive
            self.get_logger().warning(f"auto_train: cannot use announced clip: {exc}")
            return
        if state == "recorded":
            self._enqueue_auto(info.clip_id, "announced")

    def _resume_interrupted(self) -> None:
        for clip in list_clips(self.params.clip_dir()):
            try:
                status = train_status(clip)
            except Exception as exc:  # an unreadable train.json: leave that clip alone
                self.get_logger().warning(f"auto_train: skipping '{clip.clip_id}': {exc}")
                continue
            if status.state == "failed" and status.message.startswith("interrupted"):
                self._auto_seen.add(clip.clip_id)
                self._enqueue_auto(clip.clip_id, f"resuming ({status.message})")

    def _enqueue_auto(self, clip_id: str, why: str) -> None:
        job = _Job(clip_id, None)
        with self._lock:
            error = self._check(job)
            if error is None:
                self._queue.append(job)
                self._lock.notify_all()
        if error is None:
            self.get_logger().info(f"auto_train: queued '{clip_id}' ({why})")

    # -- the worker ------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                job.started = True
                self._current = job
            self._auto_seen.add(job.clip_id)  # its own state updates must not re-queue it
            if job.goal is not None:
                job.goal.execute()
            try:
                self._run(job)
            except Exception as exc:  # the worker must outlive any job
                self.get_logger().error(f"training of '{job.clip_id}' ended badly: {exc!r}")
                if not job.done.is_set():
                    job.finish("aborted", f"internal error: {exc!r}")
            finally:
                with self._lock:
                    self._current = None

    def _run(self, job: _Job) -> None:
        log = self.get_logger()
        clip: Clip | None = None
        try:
            clip = open_clip(self.params.clip_dir(), job.clip_id)
            cfg: Config = self.params.config()
            total = job.total = job.iterations or cfg.train.iterations
            self._announce(clip, ClipInfo.STATE_TRAINING,
                           f"training: {total} iterations, profile {cfg.profile}")
            if cfg.backbone.random_init:
                log.warning(RANDOM_INIT_WARNING)
            log.info(f"training '{job.clip_id}' for {total} iterations")
            result = train_clip(clip, cfg, iterations=job.iterations,
                                progress=self._progress_sink(job), cancel=job.token)
        except Cancelled as exc:
            if self._stopping:
                message = f"the trainer shut down: training of '{job.clip_id}' {exc}"
                job.finish("aborted", message)
            else:
                message = f"training of '{job.clip_id}' canceled: {exc}"
                job.finish("canceled", message)
            self._announce_status(clip, message)
            log.info(message)
            return
        except (DinoTrackerError, OSError) as exc:
            message = (str(exc) if isinstance(exc, DinoTrackerError)
                       else str(disk_error(exc.filename or job.clip_id, exc)))
            job.finish("aborted", message)
            self._announce_status(clip, message, failed=True)
            log.error(f"training of '{job.clip_id}' failed: {message}")
            return
        except Exception as exc:  # a bug must not kill the node or leave the goal hanging
            message = f"internal error: {type(exc).__name__}: {exc}"
            job.finish("aborted", message)
            self._announce_status(clip, message, failed=True)
            log.error(f"training of '{job.clip_id}' failed: {message}")
            return
        message = (f"trained '{job.clip_id}' to iteration {result.iterations} in "
                   f"{result.seconds:.1f} s, final loss {result.final_loss:.4g}")
        if result.resumed_from:
            message += f" (resumed from iteration {result.resumed_from})"
        if cfg.backbone.random_init:
            message += f"; {RANDOM_INIT_WARNING}"
        loss = result.final_loss if math.isfinite(result.final_loss) else float("nan")
        job.finish("succeeded", message, model_path=str(result.model_path),
                   final_loss=float(loss), seconds=float(result.seconds))
        self._announce(clip, ClipInfo.STATE_READY, message)
        log.info(message)

    def _progress_sink(self, job: _Job):
        def sink(progress: Progress) -> None:
            if progress.stage == "training":
                job.iteration, job.total = int(progress.step), int(progress.total)
            job.progress = progress

        return sink

    def _announce(self, clip: Clip, state: int, message: str) -> None:
        try:
            self._clips_pub.publish(clip_info(clip, state, message))
        except Exception as exc:  # the context is gone when a signal stopped the process
            if not self._stopping:
                raise
            self.get_logger().debug(f"state of '{clip.clip_id}' not announced: {exc}")

    def _announce_status(self, clip: Clip | None, message: str, failed: bool = False) -> None:
        """Publish the clip's stored state after a job ended early."""
        if clip is None:
            return
        self._drop_stale_status(clip)
        if failed:
            self._announce(clip, ClipInfo.STATE_FAILED, message)
            return
        try:
            state = CLIP_STATES.get(train_status(clip).state, ClipInfo.STATE_RECORDED)
        except DinoTrackerError:  # the clip vanished or broke meanwhile
            state = ClipInfo.STATE_FAILED
        self._announce(clip, state, message)

    def _drop_stale_status(self, clip: Clip) -> None:
        """A job that ended could not always record it (a full disk refuses even the small
        ``train.json``): a record still saying ``training`` for this live process would show
        the clip as TRAINING until the node restarts. Remove it (an unlink needs no space);
        the clip then reads as its model files say (READY with a model, else RECORDED)."""
        path = clip.model_dir / "train.json"
        try:
            rec = load_optional_json(path)
            if (isinstance(rec, dict) and rec.get("state") == "training"
                    and rec.get("pid") == os.getpid()
                    and rec.get("host") == socket.gethostname()):  # ours, no other job's
                path.unlink(missing_ok=True)
                self.get_logger().warning(f"removed the stale training record {path}")
        except (ValueError, OSError) as exc:
            self.get_logger().warning(f"cannot clear the training record {path}: {exc}")

    # -- shutdown --------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel the running job, abort queued ones, and join the worker."""
        with self._lock:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            current = self._current
            self._lock.notify_all()
        if current is not None:
            current.token.cancel()
        for job in queued:
            job.finish("aborted", "the trainer shut down before this job started")
        if self._worker.is_alive() and threading.current_thread() is not self._worker:
            self._worker.join(_STOP_WAIT_S)
        for job in list(self._jobs.values()):
            if not job.done.is_set():
                job.finish("aborted", "the trainer shut down")


def main(args: list[str] | None = None) -> int:
    """``ros2 run dino_tracker_ros trainer``."""
    return run_nodes([TrainerNode], args)


if __name__ == "__main__":
    raise SystemExit(main())
