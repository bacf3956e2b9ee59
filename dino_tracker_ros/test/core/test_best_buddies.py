"""DINO best buddies: mutual nearest neighbours, NMS ambiguity, weights, flow filtering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from dino_tracker_ros.core import best_buddies as bb
from dino_tracker_ros.core.best_buddies import (
    ambiguity_ratio,
    bb_weights,
    best_buddies,
    compute_best_buddies,
    mutual_nearest,
    partner_pairs,
    refined_best_buddies,
)
from dino_tracker_ros.core.config import BestBuddyConfig
from dino_tracker_ros.core.errors import Cancelled
from dino_tracker_ros.core.flow import FlowTracks
from dino_tracker_ros.core.geometry import GridGeometry
from dino_tracker_ros.core.progress import CancelToken

GEO = GridGeometry(height=14 + 7 * 15, width=14 + 7 * 15, stride=7)  # 16 x 16 tokens


def _shifted_pair(dy: int, dx: int, c: int = 32, seed: int = 0):
    """Random features and a copy shifted by (dy, dx) tokens; new random tokens fill in."""
    g = torch.Generator().manual_seed(seed)
    h, w = GEO.grid_hw
    fa = torch.randn(c, h, w, generator=g)
    fb = torch.randn(c, h, w, generator=g)
    fb[:, dy:, dx:] = fa[:, : h - dy, : w - dx]
    return fa, fb


@pytest.mark.parametrize("dy,dx", [(0, 0), (2, 3), (5, 1)])
def test_best_buddies_of_shifted_copy_are_the_shifted_grid(monkeypatch, dy, dx):
    monkeypatch.setattr(bb, "_ROW_CHUNK", 37)  # exercise the blocked similarity
    h, w = GEO.grid_hw
    fa, fb = _shifted_pair(dy, dx)
    idx_a, idx_b, cos = mutual_nearest(fa, fb)
    ia, ja = idx_a // w, idx_a % w
    ib, jb = idx_b // w, idx_b % w
    overlap = (ia < h - dy) & (ja < w - dx)
    assert int(overlap.sum()) == (h - dy) * (w - dx)  # every overlapping token is a buddy
    assert torch.equal(ib[overlap], ia[overlap] + dy)
    assert torch.equal(jb[overlap], ja[overlap] + dx)
    assert torch.allclose(cos[overlap], torch.ones(1), atol=1e-5)
    rows = best_buddies(fa.half().numpy(), fb.half().numpy(), GEO, BestBuddyConfig())
    exact = rows[np.all(rows[:, 2:4] - rows[:, 0:2] == [dx * 7, dy * 7], axis=1)]
    assert len(exact) == (h - dy) * (w - dx)
    assert np.all(exact[:, 4] > 1.9)  # cos 1, unambiguous: weight ~ 2
    others = rows[~np.all(rows[:, 2:4] - rows[:, 0:2] == [dx * 7, dy * 7], axis=1)]
    assert np.all(others[:, 4] < 1.0)  # random matches: cos < 0.79 in 32-d, low weight
    np.testing.assert_allclose(exact[:, 0:2] % 7, 6.5)  # token centres (patch 14)


def _peaks(centres_ij, values, h=20, w=30, background=0.0, sigma=0.6):
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = torch.full((h, w), background)
    for (i, j), v in zip(centres_ij, values, strict=True):
        out = torch.maximum(out, v * torch.exp(-((ii - i) ** 2 + (jj - j) ** 2) / sigma**2))
    return out


def test_ambiguity_ratio_and_weights():
    geo = GridGeometry(height=14 + 7 * 19, width=14 + 7 * 29, stride=7)  # 20 x 30 tokens
    maps = torch.stack([
        _peaks([(5, 5), (14, 25)], [0.9, 0.9]),  # two equal peaks far apart
        _peaks([(10, 10)], [0.9]),  # one sharp peak
        _peaks([(10, 10), (10, 12)], [0.9, 0.85]),  # two peaks 14 px apart: one NMS box
        _peaks([(5, 5), (14, 25)], [0.9, 0.45]),  # a second peak at half height
    ])
    r = ambiguity_ratio(maps, geo, top_k=400, box=30.0, iou=0.2)
    print(f"ambiguity ratios: {r.tolist()}")
    assert r[0] == pytest.approx(1.0, abs=1e-6)
    assert r[1] < 0.01
    assert r[2] < 0.01
    assert r[3] == pytest.approx(0.5, abs=1e-3)
    w = bb_weights(r, torch.full((4,), 0.9), 27.0, 5.7)
    assert w[0] < 0.01 * w[1]  # ambiguous: almost no weight
    assert w[1] == pytest.approx(2 * 0.9**3, rel=1e-4)
    assert bb_weights(torch.zeros(1), torch.full((1,), -0.5), 27.0, 5.7).item() == 0.0
    # with top_k = 1 nothing but the peak is a candidate
    assert ambiguity_ratio(maps, geo, top_k=1, box=30.0, iou=0.2).abs().max() == 0


def _nms_ratio(maps, geo, k, box, iou):
    """Reference: full batched_nms over the top_k candidates of every map."""
    num = maps.shape[0]
    vals, idx = maps.flatten(1).topk(k, dim=1)
    c = torch.from_numpy(geo.token_centres().reshape(-1, 2))[idx]
    boxes = torch.cat([c - box, c + box], -1).reshape(-1, 4)
    keep = batched_nms(boxes, vals.reshape(-1), torch.arange(num).repeat_interleave(k), iou)
    out = []
    for m in range(num):
        scores = vals.reshape(-1)[keep[keep // k == m]].sort(descending=True).values
        out.append(0.0 if len(scores) < 2 else float(scores[1].clamp(min=0) / scores[0]))
    return torch.tensor(out).clamp(0, 1)


@pytest.mark.parametrize("k,box,iou", [(400, 30.0, 0.2), (20, 30.0, 0.2), (6, 10.0, 0.5),
                                       (50, 20.0, 0.0)])
def test_ambiguity_ratio_equals_full_batched_nms(k, box, iou):
    torch.manual_seed(0)
    geo = GridGeometry(height=112, width=168, stride=7)
    h, w = geo.grid_hw
    maps = F.avg_pool2d(torch.randn(60, 1, h, w), 5, 1, 2)[:, 0] * 3
    ours = ambiguity_ratio(maps, geo, k, box, iou)
    ref = _nms_ratio(maps, geo, min(k, h * w), box, iou)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert 0.05 < float(ref.mean()) < 0.99  # the case is not trivial


def _clip_features(num=4, c=32, seed=0):
    """Frames whose features are one random field shifted by one token per frame."""
    h, w = GEO.grid_hw
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(c, h + num, w + num, generator=g)
    return np.stack([base[:, t : t + h, t : t + w].numpy() for t in range(num)]).astype(
        np.float16
    )


def test_compute_best_buddies_drops_flow_linked_pairs(tmp_path, write_flow_tracks):
    feats = _clip_features()
    # flow tracks on every token centre of frame 0, alive in frames 0-1 only
    centres = GEO.token_centres().reshape(-1, 2)
    tracks = [np.stack([p, p - 7.0]) for p in centres]  # content moves one token up-left
    write_flow_tracks(tmp_path, [0] * len(tracks), tracks, 4, (GEO.height, GEO.width))
    ft = FlowTracks.load(tmp_path)
    cfg = BestBuddyConfig(pairs_per_frame=10)
    reports = []
    rows = compute_best_buddies(feats, GEO, ft, cfg, tmp_path / "bb.npy", progress=reports.append)
    free = compute_best_buddies(feats, GEO, None, cfg, tmp_path / "bb_all.npy")
    pairs = {tuple(p) for p in free[:, [0, 3]].astype(int)}
    assert pairs == {(s, t) for s in range(4) for t in range(s + 1, 4)}  # all pairs, s < t
    kept = {tuple(p) for p in rows[:, [0, 3]].astype(int)}
    assert (0, 1) not in kept and (0, 1) in pairs  # flow links frames 0 and 1 everywhere
    for pair in pairs - {(0, 1)}:
        n_free = int(np.sum(np.all(free[:, [0, 3]] == pair, axis=1)))
        n_kept = int(np.sum(np.all(rows[:, [0, 3]] == pair, axis=1)))
        assert n_kept == n_free > 100
    # buddies follow the shift: frame t is frame s moved by (t - s) tokens up-left
    gap = (free[:, 3] - free[:, 0])[:, None]
    good = np.all(free[:, 4:6] - free[:, 1:3] == -7.0 * gap, axis=1) & (free[:, 6] > 1.0)
    assert good.mean() > 0.8
    assert rows.dtype == np.float32 and rows.shape[1] == 7 and np.all(rows[:, 6] > 0)
    assert reports[-1].stage == "best_buddies" and reports[-1].fraction == 1.0
    np.testing.assert_array_equal(np.load(tmp_path / "bb.npy"), rows)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_compute_best_buddies_cancel(tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        compute_best_buddies(_clip_features(), GEO, None, BestBuddyConfig(), tmp_path / "x.npy",
                             cancel=token)
    assert list(tmp_path.iterdir()) == []


def test_partner_pairs_bounded_near_and_far():
    num, per = 60, 4
    pairs = partner_pairs(num, per, seed=3)
    assert pairs == partner_pairs(num, per, seed=3)
    assert pairs != partner_pairs(num, per, seed=4)
    assert len(pairs) <= num * per and len(set(pairs)) == len(pairs)
    assert all(s < t for s, t in pairs)
    for s in range(num):
        gaps = [abs(t - u) for t, u in pairs if s in (t, u)]
        assert len(gaps) >= per
        assert min(gaps) <= 15  # the nearest stratum: the 15 closest frames
        assert max(gaps) >= 22  # the farthest stratum
    assert len(partner_pairs(5, 10)) == 10  # all pairs when per_frame >= T - 1


def test_refined_best_buddies():
    fa, fb = _shifted_pair(1, 2)
    fa.requires_grad_(True)
    xa, xb, w = refined_best_buddies(fa, fb, GEO, BestBuddyConfig())
    assert not w.requires_grad and xa.shape == xb.shape == (len(w), 2)
    exact = torch.all(xb - xa == torch.tensor([14.0, 7.0]), dim=1)
    h, wd = GEO.grid_hw
    assert int(exact.sum()) == (h - 1) * (wd - 2)
    assert torch.allclose(w[exact], torch.full((1,), 2.0), atol=1e-4)
    assert torch.all(w[~exact] < 1.0) and torch.all(w >= 0)  # random: cos < 0.79
