"""The interfaces over real DDS between processes (loopback, this run's own ROS_DOMAIN_ID).

Each test starts this very file as a peer process (``python test_foundation_dds.py ROLE``)
that publishes a TrajectoryArray, serves QueryTracks or serves the TrainClip action, and
talks to it from the test process with rclpy from the wheels (or the sourced distro).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import rclpy
from rclpy.action import ActionClient, ActionServer, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import (
    ExternalShutdownException,
    MultiThreadedExecutor,
    SingleThreadedExecutor,
)
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future

from dino_tracker_msgs.action import TrainClip
from dino_tracker_msgs.msg import QueryPoint, TrackPoint, Trajectory, TrajectoryArray
from dino_tracker_msgs.srv import QueryTracks

NAMESPACE = "/foundation_test"
LATCHED = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)
# the small clip the test server pretends to hold
CLIP_ID, WIDTH, HEIGHT, FRAMES = "foundation_clip", 64, 48, 10
DEFAULT_ITERATIONS = 4


# -- shared by peer and test: the data ----------------------------------------------------
@dataclass(frozen=True)
class Tracks:
    """Expected trajectory data: ``xy (N, T, 2) float32``, ``vis (N, T) float32``."""

    xy: np.ndarray
    vis: np.ndarray
    query_frames: np.ndarray  # (N,) int


def reference_tracks(num_tracks: int = 12, num_frames: int = 30) -> Tracks:
    """A deterministic set of random tracks (12 x 30 = 360 points by default)."""
    rng = np.random.default_rng(7)
    xy = (rng.random((num_tracks, num_frames, 2)) * [639.0, 479.0]).astype(np.float32)
    vis = rng.random((num_tracks, num_frames)).astype(np.float32)
    return Tracks(xy, vis, np.arange(num_tracks) % num_frames)


def stamp_of(frame: int) -> tuple[int, int]:
    """(sec, nanosec) of a clip frame at 10 fps starting at t = 100 s."""
    return 100 + frame // 10, (frame % 10) * 100_000_000


def tracks_message(tracks: Tracks) -> TrajectoryArray:
    """Build the TrajectoryArray the publisher peer sends."""
    msg = TrajectoryArray(clip_id="reference", width=640, height=480)
    msg.header.frame_id = "camera_optical_frame"
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp_of(0)
    rows = zip(tracks.xy, tracks.vis, tracks.query_frames, strict=True)
    for i, (xy, vis, qf) in enumerate(rows):
        traj = Trajectory(id=i)
        traj.query = QueryPoint(frame=int(qf), x=float(xy[qf, 0]), y=float(xy[qf, 1]))
        for t in range(len(xy)):
            point = TrackPoint(x=float(xy[t, 0]), y=float(xy[t, 1]), visibility=float(vis[t]))
            point.visible = bool(vis[t] >= 0.5)
            point.stamp.sec, point.stamp.nanosec = stamp_of(t)
            traj.points.append(point)
        msg.trajectories.append(traj)
    return msg


def answer_query(request: QueryTracks.Request) -> QueryTracks.Response:
    """The test server's answer: query k moves by (+1.5, -0.5) px per frame from its frame."""
    response = QueryTracks.Response()
    if request.clip_id not in ("", CLIP_ID):
        response.message = f"unknown clip id {request.clip_id!r}; call list_clips for the ids"
        return response
    queries = [(q.frame, q.x, q.y) for q in request.queries]
    if request.grid_step > 0:
        queries += [
            (request.grid_frame, float(x), float(y))
            for y in range(0, HEIGHT, request.grid_step)
            for x in range(0, WIDTH, request.grid_step)
        ]
    for k, (frame, x, y) in enumerate(queries):
        if frame >= FRAMES or not (0 <= x <= WIDTH - 1 and 0 <= y <= HEIGHT - 1):
            response.message = f"query {k} outside the clip (frame < {FRAMES}, {WIDTH}x{HEIGHT})"
            return response
    tracks = response.tracks
    tracks.clip_id, tracks.width, tracks.height = CLIP_ID, WIDTH, HEIGHT
    for k, (frame, x, y) in enumerate(queries):
        traj = Trajectory(id=k, query=QueryPoint(frame=frame, x=x, y=y))
        for t in range(FRAMES):
            visible = (t + k) % 3 != 0
            traj.points.append(
                TrackPoint(
                    x=x + 1.5 * (t - frame),
                    y=y - 0.5 * (t - frame),
                    visible=visible,
                    visibility=1.0 if visible else 0.25,
                )
            )
        tracks.trajectories.append(traj)
    response.success, response.message = True, f"{len(queries)} tracks"
    return response


# -- the peer process -----------------------------------------------------------------------
def _execute_training(goal_handle: ServerGoalHandle) -> TrainClip.Result:
    """The test action: feedback per step, result; aborts on an empty clip id."""
    goal = goal_handle.request
    start = time.monotonic()
    if not goal.clip_id:
        goal_handle.abort()
        return TrainClip.Result(success=False, message="clip_id is empty: name a stored clip")
    total = goal.iterations or DEFAULT_ITERATIONS
    goal_handle.publish_feedback(TrainClip.Feedback(stage="flow", total_iterations=total))
    for i in range(1, total + 1):
        time.sleep(0.05)
        goal_handle.publish_feedback(
            TrainClip.Feedback(
                stage="training", progress=i / total, iteration=i, total_iterations=total,
                loss=1.0 / i,
            )
        )
    goal_handle.succeed()
    return TrainClip.Result(
        success=True,
        message=f"trained {goal.clip_id} for {total} iterations",
        model_path=f"/clips/{goal.clip_id}/model/model.pt",
        final_loss=1.0 / total,
        seconds=time.monotonic() - start,
    )


def serve(role: str) -> None:
    """Run the peer: ``role`` is ``topic``, ``service`` or ``action``; stops on SIGINT."""
    rclpy.init()
    node = rclpy.create_node(f"foundation_peer_{role}", namespace=NAMESPACE)
    group = ReentrantCallbackGroup()
    if role == "topic":
        publisher = node.create_publisher(TrajectoryArray, "trajectories", LATCHED)
        publisher.publish(tracks_message(reference_tracks()))
    elif role == "service":
        node.create_service(
            QueryTracks, "query_tracks", lambda req, resp: answer_query(req), callback_group=group
        )
    elif role == "action":
        ActionServer(
            node, TrainClip, "train_clip", execute_callback=_execute_training,
            goal_callback=lambda goal: GoalResponse.ACCEPT, callback_group=group,
        )
    else:
        raise SystemExit(f"unknown role {role!r}")
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    print("READY", flush=True)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


# -- the tests ------------------------------------------------------------------------------
@dataclass
class Client:
    """An rclpy node in its own context, with an executor to spin it."""

    node: Node
    executor: SingleThreadedExecutor

    def wait(self, future: Future, timeout: float = 20.0) -> Any:
        """Spin until ``future`` is done; its result."""
        self.executor.spin_until_future_complete(future, timeout_sec=timeout)
        assert future.done(), f"no answer within {timeout} s"
        return future.result()


@pytest.fixture
def client() -> Iterator[Client]:
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("foundation_test_client", namespace=NAMESPACE, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        yield Client(node, executor)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


@pytest.mark.timeout(60)
def test_trajectory_array_crosses_processes_intact(spawn_python, client: Client) -> None:
    peer = spawn_python(__file__, "topic")
    peer.wait_for("READY")
    received: list[TrajectoryArray] = []
    client.node.create_subscription(TrajectoryArray, "trajectories", received.append, LATCHED)
    deadline = time.monotonic() + 20.0
    while not received and time.monotonic() < deadline:
        client.executor.spin_once(timeout_sec=0.1)
    assert received, "no TrajectoryArray within 20 s:\n" + peer.output()

    msg, ref = received[0], reference_tracks()
    assert (msg.clip_id, msg.width, msg.height) == ("reference", 640, 480)
    assert msg.header.frame_id == "camera_optical_frame"
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == stamp_of(0)
    assert [t.id for t in msg.trajectories] == list(range(len(ref.xy)))
    xy = np.array([[(p.x, p.y) for p in t.points] for t in msg.trajectories], np.float32)
    vis = np.array([[p.visibility for p in t.points] for t in msg.trajectories], np.float32)
    visible = np.array([[p.visible for p in t.points] for t in msg.trajectories])
    stamps = [[(p.stamp.sec, p.stamp.nanosec) for p in t.points] for t in msg.trajectories]
    assert xy.shape == (12, 30, 2) and xy.size // 2 == 360
    np.testing.assert_array_equal(xy, ref.xy)  # float32 survives the wire bit for bit
    np.testing.assert_array_equal(vis, ref.vis)
    np.testing.assert_array_equal(visible, ref.vis >= 0.5)
    assert all(row == [stamp_of(t) for t in range(30)] for row in stamps)
    queries = np.array([(t.query.frame, t.query.x, t.query.y) for t in msg.trajectories])
    np.testing.assert_array_equal(queries[:, 0], ref.query_frames)
    rows = np.arange(len(ref.xy))
    np.testing.assert_array_equal(queries[:, 1:], ref.xy[rows, ref.query_frames])


@pytest.mark.timeout(60)
def test_query_tracks_service_answers_across_processes(spawn_python, client: Client) -> None:
    peer = spawn_python(__file__, "service")
    peer.wait_for("READY")
    service = client.node.create_client(QueryTracks, "query_tracks")
    assert service.wait_for_service(timeout_sec=20.0), "service not found:\n" + peer.output()

    request = QueryTracks.Request(
        queries=[QueryPoint(frame=0, x=1.0, y=2.0), QueryPoint(frame=5, x=63.0, y=47.0)],
        grid_step=16,
        grid_frame=2,
    )
    answer = client.wait(service.call_async(request))
    assert answer.success, answer.message
    tracks = answer.tracks
    assert (tracks.clip_id, tracks.width, tracks.height) == (CLIP_ID, WIDTH, HEIGHT)
    # 2 queries, then the grid on frame 2: x in 0, 16, 32, 48 and y in 0, 16, 32
    assert len(tracks.trajectories) == 2 + 4 * 3
    grid = [(t.query.frame, t.query.x, t.query.y) for t in tracks.trajectories[2:]]
    assert grid == [(2, float(x), float(y)) for y in (0, 16, 32) for x in (0, 16, 32, 48)]
    second = tracks.trajectories[1]
    assert second.id == 1 and len(second.points) == FRAMES
    assert [(p.x, p.y) for p in second.points] == [
        (63.0 + 1.5 * (t - 5), 47.0 - 0.5 * (t - 5)) for t in range(FRAMES)
    ]
    assert [p.visible for p in second.points] == [(t + 1) % 3 != 0 for t in range(FRAMES)]
    assert [p.visibility for p in second.points] == [
        1.0 if (t + 1) % 3 else 0.25 for t in range(FRAMES)
    ]

    bad = client.wait(service.call_async(QueryTracks.Request(
        queries=[QueryPoint(frame=FRAMES, x=1.0, y=1.0)]
    )))
    assert not bad.success and "outside the clip" in bad.message
    assert not bad.tracks.trajectories
    unknown = client.wait(service.call_async(QueryTracks.Request(clip_id="nope")))
    assert not unknown.success and "unknown clip id 'nope'" in unknown.message


@pytest.mark.timeout(60)
def test_train_clip_action_gives_feedback_and_result(spawn_python, client: Client) -> None:
    peer = spawn_python(__file__, "action")
    peer.wait_for("READY")
    action = ActionClient(client.node, TrainClip, "train_clip")
    assert action.wait_for_server(timeout_sec=20.0), "action server not found:\n" + peer.output()

    feedback: list[TrainClip.Feedback] = []
    goal = TrainClip.Goal(clip_id="clip_a", iterations=5)
    handle = client.wait(
        action.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback))
    )
    assert handle.accepted
    outcome = client.wait(handle.get_result_async())
    result = outcome.result
    assert outcome.status == 4  # action_msgs/GoalStatus.STATUS_SUCCEEDED
    assert result.success and result.message == "trained clip_a for 5 iterations"
    assert result.model_path == "/clips/clip_a/model/model.pt"
    assert result.final_loss == pytest.approx(0.2)
    assert 0.2 <= result.seconds < 10.0  # five 50 ms steps
    # feedback is best effort in timing but reliable in delivery: all 6 arrive, in order
    deadline = time.monotonic() + 5.0
    while len(feedback) < 6 and time.monotonic() < deadline:
        client.executor.spin_once(timeout_sec=0.1)
    assert [f.stage for f in feedback] == ["flow"] + ["training"] * 5
    assert [f.iteration for f in feedback] == [0, 1, 2, 3, 4, 5]
    assert {f.total_iterations for f in feedback} == {5}
    assert [f.progress for f in feedback] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert [f.loss for f in feedback] == pytest.approx([0.0, 1.0, 0.5, 1 / 3, 0.25, 0.2])

    handle = client.wait(action.send_goal_async(TrainClip.Goal(clip_id="")))
    outcome = client.wait(handle.get_result_async())
    assert outcome.status == 6  # STATUS_ABORTED
    assert not outcome.result.success and "clip_id is empty" in outcome.result.message
    action.destroy()


if __name__ == "__main__":
    serve(sys.argv[1])
