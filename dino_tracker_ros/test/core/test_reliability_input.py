"""Reliability, bad input (issue 7): the core validators against random and hostile values.

Every validator either accepts a value or raises the right
:class:`~dino_tracker_ros.core.errors.DinoTrackerError` subclass with a one-line message;
nothing else escapes, and a failure changes nothing on disk (the clip directory's hash is
compared before and after). Hypothesis draws the values (bounded example counts,
``deadline=None``: the machine is shared).
"""

from __future__ import annotations

import json
import math
import os
import string
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from suite_helpers import tree_hash

from dino_tracker_ros.core.bag import (
    SUPPORTED_ENCODINGS,
    ImageEncodingError,
    clip_from_bag,
    decode_compressed,
    decode_raw,
)
from dino_tracker_ros.core.clip import (
    MAX_STAMP_NS,
    Clip,
    ClipMeta,
    ClipWriter,
    clip_from_array,
    clip_from_frames_dir,
    clip_from_video,
    list_clips,
    open_clip,
    resolve_clip_path,
    validate_clip_id,
    write_clip,
)
from dino_tracker_ros.core.config import Config, apply_overrides, load_config
from dino_tracker_ros.core.errors import ClipError, ConfigError, DinoTrackerError, QueryError
from dino_tracker_ros.core.predictor import validate_queries
from dino_tracker_ros.core.synthetic import make_synthetic_clip
from dino_tracker_ros.core.trainer import STATES, train_status

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

HOSTILE_IDS = [
    "", ".", "..", "../x", "x/../../y", "/etc/passwd", "/abs", "a/b", "a\\b", "a\x00b", "\x00",
    "x" * 129, " x", "x ", "-rf", ".hidden", "a..b", "~", "~root", "$HOME", "a\nb", "é",
    "clip\u2215x", "C:\\x", "..\\x", "a/", "%2e%2e", 5, b"bytes", ["a"],
]




def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A clip directory with one good clip ``good`` (frames 6, 32x24)."""
    root = tmp_path_factory.mktemp("store")
    frames = np.random.default_rng(0).integers(0, 256, (6, 24, 32, 3), dtype=np.uint8)
    clip_from_array(frames, root, "good", fps=10.0)
    return root


# -- 5. clip ids never escape the clip directory ------------------------------------------
@pytest.mark.parametrize("clip_id", HOSTILE_IDS, ids=repr)
def test_hostile_clip_ids_are_refused_everywhere(store, tmp_path, clip_id):
    before = tree_hash(store), set(os.listdir(store.parent)) | {tmp_path.name}
    with pytest.raises(ClipError) as info:
        validate_clip_id(clip_id)
    with pytest.raises(ClipError):
        validate_clip_id(None)
    assert "invalid clip id" in one_line(info.value)
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    src_dir = tmp_path / "pngs"
    src_dir.mkdir()
    cv2.imwrite(str(src_dir / "0.png"), frames[0])
    entry_points = [
        lambda: resolve_clip_path(store, clip_id),
        lambda: open_clip(store, clip_id),
        lambda: ClipWriter(store, clip_id, fps=10.0),
        lambda: write_clip(store, clip_id, frames, fps=10.0),
        lambda: clip_from_array(frames, store, clip_id),
        lambda: clip_from_frames_dir(src_dir, store, clip_id),
        lambda: make_synthetic_clip(store, clip_id, num_frames=2, height=64, width=64),
    ]
    for call in entry_points:
        with pytest.raises(ClipError):
            call()
    assert (tree_hash(store), set(os.listdir(store.parent))) == before


@FUZZ
@given(st.one_of(st.text(max_size=140),
                 st.text(alphabet=string.ascii_letters + "./\\-_\x00~", max_size=20)))
def test_any_clip_id_resolves_inside_the_root_or_is_refused(store, clip_id):
    try:
        path = resolve_clip_path(store, clip_id)
    except ClipError as exc:
        one_line(exc)
        return
    assert path.parent == store.absolute()
    assert path.name == clip_id and clip_id not in (".", "..") and "\x00" not in clip_id
    assert os.path.realpath(path).startswith(os.path.realpath(store) + os.sep)


def test_links_out_of_the_clip_directory_are_refused_and_not_listed(store, tmp_path):
    outside = tmp_path / "outside"
    clip_from_array(np.zeros((2, 8, 8, 3), np.uint8), outside, "victim")
    link = store / "escape"
    link.symlink_to(outside / "victim", target_is_directory=True)
    try:
        with pytest.raises(ClipError, match="links outside"):
            open_clip(store, "escape")
        with pytest.raises(ClipError):
            ClipWriter(store, "escape", fps=10.0, overwrite=True)
        assert [c.clip_id for c in list_clips(store)] == ["good"]
    finally:
        link.unlink()


# -- 1. clip directories: clip.json, frames, foreign files ---------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=4),
    max_leaves=12,
)
_FIELDS = ("clip_id", "num_frames", "width", "height", "fps", "stamps_ns", "frame_id",
           "source", "encoding", "created", "format")


@FUZZ
@given(st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=4), st.booleans())
def test_clip_meta_from_random_json(changes, drop):
    good = ClipMeta("c", 2, 8, 8, 10.0, (1, 2)).to_dict()
    data = {**good, **changes}
    if drop and changes:
        data.pop(next(iter(changes)))
    try:
        meta = ClipMeta.from_dict(data)
    except ClipError as exc:
        one_line(exc)
        return
    # whatever is accepted is usable: sizes in range, stamps fit the ROS int32 seconds
    assert 1 <= meta.width <= 65535 and 1 <= meta.height <= 65535
    assert math.isfinite(meta.fps) and meta.fps > 0
    assert len(meta.stamps_ns) == meta.num_frames
    assert all(0 <= s <= MAX_STAMP_NS for s in meta.stamps_ns)
    json.dumps(meta.to_dict())


def _copy_clip(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    (dst / "frames").mkdir()
    for p in (src / "frames").iterdir():
        (dst / "frames" / p.name).write_bytes(p.read_bytes())
    (dst / "clip.json").write_bytes((src / "clip.json").read_bytes())
    return dst


CORRUPTIONS = {
    "clip.json binary": lambda d: (d / "clip.json").write_bytes(b"\xff\xfe\x00garbage"),
    "clip.json truncated": lambda d: (d / "clip.json").write_bytes(
        (d / "clip.json").read_bytes()[:40]),
    "clip.json deeply nested": lambda d: (d / "clip.json").write_text("[" * 100000),
    "clip.json list": lambda d: (d / "clip.json").write_text("[1, 2]"),
    "clip.json foreign format": lambda d: (d / "clip.json").write_text(
        json.dumps({"format": "mp4", "clip_id": d.name})),
    "clip.json NaN fps": lambda d: (d / "clip.json").write_text(
        (d / "clip.json").read_text().replace('"fps": 10.0', '"fps": NaN')),
    "clip.json huge fps": lambda d: (d / "clip.json").write_text(
        (d / "clip.json").read_text().replace('"fps": 10.0', '"fps": ' + "9" * 400)),
    "clip.json is a directory": lambda d: ((d / "clip.json").unlink(),
                                           (d / "clip.json").mkdir()),
    "frame missing": lambda d: (d / "frames" / "000003.png").unlink(),
    "frames is a file": lambda d: (
        [p.unlink() for p in (d / "frames").iterdir()], (d / "frames").rmdir(),
        (d / "frames").write_bytes(b"x")),
}
FRAME_CORRUPTIONS = {
    "frame truncated": lambda p: p.write_bytes(p.read_bytes()[:50]),
    "frame empty": lambda p: p.write_bytes(b""),
    "frame foreign bytes": lambda p: p.write_bytes(os.urandom(300)),
    "frame wrong size": lambda p: cv2.imwrite(str(p), np.zeros((5, 7, 3), np.uint8)),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_clip_directories(store, tmp_path, name):
    root = tmp_path / "root"
    bad = _copy_clip(store / "good", root / "good")
    _copy_clip(store / "good", root / "other")
    (root / "other" / "clip.json").write_text(
        (root / "other" / "clip.json").read_text().replace('"good"', '"other"'))
    CORRUPTIONS[name](bad)
    before = tree_hash(root)
    with pytest.raises(ClipError) as info:
        Clip.open(bad)
    assert len(one_line(info.value)) < 400
    assert [c.clip_id for c in list_clips(root)] == ["other"]  # the others still list
    with pytest.raises(DinoTrackerError):
        train_status(bad)
    assert tree_hash(root) == before


@pytest.mark.parametrize("name", list(FRAME_CORRUPTIONS))
def test_corrupt_frames_are_clear_errors(store, tmp_path, name):
    clip_dir = _copy_clip(store / "good", tmp_path / "good")
    FRAME_CORRUPTIONS[name](clip_dir / "frames" / "000002.png")
    clip = Clip.open(clip_dir)  # the directory is complete; the bad frame shows on reading
    assert clip.frame(1).shape == (24, 32, 3)
    with pytest.raises(ClipError, match="frame 2") as info:
        clip.frame(2)
    one_line(info.value)
    with pytest.raises(ClipError):
        list(clip.read_frames())


@FUZZ
@given(_json)
def test_train_status_of_random_train_json(store, tmp_path_factory, record):
    clip_dir = _copy_clip(store / "good", tmp_path_factory.mktemp("ts") / "good")
    (clip_dir / "model").mkdir()
    (clip_dir / "model" / "train.json").write_text(json.dumps(record))
    status = train_status(clip_dir)
    assert status.state in STATES and isinstance(status.message, str)


@FUZZ
@given(st.fixed_dictionaries({
    "state": st.sampled_from(STATES),
    "iteration": _json, "total": _json, "loss": _json, "pid": _json, "host": _json,
    "proc": _json, "message": _json}))
def test_train_status_of_malformed_fields(store, tmp_path_factory, record):
    clip_dir = _copy_clip(store / "good", tmp_path_factory.mktemp("tsf") / "good")
    (clip_dir / "model").mkdir()
    (clip_dir / "model" / "train.json").write_text(json.dumps(record))
    status = train_status(clip_dir)
    assert status.state in STATES


def test_reused_pid_reads_as_interrupted(store, tmp_path):
    """A restarted container's node often gets the crashed one's pid: the record's process
    tag (boot id + start time) tells them apart."""
    import socket

    clip_dir = _copy_clip(store / "good", tmp_path / "good")
    (clip_dir / "model").mkdir()
    rec = {"state": "training", "iteration": 7, "total": 9, "pid": os.getpid(),
           "host": socket.gethostname(), "proc": "another-boot:123", "message": "training"}
    (clip_dir / "model" / "train.json").write_text(json.dumps(rec))
    status = train_status(clip_dir)
    assert status.state == "failed" and status.message.startswith("interrupted at iteration 7")
    rec.pop("proc")  # records of older versions: the pid alone decides (ours: alive)
    (clip_dir / "model" / "train.json").write_text(json.dumps(rec))
    assert train_status(clip_dir).state == "training"


# -- 1. configuration --------------------------------------------------------------------
_override_keys = st.sampled_from([
    "train.iterations", "train.lr", "device", "profile", "backbone.stride", "preprocess.height",
    "track.visibility_threshold", "model", "nope.x", "", ".", "train", "backbone.random_init"])
_yaml_values = st.sampled_from([
    ".inf", "-.inf", ".nan", "1e400", "-1", "0", "99999999999999999999", "[1, 2]", "{a: 1}",
    "true", "null", "'x'", "[", "!!python/object:os.system x", "1.5", "cuda:99", "cpu",
    "\x00", "''"])


@FUZZ
@given(st.lists(st.tuples(_override_keys, _yaml_values | st.text(max_size=10)), max_size=4))
def test_overrides_accept_or_raise_config_error(items):
    cfg = load_config(profile="tiny", device="cpu")
    try:
        out = apply_overrides(cfg, [f"{k}={v}" for k, v in items])
    except ConfigError as exc:
        one_line(exc)
        return
    assert isinstance(out, Config)
    assert out.train.iterations >= 0 and math.isfinite(out.train.lr)


@FUZZ
@given(st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from(["profile", "device", "train", "backbone", "x", "1"]),
                    _json, max_size=3).map(lambda d: yaml.safe_dump(d))))
def test_config_files_accept_or_raise_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    try:
        cfg = load_config(path, device="cpu")
    except ConfigError as exc:
        one_line(exc)
        return
    assert isinstance(cfg, Config)


def test_config_file_edge_cases(tmp_path):
    cases = {"binary.yaml": b"\xff\xfe\x00\x01", "dir.yaml": None,
             "alias.yaml": b"a: &a [*a]\n", "tabs.yaml": b"train:\n\titer: 1\n"}
    for name, content in cases.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        with pytest.raises(ConfigError) as info:
            load_config(path, device="cpu")
        one_line(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


# -- 1. image decoding (camera frames, bag messages) ---------------------------------------
@FUZZ
@given(encoding=st.sampled_from([*SUPPORTED_ENCODINGS, "yuv422", "16UC1", "", "rgb8\x00",
                                 "bayer_rggb8", "32FC1"]),
       height=st.integers(-3, 40), width=st.integers(-3, 40), step=st.integers(-3, 200),
       size=st.integers(0, 5000), bigendian=st.booleans())
def test_decode_raw_random_fields(encoding, height, width, step, size, bigendian):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    try:
        rgb = decode_raw(encoding, height, width, step, data, bigendian)
    except ImageEncodingError as exc:
        one_line(exc)
        return
    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8


@FUZZ
@given(st.binary(max_size=3000), st.integers(0, 2000))
def test_decode_compressed_random_and_truncated(noise, cut):
    png = cv2.imencode(".png", np.full((20, 30, 3), 99, np.uint8))[1].tobytes()
    jpg = cv2.imencode(".jpg", np.full((20, 30, 3), 99, np.uint8))[1].tobytes()
    for data in (noise, png[: cut % len(png)], jpg[: cut % len(jpg)], png[:8] + noise):
        try:
            rgb = decode_compressed(data)
        except ImageEncodingError as exc:
            one_line(exc)
            continue
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8


# -- 1. bag files ------------------------------------------------------------------------
TS = get_typestore(Stores.ROS2_JAZZY)


@pytest.fixture(scope="module")
def bag_bytes(tmp_path_factory) -> bytes:
    """A valid single-file MCAP bag with 4 rgb8 frames on /cam."""
    path = tmp_path_factory.mktemp("bag") / "bag"
    Image = TS.types["sensor_msgs/msg/Image"]
    Header, Time = TS.types["std_msgs/msg/Header"], TS.types["builtin_interfaces/msg/Time"]
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/cam", "sensor_msgs/msg/Image", typestore=TS)
        for i in range(4):
            stamp = 1_700_000_000_000_000_000 + i * 100_000_000
            msg = Image(header=Header(stamp=Time(sec=stamp // 10**9, nanosec=stamp % 10**9),
                                      frame_id="cam"),
                        height=6, width=8, encoding="rgb8", is_bigendian=0, step=24,
                        data=np.full(144, 10 * i, np.uint8))
            writer.write(conn, stamp, TS.serialize_cdr(msg, "sensor_msgs/msg/Image"))
    return next(path.glob("*.mcap")).read_bytes()


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**6), flips=st.lists(st.integers(0, 10**6), max_size=4),
       suffix=st.sampled_from([".mcap", ".db3", ".bag"]))
def test_truncated_and_corrupted_bags(bag_bytes, tmp_path_factory, cut, flips, suffix):
    work = tmp_path_factory.mktemp("bagfuzz")
    data = bytearray(bag_bytes[: cut % (len(bag_bytes) + 1)])
    for f in flips:
        if data:
            data[f % len(data)] ^= 0xA5
    bag = work / f"bag{suffix}"
    bag.write_bytes(bytes(data))
    root = work / "clips"
    try:
        clip = clip_from_bag(bag, root, "/cam", "imported")
    except ClipError as exc:
        one_line(exc)
        assert not root.exists() or list_clips(root) == []
        assert not root.exists() or not any(p.name.endswith(".tmp") for p in root.iterdir())
        return
    # accepted: the frames are exactly frames of the bag
    for k in range(len(clip)):
        assert int(clip.frame(k)[0, 0, 0]) in (0, 10, 20, 30)


def test_bag_directory_with_foreign_metadata(tmp_path):
    bag = tmp_path / "bagdir"
    bag.mkdir()
    (bag / "metadata.yaml").write_text("rosbag2_bagfile_information: [1, 2\n")
    with pytest.raises(ClipError) as info:
        clip_from_bag(bag, tmp_path / "clips", "/cam")
    one_line(info.value)
    (bag / "metadata.yaml").write_bytes(os.urandom(200))
    with pytest.raises(ClipError):
        clip_from_bag(bag, tmp_path / "clips", "/cam")


def test_video_import_of_foreign_files(tmp_path):
    cases = {"x.mp4": os.urandom(2000), "empty.avi": b"", "t.mp4": b"\x00" * 10}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ClipError) as info:
            clip_from_video(path, tmp_path / "clips")
        one_line(info.value)
    assert list_clips(tmp_path / "clips") == []


# -- 1. query points -----------------------------------------------------------------------
_num = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.integers(-(2**40), 2**40)


@FUZZ
@given(st.lists(st.tuples(_num, _num, _num), max_size=6))
def test_query_validation(rows):
    try:
        q = validate_queries(np.array(rows, dtype=np.float64).reshape(-1, 3), 6, (24, 32))
    except QueryError as exc:
        one_line(exc)
        return
    assert np.isfinite(q).all()
    assert ((q[:, 0] >= 0) & (q[:, 0] < 6)).all()


# -- 1. CLI arguments ------------------------------------------------------------------------
CLI_CASES = [
    ["synth", "{root}", "--clip-id", "../x"],
    ["synth", "{root}", "--frames", "-3"],
    ["synth", "{root}", "--frames", "0"],
    ["synth", "{root}", "--height", "16"],
    ["synth", "{root}", "--height", "40", "--width", "40"],
    ["synth", "{root}", "--points", "0"],
    ["synth", "{root}", "--height", "100000", "--width", "100000", "--frames", "1"],
    ["import-video", "{junk}", "{root}"],
    ["import-video", "{tmp}/missing.mp4", "{root}"],
    ["import-bag", "{junk}", "--clip-dir", "{root}", "--topic", "/x"],
    ["preprocess", "{tmp}/missing"],
    ["preprocess", "{junk}"],
    ["train", "{root}/good", "--iterations", "-5"],
    ["train", "{root}/good", "--iterations", "99999999999"],
    ["track", "{root}/good", "--grid", "8", "--out", "/dev/null"],
    ["config", "--set", "train.iterations=.inf"],
    ["config", "--set", "train.lr=nan"],
    ["config", "--set", "nonsense"],
    ["config", "--set", "train.iterations=["],
    ["config", "--config", "{tmp}"],
    ["config", "--config", "{junk}"],
    ["config", "--device", "gpu"],
]


@pytest.mark.parametrize("argv", CLI_CASES, ids=lambda a: " ".join(a)[:60])
def test_cli_bad_arguments_one_line_no_traceback(store, tmp_path, capsys, argv):
    from dino_tracker_ros.cli import main

    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(3000))
    before = tree_hash(store)
    args = [a.format(root=store, junk=junk, tmp=tmp_path) for a in argv]
    try:
        code = main(["--log-level", "error", *args])
    except SystemExit as exc:  # argparse: usage line + error line, status 2
        code = exc.code
        assert code == 2
    else:
        assert code in (1, 2), code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dino-tracker: error: "), err
    assert tree_hash(store) == before
    assert not (tmp_path / "x").exists()
