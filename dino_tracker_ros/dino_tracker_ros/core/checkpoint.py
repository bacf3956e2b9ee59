"""Trained-model files: everything needed to rebuild a :class:`~.model.DinoTrackerModel`.

A model file is one ``torch.save`` dict, written atomically::

    {version, config (Config.to_dict()), image_size [H, W] (working), orig_size [H, W],
     channels, state_dict, extra}

It is read with ``map_location="cpu"`` and ``weights_only=True`` (no code runs on load),
then moved to the requested device.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .errors import ConfigError, NotTrainedError, WeightsError
from .geometry import GridGeometry
from .model import DinoTrackerModel
from .storage import save_torch_atomic

__all__ = ["MODEL_FORMAT_VERSION", "load_model", "save_model"]

MODEL_FORMAT_VERSION = 1
_KEYS = ("version", "config", "image_size", "orig_size", "channels", "state_dict")


def save_model(
    path: str | os.PathLike[str],
    model: DinoTrackerModel,
    cfg: Config,
    *,
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    extra: dict | None = None,
) -> Path:
    """Write ``model`` (on any device) and the config it was trained with to ``path``.

    Args:
        path: destination file (parents are created).
        model: the trained model.
        cfg: the full configuration used for training.
        image_size: working (H, W) the model's geometry was built for.
        orig_size: the clip's original (H, W).
        extra: JSON-like details (iterations, final loss, ...).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {
        "version": MODEL_FORMAT_VERSION,
        "config": cfg.to_dict(),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "orig_size": [int(orig_size[0]), int(orig_size[1])],
        "channels": int(model.channels),
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    path = Path(path)
    save_torch_atomic(obj, path)
    return path


def _read(path: Path) -> dict:
    if not path.is_file():
        raise NotTrainedError(f"no trained model at {path}; train the clip first")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError,
            ValueError) as exc:
        raise WeightsError(
            f"{path} is not a readable model file ({type(exc).__name__}); train the clip again"
        ) from None
    if not isinstance(obj, dict) or any(k not in obj for k in _KEYS):
        raise WeightsError(f"{path} is not a dino_tracker model file; train the clip again")
    if obj["version"] != MODEL_FORMAT_VERSION:
        raise WeightsError(
            f"{path} has model format {obj['version']!r}, this version reads "
            f"{MODEL_FORMAT_VERSION}; train the clip again"
        )
    return obj


def load_model(
    path: str | os.PathLike[str], device: Any = "cpu"
) -> tuple[DinoTrackerModel, Config, dict]:
    """Rebuild a model saved by :func:`save_model`, in eval mode on ``device``.

    Returns:
        ``(model, config, meta)`` with meta keys ``version``, ``image_size``, ``orig_size``,
        ``channels``, ``extra`` and ``path``.

    Raises:
        NotTrainedError: ``path`` does not exist.
        WeightsError: the file is truncated, foreign, or does not match its config.
    """
    path = Path(path)
    obj = _read(path)
    try:
        cfg = Config.from_dict(obj["config"])
    except ConfigError as exc:
        raise WeightsError(
            f"{path} holds an invalid config ({exc}); train the clip again"
        ) from None
    h, w = (int(v) for v in obj["image_size"])
    geometry = GridGeometry(h, w, cfg.backbone.stride)
    try:
        model = DinoTrackerModel(int(obj["channels"]), geometry, cfg.model)
        model.load_state_dict(obj["state_dict"], strict=True)
    except (RuntimeError, ConfigError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"{path} does not match its model config ({first}); train the clip again"
        ) from None
    model = model.to(device).eval()
    meta = {
        "version": obj["version"],
        "image_size": (h, w),
        "orig_size": tuple(int(v) for v in obj["orig_size"]),
        "channels": int(obj["channels"]),
        "extra": dict(obj.get("extra") or {}),
        "path": path,
    }
    return model, cfg, meta
