"""``dino-tracker``: the offline command line over the core library (no ROS needed).

User errors print one line on stderr and exit with status 2; disk and other OS errors (full
disk, read-only clip directory, no permission) print one line and exit with status 1;
Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .core.config import Config, iter_fields, load_config
from .core.errors import ConfigError, DinoTrackerError, StorageError
from .core.export import read_queries, write_tracks
from .core.progress import Progress

__all__ = ["main", "config_reference"]

log = logging.getLogger("dino_tracker.cli")


# -- progress bars ----------------------------------------------------------------------
class ProgressBars:
    """Turns core :class:`Progress` reports into one tqdm bar per stage."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar = None
        self._stage = ""

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if p.stage != self._stage or self._bar is None:
            self.close()
            self._stage = p.stage
            self._bar = tqdm(total=p.total, desc=f"{p.stage:>12}", unit="it", leave=True,
                             dynamic_ncols=True, file=sys.stderr)
        bar = self._bar
        if p.total and bar.total != p.total:
            bar.total = p.total
        bar.n = p.step
        if np.isfinite(p.loss):
            bar.set_postfix(loss=f"{p.loss:.4f}", refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# -- shared options ---------------------------------------------------------------------
def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--profile", default="auto", choices=["auto", "paper", "cpu", "tiny"],
                   help="settings profile (auto: paper on CUDA, cpu otherwise)")
    g.add_argument("--config", type=Path,
                   help="YAML file with settings (see `dino-tracker config`)")
    g.add_argument("--device", help="torch device: auto, cpu, cuda, cuda:N")
    g.add_argument("--weights", help="DINOv2 checkpoint file (official format)")
    g.add_argument("--random-backbone", action="store_true",
                   help="use a randomly initialised backbone (tests/offline demos; poor accuracy)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.iterations=200 (repeatable)")


def _config(args: argparse.Namespace) -> Config:
    overrides: list[str] = list(args.overrides)
    if args.weights:
        overrides.append(f"backbone.weights={json.dumps(str(args.weights))}")
    if args.random_backbone:
        overrides.append("backbone.random_init=true")
    return load_config(args.config, profile=args.profile, overrides=overrides, device=args.device)


def _open_clip(path: Path):
    from .core.clip import Clip

    return Clip.open(path)


# -- commands ---------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    from .core.synthetic import make_synthetic_clip

    # make_synthetic_clip raises ValueError/RuntimeError on these: one clear line instead
    for name, value, lo, hi in (("--frames", args.frames, 1, 10_000),
                                ("--height", args.height, 64, 4096),
                                ("--width", args.width, 64, 4096),
                                ("--points", args.points, 1, 100_000)):
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value}")
    clip, gt = make_synthetic_clip(
        args.clip_dir, args.clip_id, num_frames=args.frames, height=args.height,
        width=args.width, seed=args.seed, num_points=args.points, occluder=not args.no_occluder,
        overwrite=args.overwrite,
    )
    print(f"wrote {clip.path} ({len(clip)} frames, {clip.size[1]}x{clip.size[0]}, "
          f"{gt.tracks.shape[0]} ground-truth tracks)")
    return 0


def cmd_import_video(args: argparse.Namespace) -> int:
    from .core.clip import clip_from_frames_dir, clip_from_video

    src = Path(args.source)
    if src.is_dir():
        clip = clip_from_frames_dir(src, args.clip_dir, args.clip_id, fps=args.fps,
                                    stride=args.stride, max_frames=args.max_frames)
    else:
        clip = clip_from_video(src, args.clip_dir, args.clip_id, start=args.start,
                               max_frames=args.max_frames, stride=args.stride)
    print(f"wrote {clip.path} ({len(clip)} frames, {clip.size[1]}x{clip.size[0]})")
    return 0


def cmd_import_bag(args: argparse.Namespace) -> int:
    from .core.bag import clip_from_bag

    clip = clip_from_bag(args.bag, args.clip_dir, args.topic, args.clip_id, start=args.start,
                         duration=args.duration, stride=args.stride)
    print(f"wrote {clip.path} ({len(clip)} frames, {clip.size[1]}x{clip.size[0]})")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from .core.preprocess import preprocess_clip

    cfg = _config(args)
    bars = ProgressBars(not args.quiet)
    try:
        ws = preprocess_clip(_open_clip(args.clip), cfg, progress=bars)
    finally:
        bars.close()
    print(f"preprocessed {args.clip} into {ws.dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .core.trainer import train_clip

    cfg = _config(args)
    bars = ProgressBars(not args.quiet)
    try:
        res = train_clip(_open_clip(args.clip), cfg, iterations=args.iterations,
                         progress=bars, resume=not args.no_resume)
    finally:
        bars.close()
    print(f"trained {args.clip}: {res.iterations} iterations in {res.seconds:.1f} s, "
          f"final loss {res.final_loss:.4f}; model {res.model_path}")
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from .core.predictor import Predictor, grid_queries
    from .core.render import write_overlay_video

    clip = _open_clip(args.clip)
    cfg = _config(args)
    predictor = Predictor.open(clip, device=cfg.device, track_cfg=cfg.track)
    if args.queries is not None:
        queries = read_queries(args.queries)
    else:
        queries = grid_queries(clip.size, args.grid, args.grid_frame)
    result = predictor.track(queries)
    out = Path(args.out) if args.out else clip.path / "tracks"
    paths = write_tracks(out, result, clip.clip_id)
    if not args.no_video:
        paths["video"] = out / "overlay.mp4"
        write_overlay_video(paths["video"], clip.read_frames(), result.tracks, result.visible,
                            fps=clip.meta.fps)
    vis = float(result.visible.mean()) if result.visible.size else 0.0
    print(f"tracked {len(queries)} points over {len(clip)} frames ({vis:.0%} visible): "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def _video_frames(path: Path):
    """Yield the RGB frames of a video file one at a time (OpenCV decoding)."""
    import cv2

    from .core.errors import ClipError

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ClipError(f"cannot open video {path}; give a file OpenCV can read")
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def cmd_live(args: argparse.Namespace) -> int:
    import cv2
    from tqdm import tqdm

    from .core.errors import ClipError
    from .core.live import LivePredictor
    from .core.predictor import TrackResult, grid_queries
    from .core.render import write_overlay_video

    clip = _open_clip(args.clip)
    cfg = _config(args)
    video = Path(args.video)
    if not video.is_file():
        raise ClipError(f"video {video} not found; give a video file")
    cap = cv2.VideoCapture(str(video))
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) or None
    cap.release()
    fps = fps if fps > 0 else 30.0
    if args.queries is not None:
        queries = read_queries(args.queries)
    else:
        queries = grid_queries(clip.size, args.grid, args.grid_frame)
    live = LivePredictor.open(clip, queries, device=cfg.device, track_cfg=cfg.track)
    positions, visible, score, stamps = [], [], [], []
    bar = tqdm(total=total, desc="live", unit="frame", dynamic_ncols=True, file=sys.stderr,
               disable=args.quiet)
    try:
        for i, frame in enumerate(_video_frames(video)):
            res = live.step(frame, stamp_ns=int(round(i * 1e9 / fps)))
            positions.append(res.positions)
            visible.append(res.visible)
            score.append(res.visibility)
            stamps.append(res.stamp_ns)
            bar.update(1)
            bar.set_postfix(fps=f"{1.0 / max(res.seconds, 1e-9):.1f}", refresh=False)
    finally:
        bar.close()
    if not stamps:
        raise ClipError(f"video {video} holds no readable frames")
    n = live.num_queries
    result = TrackResult(np.stack(positions, 1).reshape(n, -1, 2),
                         np.stack(visible, 1).reshape(n, -1),
                         np.stack(score, 1).reshape(n, -1), live.queries,
                         np.asarray(stamps, dtype=np.int64))
    out = Path(args.out) if args.out else video.with_name(video.stem + "_live")
    paths = write_tracks(out, result, clip.clip_id)
    if not args.no_video:
        paths["video"] = out / "overlay.mp4"
        write_overlay_video(paths["video"], _video_frames(video), result.tracks,
                            result.visible, fps=fps)
    print(f"tracked {n} points of {clip.clip_id} live over {len(stamps)} frames of {video} "
          f"({float(result.visible.mean()) if result.visible.size else 0.0:.0%} visible): "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .core.baselines import METHODS, evaluate_clip, format_tables

    cfg = _config(args)
    methods = ("tracker",) if args.no_baselines else METHODS
    bars = ProgressBars(not args.quiet)
    try:
        report = evaluate_clip(_open_clip(args.clip), cfg, device=cfg.device,
                               query_mode=args.query_mode, methods=methods, progress=bars)
    finally:
        bars.close()
    print(format_tables(report))
    if args.json:
        from .core.storage import write_json_atomic

        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .core.clip import list_clips
    from .core.trainer import train_status

    clips = list_clips(args.clip_dir)
    for clip in clips:
        st = train_status(clip)
        print(f"{clip.clip_id:32s} {len(clip):5d} frames {clip.size[1]:5d}x{clip.size[0]:<5d} "
              f"{st.state:9s} {st.message}")
    if not clips:
        print(f"no clips in {args.clip_dir}")
    return 0


def config_reference() -> str:
    """Markdown table of every setting with its paper and cpu defaults (for the README)."""
    from .core.config import PROFILES

    lines = ["| setting | paper | cpu | tiny | description |", "| --- | --- | --- | --- | --- |"]
    profiles = [dict((n, v) for n, _, v in iter_fields(PROFILES[p])) for p in
                ("paper", "cpu", "tiny")]
    for name, f, _ in iter_fields(PROFILES["paper"]):
        meta = f.metadata
        desc = meta.get("help", "")
        if meta.get("choices"):
            desc += " (" + " / ".join(map(str, meta["choices"])) + ")"
        elif meta.get("lo") is not None:
            desc += f" [{meta['lo']:g}, {meta['hi']:g}]"

        def fmt(v: object) -> str:
            if isinstance(v, tuple):
                v = list(v)
            return f"`{json.dumps(v)}`"

        vals = [fmt(p[name]) for p in profiles]
        lines.append(f"| `{name}` | {' | '.join(vals)} | {desc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(config_reference())
        return 0
    sys.stdout.write(_config(args).to_yaml())
    return 0


# -- entry point ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-tracker",
        description="DINO-Tracker offline: make clips, preprocess, train, track, evaluate.",
    )
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str,
            config: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        if config:
            _add_config_args(p)
        return p

    p = add("synth", cmd_synth, "write a synthetic clip with exact ground truth")
    p.add_argument("clip_dir", type=Path, help="folder that holds clips")
    p.add_argument("--clip-id", default="synthetic")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--points", type=int, default=64, help="ground-truth tracks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-occluder", action="store_true")
    p.add_argument("--overwrite", action="store_true")

    p = add("import-video", cmd_import_video, "make a clip from a video file or a frames folder")
    p.add_argument("source", help="video file (any OpenCV format) or folder of images")
    p.add_argument("clip_dir", type=Path, help="folder that holds clips")
    p.add_argument("--clip-id", default=None)
    p.add_argument("--start", type=int, default=0, help="first frame index")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of a frames folder")

    p = add("import-bag", cmd_import_bag, "make a clip from a rosbag2 (MCAP or sqlite3)")
    p.add_argument("bag", type=Path)
    p.add_argument("--topic", required=True, help="sensor_msgs/Image or CompressedImage topic")
    p.add_argument("--clip-dir", type=Path, required=True, help="folder that holds clips")
    p.add_argument("--clip-id", default=None)
    p.add_argument("--start", type=float, default=None,
                   help="seconds after the topic's first frame (header stamps)")
    p.add_argument("--duration", type=float, default=None, help="seconds")
    p.add_argument("--stride", type=int, default=1)

    for name, fn, help in (
        ("preprocess", cmd_preprocess, "compute DINO features, flow tracks, masks, best buddies"),
        ("train", cmd_train, "preprocess (if needed) and train Delta-DINO and the head on a clip"),
    ):
        p = add(name, fn, help, config=True)
        p.add_argument("clip", type=Path, help="clip directory")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "train":
            p.add_argument("--iterations", type=int, default=None)
            p.add_argument("--no-resume", action="store_true",
                           help="start over instead of resuming from the last checkpoint")

    p = add("track", cmd_track, "track query points through a trained clip", config=True)
    p.add_argument("clip", type=Path, help="clip directory")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--queries", type=Path, help="CSV (t,x,y) or JSON file of query points")
    q.add_argument("--grid", type=int, metavar="STEP", help="query a grid every STEP pixels")
    p.add_argument("--grid-frame", type=int, default=0, help="frame of the grid queries")
    p.add_argument("--out", type=Path, help="output folder (default: <clip>/tracks)")
    p.add_argument("--no-video", action="store_true", help="skip the overlay MP4")

    p = add("live", cmd_live, "track a trained clip's query points through a video file, frame "
            "by frame, as live tracking does on a camera", config=True)
    p.add_argument("clip", type=Path, help="trained clip directory (its model and queries)")
    p.add_argument("video", type=Path, help="video file (any OpenCV format)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--queries", type=Path, help="CSV (t,x,y) or JSON file of query points on "
                   "the clip's frames")
    q.add_argument("--grid", type=int, metavar="STEP", help="query a grid every STEP pixels")
    p.add_argument("--grid-frame", type=int, default=0, help="clip frame of the grid queries")
    p.add_argument("--out", type=Path, help="output folder (default: <video>_live beside it)")
    p.add_argument("--no-video", action="store_true", help="skip the overlay MP4")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("eval", cmd_eval, "score a trained clip with ground truth against baselines",
            config=True)
    p.add_argument("clip", type=Path, help="clip directory with ground_truth.npz")
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    p.add_argument("--no-baselines", action="store_true", help="score only the trained tracker")
    p.add_argument("--query-mode", default="strided", choices=["strided", "first"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("list", cmd_list, "list clips and their training state")
    p.add_argument("clip_dir", type=Path)

    p = add("config", cmd_config, "print the resolved configuration as YAML", config=True)
    p.add_argument("--markdown", action="store_true",
                   help="print the reference table of every setting instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (StorageError, OSError) as exc:
        from .core.storage import disk_error, is_disk_error

        line = str(exc) if isinstance(exc, StorageError) else (
            str(disk_error(exc.filename or "?", exc)) if is_disk_error(exc) else
            f"{exc.filename or 'a file'}: {exc.strerror or exc}; check the path and the disk")
        print(f"dino-tracker: error: {(line.splitlines() or ['OS error'])[0]}", file=sys.stderr)
        return 1
    except DinoTrackerError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"dino-tracker: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dino-tracker: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
