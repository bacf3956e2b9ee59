"""Optical-flow supervision (Omega_flow, METHOD.md "Self-supervision" 1).

Dense flow tracks are built by chaining consecutive forward flows, ended by a
forward/backward cycle check, restarted where no track passes, and cut where they disagree
with a direct (long-range) flow. All positions are working pixels with OpenCV's convention
(the centre of the top-left pixel is (0, 0); an image spans [-0.5, W - 0.5]).

Cost is linear in the clip length: 2 (T - 1) consecutive flow calls plus 2 per sampled
direct pair, at most ``direct_pairs_per_frame`` per source frame (the reference computes
all T (T - 1) / 2 forward pairs and their inverses). Only the current flows and the active
tracks are held in memory; points stream to a temporary file in ``out_dir`` and are
assembled into the final memory-mapped arrays at the end.

Files written to ``out_dir`` (see :class:`FlowTracks`)::

    flow_starts.npy   (N,) int32    first frame of each track (ascending)
    flow_lengths.npy  (N,) int32    number of frames of each track (>= 2)
    flow_offsets.npy  (N,) int64    index of each track's first point in flow_points
    flow_points.npy   (P, 2) float32  positions (x, y), track by track, frame by frame
    flow_meta.json    num_frames, height, width, counts and the FlowConfig; written last
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np

from .config import FlowConfig
from .errors import ClipError, ConfigError, WeightsError
from .progress import CancelToken, ProgressCallback, StageReporter
from .storage import create_array, open_array, read_json, temp_file, write_json_atomic

__all__ = [
    "DisFlow",
    "FarnebackFlow",
    "FlowEstimator",
    "FlowTracks",
    "RaftFlow",
    "compute_flow_tracks",
    "cycle_mask",
    "direct_targets",
    "make_flow_estimator",
    "point_consistency",
    "raft_weights_path",
    "sample_bilinear",
    "warp_points",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

_FILES = ("flow_starts.npy", "flow_lengths.npy", "flow_offsets.npy", "flow_points.npy")
_META = "flow_meta.json"
_RAFT_MIN = 128  # RAFT needs inputs of at least 8 * 16 px
_CHUNK = 1 << 20  # records per chunk when assembling the output
_REC = np.dtype([("id", np.int64), ("x", np.float32), ("y", np.float32)])
_END = np.dtype([("id", np.int64), ("start", np.int32), ("length", np.int32)])


# -- flow estimators ----------------------------------------------------------------------
class FlowEstimator(abc.ABC):
    """Dense optical flow between two RGB frames of the same size."""

    @abc.abstractmethod
    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Flow from ``a`` to ``b``.

        Args:
            a, b: (H, W, 3) uint8 RGB frames.

        Returns:
            (H, W, 2) float32 flow (dx, dy): pixel p of ``a`` moves to p + flow[p] in ``b``.
        """

    def pair(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forward (a -> b) and backward (b -> a) flow; backends may batch the two."""
        return self(a, b), self(b, a)


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(img, dtype=np.uint8), cv2.COLOR_RGB2GRAY)


class DisFlow(FlowEstimator):
    """OpenCV DIS optical flow (PRESET_MEDIUM) on grayscale frames; needs no weights.

    Args:
        finest_scale: finest pyramid level DIS refines to. PRESET_MEDIUM stops at 1 (half
            resolution); the default 0 refines at full resolution, which on a sub-pixel
            affine test clip lowers the error of 10-frame chained tracks from 0.40 to
            0.26 px at about 3x the time (0.10 s per 476 x 854 pair on 2 CPU cores).
    """

    def __init__(self, finest_scale: int = 0) -> None:
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self._dis.setFinestScale(int(finest_scale))

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        flow = self._dis.calc(_gray(a), _gray(b), None)
        return np.asarray(flow, dtype=np.float32)


class FarnebackFlow(FlowEstimator):
    """OpenCV Farneback optical flow on grayscale frames; needs no weights."""

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        flow = cv2.calcOpticalFlowFarneback(
            _gray(a), _gray(b), None, pyr_scale=0.5, levels=5, winsize=15, iterations=3,
            poly_n=5, poly_sigma=1.2, flags=0,
        )
        return np.asarray(flow, dtype=np.float32)


def raft_weights_path(cfg: FlowConfig) -> Path:
    """Where RAFT-large weights are read from: ``cfg.raft_weights``, else torchvision's cache.

    The cache file is the one torchvision downloads for ``Raft_Large_Weights.DEFAULT``
    (``<torch hub dir>/checkpoints/raft_large_C_T_SKHT_V2-ff5fadd5.pth``).
    """
    if cfg.raft_weights:
        return Path(cfg.raft_weights).expanduser()
    import torch
    from torchvision.models.optical_flow import Raft_Large_Weights

    name = Raft_Large_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / name


class RaftFlow(FlowEstimator):
    """torchvision RAFT-large with ``iters`` recurrent updates, on any torch device.

    Frames are scaled to [-1, 1] (RAFT's training normalisation) and padded (replicate,
    right and bottom) to multiples of 8, and to at least 128 px (the smallest input
    RAFT's correlation pyramid accepts); the flow is cropped back.

    Args:
        weights: a RAFT-large state-dict file (torchvision's format).
        iters: recurrent refinement updates (the reference uses 24).
        device: torch device.

    Raises:
        WeightsError: the file is missing or does not hold RAFT-large weights.
    """

    def __init__(self, weights: PathLike, iters: int = 24, device: Any = "cpu") -> None:
        import torch
        from torchvision.models.optical_flow import raft_large

        path = Path(weights)
        if not path.is_file():
            raise WeightsError(
                f"RAFT weights not found at {path}; set preprocess.flow.raft_weights to a "
                "raft_large .pth file or use preprocess.flow.backend=dis"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = raft_large(weights=None, progress=False)
            model.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, ValueError, OSError) as exc:
            raise WeightsError(
                f"{path} does not hold RAFT-large weights ({type(exc).__name__}); use "
                "torchvision's raft_large checkpoint or preprocess.flow.backend=dis"
            ) from exc
        self.device = torch.device(device)
        self.iters = int(iters)
        self.model = model.to(self.device).eval()

    def _prep(self, img: np.ndarray) -> Any:
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(img)).to(self.device)
        x = x.permute(2, 0, 1)[None].float() / 127.5 - 1.0
        h, w = x.shape[-2:]
        ph, pw = max(_RAFT_MIN, h + (-h) % 8), max(_RAFT_MIN, w + (-w) % 8)
        return F.pad(x, (0, pw - w, 0, ph - h), mode="replicate")

    def _run(self, a: Any, b: Any, hw: tuple[int, int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            flow = self.model(a, b, num_flow_updates=self.iters)[-1]
        flow = flow[:, :, : hw[0], : hw[1]].permute(0, 2, 3, 1)
        return flow.float().cpu().numpy()

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._run(self._prep(a), self._prep(b), a.shape[:2])[0]

    def pair(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        ta, tb = self._prep(a), self._prep(b)
        both = self._run(torch.cat([ta, tb]), torch.cat([tb, ta]), a.shape[:2])
        return both[0], both[1]


def make_flow_estimator(cfg: FlowConfig, device: Any = "cpu") -> FlowEstimator:
    """The flow backend ``cfg.backend`` selects (``dis``, ``farneback`` or ``raft``).

    Args:
        cfg: flow settings.
        device: torch device for RAFT (ignored by the OpenCV backends); ``auto`` allowed.

    Raises:
        WeightsError: ``raft`` without its weights file.
        ConfigError: an unknown backend.
    """
    if cfg.backend == "dis":
        return DisFlow()
    if cfg.backend == "farneback":
        return FarnebackFlow()
    if cfg.backend == "raft":
        if isinstance(device, str):
            from .config import resolve_device

            device = resolve_device(device)
        return RaftFlow(raft_weights_path(cfg), cfg.raft_iters, device)
    raise ConfigError(f"preprocess.flow.backend: unknown {cfg.backend!r}; use dis, farneback "
                      "or raft")


# -- sampling and consistency -------------------------------------------------------------
def sample_bilinear(field: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``field`` at points; positions outside are clamped to the border.

    Args:
        field: (H, W, C) array.
        xy: (K, 2) positions (x, y) in pixels.

    Returns:
        (K, C) float32 samples.
    """
    h, w = field.shape[:2]
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    x = np.clip(xy[:, 0], 0.0, w - 1.0)
    y = np.clip(xy[:, 1], 0.0, h - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.intp), max(w - 2, 0))
    y0 = np.minimum(np.floor(y).astype(np.intp), max(h - 2, 0))
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    f = field.reshape(h, w, -1)
    top = f[y0, x0] * (1.0 - fx) + f[y0, x1] * fx
    bottom = f[y1, x0] * (1.0 - fx) + f[y1, x1] * fx
    return (top * (1.0 - fy) + bottom * fy).astype(np.float32)


def warp_points(points: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Move points by a flow field sampled bilinearly: ``p + flow(p)``.

    Args:
        points: (K, 2) positions (x, y) in the flow's source frame.
        flow: (H, W, 2) flow.

    Returns:
        (K, 2) float32 positions in the flow's target frame.
    """
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    return points + sample_bilinear(flow, points)


def _inside(xy: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Whether points lie in the image extent [-0.5, W - 0.5] x [-0.5, H - 0.5]."""
    h, w = hw
    return (
        (xy[:, 0] >= -0.5) & (xy[:, 0] <= w - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= h - 0.5)
    )


def _covered(bwd: np.ndarray) -> np.ndarray:
    """Pixels of frame a that some pixel of frame b warps into along ``bwd`` (b -> a).

    Every pixel q of b marks the four pixels around q + bwd(q) (floor and floor + 1 in x
    and y); a pixel of a left unmarked has no pixel of b within 1 px in x and y mapping to
    it, i.e. it is occluded in b (or leaves the frame).

    Returns:
        (H, W) bool.
    """
    h, w = bwd.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    tx = (xs + bwd[..., 0]).ravel()
    ty = (ys + bwd[..., 1]).ravel()
    ok = np.isfinite(tx) & np.isfinite(ty)
    x0 = np.floor(tx[ok]).astype(np.intp)
    y0 = np.floor(ty[ok]).astype(np.intp)
    hits = np.zeros(h * w, dtype=bool)
    for dy in (0, 1):
        for dx in (0, 1):
            xx, yy = x0 + dx, y0 + dy
            inb = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            hits[yy[inb] * w + xx[inb]] = True
    return hits.reshape(h, w)


def cycle_mask(fwd: np.ndarray, bwd: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels of frame a whose forward flow is trustworthy.

    A pixel x of a is valid when all of these hold:

    1. its target y = x + fwd(x) lies in frame b's extent;
    2. the cycle error |fwd(x) + bwd(y)| < ``threshold``, with bwd sampled bilinearly at y
       (``cv2.remap``, border replicated);
    3. some pixel of b warps into x: x is within 1 px (in x and y) of q + bwd(q) for a
       pixel q of b (pixels nothing warps into are occluded in b).

    Args:
        fwd: (H, W, 2) flow a -> b.
        bwd: (H, W, 2) flow b -> a.
        threshold: cycle-error threshold (px).

    Returns:
        (H, W) bool.
    """
    h, w = fwd.shape[:2]
    fwd = np.asarray(fwd, dtype=np.float32)
    bwd = np.asarray(bwd, dtype=np.float32)
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx = xs + fwd[..., 0]
    my = ys + fwd[..., 1]
    back = cv2.remap(bwd, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    err = np.linalg.norm(fwd + back, axis=-1)
    inside = (mx >= -0.5) & (mx <= w - 0.5) & (my >= -0.5) & (my <= h - 0.5)
    return inside & (err < threshold) & _covered(bwd)


def point_consistency(
    points: np.ndarray,
    fwd: np.ndarray,
    bwd: np.ndarray,
    threshold: float,
    covered: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The test of :func:`cycle_mask` at sub-pixel points, and where they move.

    Args:
        points: (K, 2) positions in frame a.
        fwd, bwd: (H, W, 2) flows a -> b and b -> a.
        threshold: cycle-error threshold (px).
        covered: (H, W) bool coverage of a (computed from ``bwd`` when omitted), read at
            the nearest pixel.

    Returns:
        ``(valid (K,) bool, moved (K, 2) float32)``: moved = p + fwd(p) (bilinear).
    """
    h, w = fwd.shape[:2]
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    moved = warp_points(points, fwd)
    back = warp_points(moved, bwd)
    err = np.linalg.norm(back - points, axis=1)
    if covered is None:
        covered = _covered(bwd)
    px = np.clip(np.rint(points[:, 0]).astype(np.intp), 0, w - 1)
    py = np.clip(np.rint(points[:, 1]).astype(np.intp), 0, h - 1)
    valid = _inside(moved, (h, w)) & (err < threshold) & covered[py, px]
    return valid, moved


def direct_targets(s: int, num_frames: int, max_range: int, pairs: int) -> list[int]:
    """Frames t checked against direct flow s -> t: geometric gaps in [2, max_range].

    Gap 1 is the consecutive flow itself, so gaps start at 2. ``pairs`` gaps are spaced
    geometrically (dense near, sparse far, the longest gap always included), deduplicated
    and clipped to the clip; deterministic.

    Returns:
        Ascending target frames, at most ``pairs`` of them.
    """
    if pairs <= 0 or max_range < 2:
        return []
    gaps = np.unique(np.rint(np.geomspace(2, max_range, num=pairs)).astype(int))
    return [s + int(g) for g in gaps if s + g < num_frames]


# -- streaming track storage --------------------------------------------------------------
class _TrackSink:
    """Streams track points and track ends to temporary files and assembles the output."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._temps: list[Path] = []
        self._pts_path = self._tmp("points")
        self._ends_path = self._tmp("ends")
        self._pts = open(self._pts_path, "wb")
        self._ends = open(self._ends_path, "wb")
        self.frame_counts: list[int] = []
        self.num_ids = 0

    def _tmp(self, what: str) -> Path:
        path = temp_file(self.out_dir, f"flow_{what}")
        self._temps.append(path)
        return path

    def new_ids(self, n: int) -> np.ndarray:
        ids = np.arange(self.num_ids, self.num_ids + n, dtype=np.int64)
        self.num_ids += n
        return ids

    def add_frame(self, ids: np.ndarray, xy: np.ndarray) -> None:
        rec = np.empty(len(ids), dtype=_REC)
        rec["id"], rec["x"], rec["y"] = ids, xy[:, 0], xy[:, 1]
        rec.tofile(self._pts)
        self.frame_counts.append(len(ids))

    def end(self, ids: np.ndarray, starts: np.ndarray, last_frame: int) -> None:
        """Tracks ``ids`` (started at ``starts``) have their last point at ``last_frame``."""
        rec = np.empty(len(ids), dtype=_END)
        rec["id"], rec["start"], rec["length"] = ids, starts, last_frame - starts + 1
        rec.tofile(self._ends)

    def _scratch(self, n: int, dtype: Any) -> np.memmap:
        return np.memmap(self._tmp("scratch"), dtype=dtype, mode="w+", shape=(max(n, 1),))

    def finish(self) -> tuple[int, int]:
        """Write the four output arrays; returns (num_tracks, num_points)."""
        self._pts.close()
        self._ends.close()
        n = self.num_ids
        starts_id = self._scratch(n, np.int32)
        lengths_id = self._scratch(n, np.int32)
        if os.path.getsize(self._ends_path):
            ends = np.memmap(self._ends_path, dtype=_END, mode="r")
            for i in range(0, len(ends), _CHUNK):
                e = ends[i : i + _CHUNK]
                starts_id[e["id"]] = e["start"]
                lengths_id[e["id"]] = e["length"]
            del ends
        # final index of each kept id (creation order, hence ascending starts); -1: dropped
        final = self._scratch(n, np.int64)
        num_tracks = num_points = 0
        for i in range(0, n, _CHUNK):
            keep = lengths_id[i : i + _CHUNK] >= 2
            idx = np.cumsum(keep) - 1 + num_tracks
            final[i : i + _CHUNK] = np.where(keep, idx, -1)
            num_tracks += int(keep.sum())
            num_points += int(lengths_id[i : i + _CHUNK][keep].sum(dtype=np.int64))
        out = self.out_dir
        with (
            create_array(out / "flow_starts.npy", (num_tracks,), np.int32) as o_start,
            create_array(out / "flow_lengths.npy", (num_tracks,), np.int32) as o_len,
            create_array(out / "flow_offsets.npy", (num_tracks,), np.int64) as o_off,
        ):
            total = 0
            for i in range(0, n, _CHUNK):
                f = np.asarray(final[i : i + _CHUNK])
                keep = f >= 0
                ln = np.asarray(lengths_id[i : i + _CHUNK])[keep]
                o_start[f[keep]] = np.asarray(starts_id[i : i + _CHUNK])[keep]
                o_len[f[keep]] = ln
                csum = np.cumsum(ln, dtype=np.int64)
                o_off[f[keep]] = total + csum - ln
                total += int(csum[-1]) if len(csum) else 0
            with create_array(out / "flow_points.npy", (num_points, 2), np.float32) as o_pts:
                if num_points:
                    self._scatter_points(final, starts_id, o_off, o_pts)
        return num_tracks, num_points

    def _scatter_points(
        self, final: np.ndarray, starts_id: np.ndarray, offsets: np.ndarray, points: np.ndarray
    ) -> None:
        """Copy streamed points to ``points[offsets[final[id]] + frame - start[id]]``."""
        pts = np.memmap(self._pts_path, dtype=_REC, mode="r")
        cum = np.cumsum(self.frame_counts, dtype=np.int64)
        for i in range(0, len(pts), _CHUNK):
            rec = pts[i : i + _CHUNK]
            frame = np.searchsorted(cum, np.arange(i, i + len(rec)), side="right")
            f = np.asarray(final[rec["id"]])
            keep = f >= 0
            dest = np.asarray(offsets[f[keep]]) + frame[keep] - starts_id[rec["id"][keep]]
            points[dest, 0] = rec["x"][keep]
            points[dest, 1] = rec["y"][keep]
        del pts

    def close(self) -> None:
        """Remove every temporary file (also after an error or a cancellation)."""
        for f in (self._pts, self._ends):
            f.close()
        for p in self._temps:
            with contextlib.suppress(OSError):
                p.unlink()


# -- track computation --------------------------------------------------------------------
def _grid(hw: tuple[int, int], step: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Start points on integer pixels c * step + step // 2, and the cell grid size."""
    h, w = hw
    xs = np.arange(step // 2, w, step)
    ys = np.arange(step // 2, h, step)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)
    return pts, (h // step + 1, w // step + 1)


def _cells(xy: np.ndarray, step: int, cells_hw: tuple[int, int]) -> np.ndarray:
    """Flat index of the grid cell each point falls in (cell = floor((p + 0.5) / step))."""
    cx = np.clip(np.floor((xy[:, 0] + 0.5) / step).astype(np.intp), 0, cells_hw[1] - 1)
    cy = np.clip(np.floor((xy[:, 1] + 0.5) / step).astype(np.intp), 0, cells_hw[0] - 1)
    return cy * cells_hw[1] + cx


def compute_flow_tracks(
    frames: Any,
    cfg: FlowConfig,
    out_dir: PathLike,
    *,
    estimator: FlowEstimator | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    start: float = 0.0,
    end: float = 1.0,
) -> FlowTracks:
    """Chained dense flow tracks of a clip, written to ``out_dir``.

    For every frame t in order: (1) tracks alive at t are checked against the direct
    flows s -> t of the sampled pairs (:func:`direct_targets`): a track alive at s and t
    whose chained position at t differs by >= ``cfg.direct_threshold`` from
    x_s + direct(x_s) is cut (it ends at t - 1), where the direct flow passes
    :func:`point_consistency` at x_s; (2) new tracks start on the grid
    (``cfg.grid_step``) in cells no alive track occupies; (3) positions are stored;
    (4) the consecutive flows t <-> t+1 move every track by bilinear sampling, and a
    track ends at t where :func:`point_consistency` fails (cycle error, occlusion or
    leaving the frame). Tracks of length 1 are dropped.

    Args:
        frames: (T, H, W, 3) uint8 RGB array-like (a memmap is fine), working resolution.
        cfg: flow settings.
        out_dir: directory for the ``flow_*`` files.
        estimator: flow backend (default: :func:`make_flow_estimator` of ``cfg``, on CPU).
        progress, cancel, start, end: reporting of stage ``flow``, cancellation.

    Returns:
        The stored tracks (memory-mapped).

    Raises:
        ClipError: fewer than 2 frames or not (T, H, W, 3).
        Cancelled: on request through ``cancel``.
    """
    if len(frames.shape) != 4 or frames.shape[-1] != 3 or frames.shape[0] < 2:
        raise ClipError(f"flow needs a (T>=2, H, W, 3) clip, got shape {tuple(frames.shape)}")
    num_frames, height, width = (int(v) for v in frames.shape[:3])
    hw = (height, width)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / _META).unlink(missing_ok=True)  # readers see no tracks until the new set is done
    est = estimator if estimator is not None else make_flow_estimator(cfg)
    thr = float(cfg.cycle_threshold)
    step = int(cfg.grid_step)
    grid_pts, cells_hw = _grid(hw, step)
    grid_cells = _cells(grid_pts, step, cells_hw)

    # direct pairs, indexed by target: t -> [sources]
    sources_of: dict[int, list[int]] = {}
    for s in range(num_frames):
        for t in direct_targets(s, num_frames, cfg.direct_max_range, cfg.direct_pairs_per_frame):
            sources_of.setdefault(t, []).append(s)
    is_source = {s for srcs in sources_of.values() for s in srcs}
    snapshots: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    reporter = StageReporter(progress, "flow", num_frames, start, end, cancel)
    reporter.update(0)
    sink = _TrackSink(out)
    ids = np.empty(0, np.int64)  # alive tracks, ascending ids
    tstart = np.empty(0, np.int32)
    xy = np.empty((0, 2), np.float32)
    stats = {"flow_calls": 0, "direct_pairs": 0, "cut_direct": 0, "ended_cycle": 0}

    def frame(i: int) -> np.ndarray:
        return np.ascontiguousarray(frames[i], dtype=np.uint8)

    try:
        for t in range(num_frames):
            # (1) direct-flow filter against earlier sources
            cut = np.zeros(len(ids), dtype=bool)
            for s in sources_of.get(t, []):
                s_ids, s_xy = snapshots[s]
                common, i_now, i_s = np.intersect1d(ids, s_ids, assume_unique=True,
                                                    return_indices=True)
                if len(common) == 0:
                    continue
                fwd, bwd = est.pair(frame(s), frame(t))
                stats["flow_calls"] += 2
                stats["direct_pairs"] += 1
                ok, direct = point_consistency(s_xy[i_s], fwd, bwd, thr)
                dev = np.linalg.norm(xy[i_now] - direct, axis=1)
                cut[i_now[ok & (dev >= cfg.direct_threshold)]] = True
            if cut.any():
                sink.end(ids[cut], tstart[cut], t - 1)
                stats["cut_direct"] += int(cut.sum())
                ids, tstart, xy = ids[~cut], tstart[~cut], xy[~cut]
            for s in [s for s in snapshots if s + cfg.direct_max_range <= t]:
                del snapshots[s]

            # (2) start tracks where no alive track passes
            occupied = np.zeros(cells_hw[0] * cells_hw[1], dtype=bool)
            occupied[_cells(xy, step, cells_hw)] = True
            new = ~occupied[grid_cells]
            n_new = int(new.sum())
            ids = np.concatenate([ids, sink.new_ids(n_new)])
            tstart = np.concatenate([tstart, np.full(n_new, t, np.int32)])
            xy = np.concatenate([xy, grid_pts[new]])
            if t in is_source:
                snapshots[t] = (ids.copy(), xy.copy())

            # (3) store, (4) advance
            sink.add_frame(ids, xy)
            if t == num_frames - 1:
                sink.end(ids, tstart, t)
            else:
                fwd, bwd = est.pair(frame(t), frame(t + 1))
                stats["flow_calls"] += 2
                ok, moved = point_consistency(xy, fwd, bwd, thr)
                if not ok.all():
                    sink.end(ids[~ok], tstart[~ok], t)
                    stats["ended_cycle"] += int((~ok).sum())
                ids, tstart, xy = ids[ok], tstart[ok], moved[ok]
            reporter.update(t + 1)
        num_tracks, num_points = sink.finish()
    finally:
        sink.close()
    meta = {
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "num_tracks": num_tracks,
        "num_points": num_points,
        **stats,
        "config": dataclasses.asdict(cfg),
    }
    write_json_atomic(out / _META, meta)
    logger.info(
        "flow: %d tracks, %d points over %d frames; %d flow calls (%d direct pairs), "
        "%d cut by direct flow, %d ended by the cycle check",
        num_tracks, num_points, num_frames, stats["flow_calls"], stats["direct_pairs"],
        stats["cut_direct"], stats["ended_cycle"],
    )
    return FlowTracks.load(out)


# -- reading tracks -----------------------------------------------------------------------
class FlowTracks:
    """Chained flow tracks of one clip, memory-mapped from ``out_dir``.

    Track i has positions at frames ``starts[i] .. starts[i] + lengths[i] - 1``, stored at
    ``points[offsets[i] : offsets[i] + lengths[i]]``; ``starts`` is ascending.

    Attributes:
        starts, lengths: (N,) int32.
        offsets: (N,) int64.
        points: (P, 2) float32 working pixels (x, y).
        num_frames, height, width: the clip's frame count and working size.
    """

    def __init__(
        self,
        starts: np.ndarray,
        lengths: np.ndarray,
        offsets: np.ndarray,
        points: np.ndarray,
        num_frames: int,
        hw: Sequence[int] = (0, 0),
    ) -> None:
        self.starts = starts
        self.lengths = lengths
        self.offsets = offsets
        self.points = points
        self.num_frames = int(num_frames)
        self.height, self.width = (int(v) for v in hw)

    @staticmethod
    def exists(out_dir: PathLike) -> bool:
        """Whether ``out_dir`` holds a complete set of flow-track files."""
        d = Path(out_dir)
        return all((d / f).is_file() for f in (*_FILES, _META))

    @classmethod
    def load(cls, out_dir: PathLike) -> FlowTracks:
        """Open the tracks in ``out_dir`` as memory maps.

        Raises:
            ClipError: the files are missing (run the flow preprocessing stage).
        """
        d = Path(out_dir)
        if not cls.exists(d):
            raise ClipError(f"no flow tracks in {d}; run `dino-tracker preprocess` first")
        meta = read_json(d / _META)
        arrays = [open_array(d / f) for f in _FILES]
        return cls(*arrays, num_frames=meta["num_frames"], hw=(meta["height"], meta["width"]))

    @property
    def num_tracks(self) -> int:
        """Number of tracks N."""
        return int(len(self.starts))

    def _alive_both(self, s: int, t: int) -> np.ndarray:
        lo, hi = min(s, t), max(s, t)
        n = int(np.searchsorted(self.starts, lo, side="right"))
        ends = np.asarray(self.starts[:n], np.int64) + np.asarray(self.lengths[:n]) - 1
        return np.nonzero(ends >= hi)[0].astype(np.int64)

    def positions(self, ids: np.ndarray, t: int) -> np.ndarray:
        """(K, 2) float32 positions at frame ``t`` of tracks ``ids`` (all alive at t)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.empty((0, 2), np.float32)
        idx = np.asarray(self.offsets[ids]) + (t - np.asarray(self.starts[ids], np.int64))
        return np.asarray(self.points[idx], dtype=np.float32)

    def alive(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Tracks alive at frame ``t``: ``(ids (K,) int64, xy (K, 2) float32)``."""
        ids = self._alive_both(t, t)
        return ids, self.positions(ids, t)

    def pairs(self, s: int, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions at frames s and t of all tracks alive at both (s < t or s > t).

        Returns:
            ``(xy_s (K, 2) float32, xy_t (K, 2) float32, ids (K,) int64)``.
        """
        ids = self._alive_both(s, t)
        return self.positions(ids, s), self.positions(ids, t), ids

    def linked(self, s: int, xy: np.ndarray, t: int, radius: float) -> np.ndarray:
        """Whether flow links points of frame s to frame t.

        A point is linked when the track nearest to it at frame s (among tracks alive at
        s, within ``radius`` px) is also alive at frame t.

        Args:
            s: frame of the points.
            xy: (K, 2) positions at frame s.
            t: the other frame.
            radius: search radius (px).

        Returns:
            (K,) bool.
        """
        from scipy.spatial import cKDTree

        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        ids, pos = self.alive(s)
        if len(ids) == 0 or len(xy) == 0:
            return np.zeros(len(xy), dtype=bool)
        dist, nearest = cKDTree(pos).query(xy, k=1, distance_upper_bound=radius)
        found = np.isfinite(dist)
        near_ids = ids[np.where(found, nearest, 0)]
        last = np.asarray(self.starts[near_ids], np.int64) + self.lengths[near_ids] - 1
        first = np.asarray(self.starts[near_ids])
        return found & (first <= t) & (last >= t)
