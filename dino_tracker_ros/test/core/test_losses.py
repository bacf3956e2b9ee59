"""The loss terms of eq. 5, against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dino_tracker_ros.core.losses import (
    cycle_loss,
    dino_bb_loss,
    flow_loss,
    huber_points,
    info_nce,
    prior_losses,
    refined_bb_loss,
)

HW = (100, 200)  # working H, W
DELTA = 1.0 / 32.0


def test_huber_is_measured_in_normalised_image_coordinates() -> None:
    target = torch.zeros(3, 2)
    # x errors of 1 px, (W - 1) / 64 px (exactly delta) and 20 px; y exact
    pred = torch.tensor([[1.0, 0.0], [199.0 / 64.0, 0.0], [20.0, 0.0]])
    got = huber_points(pred, target, HW, DELTA)
    d = torch.tensor([2.0 / 199, DELTA, 40.0 / 199])
    quad = 0.5 * d.square()
    lin = DELTA * (d - 0.5 * DELTA)
    want = torch.where(d <= DELTA, quad, lin) / 2  # mean over (x, y), y error 0
    assert torch.allclose(got, want, rtol=1e-6)
    # a y error is scaled by H - 1, not W - 1
    assert torch.allclose(huber_points(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), HW, DELTA),
                          torch.tensor([0.5 * (2.0 / 99) ** 2 / 2]))
    assert float(flow_loss(pred, target, HW, DELTA)) == float(got.mean())
    assert float(flow_loss(pred[:0], target[:0], HW, DELTA)) == 0.0


def test_info_nce_matches_a_hand_computation() -> None:
    torch.manual_seed(0)
    c, h, w = 8, 3, 4
    fs = torch.randn(c, h, w)
    ft = torch.randn(c, h, w)
    src_q = fs[:, 1, 2][None]
    tgt_q = ft[:, 2, 3][None]
    tau = 0.1
    l_st, l_ts = info_nce(src_q, tgt_q, F.normalize(fs, dim=0), F.normalize(ft, dim=0), tau)

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    a, b = src_q[0].numpy(), tgt_q[0].numpy()
    grid_t = ft.reshape(c, -1).T.numpy()
    grid_s = fs.reshape(c, -1).T.numpy()
    pos = cos(a, b) / tau
    want_st = -pos + math.log(sum(math.exp(cos(a, g) / tau) for g in grid_t))
    want_ts = -pos + math.log(sum(math.exp(cos(b, g) / tau) for g in grid_s))
    assert abs(float(l_st[0]) - want_st) < 1e-4
    assert abs(float(l_ts[0]) - want_ts) < 1e-4


def test_info_nce_rewards_distinct_matches() -> None:
    c, h, w = 12, 3, 4
    eye = torch.eye(c).reshape(c, h, w)  # one-hot tokens: a perfect, unambiguous match
    l_good, _ = info_nce(eye[:, 0, 0][None], eye[:, 0, 0][None], eye, eye, 0.1)
    blurred = F.normalize(eye + 0.5, dim=0)  # every token similar to every other
    l_bad, _ = info_nce(blurred[:, 0, 0][None], blurred[:, 0, 0][None], blurred, blurred, 0.1)
    # perfect match: -10 + log(e^10 + 11) ~ 5e-4
    assert float(l_good[0]) < 1e-3 < float(l_bad[0])


def test_best_buddy_losses_use_their_normalisers() -> None:
    l_st = torch.tensor([1.0, 2.0])
    l_ts = torch.tensor([3.0, 4.0])
    w = torch.tensor([0.5, 1.0])
    # dino: sum(w (l_st + l_ts) / 2) / 700; refined: sum(w (l_st + l_ts)) / 1800
    assert abs(float(dino_bb_loss(l_st, l_ts, w, 700.0)) - (0.5 * 4 + 6) / 2 / 700) < 1e-9
    assert abs(float(refined_bb_loss(l_st, l_ts, w, 1800.0)) - (0.5 * 4 + 6) / 1800) < 1e-9


def test_cycle_loss_averages_over_kept_points_only() -> None:
    tgt = torch.zeros(3, 2)
    pred = torch.tensor([[1.0, 0.0], [2.0, 0.0], [50.0, 0.0]])
    weight = torch.tensor([1.0, 0.5, 0.0])  # the third point failed the cycle check
    got = cycle_loss(pred, tgt, pred, tgt, weight, HW, DELTA)
    h = huber_points(pred, tgt, HW, DELTA)
    want = (h[0] * 1.0 + h[1] * 0.5) / 2  # mean over 2 kept points, both directions equal
    assert torch.allclose(got, want)
    nothing = cycle_loss(pred, tgt, pred, tgt, torch.zeros(3), HW, DELTA)
    assert float(nothing) == 0.0


def test_prior_terms() -> None:
    torch.manual_seed(0)
    dino = torch.randn(2, 16, 5, 6)
    n0, a0 = prior_losses(dino.clone(), dino)
    assert float(n0) < 1e-6 and float(a0) < 1e-6
    n1, a1 = prior_losses(2.0 * dino, dino)  # same direction, twice the norm
    assert abs(float(n1) - 1.0) < 1e-5 and float(a1) < 1e-5
    n2, a2 = prior_losses(-dino, dino)  # same norm, opposite direction
    assert float(n2) < 1e-5 and abs(float(a2) - 2.0) < 1e-5
