"""Inference: fast head path, query handling, occlusion on constructed features, and the
end-to-end comparison of a trained tracker with its baselines on a synthetic clip."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from dino_tracker_ros.core.config import PROFILES, ModelConfig, TrackConfig
from dino_tracker_ros.core.errors import QueryError
from dino_tracker_ros.core.geometry import GridGeometry
from dino_tracker_ros.core.model import DinoTrackerModel
from dino_tracker_ros.core.predictor import Predictor, grid_queries, locate_windowed

STRIDE = 7
GEO = GridGeometry(14 + STRIDE * 11, 14 + STRIDE * 15, STRIDE)  # 91 x 119 px, 12 x 16 tokens


def _train_like_refiner(model: DinoTrackerModel) -> None:
    """Refiner weights as after training: kernels with sums well away from zero."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.head.refiner.modules():
            if hasattr(m, "normalized_weight"):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.2)
                m.weight[..., 1, 1] += 1.0
                m.bias.uniform_(-0.1, 0.1, generator=gen)


@pytest.mark.parametrize("radius,refiner", [(24.0, True), (35.0, True), (10.0, False)])
def test_windowed_head_equals_the_model_head(radius, refiner):
    torch.manual_seed(0)
    cfg = ModelConfig(delta_channels=(4, 4, 4), radius=radius, refiner=refiner)
    model = DinoTrackerModel(32, GEO, cfg).eval()
    _train_like_refiner(model)
    q = torch.randn(2, 200, 32)
    t = torch.randn(2, 32, *GEO.grid_hw)
    with torch.no_grad():
        cost = model.head.cost(q, t)
        cost[0, :40, 0, :] += 0.6  # peaks on the top row and the right column
        cost[1, :40, :, -1] += 0.6
        ref = model.head.locate(cost)
        fast = locate_windowed(model.head, cost)
    err = float((ref - fast).abs().max())
    print(f"radius {radius}, refiner {refiner}: max |head - windowed| = {err:.2e} px")
    assert err < 1e-3


def _moving_scene(num_t: int = 12, c: int = 48, occluder: bool = True, seed: int = 0):
    """Token features of a background moving 1 token right per frame and a 3-token wide
    occluding bar (its own random features) moving 1 token left per frame.

    Returns features (T, C, h, w) float16, the bar's column span per frame.
    """
    h, w = GEO.grid_hw
    gen = torch.Generator().manual_seed(seed)
    field = torch.randn(c, h, w + num_t, generator=gen)
    bar = torch.randn(c, h, 3, generator=gen)
    feats = torch.empty(num_t, c, h, w)
    spans = []
    for t in range(num_t):
        feats[t] = field[:, :, num_t - t:num_t - t + w]  # content moves right with t
        j0 = 11 - t  # bar starts at columns 11..13 and moves left
        if occluder and 0 <= j0 and j0 + 3 <= w:
            feats[t, :, :, j0:j0 + 3] = bar
        spans.append((j0, j0 + 3))
    return feats.numpy().astype(np.float16), spans


def _untrained(feats, track_cfg=None, precision="fp32") -> Predictor:
    torch.manual_seed(0)
    model = DinoTrackerModel(feats.shape[1], GEO, ModelConfig(delta_channels=(4, 4, 4),
                                                              radius=10.0, refiner=False))
    return Predictor(model, feats, orig_size=(GEO.height, GEO.width),
                     track_cfg=track_cfg or TrackConfig(), device="cpu", precision=precision)


def test_tracks_follow_constructed_motion_and_occluder_is_detected():
    feats, spans = _moving_scene()
    num_t = len(feats)
    pred = _untrained(feats)
    rows, cols = np.meshgrid(np.arange(1, 11), np.arange(1, 6), indexing="ij")
    xy = GEO.grid_to_pixel(np.stack([cols.ravel(), rows.ravel()], 1).astype(np.float64))
    queries = np.concatenate([np.zeros((len(xy), 1)), xy], 1)
    res = pred.track(queries)
    assert res.tracks.shape == (len(queries), num_t, 2) and res.tracks.dtype == np.float32
    # ground truth: column j0 + t; occluded while inside the bar
    t = np.arange(num_t)
    gt_col = cols.ravel()[:, None] + t[None]
    gt_x = GEO.grid_to_pixel(gt_col.astype(np.float64))
    occ = np.array([[spans[s][0] <= gt_col[i, s] < spans[s][1] for s in t]
                    for i in range(len(queries))])
    assert occ.any(axis=1).mean() > 0.5  # most points pass under the bar
    vis = ~occ
    err = np.abs(res.tracks[..., 0] - gt_x)
    occ_rate = float((~res.visible[occ]).mean())
    vis_rate = float(res.visible[vis].mean())
    print(f"occluded frames reported occluded: {occ_rate:.2f}; visible frames reported "
          f"visible: {vis_rate:.2f}; median error on visible frames {np.median(err[vis]):.2f} px")
    assert np.median(err[vis]) < 1.0 and (err[vis] < 3.5).mean() > 0.95
    assert occ_rate >= 0.9 and vis_rate >= 0.9
    assert np.array_equal(res.visible, res.visibility >= 0.5)
    assert np.allclose(res.tracks[:, 0], queries[:, 1:]) and res.visibility[:, 0].min() == 1.0


def test_batching_and_precision_do_not_change_results():
    feats, _ = _moving_scene(num_t=7, seed=1)
    queries = grid_queries((GEO.height, GEO.width), 13, frame=3)
    ref = _untrained(feats).track(queries)
    small = TrackConfig(query_batch=7, frame_batch=2, max_anchors=16)
    other = _untrained(feats, small).track(queries)
    assert np.allclose(ref.tracks, other.tracks, atol=1e-3)
    assert np.array_equal(ref.visible, other.visible)
    bf16 = _untrained(feats, precision="bf16").track(queries)
    agree = float((bf16.visible == ref.visible).mean())
    print(f"bf16 visibility pass agrees with fp32 on {agree:.3f} of decisions")
    assert np.array_equal(bf16.tracks, ref.tracks) and agree > 0.95


def test_query_validation_and_grid():
    feats, _ = _moving_scene(num_t=4)
    pred = _untrained(feats)
    w, h = GEO.width, GEO.height
    bad = {
        "not finite": [[0, np.nan, 3]],
        "outside the clip": [[4, 3, 3]],
        "integer": [[1.5, 3, 3]],
        "outside the 119x91 image": [[0, w - 0.4, 3]],
        "(N, 3)": [[0, 1]],
    }
    for text, q in bad.items():
        with pytest.raises(QueryError, match=text.replace("(", r"\(").replace(")", r"\)")) as e:
            pred.track(q)
        assert "\n" not in str(e.value)
    ok = pred.track([[0, -0.5, h - 0.5]])  # the image's extreme corner is allowed
    assert ok.tracks.shape == (1, 4, 2)
    empty = pred.track(np.zeros((0, 3)))
    assert empty.tracks.shape == (0, 4, 2) and empty.visible.shape == (0, 4)
    g = grid_queries((100, 60), 20, frame=2)
    assert g.shape == (15, 3) and set(g[:, 0]) == {2.0}
    assert g[:, 1].min() == 10 and g[:, 1].max() == 50 and g[:, 2].max() == 90
    assert grid_queries((10, 10), 50).tolist() == [[0.0, 4.5, 4.5]]
    with pytest.raises(QueryError):
        grid_queries((10, 10), 0)
