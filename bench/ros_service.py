"""Through ROS: query latency of ``query_tracks`` and recorder throughput, over real DDS.

Starts recorder, trainer and tracker in a child process (as ``make nodes``), trains a
synthetic 256x256 clip through the action (the query cost does not depend on how long the
model trained, only on the profile's feature grid), then measures, per profile:

* ``query_tracks`` round trips for 100 and 1,000 query points (frame 0, random positions,
  every frame, visibility included) from a client that only calls the service;
* ``Predictor.track`` on the same clip and queries in this process (ours, in-process);
* the previous algorithm (:class:`BaselinePredictor`, the predictor as it was before the
  query-speed work: per-batch memory-map reads, full-size cost-map chunks, NCHW
  convolutions) in this process, as the same-run baseline;
* the message costs of one answer: building the ``TrajectoryArray`` (ours and with the
  message constructors, as before), serialising and deserialising it;

and the recorder at 30 fps 640x480 rgb8 over reliable QoS: frames published vs stored.

Writes ``bench/results/ros_service.md``. Run:
``python bench/ros_service.py [--profiles tiny,cpu] [--frames 50] [--quick]``.
``query_latency_rows(profile, quick)`` gives the query rows to other benchmarks
(``bench/speed.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import describe_machine

from dino_tracker_ros.core.predictor import Predictor
from dino_tracker_ros.demo import CAMERA_TOPIC, NS, _Client, _ros_environment, _stream, _train

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS_S = {100: 0.1, 1000: 1.0}  # issue 8, target 4: through the ROS service
TRAIN_ITERATIONS = {"tiny": 20, "cpu": 40, "paper": 10}


# -- the previous algorithm (baseline only) ------------------------------------------------
def _baseline_locate(head, cost: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The previous ``locate_windowed``: whole-chunk argmax and masks, NCHW convolutions."""
    from dino_tracker_ros.core.predictor import _refiner_steps

    steps = _refiner_steps(head.refiner)
    b, q, h, w = cost.shape
    n = b * q
    dev = cost.device
    stride = float(head.geometry.stride)
    r = int(math.floor(float(head.radius) / stride + 1e-6))
    margin = sum(int(s[0].shape[-1]) // 2 for s in steps if isinstance(s, tuple))
    pad = r + margin
    maps = cost.float().reshape(n, h * w)
    peak = maps.argmax(-1)
    pi, pj = peak // w, peak % w
    offs = torch.arange(-pad, pad + 1, device=dev)
    rows = pi[:, None] + offs[None]
    cols = pj[:, None] + offs[None]
    inside = (((rows >= 0) & (rows < h))[:, :, None]
              & ((cols >= 0) & (cols < w))[:, None, :])[:, None]
    flat = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    x = torch.gather(maps, 1, flat.reshape(n, -1)).reshape(n, 1, 2 * pad + 1, -1)
    x = F.relu(x).to(dtype) * inside
    crop = 0
    for step in steps:
        if isinstance(step, tuple):
            weight, bias = step
            x = F.conv2d(x, weight.to(dtype), None if bias is None else bias.to(dtype))
            crop += int(weight.shape[-1]) // 2
            x = x * inside[:, :, crop:inside.shape[-2] - crop, crop:inside.shape[-1] - crop]
        else:
            x = step(x)
    heat = x[:, 0].float()
    core = slice(margin, margin + 2 * r + 1)
    d = torch.arange(-r, r + 1, device=dev, dtype=torch.float32) * stride
    disc = (d[:, None] ** 2 + d[None, :] ** 2) <= float(head.radius) ** 2
    valid = disc[None] & inside[:, 0, core, core]
    prob = torch.softmax(heat.masked_fill(~valid, -float("inf")).reshape(n, -1), dim=-1)
    prob = prob.reshape(heat.shape)
    gx = head.geometry.grid_to_pixel(cols[:, core].float())
    gy = head.geometry.grid_to_pixel(rows[:, core].float())
    return torch.stack([(prob.sum(dim=1) * gx).sum(-1), (prob.sum(dim=2) * gy).sum(-1)],
                       -1).reshape(b, q, 2)


class BaselinePredictor(Predictor):
    """The predictor before the query-speed work (same results up to rounding), for timing."""

    def _frames(self, t0: int, t1: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[t0:t1])).to(self.device, torch.float32)

    def _predict(self, qn: torch.Tensor, tn: torch.Tensor) -> torch.Tensor:
        h, w = self.geometry.grid_hw
        lead = torch.broadcast_shapes(qn.shape[:-2], tn.shape[:-2])
        b = int(np.prod(lead)) if len(lead) else 1
        chunk = max(1, (1 << 24) // (h * w * b))
        out = []
        for i in range(0, qn.shape[-2], chunk):
            cost = torch.matmul(qn[..., i:i + chunk, :], tn).reshape(b, -1, h, w)
            out.append(_baseline_locate(self.model.head, cost, qn.dtype).reshape(*lead, -1, 2))
        return torch.cat(out, dim=-2)

    def _unit(self, t0: int, t1: int, dtype: torch.dtype) -> torch.Tensor:
        return F.normalize(self._frames(t0, t1), dim=1, eps=1e-8).flatten(2).to(dtype)

    def _anchor_pass(self, src, anchors, valid, cycle) -> None:
        for a in torch.unique(anchors[valid]).tolist():  # one head call per anchor frame
            qi, si = torch.nonzero((anchors == a) & valid, as_tuple=True)
            pts = self._predict(src[qi].reshape(-1, src.shape[-1]),
                                self._unit(a, a + 1, src.dtype)[0])
            cycle[qi, si] = pts.reshape(len(qi), src.shape[1], 2)


# -- message costs --------------------------------------------------------------------------
def _constructor_array(clip, result):
    """``TrajectoryArray`` built with the message constructors (as before)."""
    from dino_tracker_msgs.msg import QueryPoint, TrackPoint, Trajectory, TrajectoryArray
    from dino_tracker_ros.ros.conversions import ns_to_stamp

    times = [ns_to_stamp(s) for s in result.stamps_ns]
    out = TrajectoryArray(clip_id=clip.meta.clip_id, width=clip.meta.width,
                          height=clip.meta.height)
    xs, ys = result.tracks[..., 0].tolist(), result.tracks[..., 1].tolist()
    vis, score = result.visible.tolist(), result.visibility.tolist()
    for i, (t, x, y) in enumerate(result.queries.tolist()):
        traj = Trajectory(id=i, query=QueryPoint(frame=int(t), x=float(x), y=float(y)))
        traj.points = [TrackPoint(stamp=times[k], x=xs[i][k], y=ys[i][k], visible=vis[i][k],
                                  visibility=score[i][k]) for k in range(len(times))]
        out.trajectories.append(traj)
    return out


def _message_costs(clip, result) -> dict:
    from rclpy.serialization import deserialize_message, serialize_message

    from dino_tracker_msgs.msg import TrajectoryArray
    from dino_tracker_ros.ros.conversions import trajectory_array

    t0 = time.perf_counter()
    msg = trajectory_array(clip, result.queries, result.tracks, result.visible,
                           result.visibility, result.stamps_ns)
    t1 = time.perf_counter()
    _constructor_array(clip, result)
    t2 = time.perf_counter()
    data = serialize_message(msg)
    t3 = time.perf_counter()
    deserialize_message(data, TrajectoryArray)
    t4 = time.perf_counter()
    return {"build_s": t1 - t0, "build_constructors_s": t2 - t1, "serialize_s": t3 - t2,
            "deserialize_s": t4 - t3, "bytes": len(data)}


# -- the measurement ------------------------------------------------------------------------
def _start(clip_dir: Path, out: Path, profile: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dino_tracker_ros.ros.composed", "--ros-args",
           "-r", f"__ns:={NS}", "-p", f"clip_dir:={clip_dir}", "-p", f"profile:={profile}",
           "-p", "device:=cpu", "-p", "backbone.random_init:=true",
           "-p", "reliability:=reliable", "-p", f"image_topic:={CAMERA_TOPIC}",
           "-p", "overlay_rate:=0.0"]
    log = open(out / "nodes.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())


def _service_only(client: _Client) -> None:
    """Drop the demo client's ``trajectories`` subscription: a client that only calls."""
    for sub in list(client.node.subscriptions):
        if sub.topic_name.endswith("/trajectories"):
            client.node.destroy_subscription(sub)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(client: _Client, clip, profile: str, frames: int, repeats: int,
             baseline_repeats: int, stream_recorder: bool) -> tuple[list[dict], int | None]:
    from dino_tracker_msgs.msg import QueryPoint
    from dino_tracker_msgs.srv import QueryTracks, SaveClip

    result = _train(client, "bench", TRAIN_ITERATIONS.get(profile, 20))
    if not result.success:
        raise RuntimeError(result.message)
    _service_only(client)
    ours = Predictor.open(clip, device="cpu")
    base = BaselinePredictor.open(clip, device="cpu")
    h, w = clip.size
    rng = np.random.default_rng(0)
    rows = []
    for n in (100, 1000):
        q = np.stack([np.zeros(n), rng.uniform(0, w - 1, n), rng.uniform(0, h - 1, n)], 1)
        request = QueryTracks.Request(clip_id="bench", queries=[
            QueryPoint(frame=0, x=float(x), y=float(y)) for _, x, y in q.tolist()])

        def ros_call(request=request) -> None:
            ans = client.call(client.query, request, timeout=600)
            if not ans.success:
                raise RuntimeError(ans.message)

        ros_call()  # opens the predictor, loads the features
        ros_s = _median_time(ros_call, repeats)
        ours.track(q[:4])
        core_s = _median_time(lambda q=q: ours.track(q), repeats)
        base_s = _median_time(lambda q=q: base.track(q), baseline_repeats)
        a, b = ours.track(q), base.track(q)
        msg = _message_costs(clip, a)
        rows.append({
            "profile": profile, "points": n, "frames": frames, "grid": ours.geometry.grid_hw,
            "ros_s": ros_s, "core_s": core_s, "baseline_core_s": base_s,
            "speedup": base_s / core_s, "target_s": TARGETS_S[n], "met": ros_s < TARGETS_S[n],
            "max_track_diff_px": float(np.abs(a.tracks - b.tracks).max()),
            "visible_agreement": float((a.visible == b.visible).mean()), **msg,
        })
        print(rows[-1], flush=True)
    stored = None
    if stream_recorder:
        images = np.random.default_rng(0).integers(0, 255, (90, 480, 640, 3), dtype=np.uint8)
        _stream(client, images, 30.0)
        saved = client.call(client.save, SaveClip.Request(clip_id="throughput", duration=0.0),
                            timeout=120)
        stored = saved.clip.num_frames if saved.success else 0
    return rows, stored


def _run(profile: str, frames: int, repeats: int, baseline_repeats: int,
         stream_recorder: bool) -> tuple[list[dict], int | None]:
    from dino_tracker_ros.core.synthetic import make_synthetic_clip
    from dino_tracker_ros.demo import _stop_nodes

    work = Path(tempfile.mkdtemp(prefix="dt_ros_bench_"))
    _ros_environment(work)
    clip, _ = make_synthetic_clip(work / "clips", "bench", num_frames=frames)
    proc = _start(work / "clips", work, profile)
    client = _Client()
    try:
        client.wait_ready(proc)
        return _measure(client, clip, profile, frames, repeats, baseline_repeats,
                        stream_recorder)
    finally:
        client.close()
        _stop_nodes(proc)


def query_latency_rows(profile: str, quick: bool) -> list[dict]:
    """Query latency for 100 and 1,000 points over 50 frames, through ROS and in-process.

    Each row: ``profile``, ``points``, ``frames``, ``grid`` (h, w tokens), ``ros_s``
    (``query_tracks`` round trip, median), ``core_s`` (``Predictor.track``),
    ``baseline_core_s`` (the previous algorithm), ``speedup``, ``target_s``, ``met``,
    ``max_track_diff_px`` and ``visible_agreement`` (ours vs the previous algorithm), and
    the message costs of one answer (``build_s``, ``build_constructors_s``,
    ``serialize_s``, ``deserialize_s``, ``bytes``). ``quick``: fewer repeats.
    """
    rows, _ = _run(profile, 50, 2 if quick else 5, 1 if quick else 2, False)
    return rows


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| profile (token grid) | points x frames | through ROS s | target s | met | "
        "core s | previous core s | core speed-up | max track diff px | visibility agreement |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['profile']} ({r['grid'][0]}x{r['grid'][1]}) | {r['points']} x {r['frames']} "
            f"| {r['ros_s']:.3f} | {r['target_s']:g} | {'yes' if r['met'] else 'no'} "
            f"| {r['core_s']:.3f} | {r['baseline_core_s']:.3f} | {r['speedup']:.2f}x "
            f"| {r['max_track_diff_px']:.1e} | {r['visible_agreement']:.4f} |")
    lines += ["", "One answer's messages (in-process): `TrajectoryArray` with one `TrackPoint` "
              "per point and frame.", "",
              "| profile | points | build s (ours) | build s (constructors, before) | "
              "serialise s | deserialise s | bytes |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['profile']} | {r['points']} | {r['build_s']:.3f} "
                     f"| {r['build_constructors_s']:.3f} | {r['serialize_s']:.3f} "
                     f"| {r['deserialize_s']:.3f} | {r['bytes']:,} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--profiles", default="tiny,cpu", help="comma-separated profiles")
    p.add_argument("--frames", type=int, default=50, help="frames of the queried clip")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 repeats, tiny profile only")
    args = p.parse_args()
    profiles = ["tiny"] if args.quick else [s for s in args.profiles.split(",") if s]
    repeats = 2 if args.quick else args.repeats
    machine = describe_machine()
    rows, stored = [], None
    for i, profile in enumerate(profiles):
        got, st = _run(profile, args.frames, repeats, max(1, repeats // 2), i == 0)
        rows += got
        stored = st if st is not None else stored
    cmd = "python bench/ros_service.py" + (" --quick" if args.quick else
                                          f" --profiles {','.join(profiles)}")
    lines = [
        "# Through ROS: query latency and recorder throughput",
        "",
        f"Command: `{cmd}`. Machine: {machine}. Nodes in a child process over Fast DDS on "
        f"loopback; a {args.frames}-frame 256x256 synthetic clip; randomly initialised backbone "
        "(query cost does not depend on the weights). Query points on frame 0 at random "
        f"positions, tracked through every frame with visibility. Median of {repeats} calls "
        "(the previous algorithm: of "
        f"{max(1, repeats // 2)}). *Through ROS*: `query_tracks` round trip from a client "
        "that only calls the service. *Core*: `Predictor.track` in this process; *previous*: "
        "the predictor before the query-speed work (`BaselinePredictor` in this script), "
        "same clip and queries. Target (issue 8): 100 points in 0.1 s, 1,000 in 1 s "
        "through the service.",
        "",
        *_table(rows),
        "",
        "| recorder, 640x480 rgb8 at 30 fps, reliable QoS | published | stored |",
        "| --- | --- | --- |",
        f"| 3 s stream | 90 | {stored} |",
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ros_service.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
