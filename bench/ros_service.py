"""Through ROS: query latency of ``query_tracks`` and recorder throughput, over real DDS.

Starts recorder, trainer and tracker in a child process (as ``make nodes``), trains a
synthetic clip through the action (``tiny`` profile: the query cost does not depend on
how long the model trained), then measures

* ``query_tracks`` round trips for about 100 and 1,000 points (grid queries, all frames,
  visibility included) beside ``Predictor.track`` on the same clip in this process (the
  baseline: what ROS adds is the ratio);
* the recorder at 30 fps 640x480 rgb8 over reliable QoS: frames published vs stored.

Writes ``bench/results/ros_service.md``. Run: ``python bench/ros_service.py [--frames 50]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe_machine

from dino_tracker_ros.demo import CAMERA_TOPIC, NS, _Client, _ros_environment, _stream, _train

RESULTS = Path(__file__).resolve().parent / "results"


def _start(clip_dir: Path, out: Path):
    import os
    import subprocess

    cmd = [sys.executable, "-m", "dino_tracker_ros.ros.composed", "--ros-args",
           "-r", f"__ns:={NS}", "-p", f"clip_dir:={clip_dir}", "-p", "profile:=tiny",
           "-p", "device:=cpu", "-p", "backbone.random_init:=true",
           "-p", "reliability:=reliable", "-p", f"image_topic:={CAMERA_TOPIC}",
           "-p", "overlay_rate:=0.0"]
    log = open(out / "nodes.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--frames", type=int, default=50, help="frames of the queried clip")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dt_ros_bench_"))
    _ros_environment(work)
    from dino_tracker_ros.core.predictor import Predictor, grid_queries
    from dino_tracker_ros.core.synthetic import make_synthetic_clip
    from dino_tracker_ros.demo import _stop_nodes

    clip, _ = make_synthetic_clip(work / "clips", "bench", num_frames=args.frames)
    proc = _start(work / "clips", work)
    client = _Client()
    rows = []
    try:
        client.wait_ready(proc)
        result = _train(client, "bench", 0)
        if not result.success:
            raise RuntimeError(result.message)
        from dino_tracker_msgs.srv import QueryTracks

        predictor = Predictor.open(clip, device="cpu")
        for step in (26, 8):  # 10x10 = 100 and 32x32 = 1,024 points on 256x256 frames
            n = len(grid_queries(clip.size, step, 0))
            ros, core = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ans = client.call(client.query, QueryTracks.Request(
                    clip_id="bench", grid_step=step, grid_frame=0), timeout=300)
                ros.append(time.perf_counter() - t0)
                if not ans.success:
                    raise RuntimeError(ans.message)
                t0 = time.perf_counter()
                predictor.track(grid_queries(clip.size, step, 0))
                core.append(time.perf_counter() - t0)
            r, c = statistics.median(ros), statistics.median(core)
            rows.append((f"query_tracks, {n} points x {args.frames} frames", r, c))

        frames = np.random.default_rng(0).integers(0, 255, (90, 480, 640, 3), dtype=np.uint8)
        _stream(client, frames, 30.0)
        from dino_tracker_msgs.srv import SaveClip

        saved = client.call(client.save, SaveClip.Request(clip_id="throughput", duration=0.0),
                            timeout=120)
        stored = saved.clip.num_frames if saved.success else 0
    finally:
        client.close()
        _stop_nodes(proc)

    lines = [
        "# Through ROS: query latency and recorder throughput",
        "",
        f"Command: `python bench/ros_service.py --frames {args.frames}`. Machine: "
        f"{describe_machine()}. Nodes in a child process over Fast DDS on loopback; "
        "`tiny` profile, randomly initialised backbone (query cost does not depend on the "
        "weights). Median of "
        f"{args.repeats} calls. Baseline: `Predictor.track` on the same clip in-process.",
        "",
        "| what | through ROS s | core alone s | ratio |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {r:.3f} | {c:.3f} | {r / c:.2f} |" for name, r, c in rows]
    lines += ["", "| recorder, 640x480 rgb8 at 30 fps, reliable QoS | published | stored |",
              "| --- | --- | --- |", f"| 3 s stream | {len(frames)} | {stored} |", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ros_service.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
