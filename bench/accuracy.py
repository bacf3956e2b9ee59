#!/usr/bin/env python3
"""Accuracy on a fixed synthetic set: the trained tracker against its baselines.

Each clip of the set (fixed seeds) is written by ``core.synthetic`` (photo layers moved by
known affine paths, an occluding bar), trained with the chosen profile and scored by
``core.baselines.evaluate_clip``: TAP-Vid AJ, delta_avg and OA at 256 x 256 for the
trained tracker, the untrained features (DINO alone through the same head, refiner off)
and chained DIS optical flow, over all queries and over the points that are occluded and
reappear. The mean over clips is TAP-Vid's benchmark convention.

No pretrained DINOv2 weights can be downloaded here: the backbone is randomly initialised
(announced in the table), so every number is far below the paper's; the comparison
between methods on the same queries is the point.

Usage (from the repository root, project environment active)::

    python bench/accuracy.py            # 3 clips, 24 frames, the profile's iterations
    python bench/accuracy.py --quick    # 2 clips, 16 frames, 150 iterations

Writes ``bench/results/accuracy.md``, ``bench/results/accuracy.png`` and a contact sheet
of the first clip's tracks, ``bench/results/accuracy_tracks.png``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "dino_tracker_ros"))  # the source tree, with or without env.sh

METHODS = ("tracker", "untrained", "dis")
LABELS = {"tracker": "trained tracker", "untrained": "untrained features",
          "dis": "chained DIS flow"}
KEYS = ("aj", "delta_avg", "oa")


def _fmt(m: dict, key: str) -> str:
    v = m.get(key, float("nan"))
    return "-" if v != v else f"{100 * v:.1f}"


def _mean(results: list[dict], method: str, subset: str) -> dict:
    vals = {k: [r["methods"][method][subset].get(k, np.nan) for r in results
                if r["methods"][method][subset]] for k in KEYS}
    return {k: float(np.nanmean(v)) if len(v) else float("nan") for k, v in vals.items()}


def _table(results: list[dict], subset: str) -> list[str]:
    head = ["method"] + [f"{r['clip']} {k}" for r in results for k in ("AJ",)] + [
        "mean AJ", "mean delta_avg", "mean OA"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method in METHODS:
        cells = [LABELS[method]]
        cells += [_fmt(r["methods"][method][subset], "aj") for r in results]
        mean = _mean(results, method, subset)
        cells += [_fmt(mean, k) for k in KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dino_tracker_ros.core.storage import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, subset in zip(axes, ("all", "reappearing"), strict=True):
        x = np.arange(len(KEYS))
        for i, method in enumerate(METHODS):
            mean = _mean(results, method, subset)
            ax.bar(x + (i - 1) * 0.27, [100 * mean[k] for k in KEYS], 0.27,
                   label=LABELS[method])
        ax.set_xticks(x, ["AJ", "delta_avg", "OA"])
        ax.set_title(f"{subset} queries (mean over {len(results)} clips)")
        ax.set_ylim(0, 100)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("% (TAP-Vid, 256x256)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--profile", default="cpu", help="configuration profile (default cpu)")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--mode", default="first", choices=("first", "strided"),
                        help="TAP-Vid query mode")
    parser.add_argument("--keep", default="", help="keep the clips in this folder")
    args = parser.parse_args()

    import cv2
    import torch

    from dino_tracker_ros.core.baselines import evaluate_clip
    from dino_tracker_ros.core.config import load_config
    from dino_tracker_ros.core.predictor import Predictor
    from dino_tracker_ros.core.render import contact_sheet
    from dino_tracker_ros.core.storage import write_bytes_atomic
    from dino_tracker_ros.core.synthetic import make_synthetic_clip
    from dino_tracker_ros.core.trainer import train_clip

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds, frames, size = ((0, 1), 16, (240, 320)) if args.quick else ((0, 1, 2), 24, (240, 320))
    cfg = load_config(profile=args.profile, device="cpu",
                      overrides={"backbone.random_init": True})
    iters = args.iterations or (150 if args.quick else cfg.train.iterations)
    machine = describe_machine()
    torch.manual_seed(0)
    t_start = time.monotonic()
    results, train_s = [], []
    with tempfile.TemporaryDirectory(prefix="bench_accuracy_") as tmp:
        root = Path(args.keep or tmp)
        for seed in seeds:
            clip, _ = make_synthetic_clip(root, f"synthetic_seed{seed}", num_frames=frames,
                                          height=size[0], width=size[1], seed=seed,
                                          overwrite=True)
            res = train_clip(clip, cfg, iterations=iters, resume=False)
            train_s.append(res.seconds)
            ev = evaluate_clip(clip, cfg, device="cpu", query_mode=args.mode)
            results.append(ev)
            print(f"{clip.clip_id}: trained {iters} iterations in {res.seconds:.0f} s; AJ "
                  + ", ".join(f"{m} {100 * ev['methods'][m]['all']['aj']:.1f}"
                              for m in METHODS), flush=True)
            if seed == seeds[0]:
                from dino_tracker_ros.core.synthetic import load_ground_truth

                gt = load_ground_truth(clip)
                q = gt.queries[::4].astype(np.float64)
                q[:, 0] = 0
                q[:, 1:] = gt.tracks[::4, 0]
                keep = gt.visible[::4, 0]
                tr = Predictor.open(clip, device="cpu").track(q[keep])
                frames_rgb = [clip.frame(t) for t in range(len(clip))]
                idx = np.linspace(0, len(clip) - 1, 6).round().astype(int)
                sheet = contact_sheet(frames_rgb, tr.tracks, tr.visible, idx, cols=3)
                ok, png = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
                if ok:
                    write_bytes_atomic(RESULTS / "accuracy_tracks.png", png.tobytes())
    cmd = "python bench/accuracy.py" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads else "") + (
        f" --profile {args.profile}" if args.profile != "cpu" else "") + (
        f" --iterations {args.iterations}" if args.iterations else "") + (
        f" --mode {args.mode}" if args.mode != "first" else "")
    n_q = sum(r["num_queries"] for r in results)
    n_r = sum(r["num_reappearing"] for r in results)
    lines = [
        "# Accuracy on the fixed synthetic set",
        "",
        f"Command: `{cmd}` ({time.monotonic() - t_start:.0f} s in all). Machine: {machine}.",
        "",
        f"**Randomly initialised DINOv2 backbone** (no pretrained weights offline): profile "
        f"`{args.profile}` with `backbone.random_init=true`, {iters} training iterations per "
        f"clip (mean {np.mean(train_s):.0f} s per clip including preprocessing and caching), "
        f"device cpu. Clips: `core.synthetic` seeds {', '.join(map(str, seeds))}, "
        f"{frames} frames, {size[1]}x{size[0]}, with the occluding bar. Queries: TAP-Vid "
        f"'{args.mode}' mode from the ground truth ({n_q} in all, {n_r} reappearing). "
        "Metrics in % at 256x256; mean over clips.",
        "",
        "## All queries",
        "",
        *_table(results, "all"),
        "",
        "## Queries whose point is occluded and reappears",
        "",
        *_table(results, "reappearing"),
        "",
        "Methods: *trained tracker*: Delta-DINO + head trained on the clip, trajectory-"
        "agreement visibility; *untrained features*: the same head on the (random) DINO "
        "features, refiner off; *chained DIS flow*: OpenCV DIS chained frame to frame, "
        "occluded where the forward-backward check fails.",
    ]
    write_bytes_atomic(RESULTS / "accuracy.md", ("\n".join(lines) + "\n").encode())
    _plot(results, RESULTS / "accuracy.png")
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'accuracy.md'}, accuracy.png and accuracy_tracks.png")


if __name__ == "__main__":
    main()
