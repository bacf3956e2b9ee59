#!/usr/bin/env python3
"""Speed and memory of every stage, against the number of frames and the working resolution.

For each configuration a fresh worker process writes a synthetic clip, preprocesses it
(frames, features, flow, masks, best_buddies), trains for a few iterations, builds the
refined-feature cache and answers 100 and 1,000 grid queries. Reported per stage: wall
seconds and peak resident memory (the process's VmHWM, reset at each stage start; memory
maps of the clip's arrays count while their pages are resident). Training is reported as
iterations per second with every loss term on (``train.refine_start=0``).

Usage (from the repository root, project environment active)::

    python bench/speed.py            # frames 8/16/32/50 at height 224, heights 112-224 at 16
    python bench/speed.py --quick    # frames 8/16 at height 112, heights 112/168 at 8
    python bench/speed.py --threads 1   # one torch thread (steadier on a loaded machine)

Writes ``bench/results/speed.md`` and ``bench/results/speed.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "dino_tracker_ros"))  # the source tree, with or without env.sh
STAGES = ("frames", "features", "flow", "masks", "best_buddies", "training", "caching")


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(spec: dict) -> dict:
    """Run every stage once for one configuration; return timings and peak memory."""
    import numpy as np
    import torch

    from dino_tracker_ros.core.config import load_config
    from dino_tracker_ros.core.predictor import Predictor, build_refined_cache, grid_queries
    from dino_tracker_ros.core.preprocess import Workspace
    from dino_tracker_ros.core.synthetic import make_synthetic_clip
    from dino_tracker_ros.core.trainer import train_clip

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = load_config(profile=spec["profile"], device="cpu", overrides={
        "backbone.random_init": True, "preprocess.height": spec["height"],
        "train.refine_start": 0, "train.checkpoint_every": 0,
    })
    out: dict = {"spec": spec, "seconds": {}, "peak_mib": {}}
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        clip, _ = make_synthetic_clip(tmp, num_frames=spec["frames"], height=spec["clip_h"],
                                      width=spec["clip_w"], seed=0)
        out["baseline_mib"] = round(_kib("VmRSS") / 1024, 1)
        state = {"stage": None, "t": 0.0}
        can_reset = _reset_peak()
        spans: dict = {}

        def close(stage: str | None) -> None:
            now = time.monotonic()
            if state["stage"] is not None:
                out["peak_mib"][state["stage"]] = round(_kib("VmHWM") / 1024, 1)
                spans[state["stage"]] = now - state["t"]
            _reset_peak()
            state["stage"], state["t"] = stage, now

        def progress(p) -> None:
            if p.stage != state["stage"]:
                close(p.stage)

        train_clip(clip, cfg, iterations=spec["iterations"], progress=progress)
        close(None)
        ws = Workspace(clip, cfg)
        rec = ws.record()["stages"]
        for stage in STAGES[:5]:
            out["seconds"][stage] = rec.get(stage, {}).get("seconds")
        # training: from its first report to the first caching report (steps after the
        # first iteration, so scaled by iterations / (iterations - 1))
        n_it = spec["iterations"]
        out["seconds"]["training"] = round(spans["training"] * n_it / max(n_it - 1, 1), 3)
        t1 = time.monotonic()
        _reset_peak()
        build_refined_cache(clip, device="cpu")
        out["seconds"]["caching"] = round(time.monotonic() - t1, 3)
        out["peak_mib"]["caching"] = round(_kib("VmHWM") / 1024, 1)
        out["iterations_per_s"] = round(spec["iterations"] / out["seconds"]["training"], 3)
        predictor = Predictor.open(clip, device="cpu")
        for n in (100, 1000):
            step = 1
            while len(grid_queries(clip.size, step + 1)) >= n:
                step += 1
            queries = grid_queries(clip.size, step)[:n]
            predictor.track(queries[:10])  # warm-up
            _reset_peak()
            t2 = time.monotonic()
            res = predictor.track(queries)
            out["seconds"][f"track_{n}"] = round(time.monotonic() - t2, 3)
            out["peak_mib"][f"track_{n}"] = round(_kib("VmHWM") / 1024, 1)
            out[f"visible_{n}"] = float(np.mean(res.visible))
        out["working_size"] = list(ws.size)
        out["grid"] = list(ws.geometry.grid_hw)
        out["peak_reset"] = can_reset
    return out


def _run_worker(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> list[str]:
    cols = ["frames", "working HxW", "grid"] + [f"{s} s" for s in STAGES] + [
        "it/s", "track 100 s", "track 1000 s"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        s = r["seconds"]
        cells = [str(r["spec"]["frames"]), "x".join(map(str, r["working_size"])),
                 "x".join(map(str, r["grid"]))]
        cells += [f"{s[k]:.2f}" if s.get(k) is not None else "-" for k in STAGES]
        cells += [f"{r['iterations_per_s']:.2f}", f"{s['track_100']:.2f}",
                  f"{s['track_1000']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    cols = ["frames", "working HxW", "baseline MiB"] + [f"{s} MiB" for s in STAGES] + [
        "track 100 MiB", "track 1000 MiB"]
    lines += ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        p = r["peak_mib"]
        cells = [str(r["spec"]["frames"]), "x".join(map(str, r["working_size"])),
                 f"{r['baseline_mib']:.0f}"]
        cells += [f"{p[k]:.0f}" if p.get(k) is not None else "-"
                  for k in (*STAGES, "track_100", "track_1000")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plot(by_frames: list[dict], by_height: list[dict], path: Path) -> None:
    import matplotlib

    from dino_tracker_ros.core.storage import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, rows, xkey, xlabel in (
        (axes[0], by_frames, "frames", "frames T"),
        (axes[1], by_height, "height", "working height (px)"),
    ):
        xs = [r["spec"][xkey] for r in rows]
        for stage in (*STAGES, "track_1000"):
            ys = [r["seconds"].get(stage) or 0.0 for r in rows]
            ax.plot(xs, ys, marker="o", label=stage)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_title("time per stage vs frames")
    axes[1].set_title("time per stage vs resolution")
    axes[0].legend(fontsize=7)
    rows = by_frames
    xs = [r["spec"]["frames"] for r in rows]
    for stage in (*STAGES, "track_1000"):
        axes[2].plot(xs, [r["peak_mib"].get(stage) or 0.0 for r in rows], marker="o",
                     label=stage)
    axes[2].set_xlabel("frames T")
    axes[2].set_ylabel("peak RSS (MiB)")
    axes[2].set_title("peak memory per stage vs frames")
    axes[2].grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--profile", default="cpu", help="configuration profile (default cpu)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="training iterations timed per configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from dino_tracker_ros.core.storage import write_bytes_atomic

    if args.quick:
        frames, heights, base_t, base_h, iters = (8, 16), (112, 168), 8, 112, 10
    else:
        frames, heights, base_t, base_h, iters = (8, 16, 32, 50), (112, 168, 224), 16, 224, 20
    iters = args.iterations or iters
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    machine = describe_machine()
    clip_h, clip_w = 240, 320

    def spec(t: int, h: int) -> dict:
        return {"profile": args.profile, "frames": t, "height": h, "clip_h": clip_h,
                "clip_w": clip_w, "iterations": iters, "threads": args.threads}

    t0 = time.monotonic()
    by_frames = []
    for t in frames:
        by_frames.append(_run_worker(spec(t, base_h)))
        print(f"frames {t}: {by_frames[-1]['seconds']}", flush=True)
    by_height = []
    for h in heights:
        hit = next((r for r in by_frames if r["spec"] == spec(base_t, h)), None)
        by_height.append(hit or _run_worker(spec(base_t, h)))
        print(f"height {h}: {by_height[-1]['seconds']}", flush=True)
    cmd = "python bench/speed.py" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads else "") + (
        f" --iterations {args.iterations}" if args.iterations else "") + (
        f" --profile {args.profile}" if args.profile != "cpu" else "")
    lines = [
        "# Speed and memory per stage",
        "",
        f"Command: `{cmd}` ({time.monotonic() - t0:.0f} s in all). Machine: {machine}.",
        "",
        f"Profile `{args.profile}` with a **randomly initialised** backbone (no pretrained "
        f"weights offline: same cost as real weights), synthetic {clip_w}x{clip_h} clips, "
        f"{iters} training iterations timed with every loss term on, device cpu. Peak memory "
        "is the worker process's resident-set high-water mark within each stage (includes "
        "the Python/torch baseline, given as its own column, and resident pages of memory "
        "maps).",
        "",
        f"## Against the number of frames (working height {base_h})",
        "",
        *_table(by_frames),
        "",
        f"## Against the working resolution ({base_t} frames)",
        "",
        *_table(by_height),
        "",
        "Query latency: `Predictor.track` on a grid of 100 or 1,000 points of frame 0, "
        "all frames, visibility included (cache already built).",
    ]
    write_bytes_atomic(RESULTS / "speed.md", ("\n".join(lines) + "\n").encode())
    _plot(by_frames, by_height, RESULTS / "speed.png")
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'speed.md'} and {RESULTS / 'speed.png'}")


if __name__ == "__main__":
    main()
