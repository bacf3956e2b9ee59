"""Preprocessing stages: outputs, skipping finished stages, redoing changed ones."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dino_tracker_ros.core.config import PROFILES
from dino_tracker_ros.core.errors import Cancelled
from dino_tracker_ros.core.preprocess import STAGES, Workspace, preprocess_clip
from dino_tracker_ros.core.progress import CancelToken
from dino_tracker_ros.core.storage import read_json
from dino_tracker_ros.core.synthetic import make_synthetic_clip

CFG = PROFILES["tiny"].replace(**{"backbone.random_init": True, "device": "cpu"})
OUTPUTS = {
    "frames": "frames.npy",
    "features": "features.npy",
    "flow": "flow_points.npy",
    "masks": "masks.npy",
    "best_buddies": "best_buddies.npy",
}


def _stamps(ws: Workspace) -> dict[str, tuple[float, int]]:
    """Per stage: the finish time recorded in prep.json and the output's mtime."""
    rec = read_json(ws.dir / "prep.json")["stages"]
    return {s: (rec[s]["finished"], (ws.dir / OUTPUTS[s]).stat().st_mtime_ns) for s in STAGES}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    clip, _ = make_synthetic_clip(root, num_frames=8, height=96, width=128, seed=3)
    reports = []
    t0 = time.monotonic()
    ws = preprocess_clip(clip, CFG, progress=reports.append)
    return clip, ws, reports, time.monotonic() - t0


def test_outputs_have_consistent_shapes(prepared) -> None:
    clip, ws, reports, seconds = prepared
    print(f"first preprocessing run: {seconds:.2f} s")
    t = len(clip)
    h, w = ws.size
    assert (h - 14) % CFG.backbone.stride == 0 and (w - 14) % CFG.backbone.stride == 0
    assert ws.frames().shape == (t, h, w, 3) and ws.frames().dtype == np.uint8
    feats = ws.features()
    assert feats.shape[0] == t and feats.shape[2:] == ws.geometry.grid_hw
    assert feats.dtype == np.float16
    assert ws.masks().shape == (t, h, w)
    bb = ws.best_buddies()
    assert bb.ndim == 2 and bb.shape[1] == 7
    tracks = ws.flow_tracks()
    assert tracks.num_tracks > 100
    assert all(ws.done(s) for s in STAGES)
    # progress: every stage reported, in order, fractions non-decreasing within [0, 1]
    stages = [r.stage for r in reports]
    firsts = [stages.index(s) for s in STAGES]
    assert firsts == sorted(firsts)
    fracs = [r.fraction for r in reports]
    assert all(0.0 <= f <= 1.0 for f in fracs)
    assert all(b >= a - 1e-9 for a, b in zip(fracs, fracs[1:], strict=False))
    assert fracs[-1] == pytest.approx(1.0)


def test_second_run_skips_finished_stages(prepared) -> None:
    clip, ws, _, first_seconds = prepared
    before = _stamps(ws)
    t0 = time.monotonic()
    reports = []
    preprocess_clip(clip, CFG, progress=reports.append)
    seconds = time.monotonic() - t0
    print(f"second run: {seconds:.3f} s (first {first_seconds:.2f} s)")
    assert _stamps(ws) == before  # nothing recomputed or rewritten
    assert {r.message for r in reports} == {"done earlier"}
    assert seconds < 0.5 * first_seconds


def test_changed_settings_redo_exactly_the_dependent_stages(prepared) -> None:
    clip, ws, _, _ = prepared
    before = _stamps(ws)
    cfg = CFG.replace(**{"preprocess.masks.threshold": 0.4})
    ws2 = preprocess_clip(clip, cfg)
    after = _stamps(ws2)
    redone = {s for s in STAGES if after[s] != before[s]}
    assert redone == {"masks"}

    cfg = cfg.replace(**{"preprocess.flow.grid_step": 6})
    ws3 = preprocess_clip(clip, cfg)
    again = _stamps(ws3)
    redone = {s for s in STAGES if again[s] != after[s]}
    assert redone == {"flow", "best_buddies"}  # best buddies are filtered by the flow
    assert not Workspace(clip, CFG).done("flow")  # the old settings are no longer done
    # batch size does not change the features: nothing to redo
    cfg = cfg.replace(**{"backbone.batch_frames": 3})
    preprocess_clip(clip, cfg)
    assert _stamps(ws3) == again


def test_cancelled_preprocessing_leaves_no_partial_output(tmp_path) -> None:
    clip, _ = make_synthetic_clip(tmp_path, num_frames=4, height=64, width=64, seed=1)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        preprocess_clip(clip, CFG, cancel=token)
    assert not list(clip.work_dir.glob("*.npy"))
    assert not Workspace(clip, CFG).done("frames")
