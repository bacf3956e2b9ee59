"""Coordinate conventions, in one place.

Pixels follow OpenCV: x to the right, y down, the centre of the top-left pixel at
(0.0, 0.0), so the image spans [-0.5, W - 0.5]. Three frames of reference exist:

* original pixels of the clip (the public API and the messages),
* working pixels, after resizing frames to the working resolution (H, W),
* the ViT token grid (h, w): token (i, j) covers working pixels
  [j*stride, j*stride + patch) horizontally, so its centre is at
  x = j*stride + (patch - 1) / 2.

Inside models positions are normalised for ``grid_sample(..., align_corners=True)`` on
the token grid: -1 is the first token centre and +1 the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GridGeometry", "rescale_points", "working_size"]

PATCH = 14


def working_size(
    orig_hw: tuple[int, int], height: int, width: int, stride: int, patch: int = PATCH
) -> tuple[int, int]:
    """Working (H, W) for a clip of size ``orig_hw``.

    ``height`` or ``width`` may be 0 to keep the aspect ratio. Both are rounded to the
    nearest size whose token grid tiles the image exactly ((H - patch) % stride == 0).
    """
    oh, ow = orig_hw
    if height <= 0 and width <= 0:
        height = oh
    if height <= 0:
        height = round(width * oh / ow)
    if width <= 0:
        width = round(height * ow / oh)

    def snap(v: int) -> int:
        return max(patch, patch + stride * round((v - patch) / stride))

    return snap(int(height)), snap(int(width))


def rescale_points(xy: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Map pixel coordinates ``(..., 2)`` (x, y) from an image of size src_hw to dst_hw."""
    xy = np.asarray(xy, dtype=np.float64)
    sx = dst_hw[1] / src_hw[1]
    sy = dst_hw[0] / src_hw[0]
    out = np.empty_like(xy)
    out[..., 0] = (xy[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = (xy[..., 1] + 0.5) * sy - 0.5
    return out


@dataclass(frozen=True)
class GridGeometry:
    """Where the ViT tokens sit in the working image.

    Attributes:
        height, width: working image size (H, W) in pixels.
        stride: patch-embedding stride.
        patch: patch size (14 for DINOv2).
    """

    height: int
    width: int
    stride: int
    patch: int = PATCH

    @property
    def grid_hw(self) -> tuple[int, int]:
        """Token grid size (h, w)."""
        return (
            (self.height - self.patch) // self.stride + 1,
            (self.width - self.patch) // self.stride + 1,
        )

    @property
    def offset(self) -> float:
        """Working-pixel coordinate of the first token's centre."""
        return (self.patch - 1) / 2.0

    def pixel_to_grid(self, xy):
        """Working pixels (x, y) -> continuous token indices (j, i). Works on arrays/tensors."""
        return (xy - self.offset) / self.stride

    def grid_to_pixel(self, ji):
        """Continuous token indices (j, i) -> working pixels (x, y)."""
        return ji * self.stride + self.offset

    def pixel_to_norm(self, xy):
        """Working pixels (..., 2) -> [-1, 1] coordinates for ``grid_sample(align_corners=True)``.

        Accepts numpy arrays or torch tensors (the result has the same type).
        """
        h, w = self.grid_hw
        scale = xy.new_tensor([w - 1, h - 1]) if hasattr(xy, "new_tensor") else np.array(
            [w - 1, h - 1], dtype=np.float64
        )
        scale = scale.clip(min=1) if hasattr(scale, "clip") else scale
        return 2.0 * self.pixel_to_grid(xy) / scale - 1.0

    def norm_to_pixel(self, uv):
        """Inverse of :meth:`pixel_to_norm`."""
        h, w = self.grid_hw
        scale = uv.new_tensor([w - 1, h - 1]) if hasattr(uv, "new_tensor") else np.array(
            [w - 1, h - 1], dtype=np.float64
        )
        scale = scale.clip(min=1) if hasattr(scale, "clip") else scale
        return self.grid_to_pixel((uv + 1.0) * scale / 2.0)

    def token_centres(self) -> np.ndarray:
        """Working-pixel centres of all tokens, shape (h, w, 2) float32 (x, y)."""
        h, w = self.grid_hw
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        return np.stack([self.grid_to_pixel(xs), self.grid_to_pixel(ys)], -1).astype(np.float32)
