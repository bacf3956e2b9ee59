"""The typed configuration: profiles, YAML round trip, overrides, validation."""

from __future__ import annotations

import pytest

from dino_tracker_ros.core.config import PROFILES, Config, iter_fields, load_config
from dino_tracker_ros.core.errors import ConfigError


def test_paper_profile_matches_method():
    cfg = PROFILES["paper"]
    assert cfg.backbone.model == "dinov2_vitl14"
    assert (cfg.backbone.layer, cfg.backbone.stride) == (15, 7)
    assert (cfg.preprocess.height, cfg.preprocess.width) == (476, 854)
    assert cfg.train.iterations == 10_000
    assert (cfg.train.flow_batch, cfg.train.flow_frames) == (512, 4)
    assert (cfg.train.pair_frames, cfg.train.pair_points) == (4, 256)
    assert (cfg.train.w_flow, cfg.train.w_dino_bb, cfg.train.w_rfn_bb) == (1.0, 2.5e-4, 5e-5)
    assert (cfg.train.w_rfn_cc, cfg.train.w_prior, cfg.train.refine_start) == (0.5, 1e-4, 5000)
    assert (cfg.train.lr, cfg.train.lr_decay, cfg.train.lr_decay_every) == (0.01, 0.999, 40)
    assert cfg.model.radius == 35.0 and cfg.model.delta_dilations == (1, 1, 1, 2)
    assert (cfg.track.anchor_cos, cfg.track.occlusion_cos) == (0.7, 0.6)
    assert cfg.preprocess.flow.cycle_threshold == 1.5
    assert cfg.preprocess.flow.direct_threshold == 2.5


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_yaml_round_trip(tmp_path, name):
    cfg = PROFILES[name]
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path, profile=name) == cfg
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_partial_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("profile: cpu\ntrain:\n  iterations: 77\n")
    cfg = load_config(path, overrides=["track.visibility_threshold=0.25", "device=cpu"])
    assert cfg.profile == "cpu" and cfg.train.iterations == 77
    assert cfg.backbone.model == PROFILES["cpu"].backbone.model
    assert cfg.track.visibility_threshold == 0.25 and cfg.device == "cpu"
    assert cfg.replace(**{"train.seed": 3}).train.seed == 3


def test_auto_profile_is_cpu_without_cuda():
    import torch

    expected = "paper" if torch.cuda.is_available() else "cpu"
    assert load_config(profile="auto").profile == expected


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.nope=1", "unknown setting 'train.nope'"),
        ("train.iterations=abc", "expected an integer"),
        ("train.lr=-1", "must be in"),
        ("train.lr=.nan", "must be finite"),
        ("backbone.model=resnet", "must be one of"),
        ("model.delta_channels=[0, 3]", "positive integers"),
        ("backbone.random_init=1", "true or false"),
        ("device=gpu7", "device: use auto"),
        ("iterations", "section.key=value"),
    ],
)
def test_bad_values_raise_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(profile="cpu", overrides=[override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(bad)


def test_every_field_is_documented():
    names = [name for name, f, _ in iter_fields()]
    assert len(names) == len(set(names)) > 50
    for name, f, _ in iter_fields():
        assert f.metadata.get("help"), name


def test_config_reference_is_current():
    """docs/configuration.md is generated from the schema (`make docs`); it must not drift."""
    from pathlib import Path

    from dino_tracker_ros.cli import config_reference

    doc = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
    assert config_reference() in doc.read_text(), "run `make docs` to regenerate"
