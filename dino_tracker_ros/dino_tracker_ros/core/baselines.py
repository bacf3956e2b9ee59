"""Baselines and the evaluation harness: every accuracy figure with its comparisons beside it.

Methods evaluated on the same queries of a clip with ground truth:

* ``tracker``: the trained DINO-Tracker (:class:`~.predictor.Predictor` on the refined
  features, trajectory-agreement visibility).
* ``untrained``: the same head on the DINO features alone, i.e. a fresh
  :class:`~.model.DinoTrackerModel` whose Delta-DINO is zero-initialised (refined ==
  DINO exactly, so the stored DINO tokens are used directly) with the refiner
  **disabled** (``model.refiner = false``: an untrained refiner is random), so positions
  are the cosine argmax refined by the soft-argmax over the radius-R disc; visibility by
  the same trajectory agreement.
* ``dis``: chained OpenCV DIS optical flow on the working frames, forward and backward
  from each query frame; a point is occluded in a frame where the forward-backward check
  of the step into that frame fails (or it has left the image); chaining continues through
  such frames.

Scores are TAP-Vid metrics at 256 x 256 (:mod:`.metrics`) over all queries and over the
*reappearing* queries (ground truth occluded for a span between two visible frames).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .clip import Clip
from .config import Config, TrackConfig
from .errors import ClipError, NotTrainedError
from .geometry import rescale_points
from .metrics import evaluate_tracks, sample_queries
from .progress import CancelToken, ProgressCallback, StageReporter

__all__ = [
    "METHODS",
    "chained_flow_tracks",
    "evaluate_clip",
    "format_tables",
    "reappearing",
    "untrained_predictor",
]

logger = logging.getLogger("dino_tracker.eval")

METHODS = ("tracker", "untrained", "dis")
TABLE_KEYS = ("aj", "delta_avg", "oa", "delta_1", "delta_2", "delta_4", "delta_8", "delta_16")


def chained_flow_tracks(
    frames: np.ndarray | Sequence[np.ndarray],
    queries: np.ndarray,
    *,
    estimator: Any = None,
    cycle_threshold: float = 1.5,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Track points by chaining frame-to-frame optical flow from their query frames.

    Each step moves a point by the flow sampled bilinearly at its position; the step into
    frame ``s`` passes when the point returns within ``cycle_threshold`` px along the
    reverse flow, lands inside the image, and lies on a pixel some pixel of the other
    frame flows into (:func:`~.flow.point_consistency`). Frames are read one pair at a
    time (RAM independent of T); each pair's two flows are computed once per direction.

    Args:
        frames: (T, H, W, 3) uint8 RGB (array or memory map).
        queries: (N, 3) (t, x, y) in the frames' pixels, t integer.
        estimator: a :class:`~.flow.FlowEstimator` (default: OpenCV DIS, PRESET_MEDIUM).
        cycle_threshold: forward-backward threshold in pixels.
        progress: stage ``dis`` reports.
        cancel: checked between frame pairs.

    Returns:
        tracks (N, T, 2) float32 (x, y) and visible (N, T) bool (True at the query frame).
    """
    from .flow import DisFlow, point_consistency

    est = estimator if estimator is not None else DisFlow()
    num_t = len(frames)
    q = np.asarray(queries, dtype=np.float64)
    k = np.rint(q[:, 0]).astype(np.int64)
    n = len(q)
    tracks = np.zeros((n, num_t, 2), np.float32)
    visible = np.zeros((n, num_t), bool)
    rows = np.arange(n)
    tracks[rows, k] = q[:, 1:]
    visible[rows, k] = True
    if n == 0:
        return tracks, visible
    lo, hi = int(k.min()), int(k.max())
    steps = (num_t - 1 - lo) + hi
    reporter = StageReporter(progress, "dis", max(steps, 1), cancel=cancel)
    done = 0
    # forward: frame s -> s + 1 for queries with k <= s; backward: s -> s - 1 for k >= s
    for s, d in [(s, 1) for s in range(lo, num_t - 1)] + [(s, -1) for s in range(hi, 0, -1)]:
        active = np.flatnonzero(k <= s) if d > 0 else np.flatnonzero(k >= s)
        fwd, bwd = est.pair(np.asarray(frames[s]), np.asarray(frames[s + d]))
        ok, moved = point_consistency(tracks[active, s], fwd, bwd, cycle_threshold)
        tracks[active, s + d] = moved
        visible[active, s + d] = ok
        done += 1
        reporter.update(done)
    return tracks, visible


def untrained_predictor(
    clip: Clip,
    cfg: Config,
    *,
    device: str = "auto",
    track_cfg: TrackConfig | None = None,
    precision: str = "auto",
) -> Any:
    """A :class:`~.predictor.Predictor` on the clip's DINO features alone (no training).

    The model is a fresh :class:`~.model.DinoTrackerModel` built with ``model.refiner``
    off; its zero-initialised Delta-DINO makes refined == DINO, so the stored DINO
    tokens (``work/features.npy``) serve directly as its features.

    Raises:
        NotTrainedError: the clip has not been preprocessed with ``cfg``.
    """
    import torch

    from .model import DinoTrackerModel
    from .predictor import Predictor
    from .preprocess import Workspace

    ws = Workspace(clip, cfg)
    if not ws.done("features"):
        raise NotTrainedError(
            f"clip {clip.clip_id!r} has no DINO features for this configuration; "
            "run `dino-tracker preprocess` first"
        )
    feats = ws.features()
    torch.manual_seed(0)
    model = DinoTrackerModel(
        int(feats.shape[1]), ws.geometry, dataclasses.replace(cfg.model, refiner=False)
    )
    return Predictor(model, feats, orig_size=clip.size, track_cfg=track_cfg or cfg.track,
                     device=device, stamps_ns=clip.stamps_ns, precision=precision)


def reappearing(visible: np.ndarray) -> np.ndarray:
    """(N,) bool: tracks occluded for at least one frame between two visible frames."""
    vis = np.asarray(visible, dtype=bool)
    t = np.arange(vis.shape[1])
    any_vis = vis.any(axis=1)
    first = np.where(any_vis, vis.argmax(axis=1), vis.shape[1])
    last = np.where(any_vis, vis.shape[1] - 1 - vis[:, ::-1].argmax(axis=1), -1)
    between = (t[None] > first[:, None]) & (t[None] < last[:, None])
    return (between & ~vis).any(axis=1)


def _scores(queries, gt_tracks, gt_vis, tracks, vis, hw, mode) -> dict[str, Any]:
    """Metrics over all queries and over the reappearing ones."""
    sub = reappearing(gt_vis)
    out = {"all": evaluate_tracks(queries, gt_tracks, gt_vis, tracks, vis, hw, mode)}
    out["reappearing"] = (
        evaluate_tracks(queries[sub], gt_tracks[sub], gt_vis[sub], tracks[sub], vis[sub], hw,
                        mode)
        if sub.any() else {}
    )
    out["num_reappearing"] = int(sub.sum())
    return out


def evaluate_clip(
    clip: Clip | str | os.PathLike[str],
    cfg: Config | None = None,
    *,
    device: str = "auto",
    query_mode: str = "strided",
    methods: Sequence[str] = METHODS,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Score the trained tracker and the baselines on a clip with ground truth.

    Queries come from the ground truth (:func:`~.metrics.sample_queries`: ``first``: each
    point's first visible frame; ``strided``: every 5th frame where it is visible).

    Args:
        clip: a clip with ``ground_truth.npz`` (e.g. from ``dino-tracker synth``).
        cfg: its ``track`` section sets the inference settings (default: those stored with
            the model). The baselines use the preprocessing (working size, DINO features)
            of the configuration stored with the trained model; ``cfg``'s only when the clip
            has no model (and ``tracker`` is not among ``methods``).
        device: torch device.
        query_mode: ``first`` or ``strided``.
        methods: any of :data:`METHODS`.
        progress: reports of stages ``tracker``, ``untrained``, ``dis`` (step = method).
        cancel: checked between methods.

    Returns:
        ``{"clip", "query_mode", "num_queries", "num_reappearing", "image_size", "methods":
        {name: {"all": metrics, "reappearing": metrics, "seconds": s}}, "notes": [...]}``
        with metrics as :func:`~.metrics.tapvid_metrics` returns them.

    Raises:
        ClipError: the clip has no ground truth. NotTrainedError: no model or features.
    """
    from .predictor import Predictor
    from .preprocess import Workspace
    from .synthetic import load_ground_truth

    clip = clip if isinstance(clip, Clip) else Clip.open(clip)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    gt = load_ground_truth(clip)
    if gt is None:
        raise ClipError(f"clip {clip.clip_id!r} has no ground truth (ground_truth.npz); "
                        "evaluate a synthetic clip (`dino-tracker synth`)")
    queries, idx = sample_queries(gt.tracks, gt.visible, query_mode)
    gt_tracks, gt_vis = gt.tracks[idx], gt.visible[idx]
    hw = clip.size
    track_cfg = cfg.track if cfg is not None else None
    model_file = Path(clip.model_dir) / "model.pt"
    if model_file.is_file():  # the baselines use the preprocessing the model was trained on
        from .checkpoint import load_model

        _, cfg, _ = load_model(model_file, "cpu")
    elif cfg is None or "tracker" in methods:
        raise NotTrainedError(f"clip {clip.clip_id!r} has no trained model; train it first")
    result: dict[str, Any] = {
        "clip": clip.clip_id,
        "query_mode": query_mode,
        "num_queries": int(len(queries)),
        "num_reappearing": int(reappearing(gt_vis).sum()),
        "image_size": [int(hw[0]), int(hw[1])],
        "methods": {},
        "notes": [],
    }
    ws = Workspace(clip, cfg)
    rec = ws.record()["stages"].get("features", {})
    if rec.get("random_init"):
        result["notes"].append("randomly initialised DINO backbone (no pretrained weights)")
    for i, name in enumerate(methods):
        if cancel is not None:
            cancel.check()
        if progress is not None:
            StageReporter(progress, name, len(methods)).update(i)
        t0 = time.monotonic()
        if name == "tracker":
            res = Predictor.open(clip, device=device, track_cfg=track_cfg).track(queries)
            tracks, vis = res.tracks, res.visible
        elif name == "untrained":
            res = untrained_predictor(clip, cfg, device=device,
                                      track_cfg=track_cfg).track(queries)
            tracks, vis = res.tracks, res.visible
        else:
            q_work = queries.copy()
            q_work[:, 1:] = rescale_points(queries[:, 1:], hw, ws.size)
            t_work, vis = chained_flow_tracks(
                ws.frames(), q_work, cycle_threshold=cfg.preprocess.flow.cycle_threshold,
                cancel=cancel,
            )
            tracks = rescale_points(t_work, ws.size, hw).astype(np.float32)
            tracks[np.arange(len(queries)), queries[:, 0].astype(int)] = queries[:, 1:]
        scores = _scores(queries, gt_tracks, gt_vis, tracks, vis, hw, query_mode)
        scores["seconds"] = round(time.monotonic() - t0, 3)
        result["methods"][name] = scores
        logger.info("eval %s %s: AJ %.3f delta_avg %.3f OA %.3f (%.1f s)", clip.clip_id, name,
                    scores["all"]["aj"], scores["all"]["delta_avg"], scores["all"]["oa"],
                    scores["seconds"])
    return result


def format_tables(result: dict[str, Any], keys: Sequence[str] = TABLE_KEYS) -> str:
    """Markdown tables (all queries, reappearing queries) of :func:`evaluate_clip`'s result.

    Values are percentages, as in the TAP-Vid and DINO-Tracker papers.
    """
    lines = []
    for subset, title in (("all", "all queries"), ("reappearing", "reappearing queries")):
        n = result["num_queries"] if subset == "all" else result["num_reappearing"]
        lines.append(f"{result['clip']} ({result['query_mode']} queries, {title}: {n}, "
                     "TAP-Vid metrics at 256x256, %)")
        lines.append("| method | " + " | ".join(keys) + " | seconds |")
        lines.append("|---" * (len(keys) + 2) + "|")
        for name, scores in result["methods"].items():
            m = scores.get(subset) or {}
            cells = [f"{100 * m[k]:.1f}" if k in m and m[k] == m[k] else "-" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {scores['seconds']:.1f} |")
        lines.append("")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines).rstrip() + "\n"
