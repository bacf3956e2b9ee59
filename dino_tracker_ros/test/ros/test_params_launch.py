"""Parameters, the params file and the launch file (checked without launch_ros).

launch_ros is not installed here, so the launch file is checked statically: it parses, it
declares the documented arguments, every executable it starts is a console script of
setup.py, every parameter it sets is declared by the node(s) it starts, and the files it
refers to exist and are installed. What is not run here: ``ros2 launch`` itself (process
start-up through launch_ros, substitution evaluation) and RViz.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import rclpy
import yaml
from rclpy.context import Context
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from dino_tracker_ros.core.config import Config, iter_fields
from dino_tracker_ros.ros.params import resolve_profile
from dino_tracker_ros.ros.recorder import RECORDER_PARAMS, RecorderNode
from dino_tracker_ros.ros.tracker import TRACKER_PARAMS, TrackerNode
from dino_tracker_ros.ros.trainer import CONFIG_SECTIONS, TRAINER_PARAMS, TrainerNode

PACKAGE_DIR = Path(__file__).resolve().parents[2]
LAUNCH = PACKAGE_DIR / "launch" / "dino_tracker.launch.py"
CONFIG = PACKAGE_DIR / "config" / "dino_tracker.yaml"
RVIZ = PACKAGE_DIR / "rviz" / "dino_tracker.rviz"
MIRRORED = [n for n, _, _ in iter_fields(Config) if n.split(".")[0] in CONFIG_SECTIONS]
OWN = {"recorder": RECORDER_PARAMS, "trainer": TRAINER_PARAMS, "tracker": TRACKER_PARAMS}


def declared(node: str) -> set:
    """Every parameter a node declares (its own and the mirrored core settings)."""
    names = {s.name for s in OWN[node]}
    return names | set(MIRRORED) if node != "recorder" else names


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """The three nodes in-process, started with the package's params file plus overrides."""
    clips = tmp_path_factory.mktemp("clips")
    ctx = Context()
    rclpy.init(context=ctx, signal_handler_options=SignalHandlerOptions.NO, args=[
        "x", "--ros-args", "--params-file", str(CONFIG), "-p", f"clip_dir:={clips}",
        "-p", "profile:=tiny", "-p", "train.iterations:=7", "-p", "buffer_frames:=33",
        "-r", "__ns:=/params_test"])
    made = [RecorderNode(context=ctx), TrainerNode(context=ctx), TrackerNode(context=ctx)]
    yield dict(zip(("recorder", "trainer", "tracker"), made, strict=True)), clips
    for n in made:
        n.destroy_node()
    ctx.try_shutdown()


def test_nodes_declare_everything_with_descriptions_and_ranges(nodes):
    by_name, clips = nodes
    for name, node in by_name.items():
        assert node.get_fully_qualified_name() == f"/params_test/{name}"
        names = declared(name)
        assert names <= set(node._parameters), sorted(names - set(node._parameters))
        for pname in names:
            desc = node.describe_parameter(pname)
            assert desc.description, pname
        # global -p reaches every node of the process
        assert node.params.clip_dir() == clips
    rec = by_name["recorder"]
    assert rec.describe_parameter("buffer_frames").integer_range[0].to_value == 1_000_000
    assert rec.get_parameter("buffer_frames").value == 33
    tr = by_name["trainer"]
    lr = tr.describe_parameter("train.lr")
    assert (lr.floating_point_range[0].from_value, lr.floating_point_range[0].to_value) == \
        (0.0, 10.0)
    assert "one of" in tr.describe_parameter("backbone.model").additional_constraints
    cfg = tr.params.config()
    # tiny profile defaults, then the command-line override
    assert (cfg.profile, cfg.backbone.layer, cfg.train.iterations) == ("tiny", 3, 7)
    assert by_name["tracker"].params.config().track == cfg.track


def test_parameter_changes_are_validated(nodes):
    tr = nodes[0]["trainer"]
    bad = {
        "train.lr": -1.0,                       # rclpy range
        "backbone.model": "resnet",             # core choices
        "model.delta_channels": [0, 8],         # core type rule
        "profile": "paper",                     # read-only
        "device": "gpu",                        # read-only
    }
    for name, value in bad.items():
        result = tr.set_parameters([Parameter(name, value=value)])[0]
        assert not result.successful and result.reason, name
    tr.set_parameters([Parameter("preprocess.width", value=0)])
    result = tr.set_parameters([Parameter("preprocess.height", value=0)])[0]
    assert not result.successful and "cannot both be 0" in result.reason
    assert tr.set_parameters([Parameter("train.iterations", value=11)])[0].successful
    assert tr.params.config().train.iterations == 11
    rec = nodes[0]["recorder"]
    assert not rec.set_parameters([Parameter("clip_dir", value=" ")])[0].successful
    assert rec.set_parameters([Parameter("buffer_frames", value=2)])[0].successful
    assert rec.buffer._max_frames == 2


def test_profile_resolution():
    assert resolve_profile("tiny", "cuda") == "tiny"
    assert resolve_profile("auto", "cuda:1") == "paper"
    assert resolve_profile("auto", "cpu") == "cpu"


def _yaml_keys(section: dict) -> set:
    return set(section["ros__parameters"])


def test_params_file_holds_every_parameter_with_comments():
    data = yaml.safe_load(CONFIG.read_text())
    assert set(data) == {"/**", "/**/recorder", "/**/trainer", "/**/tracker"}
    shared = _yaml_keys(data["/**"])
    for node in OWN:
        keys = shared | _yaml_keys(data[f"/**/{node}"])
        own = {s.name for s in OWN[node]}
        assert own <= keys, (node, own - keys)
        assert _yaml_keys(data[f"/**/{node}"]) <= declared(node)
    assert shared <= set().union(*(declared(n) for n in OWN))
    # every core setting is listed (commented out: the profile gives its default)
    lines = CONFIG.read_text().splitlines()
    commented = {m.group(1) for m in (re.match(r"\s*# ([a-z_]+(?:\.[a-z_]+)+): ", ln)
                                      for ln in lines) if m}
    assert set(MIRRORED) <= commented, sorted(set(MIRRORED) - commented)
    # every active parameter line has a comment line right above it
    for i, line in enumerate(lines):
        if re.match(r"^    [a-z_.]+: ", line):
            assert lines[i - 1].lstrip().startswith("#"), line


def _call_name(node: ast.Call) -> str:
    return node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_launch_file_static_checks():
    tree = ast.parse(LAUNCH.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    args = {c.args[0].value for c in calls if _call_name(c) == "DeclareLaunchArgument"}
    assert {"namespace", "image_topic", "device", "params_file", "use_composed", "rviz"} <= args
    setup = (PACKAGE_DIR / "setup.py").read_text()
    scripts = dict(re.findall(r'"(\w[\w-]*) = (dino_tracker_ros[\w.]+):main"', setup))
    nodes = [c for c in calls if _call_name(c) == "Node"]
    ours = [c for c in nodes if isinstance(_kw(c, "package"), ast.Name)]  # package=PACKAGE
    assert len(ours) == 4 and 'PACKAGE = "dino_tracker_ros"' in LAUNCH.read_text()
    rviz = [c for c in nodes if c not in ours]
    assert [_kw(c, "package").value for c in rviz] == ["rviz2"]
    executables = {_kw(c, "executable").value for c in ours}
    assert executables == {"recorder", "trainer", "tracker", "nodes"}
    assert executables <= set(scripts), executables - set(scripts)
    every = set().union(*(declared(n) for n in OWN))
    for call in ours:
        exe = _kw(call, "executable").value
        allowed = every if exe == "nodes" else declared(exe)
        params = _kw(call, "parameters")
        dict_keys = {k.value for d in params.elts if isinstance(d, ast.Dict) for k in d.keys}
        assert dict_keys and dict_keys <= allowed, (exe, dict_keys - allowed)
        if exe != "nodes":
            assert _kw(call, "name").value == exe
    # the files it refers to exist and setup.py installs their folders
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    assert {"config", "dino_tracker.yaml", "rviz", "dino_tracker.rviz"} <= strings
    assert CONFIG.is_file() and RVIZ.is_file()
    for folder in ("launch/*.py", "config/*.yaml", "rviz/*.rviz"):
        assert folder in setup
    compile(LAUNCH.read_text(), str(LAUNCH), "exec")


def test_rviz_config_shows_markers_and_overlay():
    view = yaml.safe_load(RVIZ.read_text())["Visualization Manager"]
    topics = {d["Class"]: d.get("Topic", {}).get("Value") for d in view["Displays"]}
    assert topics["rviz_default_plugins/MarkerArray"] == "/dino_tracker/markers"
    assert topics["rviz_default_plugins/Image"] == "/dino_tracker/overlay"
