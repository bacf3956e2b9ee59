"""Preprocessing of a clip: the supervision computed once, before training.

Stages, in order, each writing its outputs atomically into the clip's ``work/`` folder:

=============  =========================================  ===============================
stage          output                                     depends on
=============  =========================================  ===============================
frames         ``frames.npy`` (T, H, W, 3) uint8          clip, working size
features       ``features.npy`` (T, C, h, w) float16      frames, ``backbone``
flow           ``flow_*.npy`` (see :mod:`.flow`)          frames, ``preprocess.flow``
masks          ``masks.npy`` (T, H, W) uint8              features, ``preprocess.masks``
best_buddies   ``best_buddies.npy`` (M, 7) float32        features, flow,
                                                          ``preprocess.best_buddies``, seed
=============  =========================================  ===============================

``work/prep.json`` records every finished stage with a hash of the settings it depends on
(including its inputs' hashes), so a second run skips finished stages and redoes exactly
the stages whose settings, or whose inputs' settings, changed.

Crash safety: a stage's record is removed from ``prep.json`` *before* the stage rewrites its
outputs and added back only after all of them are in place, so a process killed at any point
(``kill -9``) never leaves a record that vouches for outputs of other settings or for a
partly rewritten multi-file stage (flow); the next run redoes exactly that stage.
Temporaries of dead processes in ``work/`` are removed at the start of a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .clip import Clip
from .config import Config, resolve_device
from .errors import NotTrainedError
from .geometry import GridGeometry, working_size
from .progress import CancelToken, Progress, ProgressCallback, StageReporter
from .storage import (
    create_array,
    disk_error,
    load_optional_json,
    open_array,
    sweep_temps,
    write_json_atomic,
)

__all__ = ["PREP_VERSION", "STAGES", "Workspace", "preprocess_clip", "stage_hashes"]

logger = logging.getLogger("dino_tracker.preprocess")

PREP_VERSION = 1
STAGES = ("frames", "features", "flow", "masks", "best_buddies")
# share of the preprocessing job's progress range taken by each stage
_WEIGHTS = {"frames": 0.05, "features": 0.45, "flow": 0.25, "masks": 0.05, "best_buddies": 0.2}
_FILES = {
    "frames": "frames.npy",
    "features": "features.npy",
    "flow": "flow_meta.json",
    "masks": "masks.npy",
    "best_buddies": "best_buddies.npy",
}


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _asdict(section: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(section), default=str))


def _mask_files(cfg: Config) -> list:
    """Name, size and modification time of user-supplied mask files (source ``dir``)."""
    if cfg.preprocess.masks.source != "dir" or not cfg.preprocess.masks.directory:
        return []
    folder = Path(cfg.preprocess.masks.directory).expanduser()
    if not folder.is_dir():
        return []
    return sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()
    )


def stage_hashes(clip: Clip, cfg: Config) -> dict[str, str]:
    """Hash of everything each stage's output depends on, chained through its inputs."""
    size = working_size(clip.size, cfg.preprocess.height, cfg.preprocess.width,
                        cfg.backbone.stride)
    meta = clip.meta
    frames = _digest({
        "version": PREP_VERSION,
        "clip": [meta.clip_id, meta.num_frames, meta.width, meta.height, meta.created],
        "size": list(size),
    })
    backbone = _asdict(cfg.backbone)
    backbone.pop("batch_frames", None)  # does not change the result
    features = _digest({"in": frames, "backbone": backbone})
    flow = _digest({"in": frames, "flow": _asdict(cfg.preprocess.flow)})
    masks = _digest({"in": features, "masks": _asdict(cfg.preprocess.masks),
                     "files": _mask_files(cfg)})
    best_buddies = _digest({
        "in": [features, flow],
        "best_buddies": _asdict(cfg.preprocess.best_buddies),
        "seed": cfg.train.seed,
    })
    return {"frames": frames, "features": features, "flow": flow, "masks": masks,
            "best_buddies": best_buddies}


class Workspace:
    """The preprocessing outputs of one clip for one configuration.

    Attributes:
        clip: the clip.
        cfg: the configuration.
        dir: ``clip.work_dir``.
        size: working (H, W).
        geometry: token grid of the working image.
    """

    def __init__(self, clip: Clip, cfg: Config) -> None:
        self.clip = clip
        self.cfg = cfg
        self.dir = Path(clip.work_dir)
        self.size = working_size(clip.size, cfg.preprocess.height, cfg.preprocess.width,
                                 cfg.backbone.stride)
        self.geometry = GridGeometry(self.size[0], self.size[1], cfg.backbone.stride)
        self.hashes = stage_hashes(clip, cfg)

    # -- records ---------------------------------------------------------------------
    @property
    def record_path(self) -> Path:
        """``work/prep.json``."""
        return self.dir / "prep.json"

    def record(self) -> dict:
        """The contents of ``prep.json`` (an empty record when it does not exist)."""
        rec = load_optional_json(self.record_path)
        if not isinstance(rec, dict) or rec.get("version") != PREP_VERSION:
            return {"version": PREP_VERSION, "stages": {}}
        rec.setdefault("stages", {})
        return rec

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished with the current settings and its output exists."""
        entry = self.record()["stages"].get(stage)
        return (
            isinstance(entry, dict)
            and entry.get("hash") == self.hashes[stage]
            and (self.dir / _FILES[stage]).is_file()
        )

    def _mark(self, stage: str, seconds: float, info: dict | None = None) -> None:
        rec = self.record()
        rec["stages"][stage] = {
            "hash": self.hashes[stage],
            "seconds": round(seconds, 3),
            "finished": time.time(),
            **(info or {}),
        }
        rec["size"] = list(self.size)
        rec["grid"] = list(self.geometry.grid_hw)
        rec["num_frames"] = len(self.clip)
        write_json_atomic(self.record_path, rec)

    def _unmark(self, stage: str) -> None:
        """Forget ``stage`` before its outputs are rewritten (see the module docstring)."""
        rec = self.record()
        if rec["stages"].pop(stage, None) is not None:
            write_json_atomic(self.record_path, rec)

    def _require(self, stage: str) -> Path:
        path = self.dir / _FILES[stage]
        if not path.is_file():
            raise NotTrainedError(
                f"clip {self.clip.clip_id!r} has no {stage} yet; run `dino-tracker preprocess`"
            )
        return path

    # -- outputs ---------------------------------------------------------------------
    def frames(self) -> np.ndarray:
        """Working-resolution frames ``(T, H, W, 3)`` uint8 (memory map)."""
        return open_array(self._require("frames"))

    def features(self) -> np.ndarray:
        """DINO tokens ``(T, C, h, w)`` float16 (memory map)."""
        return open_array(self._require("features"))

    def flow_tracks(self) -> Any:
        """The chained flow tracks (:class:`~.flow.FlowTracks`, memory-mapped)."""
        from .flow import FlowTracks

        self._require("flow")
        return FlowTracks.load(self.dir)

    def masks(self) -> np.ndarray:
        """Foreground masks ``(T, H, W)`` uint8, non-zero = foreground (memory map)."""
        return open_array(self._require("masks"))

    def best_buddies(self) -> np.ndarray:
        """DINO best buddies ``(M, 7)`` float32 rows ``s, xs, ys, t, xt, yt, w`` (memory map)."""
        return open_array(self._require("best_buddies"))


def _run_frames(ws: Workspace, reporter: StageReporter) -> dict:
    clip = ws.clip
    h, w = ws.size
    with create_array(ws.dir / _FILES["frames"], (len(clip), h, w, 3), np.uint8) as out:
        for i, frame in enumerate(clip.read_frames(size=(h, w))):
            out[i] = frame
            reporter.update(i + 1)
    return {"shape": [len(clip), h, w, 3]}


def preprocess_clip(
    clip: Clip | str | Path,
    cfg: Config,
    *,
    device: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    start: float = 0.0,
    end: float = 1.0,
) -> Workspace:
    """Run the preprocessing stages of ``clip`` that are not done yet with ``cfg``.

    Args:
        clip: a :class:`~.clip.Clip` or its directory.
        cfg: full configuration.
        device: torch device for the ViT, RAFT and best buddies (default: ``cfg.device``).
        progress: receives reports of stages ``frames``, ``features``, ``flow``, ``masks``
            and ``best_buddies``, with fractions in [start, end].
        cancel: checked between steps; a cancelled stage leaves no partial output.
        start, end: this job's share of a larger job's progress range.

    Returns:
        The :class:`Workspace`.

    Raises:
        Cancelled: on request. Errors of the stages (e.g. missing weights) pass through.
    """
    if not isinstance(clip, Clip):
        clip = Clip.open(clip)
    ws = Workspace(clip, cfg)
    try:
        ws.dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(ws.dir, exc) from None
    sweep_temps(ws.dir)
    dev = resolve_device(device or cfg.device)
    total_w = sum(_WEIGHTS.values())
    ranges: dict[str, tuple[float, float]] = {}
    acc = 0.0
    for stage in STAGES:
        a = start + (end - start) * acc / total_w
        acc += _WEIGHTS[stage]
        ranges[stage] = (a, start + (end - start) * acc / total_w)

    def frames_stage(a: float, b: float) -> dict:
        rep = StageReporter(progress, "frames", len(clip), a, b, cancel)
        return _run_frames(ws, rep)

    def features_stage(a: float, b: float) -> dict:
        from .backbone import build_backbone, extract_features

        backbone = build_backbone(cfg.backbone, dev)
        try:
            feats = extract_features(
                ws.frames(), backbone, ws.dir / _FILES["features"],
                batch_frames=cfg.backbone.batch_frames, progress=progress, cancel=cancel,
                start=a, end=b,
            )
            return {"shape": list(feats.shape), "random_init": bool(backbone.random_init)}
        finally:
            del backbone
            _empty_cache(dev)

    def flow_stage(a: float, b: float) -> dict:
        from .flow import compute_flow_tracks, make_flow_estimator

        estimator = make_flow_estimator(cfg.preprocess.flow, dev)
        tracks = compute_flow_tracks(
            ws.frames(), cfg.preprocess.flow, ws.dir, estimator=estimator, progress=progress,
            cancel=cancel, start=a, end=b,
        )
        del estimator
        _empty_cache(dev)
        return {"tracks": int(tracks.num_tracks)}

    def masks_stage(a: float, b: float) -> dict:
        from .masks import compute_masks

        masks = compute_masks(
            ws.features(), cfg.preprocess.masks, ws.size, ws.dir / _FILES["masks"],
            progress=progress, cancel=cancel, start=a, end=b,
        )
        return {"foreground": float(np.mean(np.asarray(masks[:: max(len(masks) // 8, 1)]) > 0))}

    def best_buddies_stage(a: float, b: float) -> dict:
        from .best_buddies import compute_best_buddies

        rows = compute_best_buddies(
            ws.features(), ws.geometry, ws.flow_tracks(), cfg.preprocess.best_buddies,
            ws.dir / _FILES["best_buddies"],
            seed=cfg.train.seed, device=dev, progress=progress, cancel=cancel, start=a, end=b,
        )
        return {"rows": int(len(rows))}

    runners: dict[str, Callable[[float, float], dict]] = {
        "frames": frames_stage,
        "features": features_stage,
        "flow": flow_stage,
        "masks": masks_stage,
        "best_buddies": best_buddies_stage,
    }
    for stage in STAGES:
        a, b = ranges[stage]
        if ws.done(stage):
            logger.info("preprocess %s: %s done, skipped", clip.clip_id, stage)
            if progress is not None:
                progress(Progress(stage, b, 1, 1, message="done earlier"))
            continue
        if cancel is not None:
            cancel.check()
        logger.info("preprocess %s: %s ...", clip.clip_id, stage)
        ws._unmark(stage)
        t0 = time.monotonic()
        info = runners[stage](a, b)
        seconds = time.monotonic() - t0
        ws._mark(stage, seconds, info)
        logger.info("preprocess %s: %s finished in %.1f s %s", clip.clip_id, stage, seconds,
                    info)
    return ws


def _empty_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
