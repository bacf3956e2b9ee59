"""DINO best buddies (Omega_dino-bb) and refined best buddies (Omega_rfn-bb), METHOD.md 2-3.

Best buddies are mutual nearest neighbours (cosine similarity) between the token grids of
two frames. Each pair is weighted by how unambiguous it is: r = second / first peak of
the pair's cosine map after non-maximum suppression, symmetrised as max(r_fwd, r_bwd),
weight = sigmoid(scale (1 - r) - offset) * clamp(2 cos^3, min=0). During preprocessing
buddies that optical flow already links are dropped, and the number of frame pairs is
bounded (``pairs_per_frame`` partners per frame instead of all T - 1).

Positions are working pixels at token centres (:class:`~.geometry.GridGeometry`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from .config import BestBuddyConfig
from .errors import ClipError
from .geometry import GridGeometry
from .progress import CancelToken, ProgressCallback, StageReporter
from .storage import create_array, open_array, temp_file

if TYPE_CHECKING:
    from .flow import FlowTracks

__all__ = [
    "ambiguity_ratio",
    "bb_weights",
    "best_buddies",
    "compute_best_buddies",
    "mutual_nearest",
    "partner_pairs",
    "refined_best_buddies",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

_ROW_CHUNK = 1024  # query rows per similarity block: chunk x n_tokens floats at a time
_COPY_CHUNK = 1 << 20


def _rows(feat: Any, device: Any = None) -> torch.Tensor:
    """(C, h, w) features (tensor or array, any float dtype) -> (h*w, C) unit rows, fp32."""
    t = feat if isinstance(feat, torch.Tensor) else torch.from_numpy(np.asarray(feat))
    if device is not None:
        t = t.to(device)
    return F.normalize(t.detach().float().flatten(1).T, dim=1)


def _mutual(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours of unit rows ``a`` (na, C) and ``b`` (nb, C)."""
    na, nb = a.shape[0], b.shape[0]
    nn_ab = torch.empty(na, dtype=torch.long, device=a.device)
    cos_ab = torch.empty(na, dtype=a.dtype, device=a.device)
    best_ba = torch.full((nb,), -float("inf"), dtype=a.dtype, device=a.device)
    nn_ba = torch.zeros(nb, dtype=torch.long, device=a.device)
    for i in range(0, na, _ROW_CHUNK):
        sim = a[i : i + _ROW_CHUNK] @ b.T
        cos_ab[i : i + _ROW_CHUNK], nn_ab[i : i + _ROW_CHUNK] = sim.max(dim=1)
        col_val, col_idx = sim.max(dim=0)
        better = col_val > best_ba
        best_ba = torch.where(better, col_val, best_ba)
        nn_ba = torch.where(better, col_idx + i, nn_ba)
    idx_a = torch.arange(na, device=a.device)
    mutual = nn_ba[nn_ab] == idx_a
    return idx_a[mutual], nn_ab[mutual], cos_ab[mutual]


def mutual_nearest(
    feat_a: torch.Tensor, feat_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best buddies: token pairs that are each other's most similar token (cosine).

    Similarities are computed in blocks of rows, so memory stays at
    ``1024 x h*w`` floats whatever the grid size.

    Args:
        feat_a, feat_b: (C, h, w) features of two frames (same grid).

    Returns:
        ``(idx_a (K,) long, idx_b (K,) long, cos (K,) float32)``: flat token indices
        (i * w + j) in each grid and the pair's cosine similarity.
    """
    with torch.no_grad():
        return _mutual(_rows(feat_a), _rows(feat_b, feat_a.device))


def _centres(geometry: GridGeometry, device: Any) -> torch.Tensor:
    return torch.from_numpy(geometry.token_centres().reshape(-1, 2)).to(device)


def ambiguity_ratio(
    cos_maps: torch.Tensor,
    geometry: GridGeometry,
    top_k: int,
    box: float,
    iou: float,
) -> torch.Tensor:
    """Second-to-first peak ratio of cosine maps after non-maximum suppression.

    Per map: the ``top_k`` highest tokens become square boxes of half size ``box``
    (working px) around their token centres, scored by cosine, and greedy NMS with
    threshold ``iou`` (as ``torchvision.ops.batched_nms``: a box is dropped when its IoU
    with a kept, higher-scored box exceeds ``iou``) keeps the peaks. r = second / first
    surviving score, clamped to [0, 1] (a negative second peak counts as 0); r = 0 when
    only one peak survives.

    Only the first two survivors matter, and greedy NMS keeps as its second box the
    highest-scored candidate whose IoU with the top box is <= ``iou`` (every candidate
    before it was suppressed by the top box, the only one kept so far). That closed form
    is computed here without sorting: mask the top box's suppression zone, take the
    maximum of the rest, and keep it when fewer than ``top_k`` tokens score higher (it is
    then among the candidates). A test checks it against ``torchvision.ops.batched_nms``.

    Args:
        cos_maps: (K, h, w) cosine maps.
        geometry: token positions.
        top_k: candidates per map before NMS.
        box: half size of the NMS boxes (px).
        iou: NMS IoU threshold.

    Returns:
        (K,) float32 ratios in [0, 1] (1: two equal peaks; 0: one peak).
    """
    num, h, w = cos_maps.shape
    flat = cos_maps.detach().float().reshape(num, h * w)
    device = flat.device
    if num == 0 or min(int(top_k), h * w) < 2:
        return torch.zeros(num, dtype=torch.float32, device=device)
    top, top_idx = flat.max(dim=1)
    # suppression table over token offsets (|di|, |dj|): IoU of two equal squares
    side = 2.0 * float(box)
    di = torch.arange(h, device=device, dtype=torch.float32) * geometry.stride
    dj = torch.arange(w, device=device, dtype=torch.float32) * geometry.stride
    overlap = (side - di).clamp(min=0.0)[:, None] * (side - dj).clamp(min=0.0)[None, :]
    suppressed = overlap / (2.0 * side * side - overlap) > iou  # (h, w) bool
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    off_i = (rows[None, :] - torch.div(top_idx, w, rounding_mode="floor")[:, None]).abs()
    off_j = (cols[None, :] - (top_idx % w)[:, None]).abs()
    zone = suppressed[off_i[:, :, None], off_j[:, None, :]].reshape(num, h * w)
    second = flat.masked_fill(zone, -float("inf")).max(dim=1).values
    in_top_k = (flat > second[:, None]).sum(dim=1) < int(top_k)
    second = torch.where(torch.isfinite(second) & in_top_k, second.clamp(min=0.0),
                         torch.zeros_like(second))
    return (second / top.clamp(min=1e-8)).clamp(0.0, 1.0)


def bb_weights(r: torch.Tensor, cos: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """Best-buddy weights: ``sigmoid(scale * (1 - r) - offset) * clamp(2 cos^3, min=0)``.

    Args:
        r: (K,) ambiguity ratios.
        cos: (K,) cosine similarities of the pairs.
        scale, offset: the sigmoid's parameters (reference: 27 and 5.7).

    Returns:
        (K,) weights.
    """
    return torch.sigmoid(scale * (1.0 - r) - offset) * (2.0 * cos**3).clamp(min=0.0)


def _ratios(q: torch.Tensor, keys: torch.Tensor, geometry: GridGeometry,
            cfg: BestBuddyConfig) -> torch.Tensor:
    """Ambiguity ratio of each query row's cosine map over ``keys``, in row blocks."""
    h, w = geometry.grid_hw
    out = [
        ambiguity_ratio((q[i : i + _ROW_CHUNK] @ keys.T).view(-1, h, w), geometry,
                        cfg.nms_top_k, cfg.nms_box, cfg.nms_iou)
        for i in range(0, q.shape[0], _ROW_CHUNK)
    ]
    return torch.cat(out) if out else q.new_zeros(0)


def _check_grid(feat: Any, geometry: GridGeometry) -> None:
    if tuple(feat.shape[-2:]) != tuple(geometry.grid_hw):
        raise ValueError(
            f"feature grid {tuple(feat.shape[-2:])} does not match the geometry's "
            f"{geometry.grid_hw}"
        )


def best_buddies(
    feat_a: Any, feat_b: Any, geometry: GridGeometry, cfg: BestBuddyConfig
) -> np.ndarray:
    """Weighted DINO best buddies between two frames.

    Args:
        feat_a, feat_b: (C, h, w) features (torch tensors or arrays; fp16 is fine).
        geometry: token positions.
        cfg: NMS and weight settings.

    Returns:
        (K, 5) float32 rows ``(xa, ya, xb, yb, weight)``: token centres in working px,
        r symmetrised as max(r_fwd, r_bwd).
    """
    _check_grid(feat_a, geometry)
    _check_grid(feat_b, geometry)
    device = feat_a.device if isinstance(feat_a, torch.Tensor) else None
    with torch.no_grad():
        a = _rows(feat_a, device)
        b = _rows(feat_b, a.device)
        idx_a, idx_b, cos = _mutual(a, b)
        r = torch.maximum(_ratios(a[idx_a], b, geometry, cfg),
                          _ratios(b[idx_b], a, geometry, cfg))
        weight = bb_weights(r, cos, cfg.sigmoid_scale, cfg.sigmoid_offset)
        centres = _centres(geometry, a.device)
        rows = torch.cat([centres[idx_a], centres[idx_b], weight[:, None]], dim=1)
    return rows.cpu().numpy().astype(np.float32)


def partner_pairs(num_frames: int, per_frame: int, seed: int = 0) -> list[tuple[int, int]]:
    """Frame pairs for best buddies: ``per_frame`` partners of every frame, near and far.

    The other frames of s, sorted by distance |t - s|, are split into ``per_frame`` equal
    strata (nearest to farthest) and one frame is drawn from each (all of them when
    ``per_frame >= T - 1``, the reference's choice). Pairs are unordered and unique.

    Returns:
        Sorted ``(s, t)`` with s < t; at most ``T * per_frame`` of them.
    """
    rng = np.random.default_rng(seed)
    pairs: set[tuple[int, int]] = set()
    frames = np.arange(num_frames)
    for s in range(num_frames):
        others = frames[frames != s]
        others = others[np.lexsort((others, np.abs(others - s)))]
        if per_frame >= len(others):
            chosen = others
        else:
            chosen = np.array([rng.choice(b) for b in np.array_split(others, per_frame)])
        pairs.update((min(s, int(t)), max(s, int(t))) for t in chosen)
    return sorted(pairs)


def compute_best_buddies(
    features: Any,
    geometry: GridGeometry,
    flow_tracks: FlowTracks | None,
    cfg: BestBuddyConfig,
    out_path: PathLike,
    *,
    seed: int = 0,
    device: Any = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    start: float = 0.0,
    end: float = 1.0,
) -> np.ndarray:
    """Best buddies of a clip's frame pairs, kept where flow gives no link; saved as .npy.

    For each pair of :func:`partner_pairs` (s < t) the buddies of :func:`best_buddies` are
    kept when their weight is > 0 and neither end is linked by flow to the other frame
    (``flow_tracks.linked`` with a radius of one token stride, at s for xs and at t for
    xt, as the reference filters both ends). Rows stream to a temporary file; RAM does
    not grow with the clip length.

    Args:
        features: (T, C, h, w) DINO features (fp16 memmap is fine).
        geometry: token positions.
        flow_tracks: chained flow tracks, or ``None`` to keep every buddy.
        cfg: pair count, NMS and weight settings.
        out_path: the ``.npy`` file to write (atomically).
        seed: pair sampling seed.
        device: torch device for the similarities.
        progress, cancel, start, end: reporting of stage ``best_buddies``, cancellation.

    Returns:
        (M, 7) float32 rows ``(s, xs, ys, t, xt, yt, weight)`` (memory-mapped).

    Raises:
        ClipError: features not (T >= 2, C, h, w) on the geometry's grid.
        Cancelled: on request through ``cancel``.
    """
    if len(features.shape) != 4 or features.shape[0] < 2:
        raise ClipError(f"best buddies need (T>=2, C, h, w) features, got "
                        f"{tuple(features.shape)}")
    if tuple(features.shape[-2:]) != tuple(geometry.grid_hw):
        raise ClipError(f"features grid {tuple(features.shape[-2:])} does not match the "
                        f"working geometry {geometry.grid_hw}; recompute the features")
    device = torch.device(device)
    pairs = partner_pairs(int(features.shape[0]), cfg.pairs_per_frame, seed)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    reporter = StageReporter(progress, "best_buddies", len(pairs), start, end, cancel)
    reporter.update(0)
    radius = float(geometry.stride)
    tmp = temp_file(out_path.parent, f"{out_path.name}.rows")
    cached: tuple[int, torch.Tensor] = (-1, torch.empty(0))
    total = found = 0
    try:
        with open(tmp, "wb") as sink:
            for k, (s, t) in enumerate(pairs):
                if cached[0] != s:
                    cached = (s, _frame(features, s, device))
                rows = best_buddies(cached[1], _frame(features, t, device), geometry, cfg)
                found += len(rows)
                keep = rows[:, 4] > 0
                if flow_tracks is not None and keep.any():
                    keep &= ~flow_tracks.linked(s, rows[:, 0:2], t, radius)
                    keep &= ~flow_tracks.linked(t, rows[:, 2:4], s, radius)
                rows = rows[keep]
                out = np.empty((len(rows), 7), np.float32)
                out[:, 0], out[:, 1:3], out[:, 3] = s, rows[:, 0:2], t
                out[:, 4:6], out[:, 6] = rows[:, 2:4], rows[:, 4]
                out.tofile(sink)
                total += len(out)
                reporter.update(k + 1)
        with create_array(out_path, (total, 7), np.float32) as arr:
            if total:
                src = np.memmap(tmp, dtype=np.float32, mode="r", shape=(total, 7))
                for i in range(0, total, _COPY_CHUNK):
                    arr[i : i + _COPY_CHUNK] = src[i : i + _COPY_CHUNK]
                del src
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    logger.info("best buddies: %d kept of %d over %d frame pairs", total, found, len(pairs))
    return open_array(out_path)


def _frame(features: Any, t: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(features[t], dtype=np.float32)).to(device)


def refined_best_buddies(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    geometry: GridGeometry,
    cfg: BestBuddyConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best buddies of refined features during training (Omega_rfn-bb), without gradients.

    The weight is ``clamp(2 aff^3, min=0)`` where ``aff`` is the cosine affinity
    (similarity) of the two refined feature vectors of the pair; the reference uses no
    ambiguity term here.

    Args:
        feat_a, feat_b: (C, h, w) refined features (any device; detached here).
        geometry: token positions.
        cfg: accepted for symmetry with :func:`best_buddies`; no setting applies.

    Returns:
        ``(xa (K, 2), xb (K, 2), w (K,))`` float32 tensors on the features' device:
        token centres in working px and weights.
    """
    del cfg
    _check_grid(feat_a, geometry)
    _check_grid(feat_b, geometry)
    with torch.no_grad():
        idx_a, idx_b, aff = _mutual(_rows(feat_a), _rows(feat_b, feat_a.device))
        centres = _centres(geometry, feat_a.device)
        return centres[idx_a], centres[idx_b], (2.0 * aff**3).clamp(min=0.0)
