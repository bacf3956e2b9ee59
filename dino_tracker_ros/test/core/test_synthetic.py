"""Synthetic clips: ground truth exact to the pixel, occlusions real, deterministic."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dino_tracker_ros.core.clip import open_clip, write_clip
from dino_tracker_ros.core.errors import ConfigError
from dino_tracker_ros.core.synthetic import (
    LAYER_NAMES,
    GroundTruth,
    SyntheticScene,
    load_ground_truth,
    make_synthetic_clip,
    render_synthetic,
)

T, H, W = 24, 192, 256


@pytest.fixture(scope="module")
def scene():
    sc = SyntheticScene(T, H, W, seed=0, num_points=64)
    return sc, np.stack(list(sc.frames()))


def _bilinear(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample (H, W, C) at (N, 2) points (x, y), replicating the border."""
    pts = xy.astype(np.float32).reshape(-1, 1, 2)
    out = cv2.remap(img.astype(np.float32), pts[..., 0], pts[..., 1], cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(len(xy), -1)


def test_shapes_and_query_frames(scene):
    sc, frames = scene
    gt = sc.ground_truth
    assert frames.shape == (T, H, W, 3) and frames.dtype == np.uint8
    assert gt.tracks.shape == (64, T, 2) and gt.tracks.dtype == np.float32
    assert gt.occluded.shape == (64, T) and gt.queries.shape == (64, 3)
    tq = gt.queries[:, 0].astype(int)
    # each query is where its track is at the query frame, and visible there
    np.testing.assert_allclose(gt.tracks[np.arange(64), tq], gt.queries[:, 1:], atol=1e-3)
    assert not gt.occluded[np.arange(64), tq].any()
    assert 0.5 < np.mean(tq == 0) < 1.0  # mostly frame 0, some later
    assert set(np.unique(gt.layers)) == set(range(len(LAYER_NAMES)))


def test_ground_truth_colours_match_query_colours(scene):
    sc, frames = scene
    gt = sc.ground_truth
    err, err_shifted = [], []
    for i in range(gt.num_points):
        tq = int(gt.queries[i, 0])
        ref = _bilinear(frames[tq], gt.queries[i : i + 1, 1:])[0]
        for t in np.flatnonzero(~gt.occluded[i]):
            xy = gt.tracks[i, t][None]
            err.append(np.abs(_bilinear(frames[t], xy)[0] - ref).mean())
            err_shifted.append(np.abs(_bilinear(frames[t], xy + [1.5, 0.0])[0] - ref).mean())
    err, err_shifted = np.array(err), np.array(err_shifted)
    assert len(err) > 800
    assert np.median(err) < 1.0 and np.percentile(err, 90) < 4.0
    # the same check 1.5 px off the ground truth fails clearly
    assert np.median(err_shifted) > 4 * np.median(err)
    assert np.percentile(err_shifted, 90) > 3 * np.percentile(err, 90)


def test_transforms_are_exact_to_subpixel(scene):
    """A linear ramp texture warped like each layer reads back its texture coordinates."""
    sc, _ = scene
    gt = sc.ground_truth
    worst = 0.0
    for layer_id, layer in enumerate(sc.layers):
        th, tw = layer.colour.shape[:2]
        vv, uu = np.mgrid[0:th, 0:tw].astype(np.float32)
        ramp = np.dstack([uu, vv, np.zeros_like(uu)])
        pts = np.flatnonzero(gt.layers == layer_id)
        assert len(pts) >= 5
        for i in pts:
            tq = int(gt.queries[i, 0])
            uv_q = cv2.invertAffineTransform(layer.affines[tq]) @ np.r_[gt.queries[i, 1:], 1.0]
            for t in range(0, T, 5):
                xy = gt.tracks[i, t]
                if not (2 <= xy[0] <= W - 3 and 2 <= xy[1] <= H - 3):
                    continue
                if not layer.shape.inside(uv_q, 2.0):
                    continue
                warped = cv2.warpAffine(ramp, layer.affines[t], (W, H), flags=cv2.INTER_LINEAR,
                                        borderMode=cv2.BORDER_REFLECT_101)
                uv = _bilinear(warped, xy[None].astype(np.float64))[0, :2]
                worst = max(worst, float(np.abs(uv - uv_q).max()))
    assert worst < 0.05


def test_occlusion_flags_follow_the_rendered_layers(scene):
    sc, frames = scene
    gt = sc.ground_truth
    occluder = sc.layers[3]
    inside = ((gt.tracks[..., 0] >= 0) & (gt.tracks[..., 0] <= W - 1)
              & (gt.tracks[..., 1] >= 0) & (gt.tracks[..., 1] <= H - 1))
    hidden_by_occluder, alpha_there, colour_change = 0, [], []
    for i in np.flatnonzero(gt.layers < 3):
        tq = int(gt.queries[i, 0])
        ref = _bilinear(frames[tq], gt.queries[i : i + 1, 1:])[0]
        for t in np.flatnonzero(gt.occluded[i] & inside[i]):
            xy = gt.tracks[i, t][None]
            uv = cv2.invertAffineTransform(occluder.affines[t]) @ np.r_[xy[0], 1.0]
            if occluder.shape.inside(uv):
                hidden_by_occluder += 1
                a = cv2.warpAffine(occluder.alpha, occluder.affines[t], (W, H),
                                   flags=cv2.INTER_LINEAR)
                alpha_there.append(_bilinear(a[:, :, None], xy)[0, 0])
            colour_change.append(np.abs(_bilinear(frames[t], xy)[0] - ref).mean())
    assert hidden_by_occluder >= 20
    assert np.mean(np.array(alpha_there) > 0.5) > 0.95
    assert np.median(colour_change) > 15.0  # something else is seen there
    # points of the occluder itself are never occluded by anything but the image border
    occ_pts = gt.layers == 3
    assert not (gt.occluded[occ_pts] & inside[occ_pts]).any()


def test_points_get_occluded_and_reappear_and_leave_the_frame(scene):
    sc, _ = scene
    gt = sc.ground_truth
    occ = gt.occluded

    def reappears(o):
        hidden = np.flatnonzero(o)
        seen = np.flatnonzero(~o)
        return hidden.size > 0 and seen.min() < hidden.min() < seen.max()

    assert sum(reappears(o) for o in occ) >= 5
    x, y = gt.tracks[..., 0], gt.tracks[..., 1]
    outside = (x < -0.5) | (x > W - 0.5) | (y < -0.5) | (y > H - 0.5)
    assert outside.any(axis=1).sum() >= 2
    assert (occ | ~outside).all()  # outside the image implies occluded


def test_motion_is_small_per_frame_and_large_over_the_clip(scene):
    gt = scene[0].ground_truth
    step = np.linalg.norm(np.diff(gt.tracks, axis=1), axis=-1)
    assert step.max() < 6.0 and 0.5 < np.median(step) < 4.0
    total = np.linalg.norm(gt.tracks[:, -1] - gt.tracks[:, 0], axis=-1)
    assert np.median(total) > 15.0


def test_deterministic_per_seed():
    f1, g1 = render_synthetic(6, 64, 96, seed=3, num_points=16)
    f2, g2 = render_synthetic(6, 64, 96, seed=3, num_points=16)
    f3, g3 = render_synthetic(6, 64, 96, seed=4, num_points=16)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(g1.tracks, g2.tracks)
    np.testing.assert_array_equal(g1.occluded, g2.occluded)
    assert np.abs(f1.astype(int) - f3).mean() > 5
    assert not np.allclose(g1.queries, g3.queries)


def test_no_occluder_option():
    frames, gt = render_synthetic(8, 64, 64, seed=1, num_points=20, occluder=False)
    assert frames.shape == (8, 64, 64, 3) and gt.layers.max() == 2


def test_make_synthetic_clip_and_ground_truth_file(tmp_path):
    clip, gt = make_synthetic_clip(tmp_path, "syn", num_frames=5, height=64, width=80,
                                   seed=2, num_points=12, fps=5.0)
    frames, gt_mem = render_synthetic(5, 64, 80, seed=2, num_points=12)
    again = open_clip(tmp_path, "syn")
    assert len(again) == 5 and again.size == (64, 80) and again.meta.fps == 5.0
    np.testing.assert_array_equal(again.stamps_ns, np.arange(5) * 200_000_000)
    for t in range(5):
        np.testing.assert_array_equal(again.frame(t), frames[t])
    loaded = load_ground_truth(again)
    assert isinstance(loaded, GroundTruth)
    for name in ("tracks", "occluded", "queries", "layers"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(gt, name))
        np.testing.assert_array_equal(getattr(loaded, name), getattr(gt_mem, name))
    assert load_ground_truth(again.path / "ground_truth.npz").num_points == 12
    plain = write_clip(tmp_path, "plain", frames, fps=5.0)
    assert load_ground_truth(plain) is None


def test_ground_truth_validation_and_round_trip(tmp_path):
    gt = GroundTruth(np.zeros((3, 4, 2)), np.zeros((3, 4)), np.zeros((3, 3)))
    assert gt.tracks.dtype == np.float32 and gt.occluded.dtype == bool and gt.layers is None
    gt.save(tmp_path / "g.npz")
    back = GroundTruth.load(tmp_path / "g.npz")
    assert back.layers is None and back.tracks.shape == (3, 4, 2)
    with pytest.raises(ValueError):
        GroundTruth(np.zeros((3, 4, 2)), np.zeros((3, 5)), np.zeros((3, 3)))


@pytest.mark.parametrize("args", [(0, 64, 64), (4, 31, 64), (4, 64, 16)])
def test_bad_scene_sizes_are_user_errors(args):
    with pytest.raises(ConfigError, match="synthetic clip needs") as err:
        SyntheticScene(*args)
    assert "\n" not in str(err.value)
