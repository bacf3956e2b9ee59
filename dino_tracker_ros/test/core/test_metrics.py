"""TAP-Vid and BADJA metrics against values computed by hand on tiny cases."""

import math

import numpy as np
import pytest

from dino_tracker_ros.core.metrics import (
    badja_metrics,
    evaluate_tracks,
    evaluation_mask,
    queries_from_tapvid,
    sample_queries,
    tapvid_metrics,
)


def _case():
    """One query on frame 1 of 4; ground truth fixed at (10, 10), occluded at frame 2."""
    queries = np.array([[1.0, 10.0, 10.0]])
    gt = np.full((1, 4, 2), 10.0)
    gt_occ = np.array([[False, False, True, False]])
    pred = gt.copy()
    pred[0, 0] = (10.5, 10.0)  # 0.5 px off
    pred[0, 3] = (10.0, 13.0)  # 3 px off
    pred_occ = np.array([[False, False, False, True]])
    return queries, gt_occ, gt, pred_occ, pred


def test_strided_mode_hand_computed():
    m = tapvid_metrics(*_case(), query_mode="strided")
    # scored frames 0, 2, 3. OA: t0 right, t2 wrong, t3 wrong.
    assert m["oa"] == pytest.approx(1 / 3)
    # GT-visible scored: t0 (0.5 px), t3 (3 px)
    assert [m[f"delta_{d}"] for d in (1, 2, 4, 8, 16)] == pytest.approx([0.5, 0.5, 1, 1, 1])
    assert m["delta_avg"] == pytest.approx(0.8)
    # TP = t0 at every threshold; FP = t2 (predicted visible, occluded) -> 1 / (2 + 1)
    for d in (1, 2, 4, 8, 16):
        assert m[f"jaccard_{d}"] == pytest.approx(1 / 3)
    assert m["aj"] == pytest.approx(1 / 3)
    assert m["n_scored"] == 3 and m["n_visible"] == 2


def test_first_mode_hand_computed():
    m = tapvid_metrics(*_case(), query_mode="first")
    # scored frames 2, 3 only
    assert m["oa"] == 0.0
    assert m["delta_avg"] == pytest.approx((0 + 0 + 1 + 1 + 1) / 5)
    assert m["aj"] == 0.0  # t3 predicted occluded -> no TP; t2 a FP
    assert m["n_scored"] == 2 and m["n_visible"] == 1


def test_thresholds_are_strict_and_jaccard_counts_far_visible_as_false_positive():
    queries = np.array([[0.0, 0, 0]])
    gt = np.zeros((1, 3, 2))
    pred = gt.copy()
    pred[0, 1] = (2.0, 0.0)  # exactly 2 px: not within 2
    pred[0, 2] = (0.0, 20.0)  # far, predicted visible: a false positive everywhere
    occ = np.zeros((1, 3), bool)
    m = tapvid_metrics(queries, occ, gt, occ, pred, query_mode="first")
    assert m["delta_1"] == 0 and m["delta_2"] == 0 and m["delta_4"] == 0.5
    # d=4: TP 1 (t1), GT visible 2, FP 1 (t2) -> 1/3; d in (1, 2): TP 0
    assert m["jaccard_4"] == pytest.approx(1 / 3) and m["jaccard_2"] == 0.0
    assert m["oa"] == 1.0


def test_evaluate_tracks_scores_at_256():
    # clip 128 x 512 (H x W): x shrinks by 2, y grows by 2 at 256 x 256
    queries = np.array([[0.0, 100.0, 50.0]])
    gt = np.tile(np.array([100.0, 50.0]), (1, 3, 1))
    pred = gt.copy()
    pred[0, 1, 0] += 4.0  # 4 clip px in x -> 2 px at 256: not within 2, within 4
    pred[0, 2, 1] += 1.0  # 1 clip px in y -> 2 px at 256
    vis = np.ones((1, 3), bool)
    m = evaluate_tracks(queries, gt, vis, pred, vis, (128, 512), query_mode="strided")
    assert m["delta_1"] == 0.0 and m["delta_2"] == 0.0 and m["delta_4"] == 1.0
    assert m["aj"] == pytest.approx((0 + 0 + 1 + 1 + 1) / 5)


def test_badja_hand_computed():
    queries = np.array([[0.0, 0, 0], [2.0, 0, 0]])
    gt = np.zeros((2, 3, 2))
    vis = np.array([[True, True, True], [True, False, True]])
    pred = gt.copy()
    pred[0, 1] = (1.5, 0)  # seg thr 2 -> ok; < 3 ok
    pred[0, 2] = (0, 3.5)  # seg thr 4 -> ok; 3 px no
    pred[1, 0] = (1.0, 0)  # seg thr 2 -> ok; 3 px ok
    pred[1, 1] = (50, 50)  # not visible: ignored
    area = np.array([100.0, 100.0, 400.0])
    m = badja_metrics(queries, gt, vis, pred, area)
    assert m["n_scored"] == 3
    assert m["delta_seg"] == pytest.approx(1.0)
    assert m["delta_3px"] == pytest.approx(2 / 3)


def test_modes_masks_and_query_sampling():
    mask = evaluation_mask(np.array([1, 3]), 4, "first")
    assert mask.tolist() == [[False, False, True, True], [False] * 4]
    assert evaluation_mask(np.array([1]), 3, "strided").tolist() == [[True, False, True]]
    with pytest.raises(ValueError):
        evaluation_mask(np.array([0]), 3, "bogus")
    gt = np.arange(2 * 7 * 2, dtype=float).reshape(2, 7, 2)
    vis = np.ones((2, 7), bool)
    vis[0, :2] = False  # track 0 appears at frame 2
    vis[1, 5] = False
    q, idx = sample_queries(gt, vis, "first")
    assert q[:, 0].tolist() == [2, 0] and idx.tolist() == [0, 1]
    assert np.allclose(q[0, 1:], gt[0, 2])
    q, idx = sample_queries(gt, vis, "strided", stride=5)
    # frames 0 and 5: track 0 visible only at 5, track 1 only at 0
    assert sorted(zip(idx.tolist(), q[:, 0].tolist(), strict=True)) == [(0, 5.0), (1, 0.0)]
    assert queries_from_tapvid(np.array([[3, 7, 9]])).tolist() == [[3, 9, 7]]


def test_nothing_scored_gives_nan():
    q = np.array([[2.0, 0, 0]])
    z = np.zeros((1, 3, 2))
    occ = np.zeros((1, 3), bool)
    m = tapvid_metrics(q, occ, z, occ, z, query_mode="first")
    assert math.isnan(m["oa"]) and math.isnan(m["aj"])
