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

__all__ = ["track_colour", "track_markers"]


def track_colour(index: int) -> ColorRGBA:
    """A distinct, saturated colour per track index (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 1.0)
    return ColorRGBA(r=r, g=g, b=b, a=1.0)


def _points(xy: np.ndarray, scale: float) -> list:
    return [Point(x=float(u) * scale, y=-float(v) * scale, z=0.0) for u, v in xy.tolist()]


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
        dots.colors = [
            ColorRGBA(r=1.0 - s, g=s, b=0.0, a=1.0 if vis else 0.35)
            for s, vis in zip(visibility[i].tolist(), visible[i].tolist(), strict=True)
        ]
        out.append(dots)
    return MarkerArray(markers=out)
