"""Point-tracking metrics: TAP-Vid (delta, OA, Jaccard, AJ) and BADJA (delta_seg, delta_3px).

Pure numpy, no model code. Conventions follow the rest of the project: points are
``(t, x, y)`` and positions ``(x, y)``. TAP-Vid's own files store queries as ``(t, y, x)``;
convert them once at the edge with :func:`queries_from_tapvid`.

TAP-Vid scores positions in a 256 x 256 frame: rescale predictions and ground truth from
the clip size with :func:`to_tapvid_resolution` before calling :func:`tapvid_metrics`
(:func:`evaluate_tracks` does both). The thresholds are strict: a prediction counts
within ``d`` pixels when its distance is ``< d``.

Query modes (which frames are scored for a query on frame ``k``):

* ``first``: frames after the query frame (``t > k``),
* ``strided``: every frame except the query frame (``t != k``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .geometry import rescale_points

__all__ = [
    "TAPVID_SIZE",
    "TAPVID_THRESHOLDS",
    "badja_metrics",
    "evaluate_tracks",
    "evaluation_mask",
    "queries_from_tapvid",
    "sample_queries",
    "tapvid_metrics",
    "to_tapvid_resolution",
]

TAPVID_SIZE: tuple[int, int] = (256, 256)
TAPVID_THRESHOLDS: tuple[int, ...] = (1, 2, 4, 8, 16)
QUERY_MODES = ("first", "strided")


def queries_from_tapvid(query_points: np.ndarray) -> np.ndarray:
    """Convert TAP-Vid ``(t, y, x)`` query points ``(N, 3)`` to our ``(t, x, y)``."""
    q = np.asarray(query_points, dtype=np.float64)
    return q[..., [0, 2, 1]].copy()


def to_tapvid_resolution(
    xy: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int] = TAPVID_SIZE
) -> np.ndarray:
    """Rescale pixel positions ``(..., 2)`` (x, y) from a ``src_hw`` frame to 256 x 256."""
    return rescale_points(xy, src_hw, dst_hw)


def evaluation_mask(query_frames: np.ndarray, num_frames: int, query_mode: str) -> np.ndarray:
    """Which (query, frame) pairs are scored.

    Args:
        query_frames: (N,) frame index of each query.
        num_frames: T.
        query_mode: ``first`` (frames after the query) or ``strided`` (all but the query's).

    Returns:
        (N, T) bool.
    """
    if query_mode not in QUERY_MODES:
        raise ValueError(f"query_mode must be one of {QUERY_MODES}, got {query_mode!r}")
    k = np.rint(np.asarray(query_frames, dtype=np.float64)).astype(np.int64)[:, None]
    t = np.arange(num_frames)[None, :]
    return t > k if query_mode == "first" else t != k


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    """num / den as a float; NaN when nothing is scored (den == 0)."""
    return float(num / den) if den > 0 else float("nan")


def tapvid_metrics(
    queries: np.ndarray,
    gt_occluded: np.ndarray,
    gt_tracks: np.ndarray,
    pred_occluded: np.ndarray,
    pred_tracks: np.ndarray,
    query_mode: str = "strided",
    thresholds: Sequence[float] = TAPVID_THRESHOLDS,
) -> dict[str, float]:
    """TAP-Vid metrics of one video, positions already in the scoring resolution (256 x 256).

    Args:
        queries: (N, 3) ``(t, x, y)``; only ``t`` is used (which frames are scored).
        gt_occluded: (N, T) bool, True where the point is occluded in the ground truth.
        gt_tracks: (N, T, 2) float (x, y).
        pred_occluded: (N, T) bool predicted occlusion.
        pred_tracks: (N, T, 2) float (x, y).
        query_mode: ``first`` or ``strided`` (see the module docstring).
        thresholds: distance thresholds in pixels (strict ``<``).

    Returns:
        ``{"delta_<d>": ..., "jaccard_<d>": ... for each threshold, "delta_avg", "aj", "oa",
        "n_scored", "n_visible"}``: fractions in [0, 1] (NaN when nothing is scored).
        ``delta_<d>``: fraction of ground-truth-visible scored points within ``d``;
        ``jaccard_<d>``: TP / (GT visible + FP), TP = within ``d`` and visible in both,
        FP = predicted visible where occluded or not within ``d``; ``oa``: fraction of scored
        points whose predicted occlusion equals the ground truth.
    """
    gt_occ = np.asarray(gt_occluded, dtype=bool)
    pred_occ = np.asarray(pred_occluded, dtype=bool)
    gt = np.asarray(gt_tracks, dtype=np.float64)
    pred = np.asarray(pred_tracks, dtype=np.float64)
    n, t = gt_occ.shape
    if gt.shape != (n, t, 2) or pred.shape != (n, t, 2) or pred_occ.shape != (n, t):
        raise ValueError(
            f"shape mismatch: gt_occluded {gt_occ.shape}, gt_tracks {gt.shape}, "
            f"pred_occluded {pred_occ.shape}, pred_tracks {pred.shape}"
        )
    evaluated = evaluation_mask(np.asarray(queries)[:, 0], t, query_mode)
    visible, pred_visible = ~gt_occ, ~pred_occ
    n_scored = int(evaluated.sum())
    n_visible = int((visible & evaluated).sum())
    out: dict[str, float] = {
        "oa": _ratio(((pred_occ == gt_occ) & evaluated).sum(), n_scored),
    }
    sq_dist = np.sum((pred - gt) ** 2, axis=-1)
    deltas, jaccards = [], []
    for d in thresholds:
        within = sq_dist < float(d) ** 2
        correct = within & visible & evaluated
        true_pos = (correct & pred_visible).sum()
        false_pos = (pred_visible & (gt_occ | ~within) & evaluated).sum()
        deltas.append(_ratio(correct.sum(), n_visible))
        jaccards.append(_ratio(true_pos, n_visible + false_pos))
        out[f"delta_{d:g}"] = deltas[-1]
        out[f"jaccard_{d:g}"] = jaccards[-1]
    out["delta_avg"] = float(np.mean(deltas))
    out["aj"] = float(np.mean(jaccards))
    out["n_scored"] = n_scored
    out["n_visible"] = n_visible
    return out


def evaluate_tracks(
    queries: np.ndarray,
    gt_tracks: np.ndarray,
    gt_visible: np.ndarray,
    pred_tracks: np.ndarray,
    pred_visible: np.ndarray,
    image_hw: tuple[int, int],
    query_mode: str = "strided",
) -> dict[str, float]:
    """TAP-Vid metrics for tracks given in the clip's pixels (rescaled to 256 x 256 here).

    Args:
        queries: (N, 3) ``(t, x, y)`` clip pixels.
        gt_tracks: (N, T, 2) ground-truth (x, y), clip pixels.
        gt_visible: (N, T) bool.
        pred_tracks: (N, T, 2) predicted (x, y), clip pixels.
        pred_visible: (N, T) bool.
        image_hw: clip (H, W).
        query_mode: ``first`` or ``strided``.

    Returns:
        As :func:`tapvid_metrics`.
    """
    return tapvid_metrics(
        queries,
        ~np.asarray(gt_visible, dtype=bool),
        to_tapvid_resolution(gt_tracks, image_hw),
        ~np.asarray(pred_visible, dtype=bool),
        to_tapvid_resolution(pred_tracks, image_hw),
        query_mode=query_mode,
    )


def badja_metrics(
    queries: np.ndarray,
    gt_tracks: np.ndarray,
    gt_visible: np.ndarray,
    pred_tracks: np.ndarray,
    fg_area: np.ndarray,
    seg_fraction: float = 0.2,
    px_threshold: float = 3.0,
) -> dict[str, float]:
    """BADJA-style accuracy, in whatever pixels the inputs use (BADJA: the clip's own).

    Scored pairs: every ground-truth-visible (query, frame) except the query's own frame.

    Args:
        queries: (N, 3) ``(t, x, y)``; only ``t`` is used.
        gt_tracks: (N, T, 2) (x, y).
        gt_visible: (N, T) bool.
        pred_tracks: (N, T, 2) (x, y).
        fg_area: (T,) foreground (segmentation) area of each frame in pixels.
        seg_fraction: delta_seg counts errors ``< seg_fraction * sqrt(area)``.
        px_threshold: delta_3px counts errors ``< px_threshold``.

    Returns:
        ``{"delta_seg", "delta_3px", "n_scored"}``, fractions in [0, 1] (NaN if none scored).
    """
    gt = np.asarray(gt_tracks, dtype=np.float64)
    pred = np.asarray(pred_tracks, dtype=np.float64)
    n, t = gt.shape[:2]
    scored = evaluation_mask(np.asarray(queries)[:, 0], t, "strided")
    scored &= np.asarray(gt_visible, dtype=bool)
    dist = np.linalg.norm(pred - gt, axis=-1)
    seg_thr = seg_fraction * np.sqrt(np.asarray(fg_area, dtype=np.float64))[None, :]
    count = int(scored.sum())
    return {
        "delta_seg": _ratio(((dist < seg_thr) & scored).sum(), count),
        "delta_3px": _ratio(((dist < px_threshold) & scored).sum(), count),
        "n_scored": count,
    }


def sample_queries(
    gt_tracks: np.ndarray,
    gt_visible: np.ndarray,
    query_mode: str = "strided",
    stride: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Build TAP-Vid style queries from ground-truth tracks.

    ``first``: one query per track at its first visible frame. ``strided``: one query per
    track at every ``stride``-th frame where it is visible (TAP-Vid's protocol).

    Args:
        gt_tracks: (N, T, 2) (x, y).
        gt_visible: (N, T) bool.
        query_mode: ``first`` or ``strided``.
        stride: frame step of strided queries.

    Returns:
        queries: (M, 3) float64 ``(t, x, y)``; track_index: (M,) int64, the ground-truth
        track each query belongs to (index gt arrays with it).
    """
    gt = np.asarray(gt_tracks, dtype=np.float64)
    vis = np.asarray(gt_visible, dtype=bool)
    if query_mode not in QUERY_MODES:
        raise ValueError(f"query_mode must be one of {QUERY_MODES}, got {query_mode!r}")
    if query_mode == "first":
        idx = np.flatnonzero(vis.any(axis=1))
        frames = vis[idx].argmax(axis=1)
    else:
        sel = np.zeros_like(vis)
        sel[:, ::stride] = vis[:, ::stride]
        idx, frames = np.nonzero(sel)
    queries = np.concatenate([frames[:, None].astype(np.float64), gt[idx, frames]], axis=1)
    return queries, idx.astype(np.int64)
