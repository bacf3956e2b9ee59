"""One typed configuration for the CLI, the nodes and the checkpoints.

Frozen dataclasses grouped in sections; every field carries a description and, where it
applies, a range or a set of choices in its metadata (used for validation, ROS parameter
descriptors and the generated configuration reference). Named profiles:

* ``paper``: the reference's defaults (METHOD.md): ViT-L/14, block 15, stride 7,
  476 x 854, 10,000 iterations, the reference batch sizes and loss weights.
* ``cpu``: light enough that a 24-frame clip trains in minutes on 2 cores.
* ``tiny``: seconds-long runs for tests and smoke checks (not for real tracking).

``auto`` picks ``paper`` when a CUDA device is used and ``cpu`` otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = [
    "BackboneConfig",
    "BestBuddyConfig",
    "Config",
    "FlowConfig",
    "MaskConfig",
    "ModelConfig",
    "PROFILES",
    "PreprocessConfig",
    "TrackConfig",
    "TrainConfig",
    "iter_fields",
    "load_config",
    "resolve_device",
]


def _f(
    default: Any,
    help: str,
    lo: float | None = None,
    hi: float | None = None,
    choices: Sequence[Any] | None = None,
) -> Any:
    """A dataclass field with a description and an optional range or set of choices."""
    meta = {"help": help, "lo": lo, "hi": hi, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


BACKBONES = ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen DINOv2 ViT (Phi_DINO)."""

    model: str = _f("dinov2_vitl14", "DINOv2 architecture", choices=BACKBONES)
    layer: int = _f(15, "0-based index of the transformer block whose tokens are used", 0, 39)
    stride: int = _f(7, "patch-embedding stride in pixels (14: the ViT's own; 7: overlapping)",
                     1, 14)
    weights: str = _f("", "DINOv2 checkpoint file (official format); empty: the torch hub "
                          "cache file, downloaded when online")
    random_init: bool = _f(False, "use a randomly initialised backbone (tests and offline demo "
                                  "only: tracks are then far less accurate)")
    precision: str = _f("auto", "compute precision of the ViT (auto: bf16 where the device "
                                "supports it fast, else fp32)", choices=PRECISIONS)
    batch_frames: int = _f(1, "frames per ViT forward pass", 1, 256)


@dataclass(frozen=True)
class FlowConfig:
    """Optical-flow supervision (Omega_flow)."""

    backend: str = _f("dis", "optical flow: dis (OpenCV, no weights), farneback, or raft "
                             "(torchvision RAFT-large, needs its weights)",
                      choices=("dis", "farneback", "raft"))
    raft_weights: str = _f("", "RAFT-large weights file; empty: torchvision's cache/download")
    raft_iters: int = _f(24, "RAFT refinement iterations", 1, 64)
    cycle_threshold: float = _f(1.5, "forward/backward cycle-consistency threshold (px)",
                                0.0, 100.0)
    grid_step: int = _f(4, "spacing of the grid new dense tracks start on (px, working res.)",
                        1, 64)
    direct_threshold: float = _f(2.5, "cut a chained track where it differs from direct flow "
                                      "by this much (px)", 0.0, 100.0)
    direct_max_range: int = _f(16, "longest frame gap checked against direct flow "
                                   "(bounds the reference's T^2 flow pairs)", 0, 10000)
    direct_pairs_per_frame: int = _f(3, "direct-flow target frames sampled per source frame",
                                     0, 1000)


@dataclass(frozen=True)
class MaskConfig:
    """Foreground masks used to balance point sampling."""

    source: str = _f("pca", "pca: first principal component of DINO features; dir: mask "
                            "images in `directory`; none: everything is foreground",
                     choices=("pca", "dir", "none"))
    directory: str = _f("", "folder of mask images (one per frame, sorted by name)")
    threshold: float = _f(0.6, "threshold on the normalised first principal component",
                          0.0, 1.0)


@dataclass(frozen=True)
class BestBuddyConfig:
    """DINO best buddies (Omega_dino-bb) and their ambiguity weights."""

    pairs_per_frame: int = _f(8, "partner frames per frame (the reference uses all T-1)",
                              1, 100000)
    nms_top_k: int = _f(400, "candidates kept before non-maximum suppression", 2, 100000)
    nms_box: float = _f(30.0, "half size of the NMS boxes (px, working resolution)",
                        1.0, 1000.0)
    nms_iou: float = _f(0.2, "NMS IoU threshold", 0.0, 1.0)
    sigmoid_scale: float = _f(27.0, "weight = sigmoid(scale (1 - r) - offset) ...", 0.0, 1000.0)
    sigmoid_offset: float = _f(5.7, "... with r the second/first peak ratio", -1000.0, 1000.0)


@dataclass(frozen=True)
class PreprocessConfig:
    """Working resolution and the supervision computed once per clip."""

    height: int = _f(476, "working image height (px); 0: from width and the clip's aspect",
                     0, 4096)
    width: int = _f(854, "working image width (px); 0: from height and the clip's aspect",
                    0, 8192)
    flow: FlowConfig = field(default_factory=FlowConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    best_buddies: BestBuddyConfig = field(default_factory=BestBuddyConfig)


@dataclass(frozen=True)
class ModelConfig:
    """Delta-DINO (Phi_Delta) and the tracker head."""

    delta_channels: tuple = _f((64, 128, 256), "hidden channels of Delta-DINO's first convs")
    delta_kernel: int = _f(5, "Delta-DINO kernel size", 1, 15)
    delta_dilations: tuple = _f((1, 1, 1, 2), "dilation of each Delta-DINO conv")
    delta_last_bn_scale: float = _f(0.05, "initial BatchNorm scale after the last conv",
                                    0.0, 10.0)
    radius: float = _f(35.0, "soft-argmax radius around the cost-map peak (px, working res.)",
                       1.0, 10000.0)
    refiner: bool = _f(True, "use the cost-map refiner (two 3x3 convs)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, batches, loss weights and schedule (eq. 5)."""

    iterations: int = _f(10000, "training iterations", 0, 10_000_000)
    lr: float = _f(0.01, "Adam learning rate of Delta-DINO and the head", 0.0, 10.0)
    lr_decay: float = _f(0.999, "Delta-DINO learning-rate factor ...", 0.0, 1.0)
    lr_decay_every: int = _f(40, "... applied every this many iterations", 1, 1_000_000)
    flow_batch: int = _f(512, "flow point pairs per iteration (half foreground)", 1, 1_000_000)
    flow_frames: int = _f(4, "frames the flow sampler draws pairs from", 2, 64)
    flow_fg_fraction: float = _f(0.5, "foreground share of the flow batch", 0.0, 1.0)
    pair_frames: int = _f(4, "frame pairs per contrastive/cycle batch", 1, 64)
    pair_points: int = _f(256, "points per frame pair in contrastive/cycle batches",
                          1, 100_000)
    pair_fg_fraction: float = _f(0.7, "foreground share of contrastive/cycle points",
                                 0.0, 1.0)
    w_flow: float = _f(1.0, "weight of L_flow", 0.0, 1e6)
    w_dino_bb: float = _f(2.5e-4, "weight of L_dino-bb", 0.0, 1e6)
    w_rfn_bb: float = _f(5e-5, "weight of L_rfn-bb", 0.0, 1e6)
    w_rfn_cc: float = _f(0.5, "weight of L_rfn-cc", 0.0, 1e6)
    w_prior: float = _f(1e-4, "weight of each L_prior term", 0.0, 1e6)
    huber_delta: float = _f(1.0 / 32.0, "Huber delta (normalised coordinates)", 0.0, 10.0)
    temperature: float = _f(0.1, "InfoNCE temperature", 1e-4, 10.0)
    dino_bb_norm: float = _f(700.0, "L_dino-bb is summed and divided by this", 1e-6, 1e9)
    rfn_bb_norm: float = _f(1800.0, "L_rfn-bb is summed and divided by this", 1e-6, 1e9)
    refine_start: int = _f(5000, "iteration from which L_rfn-bb and L_rfn-cc are on",
                           0, 10_000_000)
    cycle_threshold: float = _f(4.0, "max cycle error of refined cycle points (px)",
                                0.0, 1000.0)
    cycle_decay: float = _f(0.8, "cycle points are weighted decay ** distance", 0.0, 1.0)
    checkpoint_every: int = _f(500, "iterations between checkpoints (0: only at the end)",
                               0, 10_000_000)
    seed: int = _f(0, "random seed (training is reproducible for a given seed and device)",
                   0, 2**31 - 1)
    precision: str = _f("auto", "training compute precision (auto: bf16 autocast where the "
                                "device supports it fast, else fp32; fp32: the reference path)",
                        choices=PRECISIONS)


@dataclass(frozen=True)
class TrackConfig:
    """Inference and visibility (trajectory agreement, METHOD.md)."""

    anchor_cos: float = _f(0.7, "frames whose feature similarity to the query is at least "
                                "this are anchors", -1.0, 1.0)
    occlusion_cos: float = _f(0.6, "a frame is occluded when its similarity is below this",
                              -1.0, 1.0)
    max_anchors: int = _f(16, "anchor frames sampled per query (bounds the cost)", 1, 100000)
    visibility_threshold: float = _f(0.5, "visible == (visibility score >= this)", 0.0, 1.0)
    query_batch: int = _f(1024, "queries per batch", 1, 1_000_000)
    resident_megabytes: int = _f(512, "keep a clip's refined features in memory (fp32 and "
                                 "unit-norm copies) up to this size; larger clips are read "
                                 "from the memory-mapped cache on every query", 0, 1_000_000)
    frame_batch: int = _f(8, "frames per batch", 1, 100000)
    cache_precision: str = _f("fp16", "dtype of the on-disk refined-feature cache",
                              choices=("fp16", "fp32"))
    live_history: int = _f(4, "live tracking: recent live frames used as visibility anchors "
                              "beside the query frame (0: the query frame only)", 0, 64)
    live_threshold: float = _f(1.5, "live tracking: occluded when the median distance over "
                                    "anchors exceeds this many token strides", 0.01, 1000.0)


@dataclass(frozen=True)
class Config:
    """Everything a run needs; stored in every checkpoint."""

    profile: str = _f("paper", "the profile these values started from",
                      choices=("paper", "cpu", "tiny"))
    device: str = _f("auto", "torch device: auto, cpu, cuda or cuda:N")
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    # -- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """YAML text that :func:`load_config` reads back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Build a config from a (possibly partial) nested dict over the paper defaults."""
        return _merge(cls(), data, "")

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted-key overrides, e.g. ``cfg.replace(**{"train.iterations": 5})``."""
        return apply_overrides(self, overrides)


def _cpu_profile() -> Config:
    return Config(
        profile="cpu",
        backbone=BackboneConfig(model="dinov2_vits14", layer=8, stride=7, batch_frames=4),
        preprocess=PreprocessConfig(
            height=224, width=0, best_buddies=BestBuddyConfig(pairs_per_frame=4)
        ),
        model=ModelConfig(delta_channels=(16, 32, 64), radius=24.0),
        train=TrainConfig(
            iterations=400, flow_batch=256, pair_frames=2, pair_points=128,
            refine_start=200, checkpoint_every=100, lr_decay_every=20,
        ),
    )


def _tiny_profile() -> Config:
    return Config(
        profile="tiny",
        backbone=BackboneConfig(model="dinov2_vits14", layer=3, stride=14, batch_frames=8),
        preprocess=PreprocessConfig(
            height=112, width=0, flow=FlowConfig(grid_step=4, direct_max_range=4),
            best_buddies=BestBuddyConfig(pairs_per_frame=2, nms_top_k=50),
        ),
        model=ModelConfig(delta_channels=(8, 16, 32), radius=20.0),
        train=TrainConfig(
            iterations=20, flow_batch=64, pair_frames=1, pair_points=32, refine_start=10,
            checkpoint_every=10, lr_decay_every=5,
        ),
    )


PROFILES: dict = {"paper": Config(), "cpu": _cpu_profile(), "tiny": _tiny_profile()}


# -- introspection ----------------------------------------------------------------------
def iter_fields(obj: Any = Config, prefix: str = "") -> Iterator[tuple]:
    """Yield ``(dotted_name, dataclass_field, default_value)`` for every leaf of the schema."""
    inst = obj() if isinstance(obj, type) else obj
    for f in dataclasses.fields(inst):
        value = getattr(inst, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, name + ".")
        else:
            yield name, f, value


# -- loading and validation -------------------------------------------------------------
def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(name: str, f: dataclasses.Field, default: Any, value: Any) -> Any:
    """Check ``value`` against the field's type, range and choices; return it typed."""
    meta = f.metadata
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not value.is_integer())):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        value = int(value)
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be finite, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
    elif isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{name}: expected a non-empty list, got {value!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise ConfigError(f"{name}: expected positive integers, got {value!r}")
        return tuple(value)
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ConfigError(f"{name}: must be in [{lo}, {hi}], got {value!r}")
    return value


def _merge(base: Any, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"unknown setting '{name}'; valid here: {', '.join(sorted(fields))}"
            )
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, name + ".")
        else:
            changes[key] = _coerce(name, fields[key], current, value)
    out = dataclasses.replace(base, **changes)
    if isinstance(out, Config):
        _check_device(out.device)
    if isinstance(out, PreprocessConfig) and out.height == 0 and out.width == 0:
        raise ConfigError("preprocess.height and preprocess.width cannot both be 0")
    return out


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _deep_update(a: dict, b: Mapping) -> dict:
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(a.get(k), dict):
            _deep_update(a[k], v)
        else:
            a[k] = v
    return a


def parse_override(text: str) -> tuple:
    """Split ``"train.iterations=100"`` into ``("train.iterations", 100)`` (YAML-typed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        first = (str(exc).splitlines() or ["parse error"])[0]
        raise ConfigError(f"override {text!r}: value is not valid YAML ({first})") from None
    if value is None:
        value = ""
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: Mapping[str, Any] | Iterable[str]) -> Config:
    """Apply dotted-key overrides (a mapping, or ``key=value`` strings) to ``cfg``."""
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    data: dict = {}
    for key, value in items:
        _deep_update(data, _nest(key, value))
    return _merge(cfg, data, "")


def _check_device(device: str) -> None:
    ok = device in ("auto", "cpu", "cuda", "mps") or (
        device.startswith("cuda:") and device[5:].isdigit()
    )
    if not ok:
        raise ConfigError(f"device: use auto, cpu, cuda or cuda:N; got {device!r}")


def resolve_device(device: str) -> str:
    """Turn ``auto`` into ``cuda`` when available, else ``cpu``; check that CUDA exists."""
    import torch

    _check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use cpu")
    return device


def load_config(
    path: str | Path | None = None,
    profile: str = "auto",
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    device: str | None = None,
) -> Config:
    """Build a config: profile defaults, then a YAML file, then overrides.

    Args:
        path: optional YAML file (a partial nested mapping, as :meth:`Config.to_yaml` writes).
            A ``profile`` key in it selects the base profile when ``profile`` is ``auto``.
        profile: ``paper``, ``cpu``, ``tiny`` or ``auto`` (``paper`` on CUDA, else ``cpu``).
        overrides: dotted keys, e.g. ``{"train.iterations": 100}`` or ``["train.iterations=100"]``.
        device: overrides ``device`` before the profile is resolved.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or value out of range.
    """
    data: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {str(exc).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of sections")
        data = loaded or {}
    if profile == "auto":
        profile = data.get("profile", "auto")
    if not isinstance(profile, str):
        raise ConfigError(f"profile: use one of auto, {', '.join(PROFILES)}; got {profile!r}")
    if device is not None:
        data = {**data, "device": device}
    if profile == "auto":
        dev = data.get("device", "auto")
        _check_device(str(dev))
        profile = "paper" if resolve_device(str(dev)).startswith("cuda") else "cpu"
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; use one of auto, {', '.join(PROFILES)}")
    cfg = _merge(PROFILES[profile], {**data, "profile": profile}, "")
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg
