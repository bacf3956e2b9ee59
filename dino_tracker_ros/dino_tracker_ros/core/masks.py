"""Foreground masks, used to balance the flow and contrastive point samplers (METHOD.md).

Sources (``preprocess.masks.source``):

* ``pca``: the first principal component of the clip's DINO tokens, as the DINO-Tracker
  reference does it: tokens are L2-normalised, projected onto the first principal
  component, min-max normalised over the clip, and ``foreground = value < threshold``.
  The component is fitted on a bounded random subsample of tokens (memory does not grow
  with the clip). Its sign is arbitrary, so we choose it by a documented rule: **the sign
  for which fewer tokens on the image border are foreground** (the border is mostly
  background in ordinary footage); ties go to the sign with less foreground overall.
  The normalised component is upsampled bilinearly from the token grid (token centres as
  in :class:`~.geometry.GridGeometry`) to the working resolution and then thresholded.
* ``dir``: one mask image per frame from a directory (sorted by name; resized with nearest
  neighbour; any value > 0 is foreground).
* ``none``: everything is foreground.

Output: (T, H, W) uint8 in {0, 1}, written atomically as a ``.npy`` memmap.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import cv2
import numpy as np

from .config import MaskConfig
from .errors import ConfigError
from .geometry import PATCH, GridGeometry
from .progress import CancelToken, ProgressCallback, StageReporter
from .storage import create_array, open_array

__all__ = [
    "compute_masks",
    "fit_first_component",
    "load_mask_dir",
    "pca_masks",
]

log = logging.getLogger(__name__)

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MAX_PCA_TOKENS = 65536


def compute_masks(
    features: np.ndarray,
    cfg: MaskConfig,
    out_hw: tuple[int, int],
    out_path: str | os.PathLike,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    start: float = 0.0,
    end: float = 1.0,
) -> np.ndarray:
    """Foreground masks of a clip from the source chosen in ``cfg``.

    Args:
        features: (T, C, h, w) DINO tokens (array-like, e.g. the float16 memmap); only
            its length is used for ``dir`` and ``none``.
        cfg: mask settings (source, directory, threshold).
        out_hw: working resolution (H, W).
        out_path: destination ``.npy`` file.
        progress, cancel, start, end: progress reporting (stage ``masks``), cancellation.

    Returns:
        Read-only memmap (T, H, W) uint8 in {0, 1}.

    Raises:
        ConfigError: unknown source, or an unusable mask directory.
    """
    num_frames = int(features.shape[0]) if hasattr(features, "shape") else len(features)
    if cfg.source == "pca":
        masks = pca_masks(
            features, out_hw, out_path, threshold=cfg.threshold, progress=progress,
            cancel=cancel, start=start, end=end,
        )
    elif cfg.source == "dir":
        masks = load_mask_dir(
            cfg.directory, num_frames, out_hw, out_path, progress=progress, cancel=cancel,
            start=start, end=end,
        )
    elif cfg.source == "none":
        reporter = StageReporter(progress, "masks", num_frames, start, end, cancel)
        with create_array(out_path, (num_frames, *out_hw), np.uint8) as out:
            for t in range(num_frames):
                out[t] = 1
                reporter.update(t + 1)
        masks = open_array(out_path)
    else:
        raise ConfigError(
            f"preprocess.masks.source: use pca, dir or none; got {cfg.source!r}"
        )
    _log_degenerate(masks, cfg.source)
    return masks


def _log_degenerate(masks: np.ndarray, source: str) -> None:
    fg = 0
    for t in range(masks.shape[0]):
        fg += int(np.count_nonzero(masks[t]))
    total = int(np.prod(masks.shape))
    share = fg / max(total, 1)
    if source != "none" and share in (0.0, 1.0):
        log.warning(
            "foreground masks (%s) are all %s: fg/bg balancing has no effect",
            source, "foreground" if share == 1.0 else "background",
        )
    else:
        log.info("foreground masks (%s): %.1f%% foreground", source, 100 * share)


# -- PCA --------------------------------------------------------------------------------
def _tokens(frame_features: np.ndarray) -> np.ndarray:
    """(C, h, w) -> L2-normalised tokens (h*w, C) float64."""
    c = frame_features.shape[0]
    x = np.asarray(frame_features, dtype=np.float64).reshape(c, -1).T
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_first_component(
    features: np.ndarray,
    max_tokens: int = MAX_PCA_TOKENS,
    seed: int = 0,
    cancel: CancelToken | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and first principal axis of L2-normalised tokens, from a bounded subsample.

    Args:
        features: (T, C, h, w) array-like.
        max_tokens: tokens sampled over the whole clip (uniformly per frame).

    Returns:
        mean (C,) and unit axis (C,), float64. Memory: O(C^2 + max_tokens / T * C).
    """
    num_frames, c = int(features.shape[0]), int(features.shape[1])
    n_tok = int(np.prod(features.shape[2:]))
    per_frame = max(1, min(n_tok, math.ceil(max_tokens / num_frames)))
    rng = np.random.default_rng(seed)
    total = np.zeros(c)
    gram = np.zeros((c, c))
    count = 0
    for t in range(num_frames):
        if cancel is not None:
            cancel.check()
        tok = _tokens(features[t])
        if per_frame < n_tok:
            tok = tok[rng.choice(n_tok, per_frame, replace=False)]
        total += tok.sum(0)
        gram += tok.T @ tok
        count += tok.shape[0]
    mean = total / count
    cov = gram / count - np.outer(mean, mean)
    _, vecs = np.linalg.eigh(cov)
    return mean, vecs[:, -1]


def _border(a: np.ndarray) -> np.ndarray:
    """Values on the outer ring of a (h, w) array."""
    if min(a.shape) <= 2:
        return a.ravel()
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def _geometry(grid_hw: tuple[int, int], out_hw: tuple[int, int]) -> GridGeometry:
    """The token geometry of a (h, w) grid computed on frames of size ``out_hw``."""
    gaps = [(o - PATCH, g - 1) for g, o in zip(grid_hw, out_hw, strict=True) if g > 1]
    stride = round(gaps[0][0] / gaps[0][1]) if gaps else PATCH
    geom = GridGeometry(int(out_hw[0]), int(out_hw[1]), max(int(stride), 1))
    exact = all((o - PATCH) % geom.stride == 0 for o in out_hw)
    if geom.grid_hw != tuple(grid_hw) or not exact:
        raise ValueError(
            f"a {grid_hw} token grid does not fit frames of size {tuple(out_hw)}"
        )
    return geom


def _upsample_maps(geom: GridGeometry) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps (H, W) float32 from working pixels to continuous token indices."""
    xs = geom.pixel_to_grid(np.arange(geom.width, dtype=np.float64)).astype(np.float32)
    ys = geom.pixel_to_grid(np.arange(geom.height, dtype=np.float64)).astype(np.float32)
    shape = (geom.height, geom.width)
    return (
        np.ascontiguousarray(np.broadcast_to(xs[None, :], shape)),
        np.ascontiguousarray(np.broadcast_to(ys[:, None], shape)),
    )


def pca_masks(
    features: np.ndarray,
    out_hw: tuple[int, int],
    out_path: str | os.PathLike,
    *,
    threshold: float = 0.6,
    max_tokens: int = MAX_PCA_TOKENS,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    start: float = 0.0,
    end: float = 1.0,
) -> np.ndarray:
    """Foreground masks from the first principal component of DINO tokens (module doc).

    Args:
        features: (T, C, h, w) array-like DINO tokens of the working frames.
        out_hw: working resolution (H, W) the tokens were computed on.
        out_path: destination ``.npy`` file.
        threshold: foreground where the normalised component is below this.
        max_tokens: tokens used to fit the component.

    Returns:
        Read-only memmap (T, H, W) uint8 in {0, 1}.
    """
    num_frames = int(features.shape[0])
    grid_hw = (int(features.shape[2]), int(features.shape[3]))
    height, width = int(out_hw[0]), int(out_hw[1])
    map_x, map_y = _upsample_maps(_geometry(grid_hw, (height, width)))
    reporter = StageReporter(progress, "masks", 3 * num_frames, start, end, cancel)
    mean, axis = fit_first_component(features, max_tokens, seed, cancel)
    reporter.update(num_frames)

    # Pass 1: the range of the projection over the clip, and the border values.
    lo, hi = math.inf, -math.inf
    borders = []
    for t in range(num_frames):
        proj = ((_tokens(features[t]) - mean) @ axis).reshape(grid_hw)
        lo, hi = min(lo, float(proj.min())), max(hi, float(proj.max()))
        borders.append(_border(proj))
        reporter.update(num_frames + t + 1)
    span = max(hi - lo, 1e-12)
    border = (np.concatenate(borders) - lo) / span
    # Sign rule: fewer border tokens in the foreground (normalised value < threshold).
    fg_pos = np.mean(border < threshold)
    fg_neg = np.mean((1.0 - border) < threshold)
    sign = 1.0 if fg_pos <= fg_neg else -1.0
    log.debug("pca masks: border fg share %.3f (+) / %.3f (-); sign %+d", fg_pos, fg_neg, sign)

    # Pass 2: normalise, upsample bilinearly, threshold.
    with create_array(out_path, (num_frames, height, width), np.uint8) as out:
        for t in range(num_frames):
            proj = ((_tokens(features[t]) - mean) @ axis).reshape(grid_hw)
            norm = (proj - lo) / span
            if sign < 0:
                norm = 1.0 - norm
            up = cv2.remap(
                norm.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REPLICATE,
            )
            out[t] = (up < threshold).astype(np.uint8)
            reporter.update(2 * num_frames + t + 1)
    return open_array(out_path)


# -- mask images ------------------------------------------------------------------------
def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def load_mask_dir(
    directory: str | os.PathLike,
    num_frames: int,
    out_hw: tuple[int, int],
    out_path: str | os.PathLike,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    start: float = 0.0,
    end: float = 1.0,
) -> np.ndarray:
    """Masks from one image per frame in ``directory`` (png/jpg/jpeg/bmp, natural order).

    Images are resized to ``out_hw`` with nearest neighbour; any value > 0 is foreground.

    Returns:
        Read-only memmap (T, H, W) uint8 in {0, 1}.

    Raises:
        ConfigError: missing directory, unreadable image, or a count different from T.
    """
    if not str(directory):
        raise ConfigError("preprocess.masks.directory is empty; set it to a folder of masks")
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"preprocess.masks.directory not found: {folder}")
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in MASK_SUFFIXES and p.is_file()),
        key=lambda p: _natural_key(p.name),
    )
    if len(files) != num_frames:
        raise ConfigError(
            f"{folder} holds {len(files)} mask images but the clip has {num_frames} frames; "
            "give one mask per frame"
        )
    height, width = int(out_hw[0]), int(out_hw[1])
    reporter = StageReporter(progress, "masks", num_frames, start, end, cancel)
    with create_array(out_path, (num_frames, height, width), np.uint8) as out:
        for t, path in enumerate(files):
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise ConfigError(f"cannot read mask image {path}")
            if img.ndim == 3:
                img = img.max(axis=2)
            if img.shape != (height, width):
                img = cv2.resize(img, (width, height), interpolation=cv2.INTER_NEAREST)
            out[t] = (img > 0).astype(np.uint8)
            reporter.update(t + 1)
    return open_array(out_path)
