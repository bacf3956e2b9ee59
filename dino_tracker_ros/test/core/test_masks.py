"""Foreground masks: PCA of planted two-cluster features, mask directories, none."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from dino_tracker_ros.core.config import MaskConfig
from dino_tracker_ros.core.errors import ConfigError
from dino_tracker_ros.core.geometry import GridGeometry
from dino_tracker_ros.core.masks import compute_masks, fit_first_component, pca_masks

H, W, STRIDE = 161, 217, 7  # a 22 x 30 token grid
GEOM = GridGeometry(H, W, STRIDE)


def _planted(seed: int, flip: bool, t: int = 4, c: int = 48):
    """Features with a background cluster and a moving elliptical foreground blob.

    Returns features (T, C, h, w) float16, the planted pixel mask (T, H, W) bool (a pixel
    is foreground if its token-grid position lies inside the blob) and the token blobs.
    """
    rng = np.random.default_rng(seed)
    h, w = GEOM.grid_hw
    bg_dir, fg_dir = rng.normal(size=c), rng.normal(size=c)
    if flip:
        bg_dir, fg_dir = fg_dir, bg_dir
    feats = np.empty((t, c, h, w), np.float16)
    masks = np.empty((t, H, W), bool)
    blobs = np.empty((t, h, w), bool)
    ys, xs = np.mgrid[0:H, 0:W]
    gx, gy = GEOM.pixel_to_grid(xs.astype(float)), GEOM.pixel_to_grid(ys.astype(float))
    for k in range(t):
        cx, cy = 12.0 + 1.5 * k, 10.0 + 0.5 * k
        ii, jj = np.mgrid[0:h, 0:w]
        blob = ((jj - cx) / 6.0) ** 2 + ((ii - cy) / 5.0) ** 2 <= 1.0
        base = np.where(blob[None], fg_dir[:, None, None], bg_dir[:, None, None])
        noise = rng.normal(scale=0.6, size=(c, h, w))
        norms = rng.uniform(0.5, 20.0, size=(1, h, w))  # only directions should matter
        feats[k] = ((base + noise) * norms).astype(np.float16)
        masks[k] = ((gx - cx) / 6.0) ** 2 + ((gy - cy) / 5.0) ** 2 <= 1.0
        blobs[k] = blob
    return feats, masks, blobs


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("seed,flip", [(0, False), (1, True), (2, False)])
def test_pca_mask_recovers_the_minority_cluster(tmp_path, seed, flip):
    feats, truth, blobs = _planted(seed, flip)
    masks = compute_masks(feats, MaskConfig(source="pca", threshold=0.6), (H, W),
                          tmp_path / "masks.npy")
    assert masks.shape == (4, H, W) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    iou = _iou(masks.astype(bool), truth)
    print(f"pca mask IoU {iou:.3f}")
    assert iou > 0.9, iou
    assert masks[:, 0, :].sum() == 0  # the border is background
    centres = GEOM.token_centres().astype(int)  # pixels within 0.5 px of token centres
    at_tokens = masks[:, centres[..., 1], centres[..., 0]].astype(bool)
    assert np.mean(at_tokens == blobs) > 0.99
    assert (tmp_path / "masks.npy").is_file()
    # Negated features give the same eigen-axis but a negated projection: the border rule
    # must pick the other sign, so both branches of the rule are exercised.
    neg = compute_masks(-feats, MaskConfig(source="pca", threshold=0.6), (H, W),
                        tmp_path / "neg.npy")
    assert _iou(neg.astype(bool), truth) > 0.9


def test_pca_fit_uses_a_bounded_subsample():
    feats, _, _ = _planted(0, False, t=3)
    mean_all, axis_all = fit_first_component(feats, max_tokens=10**9)
    mean_sub, axis_sub = fit_first_component(feats, max_tokens=600)
    assert abs(float(axis_all @ axis_sub)) > 0.95
    assert np.linalg.norm(mean_all - mean_sub) < 0.1


def test_pca_rejects_mismatched_resolution(tmp_path):
    feats, _, _ = _planted(0, False, t=1)
    for bad in [(H + 3, W), (H + 7, W), (H, W - 7)]:
        with pytest.raises(ValueError, match="does not fit"):
            pca_masks(feats, bad, tmp_path / "m.npy")
    assert not (tmp_path / "m.npy").exists()


def test_mask_directory_is_resized_nearest(tmp_path):
    src = tmp_path / "masks"
    src.mkdir()
    raw = []
    for k in range(3):
        img = np.zeros((40, 50), np.uint8)
        img[5 + k : 25, 10 : 30 + k] = 255 if k != 1 else 1  # any value > 0 is foreground
        raw.append(img)
        cv2.imwrite(str(src / f"m{k * 5}.png"), img)  # m0, m5, m10: natural order
    feats = np.zeros((3, 8, 2, 2), np.float16)
    cfg = MaskConfig(source="dir", directory=str(src))
    masks = compute_masks(feats, cfg, (80, 100), tmp_path / "m.npy")
    assert masks.shape == (3, 80, 100)
    for k in range(3):
        want = cv2.resize((raw[k] > 0).astype(np.uint8), (100, 80),
                          interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(masks[k], want)
    with pytest.raises(ConfigError, match="3 mask images but the clip has 4"):
        compute_masks(np.zeros((4, 8, 2, 2)), cfg, (80, 100), tmp_path / "x.npy")
    with pytest.raises(ConfigError, match="not found"):
        compute_masks(feats, MaskConfig(source="dir", directory=str(tmp_path / "no")),
                      (80, 100), tmp_path / "x.npy")
    with pytest.raises(ConfigError, match="empty"):
        compute_masks(feats, MaskConfig(source="dir"), (80, 100), tmp_path / "x.npy")
    assert not (tmp_path / "x.npy").exists()


def test_none_source_and_degenerate_logging(tmp_path, caplog):
    feats = np.zeros((2, 8, 2, 2), np.float16)
    masks = compute_masks(feats, MaskConfig(source="none"), (30, 40), tmp_path / "n.npy")
    assert masks.shape == (2, 30, 40) and masks.dtype == np.uint8 and masks.min() == 1
    empty = tmp_path / "empty_masks"
    empty.mkdir()
    for k in range(2):
        cv2.imwrite(str(empty / f"{k}.png"), np.zeros((10, 10), np.uint8))
    with caplog.at_level(logging.WARNING, logger="dino_tracker_ros.core.masks"):
        out = compute_masks(feats, MaskConfig(source="dir", directory=str(empty)), (30, 40),
                            tmp_path / "d.npy")
    assert out.max() == 0
    assert any("all background" in r.getMessage() for r in caplog.records)
