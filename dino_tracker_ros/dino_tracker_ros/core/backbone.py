"""The frozen DINOv2 ViT (Phi_DINO), built with timm, and per-clip feature extraction.

* Architectures: ``dinov2_vits14``, ``dinov2_vitb14``, ``dinov2_vitl14``, ``dinov2_vitg14``
  (timm's ``vit_{small,base,large,giant}_patch14_dinov2``, built with ``pretrained=False``
  at ``img_size=518``).
* Weights, in this order: ``backbone.weights`` (a file in the official DINOv2 checkpoint
  format); the torch hub cache file ``<torch.hub.get_dir()>/checkpoints/<model>_pretrain.pth``;
  a download of the official checkpoint into that cache when online. Only
  ``backbone.random_init=true`` skips weights, with a loud warning.
* Stride: the patch-embedding convolution's stride is set to ``backbone.stride`` (7 gives
  overlapping patches). Position embeddings are interpolated exactly as the official
  DINOv2 code does it (bicubic, no antialias, ``scale_factor = (n + 0.1) / 37`` with
  ``n`` the token-grid size, as the DINO-Tracker reference's stride fix); cached per grid.
* Output: the tokens of block ``backbone.layer`` (0-based), **without** the final
  LayerNorm, like the DINO-Tracker reference (it hooks the block outputs); only
  ``blocks[:layer + 1]`` are kept and run.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
import types
import urllib.parse
import urllib.request
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig
from .errors import ConfigError, WeightsError
from .geometry import PATCH, GridGeometry
from .progress import CancelToken, ProgressCallback, StageReporter
from .storage import create_array, open_array

__all__ = [
    "DOWNLOAD_URL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDOM_INIT_WARNING",
    "TIMM_NAMES",
    "DinoBackbone",
    "build_backbone",
    "extract_features",
    "hub_checkpoint_path",
    "interpolate_pos_embed",
    "normalise",
    "official_to_timm",
    "resolve_precision",
    "resolve_weights",
    "timm_to_official",
    "to_input",
]

log = logging.getLogger(__name__)

TIMM_NAMES = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
    "dinov2_vitg14": "vit_giant_patch14_dinov2",
}
DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/dinov2/{model}/{model}_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_SIZE = 518  # the pretraining resolution: a 37 x 37 grid of position embeddings
POS_EMBED_OFFSET = 0.1  # the official interpolate_offset
RANDOM_INIT_WARNING = (
    "backbone.random_init=true: the DINOv2 backbone is randomly initialised; features carry "
    "no learned semantics; tracking accuracy will be far below the paper's"
)
CONNECT_TIMEOUT_S = 3.0
RANDOM_INIT_SEED = 0


# -- input helpers ----------------------------------------------------------------------
def to_input(
    frames: np.ndarray | torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) RGB (numpy or tensor) -> (B, 3, H, W) float32 in [0, 1].

    A single (H, W, 3) frame gives a batch of one.
    """
    if isinstance(frames, np.ndarray):
        # read-only memmaps are copied (torch tensors must be writable)
        x = torch.from_numpy(np.require(frames, requirements=("C", "W")))
    else:
        x = frames
    if x.dtype != torch.uint8:
        raise ValueError(f"to_input expects uint8 frames, got {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"to_input expects (B, H, W, 3) frames, got {tuple(x.shape)}")
    x = x.to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of (B, 3, H, W) RGB in [0, 1]."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# -- weights ----------------------------------------------------------------------------
def _timm_name(model: str) -> str:
    try:
        return TIMM_NAMES[model]
    except KeyError:
        raise ConfigError(
            f"backbone.model: unknown DINOv2 model {model!r}; use one of {', '.join(TIMM_NAMES)}"
        ) from None


def hub_checkpoint_path(model: str) -> Path:
    """Torch hub cache file of the official checkpoint (``.../dinov2_vits14_pretrain.pth``).

    Honours ``TORCH_HOME`` (through :func:`torch.hub.get_dir`).
    """
    _timm_name(model)
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{model}_pretrain.pth"


def _reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host (or its proxy) opens within ``timeout``.

    DNS resolution is included in the timeout (it runs in a daemon thread).
    """
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    ok: list = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _no_weights_message(model: str, cache: Path, why: str) -> str:
    return (
        f"no {model} weights: {why}. Put the official checkpoint at {cache} (from "
        f"{DOWNLOAD_URL.format(model=model)}) or set backbone.weights=/path/to/{cache.name}; "
        "backbone.random_init=true exists for tests and offline demos"
    )


def resolve_weights(cfg: BackboneConfig, *, download: bool = True) -> Path | None:
    """Find the checkpoint file for ``cfg``; ``None`` only when ``cfg.random_init``.

    Order: ``cfg.weights``; the torch hub cache file; a download into that cache when the
    server is reachable (checked with a short timeout, so an offline machine fails fast).

    Raises:
        WeightsError: the explicit file is missing, or no weights can be found or fetched.
    """
    _timm_name(cfg.model)
    if cfg.random_init:
        return None
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"backbone.weights file not found: {path}; give the path of an official DINOv2 "
                f"checkpoint such as {cfg.model}_pretrain.pth"
            )
        return path
    cache = hub_checkpoint_path(cfg.model)
    if cache.is_file():
        return cache
    url = DOWNLOAD_URL.format(model=cfg.model)
    if not download:
        raise WeightsError(_no_weights_message(cfg.model, cache, "not in the torch hub cache"))
    if not _reachable(url):
        raise WeightsError(
            _no_weights_message(cfg.model, cache, f"not cached and {url} is unreachable")
        )
    log.info("downloading %s to %s", url, cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.part")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=False)
        os.replace(tmp, cache)
    except Exception as exc:  # network errors come in many types
        tmp.unlink(missing_ok=True)
        raise WeightsError(
            _no_weights_message(cfg.model, cache, f"download failed ({exc})")
        ) from None
    return cache


def official_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official DINOv2 state dict to timm's key names.

    ``mask_token`` (unused at inference) is dropped; the SwiGLU weights of ViT-g
    (``mlp.w12`` / ``mlp.w3``) become timm's packed ``mlp.fc1`` / ``mlp.fc2`` (same
    ``silu(x1) * x2`` split). All other names are identical.
    """
    out = {}
    for key, value in state_dict.items():
        if key == "mask_token":
            continue
        key = re.sub(r"^blocks\.(\d+)\.mlp\.w12\.", r"blocks.\1.mlp.fc1.", key)
        key = re.sub(r"^blocks\.(\d+)\.mlp\.w3\.", r"blocks.\1.mlp.fc2.", key)
        out[key] = value
    return out


def timm_to_official(
    state_dict: dict[str, torch.Tensor], swiglu: bool = False
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_timm` (adds a zero ``mask_token``); used by tests."""
    out = {}
    for key, value in state_dict.items():
        if swiglu:
            key = re.sub(r"^blocks\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.w12.", key)
            key = re.sub(r"^blocks\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.w3.", key)
        out[key] = value
    out["mask_token"] = torch.zeros(1, state_dict["cls_token"].shape[-1])
    return out


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable files
        raise WeightsError(f"cannot read DINOv2 checkpoint {path}: {exc}") from None
    for key in ("model", "state_dict", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and "cls_token" not in obj:
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a DINOv2 state dict (expected a dict of tensors)")
    return obj


def _load_weights(vit: nn.Module, path: Path, model: str) -> None:
    sd = official_to_timm(_load_checkpoint(path))
    expected = vit.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(sd[k].shape)} vs "
                f"{tuple(expected[k].shape)})"
            )
        raise WeightsError(
            f"{path} does not match {model}: {'; '.join(parts)}; is it the official {model} "
            "checkpoint?"
        )
    vit.load_state_dict(sd, strict=True)


def _random_init(vit: nn.Module, seed: int) -> None:
    """Deterministic random weights with timm's ViT distributions (fast, seeded).

    Linear weights N(0, 0.02) (timm's truncation at +-2 never binds at this std), zero
    biases, position embeddings N(0, 0.02), class token N(0, 1e-6), LayerNorm (1, 0),
    layer scales at their init value, the patch convolution PyTorch's default init.
    The same seed gives the same backbone in every process (features stay comparable).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in vit.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.02, generator=gen)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, nn.Conv2d):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                module.weight.uniform_(-bound, bound, generator=gen)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=gen)
            elif hasattr(module, "gamma") and hasattr(module, "init_values"):
                module.gamma.fill_(float(module.init_values))
        vit.pos_embed.normal_(0.0, 0.02, generator=gen)
        vit.cls_token.normal_(0.0, 1e-6, generator=gen)


# -- precision --------------------------------------------------------------------------
def _cpu_has_fast_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: plain fp32).

    ``auto`` picks bf16 on CUDA devices that support it and on CPUs with AVX512-BF16 or
    AMX (read from ``/proc/cpuinfo``), else fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ConfigError(f"backbone.precision: use fp32, bf16, fp16 or auto; got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_fast_bf16() else None
    return None


# -- position embeddings ----------------------------------------------------------------
def interpolate_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Resample DINOv2 position embeddings (1, 1 + M*M, C) to a token grid (h, w).

    Follows the official DINOv2 ``interpolate_pos_encoding`` (and the DINO-Tracker
    reference's stride variant): identity for the native M x M grid, otherwise bicubic
    ``F.interpolate`` of the patch embeddings with ``scale_factor = ((h + 0.1) / M,
    (w + 0.1) / M)``, no antialias, ``align_corners=False``, in float32.

    Returns:
        (1, 1 + h*w, C) float32.
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    n = pos_embed.shape[1] - 1
    m = int(math.isqrt(n))
    if m * m != n:
        raise ValueError(f"position embeddings of {n} patches do not form a square grid")
    pe = pos_embed.float()
    if (h, w) == (m, m):
        return pe
    cls_pe, patch_pe = pe[:, :1], pe[:, 1:]
    dim = pe.shape[-1]
    grid = patch_pe.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        scale_factor=((h + POS_EMBED_OFFSET) / m, (w + POS_EMBED_OFFSET) / m),
        mode="bicubic",
        align_corners=False,
        antialias=False,
        recompute_scale_factor=False,
    )
    if tuple(grid.shape[-2:]) != (h, w):
        raise AssertionError(f"interpolated grid {tuple(grid.shape[-2:])} != {(h, w)}")
    return torch.cat([cls_pe, grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)], dim=1)


# -- the backbone -----------------------------------------------------------------------
_ATTENTION_PARTS = ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "proj", "proj_drop")


def _attention_forward(self: nn.Module, x: torch.Tensor, attn_mask: Any = None,
                       is_causal: bool = False) -> torch.Tensor:
    """timm's ``Attention.forward`` for DINOv2 blocks, with the attention in fp32 on CPUs.

    The CPU's fused (flash) attention is slower in bf16 than in fp32 (1,948 tokens x 6
    heads: 42 vs 36 ms; 48 ms under autocast), so under bf16 autocast only the products
    around it stay bf16. Elsewhere (and on GPUs) it is timm's computation. DINOv2 passes no
    mask.
    """
    if attn_mask is not None or is_causal:
        raise ValueError("DINOv2 attention takes no mask")
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if x.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(v.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, n, -1)
    norm = getattr(self, "norm", None)
    return self.proj_drop(self.proj(out if norm is None else norm(out)))


class DinoBackbone(nn.Module):
    """Frozen DINOv2 returning the tokens of one block as a feature map.

    Attributes:
        model_name: e.g. ``dinov2_vits14``.
        layer: 0-based block index whose output is returned.
        stride: patch-embedding stride.
        patch: patch size (14).
        channels: feature channels C.
        random_init: whether the weights are random (features without semantics).
        weights_path: the checkpoint loaded, or ``None``.
        autocast_dtype: the autocast dtype used (``None``: fp32).
    """

    def __init__(
        self,
        vit: nn.Module,
        model_name: str,
        layer: int,
        stride: int,
        random_init: bool,
        weights_path: Path | None,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        depth = len(vit.blocks)
        if not 0 <= layer < depth:
            raise ConfigError(
                f"backbone.layer={layer} but {model_name} has blocks 0..{depth - 1}"
            )
        vit.blocks = vit.blocks[: layer + 1]
        # Parts never used for intermediate tokens: drop them to save memory.
        vit.norm = nn.Identity()
        vit.head = nn.Identity()
        vit.patch_embed.proj.stride = (stride, stride)
        for blk in vit.blocks:
            if hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = True  # F.scaled_dot_product_attention
            if all(hasattr(blk.attn, a) for a in _ATTENTION_PARTS) and \
                    getattr(blk.attn, "gate", None) is None:
                blk.attn.forward = types.MethodType(_attention_forward, blk.attn)
        self.vit = vit
        self.model_name = model_name
        self.layer = layer
        self.stride = stride
        self.patch = PATCH
        self.channels = int(vit.cls_token.shape[-1])
        self.random_init = random_init
        self.weights_path = weights_path
        self.autocast_dtype = autocast_dtype
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DinoBackbone:
        """The backbone stays in eval mode (it is frozen)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.vit.cls_token.device

    def geometry(self, height: int, width: int) -> GridGeometry:
        """Token geometry for working frames of size (height, width)."""
        self.check_size(height, width)
        return GridGeometry(height, width, self.stride, self.patch)

    def check_size(self, height: int, width: int) -> None:
        """Raise :class:`ConfigError` unless (H - 14) and (W - 14) are multiples of the stride."""
        for name, v in (("height", height), ("width", width)):
            if v < self.patch or (v - self.patch) % self.stride:
                raise ConfigError(
                    f"working {name} {v} does not fit stride {self.stride}: need "
                    f"({name} - {self.patch}) % {self.stride} == 0 (use geometry.working_size)"
                )

    def pos_embed(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Interpolated position embeddings (1, 1 + h*w, C) float32, cached per grid."""
        key = (tuple(grid_hw), self.device)
        cached = self._pos_cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = interpolate_pos_embed(self.vit.pos_embed.detach(), grid_hw)
            self._pos_cache[key] = cached
        return cached

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """DINO tokens of block ``layer``.

        Args:
            x: (B, 3, H, W) float RGB in [0, 1] (not yet normalised), or (B, H, W, 3) uint8.

        Returns:
            (B, C, h, w) float32 with (h, w) = ``self.geometry(H, W).grid_hw``.
        """
        if x.dtype == torch.uint8:
            x = to_input(x, self.device)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) input, got {tuple(x.shape)}")
        b, _, height, width = x.shape
        h, w = self.geometry(height, width).grid_hw
        x = normalise(x.to(self.device, torch.float32))
        vit = self.vit
        with self._autocast():
            tokens = vit.patch_embed.proj(x)  # (B, C, h, w)
            tokens = tokens.flatten(2).transpose(1, 2)
            tokens = vit.patch_embed.norm(tokens)
            cls = vit.cls_token.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed((h, w))
            tokens = vit.norm_pre(tokens)
            for blk in vit.blocks:
                tokens = blk(tokens)
        out = tokens[:, 1:].float().transpose(1, 2).reshape(b, self.channels, h, w)
        return out.contiguous()


def build_backbone(cfg: BackboneConfig, device: torch.device | str) -> DinoBackbone:
    """Build the frozen DINOv2 backbone described by ``cfg`` on ``device``.

    Raises:
        ConfigError: unknown model, layer out of range, bad precision.
        WeightsError: no usable weights and ``cfg.random_init`` is false.
    """
    import timm

    device = torch.device(device)
    timm_name = _timm_name(cfg.model)
    if not 1 <= cfg.stride <= PATCH:
        raise ConfigError(f"backbone.stride must be in [1, {PATCH}], got {cfg.stride}")
    weights = resolve_weights(cfg)
    with torch.device("meta"):  # no slow default init: every tensor is set below
        vit = timm.create_model(timm_name, pretrained=False, img_size=IMG_SIZE, num_classes=0)
    vit = vit.to_empty(device="cpu")
    if weights is None:
        _random_init(vit, RANDOM_INIT_SEED)
        log.warning(RANDOM_INIT_WARNING)
    else:
        _load_weights(vit, weights, cfg.model)
        log.info("loaded %s weights from %s", cfg.model, weights)
    backbone = DinoBackbone(
        vit, cfg.model, cfg.layer, cfg.stride, weights is None, weights,
        resolve_precision(cfg.precision, device),
    )
    return backbone.to(device)


# -- per-clip features ------------------------------------------------------------------
def extract_features(
    frames: np.ndarray | Sequence[np.ndarray],
    backbone: DinoBackbone,
    out_path: str | os.PathLike,
    *,
    batch_frames: int = 1,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    start: float = 0.0,
    end: float = 1.0,
) -> np.ndarray:
    """Compute DINO features of every frame and store them as a float16 ``.npy``.

    Streams batches of ``batch_frames`` frames, so peak RAM does not depend on T. The file
    appears atomically when complete; a cancelled or failed run leaves nothing.

    Args:
        frames: (T, H, W, 3) uint8 RGB array-like (e.g. a memmap) or a sequence of frames,
            at the working resolution.
        backbone: the frozen ViT.
        out_path: destination ``.npy`` file.
        batch_frames: frames per forward pass.
        progress, cancel: progress reports (stage ``features``) and cancellation.
        start, end: the stage's share of the whole job's progress.

    Returns:
        Read-only memmap (T, C, h, w) float16.
    """
    n = len(frames)
    if n == 0:
        raise ValueError("extract_features needs at least one frame")
    first = np.asarray(frames[0])
    height, width = first.shape[:2]
    h, w = backbone.geometry(height, width).grid_hw
    batch_frames = max(int(batch_frames), 1)
    reporter = StageReporter(progress, "features", n, start, end, cancel)
    reporter.update(0)
    with create_array(out_path, (n, backbone.channels, h, w), np.float16) as out:
        for i in range(0, n, batch_frames):
            idx = range(i, min(i + batch_frames, n))
            batch = np.stack([np.asarray(frames[j]) for j in idx])
            feats = backbone(to_input(batch, backbone.device))
            out[i : i + len(idx)] = feats.cpu().numpy().astype(np.float16)
            reporter.update(i + len(idx))
    return open_array(out_path)
