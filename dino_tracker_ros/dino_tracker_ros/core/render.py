"""Drawing tracks on frames: the CLI overlay video, the demo contact sheet, the ROS overlay.

Frames are ``(H, W, 3) uint8`` RGB; positions are (x, y) pixels of that frame with OpenCV's
convention (centre of the top-left pixel at (0, 0)). Drawing uses OpenCV with a sub-pixel
``shift`` so that tracks do not jitter by rounding. Visible points are filled discs,
occluded points hollow circles with a cross; each track has its own colour and a trail of
its last few positions (segments between visible positions only: occluded positions are
guesses and would streak across the image).
"""

from __future__ import annotations

import colorsys
import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from .errors import DinoTrackerError
from .storage import atomic_path

__all__ = ["contact_sheet", "draw_tracks", "track_colors", "write_overlay_video"]

_SHIFT = 4
_ONE = 1 << _SHIFT


def track_colors(n: int) -> np.ndarray:
    """``n`` distinct, bright RGB colours (golden-ratio hue steps), shape (n, 3) uint8."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rgb = [colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]
    return np.round(np.asarray(rgb, dtype=np.float64).reshape(n, 3) * 255).astype(np.uint8)


def _fixed(xy: np.ndarray) -> tuple:
    """(x, y) float pixels -> OpenCV fixed-point integers for ``shift=_SHIFT``."""
    return int(round(float(xy[0]) * _ONE)), int(round(float(xy[1]) * _ONE))


def draw_tracks(
    frame: np.ndarray,
    tracks: np.ndarray,
    visible: np.ndarray,
    t: int,
    *,
    trail: int = 8,
    colors: np.ndarray | None = None,
    radius: float | None = None,
) -> np.ndarray:
    """Draw the tracks' positions at frame ``t`` (and their trails) on a copy of ``frame``.

    Args:
        frame: (H, W, 3) uint8 RGB.
        tracks: (N, T, 2) float (x, y) in ``frame``'s pixels; non-finite points are skipped.
        visible: (N, T) bool.
        t: frame index into the tracks.
        trail: number of previous frames connected by the trail (0: none).
        colors: (N, 3) uint8 RGB per track; default :func:`track_colors`.
        radius: marker radius in pixels; default scales with the frame size.

    Returns:
        (H, W, 3) uint8 RGB, a new array.
    """
    img = np.ascontiguousarray(frame, dtype=np.uint8).copy()
    tracks = np.asarray(tracks, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool)
    n, num_t = visible.shape
    if not 0 <= t < num_t:
        raise ValueError(f"frame index {t} outside [0, {num_t})")
    colors = track_colors(n) if colors is None else np.asarray(colors, dtype=np.uint8)
    h, w = img.shape[:2]
    r = max(2.0, min(h, w) / 100.0) if radius is None else float(radius)
    r_fixed = max(1, int(round(r * _ONE)))
    thick = max(1, int(round(r / 5.0)))
    finite = np.isfinite(tracks).all(axis=-1)
    start = max(0, t - int(trail))
    for i in range(n):
        col = tuple(int(c) for c in colors[i])
        for s in range(start, t):
            if finite[i, s] and finite[i, s + 1] and visible[i, s] and visible[i, s + 1]:
                cv2.line(img, _fixed(tracks[i, s]), _fixed(tracks[i, s + 1]), col, thick,
                         cv2.LINE_AA, _SHIFT)
        if not finite[i, t]:
            continue
        centre = _fixed(tracks[i, t])
        if visible[i, t]:
            cv2.circle(img, centre, r_fixed, col, -1, cv2.LINE_AA, _SHIFT)
            cv2.circle(img, centre, r_fixed, (0, 0, 0), 1, cv2.LINE_AA, _SHIFT)
        else:
            cv2.circle(img, centre, r_fixed, col, thick, cv2.LINE_AA, _SHIFT)
            d = int(round(r * 0.7 * _ONE))
            cx, cy = centre
            cv2.line(img, (cx - d, cy - d), (cx + d, cy + d), col, thick, cv2.LINE_AA, _SHIFT)
            cv2.line(img, (cx - d, cy + d), (cx + d, cy - d), col, thick, cv2.LINE_AA, _SHIFT)
    return img


def write_overlay_video(
    path: str | os.PathLike[str],
    frames: Iterable[np.ndarray],
    tracks: np.ndarray,
    visible: np.ndarray,
    fps: float,
    *,
    trail: int = 8,
    colors: np.ndarray | None = None,
) -> int:
    """Write an MP4 (``mp4v``) of ``frames`` with the tracks drawn; atomic, streams frames.

    Args:
        path: destination ``.mp4``.
        frames: iterable of (H, W, 3) uint8 RGB frames, in clip order (e.g. a memmap).
        tracks: (N, T, 2) float (x, y) in the frames' pixels.
        visible: (N, T) bool.
        fps: frame rate written into the file.
        trail: trail length in frames.
        colors: (N, 3) uint8 RGB per track.

    Returns:
        Number of frames written.

    Raises:
        DinoTrackerError: OpenCV cannot write the file (no encoder, unwritable folder).
    """
    path = Path(path)
    colors = track_colors(len(tracks)) if colors is None else colors
    fps = float(fps) if fps and fps > 0 else 10.0
    count = 0
    with atomic_path(path) as tmp:
        video_tmp = tmp.with_name(tmp.name + ".mp4")  # OpenCV picks the container by suffix
        writer: cv2.VideoWriter | None = None
        try:
            for frame in frames:
                if count >= tracks.shape[1]:
                    break
                img = draw_tracks(frame, tracks, visible, count, trail=trail, colors=colors)
                if writer is None:
                    h, w = img.shape[:2]
                    writer = cv2.VideoWriter(
                        str(video_tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h)
                    )
                    if not writer.isOpened():
                        raise DinoTrackerError(
                            f"cannot write video {path}: OpenCV has no mp4v encoder or the "
                            "folder is not writable; choose another output folder"
                        )
                writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                count += 1
            if writer is None:
                raise DinoTrackerError(f"no frames to write to {path}")
            writer.release()
            writer = None
            os.replace(video_tmp, tmp)
        finally:
            if writer is not None:
                writer.release()
            with contextlib.suppress(OSError):
                video_tmp.unlink()
    return count


def contact_sheet(
    frames: np.ndarray | Sequence[np.ndarray],
    tracks: np.ndarray,
    visible: np.ndarray,
    indices: Sequence[int],
    cols: int = 4,
    *,
    trail: int = 8,
    colors: np.ndarray | None = None,
    label: bool = True,
) -> np.ndarray:
    """Tile frames ``indices`` with the tracks drawn into one image (rows of ``cols``).

    Args:
        frames: (T, H, W, 3) uint8 RGB (array, memmap, or a sequence of frames).
        tracks: (N, T, 2) float (x, y) in the frames' pixels.
        visible: (N, T) bool.
        indices: frame indices to show, in order.
        cols: tiles per row.
        trail: trail length in frames.
        colors: (N, 3) uint8 RGB per track.
        label: write the frame index in each tile's corner.

    Returns:
        (rows * H, cols * W, 3) uint8 RGB; unused tiles are black.
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("contact_sheet needs at least one frame index")
    colors = track_colors(len(tracks)) if colors is None else colors
    cols = max(1, min(int(cols), len(indices)))
    rows = -(-len(indices) // cols)
    h, w = np.asarray(frames[indices[0]]).shape[:2]
    sheet = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k, t in enumerate(indices):
        tile = draw_tracks(np.asarray(frames[t]), tracks, visible, t, trail=trail, colors=colors)
        if label:
            scale = max(0.4, h / 400.0)
            org = (4, int(18 * scale) + 2)
            cv2.putText(tile, f"t={t}", org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3,
                        cv2.LINE_AA)
            cv2.putText(tile, f"t={t}", org, cv2.FONT_HERSHEY_SIMPLEX, scale,
                        (255, 255, 255), 1, cv2.LINE_AA)
        r, c = divmod(k, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile
    return sheet
