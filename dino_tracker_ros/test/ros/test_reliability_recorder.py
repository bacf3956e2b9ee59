"""Reliability of the recorder under load (issue 7): a 60 fps stream for most of a minute,
memory, the drop policy's accounting, and ``kill -9`` in the middle of ``save_clip``.

The recorder runs alone, as ``ros2 run`` starts it, with its default camera QoS (sensor
data: best effort, keep last 5) and a 120-frame ring buffer, so the buffer wraps about 22
times. This process publishes 160x120 rgb8 frames at 60 Hz with exact stamps and saves a
two-second clip (the buffer's span) every 8 s from another thread, while sampling the
recorder's resident memory (``VmRSS`` in ``/proc/PID/status``) once a second.

Memory bound: after a 15 s warm-up (buffer full, first clips written, every code path run
once) the median RSS of the last 5 s may exceed that of the 5 s after warm-up by at most
:data:`GROWTH_BOUND_MB`. The buffer itself is bounded at 120 x 57.6 KB = 6.9 MB; between
the two medians (~25 s, 1,500 frames at full rate) keeping every received frame would add
~85 MB, a leaked clip per save (120 frames, 6.9 MB; 3 saves) ~21 MB, one frame in five
~17 MB. Measured growth: +0.1 MB on quiet runs (also with the recorder stopped by SIGSTOP
for 5 s mid-stream), +9.9 MB once in a loaded CI run where the recorder missed 183 frames
in a 5 s stall (cause not found; not reproduced here).
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from dino_tracker_msgs.srv import ListClips, SaveClip
from dino_tracker_ros.core.clip import Clip, list_clips
from dino_tracker_ros.ros.conversions import rgb_to_image

NS = "/dt_mem"
CAMERA = f"{NS}/camera"
FPS = 60.0
STREAM_S = 45.0
WARMUP_S = 15.0
SAVE_EVERY_S = 8.0
SAVE_S = 2.0  # the buffer's span at FPS
BUFFER = 120
GROWTH_BOUND_MB = 16.0
H, W = 120, 160

pytestmark = pytest.mark.slow


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS")


def counters(message: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(
        r"(received|rejected|missed|evicted) (\d+)", message)} | {
        "buffered": int(re.search(r"buffered (\d+) frames", message).group(1))}


def start_recorder(node_process, clip_dir: Path):
    proc = node_process(
        "dino_tracker_ros.ros.recorder", "--ros-args", "-r", f"__ns:={NS}",
        "-p", f"clip_dir:={clip_dir}", "-p", f"image_topic:={CAMERA}",
        "-p", f"buffer_frames:={BUFFER}", "-p", "stats_period:=5.0")
    proc.wait_for("recording", timeout=60)
    return proc


def test_60fps_stream_memory_drops_and_kill_during_save(node_process, make_client, wait,
                                                         tmp_path):
    clip_dir = tmp_path / "clips"
    proc = start_recorder(node_process, clip_dir)
    client = make_client("mem_client", NS)
    save = client.client(SaveClip, "save_clip")
    pub = client.node.create_publisher(Image, CAMERA, qos_profile_sensor_data)
    wait(lambda: pub.get_subscription_count() > 0, 30, "the recorder's subscription")
    time.sleep(0.5)
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(8)]

    samples: list[tuple[float, float]] = []
    saves: list = []
    stop = threading.Event()
    t0 = time.monotonic()

    def background() -> None:
        next_save = t0 + 5.0
        while not stop.is_set():
            samples.append((time.monotonic() - t0, rss_mb(proc.proc.pid)))
            if time.monotonic() >= next_save:
                saves.append(client.call(save, SaveClip.Request(
                    clip_id=f"s{len(saves):02d}", duration=SAVE_S), timeout=60))
                next_save += SAVE_EVERY_S
            stop.wait(1.0)

    worker = threading.Thread(target=background, daemon=True)
    worker.start()
    published = 0
    stamp0 = 1_700_000_000_000_000_000
    period = 1.0 / FPS
    while time.monotonic() - t0 < STREAM_S:
        stamp = stamp0 + round(published * 1e9 / FPS)
        pub.publish(rgb_to_image(frames[published % len(frames)], stamp, "cam"))
        published += 1
        time.sleep(max(0.0, published * period - (time.monotonic() - t0)))
    elapsed = time.monotonic() - t0
    stop.set()
    worker.join(60)
    time.sleep(0.5)
    final = client.call(save, SaveClip.Request(clip_id="final", duration=SAVE_S), timeout=60)
    assert final.success, final.message
    assert proc.proc.poll() is None

    # -- the drop policy's accounting -----------------------------------------------------
    c = counters(final.message)
    assert c["received"] == c["rejected"] + c["evicted"] + c["buffered"]  # each frame once
    assert c["rejected"] == 0 and c["buffered"] == BUFFER
    # the buffer wrapped many times (how many frames a loaded 2-core machine takes in varies:
    # 2641 of 2700 on a quiet run, 1306 during a full CI run)
    assert c["evicted"] == c["received"] - BUFFER > 5 * BUFFER
    # every published frame arrived or is counted as missed; uncounted can only be frames
    # lost before the first or after the last received one (discovery at the start, the
    # keep-last queue and best effort at the very end): a handful
    assert published - 15 <= c["received"] + c["missed"] <= published
    # a save is refused (one line, nothing written) only when the recorder, starved by a
    # loaded machine, holds fewer than 2 frames of the window (seen once in a full CI run)
    ok = [r for r in saves if r.success]
    assert ok and all("tracking needs at least 2" in r.message
                      for r in saves if not r.success), [r.message for r in saves]
    assert sorted(c.clip_id for c in list_clips(clip_dir)) == sorted(
        [r.clip.clip_id for r in ok] + ["final"])
    for r in ok:  # each clip holds real frames of the stream, in order, at their stamps
        clip = Clip.open(clip_dir / r.clip.clip_id)
        index = (clip.stamps_ns - stamp0) * FPS / 1e9
        assert 2 <= len(clip) <= SAVE_S * FPS + 1
        assert np.allclose(index, np.round(index), atol=1e-3)
        assert (np.diff(index) >= 1 - 1e-3).all()
        for k in (0, len(clip) - 1):
            assert (clip.frame(k) == frames[int(round(index[k])) % len(frames)]).all()

    # -- memory -----------------------------------------------------------------------------
    after = [(t, m) for t, m in samples if t >= WARMUP_S]
    base = float(np.median([m for t, m in after if t < WARMUP_S + 5]))
    last = float(np.median([m for t, m in after if t >= after[-1][0] - 5]))
    peak = max(m for _, m in after)
    print(f"\nrecorder at {published / elapsed:.1f} fps for {elapsed:.0f} s ({published} "
          f"frames, {W}x{H} rgb8): {final.message.split('stream: ')[1]}; {len(saves)} clips "
          f"saved while streaming; RSS {samples[0][1]:.1f} MB at start, {base:.1f} MB after "
          f"warm-up, {last:.1f} MB at the end (peak {peak:.1f} MB): growth "
          f"{last - base:+.1f} MB (bound {GROWTH_BOUND_MB} MB)")
    series = [(round(t), round(m, 1)) for t, m in samples]
    assert last - base < GROWTH_BOUND_MB, f"RSS over time (s, MB): {series}"

    # -- kill -9 in the middle of a save ------------------------------------------------------
    before = {c.clip_id: len(c) for c in list_clips(clip_dir)}
    future = save.call_async(SaveClip.Request(clip_id="killed"))  # 120 frames
    time.sleep(float(rng.uniform(0.02, 0.15)))
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(10)
    assert not future.done() or not future.result().success or \
        (clip_dir / "killed" / "clip.json").is_file()
    visible = [p for p in clip_dir.iterdir() if not p.name.startswith(".")]
    assert all((p / "clip.json").is_file() for p in visible)  # no half clip under a name
    left = [p for p in clip_dir.iterdir() if p.name.endswith(".tmp")]
    after_kill = {c.clip_id: len(c) for c in list_clips(clip_dir)}
    assert {k: after_kill[k] for k in before} == before
    for clip in list_clips(clip_dir):
        clip.frame(len(clip) - 1)
    restarted = start_recorder(node_process, clip_dir)
    assert not [p for p in clip_dir.iterdir() if p.name.endswith(".tmp")]  # swept
    # The killed server stays "discovered" until its DDS lease runs out, so a request sent
    # before the new server's reader has matched is lost: ask until it answers.
    lister = client.client(ListClips, "list_clips")
    listed = None
    for _ in range(12):
        future = lister.call_async(ListClips.Request())
        deadline = time.monotonic() + 5.0
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        if future.done():
            listed = future.result()
            break
    assert listed is not None, "the restarted recorder never answered list_clips"
    assert {c.clip_id for c in listed.clips} == set(after_kill)
    assert restarted.proc.poll() is None
    print(f"kill -9 during save_clip: {len(left)} temporary left and swept at restart; "
          f"'killed' {'complete' if 'killed' in after_kill else 'absent'}; "
          f"{len(before)} earlier clips intact")
