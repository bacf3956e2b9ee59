"""The terms of the training objective (METHOD.md, eq. 5), one function each.

Positions enter in working pixels; the Huber terms compare them in normalised image
coordinates (x / (W - 1) and y / (H - 1) scaled to [-1, 1], as in the reference), so the
Huber ``delta`` (1/32) means the same fraction of the image at every resolution.
The weighted sum of the terms is formed by the trainer (:mod:`.trainer`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "cycle_loss",
    "dino_bb_loss",
    "flow_loss",
    "huber_points",
    "info_nce",
    "prior_losses",
    "refined_bb_loss",
]

_EPS = 1e-8


def huber_points(
    pred: torch.Tensor, target: torch.Tensor, image_hw: tuple[int, int], delta: float
) -> torch.Tensor:
    """Per-point Huber loss in normalised image coordinates.

    Args:
        pred, target: ``(N, 2)`` working-pixel (x, y).
        image_hw: working image size (H, W).
        delta: Huber threshold in normalised units.

    Returns:
        ``(N,)`` float32, the mean over x and y of each point's Huber loss.
    """
    h, w = image_hw
    diff = pred.float() - target.float()
    diff = torch.stack([diff[:, 0] * (2.0 / max(w - 1, 1)), diff[:, 1] * (2.0 / max(h - 1, 1))],
                       -1)
    return F.huber_loss(diff, torch.zeros_like(diff), delta=delta, reduction="none").mean(-1)


def flow_loss(
    pred: torch.Tensor, target: torch.Tensor, image_hw: tuple[int, int], delta: float
) -> torch.Tensor:
    """L_flow: mean Huber loss of predicted vs flow-chained positions ``(N, 2)``.

    Both directions are simply rows of ``pred``/``target``. Returns 0 for ``N == 0``.
    """
    if pred.shape[0] == 0:
        return pred.new_zeros((), dtype=torch.float32)
    return huber_points(pred, target, image_hw, delta).mean()


def info_nce(
    src_q: torch.Tensor,
    tgt_q: torch.Tensor,
    src_unit: torch.Tensor,
    tgt_unit: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of best-buddy pairs against whole feature grids.

    For a pair (a in frame s, b in frame t) with features f_a, f_b, the forward term is
    ``-log(exp(cos(f_a, f_b) / tau) / sum_n exp(cos(f_a, F_t[n]) / tau))`` over every
    cell n of frame t's grid; the backward term swaps the roles.

    Args:
        src_q, tgt_q: ``(N, C)`` features of the pairs' points in frames s and t.
        src_unit, tgt_unit: ``(C, h, w)`` feature grids of frames s and t, already
            L2-normalised along C (the trainer normalises each grid once per iteration).
        temperature: tau.

    Returns:
        ``(l_st (N,), l_ts (N,))`` float32 (the logits may be computed in bf16 under
        autocast; the log-sum-exp is always float32).
    """
    a = F.normalize(src_q.float(), dim=-1, eps=_EPS)
    b = F.normalize(tgt_q.float(), dim=-1, eps=_EPS)
    pos = (a * b).sum(-1) / temperature
    l_st = torch.logsumexp((a @ tgt_unit.flatten(1)).float() / temperature, dim=-1) - pos
    l_ts = torch.logsumexp((b @ src_unit.flatten(1)).float() / temperature, dim=-1) - pos
    return l_st, l_ts


def dino_bb_loss(
    l_st: torch.Tensor, l_ts: torch.Tensor, weight: torch.Tensor, norm: float
) -> torch.Tensor:
    """L_dino-bb: ``sum(w * (l_st + l_ts) / 2) / norm`` (reference: norm 700)."""
    return (weight * (l_st + l_ts)).sum() / (2.0 * norm)


def refined_bb_loss(
    l_st: torch.Tensor, l_ts: torch.Tensor, weight: torch.Tensor, norm: float
) -> torch.Tensor:
    """L_rfn-bb: ``sum(w * (l_st + l_ts)) / norm`` (reference: norm 2 * 900)."""
    return (weight * (l_st + l_ts)).sum() / norm


def cycle_loss(
    pred_fwd: torch.Tensor,
    target_fwd: torch.Tensor,
    pred_bwd: torch.Tensor,
    target_bwd: torch.Tensor,
    weight: torch.Tensor,
    image_hw: tuple[int, int],
    delta: float,
) -> torch.Tensor:
    """L_rfn-cc: weighted Huber in both directions, averaged over the kept points.

    Args:
        pred_fwd, target_fwd: ``(N, 2)`` s -> t predictions and their (detached) targets.
        pred_bwd, target_bwd: ``(N, 2)`` t -> s predictions and the source points.
        weight: ``(N,)`` per-point weight; 0 for points that failed the cycle check
            (they count neither in the sum nor in the mean).
        image_hw, delta: as :func:`huber_points`.

    Returns:
        ``(mean_kept(w * h_fwd) + mean_kept(w * h_bwd)) / 2``; 0 when nothing is kept.
    """
    kept = (weight > 0).sum().clamp_min(1).float()
    h_f = huber_points(pred_fwd, target_fwd, image_hw, delta)
    h_b = huber_points(pred_bwd, target_bwd, image_hw, delta)
    return ((weight * h_f).sum() + (weight * h_b).sum()) / (2.0 * kept)


def prior_losses(refined: torch.Tensor, dino: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_prior's two terms on feature grids ``(B, C, h, w)``.

    Returns:
        ``(mean |1 - |Phi| / |Phi_DINO||, mean |1 - cos(Phi, Phi_DINO)|)``.
    """
    refined = refined.float()
    dino = dino.float()
    # two channel sums over the maps (their gradients are one pass each); the DINO
    # features are constants
    sq = (refined * refined).sum(dim=1).clamp_min(_EPS * _EPS)
    n_dino = dino.norm(dim=1).clamp_min(_EPS)
    norm_term = (1.0 - sq.sqrt() / n_dino).abs().mean()
    cos = (refined * dino).sum(dim=1) * torch.rsqrt(sq) / n_dino
    return norm_term, (1.0 - cos).abs().mean()
