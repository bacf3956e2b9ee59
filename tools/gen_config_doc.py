"""Regenerate docs/configuration.md from the configuration schema (`make docs`)."""

from __future__ import annotations

from pathlib import Path

from dino_tracker_ros.cli import config_reference

HEADER = """# Configuration reference

Generated from `dino_tracker_ros/core/config.py` by `make docs`; a test fails when it drifts.
Every setting can be given in a YAML file (`--config`, nested by section), on the command line
(`--set section.key=value`), or as a ROS parameter of the same dotted name
(`-p train.iterations:=200`). Profiles: `paper` (the reference's defaults), `cpu` (minutes on
2 CPU cores), `tiny` (seconds; tests only). `auto` selects `paper` on CUDA, `cpu` otherwise.

"""

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    out.write_text(HEADER + config_reference())
    print(f"wrote {out}")
