"""Synthetic clips with exact ground-truth tracks and occlusions (tests, demo, benchmarks).

The scene is made of layers cut from real photos shipped with scikit-image (astronaut,
coffee, chelsea, rocket, camera), each moved by its own smooth affine path:

* layer 0, background: a photo larger than the frame, with a slow global translation,
  a slight rotation and scale change;
* layers 1 and 2, objects: elliptical crops of other photos with their own paths
  (object 1 sweeps ~tens of pixels, object 2 is smaller and rotates more);
* layer 3, occluder (optional): an opaque textured bar that passes over object 1 around
  the middle of the clip, so points on it disappear and come back.

Frames are rendered with ``cv2.warpAffine`` (``INTER_LINEAR``) and composited with
premultiplied alpha. OpenCV's warp and our ground truth use the same pixel convention
(integer coordinates at pixel centres), so a texture point ``p`` appears at exactly
``A(t) @ p`` in frame ``t``; the only error is OpenCV's 1/32-pixel coordinate
quantisation (< 0.02 px). A point is occluded where the analytic shape of a layer in
front of it covers it, or where it is outside the image ([-0.5, W - 0.5] x [-0.5, H - 0.5]).
Everything is deterministic for a given seed. Per-frame motion is a few pixels (optical
flow works) and tens of pixels over a 24-frame clip.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .clip import Clip, ClipWriter
from .errors import ClipError, ConfigError
from .storage import atomic_path

__all__ = [
    "GROUND_TRUTH_FILE",
    "LAYER_NAMES",
    "GroundTruth",
    "SyntheticScene",
    "load_ground_truth",
    "make_synthetic_clip",
    "render_synthetic",
]

log = logging.getLogger(__name__)

GROUND_TRUTH_FILE = "ground_truth.npz"
LAYER_NAMES = ("background", "object1", "object2", "occluder")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


# -- ground truth -----------------------------------------------------------------------
@dataclass(frozen=True)
class GroundTruth:
    """Exact tracks of a synthetic clip, in original clip pixels.

    Attributes:
        tracks: (N, T, 2) float32 positions (x, y), also where occluded.
        occluded: (N, T) bool, hidden by a layer in front or outside the image.
        queries: (N, 3) float32 (t, x, y); each point is visible at its query frame.
        layers: (N,) int16 layer of each point (index into :data:`LAYER_NAMES`), or None.
    """

    tracks: np.ndarray
    occluded: np.ndarray
    queries: np.ndarray
    layers: np.ndarray | None = None

    def __post_init__(self) -> None:
        tracks = np.asarray(self.tracks, dtype=np.float32)
        occluded = np.asarray(self.occluded, dtype=bool)
        queries = np.asarray(self.queries, dtype=np.float32)
        if tracks.ndim != 3 or tracks.shape[2] != 2:
            raise ValueError(f"tracks must be (N, T, 2), got {tracks.shape}")
        if occluded.shape != tracks.shape[:2]:
            raise ValueError(f"occluded must be {tracks.shape[:2]}, got {occluded.shape}")
        if queries.shape != (tracks.shape[0], 3):
            raise ValueError(f"queries must be ({tracks.shape[0]}, 3), got {queries.shape}")
        object.__setattr__(self, "tracks", tracks)
        object.__setattr__(self, "occluded", occluded)
        object.__setattr__(self, "queries", queries)
        if self.layers is not None:
            layers = np.asarray(self.layers, dtype=np.int16)
            if layers.shape != (tracks.shape[0],):
                raise ValueError(f"layers must be ({tracks.shape[0]},), got {layers.shape}")
            object.__setattr__(self, "layers", layers)

    @property
    def num_points(self) -> int:
        """N."""
        return int(self.tracks.shape[0])

    @property
    def num_frames(self) -> int:
        """T."""
        return int(self.tracks.shape[1])

    @property
    def visible(self) -> np.ndarray:
        """(N, T) bool, the complement of ``occluded``."""
        return ~self.occluded

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` file atomically."""
        arrays = {"tracks": self.tracks, "occluded": self.occluded, "queries": self.queries}
        if self.layers is not None:
            arrays["layers"] = self.layers
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GroundTruth:
        """Read a file written by :meth:`save`.

        Raises:
            ClipError: the file is unreadable or not a ground-truth file.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    data["tracks"], data["occluded"], data["queries"],
                    data["layers"] if "layers" in data.files else None,
                )
        except (OSError, KeyError, ValueError, EOFError) as exc:
            raise ClipError(f"cannot read ground truth {path}: {exc}") from None


def load_ground_truth(clip: Clip | str | os.PathLike) -> GroundTruth | None:
    """The ground truth of a synthetic clip (a :class:`Clip`, its directory or the file).

    Returns ``None`` when the clip has none.
    """
    path = clip.path if isinstance(clip, Clip) else Path(clip)
    if path.is_dir():
        path = path / GROUND_TRUTH_FILE
    if not path.is_file():
        return None
    return GroundTruth.load(path)


# -- scene description ------------------------------------------------------------------
@dataclass(frozen=True)
class _Shape:
    """A layer's analytic outline in its texture coordinates."""

    kind: str  # "full", "ellipse" or "rect"
    cx: float
    cy: float
    a: float  # semi-axis / half width (x)
    b: float  # semi-axis / half height (y)

    def inside(self, uv: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """(..., 2) texture points -> bool: at least ``margin`` px inside (negative: outside)."""
        if self.kind == "full":
            return np.ones(uv.shape[:-1], dtype=bool)
        du, dv = uv[..., 0] - self.cx, uv[..., 1] - self.cy
        if self.kind == "ellipse":
            r = np.hypot(du / self.a, dv / self.b)
            return r <= 1.0 - margin / min(self.a, self.b)
        return (np.abs(du) <= self.a - margin) & (np.abs(dv) <= self.b - margin)


@dataclass
class _Layer:
    colour: np.ndarray  # (Ht, Wt, 3) float32, premultiplied by alpha
    alpha: np.ndarray | None  # (Ht, Wt) float32; None for the opaque background
    shape: _Shape
    affines: np.ndarray  # (T, 2, 3) float64: texture -> frame pixels
    inverses: np.ndarray = field(init=False)  # (T, 2, 3): frame -> texture

    def __post_init__(self) -> None:
        self.inverses = np.stack([cv2.invertAffineTransform(a) for a in self.affines])


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply 2x3 affine(s) ``m`` (..., 2, 3) to points ``xy`` (..., 2)."""
    return np.einsum("...ij,...j->...i", m[..., :2], xy) + m[..., 2]


@functools.lru_cache(maxsize=8)
def _photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as (H, W, 3) float32 RGB, lightly blurred."""
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3].astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    img.setflags(write=False)
    return img


def _texture(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator,
             zoom: float = 1.0) -> np.ndarray:
    """A (Ht, Wt, 3) crop of ``photo`` covering ``size`` after scaling by ``zoom``."""
    ht, wt = size
    ph, pw = photo.shape[:2]
    scale = max(ht / ph, wt / pw) * zoom
    resized = cv2.resize(
        photo, (max(wt, math.ceil(pw * scale)), max(ht, math.ceil(ph * scale))),
        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC,
    )
    y0 = int(rng.integers(0, resized.shape[0] - ht + 1))
    x0 = int(rng.integers(0, resized.shape[1] - wt + 1))
    return np.ascontiguousarray(resized[y0 : y0 + ht, x0 : x0 + wt])


def _affines(centre_tex: tuple[float, float], centres: np.ndarray, angles: np.ndarray,
             scales: np.ndarray) -> np.ndarray:
    """(T, 2, 3) matrices mapping the texture centre to ``centres`` with rotation/scale."""
    cos, sin = np.cos(angles) * scales, np.sin(angles) * scales
    m = np.zeros((len(centres), 2, 3))
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    c = np.asarray(centre_tex, dtype=np.float64)
    m[:, :, 2] = centres - np.einsum("tij,j->ti", m[:, :, :2], c)
    return m


def _wave(t: np.ndarray, amp: float, period: float, phase: float) -> np.ndarray:
    return amp * np.sin(2.0 * np.pi * t / period + phase)


class SyntheticScene:
    """A layered synthetic scene: renders frames one at a time and knows the exact tracks.

    Args:
        num_frames, height, width: clip size (T, H, W).
        seed: everything (photos, crops, paths, points) is deterministic per seed.
        num_points: number of ground-truth query points N.
        occluder: add the occluding bar (layer 3).
    """

    def __init__(self, num_frames: int, height: int, width: int, seed: int = 0,
                 num_points: int = 64, occluder: bool = True) -> None:
        if num_frames < 1 or height < 32 or width < 32 or num_points < 1:
            raise ConfigError("a synthetic clip needs frames >= 1, height and width >= 32 and "
                              "points >= 1")
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        self._rng = rng
        t = np.arange(self.num_frames, dtype=np.float64)
        H, W = self.height, self.width
        s = min(H, W) / 256.0  # motion scale
        photos = [PHOTOS[i] for i in rng.permutation(len(PHOTOS))]

        def phase() -> float:
            return float(rng.uniform(0, 2 * np.pi))

        # Background: larger than the frame, slow global affine motion.
        margin = int(math.ceil(0.2 * max(H, W)))
        bh, bw = H + 2 * margin, W + 2 * margin
        bg_tex = _texture(_photo(photos[0]), (bh, bw), rng)
        centre = np.array([(W - 1) / 2.0, (H - 1) / 2.0])
        bg_c = centre + np.stack(
            [_wave(t, 18 * s, 80, phase()), _wave(t, 12 * s, 95, phase())], axis=1
        )
        bg_a = np.radians(_wave(t, 2.0, 110, phase()))
        bg_s = 1.0 + _wave(t, 0.03, 130, phase())
        layers = [
            _Layer(bg_tex, None, _Shape("full", 0, 0, 0, 0),
                   _affines(((bw - 1) / 2.0, (bh - 1) / 2.0), bg_c, bg_a, bg_s))
        ]

        # Objects: elliptical crops with their own paths.
        specs = [
            # (semi-axes as fractions of W, H), start (fractions), amplitude, periods, angle
            ((0.17, 0.21), (0.38, 0.55), (0.20, 0.06), (100, 70), 12.0),
            ((0.12, 0.10), (0.72, 0.28), (0.10, 0.12), (75, 90), 20.0),
        ]
        for k, ((fa, fb), (fx, fy), (ax, ay), (px, py), ang) in enumerate(specs):
            a, b = fa * W, fb * H
            th, tw = int(math.ceil(2 * b)) + 8, int(math.ceil(2 * a)) + 8
            tex = _texture(_photo(photos[1 + k]), (th, tw), rng, zoom=float(rng.uniform(1, 1.6)))
            shape = _Shape("ellipse", (tw - 1) / 2.0, (th - 1) / 2.0, a, b)
            vv, uu = np.mgrid[0:th, 0:tw].astype(np.float64)
            alpha = shape.inside(np.stack([uu, vv], -1)).astype(np.float32)
            cen = np.stack(
                [fx * W + _wave(t, ax * W, px, phase()), fy * H + _wave(t, ay * H, py, phase())],
                axis=1,
            )
            angles = np.radians(_wave(t, ang, 120, phase()))
            scales = 1.0 + _wave(t, 0.05, 140, phase())
            layers.append(_Layer(
                tex * alpha[:, :, None], alpha, shape,
                _affines((shape.cx, shape.cy), cen, angles, scales),
            ))

        # Occluder: an opaque bar crossing object 1 around the middle of the clip.
        if occluder:
            oh, ow = int(round(0.8 * H)), max(int(round(0.12 * W)), 6)
            tex = _texture(_photo("camera"), (oh, ow), rng, zoom=1.5)
            shape = _Shape("rect", (ow - 1) / 2.0, (oh - 1) / 2.0, ow / 2.0, oh / 2.0)
            # Constant velocity, against object 1's motion at mid-clip: it crosses object 1
            # at t_mid while moving only ~3.5 px per frame itself.
            t_mid = (self.num_frames - 1) / 2.0
            obj = layers[1].affines[:, :, 2] + layers[1].affines[:, :, :2] @ np.array(
                [layers[1].shape.cx, layers[1].shape.cy]
            )
            i_mid = int(round(t_mid))
            v_obj = obj[min(i_mid + 1, len(t) - 1), 0] - obj[max(i_mid - 1, 0), 0]
            direction = -1.0 if v_obj > 0 else 1.0
            cen = np.stack(
                [np.interp(t_mid, t, obj[:, 0]) + direction * 3.5 * s * (t - t_mid), obj[:, 1]],
                axis=1,
            )
            angles = np.radians(_wave(t, 5.0, 90, phase()))
            layers.append(_Layer(
                tex, np.ones((oh, ow), np.float32), shape,
                _affines((shape.cx, shape.cy), cen, angles, np.ones_like(t)),
            ))
        self.layers = layers
        self.ground_truth = self._make_points(num_points)

    # -- rendering ---------------------------------------------------------------------
    def render(self, t: int) -> np.ndarray:
        """Frame ``t`` as (H, W, 3) uint8 RGB."""
        size = (self.width, self.height)
        bg = self.layers[0]
        out = cv2.warpAffine(bg.colour, bg.affines[t], size, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT_101)
        for layer in self.layers[1:]:
            col = cv2.warpAffine(layer.colour, layer.affines[t], size, flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            alpha = cv2.warpAffine(layer.alpha, layer.affines[t], size, flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            out = out * (1.0 - alpha[:, :, None]) + col
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def frames(self) -> Iterator[np.ndarray]:
        """Yield all frames in order."""
        for t in range(self.num_frames):
            yield self.render(t)

    # -- ground truth ------------------------------------------------------------------
    def track(self, layer: int, query: tuple[float, float, float]) -> np.ndarray:
        """Exact positions (T, 2) of the point of ``layer`` seen at (t, x, y)."""
        lay = self.layers[layer]
        t, x, y = query
        p = _apply(lay.inverses[int(t)], np.array([x, y], dtype=np.float64))
        return _apply(lay.affines, p[None, :].repeat(self.num_frames, 0))

    def covered(self, layer: int, xy: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """(T,) bool: a layer in front of ``layer`` covers positions ``xy`` (T, 2).

        ``margin`` > 0 also counts points within that many pixels outside a front shape.
        """
        out = np.zeros(len(xy), dtype=bool)
        for front in self.layers[layer + 1 :]:
            uv = _apply(front.inverses, xy)
            out |= front.shape.inside(uv, -margin)
        return out

    def _outside(self, xy: np.ndarray, margin: float = 0.0) -> np.ndarray:
        x, y = xy[..., 0], xy[..., 1]
        return (
            (x < -0.5 + margin) | (x > self.width - 0.5 - margin)
            | (y < -0.5 + margin) | (y > self.height - 0.5 - margin)
        )

    def _make_points(self, num_points: int) -> GroundTruth:
        rng = self._rng
        T, H, W = self.num_frames, self.height, self.width
        share = [0.40, 0.30, 0.18, 0.12][: len(self.layers)]
        share = np.asarray(share) / sum(share)
        counts = np.floor(share * num_points).astype(int)
        for i in np.argsort(-(share * num_points - counts))[: num_points - counts.sum()]:
            counts[i] += 1
        border = max(2.0, 0.06 * min(H, W))
        tracks, occluded, queries, layer_ids = [], [], [], []
        for layer, count in enumerate(counts):
            lay = self.layers[layer]
            for k in range(int(count)):
                for _ in range(500):
                    tq = 0 if T == 1 or rng.uniform() < 0.75 else int(rng.integers(1, T))
                    if layer == 0:
                        if k % 4 == 0:  # near the border: some of these leave the frame
                            side = int(rng.integers(4))
                            d = rng.uniform(2.0, border)
                            if side < 2:  # left / right
                                x, y = (d if side == 0 else W - 1 - d), rng.uniform(2, H - 3)
                            else:  # top / bottom
                                x, y = rng.uniform(2, W - 3), (d if side == 2 else H - 1 - d)
                        else:
                            x, y = rng.uniform(2.0, W - 3.0), rng.uniform(2.0, H - 3.0)
                        xy = np.array([x, y])
                    else:
                        sh = lay.shape
                        uv = np.array([rng.uniform(sh.cx - sh.a, sh.cx + sh.a),
                                       rng.uniform(sh.cy - sh.b, sh.cy + sh.b)])
                        if not sh.inside(uv, 3.0):
                            continue
                        xy = _apply(lay.affines[tq], uv)
                    if self._outside(xy, 2.5):
                        continue
                    if self.covered(layer, np.repeat(xy[None], T, 0), 3.0)[tq]:
                        continue
                    break
                else:
                    raise ClipError("could not place a visible query point in the synthetic "
                                    "scene; use a larger size or fewer points")
                track = self.track(layer, (tq, xy[0], xy[1]))
                occ = self.covered(layer, track) | self._outside(track)
                occ[tq] = False
                tracks.append(track)
                occluded.append(occ)
                queries.append((tq, xy[0], xy[1]))
                layer_ids.append(layer)
        order = rng.permutation(num_points)
        return GroundTruth(
            np.asarray(tracks)[order], np.asarray(occluded)[order],
            np.asarray(queries)[order], np.asarray(layer_ids)[order],
        )


def render_synthetic(
    num_frames: int = 24,
    height: int = 256,
    width: int = 256,
    seed: int = 0,
    *,
    num_points: int = 64,
    occluder: bool = True,
) -> tuple[np.ndarray, GroundTruth]:
    """Render a synthetic clip in memory (small clips only).

    Returns:
        frames (T, H, W, 3) uint8 RGB and the exact :class:`GroundTruth`.
    """
    scene = SyntheticScene(num_frames, height, width, seed, num_points, occluder)
    return np.stack(list(scene.frames())), scene.ground_truth


def make_synthetic_clip(
    root: str | os.PathLike,
    clip_id: str = "synthetic",
    *,
    num_frames: int = 24,
    height: int = 256,
    width: int = 256,
    seed: int = 0,
    num_points: int = 64,
    occluder: bool = True,
    fps: float = 10.0,
    overwrite: bool = False,
) -> tuple[Clip, GroundTruth]:
    """Write a synthetic clip (streamed frame by frame) with ``ground_truth.npz`` inside.

    Raises:
        ClipError: the clip exists and ``overwrite`` is false, or a bad id.
    """
    scene = SyntheticScene(num_frames, height, width, seed, num_points, occluder)
    with ClipWriter(
        root, clip_id, fps=fps, frame_id="synthetic_camera",
        source=f"synthetic seed={seed} {width}x{height} occluder={occluder}",
        overwrite=overwrite,
    ) as writer:
        for frame in scene.frames():
            writer.add(frame)
        scene.ground_truth.save(writer.staging_dir / GROUND_TRUTH_FILE)
    assert writer.clip is not None
    return writer.clip, scene.ground_truth
