"""The installed workspace looks like a stock ROS 2 one, and the interfaces match CONTRACT.md.

Checks what `ros2 run` / `ros2 launch` rely on (executables under lib/<package>, launch and
config files under share/<package>, ament index entries) and every message, service and
action field, name and type, through the generated Python modules.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ament_index_python.packages import get_package_prefix, get_package_share_directory
from ament_index_python.resources import get_resource

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = ROOT / "dino_tracker_ros"

EXECUTABLES = {
    "dino-tracker": "dino_tracker_ros.cli:main",
    "recorder": "dino_tracker_ros.ros.recorder:main",
    "trainer": "dino_tracker_ros.ros.trainer:main",
    "tracker": "dino_tracker_ros.ros.tracker:main",
    "nodes": "dino_tracker_ros.ros.composed:main",
}

# Field names and types (as rosidl's Python API spells them) of every interface in
# CONTRACT.md, in declaration order. "srv/X.Request" etc. name the parts of services/actions.
_T = "dino_tracker_msgs/"
EXPECTED_FIELDS: dict[str, list[tuple[str, str]]] = {
    "msg/QueryPoint": [("frame", "uint32"), ("x", "float"), ("y", "float")],
    "msg/TrackPoint": [
        ("stamp", "builtin_interfaces/Time"), ("x", "float"), ("y", "float"),
        ("visible", "boolean"), ("visibility", "float"),
    ],
    "msg/Trajectory": [
        ("id", "uint32"), ("query", _T + "QueryPoint"),
        ("points", f"sequence<{_T}TrackPoint>"),
    ],
    "msg/TrajectoryArray": [
        ("header", "std_msgs/Header"), ("clip_id", "string"), ("width", "uint32"),
        ("height", "uint32"), ("trajectories", f"sequence<{_T}Trajectory>"),
    ],
    "msg/ClipInfo": [
        ("header", "std_msgs/Header"), ("clip_id", "string"), ("path", "string"),
        ("num_frames", "uint32"), ("width", "uint32"), ("height", "uint32"),
        ("fps", "float"), ("state", "uint8"), ("message", "string"),
    ],
    "srv/SaveClip.Request": [("clip_id", "string"), ("duration", "float"), ("stride", "uint32")],
    "srv/SaveClip.Response": [
        ("success", "boolean"), ("message", "string"), ("clip", _T + "ClipInfo"),
    ],
    "srv/ListClips.Request": [],
    "srv/ListClips.Response": [("clips", f"sequence<{_T}ClipInfo>")],
    "srv/QueryTracks.Request": [
        ("clip_id", "string"), ("queries", f"sequence<{_T}QueryPoint>"),
        ("grid_step", "uint32"), ("grid_frame", "uint32"),
    ],
    "srv/QueryTracks.Response": [
        ("success", "boolean"), ("message", "string"), ("tracks", _T + "TrajectoryArray"),
    ],
    "srv/TrackLive.Request": [
        ("clip_id", "string"), ("queries", f"sequence<{_T}QueryPoint>"), ("enable", "boolean"),
    ],
    "srv/TrackLive.Response": [("success", "boolean"), ("message", "string")],
    "action/TrainClip.Goal": [("clip_id", "string"), ("iterations", "uint32")],
    "action/TrainClip.Result": [
        ("success", "boolean"), ("message", "string"), ("model_path", "string"),
        ("final_loss", "float"), ("seconds", "float"),
    ],
    "action/TrainClip.Feedback": [
        ("stage", "string"), ("progress", "float"), ("iteration", "uint32"),
        ("total_iterations", "uint32"), ("loss", "float"),
    ],
}
EXPECTED_CONSTANTS = {
    "msg/ClipInfo": {"STATE_RECORDED": 0, "STATE_TRAINING": 1, "STATE_READY": 2, "STATE_FAILED": 3}
}
INTERFACES = sorted({key.split(".")[0] for key in EXPECTED_FIELDS})


def _interface_class(key: str) -> type:
    """``"srv/SaveClip.Request"`` -> class ``dino_tracker_msgs.srv.SaveClip.Request``."""
    kind, name = key.split("/")
    obj = importlib.import_module(f"dino_tracker_msgs.{kind}")
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


# -- install layout ----------------------------------------------------------------------
def test_executables_in_lib_package_dir() -> None:
    lib = Path(get_package_prefix("dino_tracker_ros")) / "lib" / "dino_tracker_ros"
    for name in EXECUTABLES:
        path = lib / name
        assert path.is_file() and os.access(path, os.X_OK), f"{path} missing or not executable"
    dist = importlib.metadata.distribution("dino_tracker_ros")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == EXECUTABLES


@pytest.mark.timeout(120)
def test_dino_tracker_command_runs_and_is_on_path() -> None:
    script = Path(get_package_prefix("dino_tracker_ros")) / "lib/dino_tracker_ros/dino-tracker"
    done = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: dino-tracker")
    on_path = shutil.which("dino-tracker")
    assert on_path is not None, "dino-tracker is not on PATH (source env.sh)"
    assert Path(on_path).resolve() == script.resolve()


def test_share_holds_package_xml_launch_and_config() -> None:
    share = Path(get_package_share_directory("dino_tracker_ros"))
    assert (share / "package.xml").read_bytes() == (PACKAGE_DIR / "package.xml").read_bytes()
    msgs_share = Path(get_package_share_directory("dino_tracker_msgs"))
    assert (msgs_share / "package.xml").read_bytes() == (
        ROOT / "dino_tracker_msgs" / "package.xml"
    ).read_bytes()
    for folder, pattern in (("launch", "*.py"), ("config", "*.yaml"), ("rviz", "*.rviz")):
        assert (share / folder).is_dir(), f"share/dino_tracker_ros/{folder} missing"
        for source in (PACKAGE_DIR / folder).glob(pattern):
            installed = share / folder / source.name
            assert installed.is_file(), f"{source.name} not installed; run make setup"
            assert installed.read_bytes() == source.read_bytes()


def test_contract_launch_and_config_files_installed() -> None:
    """CONTRACT.md: `ros2 launch dino_tracker_ros dino_tracker.launch.py` and its yaml."""
    share = Path(get_package_share_directory("dino_tracker_ros"))
    for path in ("launch/dino_tracker.launch.py", "config/dino_tracker.yaml"):
        assert (share / path).is_file(), f"share/dino_tracker_ros/{path} is not installed"


def test_ament_index_entries() -> None:
    for package in ("dino_tracker_ros", "dino_tracker_msgs"):
        _, prefix = get_resource("packages", package)
        assert Path(prefix) == Path(get_package_prefix(package))
    content, _ = get_resource("rosidl_interfaces", "dino_tracker_msgs")
    stems = {Path(line).with_suffix("").as_posix() for line in content.split()}
    assert stems == set(INTERFACES)
    assert {Path(line).suffix for line in content.split()} == {".idl", ".msg", ".srv", ".action"}


def test_installed_python_is_the_source_tree() -> None:
    """`make test` tests the code under dino_tracker_ros/dino_tracker_ros (symlink install)."""
    import dino_tracker_ros

    package = Path(dino_tracker_ros.__file__).resolve().parent
    assert package == (PACKAGE_DIR / "dino_tracker_ros").resolve()


# -- interfaces ------------------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(EXPECTED_FIELDS))
def test_interface_fields(key: str) -> None:
    cls = _interface_class(key)
    assert list(cls.get_fields_and_field_types().items()) == EXPECTED_FIELDS[key]
    instance = cls()  # defaults construct
    for field, _ in EXPECTED_FIELDS[key]:
        assert hasattr(instance, field)


def test_interface_constants() -> None:
    for key, constants in EXPECTED_CONSTANTS.items():
        cls = _interface_class(key)
        assert {name: getattr(cls, name) for name in constants} == constants
    declared = {n for n in dir(_interface_class("msg/ClipInfo")) if n.startswith("STATE_")}
    assert declared == set(EXPECTED_CONSTANTS["msg/ClipInfo"])


# -- the contract document itself (when shared/ is beside the repository) ------------------
_RAW_TYPES = {"float32": "float", "float64": "double", "bool": "boolean", "byte": "octet"}


def _rosidl_type(raw: str) -> str:
    """Type as written in a .msg file -> rosidl's Python spelling."""
    if raw.endswith("[]"):
        return f"sequence<{_rosidl_type(raw[:-2])}>"
    if raw in _RAW_TYPES:
        return _RAW_TYPES[raw]
    if raw[0].isupper():
        return _T + raw
    return raw


def _contract_interfaces(text: str) -> tuple[dict, dict]:
    """Field lists and constants of every interface block in CONTRACT.md."""
    fields: dict[str, list[tuple[str, str]]] = {}
    constants: dict[str, dict[str, int]] = {}
    blocks = re.findall(r"`((?:msg|srv|action)/\w+)\.(?:msg|srv|action)`[^\n]*\n```\n(.*?)```",
                        text, flags=re.S)
    for name, body in blocks:
        kind = name.split("/")[0]
        parts = {"msg": [""], "srv": [".Request", ".Response"],
                 "action": [".Goal", ".Result", ".Feedback"]}[kind]
        for part, section in zip(parts, body.split("---\n"), strict=True):
            key = name + part
            fields[key] = []
            for line in section.splitlines():
                line = line.split("#")[0].strip()
                if not line:
                    continue
                raw_type, rest = line.split(None, 1)
                if "=" in rest:
                    const, value = rest.replace(" ", "").split("=")
                    constants.setdefault(key, {})[const] = int(value)
                else:
                    fields[key].append((rest.strip(), _rosidl_type(raw_type)))
    return fields, constants


def test_contract_md_matches_expected() -> None:
    candidates = [ROOT.parent / "shared" / "CONTRACT.md", ROOT / "shared" / "CONTRACT.md"]
    contract = next((p for p in candidates if p.is_file()), None)
    if contract is None:
        pytest.skip("shared/CONTRACT.md is not beside the repository")
    fields, constants = _contract_interfaces(contract.read_text())
    assert fields == EXPECTED_FIELDS
    assert constants == EXPECTED_CONSTANTS


def test_interface_modules_import_in_a_fresh_interpreter() -> None:
    """The generated modules import in a fresh interpreter of this environment."""
    code = "import dino_tracker_msgs.msg, dino_tracker_msgs.srv, dino_tracker_msgs.action, rclpy"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
