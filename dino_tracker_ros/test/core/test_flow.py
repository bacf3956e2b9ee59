"""Optical-flow supervision: estimators, cycle mask, chained tracks, direct filter, storage."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data

from dino_tracker_ros.core.config import FlowConfig
from dino_tracker_ros.core.errors import Cancelled, WeightsError
from dino_tracker_ros.core.flow import (
    DisFlow,
    FlowEstimator,
    FlowTracks,
    compute_flow_tracks,
    cycle_mask,
    direct_targets,
    make_flow_estimator,
    raft_weights_path,
    warp_points,
)
from dino_tracker_ros.core.progress import CancelToken

_TEXTURE = cv2.GaussianBlur(data.astronaut(), (0, 0), 1.0)


def _affine(t: int, size: int, shift=(0.7, 0.45), deg=0.5, scale=1.004) -> np.ndarray:
    """2x3 map from texture pixels to frame-t pixels (sub-pixel drift, rotation, zoom)."""
    ang = np.deg2rad(deg * t)
    a = scale**t * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    centre = np.array([256.0, 256.0])
    b = np.array([size / 2 - 0.5 + shift[0] * t, size / 2 - 0.5 + shift[1] * t]) - a @ centre
    return np.hstack([a, b[:, None]])


def _clip(num_frames: int, size: int, **motion) -> tuple[np.ndarray, list[np.ndarray]]:
    mats = [_affine(t, size, **motion) for t in range(num_frames)]
    frames = np.stack(
        [cv2.warpAffine(_TEXTURE, m, (size, size), flags=cv2.INTER_CUBIC) for m in mats]
    )
    return frames, mats


def _move(xy: np.ndarray, mats: list[np.ndarray], s: int, t: int) -> np.ndarray:
    """Exact position at frame t of points at ``xy`` in frame s."""
    ms, mt = (np.vstack([mats[i], [0, 0, 1]]) for i in (s, t))
    rel = mt @ np.linalg.inv(ms)
    return xy @ rel[:2, :2].T + rel[:2, 2]


def _track_errors(ft: FlowTracks, mats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per stored point after the first: (error vs ground truth px, frame)."""
    errs, frames = [], []
    for i in range(ft.num_tracks):
        s, n, o = int(ft.starts[i]), int(ft.lengths[i]), int(ft.offsets[i])
        pts = np.asarray(ft.points[o : o + n], dtype=np.float64)
        true = np.stack([_move(pts[0], mats, s, s + k) for k in range(n)])
        errs.append(np.linalg.norm(pts - true, axis=1)[1:])
        frames.append(np.arange(s + 1, s + n))
    return np.concatenate(errs), np.concatenate(frames)


class _Counting(FlowEstimator):
    """Real DIS flow that counts calls and can add a known bias to one frame pair."""

    def __init__(self, frames: np.ndarray, bias: dict | None = None) -> None:
        self.dis = DisFlow()
        self.index = {f.tobytes(): i for i, f in enumerate(frames)}
        self.bias = bias or {}
        self.calls = 0

    def __call__(self, a, b):
        self.calls += 1
        flow = self.dis(a, b)
        key = (self.index[a.tobytes()], self.index[b.tobytes()])
        return flow + np.asarray(self.bias.get(key, (0.0, 0.0)), np.float32)


def test_dis_chaining_recovers_affine_motion(tmp_path):
    frames, mats = _clip(10, 160)
    reports = []
    ft = compute_flow_tracks(frames, FlowConfig(), tmp_path, progress=reports.append,
                             start=0.2, end=0.4)
    err, _ = _track_errors(ft, mats)
    ids, xy = ft.alive(0)
    last = ft.starts[ids] + ft.lengths[ids] - 1
    interior = np.all((xy > 24) & (xy < 160 - 24), axis=1)
    survival = float(np.mean(last[interior] == 9))
    print(f"chained DIS: {ft.num_tracks} tracks, {len(err)} points, mean err {err.mean():.3f} "
          f"px, p95 {np.percentile(err, 95):.3f} px, interior survival {survival:.3f}")
    assert err.mean() < 0.5
    assert np.percentile(err, 95) < 1.5
    assert interior.sum() > 500 and survival > 0.9
    assert ft.num_frames == 10 and (ft.height, ft.width) == (160, 160)
    assert np.all(ft.lengths >= 2) and np.all(np.diff(ft.starts) >= 0)
    assert reports[-1].stage == "flow" and reports[-1].fraction == pytest.approx(0.4)


def test_cycle_mask_exact_layered_flow():
    # background static; a 20 px wide foreground band moves 10 px right: a[40, 50) is hidden
    h, w = 32, 80
    fwd = np.zeros((h, w, 2), np.float32)
    bwd = np.zeros((h, w, 2), np.float32)
    fwd[:, 20:40, 0] = 10.0  # foreground in a at x in [20, 40)
    bwd[:, 30:50, 0] = -10.0  # foreground in b at x in [30, 50)
    mask = cycle_mask(fwd, bwd, 1.5)
    hidden = np.zeros((h, w), bool)
    hidden[:, 40:50] = True
    assert np.array_equal(mask, ~hidden)
    # pixels nothing warps into are masked even when the cycle error is zero
    bwd_cov = np.zeros((h, w, 2), np.float32)
    bwd_cov[:, 30:50, 0] = -10.0
    fwd_cov = np.zeros((h, w, 2), np.float32)
    fwd_cov[:, 20:40, 0] = 10.0
    fwd_cov[:, 40:50, 0] = -10.0  # hidden pixels claim to map onto the band's b pixels ...
    assert not cycle_mask(fwd_cov, bwd_cov, 1.5)[:, 40:50].any()  # ... but none maps back


def test_cycle_mask_flags_pasted_square_with_dis():
    size = 128
    mats = [_affine(0, size), _affine(3, size)]
    a, b0 = (cv2.warpAffine(_TEXTURE, m, (size, size), flags=cv2.INTER_CUBIC) for m in mats)
    patch = cv2.resize(data.coffee(), (36, 36), interpolation=cv2.INTER_AREA)
    ys, xs = np.mgrid[0:size, 0:size]
    moved = _move(np.stack([xs, ys], -1).reshape(-1, 2).astype(float), mats, 0, 1)
    interior = np.zeros((size, size), bool)
    interior[8:-8, 8:-8] = True
    est = DisFlow()
    flagged, passed = [], []
    for y0, x0 in [(20, 20), (20, 70), (70, 20), (70, 70)]:
        b = b0.copy()
        b[y0 : y0 + 36, x0 : x0 + 36] = patch
        mask = cycle_mask(est(a, b), est(b, a), 1.5)
        hidden = ((moved[:, 0] >= x0) & (moved[:, 0] < x0 + 36) & (moved[:, 1] >= y0)
                  & (moved[:, 1] < y0 + 36)).reshape(size, size).astype(np.uint8)
        core = cv2.erode(hidden, np.ones((5, 5), np.uint8)).astype(bool)
        near = cv2.dilate(hidden, np.ones((13, 13), np.uint8)).astype(bool)
        flagged.append(1.0 - mask[core].mean())
        passed.append(mask[interior & ~near].mean())
    print(f"pasted square (4 places): flagged {np.round(flagged, 3)} of hidden pixels, "
          f"{np.round(passed, 4)} of visible pixels pass")
    assert np.mean(flagged) > 0.75 and min(flagged) > 0.6
    assert min(passed) > 0.98


def test_direct_filter_cuts_planted_drift(tmp_path):
    frames, mats = _clip(10, 96, deg=0.0, scale=1.0, shift=(0.6, 0.3))
    bias = {(3, 4): (3.0, 0.0), (4, 3): (-3.0, 0.0)}  # cycle-consistent, but wrong
    cfg = FlowConfig(direct_max_range=4, direct_pairs_per_frame=2)
    ft = compute_flow_tracks(frames, cfg, tmp_path / "on", estimator=_Counting(frames, bias))
    err_on, t_on = _track_errors(ft, mats)
    meta = json.loads((tmp_path / "on" / "flow_meta.json").read_text())
    off = compute_flow_tracks(frames, FlowConfig(direct_pairs_per_frame=0), tmp_path / "off",
                              estimator=_Counting(frames, bias))
    err_off, t_off = _track_errors(off, mats)
    bad_on = float(np.mean(err_on[t_on >= 5] > 2.0))
    bad_off = float(np.mean(err_off[t_off >= 5] > 2.0))
    print(f"points off by > 2 px after the planted 3 px jump: {bad_on:.4f} with the direct "
          f"filter ({meta['cut_direct']} cuts), {bad_off:.4f} without")
    assert meta["cut_direct"] > 100
    assert bad_on < 0.01
    assert bad_off > 0.5


def test_flow_calls_grow_linearly(tmp_path):
    cfg = FlowConfig(direct_max_range=4, direct_pairs_per_frame=2)
    calls = {}
    for n in (8, 16, 32):
        frames, _ = _clip(n, 64, deg=0.0, scale=1.0, shift=(0.5, 0.25))
        est = _Counting(frames)
        compute_flow_tracks(frames, cfg, tmp_path / str(n), estimator=est)
        pairs = sum(len(direct_targets(s, n, 4, 2)) for s in range(n))
        assert est.calls == 2 * (n - 1) + 2 * pairs
        assert est.calls <= 2 * (n - 1) + 2 * n * cfg.direct_pairs_per_frame
        calls[n] = est.calls
    print(f"flow calls: {calls}; ratio 16/8 = {calls[16] / calls[8]:.2f}, "
          f"32/16 = {calls[32] / calls[16]:.2f}")
    per_frame = [(calls[16] - calls[8]) / 8, (calls[32] - calls[16]) / 16]
    assert per_frame == [2 + 2 * 2, 2 + 2 * 2]  # constant cost per added frame
    assert 1.9 < calls[32] / calls[16] < 2.3
    assert direct_targets(0, 100, 16, 3) == [2, 6, 16]


class _Constant(FlowEstimator):
    """Exact flow of a rigid translation by ``d`` px per frame."""

    def __init__(self, d=(1.0, 0.5)) -> None:
        self.d = np.asarray(d, np.float32)

    def __call__(self, a, b):
        flow = np.empty((*a.shape[:2], 2), np.float32)
        sign = 1.0 if a[0, 0, 0] < b[0, 0, 0] else -1.0  # frames carry their index
        flow[:] = sign * self.d * float(abs(int(b[0, 0, 0]) - int(a[0, 0, 0])))
        return flow


def test_tracks_with_exact_flow_round_trip_and_queries(tmp_path):
    num, h, w, step = 6, 24, 32, 4
    frames = np.zeros((num, h, w, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(num)[:, None, None]
    cfg = FlowConfig(grid_step=step, direct_max_range=3, direct_pairs_per_frame=2)
    ft = compute_flow_tracks(frames, cfg, tmp_path, estimator=_Constant())
    d = np.array([1.0, 0.5])
    # every track moves exactly by d per frame and ends only where it leaves the image
    for i in range(ft.num_tracks):
        s, n, o = int(ft.starts[i]), int(ft.lengths[i]), int(ft.offsets[i])
        pts = np.asarray(ft.points[o : o + n])
        np.testing.assert_allclose(pts - pts[0], np.arange(n)[:, None] * d, atol=1e-4)
        nxt = pts[-1] + d
        assert s + n == num or nxt[0] > w - 0.5 or nxt[1] > h - 0.5
    # tracks start on every grid point of frame 0, later only in cells no track occupies
    first = ft.offsets[ft.starts == 0]
    assert len(first) == (h // step) * (w // step)
    for t in range(1, num - 1):  # tracks born in the last frame have length 1: dropped
        ids, xy = ft.alive(t)
        cells = np.floor((xy + 0.5) / step).astype(int)
        born = ft.starts[ids] == t
        old = {tuple(c) for c in cells[~born]}
        assert not any(tuple(c) in old for c in cells[born])
        np.testing.assert_array_equal(xy[born] % step, step // 2)
    assert np.any((ft.starts > 0) & (ft.starts < num - 1))
    again = FlowTracks.load(tmp_path)
    for name in ("starts", "lengths", "offsets", "points"):
        np.testing.assert_array_equal(getattr(again, name), getattr(ft, name))
    assert FlowTracks.exists(tmp_path) and not FlowTracks.exists(tmp_path / "none")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "flow_lengths.npy", "flow_meta.json", "flow_offsets.npy", "flow_points.npy",
        "flow_starts.npy",
    ]
    xs, xt, ids = ft.pairs(1, 4)
    ends = ft.starts + ft.lengths - 1
    expected = np.nonzero((ft.starts <= 1) & (ends >= 4))[0]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(xt - xs, np.tile(3 * d, (len(ids), 1)), atol=1e-4)
    xt_r, xs_r, ids_r = ft.pairs(4, 1)
    np.testing.assert_array_equal(ids_r, ids)
    np.testing.assert_array_equal(xs_r, xs)


def test_hand_built_tracks_pairs_alive_linked(tmp_path, write_flow_tracks):
    # track 0: frames 0-2 at x = 2, 3, 4; track 1: frames 1-4 at y = 10..13; track 2: 3-4
    write_flow_tracks(tmp_path, [0, 1, 3], [
        np.array([[2, 2], [3, 2], [4, 2]]),
        np.array([[10, 10], [10, 11], [10, 12], [10, 13]]),
        np.array([[15, 5], [16, 5]]),
    ], num_frames=5, hw=(20, 20))
    ft = FlowTracks.load(tmp_path)
    assert ft.num_tracks == 3 and ft.num_frames == 5
    ids, xy = ft.alive(2)
    np.testing.assert_array_equal(ids, [0, 1])
    np.testing.assert_array_equal(xy, [[4, 2], [10, 11]])
    xs, xt, ids = ft.pairs(2, 4)
    np.testing.assert_array_equal(ids, [1])
    np.testing.assert_array_equal(xs, [[10, 11]])
    np.testing.assert_array_equal(xt, [[10, 13]])
    assert len(ft.pairs(0, 3)[2]) == 0
    query = np.array([[4.5, 2.5], [10, 12], [18, 18], [3.2, 2.0]])
    # at frame 2: nearest tracks 0, 1, none (too far), 0
    np.testing.assert_array_equal(ft.linked(2, query, 1, radius=2.0), [True, True, False, True])
    np.testing.assert_array_equal(ft.linked(2, query, 4, radius=2.0), [False, True, False, False])
    np.testing.assert_array_equal(ft.linked(2, query, 4, radius=0.1), [False, False, False, False])
    # the nearest track decides: at frame 1, (5, 2) is nearest track 0 (dead at 4)
    np.testing.assert_array_equal(ft.linked(1, np.array([[5.0, 2.0]]), 4, radius=20.0), [False])


def test_cancel_leaves_no_files(tmp_path):
    frames, _ = _clip(4, 48)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        compute_flow_tracks(frames, FlowConfig(), tmp_path, cancel=token)
    assert list(tmp_path.iterdir()) == []


def test_warp_points_bilinear():
    flow = np.zeros((4, 5, 2), np.float32)
    flow[..., 0] = np.arange(5)[None, :]  # dx = x
    flow[..., 1] = 2.0 * np.arange(4)[:, None]  # dy = 2 y
    pts = np.array([[1.25, 2.5], [3.0, 0.0]], np.float32)
    np.testing.assert_allclose(warp_points(pts, flow), [[2.5, 7.5], [6.0, 0.0]], atol=1e-5)


def test_raft_with_weights_file_and_missing_weights(tmp_path):
    import torch
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(0)
    path = tmp_path / "raft.pth"
    torch.save(raft_large(weights=None, progress=False).state_dict(), path)
    est = make_flow_estimator(FlowConfig(backend="raft", raft_weights=str(path), raft_iters=1))
    a = cv2.resize(_TEXTURE, (76, 60))  # padded to RAFT's 128 px minimum and cropped back
    fwd, bwd = est.pair(a, np.roll(a, 2, axis=1))
    assert fwd.shape == bwd.shape == (60, 76, 2) and fwd.dtype == np.float32
    assert np.isfinite(fwd).all() and np.isfinite(bwd).all()
    assert not np.allclose(fwd, bwd)
    with pytest.raises(WeightsError, match="backend=dis"):
        make_flow_estimator(FlowConfig(backend="raft", raft_weights=str(tmp_path / "no.pth")))
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError):
        make_flow_estimator(FlowConfig(backend="raft", raft_weights=str(bad)))
    assert raft_weights_path(FlowConfig()).name == "raft_large_C_T_SKHT_V2-ff5fadd5.pth"


def test_farneback_backend_measures_translation():
    a = cv2.warpAffine(_TEXTURE, _affine(0, 96, deg=0, scale=1.0), (96, 96))
    b = cv2.warpAffine(_TEXTURE, _affine(2, 96, deg=0, scale=1.0), (96, 96))
    flow = make_flow_estimator(FlowConfig(backend="farneback"))(a, b)
    med = np.median(flow[16:-16, 16:-16].reshape(-1, 2), axis=0)
    np.testing.assert_allclose(med, [1.4, 0.9], atol=0.2)
