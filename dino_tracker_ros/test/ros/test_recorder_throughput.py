"""The recorder alone (``python -m dino_tracker_ros.ros.recorder``): 30 fps 640x480 rgb8.

A camera publisher sends 3 s of 640x480 rgb8 frames at 30 fps; the saved clip must hold
every frame with its stamp. Two transports: reliable QoS on both ends (publisher in this
process), and the recorder's default best-effort (sensor-data) QoS with the package's
shared-memory Fast DDS profile in both processes (publisher in a subprocess: the profile is
read when a process creates its first participant). Without that profile best-effort frames
this large are often lost between processes (ENVIRONMENT.md; measured 78 of 150). Also: an
empty buffer and an unsupported encoding are reported, not fatal, and SIGTERM stops the node
cleanly.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from dino_tracker_msgs.srv import SaveClip
from dino_tracker_ros.core.clip import open_clip
from dino_tracker_ros.ros.conversions import ns_to_stamp, rgb_to_image

NS = "/dt_rate"
CAMERA = f"{NS}/camera"
FPS, SECONDS, H, W = 30, 3.0, 480, 640

pytestmark = pytest.mark.slow


def test_recorder_keeps_every_frame_at_30fps_640x480(node_process, make_client,
                                                      tmp_path_factory, wait):
    clip_dir = tmp_path_factory.mktemp("rate_clips")
    proc = node_process("dino_tracker_ros.ros.recorder", "--ros-args", "-r", f"__ns:={NS}",
                        "-p", f"clip_dir:={clip_dir}", "-p", f"image_topic:={CAMERA}",
                        "-p", "reliability:=reliable", "-p", "qos_depth:=30",
                        "-p", "stats_period:=1.0")
    proc.wait_for("recording Image", timeout=60)
    client = make_client("rate_client", NS)
    save = client.client(SaveClip, "save_clip")

    empty = client.call(save, SaveClip.Request(clip_id="empty"))
    assert not empty.success and "buffer is empty" in empty.message

    pub = client.node.create_publisher(Image, CAMERA,
                                       QoSProfile(depth=30,
                                                  reliability=ReliabilityPolicy.RELIABLE))
    wait(lambda: pub.get_subscription_count() > 0, 30, "the recorder's subscription")
    yuv = Image(height=H, width=W, encoding="yuv422", step=2 * W)
    yuv.data = bytes(2 * W * H)
    pub.publish(yuv)  # unsupported: rejected with a warning, the node keeps going
    proc.wait_for("unsupported image encoding 'yuv422'", timeout=10)
    # the rejected frame is unstamped: its arrival time, 0.5 s before the first camera
    # stamp, must not count as a gap of ~15 missed frames
    time.sleep(0.5)

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    n = int(FPS * SECONDS)
    stamps = []
    period = 1.0 / FPS
    start = time.monotonic()
    t0_ns = time.time_ns()
    for k in range(n):
        target = start + k * period
        now = time.monotonic()
        if target > now:
            time.sleep(target - now)
        frame = base.copy()
        frame[0, 0] = (k % 256, k // 256, 7)  # a per-frame marker pixel
        stamps.append(t0_ns + round(k * period * 1e9))
        pub.publish(rgb_to_image(frame, stamps[-1], "camera_optical"))
    send_fps = (n - 1) / (time.monotonic() - start)
    time.sleep(1.0)
    t0 = time.monotonic()
    resp = client.call(save, SaveClip.Request(clip_id="rate"), timeout=120)
    save_s = time.monotonic() - t0
    assert resp.success, resp.message
    clip = open_clip(clip_dir, "rate")
    print(f"\nrecorder: {n} frames 640x480 rgb8 sent at {send_fps:.1f} fps; stored "
          f"{len(clip)} ({clip.meta.fps:.2f} fps from stamps); save_clip {save_s:.1f} s; "
          f"{resp.message.split('stream: ')[-1]}")
    assert len(clip) == n, resp.message  # no frame lost
    assert list(clip.meta.stamps_ns) == stamps
    assert clip.meta.fps == pytest.approx(FPS, rel=0.01)
    assert "missed 0" in resp.message and "rejected 1" in resp.message
    for k in (0, n // 2, n - 1):
        assert tuple(clip.frame(k)[0, 0]) == (k % 256, k // 256, 7)
    assert resp.clip.header.frame_id == "camera_optical"
    assert resp.clip.header.stamp == ns_to_stamp(stamps[0])

    code = proc.stop(signal.SIGTERM, timeout=20)
    assert code == 0, proc.output()[-3000:]
    assert "Traceback" not in proc.output()


PUBLISHER = """
import sys, time, numpy as np, rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from dino_tracker_ros.ros.conversions import rgb_to_image
n_frames, fps = int(sys.argv[1]), float(sys.argv[2])
rclpy.init()
node = rclpy.create_node("camera")
pub = node.create_publisher(Image, sys.argv[3], qos_profile_sensor_data)
deadline = time.monotonic() + 30
while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1.0)  # best effort: the reader side may match a moment later
frame = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
start, t0 = time.monotonic(), time.time_ns()
for k in range(n_frames):
    wait = start + k / fps - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    pub.publish(rgb_to_image(frame, t0 + round(k * 1e9 / fps), "camera_optical"))
print(f"sent {n_frames} at {(n_frames - 1) / (time.monotonic() - start):.1f} fps", flush=True)
time.sleep(1.0)
node.destroy_node()
rclpy.shutdown()
"""


def test_best_effort_with_shared_memory_profile(node_process, make_client, tmp_path_factory,
                                                monkeypatch):
    profile = Path(__file__).resolve().parents[2] / "config" / "fastdds_large_frames.xml"
    monkeypatch.setenv("FASTDDS_DEFAULT_PROFILES_FILE", str(profile))  # both children
    clip_dir = tmp_path_factory.mktemp("be_clips")
    ns = "/dt_rate_be"
    topic = f"{ns}/camera"
    rec = node_process("dino_tracker_ros.ros.recorder", "--ros-args", "-r", f"__ns:={ns}",
                       "-p", f"clip_dir:={clip_dir}", "-p", f"image_topic:={topic}")
    rec.wait_for("(best_effort, depth 5)", timeout=60)
    n = int(FPS * SECONDS)
    cam = node_process("-c", PUBLISHER, str(n), str(FPS), topic)
    cam.wait_for("sent ", timeout=60)
    time.sleep(1.0)
    client = make_client("be_client", ns)
    resp = client.call(client.client(SaveClip, "save_clip"),
                       SaveClip.Request(clip_id="be"), timeout=120)
    assert resp.success, resp.message
    print(f"\nbest effort + shm profile: {cam.output().strip()}; stored "
          f"{resp.clip.num_frames}; {resp.message.split('stream: ')[-1]}")
    # Best effort promises no delivery: on a loaded machine frames are lost even with the
    # shared-memory profile (seen on fresh machines: 86 of 90 stored, or 73 with 12 gaps). What
    # the recorder must do is keep most frames and count every gap it stored around.
    import re

    clip = open_clip(clip_dir, "be")
    received = int(re.search(r"received (\d+)", resp.message).group(1))
    missed = int(re.search(r"missed (\d+)", resp.message).group(1))
    gaps = np.round(np.diff(clip.stamps_ns) / (1e9 / FPS)).astype(int) - 1
    assert len(clip) == received and len(clip) >= n // 2, resp.message
    assert gaps.min() >= 0 and int(gaps.sum()) == missed, resp.message
