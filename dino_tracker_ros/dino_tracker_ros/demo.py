"""``make demo``: the whole product on one machine, over real DDS.

Starts recorder, trainer and tracker (``dino_tracker_ros.ros.composed``) in a child
process, streams a clip as ``sensor_msgs/Image`` on the camera topic, saves it with
``save_clip``, trains it through the ``train_clip`` action (progress bar from the action
feedback), queries a grid (and the ground-truth query points, when the clip has them) with
``query_tracks``, and writes into ``demo_out/``: the overlay video, a contact sheet, the
tracks (CSV, NPZ) and, with ground truth, the metrics beside the chained-flow baseline.

By default the clip is synthetic (real photo textures moved by known transforms, with an
occluder) so the demo can score itself; ``--clip VIDEO`` streams your own video instead.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .core.config import Config, load_config
from .core.errors import DinoTrackerError, WeightsError

__all__ = ["main"]

NS = "/dino_tracker"
CAMERA_TOPIC = "/camera/image_raw"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _banner(lines: list[str]) -> None:
    width = max(len(line) for line in lines) + 4
    _say("!" * width)
    for line in lines:
        _say(f"! {line.ljust(width - 4)} !")
    _say("!" * width)


def _ros_environment(out: Path) -> None:
    """Loopback discovery, a private domain and logs under ``out`` (before rclpy starts)."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(120, 200)))
    os.environ.setdefault("ROS_LOG_DIR", str(out / "ros_log"))


def _load_footage(args: argparse.Namespace):
    """Frames to stream: ``(frames (T,H,W,3) uint8, fps, ground truth or None, description)``."""
    if args.clip is None:
        from .core.synthetic import render_synthetic

        frames, gt = render_synthetic(args.frames, args.size, args.size, seed=args.seed)
        return frames, 10.0, gt, f"synthetic clip ({args.frames} frames, {args.size}x{args.size})"
    import cv2

    from .core.errors import ClipError

    cap = cv2.VideoCapture(str(args.clip))
    if not cap.isOpened():
        raise ClipError(f"cannot open video {args.clip}; give a file OpenCV can read")
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    frames = []
    while len(frames) < args.frames:
        ok, bgr = cap.read()
        if not ok:
            break
        h, w = bgr.shape[:2]
        scale = min(1.0, args.max_side / max(h, w))
        if scale < 1.0:
            bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)),
                             interpolation=cv2.INTER_AREA)
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    if len(frames) < 2:
        raise ClipError(f"{args.clip} has fewer than 2 readable frames")
    return np.stack(frames), float(fps), None, f"{args.clip} ({len(frames)} frames)"


def _config(args: argparse.Namespace) -> tuple[Config, bool]:
    """The config the nodes will use, and whether the backbone is randomly initialised."""
    from .core.backbone import resolve_weights

    overrides = {}
    if args.weights:
        overrides["backbone.weights"] = str(args.weights)
    cfg = load_config(profile=args.profile, overrides=overrides, device=args.device)
    try:
        resolve_weights(cfg.backbone, download=not args.offline)
        return cfg, False
    except WeightsError as exc:
        if args.weights:
            raise
        _banner([
            "No DINOv2 weights found: this demo uses a RANDOMLY INITIALISED backbone.",
            "Its features carry no learned semantics, so tracks are far less accurate",
            "than the paper's. To use real weights, put the official checkpoint at",
            f"  {str(exc).split('Put the official checkpoint at ')[-1].split(' (from')[0]}",
            "or run: make demo DEMO_ARGS='--weights /path/to/dinov2_vits14_pretrain.pth'",
        ])
        return cfg.replace(**{"backbone.random_init": True}), True


def _start_nodes(out: Path, cfg: Config, random_init: bool, iterations: int) -> subprocess.Popen:
    params = Path(__file__).resolve().parents[1] / "config" / "dino_tracker.yaml"
    share = _share_dir()
    if share is not None and (share / "config" / "dino_tracker.yaml").is_file():
        params = share / "config" / "dino_tracker.yaml"
    cmd = [sys.executable, "-m", "dino_tracker_ros.ros.composed", "--ros-args",
           "-r", f"__ns:={NS}"]
    if params.is_file():
        cmd += ["--params-file", str(params)]
    cmd += ["-p", f"clip_dir:={out / 'clips'}", "-p", f"profile:={cfg.profile}",
            "-p", f"device:={cfg.device}", "-p", "reliability:=reliable",
            "-p", f"image_topic:={CAMERA_TOPIC}", "-p", f"train.iterations:={iterations}"]
    if cfg.backbone.weights:
        cmd += ["-p", f"backbone.weights:={cfg.backbone.weights}"]
    if random_init:
        cmd += ["-p", "backbone.random_init:=true"]
    log = open(out / "nodes.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                            start_new_session=True)


def _share_dir() -> Path | None:
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("dino_tracker_ros"))
    except Exception:  # not on an ament index: the source tree's config is used
        return None


def _stop_nodes(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class RosClient:
    """A client-side ROS node spinning on a background thread, with a reliable camera
    publisher (used by the demo and the benchmarks). Subclasses add their clients."""

    def __init__(self, name: str, camera_topic: str, depth: int) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        self.rclpy = rclpy
        rclpy.init(args=[])
        self.node = rclpy.create_node(name)
        self.camera = self.node.create_publisher(
            Image, camera_topic, QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE))
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._stop = threading.Event()
        self._spin = threading.Thread(target=self._spin_forever, daemon=True)
        self._spin.start()

    def _spin_forever(self) -> None:
        from .ros.runtime import spin_until

        log = self.node.get_logger()
        spin_until(self.executor, self._stop, lambda tb: log.error(
            f"a callback raised; still spinning:\n{tb}", throttle_duration_sec=1.0))

    def call(self, client, request, timeout: float):
        """Call service ``client`` and wait for the answer (RuntimeError after ``timeout``)."""
        future = client.call_async(request)
        deadline = time.monotonic() + timeout
        while not future.done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer from {client.srv_name} in {timeout:.0f} s")
            time.sleep(0.01)
        return future.result()

    def close(self) -> None:
        self._stop.set()
        self.executor.shutdown()
        self._spin.join(timeout=5)
        self.node.destroy_node()
        self.rclpy.try_shutdown()


class _Client(RosClient):
    """The demo's own ROS node: camera publisher and service/action client."""

    def __init__(self) -> None:
        from rclpy.action import ActionClient

        from dino_tracker_msgs.action import TrainClip
        from dino_tracker_msgs.msg import TrajectoryArray
        from dino_tracker_msgs.srv import QueryTracks, SaveClip

        super().__init__("dino_tracker_demo", CAMERA_TOPIC, depth=50)
        self.save = self.node.create_client(SaveClip, f"{NS}/save_clip")
        self.query = self.node.create_client(QueryTracks, f"{NS}/query_tracks")
        self.train = ActionClient(self.node, TrainClip, f"{NS}/train_clip")
        self.published: list[TrajectoryArray] = []
        self.node.create_subscription(TrajectoryArray, f"{NS}/trajectories",
                                      self.published.append, 10)

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the nodes exited during start-up; see demo_out/nodes.log")
            if (self.save.service_is_ready() and self.query.service_is_ready()
                    and self.train.server_is_ready()
                    and self.camera.get_subscription_count() > 0):
                return
            time.sleep(0.1)
        raise RuntimeError("the nodes did not come up in time; see demo_out/nodes.log")


def _stream(client: _Client, frames: np.ndarray, fps: float) -> np.ndarray:
    """Publish frames at ``fps``; returns their stamps (ns)."""
    from .ros.conversions import rgb_to_image

    t0 = time.time_ns()
    period = 1.0 / fps
    stamps = []
    start = time.monotonic()
    for i, frame in enumerate(frames):
        stamp = t0 + int(i * period * 1e9)
        client.camera.publish(rgb_to_image(frame, stamp, "demo_camera"))
        stamps.append(stamp)
        time.sleep(max(0.0, start + (i + 1) * period - time.monotonic()))
    time.sleep(0.5)  # let the last frames land in the recorder's buffer
    return np.asarray(stamps, dtype=np.int64)


def _train(client: _Client, clip_id: str, iterations: int):
    from tqdm import tqdm

    from dino_tracker_msgs.action import TrainClip

    bar = tqdm(total=1000, desc="train_clip", unit="‰", dynamic_ncols=True, file=sys.stdout,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")

    def feedback(msg) -> None:
        fb = msg.feedback
        bar.n = int(round(fb.progress * 1000))
        post = fb.stage
        if fb.total_iterations:
            post += f" {fb.iteration}/{fb.total_iterations}"
        if np.isfinite(fb.loss) and fb.stage == "training":
            post += f" loss {fb.loss:.4f}"
        bar.set_postfix_str(post, refresh=False)
        bar.refresh()

    goal = TrainClip.Goal(clip_id=clip_id, iterations=iterations)
    send = client.train.send_goal_async(goal, feedback_callback=feedback)
    while not send.done():
        time.sleep(0.05)
    handle = send.result()
    if not handle.accepted:
        raise RuntimeError("the trainer rejected the goal")
    result = handle.get_result_async()
    while not result.done():
        time.sleep(0.1)
    bar.n = 1000
    bar.close()
    return result.result().result


def _arrays(tracks_msg):
    """TrajectoryArray -> tracks (N,T,2), visible (N,T), visibility (N,T), queries (N,3)."""
    trajs = tracks_msg.trajectories
    tracks = np.array([[(p.x, p.y) for p in tr.points] for tr in trajs], dtype=np.float32)
    visible = np.array([[p.visible for p in tr.points] for tr in trajs], dtype=bool)
    visibility = np.array([[p.visibility for p in tr.points] for tr in trajs], dtype=np.float32)
    queries = np.array([(tr.query.frame, tr.query.x, tr.query.y) for tr in trajs],
                       dtype=np.float32)
    return tracks, visible, visibility, queries


def _metrics_table(rows: dict) -> str:
    """Markdown table of TAP-Vid metrics (percent) over all and over reappearing queries."""
    keys = ("aj", "delta_avg", "oa")
    head = ("| method | AJ | delta_avg | OA | AJ reappearing | delta_avg reappearing |\n"
            "| --- | --- | --- | --- | --- | --- |\n")

    def cell(m: dict, k: str) -> str:
        return f"{100 * m[k]:.1f}" if k in m else "-"

    return head + "".join(
        f"| {name} | " + " | ".join(cell(m["all"], k) for k in keys) + " | "
        + " | ".join(cell(m["reappearing"], k) for k in keys[:2]) + " |\n"
        for name, m in rows.items()
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _ros_environment(out)
    t_start = time.monotonic()
    frames, fps, gt, what = _load_footage(args)
    cfg, random_init = _config(args)
    iterations = args.iterations or cfg.train.iterations
    _say(f"[demo] {what}; profile {cfg.profile}, {iterations} training iterations, "
         f"backbone {cfg.backbone.model}{' (RANDOM INIT)' if random_init else ''}")
    _say(f"[demo] starting recorder, trainer and tracker in {NS} "
         f"(ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}; log: {out / 'nodes.log'})")
    proc = _start_nodes(out, cfg, random_init, iterations)
    client = None
    try:
        client = _Client()
        client.wait_ready(proc)
        from dino_tracker_msgs.srv import QueryTracks, SaveClip

        _say(f"[demo] streaming {len(frames)} frames on {CAMERA_TOPIC} at {fps:g} fps")
        stamps = _stream(client, frames, fps)
        clip_id = f"demo_{time.strftime('%Y%m%dT%H%M%S')}"
        saved = client.call(client.save, SaveClip.Request(clip_id=clip_id), timeout=60)
        if not saved.success:
            raise RuntimeError(f"save_clip failed: {saved.message}")
        _say(f"[demo] save_clip: {saved.message}")
        if saved.clip.num_frames != len(frames):
            _say(f"[demo] warning: {len(frames) - saved.clip.num_frames} frames were lost")
        t_train = time.monotonic()
        result = _train(client, clip_id, iterations)
        if not result.success:
            raise RuntimeError(f"training failed: {result.message}")
        train_s = time.monotonic() - t_train
        _say(f"[demo] train_clip: {result.message} ({train_s:.0f} s)")

        from dino_tracker_msgs.msg import QueryPoint

        request = QueryTracks.Request(clip_id=clip_id, grid_step=args.grid_step, grid_frame=0)
        n_gt = 0
        if gt is not None:
            request.queries = [QueryPoint(frame=int(t), x=float(x), y=float(y))
                               for t, x, y in gt.queries]
            n_gt = len(gt.queries)
        t_q = time.monotonic()
        answer = client.call(client.query, request, timeout=120)
        query_ms = 1000 * (time.monotonic() - t_q)
        if not answer.success:
            raise RuntimeError(f"query_tracks failed: {answer.message}")
        tracks, visible, visibility, queries = _arrays(answer.tracks)
        _say(f"[demo] query_tracks: {len(queries)} points x {tracks.shape[1]} frames in "
             f"{query_ms:.0f} ms ({answer.message})")
        report = _write_outputs(out, frames, stamps, fps, tracks, visible, visibility, queries,
                                clip_id, gt, n_gt)
        report.update(
            clip_id=clip_id, clip_path=saved.clip.path, profile=cfg.profile,
            random_backbone=random_init, iterations=iterations, train_seconds=train_s,
            query_ms=query_ms, final_loss=result.final_loss,
            wall_seconds=time.monotonic() - t_start,
        )
        from .core.storage import write_json_atomic

        write_json_atomic(out / "summary.json", report)
        _summary(out, report)
        return 0
    finally:
        if client is not None:
            client.close()
        code = _stop_nodes(proc)
        if code not in (0, None):
            _say(f"[demo] nodes exited with code {code}; see {out / 'nodes.log'}")


def _write_outputs(out, frames, stamps, fps, tracks, visible, visibility, queries, clip_id,
                   gt, n_gt) -> dict:
    import cv2

    from .core.export import write_tracks
    from .core.predictor import TrackResult
    from .core.render import contact_sheet, write_overlay_video
    from .core.storage import atomic_path

    grid = slice(n_gt, None)  # the grid tracks follow the ground-truth queries
    result = TrackResult(tracks, visible, visibility, queries, stamps)
    paths = write_tracks(out, result, clip_id)
    video = out / "overlay.mp4"
    write_overlay_video(video, frames, tracks[grid], visible[grid], fps=fps)
    idx = np.linspace(0, len(frames) - 1, min(8, len(frames))).round().astype(int)
    sheet = contact_sheet(frames, tracks[grid], visible[grid], idx, cols=4)
    sheet_path = out / "contact_sheet.png"
    with atomic_path(sheet_path) as tmp:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        tmp.write_bytes(buf.tobytes())
    report = {"files": {"overlay": str(video), "contact_sheet": str(sheet_path),
                        "tracks_csv": str(paths["csv"]), "tracks_npz": str(paths["npz"])},
              "num_tracks": int(len(queries)), "visible_fraction": float(visible.mean())}
    if gt is not None and n_gt:
        from .core.baselines import chained_flow_tracks, reappearing
        from .core.metrics import evaluate_tracks

        hw = frames.shape[1:3]
        gt_vis = ~gt.occluded
        sub = reappearing(gt_vis)
        base_tracks, base_visible = chained_flow_tracks(frames, gt.queries)

        def scores(pred, vis) -> dict:
            return {
                "all": evaluate_tracks(gt.queries, gt.tracks, gt_vis, pred, vis, hw),
                "reappearing": evaluate_tracks(gt.queries[sub], gt.tracks[sub], gt_vis[sub],
                                               pred[sub], vis[sub], hw) if sub.any() else {},
            }

        rows = {
            "DINO-Tracker (this run, via query_tracks)": scores(tracks[:n_gt], visible[:n_gt]),
            "chained DIS optical flow": scores(base_tracks, base_visible),
        }
        report["num_reappearing"] = int(sub.sum())
        report["metrics"] = {k: {part: {m: float(v) for m, v in r[part].items()} for part in r}
                             for k, r in rows.items()}
        table = _metrics_table(rows)
        (out / "metrics.md").write_text(
            f"Scored against the synthetic clip's exact ground truth: {n_gt} queries, "
            f"{int(sub.sum())} of them occluded and reappearing (TAP-Vid metrics, strided, "
            "256x256; percent).\n\n" + table)
        report["files"]["metrics"] = str(out / "metrics.md")
    return report


def _summary(out: Path, report: dict) -> None:
    _say("")
    _say("=" * 72)
    _say(f"DINO-Tracker demo finished in {report['wall_seconds']:.0f} s "
         f"(training {report['train_seconds']:.0f} s, query {report['query_ms']:.0f} ms)")
    _say(f"clip {report['clip_id']}: {report['num_tracks']} tracks, "
         f"{100 * report['visible_fraction']:.0f}% of points visible")
    if report["random_backbone"]:
        _say("backbone: RANDOMLY INITIALISED (no DINOv2 weights found); see the README")
    if "metrics" in report:
        _say("")
        _say(_metrics_table(report["metrics"]).rstrip())
    _say("")
    for name, path in report["files"].items():
        _say(f"  {name:14s} {path}")
    _say("=" * 72)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dino_tracker_ros.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", type=Path, help="your own video (default: a synthetic clip)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    p.add_argument("--profile", default="cpu", choices=["auto", "paper", "cpu", "tiny"])
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--iterations", type=int, default=0, help="0: the profile's default")
    p.add_argument("--frames", type=int, default=24, help="frames to stream")
    p.add_argument("--size", type=int, default=256, help="synthetic frame size (px)")
    p.add_argument("--max-side", type=int, default=480, help="downscale videos to this side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-step", type=int, default=32, help="grid query spacing (px)")
    p.add_argument("--weights", type=Path, help="DINOv2 checkpoint (official format)")
    p.add_argument("--offline", action="store_true", help="never try to download weights")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DinoTrackerError as exc:
        print(f"demo: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"demo: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

