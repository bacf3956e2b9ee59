"""ROS parameters of the nodes: their own flat ones plus a mirror of the core schema.

Every node declares its own flat parameters (:class:`ParamSpec`, with a description and a
range or a set of choices). The trainer and the tracker also mirror the core
configuration (:func:`~dino_tracker_ros.core.config.iter_fields`) as dotted parameters
(``backbone.weights``, ``train.iterations``, ``track.visibility_threshold``, ...), declared
with the defaults of the profile selected by the node's ``profile`` and ``device``
parameters, so a params file or ``-p`` can set any of them. :meth:`NodeParams.config`
builds the core :class:`~dino_tracker_ros.core.config.Config` from the current values.

Changes at run time are validated in a set-parameters callback with the core's own
rules (type, range, choices, cross-field checks) and rejected with the core's one-line
reason. ``profile`` and ``device`` are read-only (they select the declared defaults);
everything else takes effect for the next job or request.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.node import Node
from rclpy.parameter import Parameter

from ..core.config import PROFILES, Config, apply_overrides, iter_fields, load_config
from ..core.errors import ConfigError

__all__ = [
    "CLIP_DIR",
    "DEFAULT_CLIP_DIR",
    "DEVICE",
    "NodeParams",
    "PROFILE",
    "ParamSpec",
    "resolve_profile",
]

DEFAULT_CLIP_DIR = "~/.ros/dino_tracker/clips"


@dataclass(frozen=True)
class ParamSpec:
    """A node's own (flat) parameter.

    Attributes:
        name: parameter name.
        default: default value; its type (bool, int, float, str) is the parameter's type.
        description: one line for ``ros2 param describe``.
        lo, hi: inclusive range of a numeric parameter.
        choices: allowed values of a string parameter.
        read_only: may only be set at startup (params file, ``-p``).
    """

    name: str
    default: Any
    description: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    read_only: bool = False


CLIP_DIR = ParamSpec(
    "clip_dir", DEFAULT_CLIP_DIR,
    "directory holding the clips (shared by recorder, trainer and tracker; ~ is expanded)",
)
PROFILE = ParamSpec(
    "profile", "auto",
    "core settings profile the dotted parameters default to (auto: paper on CUDA, else cpu)",
    choices=("auto", "paper", "cpu", "tiny"), read_only=True,
)
DEVICE = ParamSpec(
    "device", "auto", "torch device: auto, cpu, cuda or cuda:N", read_only=True,
)

_CORE_TOP = ("profile", "device")  # Config fields that the flat parameters above set


def resolve_profile(profile: str, device: str) -> str:
    """``auto`` -> ``paper`` when the device is (or resolves to) CUDA, else ``cpu``."""
    if profile != "auto":
        return profile
    if device.startswith("cuda"):
        return "paper"
    if device == "auto":
        import torch

        return "paper" if torch.cuda.is_available() else "cpu"
    return "cpu"


def _descriptor(
    name: str,
    description: str,
    default: Any,
    lo: float | None,
    hi: float | None,
    choices: Sequence[Any] | None,
    read_only: bool,
) -> ParameterDescriptor:
    desc = ParameterDescriptor(name=name, description=description, read_only=read_only)
    if choices:
        desc.additional_constraints = "one of: " + ", ".join(str(c) for c in choices)
    if lo is not None and hi is not None and not isinstance(default, bool):
        if isinstance(default, int):
            desc.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=0)]
        elif isinstance(default, float):
            desc.floating_point_range = [
                FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)
            ]
    return desc


def _plain(value: Any) -> Any:
    """rclpy array values (lists, ``array.array``) -> list; scalars unchanged."""
    if isinstance(value, (str, bytes, bool, int, float)) or value is None:
        return value
    return list(value)


class NodeParams:
    """Declares a node's parameters and turns them into a core :class:`Config`.

    Args:
        node: the node to declare on.
        specs: the node's own flat parameters (``profile`` and ``device`` are declared
            first when present, since they select the defaults of the mirrored ones).
        sections: top-level sections of the core schema to mirror as dotted parameters
            (e.g. ``("backbone", "preprocess", "model", "train", "track")``); empty: none.

    Raises:
        rclpy.exceptions.InvalidParameterValueException: a startup value (params file,
            ``-p``) is invalid; the message carries the core's reason.
    """

    def __init__(self, node: Node, specs: Sequence[ParamSpec], sections: Sequence[str] = ()):
        self._node = node
        self._specs: dict[str, ParamSpec] = {s.name: s for s in specs}
        self._mirrored: dict[str, Any] = {}
        self._base: Config | None = None
        self._schema = {n for n, _, _ in iter_fields(Config) if n.split(".")[0] in sections}
        node.add_on_set_parameters_callback(self._on_set)
        ordered = sorted(specs, key=lambda s: s.name not in _CORE_TOP)
        for spec in ordered:
            node.declare_parameter(
                spec.name, spec.default,
                _descriptor(spec.name, spec.description, spec.default, spec.lo, spec.hi,
                            spec.choices, spec.read_only),
            )
        if sections:
            self._base = self._profile_config()
            for name, f, default in iter_fields(self._base):
                if name.split(".")[0] not in sections:
                    continue
                meta = f.metadata
                value = list(default) if isinstance(default, tuple) else default
                help_text = f"{meta.get('help', '')} (core setting; profile default {value!r})"
                node.declare_parameter(
                    name, value,
                    _descriptor(name, help_text, default, meta.get("lo"), meta.get("hi"),
                                meta.get("choices"), False),
                )
                self._mirrored[name] = default

    # -- values ------------------------------------------------------------------------
    def value(self, name: str) -> Any:
        """Current value of a parameter (arrays as lists)."""
        return _plain(self._node.get_parameter(name).value)

    def clip_dir(self) -> Path:
        """``clip_dir`` with ``~`` and environment variables expanded."""
        return Path(os.path.expandvars(os.path.expanduser(str(self.value("clip_dir")))))

    def config(self) -> Config:
        """The core configuration from the current parameter values.

        Raises:
            ConfigError: the combination of values is invalid.
        """
        return self._config_with({})

    # -- internals ---------------------------------------------------------------------
    def _profile_config(self) -> Config:
        device = str(self.value("device")) if "device" in self._specs else "auto"
        profile = str(self.value("profile")) if "profile" in self._specs else "auto"
        return load_config(profile=resolve_profile(profile, device), device=device)

    def _config_with(self, changes: dict[str, Any]) -> Config:
        base = self._base if self._base is not None else PROFILES["paper"]
        values = {name: self.value(name) for name in self._mirrored}
        values.update(changes)
        return apply_overrides(base, values) if values else base

    def _check_spec(self, spec: ParamSpec, value: Any) -> str | None:
        if spec.choices and value not in spec.choices:
            return f"{spec.name}: must be one of {', '.join(spec.choices)}; got {value!r}"
        if spec.name == "device":
            try:
                apply_overrides(PROFILES["paper"], {"device": value})
            except ConfigError as exc:
                return str(exc)
        if spec.name == "clip_dir" and not str(value).strip():
            return "clip_dir: must not be empty"
        return None

    def _on_set(self, params: Sequence[Parameter]) -> SetParametersResult:
        changes: dict[str, Any] = {}
        for p in params:
            value = _plain(p.value)
            spec = self._specs.get(p.name)
            if spec is not None:
                reason = self._check_spec(spec, value)
                if reason:
                    return SetParametersResult(successful=False, reason=reason)
            elif p.name in self._schema:
                changes[p.name] = value
        if changes:
            try:
                self._config_with(changes)
            except ConfigError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)
