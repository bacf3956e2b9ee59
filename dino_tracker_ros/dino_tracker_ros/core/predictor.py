"""Inference: refined-feature cache, tracking of query points, and visibility.

A trained clip answers queries from its refined features ``Phi = Phi_DINO + Phi_Delta``,
computed once for all frames and cached on disk (``cache/refined.npy``, fp16 by default,
with ``cache/refined.json`` naming the model file it belongs to). Every query is predicted
independently in every frame from its own feature (no frame-to-frame chaining, hence no
drift), forward and backward in time from its query frame. Visibility comes from
trajectory agreement (:mod:`.visibility`).

Speed: the head's cosine cost maps are one matrix product per frame batch (per anchor
frame in the visibility check), and its refiner + soft-argmax run only on a window around
each map's peak (:func:`locate_windowed`, equal to the head's result), as two small matrix
products per window, a few thousand windows at a time. The visibility check, queries x
anchors x frames predictions, computes its cost maps and refiner in bf16 where the device
does that fast (``precision``); trajectories stay fp32.

Memory: queries are processed in batches (``track.query_batch``, shrunk so that the
per-batch buffer of features at the predictions stays under
:data:`FEATURE_BUFFER_BYTES`), frames in chunks of ``track.frame_batch``, and one head call
holds at most :data:`MAP_BUDGET` cost-map cells. A clip's features (float32, plus their
unit-norm copies) stay in memory after the first query when they fit in
``track.resident_megabytes``; larger clips are read from the cache's memory map in every
pass, so RAM does not grow with the clip length beyond the (queries x frames) results.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .clip import Clip
from .config import TrackConfig, resolve_device
from .errors import NotTrainedError, QueryError
from .geometry import rescale_points
from .progress import CancelToken, ProgressCallback, StageReporter
from .storage import create_array, load_optional_json, open_array, write_json_atomic
from .visibility import agreement_visibility, select_anchors

__all__ = [
    "CACHE_VERSION",
    "Predictor",
    "TrackResult",
    "build_refined_cache",
    "cache_is_fresh",
    "grid_queries",
    "locate_windowed",
    "validate_queries",
]

logger = logging.getLogger("dino_tracker.predictor")

CACHE_VERSION = 1
MAP_BUDGET = 1 << 24  # cost-map cells per head call (the refiner runs on small windows)
FEATURE_BUFFER_BYTES = 1 << 28  # per query batch: features at the predictions (Q, T, C)
LOCATE_CELLS = 1 << 21  # refiner input cells per pass (bounds its intermediates)
DENSE_REFINER_ENTRIES = 1 << 20  # largest refiner layer run as one matrix product
_SINK = 1e4  # pushes a refiner cell outside the map far below zero (its ReLU gives 0)
_EPS = 1e-8  # as the head's cosine

PathLike = Union[str, "os.PathLike[str]"]


class TrackResult(NamedTuple):
    """Tracks of N queries over the T frames of a clip.

    Attributes:
        tracks: (N, T, 2) float32 (x, y) in original pixels.
        visible: (N, T) bool, ``visibility >= track.visibility_threshold``.
        visibility: (N, T) float32 score in [0, 1].
        queries: (N, 3) float64 (t, x, y) original pixels, as given.
        stamps_ns: (T,) int64 frame stamps.
    """

    tracks: np.ndarray
    visible: np.ndarray
    visibility: np.ndarray
    queries: np.ndarray
    stamps_ns: np.ndarray


# -- queries ----------------------------------------------------------------------------
def grid_queries(size_hw: tuple[int, int], step: int, frame: int = 0) -> np.ndarray:
    """A regular grid of queries on one frame.

    Points sit every ``step`` pixels, starting ``step // 2`` from the top-left corner (one
    point in the middle when ``step`` exceeds the image).

    Args:
        size_hw: image (H, W) in original pixels.
        step: grid spacing in pixels (>= 1).
        frame: frame index of every query.

    Returns:
        (N, 3) float64 (t, x, y), row-major (y outer).
    """
    if step < 1:
        raise QueryError(f"grid step must be at least 1 pixel, got {step}")
    h, w = int(size_hw[0]), int(size_hw[1])
    xs = np.arange(step // 2, w, step, dtype=np.float64)
    ys = np.arange(step // 2, h, step, dtype=np.float64)
    xs = xs if len(xs) else np.array([(w - 1) / 2.0])
    ys = ys if len(ys) else np.array([(h - 1) / 2.0])
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    n = gx.size
    return np.stack([np.full(n, float(frame)), gx.ravel(), gy.ravel()], axis=1)


def validate_queries(queries: Any, num_frames: int, size_hw: tuple[int, int]) -> np.ndarray:
    """Check query points; return them as (N, 3) float64 with integer-valued frames.

    Raises:
        QueryError: wrong shape, non-finite values, a frame outside [0, T) or not an
            integer, or a point outside the image ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.
    """
    try:
        q = np.asarray(queries, dtype=np.float64)
    except (TypeError, ValueError):
        raise QueryError("queries must be numbers: rows of t, x, y") from None
    if q.ndim == 1 and q.size == 3:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != 3:
        raise QueryError(f"queries must be an (N, 3) array of t, x, y; got shape {q.shape}")
    h, w = size_hw
    t, x, y = q[:, 0], q[:, 1], q[:, 2]
    finite = np.isfinite(q).all(axis=1)
    bad = np.flatnonzero(~finite)
    if len(bad):
        i = int(bad[0])
        raise QueryError(f"query {i} is not finite (t={t[i]}, x={x[i]}, y={y[i]}); give numbers")
    bad = np.flatnonzero(np.abs(t - np.rint(t)) > 1e-6)
    if len(bad):
        raise QueryError(f"query {bad[0]}: frame must be an integer, got {t[bad[0]]:g}")
    bad = np.flatnonzero((np.rint(t) < 0) | (np.rint(t) >= num_frames))
    if len(bad):
        raise QueryError(f"query {bad[0]}: frame {t[bad[0]]:g} is outside the clip "
                         f"(frames 0..{num_frames - 1})")
    bad = np.flatnonzero((x < -0.5) | (x > w - 0.5) | (y < -0.5) | (y > h - 0.5))
    if len(bad):
        i = int(bad[0])
        raise QueryError(
            f"query {i}: point ({x[i]:g}, {y[i]:g}) lies outside the {w}x{h} image "
            f"(x in [-0.5, {w - 0.5:g}], y in [-0.5, {h - 0.5:g}])"
        )
    q = q.copy()
    q[:, 0] = np.rint(q[:, 0])
    return q


# -- refined-feature cache ----------------------------------------------------------------
def _as_clip(clip: Clip | PathLike) -> Clip:
    return clip if isinstance(clip, Clip) else Clip.open(clip)


def _model_path(clip: Clip) -> Path:
    return Path(clip.model_dir) / "model.pt"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_identity(clip: Clip) -> dict:
    """What the cache depends on: the model file's bytes and the DINO features file."""
    model = _model_path(clip)
    if not model.is_file():
        raise NotTrainedError(f"clip {clip.clip_id!r} has no trained model; train it first")
    feats = Path(clip.work_dir) / "features.npy"
    fst = feats.stat() if feats.is_file() else None
    return {
        "version": CACHE_VERSION,
        "model_sha256": _file_sha256(model),
        "model_size": model.stat().st_size,
        "features_size": fst.st_size if fst else None,
        "features_mtime_ns": fst.st_mtime_ns if fst else None,
    }


def cache_is_fresh(clip: Clip | PathLike) -> bool:
    """Whether ``cache/refined.npy`` exists and belongs to the clip's current model."""
    clip = _as_clip(clip)
    cache = Path(clip.cache_dir)
    rec = load_optional_json(cache / "refined.json")
    if not isinstance(rec, dict) or not (cache / "refined.npy").is_file():
        return False
    try:
        ident = _cache_identity(clip)
    except NotTrainedError:
        return False
    return all(rec.get(k) == v for k, v in ident.items())


def build_refined_cache(
    clip: Clip | PathLike,
    *,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    start: float = 0.0,
    end: float = 1.0,
) -> Path:
    """Compute the refined features of every frame with the clip's trained model.

    Streams ``track.frame_batch`` frames at a time from ``work/frames.npy`` and
    ``work/features.npy`` into ``cache/refined.npy`` (T, C, h, w) (``track.cache_precision``,
    fp16 by default), then writes ``cache/refined.json`` (model file hash and size, DINO
    features file size and mtime). Peak RAM does not depend on T.

    Args:
        clip: the clip or its directory.
        device: torch device (``auto``: CUDA when available).
        progress: receives stage ``caching`` reports with fractions in [start, end].
        cancel: checked between batches.
        start, end: this job's share of a larger job's progress range.

    Returns:
        Path of ``cache/refined.npy``.

    Raises:
        NotTrainedError: no model or no preprocessing, or they do not match.
    """
    from .backbone import to_input
    from .checkpoint import load_model
    from .preprocess import Workspace

    clip = _as_clip(clip)
    dev = torch.device(resolve_device(device))
    model, cfg, meta = load_model(_model_path(clip), dev)
    ws = Workspace(clip, cfg)
    frames, feats = ws.frames(), ws.features()
    num_t, c, h, w = feats.shape
    if (
        tuple(frames.shape[1:3]) != tuple(meta["image_size"])
        or c != model.channels
        or (h, w) != model.geometry.grid_hw
        or len(frames) != num_t
    ):
        raise NotTrainedError(
            f"clip {clip.clip_id!r}: preprocessing does not match the trained model; "
            "train the clip again"
        )
    ident = _cache_identity(clip)
    cache = Path(clip.cache_dir)
    (cache / "refined.json").unlink(missing_ok=True)
    dtype = np.float16 if cfg.track.cache_precision == "fp16" else np.float32
    fb = max(1, int(cfg.track.frame_batch))
    reporter = StageReporter(progress, "caching", num_t, start, end, cancel)
    with create_array(cache / "refined.npy", (num_t, c, h, w), dtype) as out, torch.no_grad():
        for t0 in range(0, num_t, fb):
            t1 = min(t0 + fb, num_t)
            images = to_input(np.array(frames[t0:t1]), dev)
            dino = torch.from_numpy(np.array(feats[t0:t1])).to(dev)
            out[t0:t1] = model.refine(images, dino).cpu().numpy().astype(dtype)
            reporter.update(t1)
    write_json_atomic(cache / "refined.json", {**ident, "shape": [num_t, c, h, w],
                                               "dtype": np.dtype(dtype).name})
    logger.info("refined-feature cache of %s: %d frames, %s", clip.clip_id, num_t, dtype.__name__)
    return cache / "refined.npy"


# -- prediction ---------------------------------------------------------------------------
def _refiner_steps(refiner: torch.nn.Module) -> list | None:
    """The refiner as ``(weight, bias)`` convolutions and plain callables, or ``None``.

    Known layers: sum-normalised convolutions (``normalized_weight()``), stride-1
    undilated ``nn.Conv2d`` with odd kernels, and parameter-free elementwise modules
    (ReLU, Identity). Anything else returns ``None`` (the caller uses the head itself).
    """
    steps: list = []
    for layer in list(refiner.children()) or [refiner]:
        if hasattr(layer, "normalized_weight"):
            steps.append((layer.normalized_weight(), layer.bias))
        elif isinstance(layer, torch.nn.Conv2d):
            k = layer.kernel_size
            if layer.stride != (1, 1) or layer.dilation != (1, 1) or k[0] != k[1] or k[0] % 2 == 0:
                return None
            steps.append((layer.weight, layer.bias))
        elif isinstance(layer, (torch.nn.ReLU, torch.nn.Identity)):
            steps.append(layer)
        else:
            return None
    return steps


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Unpadded ``F.conv2d`` (stride 1) in the layouts that oneDNN runs fast on a CPU.

    Measured on the refiner's 3x3 layers (per 11x11 window, one thread): one input channel
    in NCHW 17 us fp32 / 0.6 us bf16, in channels-last 2.5 / 0.65 us; one output channel
    6.3 / 3.8 us, as a channels-last depthwise convolution plus a channel sum 1.8 / 2.4 us.
    The sums are the same up to rounding.
    """
    cout, cin, k = int(weight.shape[0]), int(weight.shape[1]), int(weight.shape[-1])
    if x.device.type != "cpu":
        return F.conv2d(x, weight, bias)
    x = x.contiguous(memory_format=torch.channels_last)
    if cout == 1 and cin > 1:
        y = F.conv2d(x, weight.reshape(cin, 1, k, k), None, groups=cin)
        y = y.sum(dim=1, keepdim=True)
        return y if bias is None else y + bias.reshape(1, 1, 1, 1)
    return F.conv2d(x, weight, bias)


def _refine(steps: list, x: torch.Tensor, keep: tuple | None) -> torch.Tensor:
    """Run the refiner ``steps`` as unpadded convolutions on windows ``x (M, 1, S, S)``.

    ``keep = (rows (M, S), cols (M, S))``: 0/1 masks of the cells inside the map (``None``:
    all inside). They zero the outside cells of the input and of every convolution's output
    but the last (the caller ignores those), as zero padding of the whole map would.
    Returns ``(M, S', S')``.
    """
    convs = sum(isinstance(s, tuple) for s in steps)
    if keep is not None:
        x = x * (keep[0][:, None, :, None] * keep[1][:, None, None, :])
    crop = 0
    for step in steps:
        if not isinstance(step, tuple):
            x = step(x)
            continue
        weight, bias = step
        x = _conv(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        convs -= 1
        crop += int(weight.shape[-1]) // 2
        if keep is not None and convs > 0:
            s = x.shape[-1]
            x = x * (keep[0][:, None, crop:crop + s, None] * keep[1][:, None, None, crop:crop + s])
    return x[:, 0]


def _conv_matrix(weight: torch.Tensor, side: int) -> torch.Tensor:
    """The unpadded stride-1 convolution of a ``(cin, side, side)`` input as a matrix.

    ``out.flatten() = in.flatten() @ matrix``; shape ``(cin * side**2, cout * out_side**2)``
    with ``out_side = side - k + 1`` (channel-major, row-major flattening, as ``reshape``).
    """
    cout, cin, k = int(weight.shape[0]), int(weight.shape[1]), int(weight.shape[-1])
    out_side = side - k + 1
    dev = weight.device
    o, c, dy, dx, i, j = torch.meshgrid(
        *(torch.arange(n, device=dev) for n in (cout, cin, k, k, out_side, out_side)),
        indexing="ij")
    rows = (c * side + i + dy) * side + j + dx
    cols = (o * out_side + i) * out_side + j
    matrix = torch.zeros(cin * side * side, cout * out_side * out_side, device=dev)
    values = weight[:, :, :, :, None, None].expand(-1, -1, -1, -1, out_side, out_side)
    matrix[rows.flatten(), cols.flatten()] = values.flatten()
    return matrix


class _DensePlan(NamedTuple):
    """The refiner on windows as pruned matrix products (:func:`_dense_plan`).

    Attributes:
        in_cells: (n,) long, the window cells (row-major in ``size x size``) the output reads.
        layers: per convolution ``(matrix, bias or None, sink_cells or None)``, and the
            elementwise callables, in order; ``sink_cells``: window cells of an intermediate
            output (whose outside-the-map flags feed the sink rows). The last layer
            outputs the disc's cells (row-major in the ``2r+1`` core).
    """

    in_cells: torch.Tensor
    layers: list


def _reach(cells: torch.Tensor, side: int, k: int) -> torch.Tensor:
    """Input cells (row-major, side ``side + k - 1``) read by output ``cells`` of a kxk conv."""
    i, j = cells // side, cells % side
    d = torch.arange(k, device=cells.device)
    rows = (i[:, None, None] + d[None, :, None]).expand(-1, k, k)
    cols = (j[:, None, None] + d[None, None, :]).expand(-1, k, k)
    return torch.unique(rows * (side + k - 1) + cols)


def _channel_index(cells: torch.Tensor, channels: int, area: int) -> torch.Tensor:
    """Flat channel-major indices ``c * area + cell`` for every channel and cell."""
    return (torch.arange(channels, device=cells.device)[:, None] * area + cells[None]).flatten()


def _dense_plan(steps: list, size: int, disc: torch.Tensor, dtype: torch.dtype,
                device: torch.device) -> _DensePlan | None:
    """The refiner on ``size`` x ``size`` windows as matrix products, or ``None``.

    An unpadded convolution is a linear map of the flattened window (:func:`_conv_matrix`).
    Only the disc's outputs are needed, so each layer's matrix keeps the columns of the
    cells that later layers read and the rows of the cells it reads (11x11 windows, a
    37-cell disc: 109 -> 16 x 69 -> 37 values instead of 121 -> 16 x 81 -> 49). Two small
    GEMMs per window run faster on a CPU than convolutions of 1 and 16 channels on tiny
    images, although they multiply zeros. The cells outside the map of an
    intermediate layer's output must be zero (zero padding of the whole map): each such
    layer's matrix gets one extra input row per output cell, -:data:`_SINK` in every
    channel of that cell, fed with 1 where the cell lies outside the map, so that the
    following ReLU zeroes it (exact: inside cells add 0). ``None`` (use convolutions) when
    a layer's full matrix would exceed :data:`DENSE_REFINER_ENTRIES` or an intermediate
    layer is not followed by a ReLU.

    Args:
        steps: :func:`_refiner_steps`.
        size: window side (the core ``2r+1`` plus the convolutions' margins).
        disc: (2r+1, 2r+1) bool, the soft-argmax cells.
    """
    convs = [(i, step) for i, step in enumerate(steps) if isinstance(step, tuple)]
    sides = [size]
    for _, (weight, _) in convs:
        sides.append(sides[-1] - int(weight.shape[-1]) + 1)
    if sides[-1] != disc.shape[0]:
        return None
    # cells each layer's output needs, from the last layer back to the window
    needed = [torch.nonzero(disc.flatten().to(device))[:, 0]]
    for n, (_, (weight, _)) in reversed(list(enumerate(convs))):
        needed.insert(0, _reach(needed[0], sides[n + 1], int(weight.shape[-1])))
    layers: list = []
    cin, n = 1, 0
    for i, step in enumerate(steps):
        if not isinstance(step, tuple):
            layers.append(step)
            continue
        weight, bias = step
        cout = int(weight.shape[0])
        side, out_side = sides[n], sides[n + 1]
        if cin * side * side * cout * out_side * out_side > DENSE_REFINER_ENTRIES:
            return None
        full = _conv_matrix(weight.float().to(device), side)
        rows = _channel_index(needed[n], cin, side * side)
        cols = _channel_index(needed[n + 1], cout, out_side * out_side)
        matrix = full[rows][:, cols]
        cells = len(needed[n + 1])
        sink_cells = None
        if n < len(convs) - 1:
            if i + 1 >= len(steps) or not isinstance(steps[i + 1], torch.nn.ReLU):
                return None
            sink = torch.eye(cells, device=device).repeat(1, cout) * -_SINK
            matrix = torch.cat([matrix, sink], dim=0)
            margin = (size - out_side) // 2
            oi, oj = needed[n + 1] // out_side + margin, needed[n + 1] % out_side + margin
            sink_cells = oi * size + oj
        full_bias = None if bias is None else bias.float().to(device).repeat_interleave(cells)
        layers.append((matrix.to(dtype), None if full_bias is None else full_bias.to(dtype),
                       sink_cells))
        cin, n = cout, n + 1
    return _DensePlan(needed[0], layers)


_PLANS: dict = {}  # (refiner parameters and their versions, window, dtype, device) -> plan
_PLANS_LOCK = threading.Lock()


def _cached_plan(head: torch.nn.Module, steps: list, size: int, disc: torch.Tensor,
                 dtype: torch.dtype, device: torch.device) -> _DensePlan | None:
    """:func:`_dense_plan`, built once per refiner state (a query makes ~50-100 calls).

    The key holds every refiner parameter's storage and in-place version counter, so a
    trained or reloaded refiner never reuses a stale plan.
    """
    params = tuple((t.data_ptr(), t._version) for t in head.refiner.parameters())
    key = (params, size, dtype, str(device), float(head.radius))
    with _PLANS_LOCK:
        if key not in _PLANS:
            if len(_PLANS) >= 16:
                _PLANS.clear()
            _PLANS[key] = _dense_plan(steps, size, disc, dtype, device)
        return _PLANS[key]


def _refine_dense(plan: _DensePlan, x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Run a :func:`_dense_plan` on windows' ``plan.in_cells`` values ``x (M, n)``.

    ``x`` is 0 at cells outside the map; ``inside``: (M, S * S) bool, the window's cells
    inside the map. Returns ``(M, d)``, the last layer at the disc's cells (not zeroed
    outside the map).
    """
    m = x.shape[0]
    for step in plan.layers:
        if not isinstance(step, tuple):
            x = step(x)
            continue
        matrix, bias, sink_cells = step
        if sink_cells is not None:
            x = torch.cat([x, (~inside[:, sink_cells]).to(x.dtype)], dim=1)
        x = x @ matrix if bias is None else torch.addmm(bias, x, matrix)
    return x.reshape(m, -1)


def locate_windowed(
    head: torch.nn.Module, cost: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``head.locate(cost)`` computed only around each cost map's peak (same result, faster).

    The tracker head's soft-argmax only weighs token cells within ``head.radius`` of the
    raw cosine peak, and the softmax normaliser cancels in its renormalisation over that
    disc; the refiner's same-padded convolutions only read a few cells around each output.
    So the refiner runs as unpadded convolutions on a window of the disc plus that margin
    (as matrix products, :func:`_dense_plan`, while they are small), with the cells outside
    the map zeroed (what zero padding gives on the full map), :data:`LOCATE_CELLS` input
    cells at a time. The one difference to the head: where its softmax mass inside the disc
    underflows (< 1e-8, the refined map peaking far outside the disc), the head returns the
    disc's centroid and this function the soft-argmax over the disc. A refiner with layers
    of other kinds runs through ``head.locate`` itself.

    Args:
        head: a :class:`~.model.TrackerHead` (``geometry``, ``radius``, ``refiner``).
        cost: (B, Q, h, w) raw cosine maps (any float dtype).
        dtype: compute dtype of the refiner (float32: the head's own precision).

    Returns:
        (B, Q, 2) float32 working-pixel (x, y).
    """
    steps = _refiner_steps(head.refiner)
    if steps is None:
        return head.locate(cost)
    b, q, h, w = cost.shape
    n = b * q
    dev = cost.device
    stride = float(head.geometry.stride)
    r = int(math.floor(float(head.radius) / stride + 1e-6))
    margin = sum(int(s[0].shape[-1]) // 2 for s in steps if isinstance(s, tuple))
    pad = r + margin
    size = 2 * pad + 1
    chunk = max(1, LOCATE_CELLS // (size * size))
    offs = torch.arange(-pad, pad + 1, device=dev)
    d = torch.arange(-r, r + 1, device=dev, dtype=torch.float32) * stride
    disc = (d[:, None] ** 2 + d[None, :] ** 2) <= float(head.radius) ** 2
    plan = _cached_plan(head, steps, size, disc, dtype, dev)
    disc_cells = torch.nonzero(disc.flatten())[:, 0]
    # the disc's cells in window coordinates (row-major in size x size)
    win_cells = (disc_cells // (2 * r + 1) + margin) * size + disc_cells % (2 * r + 1) + margin
    maps_all = cost.reshape(n, h * w)
    out = torch.empty(n, 2, device=dev)
    with torch.autocast(device_type=dev.type, enabled=False):
        for c0 in range(0, n, chunk):
            maps = maps_all[c0:c0 + chunk]
            m = maps.shape[0]
            peak = maps.max(dim=-1).indices  # the first maximum, as argmax; faster on CPUs
            rows = (peak // w)[:, None] + offs[None]  # (M, S)
            cols = (peak % w)[:, None] + offs[None]
            row_ok = (rows >= 0) & (rows < h)
            col_ok = (cols >= 0) & (cols < w)
            inside = (row_ok[:, :, None] & col_ok[:, None, :]).reshape(m, -1)  # (M, S * S)
            flat = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
            flat = flat.reshape(m, -1)
            if plan is None:
                x = torch.gather(maps, 1, flat).reshape(m, 1, size, size)
                x = F.relu(x.to(dtype))
                border = ~(row_ok.all(1) & col_ok.all(1))
                heat = torch.empty(m, 2 * r + 1, 2 * r + 1, device=dev)
                for sel, keep in ((~border, False), (border, True)):
                    idx = torch.nonzero(sel)[:, 0]
                    if len(idx):
                        masks = (row_ok[idx].to(dtype), col_ok[idx].to(dtype)) if keep else None
                        heat[idx] = _refine(steps, x[idx], masks).float()
                heat = heat.reshape(m, -1)[:, disc_cells]
            else:
                x = torch.gather(maps, 1, flat[:, plan.in_cells])
                x = F.relu(x.to(dtype)) * inside[:, plan.in_cells].to(dtype)
                heat = _refine_dense(plan, x, inside).float()
            # softmax over the disc's cells inside the map (written out: faster than
            # torch.softmax on rows of 9-81 cells)
            heat = heat.masked_fill(~inside[:, win_cells], -float("inf"))
            prob = torch.exp(heat - heat.amax(dim=1, keepdim=True))
            prob = prob / prob.sum(dim=1, keepdim=True)
            cell_rows = torch.gather(rows, 1, (win_cells // size)[None].expand(m, -1))
            cell_cols = torch.gather(cols, 1, (win_cells % size)[None].expand(m, -1))
            out[c0:c0 + m, 0] = (prob * head.geometry.grid_to_pixel(cell_cols.float())).sum(-1)
            out[c0:c0 + m, 1] = (prob * head.geometry.grid_to_pixel(cell_rows.float())).sum(-1)
    return out.reshape(b, q, 2)


class Predictor:
    """Tracks query points of one clip with a model and a per-frame feature array.

    Usually made with :meth:`open` (trained model + refined-feature cache). The
    untrained-features baseline builds one directly from the DINO features.

    Args:
        model: a :class:`~.model.DinoTrackerModel` (its ``sample``, ``geometry`` and the
            head's ``radius`` and ``refiner`` are used: the head runs as
            :func:`locate_windowed` on cosine maps).
        features: (T, C, h, w) per-frame features (array or memory map, any float dtype).
        orig_size: the clip's original (H, W).
        track_cfg: inference and visibility settings.
        device: torch device for the computation.
        stamps_ns: (T,) frame stamps (default: zeros).
        precision: dtype of the visibility check's cost maps and refiner (the trajectories
            are always fp32): ``fp32``, ``bf16``, ``fp16`` or ``auto`` (bf16 where the device
            computes it fast: CUDA with bf16, CPUs with AVX512-BF16/AMX; else fp32).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        features: np.ndarray,
        *,
        orig_size: tuple[int, int],
        track_cfg: TrackConfig | None = None,
        device: str | torch.device = "cpu",
        stamps_ns: np.ndarray | None = None,
        precision: str = "auto",
    ) -> None:
        from .backbone import resolve_precision

        self.device = torch.device(resolve_device(device) if isinstance(device, str) else device)
        self.anchor_dtype = resolve_precision(precision, self.device) or torch.float32
        self.model = model.to(self.device).eval()
        self.features = features
        self.geometry = model.geometry
        self.work_size = (int(self.geometry.height), int(self.geometry.width))
        self.orig_size = (int(orig_size[0]), int(orig_size[1]))
        self.track_cfg = track_cfg or TrackConfig()
        num_t = int(features.shape[0])
        if tuple(features.shape[2:]) != tuple(self.geometry.grid_hw):
            raise NotTrainedError(
                f"features of grid {tuple(features.shape[2:])} do not match the model's "
                f"{self.geometry.grid_hw}; train the clip again"
            )
        self.stamps_ns = (
            np.zeros(num_t, dtype=np.int64) if stamps_ns is None
            else np.asarray(stamps_ns, dtype=np.int64)
        )
        self._lock = threading.Lock()
        self._raw: torch.Tensor | None = None  # resident float32 features (T, C, h, w)
        self._unit_cache: dict[torch.dtype, torch.Tensor] = {}  # unit-norm (T, C, h * w)

    @classmethod
    def open(
        cls,
        clip: Clip | PathLike,
        *,
        device: str = "auto",
        track_cfg: TrackConfig | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        precision: str = "auto",
    ) -> Predictor:
        """The predictor of a trained clip; (re)builds a missing or stale feature cache.

        Args:
            clip: the clip or its directory.
            device: torch device (``auto``: CUDA when available).
            track_cfg: inference settings (default: those stored with the model).
            progress, cancel: for a cache rebuild (stage ``caching``).
            precision: see the class docstring.

        Raises:
            NotTrainedError: the clip has no trained model.
        """
        from .checkpoint import load_model

        clip = _as_clip(clip)
        if not cache_is_fresh(clip):
            logger.info("refined-feature cache of %s missing or stale: rebuilding", clip.clip_id)
            build_refined_cache(clip, device=device, progress=progress, cancel=cancel)
        dev = torch.device(resolve_device(device))
        model, cfg, _ = load_model(_model_path(clip), dev)
        feats = open_array(Path(clip.cache_dir) / "refined.npy")
        return cls(model, feats, orig_size=clip.size, track_cfg=track_cfg or cfg.track,
                   device=dev, stamps_ns=clip.stamps_ns, precision=precision)

    @property
    def num_frames(self) -> int:
        """T."""
        return int(self.features.shape[0])

    def _resident(self) -> torch.Tensor | None:
        """All frames' float32 features on the device, loaded once, or ``None``.

        They stay resident when they and their unit-norm copies (fp32 and the visibility
        pass's dtype) fit in ``track.resident_megabytes``; otherwise every pass reads the
        memory-mapped cache again (RAM independent of the clip length).
        """
        t, c, h, w = (int(s) for s in self.features.shape)
        per_value = 8 + torch.finfo(self.anchor_dtype).bits // 8
        if t * c * h * w * per_value > int(self.track_cfg.resident_megabytes) * (1 << 20):
            return None
        with self._lock:
            if self._raw is None:
                raw = torch.empty(t, c, h, w, device=self.device)
                step = max(1, int(self.track_cfg.frame_batch))
                for t0 in range(0, t, step):
                    block = np.array(self.features[t0:t0 + step])
                    raw[t0:t0 + step] = torch.from_numpy(block).to(self.device, torch.float32)
                self._raw = raw
        return self._raw

    def _frames(self, t0: int, t1: int) -> torch.Tensor:
        """Features of frames [t0, t1) as float32 ``(B, C, h, w)`` on the device (read-only)."""
        raw = self._resident()
        if raw is not None:
            return raw[t0:t1]
        block = np.array(self.features[t0:t1])  # a writable copy of the memory map
        return torch.from_numpy(block).to(self.device, torch.float32)

    def _unit(self, t0: int, t1: int, dtype: torch.dtype) -> torch.Tensor:
        """Unit-norm features of frames [t0, t1) as ``(B, C, h * w)`` in ``dtype``."""
        raw = self._resident()
        if raw is None:
            return F.normalize(self._frames(t0, t1), dim=1, eps=_EPS).flatten(2).to(dtype)
        with self._lock:
            unit = self._unit_cache.get(dtype)
            if unit is None:
                unit = F.normalize(raw, dim=1, eps=_EPS).flatten(2).to(dtype)
                self._unit_cache[dtype] = unit
        return unit[t0:t1]

    def _predict(self, qn: torch.Tensor, tn: torch.Tensor) -> torch.Tensor:
        """Head predictions from unit-norm features, chunked over queries.

        Args:
            qn: (B, Q, C) or (Q, C) unit-norm query features (B may broadcast).
            tn: (B, C, h * w) or (C, h * w) unit-norm target features (same dtype as qn;
                the refiner runs in that dtype too).

        Returns:
            (B, Q, 2) or (Q, 2) working-pixel positions, equal to ``model.predict`` on the
            unnormalised features (cosine cost map, then :func:`locate_windowed`).
        """
        h, w = self.geometry.grid_hw
        lead = torch.broadcast_shapes(qn.shape[:-2], tn.shape[:-2])
        b = int(np.prod(lead)) if len(lead) else 1
        chunk = max(1, MAP_BUDGET // (h * w * b))
        head = self.model.head
        out = []
        for i in range(0, qn.shape[-2], chunk):
            cost = torch.matmul(qn[..., i:i + chunk, :], tn)  # (..., q, h*w)
            cost = cost.reshape(b, -1, h, w)
            out.append(locate_windowed(head, cost, qn.dtype).reshape(*lead, -1, 2))
        return torch.cat(out, dim=-2)

    def _anchor_pass(self, src: torch.Tensor, anchors: torch.Tensor, valid: torch.Tensor,
                     cycle: torch.Tensor) -> None:
        """``cycle[q, j] =`` head predictions of ``src[q] (T, C)`` in frame ``anchors[q, j]``.

        For the valid slots only. The cosine maps of several anchor frames go to the head
        together, up to :data:`MAP_BUDGET` cells per call: with few queries, one call per
        anchor frame would be mostly per-call overhead.
        """
        h, w = self.geometry.grid_hw
        num_t, c = int(src.shape[1]), int(src.shape[2])
        per_piece = max(1, MAP_BUDGET // (h * w * num_t))  # queries per matrix product
        buffer = torch.empty(per_piece * num_t, h * w, device=src.device, dtype=src.dtype)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        rows = 0

        def flush() -> None:
            maps = buffer[:rows].reshape(1, rows, h, w)
            pts = locate_windowed(self.model.head, maps, src.dtype)[0]
            for (qi, si), p in zip(pending, pts.split([len(q) * num_t for q, _ in pending]),
                                   strict=True):
                cycle[qi, si] = p.reshape(len(qi), num_t, 2)
            pending.clear()

        for a in torch.unique(anchors[valid]).tolist():
            qi_all, si_all = torch.nonzero((anchors == a) & valid, as_tuple=True)
            unit = self._unit(a, a + 1, src.dtype)[0]
            for i in range(0, len(qi_all), per_piece):
                qi, si = qi_all[i:i + per_piece], si_all[i:i + per_piece]
                n = len(qi) * num_t
                if rows + n > len(buffer):
                    flush()
                    rows = 0
                torch.matmul(src[qi].reshape(-1, c), unit, out=buffer[rows:rows + n])
                pending.append((qi, si))
                rows += n
        if pending:
            flush()

    def track(self, queries: Any) -> TrackResult:
        """Track query points through every frame of the clip.

        Args:
            queries: (N, 3) (t, x, y) in original pixels; ``t`` an integer frame index.

        Returns:
            :class:`TrackResult` in original pixels. At its own frame a query is placed at
            the query point with visibility 1.

        Raises:
            QueryError: see :func:`validate_queries`.
        """
        q = validate_queries(queries, self.num_frames, self.orig_size)
        n, num_t = len(q), self.num_frames
        frames = q[:, 0].astype(np.int64)
        xy = rescale_points(q[:, 1:], self.orig_size, self.work_size)
        tracks = np.zeros((n, num_t, 2), np.float32)
        score = np.zeros((n, num_t), np.float32)
        c = int(self.features.shape[1])
        batch = max(1, min(int(self.track_cfg.query_batch),
                           FEATURE_BUFFER_BYTES // max(1, num_t * c * 4)))
        with torch.no_grad():
            for i in range(0, n, batch):
                traj, sc = self._track_working(frames[i:i + batch], xy[i:i + batch])
                tracks[i:i + batch] = traj
                score[i:i + batch] = sc
        out = rescale_points(tracks, self.work_size, self.orig_size).astype(np.float32)
        out[np.arange(n), frames] = q[:, 1:]
        score[np.arange(n), frames] = 1.0
        visible = score >= float(self.track_cfg.visibility_threshold)
        return TrackResult(out, visible, score, q, self.stamps_ns.copy())

    def query_features(self, frames: np.ndarray, xy: np.ndarray) -> torch.Tensor:
        """Features ``(Q, C)`` at working-pixel points ``xy (Q, 2)`` of frames ``(Q,)``."""
        out = torch.empty(len(frames), int(self.features.shape[1]), device=self.device)
        pts = torch.as_tensor(xy, dtype=torch.float32, device=self.device)
        for k in np.unique(frames):
            sel = np.flatnonzero(frames == k)
            feats = self._frames(int(k), int(k) + 1)
            out[sel] = self.model.sample(feats, pts[sel][None])[0]
        return out

    def _track_working(self, frames: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Trajectories (Q, T, 2) working px and visibility scores (Q, T) of one query batch."""
        cfg = self.track_cfg
        qn, num_t = len(frames), self.num_frames
        dev = self.device
        qf = self.query_features(frames, xy)  # (Q, C)
        qn_ = F.normalize(qf, dim=-1, eps=_EPS)
        traj = torch.empty(qn, num_t, 2, device=dev)
        cos = torch.empty(qn, num_t, device=dev)
        # unit-norm features at the predictions, in the anchor pass's dtype
        src = torch.empty(qn, num_t, qf.shape[1], device=dev, dtype=self.anchor_dtype)
        fb = max(1, int(cfg.frame_batch))
        for t0 in range(0, num_t, fb):
            t1 = min(t0 + fb, num_t)
            target = self._frames(t0, t1)  # (B, C, h, w)
            pred = self._predict(qn_[None], self._unit(t0, t1, torch.float32))  # (B, Q, 2)
            at = F.normalize(self.model.sample(target, pred), dim=-1, eps=_EPS)  # (B, Q, C)
            traj[:, t0:t1] = pred.transpose(0, 1)
            src[:, t0:t1] = at.transpose(0, 1).to(src.dtype)
            cos[:, t0:t1] = (at * qn_[None]).sum(-1).transpose(0, 1)
        rows = torch.arange(qn, device=dev)
        kq = torch.as_tensor(frames, device=dev)
        traj[rows, kq] = torch.as_tensor(xy, dtype=torch.float32, device=dev)
        src[rows, kq] = qn_.to(src.dtype)
        cos[rows, kq] = 1.0
        anchors, valid = select_anchors(cos, kq, cfg.anchor_cos, cfg.max_anchors)
        cycle = torch.zeros(qn, anchors.shape[1], num_t, 2, device=dev)
        self._anchor_pass(src, anchors, valid, cycle)
        vis = agreement_visibility(cycle, traj, anchors, valid, cos, kq, cfg.occlusion_cos)
        return traj.cpu().numpy(), vis.score.cpu().numpy()
