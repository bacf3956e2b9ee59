"""Live tracking through the tracker node: processed frames per second and latency.

Trains a synthetic 320x240 clip's first half in this process (``cpu`` profile by default,
randomly initialised backbone; the cost of a live step does not depend on how long the
model trained), starts the tracker node in a child process, calls ``track_live`` with
about 100 query points, and streams the clip's unseen second half (cycled) on the camera
topic at ``--fps`` for ``--seconds`` per frame size: 320x240 (the clip's size) and 640x480
(rescaled by the node). Measured:

* processed frames per second: ``live`` messages received over the streaming time;
* latency from the camera stamp to the arrival of the ``live`` message here (median, p90),
  and the node's own stamp-to-publication figures from its ``track_live`` answer;
* frames dropped by the node's drop-oldest hand-off;
* beside them, the same-run baseline: :meth:`LivePredictor.step` in this process on the
  same frames, with the node idle.

Writes ``bench/results/live.md`` and ``live.png``. Run from the repository root:
``python bench/live.py [--seconds 20] [--fps 30] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from machine import describe_machine

from dino_tracker_ros.demo import RosClient

RESULTS = Path(__file__).resolve().parent / "results"
NS = "/dt_bench_live"
CAMERA = f"{NS}/camera"
SIZES = ((240, 320), (480, 640))
CLIP_HW = (240, 320)


def _start_tracker(clip_dir: Path, profile: str, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dino_tracker_ros.ros.tracker", "--ros-args",
           "-r", f"__ns:={NS}", "-p", f"clip_dir:={clip_dir}", "-p", f"profile:={profile}",
           "-p", "device:=cpu", "-p", "backbone.random_init:=true",
           "-p", f"image_topic:={CAMERA}", "-p", "reliability:=reliable",
           "-p", "live_stats_period:=2.0", "-p", "overlay_rate:=0.0"]
    log = open(out / "tracker.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())


class _Client(RosClient):
    """Camera publisher, ``live`` subscriber and ``track_live`` client."""

    def __init__(self) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        from dino_tracker_msgs.msg import TrajectoryArray
        from dino_tracker_msgs.srv import TrackLive

        super().__init__("bench_live", CAMERA, depth=10)
        self.track_live = self.node.create_client(TrackLive, f"{NS}/track_live")
        self.received: list[tuple[int, int]] = []  # (arrival ns, stamp ns)
        self.node.create_subscription(
            TrajectoryArray, f"{NS}/live", self._on_live,
            QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))

    def _on_live(self, msg) -> None:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        self.received.append((time.time_ns(), stamp))


def _stream(client: _Client, frames: list[np.ndarray], fps: float, seconds: float) -> int:
    from dino_tracker_ros.ros.conversions import rgb_to_image

    start, sent = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        frame = frames[sent % len(frames)]
        client.camera.publish(rgb_to_image(frame, time.time_ns(), "bench_camera"))
        sent += 1
        time.sleep(max(0.0, start + sent / fps - time.monotonic()))
    return sent


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    from dino_tracker_ros.core.storage import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["size"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(x - 0.2, [r["ros_fps"] for r in rows], 0.4, label="through the node (DDS)")
    axes[0].bar(x + 0.2, [r["core_fps"] for r in rows], 0.4, label="step() in-process")
    axes[0].set_ylabel("frames per second")
    axes[0].set_title("processed rate")
    axes[1].bar(x - 0.2, [r["lat_med"] for r in rows], 0.4, label="median")
    axes[1].bar(x + 0.2, [r["lat_p90"] for r in rows], 0.4, label="p90")
    axes[1].set_ylabel("ms")
    axes[1].set_title("camera stamp -> live message received")
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="cpu", help="configuration profile (default cpu)")
    p.add_argument("--iterations", type=int, default=50, help="training iterations")
    p.add_argument("--seconds", type=float, default=20.0, help="streaming time per size")
    p.add_argument("--fps", type=float, default=30.0, help="camera rate")
    p.add_argument("--grid", type=int, default=28, help="query grid step (99 points)")
    p.add_argument("--quick", action="store_true", help="a short run: 5 s per size")
    args = p.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 5.0)
    work = Path(tempfile.mkdtemp(prefix="dt_live_bench_"))
    from dino_tracker_ros.demo import _ros_environment, _stop_nodes

    _ros_environment(work)
    import torch

    from dino_tracker_msgs.msg import QueryPoint
    from dino_tracker_msgs.srv import TrackLive
    from dino_tracker_ros.core.clip import clip_from_array
    from dino_tracker_ros.core.config import PROFILES
    from dino_tracker_ros.core.live import LivePredictor
    from dino_tracker_ros.core.predictor import grid_queries
    from dino_tracker_ros.core.synthetic import render_synthetic
    from dino_tracker_ros.core.trainer import train_clip

    machine = describe_machine()
    proc = _start_tracker(work / "clips", args.profile, work)  # starts while we train
    frames, _ = render_synthetic(24, *CLIP_HW, seed=0)
    clip = clip_from_array(frames[:12], work / "clips", "bench_live", fps=10)
    cfg = PROFILES[args.profile].replace(**{"backbone.random_init": True, "device": "cpu"})
    t0 = time.monotonic()
    train_clip(clip, cfg, iterations=args.iterations)
    print(f"trained in {time.monotonic() - t0:.0f} s", flush=True)
    queries = grid_queries(CLIP_HW, args.grid, 0)
    client = _Client()
    rows = []
    try:
        deadline = time.monotonic() + 120
        while not client.track_live.service_is_ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the tracker did not start; see {work / 'tracker.log'}")
            time.sleep(0.1)
        points = [QueryPoint(frame=int(t), x=float(x), y=float(y)) for t, x, y in queries]
        live_frames = {hw: [cv2.resize(f, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
                            if f.shape[:2] != hw else f for f in frames[12:]] for hw in SIZES}
        for hw in SIZES:
            request = TrackLive.Request(clip_id="bench_live", queries=points, enable=True)
            ans = client.call(client.track_live, request, timeout=300)
            if not ans.success:
                raise RuntimeError(ans.message)
            while client.camera.get_subscription_count() == 0:
                time.sleep(0.05)
            time.sleep(0.5)
            client.received.clear()
            t_start = time.monotonic()
            sent = _stream(client, live_frames[hw], args.fps, args.seconds)
            stream_s = time.monotonic() - t_start
            time.sleep(2.0)  # the last frame's answer
            got = list(client.received)
            stopped = client.call(client.track_live, TrackLive.Request(enable=False), timeout=300)
            counts = dict(re.findall(r"(received|processed|dropped|rejected) (\d+)",
                                     stopped.message))
            node = re.search(r"stamp->publication median (\d+) ms \(p90 (\d+) ms\)",
                             stopped.message)
            lat = np.array([(a - s) / 1e6 for a, s in got])
            arrivals = np.array([a for a, _ in got]) / 1e9
            ros_fps = (len(got) - 1) / (arrivals[-1] - arrivals[0]) if len(got) > 1 else 0.0
            # baseline: the same frames through step() here, the node idle
            live = LivePredictor.open(clip, queries, device="cpu")
            live.step(live_frames[hw][0])  # warm-up
            steps = [live.step(f).seconds for f in live_frames[hw] * 2]
            rows.append({
                "size": f"{hw[1]}x{hw[0]}", "sent": sent, "stream_s": stream_s,
                "received": int(counts.get("received", 0)),
                "processed": int(counts.get("processed", 0)),
                "dropped": int(counts.get("dropped", 0)), "answers": len(got),
                "ros_fps": ros_fps, "lat_med": float(np.median(lat)),
                "lat_p90": float(np.percentile(lat, 90)),
                "node_med": int(node.group(1)) if node else float("nan"),
                "node_p90": int(node.group(2)) if node else float("nan"),
                "core_fps": 1.0 / float(np.median(steps)),
                "core_ms": 1e3 * float(np.median(steps)),
            })
            print(rows[-1], flush=True)
    finally:
        client.close()
        _stop_nodes(proc)

    lines = [
        "# Live tracking through the tracker node",
        "",
        f"Command: `python bench/live.py --seconds {args.seconds:g} --fps {args.fps:g}"
        f"{'' if args.profile == 'cpu' else ' --profile ' + args.profile}`. Machine: "
        f"{machine}. Tracker node in a child process over Fast DDS on loopback (reliable "
        f"camera QoS); `{args.profile}` profile (working size {cfg.preprocess.height} px "
        f"high, ViT-S/14 block {cfg.backbone.layer}, stride {cfg.backbone.stride}), randomly "
        f"initialised backbone (the cost does not depend on the weights), {len(queries)} "
        f"query points on a 320x240 clip, camera at {args.fps:g} fps for {args.seconds:g} s per "
        "size. Latency: camera stamp to the `live` message's arrival in the benchmark process "
        "(the node's own stamp-to-publication figures beside it). Baseline: "
        f"`LivePredictor.step` in the benchmark process on the same frames (torch "
        f"{torch.get_num_threads()} threads), node idle.",
        "",
        "| live frame | through the node fps | step() in-process fps (ms) | latency median ms | "
        "latency p90 ms | node stamp->publication median / p90 ms | frames sent / received "
        "/ processed / dropped |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['size']} | {r['ros_fps']:.2f} | {r['core_fps']:.2f} ({r['core_ms']:.0f}) | "
        f"{r['lat_med']:.0f} | {r['lat_p90']:.0f} | {r['node_med']} / {r['node_p90']} | "
        f"{r['sent']} / {r['received']} / {r['processed']} / {r['dropped']} |"
        for r in rows
    ]
    lines += ["", "Dropped frames are those the drop-oldest hand-off replaced before the worker "
              "took them: the node always tracks the newest frame and never falls behind. Frames "
              "sent but not received were overwritten in the camera publisher's keep-last history "
              "(depth 10) before the busy node process took them (reliable QoS does not queue "
              "beyond the history depth).", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "live.md").write_text("\n".join(lines))
    _plot(rows, RESULTS / "live.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
