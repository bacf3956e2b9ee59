"""Style checks as part of the suite: ruff over all Python, valid package manifests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = [ROOT / "dino_tracker_ros" / "package.xml", ROOT / "dino_tracker_msgs" / "package.xml"]


def _ruff() -> list[str]:
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).is_file():
        pytest.fail("ruff is not installed; run make setup")
    return [exe]


def test_ruff_config_is_the_project_standard() -> None:
    config = tomllib.loads((ROOT / "ruff.toml").read_text())
    assert config["line-length"] == 99
    assert config["target-version"] == "py310"
    assert set(config["lint"]["select"]) >= {"E", "F", "W", "I", "B", "UP"}


@pytest.mark.timeout(120)
def test_ruff_finds_nothing() -> None:
    done = subprocess.run(
        [*_ruff(), "check", "--no-cache", "--output-format", "concise", str(ROOT)],
        cwd=ROOT, capture_output=True, text=True, timeout=100, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_sees_the_python_files() -> None:
    """Guard against an exclude pattern that silently hides the code from the check above."""
    done = subprocess.run(
        [*_ruff(), "check", "--no-cache", "--show-files", str(ROOT)],
        cwd=ROOT, capture_output=True, text=True, timeout=100, check=False,
    )
    seen = {Path(line.strip()) for line in done.stdout.splitlines() if line.strip()}
    for path in (
        ROOT / "dino_tracker_ros" / "setup.py",
        ROOT / "dino_tracker_ros" / "dino_tracker_ros" / "__init__.py",
        Path(__file__).resolve(),
        ROOT / "tools" / "fix_ros_wheels.py",
    ):
        assert path in seen, f"ruff does not check {path}"
    top_dirs = {p.relative_to(ROOT).parts[0] for p in seen}
    assert not top_dirs & {".venv", "build", "install", "log"}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.parent.name)
def test_package_xml_is_valid_format_3(manifest: Path) -> None:
    package_mod = pytest.importorskip("catkin_pkg.package")
    package = package_mod.parse_package(manifest)
    package.validate()  # raises on a bad e-mail, missing license, ...
    assert package.package_format == 3
    assert package.name == manifest.parent.name
    assert all(m.email and "@" in m.email for m in package.maintainers)
    assert package.get_build_type() in {"ament_cmake", "ament_python"}


def test_package_xml_well_formed_by_xmllint() -> None:
    xmllint = shutil.which("xmllint")
    if xmllint is None:
        pytest.skip("xmllint is not installed (Debian/Ubuntu: apt-get install libxml2-utils)")
    done = subprocess.run(
        [xmllint, "--noout", *map(str, MANIFESTS)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
