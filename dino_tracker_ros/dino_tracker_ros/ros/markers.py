"""RViz markers for an answered query, drawn in an image-plane frame.

The image-plane frame is the clip's camera ``frame_id`` with image pixel ``(u, v)`` drawn at
``(x, y, z) = (u * scale, -v * scale, 0)`` metres: x to the right, y up, so that with
RViz's fixed frame set to that frame id and the *TopDownOrtho* view the picture appears
upright, exactly as the image (the top-left pixel at the origin, the image extending to
``(W * scale, -H * scale)``). It is a drawing convention, not a 3-D position.

One answer gives, in order:

1. a ``DELETEALL`` marker (clears the previous answer),
2. ``ns="frame"``, id 0: a ``LINE_STRIP`` outlining the image border (grey),
3. per trajectory ``i``: ``ns="tracks"``, id ``i``: a ``LINE_STRIP`` through the positions
   of the frames where the point is visible (the track's own colour), only when it has
   at least two visible frames,
4. per trajectory ``i``: ``ns="points"``, id ``i``: a ``POINTS`` marker with one point per
   frame, coloured by the visibility score (red 0 -> green 1; occluded points are drawn
   semi-transparent).

Markers carry a zero stamp (RViz then uses the latest transform) and never expire.
"""

from __future__ import annotations

import colorsys

import numpy as np
from geometry_msgs.msg import Point
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker, MarkerArray

from .conversions import fills_slots

__all__ = ["track_colour", "track_markers"]

# Points and colours are built by slot assignment when that equals the constructor (see
# conversions.fills_slots): an answer of 1,000 tracks over 50 frames has 150,000 of them.
_FAST_POINT = fills_slots(Point, {"x": 1.5, "y": -2.5, "z": 0.0})
_FAST_COLOUR = fills_slots(ColorRGBA, {"r": 0.25, "g": 0.5, "b": 0.0, "a": 1.0})


def track_colour(index: int) -> ColorRGBA:
    """A distinct, saturated colour per track index (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 1.0)
    return ColorRGBA(r=r, g=g, b=b, a=1.0)


def _points(xy: np.ndarray, scale: float) -> list:
    xyz = np.zeros((len(xy), 3))
    xyz[:, 0] = np.asarray(xy[:, 0], dtype=np.float64) * scale
    xyz[:, 1] = -np.asarray(xy[:, 1], dtype=np.float64) * scale
    if not _FAST_POINT:
        return [Point(x=x, y=y, z=z) for x, y, z in xyz.tolist()]
    new, check, out = object.__new__, "_check_fields" in Point.__slots__, []
    for x, y, z in xyz.tolist():
        p = new(Point)
        if check:
            p._check_fields = False
        p._x, p._y, p._z = x, y, z
        out.append(p)
    return out


def _colours(score: np.ndarray, visible: np.ndarray) -> list:
    """Red (0) to green (1) by score; occluded ones semi-transparent."""
    alpha = np.where(visible, 1.0, 0.35).tolist()
    score = score.tolist()
    if not _FAST_COLOUR:
        return [ColorRGBA(r=1.0 - s, g=s, b=0.0, a=a) for s, a in zip(score, alpha, strict=True)]
    new, check, out = object.__new__, "_check_fields" in ColorRGBA.__slots__, []
    for s, a in zip(score, alpha, strict=True):
        c = new(ColorRGBA)
        if check:
            c._check_fields = False
        c._r, c._g, c._b, c._a = 1.0 - s, s, 0.0, a
        out.append(c)
    return out


def track_markers(
    tracks: np.ndarray,
    visible: np.ndarray,
    visibility: np.ndarray,
    *,
    frame_id: str,
    image_size: tuple,
    scale: float,
) -> MarkerArray:
    """Build the markers of one answer.

    Args:
        tracks: (N, T, 2) float (x, y) positions in original pixels.
        visible: (N, T) bool.
        visibility: (N, T) float scores in [0, 1].
        frame_id: the clip's camera frame id.
        image_size: (H, W) of the clip.
        scale: metres per pixel.

    Returns:
        ``DELETEALL``, the image border, then per track a line strip (when >= 2 visible
        frames) and a points marker.
    """
    tracks = np.asarray(tracks, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool)
    visibility = np.clip(np.asarray(visibility, dtype=np.float64), 0.0, 1.0)
    width = max(scale, 1e-6)

    def marker(ns: str, mid: int, kind: int) -> Marker:
        m = Marker(ns=ns, id=mid, type=kind, action=Marker.ADD)
        m.header.frame_id = frame_id
        m.pose.orientation.w = 1.0
        return m

    out = [Marker(action=Marker.DELETEALL)]
    out[0].header.frame_id = frame_id
    h, w = image_size
    border = marker("frame", 0, Marker.LINE_STRIP)
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5],
                        [-0.5, -0.5]])
    border.points = _points(corners, scale)
    border.scale.x = width
    border.color = ColorRGBA(r=0.6, g=0.6, b=0.6, a=1.0)
    out.append(border)
    for i in range(tracks.shape[0]):
        if visible[i].sum() >= 2:
            line = marker("tracks", i, Marker.LINE_STRIP)
            line.points = _points(tracks[i][visible[i]], scale)
            line.scale.x = width
            line.color = track_colour(i)
            out.append(line)
        dots = marker("points", i, Marker.POINTS)
        dots.points = _points(tracks[i], scale)
        dots.scale.x = dots.scale.y = 4.0 * width
        dots.colors = _colours(visibility[i], visible[i])
        out.append(dots)
    return MarkerArray(markers=out)
