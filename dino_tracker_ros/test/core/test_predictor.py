"""Inference: fast head path, query handling, occlusion on constructed features, and the
end-to-end comparison of a trained tracker with its baselines on a synthetic clip."""

from __future__ import annotations

import dataclasses
import shutil
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_tracker_ros.core.backbone import to_input
from dino_tracker_ros.core.baselines import evaluate_clip, format_tables
from dino_tracker_ros.core.checkpoint import load_model, save_model
from dino_tracker_ros.core.clip import Clip
from dino_tracker_ros.core.config import PROFILES, ModelConfig, TrackConfig
from dino_tracker_ros.core.errors import NotTrainedError, QueryError
from dino_tracker_ros.core.geometry import GridGeometry
from dino_tracker_ros.core.model import DinoTrackerModel
from dino_tracker_ros.core.predictor import (
    Predictor,
    cache_is_fresh,
    grid_queries,
    locate_windowed,
)
from dino_tracker_ros.core.preprocess import Workspace
from dino_tracker_ros.core.storage import open_array, read_json
from dino_tracker_ros.core.synthetic import make_synthetic_clip
from dino_tracker_ros.core.trainer import train_clip
from dino_tracker_ros.core.visibility import agreement_visibility, select_anchors

STRIDE = 7


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a loaded 2-core machine OpenMP's spinning threads made these
    tests ~5x slower (training 100 iterations: 18 s with one thread, 85 s with two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

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


@pytest.mark.parametrize("radius,refiner", [(24.0, True), (35.0, True), (10.0, False),
                                            (12.0, True), (60.0, True)])
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


def _reference_track(model, feats: np.ndarray, queries: np.ndarray, cfg: TrackConfig):
    """The algorithm written plainly: ``model.predict`` (the head on full cost maps, fp32)
    per query and frame, every query tracked into each of its anchors (working px = px)."""
    f = torch.from_numpy(feats.astype(np.float32))
    num_t = len(f)
    k = torch.as_tensor(queries[:, 0], dtype=torch.long)
    xy = torch.as_tensor(queries[:, 1:], dtype=torch.float32)
    qf = torch.stack([model.sample(f[int(t)][None], p[None, None])[0, 0]
                      for t, p in zip(k, xy, strict=True)])
    traj = torch.stack([model.predict(qf[None], f[t][None])[0] for t in range(num_t)], 1)
    at = torch.stack([model.sample(f[t][None], traj[:, t][None])[0] for t in range(num_t)], 1)
    rows = torch.arange(len(k))
    traj[rows, k], at[rows, k] = xy, qf
    cos = F.cosine_similarity(at, qf[:, None], dim=-1, eps=1e-8)
    cos[rows, k] = 1.0
    anchors, valid = select_anchors(cos, k, cfg.anchor_cos, cfg.max_anchors)
    cycle = torch.zeros(len(k), anchors.shape[1], num_t, 2)
    for i, j in zip(*torch.nonzero(valid, as_tuple=True), strict=True):
        cycle[i, j] = model.predict(at[i][None], f[int(anchors[i, j])][None])[0]
    vis = agreement_visibility(cycle, traj, anchors, valid, cos, k, cfg.occlusion_cos)
    score = vis.score.numpy()
    score[rows, k] = 1.0  # Predictor.track: the query point itself
    return traj.numpy(), vis.visible.numpy(), score


def test_fast_path_equals_the_plain_algorithm_on_full_maps():
    feats, _ = _moving_scene(num_t=6, seed=2)
    torch.manual_seed(0)
    model = DinoTrackerModel(feats.shape[1], GEO, ModelConfig(delta_channels=(4, 4, 4),
                                                              radius=24.0)).eval()
    _train_like_refiner(model)  # radius 24 px, stride 7: 11x11 windows, some cross the border
    queries = grid_queries((GEO.height, GEO.width), 17, frame=2)
    cfg = TrackConfig(max_anchors=4, anchor_cos=0.5)
    with torch.no_grad():
        traj, visible, score = _reference_track(model, feats, queries, cfg)
    results = {}
    for name, over in {"resident": {}, "memory map": {"resident_megabytes": 0},
                       "small batches": {"query_batch": 5, "frame_batch": 4}}.items():
        pred = Predictor(model, feats, orig_size=(GEO.height, GEO.width), device="cpu",
                         track_cfg=dataclasses.replace(cfg, **over), precision="fp32")
        res = results[name] = pred.track(queries)
        err = float(np.abs(res.tracks - traj).max())
        print(f"{name}: max |fast - plain| {err:.1e} px, visibility decisions equal: "
              f"{float((res.visible == visible).mean()):.3f}, max score difference "
              f"{float(np.abs(res.visibility - score).max()):.1e}")
        assert err < 1e-3
        assert np.array_equal(res.visible, visible)
        assert np.allclose(res.visibility, score, atol=1e-4)
    assert (~visible).sum() > 5 and visible.sum() > 5  # both decisions occur
    assert np.array_equal(results["resident"].tracks, results["memory map"].tracks)


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


# -- a trained clip ------------------------------------------------------------------------
# tiny profile at stride 7 on a 96 x 128 clip of 16 frames, random-init backbone
E2E_CFG = PROFILES["tiny"].replace(**{
    "backbone.random_init": True, "device": "cpu", "backbone.stride": 7,
    "preprocess.height": 128,
})
E2E_ITERATIONS = 250


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory) -> Clip:
    root = tmp_path_factory.mktemp("e2e")
    clip, _ = make_synthetic_clip(root, num_frames=16, height=96, width=128, seed=1)
    t0 = time.monotonic()
    train_clip(clip, E2E_CFG, iterations=E2E_ITERATIONS)
    print(f"\npreprocessing + {E2E_ITERATIONS} iterations + cache: "
          f"{time.monotonic() - t0:.1f} s")
    return clip


def test_refined_cache_matches_the_model_and_is_rebuilt_when_stale(trained_clip, tmp_path):
    clip = Clip.open(shutil.copytree(trained_clip.path, tmp_path / trained_clip.clip_id))
    assert cache_is_fresh(clip)
    cache = clip.cache_dir / "refined.npy"
    feats = open_array(cache)
    model, cfg, meta = load_model(clip.model_dir / "model.pt")
    ws = Workspace(clip, cfg)
    assert feats.dtype == np.float16 and feats.shape[0] == len(clip)
    assert tuple(feats.shape[2:]) == ws.geometry.grid_hw
    with torch.no_grad():
        ref = model.refine(to_input(np.array(ws.frames()[3:5])),
                           torch.from_numpy(np.array(ws.features()[3:5])))
    assert np.allclose(feats[3:5], ref.numpy(), atol=2e-2, rtol=1e-2)
    stamp = cache.stat().st_mtime_ns
    Predictor.open(clip, device="cpu")  # fresh: not rebuilt
    assert cache.stat().st_mtime_ns == stamp
    with torch.no_grad():  # a different model file: the cache is stale and rebuilt on open
        for p in model.delta.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(clip.model_dir / "model.pt", model, cfg, image_size=meta["image_size"],
               orig_size=meta["orig_size"])
    assert not cache_is_fresh(clip)
    Predictor.open(clip, device="cpu")
    assert cache_is_fresh(clip) and cache.stat().st_mtime_ns != stamp
    with torch.no_grad():
        ref = model.refine(to_input(np.array(ws.frames()[3:5])),
                           torch.from_numpy(np.array(ws.features()[3:5])))
    assert np.allclose(open_array(cache)[3:5], ref.numpy(), atol=2e-2, rtol=1e-2)
    rec = read_json(clip.cache_dir / "refined.json")
    assert rec["shape"] == list(feats.shape) and len(rec["model_sha256"]) == 64
    (clip.model_dir / "model.pt").unlink()
    with pytest.raises(NotTrainedError):
        Predictor.open(clip, device="cpu")


def test_middle_frame_queries_agree_forward_and_backward(trained_clip):
    pred = Predictor.open(trained_clip, device="cpu")
    k = 8
    first = pred.track(grid_queries(trained_clip.size, 16, frame=0))
    keep = first.visible[:, k]
    again = pred.track(np.concatenate(
        [np.full((int(keep.sum()), 1), float(k)), first.tracks[keep, k]], 1))
    both = first.visible[keep] & again.visible
    gap = np.linalg.norm(first.tracks[keep] - again.tracks, axis=-1)
    before, after = both[:, :k], both[:, k + 1:]
    token = 7 * trained_clip.size[0] / Workspace(trained_clip, E2E_CFG).size[0]
    print(f"{int(keep.sum())} points re-queried on frame {k}: median gap "
          f"{np.median(gap[both]):.2f} px (backward half {np.median(gap[:, :k][before]):.2f}, "
          "forward half "
          f"{np.median(gap[:, k + 1:][after]):.2f}); within 3 px: {np.mean(gap[both] < 3):.2f}, "
          f"within one token ({token:.1f} px): {np.mean(gap[both] < token):.2f}")
    # observed (seeds 1-3, 250 iterations): medians 0.8 px, 0.95-0.98 within one token
    assert keep.sum() >= 20 and both.mean() > 0.7
    assert np.median(gap[:, :k][before]) < 2.0 and np.median(gap[:, k + 1:][after]) < 2.0
    assert np.mean(gap[both] < token) > 0.85


@pytest.fixture(scope="module")
def evaluation(trained_clip) -> dict:
    res = evaluate_clip(trained_clip, device="cpu", query_mode="first")
    print("\n" + format_tables(res))
    return res


def test_end_to_end_tracker_beats_the_untrained_features(evaluation):
    aj = {m: evaluation["methods"][m]["all"]["aj"] for m in evaluation["methods"]}
    aj_re = {m: evaluation["methods"][m]["reappearing"]["aj"] for m in evaluation["methods"]}
    # observed (clip seeds 1-3, 250 iterations): AJ 29-38 vs 8-9; reappearing 9-18 vs 8-12
    assert evaluation["num_reappearing"] >= 8
    assert aj["tracker"] > aj["untrained"] + 0.15
    assert aj_re["tracker"] > aj_re["untrained"]
    assert evaluation["methods"]["tracker"]["all"]["oa"] > 0.75


@pytest.mark.xfail(strict=True, reason=(
    "not reachable at a test's budget with a randomly initialised backbone: on small clips "
    "the trained tracker's predictions follow the occluding bar and miss the points after it. "
    "Reappearing AJ tracker vs DIS: 128x96 tiny 250 it, seeds 1-3: 18 vs 27, 16 vs 23, 9 vs "
    "16 (layer 8, seeds 1-2: 16 vs 27, 17 vs 23); seeds 1-2: 160x120 cpu 250 it 20 vs 27, 16 "
    "vs 22; 192x144 cpu 300 "
    "it 23 vs 30, 21 vs 23; 256x192 cpu 300 it 24 vs 28, 39 vs 27. It holds at the "
    "benchmark's scale, ~5 min per clip: bench/results/accuracy.md, 320x240, 24 frames, cpu "
    "profile: 49.2 vs 28.3 (3 clips)"))
def test_end_to_end_tracker_beats_chained_dis_on_reappearing_points(evaluation):
    aj_re = {m: evaluation["methods"][m]["reappearing"]["aj"] for m in evaluation["methods"]}
    assert aj_re["tracker"] > aj_re["dis"]
