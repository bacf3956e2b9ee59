"""Occlusion by trajectory agreement (paper fig. 3) and a visibility score in [0, 1].

For one query with predicted trajectory ``traj[t]`` (working pixels) and the cosine
similarity ``cos[t]`` between the query feature and the refined feature at ``traj[t]``:

1. **Anchors**: frames with ``cos[t] >= anchor_cos``, plus always the query frame. At most
   ``max_anchors`` are kept (the query frame and evenly spaced ones among the rest, a
   deterministic choice), so the cost is queries x anchors x frames instead of
   queries x frames x frames (the reference uses every anchor).
2. **Agreement**: the feature at ``traj[t]`` (frame ``t``) is tracked into every anchor frame
   ``a``; ``d[a, t]`` is the distance of that prediction to ``traj[a]``. ``m[t]`` is the
   median over anchors (the lower median, as ``torch.median``).
3. **Threshold**: ``thr = max over anchors a of m[a]`` (how much anchors disagree among
   themselves).
4. **Decision**: occluded where ``m[t] > thr`` or ``cos[t] < occlusion_cos``; the query frame
   itself is always visible.

**Score.** Two margins, each >= 0 exactly when its test says visible:

* distance margin ``u = 4 (thr - m) / max(thr, 1 px)``,
* similarity margin ``v = (cos - occlusion_cos) / 0.05``,

and ``score = sigmoid(min(u, v))``. Since sigmoid is increasing and ``sigmoid(0) = 0.5``,
``score >= 0.5`` exactly when both margins are >= 0, i.e. when the binary rule says visible;
exact ties of floating-point rounding are settled by the rule (occluded scores are capped
just below 0.5, the query frame's raised to at least 0.5). A distance at half the threshold
scores 0.88, at twice the threshold 0.018; a similarity 0.1 above ``occlusion_cos`` scores
0.88. Raising ``visibility_threshold`` above 0.5 demands a margin, lowering it forgives one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "DISTANCE_GAIN",
    "COSINE_SCALE",
    "Visibility",
    "agreement_visibility",
    "anchor_distances",
    "select_anchors",
    "visibility_score",
]

DISTANCE_GAIN = 4.0
COSINE_SCALE = 0.05
MIN_THRESHOLD_PX = 1.0
_BELOW_HALF = float(torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)))


class Visibility(NamedTuple):
    """Result of :func:`agreement_visibility` for Q queries over T frames.

    Attributes:
        visible: (Q, T) bool, the binary decision.
        score: (Q, T) float32 in [0, 1]; ``score >= 0.5`` == ``visible``.
        median_dist: (Q, T) float32, median over anchors of the agreement distance (px).
        threshold: (Q,) float32, the per-query distance threshold (px).
    """

    visible: torch.Tensor
    score: torch.Tensor
    median_dist: torch.Tensor
    threshold: torch.Tensor


def select_anchors(
    cos: torch.Tensor, query_frames: torch.Tensor, anchor_cos: float, max_anchors: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor frames per query: the query frame plus frames with ``cos >= anchor_cos``.

    When there are more candidates than ``max_anchors``, the query frame is kept and the
    other slots take candidates at evenly spaced ranks (in time order).

    Args:
        cos: (Q, T) similarity of the query feature to the feature at the prediction.
        query_frames: (Q,) long, each query's frame.
        anchor_cos: similarity threshold of anchors.
        max_anchors: A, slots per query (>= 1).

    Returns:
        anchors: (Q, A) long frame indices (0 in unused slots); valid: (Q, A) bool.
    """
    q, t = cos.shape
    dev = cos.device
    a = max(1, int(max_anchors))
    k = query_frames.long().to(dev)
    frames = torch.arange(t, device=dev)
    cand = (cos >= anchor_cos) & (frames[None, :] != k[:, None])
    count = cand.sum(dim=1)  # (Q,)
    # candidate frames first, in time order (a stable sort on "not a candidate")
    order = torch.sort((~cand).to(torch.uint8), dim=1, stable=True).indices  # (Q, T)
    slots = a - 1
    anchors = torch.zeros(q, a, dtype=torch.long, device=dev)
    valid = torch.zeros(q, a, dtype=torch.bool, device=dev)
    anchors[:, 0], valid[:, 0] = k, True
    if slots > 0 and t > 0:
        j = torch.arange(slots, device=dev, dtype=torch.float64)[None, :]
        cnt = count[:, None].to(torch.float64)
        # all candidates when they fit, else evenly spaced ranks
        rank = torch.where(cnt <= slots, j, torch.floor((j + 0.5) * cnt / slots))
        rank = rank.long().clamp(max=t - 1)
        anchors[:, 1:] = torch.gather(order, 1, rank)
        valid[:, 1:] = j < cnt
        anchors[:, 1:] = torch.where(valid[:, 1:], anchors[:, 1:], torch.zeros_like(rank))
    return anchors, valid


def anchor_distances(
    cycle_xy: torch.Tensor, traj: torch.Tensor, anchors: torch.Tensor
) -> torch.Tensor:
    """Distances between predictions into anchor frames and the trajectory there.

    Args:
        cycle_xy: (Q, A, T, 2): the feature at ``traj[q, t]`` predicted into frame
            ``anchors[q, a]``.
        traj: (Q, T, 2) trajectory.
        anchors: (Q, A) long anchor frames.

    Returns:
        (Q, A, T) distances ``|cycle_xy[q, a, t] - traj[q, anchors[q, a]]|``.
    """
    idx = anchors[..., None].expand(-1, -1, 2)  # (Q, A, 2)
    at_anchor = torch.gather(traj, 1, idx)  # (Q, A, 2)
    return torch.linalg.vector_norm(cycle_xy - at_anchor[:, :, None, :], dim=-1)


def visibility_score(
    median_dist: torch.Tensor,
    threshold: torch.Tensor,
    cos: torch.Tensor,
    occlusion_cos: float,
) -> torch.Tensor:
    """Continuous visibility in [0, 1] whose 0.5 level is the binary rule (module docstring).

    Args:
        median_dist: (Q, T) median agreement distance.
        threshold: (Q,) distance threshold.
        cos: (Q, T) query similarity at the prediction.
        occlusion_cos: similarity below which a frame is occluded.

    Returns:
        (Q, T) float32 score; ``>= 0.5`` iff ``median_dist <= threshold`` and
        ``cos >= occlusion_cos`` (ties settled by the rule).
    """
    thr = threshold.to(torch.float64)[:, None]
    m = median_dist.to(torch.float64)
    c = cos.to(torch.float64)
    u = DISTANCE_GAIN * (thr - m) / thr.clamp(min=MIN_THRESHOLD_PX)
    v = (c - occlusion_cos) / COSINE_SCALE
    score = torch.sigmoid(torch.minimum(u, v))
    visible = (m <= thr) & (c >= occlusion_cos)
    score = torch.where(visible, score.clamp(min=0.5), score.clamp(max=_BELOW_HALF))
    return score.to(torch.float32)


def agreement_visibility(
    cycle_xy: torch.Tensor,
    traj: torch.Tensor,
    anchors: torch.Tensor,
    valid: torch.Tensor,
    cos: torch.Tensor,
    query_frames: torch.Tensor,
    occlusion_cos: float,
) -> Visibility:
    """Trajectory-agreement visibility (module docstring) from precomputed predictions.

    Args:
        cycle_xy: (Q, A, T, 2) predictions into the anchor frames (see
            :func:`anchor_distances`); entries of invalid slots are ignored.
        traj: (Q, T, 2) trajectory (working pixels).
        anchors: (Q, A) long, valid: (Q, A) bool, from :func:`select_anchors`.
        cos: (Q, T) query similarity at the prediction.
        query_frames: (Q,) long.
        occlusion_cos: similarity below which a frame is occluded.

    Returns:
        :class:`Visibility`.
    """
    q, t = cos.shape
    dist = anchor_distances(cycle_xy.float(), traj.float(), anchors)  # (Q, A, T)
    dist = torch.where(valid[:, :, None], dist, torch.full_like(dist, float("nan")))
    median = torch.nanmedian(dist, dim=1).values  # (Q, T)
    at_anchors = torch.gather(median, 1, anchors)  # (Q, A)
    at_anchors = torch.where(valid, at_anchors, torch.full_like(at_anchors, -float("inf")))
    threshold = at_anchors.max(dim=1).values  # (Q,)
    score = visibility_score(median, threshold, cos, occlusion_cos)
    is_query = torch.arange(t, device=cos.device)[None, :] == query_frames.long()[:, None]
    score = torch.where(is_query, score.clamp(min=0.5), score)
    return Visibility(score >= 0.5, score, median.float(), threshold.float())
