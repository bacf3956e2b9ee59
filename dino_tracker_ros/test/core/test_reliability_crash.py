"""Reliability, crashes (issue 7): ``kill -9`` real processes at seeded random points.

The child processes kill themselves with a real ``SIGKILL`` from a Python audit hook
(``sys.addaudithook``) at the K-th ``os.rename`` (every atomic commit of the core goes
through one: clip directories, ``clip.json``, ``.npy`` stages, ``prep.json``, checkpoints,
``model.pt``, ``train.json``, the refined cache; mode ``model`` counts only those into
``model/`` and ``cache/``) or at the K-th frame file opened, K drawn from a seeded
generator. Killing just before a commit is the hardest point for crash
consistency (the new data is complete on disk but not yet published; kills during
computation leave a subset of that state). After each kill the test checks that everything
finished before is readable and consistent, that nothing half-done is visible, and that a
restart resumes (preprocessing skips finished stages, training continues from its last
checkpoint) and completes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from suite_helpers import temp_files, tree_hash

from dino_tracker_ros.core.checkpoint import load_model
from dino_tracker_ros.core.clip import Clip, list_clips, sweep_clip_dir
from dino_tracker_ros.core.config import load_config
from dino_tracker_ros.core.predictor import Predictor
from dino_tracker_ros.core.preprocess import STAGES, Workspace, preprocess_clip, stage_hashes
from dino_tracker_ros.core.synthetic import make_synthetic_clip
from dino_tracker_ros.core.trainer import train_clip, train_status

SEED = 7
ITERATIONS = 8
OVERRIDES = ["backbone.random_init=true", "train.checkpoint_every=2",
             f"train.iterations={ITERATIONS}"]

# The child: arm a SIGKILL at the K-th matching audit event, then run a job.
KILLER = r"""
import logging, os, signal, sys
logging.basicConfig(level=logging.INFO)
mode, k = sys.argv[1], int(sys.argv[2])
seen = 0
def hook(event, args):
    global seen
    hit = (mode == "rename" and event == "os.rename") or (
        mode == "model" and event == "os.rename"
        and ("/model/" in str(args[1]) or "/cache/" in str(args[1]))) or (
        mode == "frame" and event == "open" and "/frames/" in str(args[0])
        and "w" in str(args[1]))
    if hit and k:
        seen += 1
        if seen == k:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
"""

WRITE_CLIPS = KILLER + r"""
import numpy as np
from dino_tracker_ros.core.clip import ClipWriter
root, first = sys.argv[3], int(sys.argv[4])
for i in range(first, first + 40):
    with ClipWriter(root, f"c{i:03d}", fps=10.0) as w:
        for t in range(6):
            w.add(np.full((24, 32, 3), (i * 7 + t) % 256, np.uint8), 10**9 + t * 10**8)
    print(f"committed c{i:03d}", flush=True)
"""

OVERWRITE_CLIP = KILLER + r"""
import numpy as np
from dino_tracker_ros.core.clip import clip_from_array
root = sys.argv[3]
for i in range(40):
    value = 50 if i % 2 else 200
    clip_from_array(np.full((4, 16, 16, 3), value, np.uint8), root, "x", overwrite=True)
"""

TRAIN = KILLER + r"""
import torch
torch.set_num_threads(1)
from dino_tracker_ros.core.config import load_config
from dino_tracker_ros.core.trainer import train_clip
cfg = load_config(profile="tiny", device="cpu", overrides=sys.argv[4:])
res = train_clip(sys.argv[3], cfg)
print("done", res.iterations, flush=True)
"""


PREPROCESS = KILLER + r"""
import torch
torch.set_num_threads(1)
from dino_tracker_ros.core.config import load_config
from dino_tracker_ros.core.preprocess import preprocess_clip
cfg = load_config(profile="tiny", device="cpu", overrides=sys.argv[4:])
preprocess_clip(sys.argv[3], cfg)
print("done", flush=True)
"""


def run_child(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)






def check_clip_store(root: Path, committed: list[str]) -> None:
    """Every visible clip is complete and has the content its writer gave it."""
    visible = [p for p in root.iterdir() if not p.name.startswith(".")]
    for p in visible:  # nothing half-written is visible under a clip name
        assert (p / "clip.json").is_file(), f"partial clip visible: {p}"
    clips = list_clips(root)
    assert sorted(c.clip_id for c in clips) == sorted(p.name for p in visible)
    assert set(committed) <= {c.clip_id for c in clips}
    for clip in clips:
        i = int(clip.clip_id[1:])
        assert len(clip) == 6
        for t in range(6):
            assert (clip.frame(t) == (i * 7 + t) % 256).all()


def test_kill_while_writing_clips(tmp_path):
    rng = np.random.default_rng(SEED)
    root = tmp_path / "clips"
    committed: list[str] = []
    kills = []
    for mode in ("rename", "frame", "rename", "frame"):
        k = int(rng.integers(2, 20))
        proc = run_child(WRITE_CLIPS, mode, str(k), str(root), str(len(committed)))
        assert proc.returncode == -9, proc.stderr[-2000:]
        new = re.findall(r"committed (c\d+)", proc.stdout)
        committed += new
        kills.append((mode, k, len(new)))
        check_clip_store(root, committed)
        # the interrupted clip is only a dot-temporary; nothing else appeared
        extra = {c.clip_id for c in list_clips(root)} - set(committed)
        assert not extra or (len(extra) == 1 and mode == "rename"), (extra, kills)
    left = [p for p in temp_files(root) if p.parent == root]
    assert left, "a kill before a commit leaves the writer's temporary behind"
    removed = sweep_clip_dir(root)
    assert sorted(removed) == sorted(left) and not temp_files(root)
    check_clip_store(root, committed)
    print(f"clip-writing kills (mode, K, clips committed by that child): {kills}; "
          f"{len(removed)} temporaries swept")


def test_kill_while_overwriting_a_clip(tmp_path):
    """``overwrite=True`` exchanges the directories atomically: after a kill at any point
    the clip is one complete version, never missing."""
    rng = np.random.default_rng(SEED + 1)
    root = tmp_path / "clips"
    from dino_tracker_ros.core.clip import clip_from_array

    clip_from_array(np.full((4, 16, 16, 3), 200, np.uint8), root, "x")
    seen = set()
    for _ in range(4):
        k = int(rng.integers(2, 30))
        proc = run_child(OVERWRITE_CLIP, "rename", str(k), str(root))
        assert proc.returncode == -9, proc.stderr[-2000:]
        clip = Clip.open(root / "x")
        values = {int(clip.frame(t)[0, 0, 0]) for t in range(len(clip))}
        assert len(values) == 1 and values <= {50, 200}
        seen |= values
    sweep_clip_dir(root)
    assert [c.clip_id for c in list_clips(root)] == ["x"] and not temp_files(root)


def _check_job_state(clip: Clip, cfg, frames_hash: str) -> dict:
    """Invariants after a kill of the training job; returns what is there."""
    assert tree_hash(clip.path / "frames") == frames_hash
    assert Clip.open(clip.path).meta == clip.meta
    ws = Workspace(clip, cfg)
    rec = ws.record()
    hashes = stage_hashes(clip, cfg)
    done = [s for s in STAGES if s in rec["stages"]]
    for stage in done:  # a recorded stage vouches for complete outputs of these settings
        assert rec["stages"][stage]["hash"] == hashes[stage]
        assert ws.done(stage)
    if "frames" in done:
        assert ws.frames().shape == (len(clip), *ws.size, 3)
    if "features" in done:
        assert ws.features().shape[0] == len(clip)
        assert np.isfinite(np.asarray(ws.features(), np.float32)).all()
    if "flow" in done:
        flow = ws.flow_tracks()
        assert flow.num_tracks > 0
    if "masks" in done:
        assert ws.masks().shape == (len(clip), *ws.size)
    if "best_buddies" in done:
        assert ws.best_buddies().shape[1] == 7
    ckpt = clip.model_dir / "checkpoint.pt"
    it = None
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        it = int(state["iteration"])
        assert it % 2 == 0 and 0 < it <= ITERATIONS
    if (clip.model_dir / "model.pt").exists():
        load_model(clip.model_dir / "model.pt")
    status = train_status(clip)
    if status.state != "ready":  # a dead job is reported, never shown as running
        assert status.state in ("failed", "recorded"), status
        assert "interrupted" in status.message or status.state == "recorded", status
    return {"stages": done, "checkpoint": it, "state": status.state}


def test_kill_while_preprocessing_and_training_then_resume(tmp_path):
    rng = np.random.default_rng(SEED + 2)
    clip, gt = make_synthetic_clip(tmp_path / "clips", "c", num_frames=5, height=64, width=64,
                                   seed=3, num_points=16)
    frames_hash = tree_hash(clip.path / "frames")
    cfg = load_config(profile="tiny", device="cpu", overrides=OVERRIDES)
    # run 1 dies inside preprocessing, runs 2 and 3 in training (each run counts its own
    # commits from its start); the restart in this process finishes
    # "model" counts commits into model/ and cache/: train.json, checkpoints every 2
    # iterations, model.pt, refined.npy/json; run 3 reaches the late ones (model, cache)
    plan = [("rename", 2, 14), ("model", 3, 6), ("model", 4, 8)]
    history = []
    for mode, lo, hi in plan:
        k = int(rng.integers(lo, hi + 1))
        proc = run_child(TRAIN, mode, str(k), str(clip.path), *OVERRIDES)
        if proc.returncode == 0:  # the remaining work needed fewer than k commits
            history.append((f"{mode} {k}", "completed"))
            break
        assert proc.returncode == -9, proc.stderr[-3000:]
        resumed = re.findall(r"iterations (\d+)\.\.\d+", proc.stderr)
        skipped = re.findall(r"preprocess c: (\w+) done, skipped", proc.stderr)
        state = _check_job_state(clip, cfg, frames_hash)
        history.append((f"{mode} {k}", state, {"skipped": skipped, "trained_from": resumed}))
        if len(history) > 1:  # what the previous run finished was not redone
            assert set(history[-2][1]["stages"]) <= set(skipped) | set(state["stages"])
            prev_ckpt = history[-2][1]["checkpoint"]
            if prev_ckpt and resumed:
                assert int(resumed[0]) == prev_ckpt
    before = history[-1][1] if isinstance(history[-1][1], dict) else None
    result = train_clip(clip, cfg)  # the restart: finishes the job
    if before and before["checkpoint"]:
        assert result.resumed_from == before["checkpoint"]
    assert result.iterations == ITERATIONS
    assert train_status(clip).state == "ready"
    ws = Workspace(clip, cfg)
    assert all(ws.done(s) for s in STAGES)
    tracks = Predictor.open(clip, device="cpu").track(gt.queries[:4])
    assert tracks.tracks.shape == (4, len(clip), 2) and np.isfinite(tracks.tracks).all()
    left = temp_files(clip.path.parent)
    removed = sweep_clip_dir(clip.path.parent)
    assert temp_files(clip.path.parent) == [] and set(removed) == set(left)  # all swept
    print(f"training-job kills (K, state after the kill): {history}; resumed from "
          f"{result.resumed_from}; {len(removed)} temporaries swept")
    _stage_rerun_killed_before_its_record(clip)


def _stage_rerun_killed_before_its_record(clip: Clip) -> None:
    """A stage re-run with other settings and killed after writing some of its files but
    before ``prep.json`` is updated must not let the old record vouch for the new files:
    the next run with the old settings recomputes the stage (bit-identical to the original).
    """
    work = clip.path / "work"
    reference = {p.name: p.read_bytes() for p in work.glob("flow_*")}
    # Other flow settings; this run's commits: prep.json (the flow record removed),
    # flow_points.npy, flow_offsets.npy, ... : it dies before the third one.
    changed = [*OVERRIDES, "preprocess.flow.grid_step=3"]
    killed = run_child(PREPROCESS, "rename", "3", str(clip.path), *changed)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (work / "flow_points.npy").read_bytes() != reference["flow_points.npy"]
    cfg = load_config(profile="tiny", device="cpu", overrides=OVERRIDES)
    assert not Workspace(clip, cfg).done("flow")
    preprocess_clip(clip, cfg)
    assert {p.name: p.read_bytes() for p in work.glob("flow_*")} == reference
    assert json.loads((work / "prep.json").read_text())["stages"]["flow"]["hash"] == \
        stage_hashes(clip, cfg)["flow"]
