"""End to end over real DDS: camera -> recorder -> clip -> trainer -> tracker, in one process.

The three nodes run as a user runs them (``python -m dino_tracker_ros.ros.composed`` with the
package's params file, a namespace and ``-p`` overrides); this test process is the robot's
other nodes: it publishes a synthetic clip with exact ground truth on the camera topic
(reliable QoS on both ends, see ENVIRONMENT.md on best-effort losses), calls the services
and the action, and listens on ``clips``, ``trajectories``, ``markers`` and ``overlay``.

Training uses the ``tiny`` profile with an explicitly random-initialised backbone (no
pretrained weights can be downloaded here) for 60 iterations, so the accuracy bar is modest;
see :data:`MEDIAN_ERROR_BAR` for the measured values.
"""

from __future__ import annotations

import math
import signal
import time

import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from visualization_msgs.msg import Marker, MarkerArray

from dino_tracker_msgs.action import TrainClip
from dino_tracker_msgs.msg import ClipInfo, QueryPoint, TrajectoryArray
from dino_tracker_msgs.srv import ListClips, QueryTracks, SaveClip
from dino_tracker_ros.core.clip import open_clip
from dino_tracker_ros.core.synthetic import make_synthetic_clip
from dino_tracker_ros.core.trainer import train_status
from dino_tracker_ros.ros.conversions import ns_to_stamp, rgb_to_image, stamp_to_ns
from dino_tracker_ros.ros.runtime import CLIPS_QOS

NS = "/dt_e2e"
CAMERA = f"{NS}/camera"
FRAME_ID = "test_cam"
T, H, W = 12, 128, 128
ITERATIONS = 60
STAMP0 = 1_700_000_000_000_000_000
PERIOD_NS = 100_000_000  # the clip is published at 10 Hz
#: Bar on the median error (px) over ground-truth-visible points of the 128x128 clip.
#: Measured with this setting (tiny profile, random-init backbone, 60 iterations, seed 0):
#: 7.3 px (55 % within 8 px); 40 iterations gave 11.9 px, 100 gave 4.8 px. For scale: random
#: positions give ~50 px, and on this small-motion clip the query point itself (a static
#: "tracker") is 3.9 px off: with random features and this little training the tracker does
#: not beat it yet. The test checks the plumbing and that the answer carries real signal;
#: method accuracy is measured by the core tests and bench/.
MEDIAN_ERROR_BAR = 10.0
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)

pytestmark = pytest.mark.slow


class System:
    """The node process, the client side, and what the tests share."""


@pytest.fixture(scope="module")
def system(node_process, make_client, config_file, tmp_path_factory):
    s = System()
    s.clip_dir = tmp_path_factory.mktemp("e2e_clips")
    s.proc = node_process(
        "dino_tracker_ros.ros.composed", "--ros-args", "-r", f"__ns:={NS}",
        "--params-file", str(config_file), "-p", f"clip_dir:={s.clip_dir}",
        "-p", "profile:=tiny", "-p", "device:=cpu", "-p", "backbone.random_init:=true",
        "-p", f"image_topic:={CAMERA}", "-p", "reliability:=reliable", "-p", "qos_depth:=50",
        "-p", "overlay_rate:=50.0")
    s.proc.wait_for("ready: device", timeout=120)
    s.client = make_client("e2e_client", NS)
    s.save = s.client.client(SaveClip, "save_clip")
    s.list = s.client.client(ListClips, "list_clips")
    s.query = s.client.client(QueryTracks, "query_tracks")
    s.train = s.client.action_client(TrainClip, "train_clip")
    s.clips = s.client.collect(ClipInfo, "clips", CLIPS_QOS)
    s.trajectories = s.client.collect(TrajectoryArray, "trajectories", 10)
    s.markers = s.client.collect(MarkerArray, "markers", 10)
    s.overlay = s.client.collect(Image, "overlay", RELIABLE)
    s.timings = {}
    return s


def save(s, clip_id: str, duration: float = 0.0, stride: int = 0):
    return s.client.call(s.save, SaveClip.Request(clip_id=clip_id, duration=duration,
                                                  stride=stride))


@pytest.fixture(scope="module")
def recorded(system, tmp_path_factory, wait):
    """Publish the synthetic clip on the camera topic and save it as clip ``e2e``."""
    s = system
    src, s.gt = make_synthetic_clip(tmp_path_factory.mktemp("src"), "src", num_frames=T,
                                    height=H, width=W, seed=0, num_points=32)
    pub = s.client.node.create_publisher(Image, CAMERA, RELIABLE)
    wait(lambda: pub.get_subscription_count() > 0, 30, "the recorder's subscription")
    s.stamps = [STAMP0 + k * PERIOD_NS for k in range(T)]
    for k in range(T):
        pub.publish(rgb_to_image(src.frame(k), s.stamps[k], FRAME_ID))
        time.sleep(0.02)
    time.sleep(1.0)  # reliable delivery, converted in the recorder's own callback group
    t0 = time.monotonic()
    s.saved = save(s, "e2e")
    s.timings["save_clip_s"] = time.monotonic() - t0
    return s


def test_save_clip_announces_and_lists(recorded, wait):
    s = recorded
    resp = s.saved
    assert resp.success, resp.message
    assert resp.clip.clip_id == "e2e" and resp.clip.num_frames == T
    assert (resp.clip.width, resp.clip.height) == (W, H)
    assert resp.clip.header.frame_id == FRAME_ID
    assert stamp_to_ns(resp.clip.header.stamp) == s.stamps[0]
    assert resp.clip.fps == pytest.approx(10.0, rel=1e-3)
    assert resp.clip.state == ClipInfo.STATE_RECORDED
    assert "missed 0" in resp.message and "rejected 0" in resp.message
    assert (s.clip_dir / "e2e" / "clip.json").is_file()
    wait(lambda: any(m.clip_id == "e2e" for _, m in s.clips), 10, "ClipInfo on clips")
    listed = {c.clip_id: c for c in s.client.call(s.list, ListClips.Request()).clips}
    assert listed["e2e"].state == ClipInfo.STATE_RECORDED and listed["e2e"].num_frames == T


@pytest.fixture(scope="module")
def trained(recorded, wait):
    """Train ``e2e`` through the action; meanwhile ask the tracker and the recorder."""
    s = recorded
    feedback = []
    t0 = time.monotonic()
    goal_fut = s.train.send_goal_async(TrainClip.Goal(clip_id="e2e", iterations=ITERATIONS),
                                       feedback_callback=lambda f: feedback.append(
                                           (time.monotonic(), f.feedback)))
    handle = s.client.wait_future(goal_fut, 30)
    assert handle.accepted
    wait(lambda: any(f.stage == "training" for _, f in feedback), 300, "the training stage")
    t1 = time.monotonic()
    s.during_query = s.client.call(s.query, QueryTracks.Request(
        clip_id="e2e", queries=[QueryPoint(frame=0, x=10.0, y=10.0)]), timeout=30)
    s.timings["query_during_training_s"] = time.monotonic() - t1
    s.during_list = s.client.call(s.list, ListClips.Request(), timeout=30)
    result = s.client.wait_future(handle.get_result_async(), 600)
    s.timings["train_action_s"] = time.monotonic() - t0
    s.train_result, s.feedback = result, feedback
    return s


def test_training_feedback_and_answers_while_busy(trained):
    s = trained
    res = s.train_result
    assert res.status == GoalStatus.STATUS_SUCCEEDED, res.result.message
    assert res.result.success and math.isfinite(res.result.final_loss)
    assert res.result.model_path.endswith("e2e/model/model.pt")
    assert "RANDOMLY INITIALISED" in res.result.message  # random init is announced
    stages = [f.stage for _, f in s.feedback]
    assert "training" in stages and stages[-1] in ("training", "caching")
    assert {f.total_iterations for _, f in s.feedback} == {ITERATIONS}
    progress = [f.progress for _, f in s.feedback]
    assert progress == sorted(progress) and progress[-1] > 0.5
    assert max(f.iteration for _, f in s.feedback) >= ITERATIONS // 2
    gaps = np.diff([t for t, _ in s.feedback])
    assert gaps.max() < 1.0, f"feedback gap {gaps.max():.2f} s"  # at least once a second
    # the tracker answered while the trainer worked, with a clear error (not trained yet)
    assert not s.during_query.success and "train" in s.during_query.message
    assert s.timings["query_during_training_s"] < 5.0
    states = {c.clip_id: c.state for c in s.during_list.clips}
    assert states["e2e"] == ClipInfo.STATE_TRAINING
    # TRAINING then READY announced on clips
    seen = [m.state for _, m in s.clips if m.clip_id == "e2e"]
    assert seen[:1] == [ClipInfo.STATE_RECORDED]
    assert ClipInfo.STATE_TRAINING in seen and seen[-1] == ClipInfo.STATE_READY


def _query_gt(s, clip_id: str = "e2e"):
    queries = [QueryPoint(frame=int(t), x=float(x), y=float(y)) for t, x, y in s.gt.queries]
    t0 = time.monotonic()
    resp = s.client.call(s.query, QueryTracks.Request(clip_id=clip_id, queries=queries))
    return resp, time.monotonic() - t0


def test_query_tracks_accuracy_stamps_and_topics(trained, wait):
    s = trained
    n_before = (len(s.trajectories), len(s.markers), len(s.overlay))
    resp, seconds = _query_gt(s)
    assert resp.success, resp.message
    tr = resp.tracks
    n = len(s.gt.queries)
    assert tr.clip_id == "e2e" and (tr.width, tr.height) == (W, H)
    assert tr.header.frame_id == FRAME_ID and stamp_to_ns(tr.header.stamp) == s.stamps[0]
    assert [t.id for t in tr.trajectories] == list(range(n))
    for traj in tr.trajectories:
        assert len(traj.points) == T  # one point per frame per query
        assert [stamp_to_ns(p.stamp) for p in traj.points] == s.stamps
    pred = np.array([[[p.x, p.y] for p in t.points] for t in tr.trajectories])
    visible = np.array([[p.visible for p in t.points] for t in tr.trajectories])
    score = np.array([[p.visibility for p in t.points] for t in tr.trajectories])
    assert ((score >= 0) & (score <= 1)).all()
    err = np.linalg.norm(pred - s.gt.tracks, axis=-1)
    gt_vis = s.gt.visible
    median = float(np.median(err[gt_vis]))
    within8 = float((err[gt_vis] < 8).mean())
    occlusion_acc = float(((~visible) == s.gt.occluded).mean())
    static = float(np.median(np.linalg.norm(s.gt.queries[:, None, 1:] - s.gt.tracks,
                                            axis=-1)[gt_vis]))
    print(f"\ne2e: T={T} {W}x{H}, {ITERATIONS} iterations; median error {median:.2f} px, "
          f"<8px {within8:.2f}, occlusion accuracy {occlusion_acc:.2f}, static-point "
          f"median {static:.2f} px; query {seconds:.2f} s; timings {s.timings}")
    assert median < MEDIAN_ERROR_BAR, f"median error {median:.2f} px"
    # each query is exactly at its own frame
    for i, (t, x, y) in enumerate(s.gt.queries):
        np.testing.assert_allclose(pred[i, int(t)], [x, y], atol=1e-3)

    # the answer is also published: trajectories, markers, one overlay replay
    wait(lambda: len(s.trajectories) > n_before[0] and len(s.markers) > n_before[1], 10,
         "trajectories and markers")
    pub = s.trajectories[-1][1]
    assert pub.clip_id == "e2e" and len(pub.trajectories) == n
    markers = s.markers[-1][1].markers
    lines = int((visible.sum(axis=1) >= 2).sum())
    assert markers[0].action == Marker.DELETEALL
    assert len(markers) == 2 + n + lines
    assert {m.header.frame_id for m in markers} == {FRAME_ID}
    assert sum(m.type == Marker.POINTS for m in markers) == n
    assert all(len(m.points) == T for m in markers if m.type == Marker.POINTS)
    wait(lambda: len(s.overlay) >= n_before[2] + T, 20, "a full overlay replay")
    frames = [m for _, m in s.overlay[n_before[2]:n_before[2] + T]]
    assert [(m.width, m.height, m.encoding, m.header.frame_id) for m in frames] == \
        [(W, H, "rgb8", FRAME_ID)] * T
    assert [stamp_to_ns(m.header.stamp) for m in frames] == s.stamps


def _good_query(s) -> None:
    resp = s.client.call(s.query, QueryTracks.Request(queries=[QueryPoint(frame=1, x=5.0,
                                                                          y=6.0)]))
    assert resp.success, resp.message  # empty clip id: the latest trained clip
    assert resp.tracks.clip_id == "e2e" and len(resp.tracks.trajectories[0].points) == T


def test_bad_requests_answer_false_and_nodes_keep_working(trained):
    s = trained
    untrained = save(s, "untrained")
    assert untrained.success, untrained.message
    nan = float("nan")
    bad_queries = {
        "unknown clip": (QueryTracks.Request(clip_id="nope", queries=[QueryPoint()]),
                         "unknown clip"),
        "invalid id": (QueryTracks.Request(clip_id="../x", queries=[QueryPoint()]),
                       "invalid clip id"),
        "untrained": (QueryTracks.Request(clip_id="untrained", queries=[QueryPoint()]),
                      "train"),
        "frame": (QueryTracks.Request(clip_id="e2e", queries=[QueryPoint(frame=T)]),
                  "outside the clip"),
        "point": (QueryTracks.Request(clip_id="e2e", queries=[QueryPoint(x=W + 3.0)]),
                  "outside the"),
        "nan": (QueryTracks.Request(clip_id="e2e", queries=[QueryPoint(x=nan)]),
                "not finite"),
        "empty": (QueryTracks.Request(clip_id="e2e"), "no queries"),
        "grid frame": (QueryTracks.Request(clip_id="e2e", grid_step=16, grid_frame=T),
                       "grid_frame"),
    }
    for what, (request, needle) in bad_queries.items():
        resp = s.client.call(s.query, request)
        assert not resp.success and needle in resp.message, (what, resp.message)
        assert "\n" not in resp.message
        _good_query(s)
    grid = s.client.call(s.query, QueryTracks.Request(clip_id="e2e", grid_step=32,
                                                      grid_frame=2))
    assert grid.success and len(grid.tracks.trajectories) == 16
    assert grid.tracks.trajectories[0].query.frame == 2

    bad_saves = {
        "invalid id": (SaveClip.Request(clip_id="a b"), "invalid clip id"),
        "exists": (SaveClip.Request(clip_id="e2e"), "already exists"),
        "duration": (SaveClip.Request(duration=-1.0), "duration"),
        "one frame": (SaveClip.Request(duration=0.05), "only 1 frame"),
    }
    for k, (what, (request, needle)) in enumerate(bad_saves.items()):
        resp = s.client.call(s.save, request)
        assert not resp.success and needle in resp.message, (what, resp.message)
        good = save(s, f"good{k}", duration=0.5, stride=2)
        assert good.success and good.clip.num_frames == 3, good.message  # 5 newest, every 2nd

    for what, goal, needle in [
        ("unknown clip", TrainClip.Goal(clip_id="nope"), "unknown clip"),
        ("iterations", TrainClip.Goal(clip_id="untrained", iterations=20_000_000),
         "train.iterations"),
    ]:
        handle = s.client.wait_future(s.train.send_goal_async(goal), 30)
        res = s.client.wait_future(handle.get_result_async(), 60)
        assert res.status == GoalStatus.STATUS_ABORTED, what
        assert not res.result.success and needle in res.result.message, (what, res.result)
    _good_query(s)


def test_queue_cancel_and_resume(trained, wait):
    s = trained
    for cid in ("long", "short"):
        assert save(s, cid, stride=2).success
    fb_long, fb_short = [], []
    h_long = s.client.wait_future(s.train.send_goal_async(
        TrainClip.Goal(clip_id="long", iterations=100_000),
        feedback_callback=lambda f: fb_long.append(f.feedback)), 30)
    wait(lambda: any(f.stage == "training" and f.iteration > 0 for f in fb_long), 300,
         "training of 'long'")
    h_short = s.client.wait_future(s.train.send_goal_async(
        TrainClip.Goal(clip_id="short", iterations=3),
        feedback_callback=lambda f: fb_short.append(f.feedback)), 30)
    wait(lambda: any(f.stage == "queued" for f in fb_short), 10, "'short' queued")
    dup = s.client.wait_future(s.train.send_goal_async(TrainClip.Goal(clip_id="long")), 30)
    dup_res = s.client.wait_future(dup.get_result_async(), 30)
    assert dup_res.status == GoalStatus.STATUS_ABORTED and "already" in dup_res.result.message
    listed = {c.clip_id: c.state for c in s.client.call(s.list, ListClips.Request()).clips}
    assert listed["long"] == ClipInfo.STATE_TRAINING and listed["short"] == ClipInfo.STATE_RECORDED

    t0 = time.monotonic()
    cancel = s.client.wait_future(h_long.cancel_goal_async(), 30)
    assert len(cancel.goals_canceling) == 1
    res_long = s.client.wait_future(h_long.get_result_async(), 60)
    cancel_s = time.monotonic() - t0
    s.timings["cancel_s"] = cancel_s
    assert res_long.status == GoalStatus.STATUS_CANCELED and not res_long.result.success
    assert cancel_s < 5.0, f"cancel took {cancel_s:.1f} s"
    assert (s.clip_dir / "long" / "model" / "checkpoint.pt").is_file()
    stopped_at = max(f.iteration for f in fb_long)

    res_short = s.client.wait_future(h_short.get_result_async(), 300)
    assert res_short.status == GoalStatus.STATUS_SUCCEEDED, res_short.result.message
    stages = [f.stage for f in fb_short]
    assert stages.index("queued") < min(i for i, st in enumerate(stages) if st != "queued")

    # the kept checkpoint is usable: training resumes from it
    h_again = s.client.wait_future(s.train.send_goal_async(
        TrainClip.Goal(clip_id="long", iterations=stopped_at + 2)), 30)
    res_again = s.client.wait_future(h_again.get_result_async(), 300)
    assert res_again.result.success, res_again.result.message
    assert "resumed from iteration" in res_again.result.message


def test_clean_shutdown_on_sigint_while_training(trained, wait):
    """Ctrl-C in the middle of a job: exit code 0, no abort, the job stays resumable."""
    s = trained
    feedback = []
    handle = s.client.wait_future(s.train.send_goal_async(
        TrainClip.Goal(clip_id="long", iterations=100_000),
        feedback_callback=lambda f: feedback.append(f.feedback)), 30)
    result = handle.get_result_async()
    wait(lambda: any(f.stage == "training" for f in feedback), 300, "training of 'long'")
    t0 = time.monotonic()
    code = s.proc.stop(signal.SIGINT, timeout=30)
    s.timings["sigint_exit_s"] = time.monotonic() - t0
    out = s.proc.output()
    assert code == 0, out[-3000:]
    for bad in ("Traceback", "terminate called", "Aborted", "Segmentation", "core dumped"):
        assert bad not in out, out[-3000:]
    assert s.timings["sigint_exit_s"] < 15.0
    print(f"\ne2e timings: { {k: round(v, 2) for k, v in s.timings.items()} }")
    # the client got a final answer before the server went away
    assert result.done() and result.result().status == GoalStatus.STATUS_ABORTED
    assert "shut down" in result.result().result.message
    status = train_status(open_clip(s.clip_dir, "long"))
    assert status.state == "recorded" and "train again to resume" in status.message


def test_ns_to_stamp_helper_matches_published_stamps():
    assert stamp_to_ns(ns_to_stamp(STAMP0 + PERIOD_NS)) == STAMP0 + PERIOD_NS
