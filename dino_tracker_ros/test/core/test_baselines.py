"""Baselines: chained DIS flow with forward-backward occlusion, the untrained-features model,
and the evaluation tables."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from dino_tracker_ros.core.baselines import (
    chained_flow_tracks,
    evaluate_clip,
    format_tables,
    reappearing,
)
from dino_tracker_ros.core.clip import clip_from_array
from dino_tracker_ros.core.config import PROFILES
from dino_tracker_ros.core.errors import ClipError, NotTrainedError
from dino_tracker_ros.core.geometry import GridGeometry
from dino_tracker_ros.core.model import DinoTrackerModel
from dino_tracker_ros.core.synthetic import GroundTruth


def _translating_clip(num_t=10, h=96, w=128, step=(2, 1)):
    """A photo translating by ``step`` px per frame; an opaque bar covers x in [40, 64)
    in frames 4 and 5."""
    tex = cv2.resize(data.astronaut(), (w + 100, h + 100), interpolation=cv2.INTER_AREA)
    frames = []
    for t in range(num_t):
        x0, y0 = 50 - t * step[0], 50 - t * step[1]  # content moves right and down
        f = tex[y0:y0 + h, x0:x0 + w].copy()
        if t in (4, 5):
            f[:, 40:64] = np.tile(np.array([[[30, 200, 60]], [[200, 40, 90]]], np.uint8),
                                  (h // 2, 24, 1))
        frames.append(f)
    return np.stack(frames)


def test_chained_dis_follows_motion_and_flags_the_bar():
    step = np.array([2.0, 1.0])
    frames = _translating_clip()
    num_t = len(frames)
    ys, xs = np.mgrid[12:84:8, 12:116:8]
    queries = np.stack([np.zeros(xs.size), xs.ravel(), ys.ravel()], 1).astype(float)
    queries[::3, 0] = 9  # some queries on the last frame: tracked backward
    tracks, vis = chained_flow_tracks(frames, queries)
    t = np.arange(num_t)
    gt = queries[:, None, 1:] + (t[None, :, None] - queries[:, None, :1]) * step
    err = np.linalg.norm(tracks - gt, axis=-1)
    under = (gt[..., 0] >= 40) & (gt[..., 0] < 64) & np.isin(t, [4, 5])[None]
    inside = (gt[..., 0] > 2) & (gt[..., 0] < 125) & (gt[..., 1] > 2) & (gt[..., 1] < 93)
    # chained through the bar, points come out displaced: judge frames before any bar frame
    clean = inside & ~under & ~np.isin(t, [4, 5, 6, 7, 8, 9])[None] & (queries[:, :1] == 0)
    fwd = (queries[:, :1] == 0) & under
    entering = float((~vis[:, 4][fwd[:, 4]]).mean())  # the step into the bar's first frame
    staying = float((~vis[:, 5][fwd[:, 5]]).mean())  # then the chain rides on the bar
    vis_rate = float(vis[clean].mean())
    print(f"DIS: median error {np.median(err[clean]):.2f} px before the bar; flagged occluded "
          f"under the bar: {entering:.2f} on entering, {staying:.2f} one frame later; clean "
          f"frames {vis_rate:.2f} visible")
    assert np.median(err[clean]) < 0.5
    assert vis_rate > 0.9 and entering > 0.5
    assert vis[np.arange(len(queries)), queries[:, 0].astype(int)].all()
    back = queries[:, 0] == 9
    assert np.median(err[back][:, :3]) < 1.5  # backward chaining reaches frame 0


def test_untrained_model_refines_to_dino_exactly():
    cfg = PROFILES["tiny"].model
    geo = GridGeometry(14 + 7 * 6, 14 + 7 * 8, 7)
    model = DinoTrackerModel(24, geo, cfg).eval()
    images = torch.rand(2, 3, geo.height, geo.width)
    dino = torch.randn(2, 24, *geo.grid_hw)
    with torch.no_grad():
        assert torch.equal(model.refine(images, dino), dino)


def test_reappearing_and_tables():
    vis = np.array([
        [True, False, True, True],  # reappears
        [True, True, False, False],  # leaves for good
        [False, True, True, True],  # appears late
        [True, False, False, True],  # reappears
    ])
    assert reappearing(vis).tolist() == [True, False, False, True]
    m = {"aj": 0.5, "delta_avg": 0.25, "oa": 1.0}
    res = {"clip": "c", "query_mode": "first", "num_queries": 4, "num_reappearing": 2,
           "methods": {"tracker": {"all": m, "reappearing": {}, "seconds": 1.0}},
           "notes": ["randomly initialised"]}
    text = format_tables(res, keys=("aj", "delta_avg", "oa"))
    assert "| tracker | 50.0 | 25.0 | 100.0 | 1.0 |" in text
    assert "| tracker | - | - | - | 1.0 |" in text and "note: randomly initialised" in text


def test_evaluate_needs_ground_truth_and_a_model(tmp_path):
    clip = clip_from_array(_translating_clip(num_t=3), tmp_path, "plain")
    with pytest.raises(ClipError, match="no ground truth"):
        evaluate_clip(clip, PROFILES["tiny"])
    gt = GroundTruth(np.zeros((2, 3, 2)), np.zeros((2, 3), bool), np.zeros((2, 3)))
    gt.save(clip.path / "ground_truth.npz")  # ground truth, but no model trained
    with pytest.raises(NotTrainedError, match="no trained model"):
        evaluate_clip(clip, PROFILES["tiny"])
