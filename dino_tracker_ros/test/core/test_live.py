"""Live tracking in the core: a model trained on the first half of a synthetic clip follows
its ground-truth points through the unseen second half, one frame at a time."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from dino_tracker_ros.core.baselines import chained_flow_tracks
from dino_tracker_ros.core.clip import clip_from_array
from dino_tracker_ros.core.config import PROFILES
from dino_tracker_ros.core.errors import NotTrainedError, QueryError
from dino_tracker_ros.core.live import LivePredictor
from dino_tracker_ros.core.metrics import evaluate_tracks
from dino_tracker_ros.core.predictor import Predictor
from dino_tracker_ros.core.synthetic import render_synthetic
from dino_tracker_ros.core.trainer import train_clip

T, H, W, HALF = 16, 96, 128, 8
ITERATIONS = 120  # 80 left the test at the mercy of small numeric changes in training
# tiny profile at stride 7 (stride 14 leaves 7 x 8 tokens: too coarse to follow anything)
CFG = PROFILES["tiny"].replace(**{"backbone.random_init": True, "device": "cpu",
                                  "backbone.stride": 7, "preprocess.height": 112})


class Live:
    """What the tests share: the clip, its ground truth and one pass over the second half."""


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Live:
    s = Live()
    s.frames, gt = render_synthetic(T, H, W, seed=1, num_points=48)
    s.clip = clip_from_array(s.frames[:HALF], tmp_path_factory.mktemp("live"), "first", fps=10)
    t0 = time.monotonic()
    train_clip(s.clip, CFG, iterations=ITERATIONS)
    s.train_s = time.monotonic() - t0
    sel = gt.queries[:, 0] < HALF  # queries on the training clip's frames
    s.queries = gt.queries[sel].astype(np.float64)
    s.gt_tracks, s.gt_visible = gt.tracks[sel][:, HALF:], gt.visible[sel][:, HALF:]
    s.predictor = LivePredictor.open(s.clip, s.queries, device="cpu")
    results = [s.predictor.step(s.frames[t], stamp_ns=1000 + t) for t in range(HALF, T)]
    s.results = results
    s.positions = np.stack([r.positions for r in results], 1)
    s.visible = np.stack([r.visible for r in results], 1)
    s.score = np.stack([r.visibility for r in results], 1)
    return s


def _metrics(s: Live, tracks: np.ndarray, visible: np.ndarray) -> dict:
    q = np.zeros((len(s.queries), 3))
    q[:, 0] = -1  # score every live frame
    return evaluate_tracks(q, s.gt_tracks, s.gt_visible, tracks, visible, (H, W), "first")


def test_live_steps_follow_the_ground_truth_of_unseen_frames(live):
    s = live
    n = len(s.queries)
    assert n >= 30
    for t, r in zip(range(HALF, T), s.results, strict=True):
        assert r.positions.shape == (n, 2) and r.positions.dtype == np.float32
        assert r.visible.dtype == bool and r.visibility.dtype == np.float32
        assert r.stamp_ns == 1000 + t and r.size_hw == (H, W) and r.seconds > 0
        assert ((r.visibility >= 0) & (r.visibility <= 1)).all()
        np.testing.assert_array_equal(r.visible, r.visibility >= 0.5)
    err = np.linalg.norm(s.positions - s.gt_tracks, axis=-1)
    gv = s.gt_visible
    static = np.linalg.norm(s.queries[:, None, 1:] - s.gt_tracks, axis=-1)
    live_m = _metrics(s, s.positions, s.visible)
    dis_tracks, dis_vis = chained_flow_tracks(s.frames, s.queries)
    dis_m = _metrics(s, dis_tracks[:, HALF:], dis_vis[:, HALF:])
    print(f"\nlive over frames {HALF}..{T - 1} of a {W}x{H} clip, model trained {ITERATIONS} "
          f"iterations on frames 0..{HALF - 1} ({s.train_s:.1f} s): median error "
          f"{np.median(err[gv]):.2f} px (static query point {np.median(static[gv]):.2f} px); "
          f"delta_avg {live_m['delta_avg']:.3f} OA {live_m['oa']:.3f} AJ {live_m['aj']:.3f}; "
          f"chained DIS from the query frames: delta_avg {dis_m['delta_avg']:.3f} OA "
          f"{dis_m['oa']:.3f} AJ {dis_m['aj']:.3f}; step "
          f"{1e3 * np.median([r.seconds for r in s.results]):.0f} ms")
    # observed (seed 1): median 3.5 px vs static 8.5 px, delta_avg 0.29, OA 0.71 (DIS: 0.80,
    # 0.78: chaining wins on this smooth clip with a random-init backbone); seed 2: 5.0 vs
    # 7.3 px, delta_avg 0.24, OA 0.70
    assert np.median(err[gv]) < 0.75 * np.median(static[gv])
    assert live_m["delta_avg"] > 0.18


def test_occluded_points_score_lower(live):
    s = live
    vis_score, occ_score = s.score[s.gt_visible], s.score[~s.gt_visible]
    print(f"\nmean visibility score: visible {vis_score.mean():.2f}, occluded "
          f"{occ_score.mean():.2f} ({len(occ_score)} occluded of {s.score.size})")
    # observed 0.70 vs 0.40 (seed 2: 0.81 vs 0.70)
    assert len(occ_score) >= 20
    assert occ_score.mean() < vis_score.mean() - 0.1
    assert (~s.visible[~s.gt_visible]).mean() > (~s.visible[s.gt_visible]).mean() + 0.1


def test_a_clip_frame_gives_the_offline_answer_and_rescaled_frames_rescaled_positions(live):
    s = live
    offline = Predictor.open(s.clip, device="cpu").track(s.queries)
    fresh = LivePredictor.open(s.clip, s.queries, device="cpu")
    assert fresh.backbone is s.predictor.backbone  # same settings: the ViT is not rebuilt
    k = HALF - 1
    r = fresh.step(s.frames[k])
    gap = np.abs(r.positions - offline.tracks[:, k])
    print(f"\nlive vs offline on clip frame {k}: median {np.median(gap):.1e} px, max "
          f"{gap.max():.2f} px")
    assert np.median(gap) < 0.05 and np.mean(gap < 0.5) > 0.9  # fp16 cache vs fp32 live

    t = HALF + 2
    small = fresh.step(s.frames[t])
    big_frame = cv2.resize(s.frames[t], (2 * W, 2 * H), interpolation=cv2.INTER_LINEAR)
    fresh.reset()
    big = fresh.step(big_frame)
    assert big.size_hw == (2 * H, 2 * W)
    expected = (small.positions + 0.5) * 2 - 0.5  # pixel centres scale about -0.5
    gap = np.linalg.norm(big.positions - expected, axis=-1)
    print(f"2x frame: median {np.median(gap):.2f} px off twice the 1x positions")
    assert np.median(gap) < 1.0 and np.mean(gap < 4.0) > 0.85


def test_bad_queries_frames_and_untrained_clips_are_refused(live, tmp_path):
    s = live
    for bad, text in [
        ([[HALF, 10.0, 10.0]], "outside the clip"),
        ([[0, W + 2.0, 10.0]], "outside the"),
        ([[0, float("nan"), 10.0]], "not finite"),
        ([[0.5, 10.0, 10.0]], "integer"),
        ([[1.0, 2.0]], "(N, 3)"),
    ]:
        with pytest.raises(QueryError, match=text.replace("(", r"\(").replace(")", r"\)")):
            LivePredictor.open(s.clip, bad, device="cpu", predictor=s.predictor.predictor)
    for frame in (np.zeros((H, W), np.uint8), np.zeros((H, W, 3), np.float32)):
        with pytest.raises(QueryError, match="uint8 RGB"):
            s.predictor.step(frame)
    untrained = clip_from_array(s.frames[:3], tmp_path, "untrained")
    with pytest.raises(NotTrainedError, match="train"):
        LivePredictor.open(untrained, [[0, 5.0, 5.0]], device="cpu")
    none = LivePredictor.open(s.clip, np.zeros((0, 3)), device="cpu",
                              predictor=s.predictor.predictor)
    r = none.step(s.frames[HALF])
    assert r.positions.shape == (0, 2) and r.visible.shape == (0,)


def test_history_is_a_bounded_ring(live):
    s = live
    lp = s.predictor
    assert lp._history.maxlen == CFG.track.live_history == 4
    assert len(lp._history) == 4  # after 8 steps, only the newest 4 frames are kept


def test_cli_live_runs_over_a_video_file(live, tmp_path, capsys):
    from dino_tracker_ros.cli import main

    s = live
    video = tmp_path / "second_half.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (W, H))
    assert writer.isOpened()
    for t in range(HALF, T):
        writer.write(cv2.cvtColor(s.frames[t], cv2.COLOR_RGB2BGR))
    writer.release()
    queries = tmp_path / "q.csv"
    queries.write_text("t,x,y\n" + "".join(f"{t:g},{x},{y}\n" for t, x, y in s.queries))
    out = tmp_path / "out"
    code = main(["live", str(s.clip.path), str(video), "--queries", str(queries), "--out",
                 str(out), "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    data = np.load(out / "tracks.npz")
    assert data["tracks"].shape == (len(s.queries), T - HALF, 2)
    assert data["stamps_ns"].tolist() == [int(round(i * 1e8)) for i in range(T - HALF)]
    gap = np.linalg.norm(data["tracks"] - s.positions, axis=-1)  # JPEG frames, same model
    assert np.median(gap) < 1.0
    assert (out / "overlay.mp4").stat().st_size > 0 and (out / "tracks.csv").is_file()
    assert main(["live", str(s.clip.path), str(tmp_path / "none.avi"), "--grid", "32",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
