"""Per-clip self-supervised training (METHOD.md: Self-supervision, eq. 5, Optimisation).

One iteration draws ``flow_frames`` frames of the clip, computes their refined features
(Delta-DINO on the working frames plus the stored DINO tokens of only those frames, so
memory does not depend on the clip length) and the weighted sum of

* ``L_flow``: Huber loss of predictions against flow-chained positions (``flow_batch``
  directed links drawn from both directions of every flow link between the drawn
  frames, ``flow_fg_fraction`` of them from the foreground at their source point),
* ``L_dino-bb``: symmetric InfoNCE over the whole target grid for ``pair_frames`` frame
  pairs x ``pair_points`` stored DINO best buddies, ambiguity-weighted, sum / 2 norm,
* from ``refine_start``: ``L_rfn-bb`` (best buddies of the refined features) and
  ``L_rfn-cc`` (forward-backward predictions whose cycle error is at most
  ``cycle_threshold`` px, weighted ``cycle_decay ** error`` as in the reference),
* ``L_prior`` on the drawn frames.

All sampling happens on the host with one seeded ``numpy.random.Generator`` whose state
is saved in every checkpoint, so an interrupted run resumes onto the same trajectory.
Points are grouped by target frame for the head; there are no Python loops over points.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import save_model
from .clip import Clip
from .config import Config, resolve_device
from .errors import Cancelled, ConfigError
from .losses import (
    cycle_loss,
    dino_bb_loss,
    flow_loss,
    info_nce,
    prior_losses,
    refined_bb_loss,
)
from .model import DinoTrackerModel, gather_points, unit_channels
from .preprocess import Workspace, preprocess_clip
from .progress import CancelToken, ProgressCallback, StageReporter
from .storage import load_optional_json, save_torch_atomic, write_json_atomic

__all__ = [
    "CHECKPOINT_VERSION",
    "STATES",
    "TERMS",
    "TrainResult",
    "TrainStatus",
    "Trainer",
    "train_clip",
    "train_status",
    "train_workspace",
]

logger = logging.getLogger("dino_tracker.train")

CHECKPOINT_VERSION = 1
STATES = ("recorded", "training", "ready", "failed")
#: names of the loss terms reported by :meth:`Trainer.step` (besides ``total``)
TERMS = ("flow", "dino_bb", "rfn_bb", "rfn_cc", "prior_norm", "prior_angle")
# progress ranges of train_clip's job: preprocessing, training, caching
_PREP_END, _TRAIN_END = 0.2, 0.95
_FLOW_CACHE_PAIRS = 64
_LOG_EVERY_S = 10.0
_STATUS_EVERY_S = 1.0
_FINAL_LOSS_WINDOW = 20
_EPS = 1e-8


# -- results and status ---------------------------------------------------------------
@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train_clip`.

    Attributes:
        model_path: ``model/model.pt``.
        final_loss: mean total loss over the last (up to 20) iterations.
        seconds: wall time of the whole job (preprocessing, training, caching).
        iterations: total iterations the model has been trained for.
        resumed_from: iteration the run resumed from (0: started fresh).
    """

    model_path: Path
    final_loss: float
    seconds: float
    iterations: int
    resumed_from: int


@dataclass(frozen=True)
class TrainStatus:
    """Training state of a clip, from ``model/train.json``.

    Attributes:
        state: ``recorded``, ``training``, ``ready`` or ``failed``.
        message: human-readable detail.
        iteration, total: progress of the (last) run.
        loss: latest loss (NaN when unknown).
    """

    state: str
    message: str = ""
    iteration: int = 0
    total: int = 0
    loss: float = float("nan")


class _StatusFile:
    """Writes ``model/train.json`` atomically: state, iteration, total, loss, message, pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = -1e9

    def write(self, state: str, iteration: int = 0, total: int = 0,
              loss: float = float("nan"), message: str = "", *, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last < _STATUS_EVERY_S:
            return
        self._last = now
        write_json_atomic(self.path, {
            "state": state,
            "iteration": int(iteration),
            "total": int(total),
            "loss": float(loss) if math.isfinite(loss) else None,
            "message": message,
            "pid": os.getpid(),
            "proc": _process_tag(os.getpid()),
            "host": socket.gethostname(),
            "updated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        })


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def _process_tag(pid: int) -> str | None:
    """Boot id and start time of process ``pid`` (Linux; None elsewhere): a pid reused after
    a crash (a restarted container's node often gets the same pid) has another tag."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def _same_process(pid: int, tag: Any) -> bool:
    """Whether live ``pid`` is still the process that wrote ``tag`` (True when unknown)."""
    now = _process_tag(pid)
    return not isinstance(tag, str) or now is None or now == tag


def train_status(clip: Clip | str | Path) -> TrainStatus:
    """The training state of ``clip`` (a :class:`~.clip.Clip` or its directory).

    A ``training`` record whose process is gone (same host, dead pid, or a pid now used by
    another process) reads as ``failed`` with message ``interrupted at iteration k; train
    again to resume``. A malformed record reads as ``failed`` with a message saying so.
    """
    if not isinstance(clip, Clip):
        clip = Clip.open(clip)
    rec = load_optional_json(Path(clip.model_dir) / "train.json")
    if not isinstance(rec, dict) or rec.get("state") not in STATES:
        if (Path(clip.model_dir) / "model.pt").is_file():
            return TrainStatus("ready", "trained")
        return TrainStatus("recorded", "not trained yet")
    loss = rec.get("loss")
    try:
        status = TrainStatus(
            state=rec["state"],
            message=str(rec.get("message", "")),
            iteration=int(rec.get("iteration") or 0),
            total=int(rec.get("total") or 0),
            loss=float(loss) if isinstance(loss, (int, float)) else float("nan"),
        )
    except (TypeError, ValueError, OverflowError) as exc:
        return TrainStatus("failed", f"model/train.json is malformed ({exc}); train again")
    if status.state == "training" and rec.get("host") == socket.gethostname():
        pid = rec.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and (
            not _pid_alive(pid) or not _same_process(pid, rec.get("proc"))
        ):
            return dataclasses.replace(
                status, state="failed",
                message=f"interrupted at iteration {status.iteration}; train again to resume",
            )
    return status


# -- host-side helpers -----------------------------------------------------------------
class _StepDecay:
    """Learning-rate factor ``decay ** (step // every)`` (picklable for LambdaLR)."""

    def __init__(self, decay: float, every: int) -> None:
        self.decay = float(decay)
        self.every = max(int(every), 1)

    def __call__(self, step: int) -> float:
        return self.decay ** (step // self.every)


class _Constant:
    """Learning-rate factor 1 (picklable for LambdaLR)."""

    def __call__(self, step: int) -> float:
        return 1.0


class _PairIndex:
    """Index of the stored best-buddy rows by frame pair (s, t).

    Rows written by :func:`~.best_buddies.compute_best_buddies` are grouped by pair, so
    each pair is a contiguous slice of the memory map; other orders are sorted in RAM.
    """

    def __init__(self, rows: np.ndarray, num_frames: int) -> None:
        self.rows = rows
        m = len(rows)
        if m == 0:
            self.pair_s = self.pair_t = self.first = self.count = np.empty(0, np.int64)
            return
        key = np.asarray(rows[:, 0], np.int64) * num_frames + np.asarray(rows[:, 3], np.int64)
        change = np.flatnonzero(np.diff(key)) + 1
        starts = np.concatenate([[0], change])
        if len(np.unique(key[starts])) != len(starts):
            order = np.argsort(key, kind="stable")
            logger.info("best buddies are not grouped by frame pair; sorting %d rows in RAM", m)
            self.rows = np.asarray(rows)[order]
            key = key[order]
            starts = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1])
        self.first = starts.astype(np.int64)
        self.count = np.diff(np.concatenate([starts, [m]])).astype(np.int64)
        self.pair_s = key[starts] // num_frames
        self.pair_t = key[starts] % num_frames

    def __len__(self) -> int:
        return len(self.first)

    def rows_of(self, p: int) -> np.ndarray:
        """(n, 7) float32 rows of pair ``p``."""
        a = int(self.first[p])
        return np.asarray(self.rows[a : a + int(self.count[p])], dtype=np.float32)


def _split_sample(
    rng: np.random.Generator, fg: np.ndarray, n: int, fg_fraction: float
) -> np.ndarray:
    """Indices of up to ``n`` items, ``fg_fraction`` of them where ``fg`` (no repeats).

    When one side has too few items the other side fills in.
    """
    fg_idx = np.flatnonzero(fg)
    bg_idx = np.flatnonzero(~fg)
    n = min(n, len(fg))
    n_fg = min(int(round(n * fg_fraction)), len(fg_idx))
    n_bg = min(n - n_fg, len(bg_idx))
    n_fg = min(n - n_bg, len(fg_idx))
    out = np.concatenate([
        rng.choice(fg_idx, n_fg, replace=False) if n_fg else np.empty(0, np.int64),
        rng.choice(bg_idx, n_bg, replace=False) if n_bg else np.empty(0, np.int64),
    ])
    return out.astype(np.int64)


def _mask_at(mask: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Foreground flags (K,) of a (H, W) mask at working-pixel points (K, 2) (nearest)."""
    h, w = mask.shape
    x = np.clip(np.rint(xy[:, 0]).astype(np.intp), 0, w - 1)
    y = np.clip(np.rint(xy[:, 1]).astype(np.intp), 0, h - 1)
    return np.asarray(mask[y, x]) > 0


@dataclass
class _Points:
    """Host-side point set: source/target slots (N,) and positions (N, 2) working px."""

    src: np.ndarray
    tgt: np.ndarray
    xy_src: np.ndarray
    xy_tgt: np.ndarray | None = None
    weight: np.ndarray | None = None
    pair: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.src)


@dataclass
class _Maps:
    """One iteration's refined feature maps, in the layouts the loss terms read.

    ``flat`` (K*h*w, C) for bilinear point gathers; ``unit``: the K grids (C, h, w),
    L2-normalised once for every cosine map and InfoNCE denominator of the iteration, and
    split once (indexing a frame per use would add a full-size zero gradient per use).
    """

    flat: torch.Tensor
    unit: tuple[torch.Tensor, ...]
    grid_hw: tuple[int, int]

    @classmethod
    def of(cls, refined: torch.Tensor) -> _Maps:
        """The layouts of refined features ``(K, C, h, w)``."""
        return cls(refined.permute(0, 2, 3, 1).reshape(-1, refined.shape[1]),
                   unit_channels(refined).unbind(0), tuple(refined.shape[-2:]))


class _CosineMaps(torch.autograd.Function):
    """``q (Q, C) @ t (C, N)`` in the inputs' precision, its gradients in ``grad_dtype``.

    The forward stays fp32 (the refiner amplifies rounding of the maps); the backward's
    two products only carry gradients, which mixed precision computes in bf16 anyway (with
    the windowed head most of ``grad_out`` is zero). ``grad_dtype=None``: the inputs' dtype.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, t: torch.Tensor,
                grad_dtype: torch.dtype | None) -> torch.Tensor:
        ctx.save_for_backward(q, t)
        ctx.grad_dtype = grad_dtype
        return q @ t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        q, t = ctx.saved_tensors
        dt = ctx.grad_dtype or grad.dtype
        g = grad.to(dt)
        gq = (g @ t.to(dt).T).to(q.dtype) if ctx.needs_input_grad[0] else None
        gt = (q.to(dt).T @ g).to(t.dtype) if ctx.needs_input_grad[1] else None
        return gq, gt, None


# -- the trainer -----------------------------------------------------------------------
class Trainer:
    """Training state of one clip: model, optimiser, schedule, sampler RNG and history.

    Args:
        ws: a preprocessed workspace.
        cfg: configuration (model and train sections are used).
        device: torch device.
    """

    def __init__(self, ws: Workspace, cfg: Config, device: torch.device | str) -> None:
        from .backbone import resolve_precision

        self.ws = ws
        self.cfg = cfg
        self.tc = cfg.train
        self.device = torch.device(device)
        self.frames = ws.frames()
        self.features = ws.features()
        self.masks = ws.masks()
        self.tracks = ws.flow_tracks()
        self.num_frames = int(self.features.shape[0])
        self.bb = _PairIndex(ws.best_buddies(), self.num_frames)
        self.size = ws.size
        self.geometry = ws.geometry
        self.channels = int(self.features.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.tc.seed)
            model = DinoTrackerModel(self.channels, self.geometry, cfg.model)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.Adam([
            {"params": self.model.delta.parameters(), "lr": self.tc.lr},
            {"params": self.model.head.parameters(), "lr": self.tc.lr},
        ])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [_StepDecay(self.tc.lr_decay, self.tc.lr_decay_every), _Constant()]
        )
        self.amp_dtype = resolve_precision(self.tc.precision, self.device)
        #: run the head's refiner only around each cost-map peak (exact: the soft-argmax
        #: only weighs that disc); ``False`` runs it on whole maps (the reference's way)
        self.windowed_head = True
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        )
        self.rng = np.random.default_rng(self.tc.seed)
        self.iteration = 0
        self.resumed_from = 0
        self.history: list[float] = []
        self.last_terms: dict[str, float] = {}
        self._flow_cache: OrderedDict[tuple[int, int], tuple[np.ndarray, ...]] = OrderedDict()

    # -- state ---------------------------------------------------------------------
    def resume_key(self) -> dict:
        """The settings a checkpoint must share with this run to be resumed."""
        d = self.cfg.to_dict()
        for k in ("iterations", "checkpoint_every"):
            d["train"].pop(k, None)
        d["backbone"].pop("batch_frames", None)
        return {
            "backbone": d["backbone"], "preprocess": d["preprocess"], "model": d["model"],
            "train": d["train"], "prep": self.ws.hashes, "channels": self.channels,
            "size": list(self.size),
        }

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly (see :meth:`load_state_dict`)."""
        return {
            "version": CHECKPOINT_VERSION,
            "resume_key": self.resume_key(),
            "config": self.cfg.to_dict(),
            "iteration": self.iteration,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": self.rng.bit_generator.state,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (model, optimiser, schedule, RNG, history)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.rng.bit_generator.state = state["rng"]
        self.iteration = int(state["iteration"])
        self.history = [float(v) for v in state["history"]]

    def save_checkpoint(self, path: Path) -> None:
        """Write :meth:`state_dict` atomically to ``path``."""
        save_torch_atomic(self.state_dict(), path)

    def try_resume(self, path: Path) -> bool:
        """Load the checkpoint at ``path`` if it exists and matches this run's settings."""
        if not path.is_file():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: start fresh
            logger.warning("checkpoint %s is unreadable (%s); starting fresh", path,
                           type(exc).__name__)
            return False
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            logger.warning("checkpoint %s has another format; starting fresh", path)
            return False
        if state.get("resume_key") != self.resume_key():
            logger.warning("checkpoint %s was made with other settings; starting fresh", path)
            return False
        self.load_state_dict(state)
        self.resumed_from = self.iteration
        logger.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    # -- data ----------------------------------------------------------------------
    def _upload(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _flow_pair(self, s: int, t: int) -> tuple[np.ndarray, ...]:
        """Cached flow links between frames s < t: ``(xy_s, xy_t, fg_s, fg_t)``."""
        key = (s, t)
        hit = self._flow_cache.get(key)
        if hit is not None:
            self._flow_cache.move_to_end(key)
            return hit
        xy_s, xy_t, _ = self.tracks.pairs(s, t)
        xy_s = np.asarray(xy_s, np.float32)
        xy_t = np.asarray(xy_t, np.float32)
        val = (xy_s, xy_t, _mask_at(self.masks[s], xy_s), _mask_at(self.masks[t], xy_t))
        self._flow_cache[key] = val
        if len(self._flow_cache) > _FLOW_CACHE_PAIRS:
            self._flow_cache.popitem(last=False)
        return val

    # -- sampling (host, numpy Generator) -------------------------------------------
    def _sample_frames(self, rng: np.random.Generator, use_bb: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Frames of one iteration (sorted) and the best-buddy pairs among them.

        Up to ``min(pair_frames, flow_frames // 2)`` stored best-buddy pairs seed the
        frame set (pairs are bounded per frame, so random frames would rarely hold one);
        random frames fill the rest. ``use_bb=False``: uniformly random frames only.
        """
        tc = self.tc
        k = min(tc.flow_frames, self.num_frames)
        chosen: list[int] = []
        n_bb = len(self.bb) if use_bb and tc.w_dino_bb > 0 else 0
        if n_bb:
            seeds = rng.choice(n_bb, min(tc.pair_frames, k // 2, n_bb), replace=False)
            for p in seeds:
                new = [f for f in (int(self.bb.pair_s[p]), int(self.bb.pair_t[p]))
                       if f not in chosen]
                if len(chosen) + len(new) <= k:
                    chosen += new
        rest = np.setdiff1d(np.arange(self.num_frames), chosen)
        fill = rng.choice(rest, k - len(chosen), replace=False) if k > len(chosen) else []
        frames = np.sort(np.concatenate([np.asarray(chosen, np.int64),
                                         np.asarray(fill, np.int64)]))
        if not n_bb:
            return frames, np.empty(0, np.int64)
        inside = np.flatnonzero(np.isin(self.bb.pair_s, frames) & np.isin(self.bb.pair_t, frames))
        pairs = rng.choice(inside, min(tc.pair_frames, len(inside)), replace=False)
        return frames, np.sort(pairs.astype(np.int64))

    def _sample_flow(self, rng: np.random.Generator, frames: np.ndarray) -> _Points:
        """``flow_batch`` directed flow links between the iteration's frames."""
        blocks = []
        for i in range(len(frames)):
            for j in range(i + 1, len(frames)):
                xy_i, xy_j, fg_i, fg_j = self._flow_pair(int(frames[i]), int(frames[j]))
                if len(xy_i):
                    blocks.append((i, j, xy_i, xy_j, fg_i))
                    blocks.append((j, i, xy_j, xy_i, fg_j))
        if not blocks:
            return _Points(*(np.empty(0, np.int64),) * 2, np.empty((0, 2), np.float32),
                           np.empty((0, 2), np.float32))
        sizes = np.array([len(b[2]) for b in blocks])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        fg = np.concatenate([b[4] for b in blocks])
        pick = np.sort(_split_sample(rng, fg, self.tc.flow_batch, self.tc.flow_fg_fraction))
        block = np.searchsorted(offsets, pick, side="right") - 1
        local = pick - offsets[block]
        src = np.array([b[0] for b in blocks])[block]
        tgt = np.array([b[1] for b in blocks])[block]
        xy_s = np.empty((len(pick), 2), np.float32)
        xy_t = np.empty((len(pick), 2), np.float32)
        for b in np.unique(block):  # loop over frame pairs, not points
            sel = block == b
            xy_s[sel] = blocks[b][2][local[sel]]
            xy_t[sel] = blocks[b][3][local[sel]]
        return _Points(src, tgt, xy_s, xy_t)

    def _sample_bb(self, rng: np.random.Generator, frames: np.ndarray,
                   pairs: np.ndarray) -> _Points:
        """``pair_points`` stored DINO best buddies for each chosen pair (70 % foreground)."""
        parts = []
        slot = {int(f): i for i, f in enumerate(frames)}
        for n, p in enumerate(pairs):
            rows = self.bb.rows_of(int(p))
            if not len(rows):
                continue
            s = int(self.bb.pair_s[p])
            fg = _mask_at(self.masks[s], rows[:, 1:3])
            rows = rows[_split_sample(rng, fg, self.tc.pair_points, self.tc.pair_fg_fraction)]
            parts.append((slot[s], slot[int(self.bb.pair_t[p])], rows, n))
        if not parts:
            return _Points(np.empty(0, np.int64), np.empty(0, np.int64),
                           np.empty((0, 2), np.float32), np.empty((0, 2), np.float32),
                           np.empty(0, np.float32), np.empty(0, np.int64))
        return _Points(
            np.concatenate([np.full(len(r), s) for s, _, r, _ in parts]),
            np.concatenate([np.full(len(r), t) for _, t, r, _ in parts]),
            np.concatenate([r[:, 1:3] for *_, r, _ in parts]).astype(np.float32),
            np.concatenate([r[:, 4:6] for *_, r, _ in parts]).astype(np.float32),
            np.concatenate([r[:, 6] for *_, r, _ in parts]).astype(np.float32),
            np.concatenate([np.full(len(r), n) for *_, r, n in parts]),
        )

    def _sample_slot_pairs(self, rng: np.random.Generator, k: int) -> list[tuple[int, int]]:
        """``pair_frames`` ordered pairs of distinct slots among ``k`` (distinct if possible)."""
        if k < 2:
            return []
        all_pairs = [(a, b) for a in range(k) for b in range(k) if a != b]
        n = self.tc.pair_frames
        idx = rng.choice(len(all_pairs), n, replace=n > len(all_pairs))
        return [all_pairs[int(i)] for i in idx]

    def _sample_cycle(self, rng: np.random.Generator, frames: np.ndarray) -> _Points:
        """``pair_points`` integer pixels per slot pair for the cycle term (70 % fg)."""
        h, w = self.size
        src, tgt, xy = [], [], []
        for a, b in self._sample_slot_pairs(rng, len(frames)):
            fg = np.asarray(self.masks[int(frames[a])]).reshape(-1) > 0
            pix = _split_sample(rng, fg, self.tc.pair_points, self.tc.pair_fg_fraction)
            src.append(np.full(len(pix), a))
            tgt.append(np.full(len(pix), b))
            xy.append(np.stack([pix % w, pix // w], 1).astype(np.float32))
        if not src:
            return _Points(np.empty(0, np.int64), np.empty(0, np.int64),
                           np.empty((0, 2), np.float32))
        return _Points(np.concatenate(src), np.concatenate(tgt), np.concatenate(xy))

    # -- model helpers ---------------------------------------------------------------
    def _locate(self, cost: torch.Tensor) -> torch.Tensor:
        """The head on cosine maps ``(B, Q, h, w)``: windowed (exact, faster) or full-map."""
        if self.windowed_head:
            return self.model.head.locate_windowed(cost)
        return self.model.head.locate(cost)

    def _predict(self, maps: _Maps, src: np.ndarray, xy: torch.Tensor, tgt: np.ndarray
                 ) -> torch.Tensor:
        """Predictions (N, 2) working px of points ``xy`` of slots ``src`` in slots ``tgt``.

        Points are grouped by target slot (one head call per frame, none per point).
        """
        n = len(src)
        if n == 0:
            return xy.new_zeros((0, 2))
        order = np.argsort(tgt, kind="stable")
        counts = np.bincount(tgt, minlength=len(maps.unit))
        perm = self._upload(order)
        q = gather_points(maps.flat, maps.grid_hw, self._upload(src[order]), xy[perm],
                          self.geometry)
        qn = F.normalize(q, dim=-1, eps=_EPS)
        outs, off = [], 0
        for k, c in enumerate(counts.tolist()):
            if c:
                # fp32 cosine maps even under autocast: the refiner's sum-normalised kernels
                # amplify bf16 rounding of the maps into position errors
                with torch.autocast(self.device.type, enabled=False):
                    unit = maps.unit[k].float()
                    cost = _CosineMaps.apply(qn[off : off + c].float(), unit.flatten(1),
                                             self.amp_dtype).reshape(c, *unit.shape[1:])
                outs.append(self._locate(cost[None])[0])
                off += c
        pred = torch.cat(outs)
        return torch.empty_like(pred).index_copy(0, perm, pred)

    def _contrastive(self, maps: _Maps, src: np.ndarray, tgt: np.ndarray,
                     xy_src: torch.Tensor, xy_tgt: torch.Tensor, pair_ids: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric InfoNCE terms ``(l_st, l_ts)`` (N,) of point pairs, pair by pair.

        Points of one frame pair are contiguous (``pair_ids`` non-decreasing).
        """
        q_s = gather_points(maps.flat, maps.grid_hw, self._upload(src), xy_src, self.geometry)
        q_t = gather_points(maps.flat, maps.grid_hw, self._upload(tgt), xy_tgt, self.geometry)
        l_st, l_ts = [], []
        bounds = np.flatnonzero(np.diff(pair_ids)) + 1
        for a, b in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(src)]]),
                        strict=True):
            x, y = info_nce(q_s[a:b], q_t[a:b], maps.unit[int(src[a])],
                            maps.unit[int(tgt[a])], self.tc.temperature)
            l_st.append(x)
            l_ts.append(y)
        return torch.cat(l_st), torch.cat(l_ts)

    def _refined_bb_term(self, rng: np.random.Generator, frames: np.ndarray,
                         maps: _Maps) -> torch.Tensor | None:
        """L_rfn-bb on best buddies of the refined features of ``pair_frames`` slot pairs."""
        from .best_buddies import refined_best_buddies

        src, tgt, xs, xt, ws, pair = [], [], [], [], [], []
        for n, (a, b) in enumerate(self._sample_slot_pairs(rng, len(frames))):
            with torch.autocast(self.device.type, enabled=False):
                xa, xb, w = refined_best_buddies(maps.unit[a].detach().float(),
                                                 maps.unit[b].detach().float(), self.geometry,
                                                 self.cfg.preprocess.best_buddies)
            if xa.shape[0] == 0:
                continue
            fg = _mask_at(self.masks[int(frames[a])], xa.cpu().numpy())
            pick = _split_sample(rng, fg, self.tc.pair_points, self.tc.pair_fg_fraction)
            sel = self._upload(pick)
            src.append(np.full(len(pick), a))
            tgt.append(np.full(len(pick), b))
            xs.append(xa[sel])
            xt.append(xb[sel])
            ws.append(w[sel])
            pair.append(np.full(len(pick), n))
        if not src:
            return None
        l_st, l_ts = self._contrastive(maps, np.concatenate(src), np.concatenate(tgt),
                                       torch.cat(xs), torch.cat(xt), np.concatenate(pair))
        return refined_bb_loss(l_st, l_ts, torch.cat(ws), self.tc.rfn_bb_norm)

    def _amp(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _load_frames(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = self._upload(self.frames[frames]).permute(0, 3, 1, 2).float().div_(255.0)
        dino = self._upload(self.features[frames]).float()
        return images, dino

    # -- one iteration ----------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """Run one training iteration; returns the loss terms and ``total`` (floats)."""
        tc = self.tc
        rng = self.rng
        it = self.iteration
        refine_on = it >= tc.refine_start
        frames, bb_pairs = self._sample_frames(rng)
        flow_pts = self._sample_flow(rng, frames) if tc.w_flow > 0 else None
        bb_pts = self._sample_bb(rng, frames, bb_pairs) if len(bb_pairs) else None
        images, dino = self._load_frames(frames)

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        with self._amp():
            refined = self.model.refine(images, dino)
            maps = _Maps.of(refined)
            if flow_pts is not None and len(flow_pts):
                pred = self._predict(maps, flow_pts.src, self._upload(flow_pts.xy_src),
                                     flow_pts.tgt)
                terms["flow"] = flow_loss(pred, self._upload(flow_pts.xy_tgt), self.size,
                                          tc.huber_delta)
            if bb_pts is not None and len(bb_pts):
                l_st, l_ts = self._contrastive(
                    maps, bb_pts.src, bb_pts.tgt, self._upload(bb_pts.xy_src),
                    self._upload(bb_pts.xy_tgt), bb_pts.pair,
                )
                terms["dino_bb"] = dino_bb_loss(l_st, l_ts, self._upload(bb_pts.weight),
                                                tc.dino_bb_norm)
            if refine_on and tc.w_rfn_bb > 0:
                rfn = self._refined_bb_term(rng, frames, maps)
                if rfn is not None:
                    terms["rfn_bb"] = rfn
            if refine_on and tc.w_rfn_cc > 0:
                cyc = self._sample_cycle(rng, frames)
                if len(cyc):
                    terms["rfn_cc"] = self._cycle_term(maps, cyc)
            if tc.w_prior > 0:
                terms["prior_norm"], terms["prior_angle"] = prior_losses(refined, dino)

        weights = {"flow": tc.w_flow, "dino_bb": tc.w_dino_bb, "rfn_bb": tc.w_rfn_bb,
                   "rfn_cc": tc.w_rfn_cc, "prior_norm": tc.w_prior, "prior_angle": tc.w_prior}
        names = [k for k in TERMS if k in terms]
        total = sum((weights[k] * terms[k] for k in names), refined.new_zeros(()))
        if total.requires_grad:
            if self.scaler is not None:
                self.scaler.scale(total).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                total.backward()
                self.optimizer.step()
        self.scheduler.step()
        values = torch.stack([total.detach().float()] + [terms[k].detach().float()
                                                         for k in names]).tolist()
        self.iteration += 1
        self.history.append(values[0])
        self.last_terms = dict(zip(names, values[1:], strict=True))
        return {"total": values[0], **self.last_terms}

    def _cycle_term(self, maps: _Maps, cyc: _Points) -> torch.Tensor:
        """L_rfn-cc on cycle-consistent refined predictions.

        The forward prediction s -> t is the target of the forward term and is computed from
        the same features, so that term and its gradient are exactly 0 (as in the
        reference); only the backward prediction t -> s is differentiated, and its value is
        also the cycle's end point (error, keep mask, weight ``cycle_decay ** error``).
        """
        xy_s = self._upload(cyc.xy_src)
        with torch.no_grad():
            fwd = self._predict(maps, cyc.src, xy_s, cyc.tgt)
        back = self._predict(maps, cyc.tgt, fwd, cyc.src)
        with torch.no_grad():
            err = (back.float() - xy_s).norm(dim=-1)
            weight = torch.where(err <= self.tc.cycle_threshold,
                                 self.tc.cycle_decay ** err, torch.zeros_like(err))
        return cycle_loss(fwd, fwd, back, xy_s, weight, self.size, self.tc.huber_delta)

    # -- evaluation -----------------------------------------------------------------
    @torch.no_grad()
    def flow_eval(self, batches: int = 4, seed: int = 12345) -> float:
        """Mean L_flow over ``batches`` fixed batches (own RNG; eval mode; no side effects)."""
        rng = np.random.default_rng(seed)
        was_training = self.model.training
        self.model.eval()
        losses = []
        for _ in range(batches):
            frames, _ = self._sample_frames(rng, use_bb=False)
            pts = self._sample_flow(rng, frames)
            if not len(pts):
                continue
            images, dino = self._load_frames(frames)
            maps = _Maps.of(self.model.refine(images, dino))
            pred = self._predict(maps, pts.src, self._upload(pts.xy_src), pts.tgt)
            losses.append(float(flow_loss(pred, self._upload(pts.xy_tgt), self.size,
                                          self.tc.huber_delta)))
        self.model.train(was_training)
        return float(np.mean(losses)) if losses else float("nan")

    def final_loss(self) -> float:
        """Mean total loss over the last (up to 20) iterations (NaN before any)."""
        tail = self.history[-_FINAL_LOSS_WINDOW:]
        return float(np.mean(tail)) if tail else float("nan")


# -- the loop ----------------------------------------------------------------------------
def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _run_training(
    trainer: Trainer,
    total: int,
    *,
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
    start: float,
    end: float,
) -> None:
    """The training loop of :func:`train_workspace` on an existing :class:`Trainer`."""
    ws, cfg = trainer.ws, trainer.cfg
    model_dir = Path(ws.clip.model_dir)
    ckpt = model_dir / "checkpoint.pt"
    status = _StatusFile(model_dir / "train.json")
    first = trainer.iteration
    reporter = StageReporter(progress, "training", total, start, end, None, min_interval=0.25,
                             initial=first)
    every = int(cfg.train.checkpoint_every)
    logger.info(
        "training %s: iterations %d..%d, %d frames, working size %dx%d, grid %dx%d, C=%d, "
        "%d best-buddy pairs, device %s, precision %s",
        ws.clip.clip_id, first, total, trainer.num_frames, ws.size[1], ws.size[0],
        ws.geometry.grid_hw[1], ws.geometry.grid_hw[0], trainer.channels, len(trainer.bb),
        trainer.device, trainer.amp_dtype or "fp32",
    )
    loss = trainer.final_loss()
    status.write("training", first, total, loss, "training")
    t0 = time.monotonic()
    last_log = t0
    try:
        while trainer.iteration < total:
            it = trainer.iteration
            if cancel is not None and cancel.cancelled:
                trainer.save_checkpoint(ckpt)
                msg = f"cancelled at iteration {it} of {total}; train again to resume"
                status.write("recorded", it, total, loss, msg)
                logger.info("%s: %s", ws.clip.clip_id, msg)
                raise Cancelled(msg)
            values = trainer.step()
            loss = values["total"]
            done = trainer.iteration
            reporter.update(done, loss=loss, message=f"loss {loss:.4g}")
            status.write("training", done, total, loss, "training", force=False)
            if every and done % every == 0 and done < total:
                trainer.save_checkpoint(ckpt)
            now = time.monotonic()
            if now - last_log >= _LOG_EVERY_S or done == total or done == first + 1:
                last_log = now
                rate = (done - first) / max(now - t0, 1e-9)
                terms = " ".join(f"{k} {v:.4g}" for k, v in trainer.last_terms.items())
                logger.info("iteration %d/%d loss %.4g (%s) %.2f it/s, ETA %s", done, total,
                            loss, terms, rate, _fmt_seconds((total - done) / rate))
        trainer.save_checkpoint(ckpt)
        seconds = time.monotonic() - t0
        save_model(
            model_dir / "model.pt", trainer.model, cfg, image_size=ws.size,
            orig_size=ws.clip.size,
            extra={"iterations": trainer.iteration, "final_loss": trainer.final_loss(),
                   "train_seconds": seconds, "resumed_from": first},
        )
    except Cancelled:
        raise
    except Exception as exc:
        status.write("failed", trainer.iteration, total, loss, _first_line(exc))
        raise
    reporter.update(total, loss=trainer.final_loss())


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def train_workspace(
    ws: Workspace,
    cfg: Config,
    *,
    iterations: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    resume: bool = True,
    device: str | None = None,
    start: float = 0.0,
    end: float = 1.0,
) -> Trainer:
    """Train on a preprocessed workspace; write checkpoints, ``model.pt`` and ``train.json``.

    Args:
        ws: the clip's preprocessed :class:`~.preprocess.Workspace`.
        cfg: configuration.
        iterations: total iterations (``None`` or 0: ``cfg.train.iterations``).
        progress: stage ``training`` reports (iteration, total, loss, rate), at least
            every 0.25 s.
        cancel: checked before every iteration; on cancellation a checkpoint is written,
            ``train.json`` goes back to ``recorded`` and :class:`Cancelled` is raised.
        resume: continue from ``model/checkpoint.pt`` when its settings match.
        device: torch device (default ``cfg.device``).
        start, end: this stage's share of a larger job's progress range.

    Returns:
        The :class:`Trainer` after the last iteration (``model/model.pt`` is written).
    """
    total = _total_iterations(iterations, cfg)
    trainer = Trainer(ws, cfg, resolve_device(device or cfg.device))
    _prepare(trainer, resume)
    _run_training(trainer, total, progress=progress, cancel=cancel, start=start, end=end)
    return trainer


def _total_iterations(iterations: int | None, cfg: Config) -> int:
    """``iterations`` (None or 0: ``cfg.train.iterations``), checked like the setting."""
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(
            iterations, int) or not 0 <= iterations <= 10_000_000):
        raise ConfigError(f"iterations must be an integer in [0, 10000000] (0: the configured "
                          f"default), got {iterations!r}")
    return int(iterations or cfg.train.iterations)


def _prepare(trainer: Trainer, resume: bool) -> None:
    ckpt = Path(trainer.ws.clip.model_dir) / "checkpoint.pt"
    if resume:
        trainer.try_resume(ckpt)
    elif ckpt.is_file():
        logger.info("resume disabled: starting fresh (overwriting %s)", ckpt)


def train_clip(
    clip: Clip | str | Path,
    cfg: Config,
    *,
    iterations: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    resume: bool = True,
) -> TrainResult:
    """Preprocess (missing stages only), train, and cache refined features for a clip.

    Progress: preprocessing stages in [0, 0.2], ``training`` in [0.2, 0.95], ``caching``
    in [0.95, 1]. ``model/train.json`` follows the job (``training`` -> ``ready``; back to
    ``recorded`` on cancellation; ``failed`` with the reason on an error).

    Args:
        clip: a :class:`~.clip.Clip` or its directory.
        cfg: configuration.
        iterations: total iterations (``None`` or 0: ``cfg.train.iterations``).
        progress: progress callback for the whole job.
        cancel: cooperative cancellation (checked between steps and iterations).
        resume: continue from ``model/checkpoint.pt`` when its settings match.

    Returns:
        :class:`TrainResult`.

    Raises:
        Cancelled: on request (a checkpoint is kept when training had started).
        DinoTrackerError: user-caused problems (missing weights, bad clip, ...).
    """
    if not isinstance(clip, Clip):
        clip = Clip.open(clip)
    total = _total_iterations(iterations, cfg)
    dev = resolve_device(cfg.device)
    model_dir = Path(clip.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    status = _StatusFile(model_dir / "train.json")
    t0 = time.monotonic()
    trainer: Trainer | None = None
    try:
        status.write("training", 0, total, message="preprocessing")
        ws = preprocess_clip(clip, cfg, device=dev, progress=progress, cancel=cancel,
                             start=0.0, end=_PREP_END)
        trainer = Trainer(ws, cfg, dev)
        _prepare(trainer, resume)
        _run_training(trainer, total, progress=progress, cancel=cancel, start=_PREP_END,
                      end=_TRAIN_END)
        loss = trainer.final_loss()
        status.write("training", total, total, loss, "caching refined features")
        from .predictor import build_refined_cache

        build_refined_cache(clip, device=dev, progress=progress, cancel=cancel,
                            start=_TRAIN_END, end=1.0)
    except Cancelled as exc:
        it = trainer.iteration if trainer is not None else 0
        status.write("recorded", it, total, message=str(exc))
        raise
    except Exception as exc:
        it = trainer.iteration if trainer is not None else 0
        status.write("failed", it, total, message=_first_line(exc))
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit: resumable from the checkpoint
        it = trainer.iteration if trainer is not None else 0
        status.write("recorded", it, total,
                     message=f"interrupted at iteration {it}; train again to resume")
        raise
    seconds = time.monotonic() - t0
    message = f"trained {total} iterations in {_fmt_seconds(seconds)}, loss {loss:.4g}"
    status.write("ready", total, total, loss, message)
    logger.info("%s: %s", clip.clip_id, message)
    return TrainResult(
        model_path=model_dir / "model.pt",
        final_loss=loss,
        seconds=seconds,
        iterations=trainer.iteration,
        resumed_from=trainer.resumed_from,
    )
