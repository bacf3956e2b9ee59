"""Delta-DINO (Phi_Delta) and the tracker head (METHOD.md, eq. 2).

Refined features are ``Phi = Phi_DINO + resample(Phi_Delta(I))``. The tracker head turns a
query feature and a target frame's feature grid into a position: cosine cost map, ReLU, a
tiny refiner, spatial softmax and a soft-argmax restricted to a disc around the cost map's
peak. Positions in and out of the public API are *working pixels* (OpenCV convention, see
:mod:`.geometry`); normalised token-grid coordinates are used only for sampling.

Nothing here hard-codes a device or a resolution: every size comes from the
:class:`~.geometry.GridGeometry` and the :class:`~.config.ModelConfig`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import ConfigError
from .geometry import GridGeometry

__all__ = [
    "BlurPool",
    "DeltaDino",
    "DinoTrackerModel",
    "NormalizedConv2d",
    "TrackerHead",
    "gather_points",
    "sample_points",
    "unit_channels",
]

_EPS = 1e-8


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of ``(B, 3, H, W)`` images in [0, 1]."""
    from .backbone import normalise

    return normalise(x)


class NormalizedConv2d(nn.Module):
    """A convolution whose every kernel ``weight[o, i]`` is divided by its own sum.

    The normalisation keeps a map's overall level while the learned kernel reshapes it
    (sharpening when the kernel has negative taps). Sums closer to 0 than 1e-8 are
    replaced by +-1e-8.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.padding = kernel_size // 2
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        nn.init.uniform_(self.bias, -bound, bound)

    def normalized_weight(self) -> torch.Tensor:
        """The kernels divided by their sums, shape ``(out, in, k, k)``."""
        s = self.weight.sum(dim=(2, 3), keepdim=True)
        sign = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
        s = torch.where(s.abs() < _EPS, sign * _EPS, s)
        return self.weight / s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in, h, w) -> (N, out, h, w)`` (zero padding)."""
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding)


class BlurPool(nn.Module):
    """Anti-aliased stride-2 downsampling: binomial [1, 3, 3, 1] blur, reflect padding.

    Output ``k`` is centred on input position ``2 k + 0.5``; :class:`DeltaDino` accounts
    for that offset when it aligns its output with the ViT grid. The blur runs as a
    depthwise 4x4 convolution with stride 2 (only the kept outputs are computed; in
    channels-last memory this is several times faster on CPUs than blurring every pixel
    first, forward and backward).
    """

    offset = 0.5

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 64.0
        self.register_buffer("kernel", kernel.expand(channels, 1, 4, 4).contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, ceil(H / 2), ceil(W / 2))``, in the input's dtype."""
        with torch.autocast(x.device.type, enabled=False):  # autocast would pad in fp32
            x = F.pad(x, (1, 2, 1, 2), mode="reflect")
            return F.conv2d(x, self.kernel.to(x.dtype), stride=2, groups=self.channels)


class _ReflectConv2d(nn.Conv2d):
    """``nn.Conv2d`` with reflect padding whose padding runs in the convolution's dtype.

    Under autocast, ``F.pad`` runs in fp32 (a cast of the whole input up and back down
    around every convolution); here the input is cast once to the autocast dtype first.
    Same parameters and state-dict keys as ``nn.Conv2d(..., padding_mode="reflect")``.
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            x = F.pad(x.to(dtype), self._reversed_padding_repeated_twice, mode="reflect")
            return F.conv2d(x, weight.to(dtype), None if bias is None else bias.to(dtype),
                            self.stride, 0, self.dilation, self.groups)


class DeltaDino(nn.Module):
    """The residual CNN Phi_Delta (METHOD.md, Features).

    ``len(cfg.delta_channels) + 1`` convolutions ``3 -> c1 -> ... -> out_channels`` of size
    ``cfg.delta_kernel`` with dilations ``cfg.delta_dilations``, reflect padding, BatchNorm
    after each, ReLU after all but the last and a :class:`BlurPool` after all but the last
    (reference: 5x5, 3->64->128->256->C, dilations 1,1,1,2, total stride 8). The last conv
    is zero-initialised and its BatchNorm scale set to ``cfg.delta_last_bn_scale``, so the
    output is exactly 0 at initialisation.

    Attributes:
        stride: total downsampling factor (8 for three blur pools).
        offset: working-pixel position of output index 0 (output ``k`` is centred at
            ``k * stride + offset``).
    """

    def __init__(self, out_channels: int, cfg: ModelConfig) -> None:
        super().__init__()
        chans = (3, *cfg.delta_channels, int(out_channels))
        n = len(chans) - 1
        if len(cfg.delta_dilations) != n:
            raise ConfigError(
                f"model.delta_dilations needs {n} entries (one per conv), "
                f"got {len(cfg.delta_dilations)}"
            )
        layers: list[nn.Module] = []
        stride, offset = 1, 0.0
        for i in range(n):
            dil = int(cfg.delta_dilations[i])
            conv = _ReflectConv2d(
                chans[i], chans[i + 1], cfg.delta_kernel, dilation=dil,
                padding=dil * (cfg.delta_kernel - 1) // 2, padding_mode="reflect",
            )
            bn = nn.BatchNorm2d(chans[i + 1])
            layers += [conv, bn]
            if i < n - 1:
                layers += [nn.ReLU(inplace=True), BlurPool(chans[i + 1])]
                offset += BlurPool.offset * stride
                stride *= 2
            else:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
                nn.init.constant_(bn.weight, cfg.delta_last_bn_scale)
        self.layers = nn.Sequential(*layers)
        self.stride = stride
        self.offset = offset
        self.out_channels = int(out_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` float in [0, 1] -> residual ``(B, C, ~H/8, ~W/8)``."""
        # channels-last: the CPU's (oneDNN) convolutions run without layout reorders
        return self.layers(_normalise(images).contiguous(memory_format=torch.channels_last))


def unit_channels(x: torch.Tensor) -> torch.Tensor:
    """``x (B, C, ...)`` scaled to unit L2 norm along C (as ``F.normalize(x, dim=1)``).

    One multiplication by a broadcast inverse norm: its backward is two passes over ``x``
    instead of ``F.normalize``'s five (it divides by the norm expanded to ``x``'s shape).
    """
    return x * torch.rsqrt((x * x).sum(dim=1, keepdim=True).clamp_min(_EPS * _EPS))


def _cost(query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``query (B, Q, C)`` with every cell of ``target (B, C, h, w)``."""
    q = F.normalize(query, dim=-1, eps=_EPS)
    t = F.normalize(target, dim=1, eps=_EPS)
    return torch.einsum("bqc,bchw->bqhw", q, t)


class TrackerHead(nn.Module):
    """Cost map -> position (eq. 2).

    ``ReLU(cos)`` -> refiner (conv 1->16 3x3, ReLU, conv 16->1 3x3, sum-normalised kernels)
    -> spatial softmax (no temperature) -> soft-argmax over the token centres within
    ``cfg.radius`` working pixels of the raw cosine map's argmax. The post-cost part runs
    in float32 even under autocast: soft-argmax positions need more than bf16's 8 bits.

    Args:
        geometry: token grid of the working image.
        cfg: ``radius`` and ``refiner`` are used.
    """

    def __init__(self, geometry: GridGeometry, cfg: ModelConfig) -> None:
        super().__init__()
        self.geometry = geometry
        self.radius = float(cfg.radius)
        self.refiner: nn.Module = (
            nn.Sequential(NormalizedConv2d(1, 16), nn.ReLU(inplace=True), NormalizedConv2d(16, 1))
            if cfg.refiner
            else nn.Identity()
        )
        centres = torch.from_numpy(geometry.token_centres().reshape(-1, 2))
        self.register_buffer("centres", centres, persistent=False)

    def cost(self, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Raw cosine similarity ``(B, Q, h, w)`` of queries ``(B, Q, C)`` and ``(B, C, h, w)``."""
        return _cost(query, target)

    def soft_argmax(self, logits: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """Softmax-weighted mean token centre within ``radius`` of the ``peak`` token.

        The spatial softmax restricted to the disc and renormalised there, computed as a
        softmax over the disc's cells only: the same value, without the underflow of the
        whole-map softmax when the map peaks far outside the disc (an untrained refiner
        gives logits in the hundreds). Only the disc matters, which is what lets
        :func:`~.predictor.locate_windowed` run the refiner on a window and agree exactly.

        Args:
            logits: ``(..., h, w)`` scores (softmax without temperature is applied here).
            peak: ``(...)`` long, flat index ``i * w + j`` of the disc's centre token.

        Returns:
            ``(..., 2)`` float32 working-pixel (x, y).
        """
        lead = logits.shape[:-2]
        flat = logits.float().reshape(-1, logits.shape[-2] * logits.shape[-1])
        centres = self.centres.to(flat.device)
        d2 = (centres[None] - centres[peak.reshape(-1)][:, None]).square().sum(-1)
        w = torch.softmax(flat.masked_fill(d2 > self.radius**2, -float("inf")), dim=-1)
        return (w @ centres).reshape(*lead, 2)

    def locate(self, cost: torch.Tensor) -> torch.Tensor:
        """Positions ``(B, Q, 2)`` working px from raw cosine maps ``(B, Q, h, w)``."""
        b, q, h, w = cost.shape
        with torch.autocast(device_type=cost.device.type, enabled=False):
            cost = cost.float()
            peak = cost.reshape(b, q, h * w).argmax(-1)
            heat = self.refiner(F.relu(cost).reshape(b * q, 1, h, w)).reshape(b, q, h, w)
            return self.soft_argmax(heat, peak)

    def locate_windowed(self, cost: torch.Tensor) -> torch.Tensor:
        """:meth:`locate` with the refiner run only around each cost map's peak (training).

        The soft-argmax reads only the disc of ``radius`` around the raw peak, and each
        3x3 refiner convolution reads one cell around its output; so the refiner runs
        unpadded on the disc's window plus that margin, with the cells outside the map set
        to 0 after every layer (what zero padding gives on the whole map). Same values and
        gradients as :meth:`locate` (up to rounding) for a fraction of the work
        (``(2 r + 5)^2`` cells instead of ``h w``). A refiner of other layers than
        :class:`NormalizedConv2d` and ReLU runs through :meth:`locate`.
        """
        layers = list(self.refiner.children()) if isinstance(self.refiner, nn.Sequential) else []
        if not layers or not all(isinstance(m, (NormalizedConv2d, nn.ReLU)) for m in layers):
            return self.locate(cost)
        b, q, h, w = cost.shape
        n, dev = b * q, cost.device
        stride = float(self.geometry.stride)
        r = int(math.floor(self.radius / stride + 1e-6))
        margin = sum(m.padding for m in layers if isinstance(m, NormalizedConv2d))
        offs = torch.arange(-(r + margin), r + margin + 1, device=dev)
        with torch.autocast(device_type=dev.type, enabled=False):
            maps = cost.float().reshape(n, h * w)
            peak = maps.argmax(-1)
            rows = (peak // w)[:, None] + offs[None]  # (N, S)
            cols = (peak % w)[:, None] + offs[None]
            inside = ((((rows >= 0) & (rows < h))[:, :, None]
                       & ((cols >= 0) & (cols < w))[:, None, :])[:, None]).float()
            cells = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
            x = torch.gather(maps, 1, cells.reshape(n, -1)).reshape(inside.shape)
            x = F.relu(x) * inside
            crop = 0
            for m in layers:
                if isinstance(m, NormalizedConv2d):
                    x = F.conv2d(x, m.normalized_weight(), m.bias)
                    crop += m.padding
                    x = x * inside[:, :, crop : inside.shape[-2] - crop,
                                   crop : inside.shape[-1] - crop]
                else:
                    x = F.relu(x)
            core = slice(margin, margin + 2 * r + 1)
            d = torch.arange(-r, r + 1, device=dev, dtype=torch.float32) * stride
            disc = (d[:, None] ** 2 + d[None, :] ** 2) <= self.radius**2
            valid = disc[None] & (inside[:, 0, core, core] > 0)
            heat = x[:, 0].masked_fill(~valid, -float("inf"))
            prob = torch.softmax(heat.reshape(n, -1), dim=-1).reshape(heat.shape)
            gx = self.geometry.grid_to_pixel(cols[:, core].float())  # (N, 2r+1)
            gy = self.geometry.grid_to_pixel(rows[:, core].float())
            xy = torch.stack([(prob.sum(1) * gx).sum(-1), (prob.sum(2) * gy).sum(-1)], -1)
        return xy.reshape(b, q, 2)

    def forward(self, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Predicted working-pixel (x, y) ``(B, Q, 2)`` of queries ``(B, Q, C)`` in a grid."""
        return self.locate(self.cost(query, target))


def gather_points(
    flat: torch.Tensor,
    grid_hw: tuple[int, int],
    frame: torch.Tensor,
    xy: torch.Tensor,
    geometry: GridGeometry,
) -> torch.Tensor:
    """Bilinear features of points spread over several frames, in one gather.

    Equivalent to ``grid_sample(align_corners=True, padding_mode="border")`` of frame
    ``frame[n]`` at ``xy[n]``.

    Args:
        flat: ``(K * h * w, C)`` features, i.e. ``feats.permute(0, 2, 3, 1).reshape(-1, C)``
            of a ``(K, C, h, w)`` stack (reuse it across calls).
        grid_hw: (h, w).
        frame: ``(N,)`` long, index into the stack.
        xy: ``(N, 2)`` working px.
        geometry: token grid.

    Returns:
        ``(N, C)`` features (differentiable w.r.t. ``flat``).
    """
    h, w = grid_hw
    ji = geometry.pixel_to_grid(xy.float())
    x = ji[:, 0].clamp(0, w - 1)
    y = ji[:, 1].clamp(0, h - 1)
    x0 = x.floor().clamp(max=max(w - 2, 0))
    y0 = y.floor().clamp(max=max(h - 2, 0))
    fx = x - x0
    fy = y - y0
    x0, y0 = x0.long(), y0.long()
    x1 = (x0 + 1).clamp(max=w - 1)
    y1 = (y0 + 1).clamp(max=h - 1)
    base = frame.long() * (h * w)
    # one gather of the four corners (one scatter in the backward pass, not four)
    idx = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], 1) + base[:, None]
    wts = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)
    return (flat[idx] * wts.to(flat.dtype)[:, :, None]).sum(1)


def sample_points(
    feats: torch.Tensor, frame: torch.Tensor, xy: torch.Tensor, geometry: GridGeometry
) -> torch.Tensor:
    """Bilinear features ``(N, C)`` of ``feats (K, C, h, w)`` at ``xy (N, 2)`` of ``frame (N,)``.

    See :func:`gather_points`.
    """
    flat = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    return gather_points(flat, tuple(feats.shape[-2:]), frame, xy, geometry)


class DinoTrackerModel(nn.Module):
    """Delta-DINO plus the tracker head for one clip's working geometry.

    Args:
        channels: DINO feature channels C.
        geometry: token grid of the working image.
        cfg: the model section of the configuration.
    """

    def __init__(self, channels: int, geometry: GridGeometry, cfg: ModelConfig) -> None:
        super().__init__()
        self.channels = int(channels)
        self.geometry = geometry
        self.delta = DeltaDino(channels, cfg)
        self.head = TrackerHead(geometry, cfg)
        centres = torch.from_numpy(geometry.token_centres())  # (h, w, 2) working px
        self.register_buffer("token_centres", centres, persistent=False)

    def _align_grid(self, cnn_hw: tuple[int, int]) -> torch.Tensor:
        """``grid_sample`` grid ``(1, h, w, 2)`` placing the ViT token centres on the CNN map."""
        ch, cw = cnn_hw
        idx = (self.token_centres - self.delta.offset) / self.delta.stride  # CNN index units
        gx = 2.0 * idx[..., 0] / max(cw - 1, 1) - 1.0
        gy = 2.0 * idx[..., 1] / max(ch - 1, 1) - 1.0
        return torch.stack([gx, gy], -1)[None]

    def residual(self, images: torch.Tensor) -> torch.Tensor:
        """Phi_Delta resampled to the token grid: ``(B, 3, H, W)`` [0, 1] -> ``(B, C, h, w)``."""
        out = self.delta(images)
        grid = self._align_grid(tuple(out.shape[-2:])).to(out.dtype)
        grid = grid.expand(out.shape[0], -1, -1, -1)
        return F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def refine(self, images: torch.Tensor, dino: torch.Tensor) -> torch.Tensor:
        """Refined features ``Phi = Phi_DINO + Phi_Delta``, ``(B, C, h, w)`` float.

        Args:
            images: ``(B, 3, H, W)`` float in [0, 1], working resolution.
            dino: ``(B, C, h, w)`` DINO tokens (any float dtype) of the same frames.
        """
        return dino.float() + self.residual(images)

    def sample(self, feats: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """Bilinear features ``(B, Q, C)`` of ``feats (B, C, h, w)`` at ``xy (B, Q, 2)`` (px)."""
        grid = self.geometry.pixel_to_norm(xy.to(feats.dtype))[:, :, None, :]
        out = F.grid_sample(feats, grid, mode="bilinear", padding_mode="border",
                            align_corners=True)
        return out[..., 0].transpose(1, 2)

    def predict(self, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Predicted working-pixel (x, y) ``(B, Q, 2)``; see :meth:`TrackerHead.forward`."""
        return self.head(query, target)
