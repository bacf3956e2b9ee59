"""Training: loss goes down, exact resume, cancellation, status, empty supervision."""

from __future__ import annotations

import logging
import math
import shutil
import socket
import subprocess

import numpy as np
import pytest
import torch

from dino_tracker_ros.core.backbone import resolve_precision
from dino_tracker_ros.core.checkpoint import load_model
from dino_tracker_ros.core.clip import Clip, clip_from_array
from dino_tracker_ros.core.config import PROFILES
from dino_tracker_ros.core.errors import Cancelled
from dino_tracker_ros.core.preprocess import Workspace, preprocess_clip
from dino_tracker_ros.core.progress import CancelToken
from dino_tracker_ros.core.storage import create_array, read_json, write_json_atomic
from dino_tracker_ros.core.synthetic import make_synthetic_clip
from dino_tracker_ros.core.trainer import Trainer, train_clip, train_status, train_workspace

CFG = PROFILES["tiny"].replace(**{"backbone.random_init": True, "device": "cpu"})


@pytest.fixture(scope="module")
def prepared_clip(tmp_path_factory) -> Clip:
    root = tmp_path_factory.mktemp("train")
    clip, _ = make_synthetic_clip(root, num_frames=8, height=96, width=128, seed=9)
    preprocess_clip(clip, CFG)
    return clip


def _copy(clip: Clip, dest) -> Clip:
    """A private copy of a preprocessed clip (without model/ and cache/)."""
    target = dest / clip.clip_id
    shutil.copytree(clip.path, target, ignore=shutil.ignore_patterns("model", "cache"))
    return Clip.open(target)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_lowers_the_flow_loss(prepared_clip) -> None:
    ws = Workspace(prepared_clip, CFG)
    trainer = Trainer(ws, CFG, "cpu")
    before = trainer.flow_eval(batches=8)
    for _ in range(60):
        values = trainer.step()
        assert all(math.isfinite(v) for v in values.values())
    after = trainer.flow_eval(batches=8)
    print(f"flow loss on 8 fixed batches: {before:.5f} -> {after:.5f} "
          f"(factor {before / after:.2f} after 60 iterations)")
    # observed 2.8x-4.9x on synthetic clips with seeds 1, 5 and 9 (tiny profile, CPU)
    assert before / after >= 2.0
    assert {"flow", "prior_norm", "prior_angle", "rfn_bb", "rfn_cc"} <= set(trainer.last_terms)


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(prepared_clip, tmp_path,
                                                                 caplog) -> None:
    cfg = CFG.replace(**{"train.refine_start": 2, "train.checkpoint_every": 3})
    clip_a = _copy(prepared_clip, tmp_path / "a")
    clip_b = _copy(prepared_clip, tmp_path / "b")
    full = train_workspace(Workspace(clip_a, cfg), cfg, iterations=8)
    part = train_workspace(Workspace(clip_b, cfg), cfg, iterations=5)
    assert part.iteration == 5
    resumed = train_workspace(Workspace(clip_b, cfg), cfg, iterations=8)
    assert resumed.resumed_from == 5 and resumed.iteration == 8
    a, b = _params(full.model), _params(resumed.model)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"max parameter difference, resumed at 5 vs uninterrupted, at 8: {worst:.3g}")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-7), k
    assert resumed.history == pytest.approx(full.history, rel=1e-5)
    changed = _params(part.model)  # training moved the parameters at all
    assert any(not torch.allclose(changed[k].float(), a[k].float()) for k in a)
    # the final model file holds the same parameters
    model, _, meta = load_model(clip_b.model_dir / "model.pt")
    assert meta["extra"]["iterations"] == 8
    assert all(torch.allclose(model.state_dict()[k].float(), b[k].float()) for k in b)
    # a checkpoint made with other settings is not resumed
    other = cfg.replace(**{"train.lr": 0.005})
    with caplog.at_level(logging.WARNING, logger="dino_tracker.train"):
        fresh = train_workspace(Workspace(clip_b, other), other, iterations=1)
    assert fresh.resumed_from == 0 and fresh.iteration == 1
    assert "other settings" in caplog.text


def test_cancel_stops_within_one_iteration_and_leaves_a_checkpoint(prepared_clip,
                                                                   tmp_path) -> None:
    clip = _copy(prepared_clip, tmp_path)
    token = CancelToken()
    seen: list[int] = []

    def on_progress(p) -> None:
        if p.stage == "training" and p.step >= 2 and not token.cancelled:
            seen.append(p.step)
            token.cancel()

    with pytest.raises(Cancelled, match="train again to resume"):
        train_workspace(Workspace(clip, CFG), CFG, iterations=50, progress=on_progress,
                        cancel=token)
    assert len(seen) == 1
    state = torch.load(clip.model_dir / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == seen[0]  # no iteration ran after the request
    rec = read_json(clip.model_dir / "train.json")
    assert rec["state"] == "recorded" and "cancelled" in rec["message"]
    status = train_status(clip)
    assert status.state == "recorded" and status.iteration == seen[0] and status.total == 50
    trainer = Trainer(Workspace(clip, CFG), CFG, "cpu")
    assert trainer.try_resume(clip.model_dir / "checkpoint.pt")
    assert trainer.iteration == seen[0]


def test_status_of_a_dead_training_process_reads_failed(tmp_path) -> None:
    clip = clip_from_array(np.zeros((2, 16, 16, 3), np.uint8), tmp_path, "blank")
    assert train_status(clip).state == "recorded"
    proc = subprocess.Popen(["true"])
    proc.wait()
    write_json_atomic(clip.model_dir / "train.json", {
        "state": "training", "iteration": 7, "total": 20, "loss": 0.5, "message": "training",
        "pid": proc.pid, "host": socket.gethostname(), "updated": "",
    })
    status = train_status(clip)
    assert status.state == "failed"
    assert status.message == "interrupted at iteration 7; train again to resume"
    assert (status.iteration, status.total, status.loss) == (7, 20, 0.5)


def test_empty_supervision_is_skipped_without_crashing(prepared_clip, tmp_path) -> None:
    clip = _copy(prepared_clip, tmp_path)
    work = clip.work_dir
    with create_array(work / "best_buddies.npy", (0, 7), np.float32):
        pass
    t, h, w = np.load(work / "masks.npy", mmap_mode="r").shape
    with create_array(work / "masks.npy", (t, h, w), np.uint8) as m:
        m[:] = 0  # no foreground anywhere
    cfg = CFG.replace(**{"train.refine_start": 0})
    trainer = Trainer(Workspace(clip, cfg), cfg, "cpu")
    for _ in range(2):
        values = trainer.step()
        assert all(math.isfinite(v) for v in values.values())
    assert "dino_bb" not in values and "flow" in values and "rfn_cc" in values


def test_bf16_training_step(prepared_clip) -> None:
    cfg = CFG.replace(**{"train.precision": "bf16", "train.refine_start": 0})
    trainer = Trainer(Workspace(prepared_clip, cfg), cfg, "cpu")
    assert trainer.amp_dtype == torch.bfloat16
    values = trainer.step()
    assert all(math.isfinite(v) for v in values.values())


def test_train_clip_end_to_end(prepared_clip, tmp_path) -> None:
    clip = _copy(prepared_clip, tmp_path)
    reports = []
    result = train_clip(clip.path, CFG, iterations=3, progress=reports.append)
    assert result.iterations == 3 and result.resumed_from == 0
    assert math.isfinite(result.final_loss) and result.model_path.is_file()
    status = train_status(clip)
    assert status.state == "ready" and status.iteration == 3
    assert (clip.cache_dir / "refined.npy").is_file()
    stages = [r.stage for r in reports]
    assert "training" in stages and stages[-1] == "caching"
    train = [r for r in reports if r.stage == "training"]
    assert train[-1].step == 3 and train[-1].total == 3 and math.isfinite(train[-1].loss)
    assert all(0.2 <= r.fraction <= 0.95 for r in train) and train[-1].rate > 0
    assert reports[-1].fraction == pytest.approx(1.0)
    # trained already: a second call resumes at the end and only re-saves and re-caches
    again = train_clip(clip, CFG, iterations=3)
    assert again.resumed_from == 3 and again.iterations == 3


def test_default_path_keeps_the_reference_loss_curve(prepared_clip) -> None:
    # reference path: fp32, refiner on whole cost maps; default: bf16 autocast where the
    # CPU has it, refiner on a window around each peak (exact up to rounding)
    ref_cfg = CFG.replace(**{"train.precision": "fp32", "train.refine_start": 0})
    curves = {}
    for name, cfg, windowed in (("reference", ref_cfg, False), ("windowed", ref_cfg, True),
                                ("default", CFG.replace(**{"train.refine_start": 0}), True)):
        trainer = Trainer(Workspace(prepared_clip, cfg), cfg, "cpu")
        trainer.windowed_head = windowed
        curves[name] = np.array([trainer.step()["total"] for _ in range(12)])
        if name == "default":
            assert trainer.amp_dtype == resolve_precision("auto", torch.device("cpu"))
    ref = curves["reference"]
    exact = np.abs(curves["windowed"] - ref) / ref
    close = np.abs(curves["default"] - ref) / ref
    drift = abs(curves["default"].mean() / ref.mean() - 1.0)
    print(f"relative loss differences: windowed {exact.round(5)}, default {close.round(3)}, "
          f"default mean {drift:.3f}")
    # same arithmetic: equal until rounding flips a discrete choice (a cost-map peak), then
    # the paths fork like two runs with different seeds
    assert exact[:4].max() < 1e-3 and exact.mean() < 0.02
    # bf16: the first step (Delta-DINO starts at 0) equal, the curve within the noise
    assert close[0] < 1e-3
    assert drift < 0.25
