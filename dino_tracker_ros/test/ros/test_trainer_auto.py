"""The trainer alone with ``auto_train``: a late start still learns of an announced clip,
trains it, and after a crash (SIGKILL) a restarted trainer resumes it from its checkpoint.
"""

from __future__ import annotations

import signal
import time

import pytest

from dino_tracker_msgs.msg import ClipInfo
from dino_tracker_ros.core.synthetic import make_synthetic_clip
from dino_tracker_ros.core.trainer import train_status
from dino_tracker_ros.ros.conversions import clip_info
from dino_tracker_ros.ros.runtime import CLIPS_QOS

NS = "/dt_auto"

pytestmark = pytest.mark.slow


def test_auto_train_late_joiner_and_resume_after_crash(node_process, make_client,
                                                       tmp_path_factory, wait):
    clip_dir = tmp_path_factory.mktemp("auto_clips")
    clip, _ = make_synthetic_clip(clip_dir, "auto1", num_frames=8, height=96, width=96)
    client = make_client("auto_client", NS)
    announce = client.node.create_publisher(ClipInfo, "clips", CLIPS_QOS)
    seen = client.collect(ClipInfo, "clips", CLIPS_QOS)
    # announced before any trainer runs: transient-local delivers it to the late trainer
    announce.publish(clip_info(clip, ClipInfo.STATE_RECORDED, "announced by the test"))

    args = ["--ros-args", "-r", f"__ns:={NS}", "-p", f"clip_dir:={clip_dir}",
            "-p", "profile:=tiny", "-p", "backbone.random_init:=true", "-p", "auto_train:=true",
            "-p", "train.checkpoint_every:=3"]
    first = node_process("dino_tracker_ros.ros.trainer", *args, "-p",
                         "train.iterations:=100000")
    first.wait_for("auto_train: queued 'auto1' (announced)", timeout=120)
    wait(lambda: train_status(clip).state == "training" and train_status(clip).iteration >= 4,
         300, "a checkpoint of 'auto1'")
    first.proc.send_signal(signal.SIGKILL)  # a crash: no chance to clean up
    first.proc.wait(10)
    status = train_status(clip)
    assert status.state == "failed" and status.message.startswith("interrupted"), status
    assert (clip.model_dir / "checkpoint.pt").is_file()

    t0 = time.monotonic()
    second = node_process("dino_tracker_ros.ros.trainer", *args, "-p", "train.iterations:=8")
    wait(lambda: train_status(clip).state == "ready", 300, "the resumed job to finish")
    wait(lambda: any(m.clip_id == "auto1" and m.state == ClipInfo.STATE_READY
                     for _, m in seen), 10, "READY on clips")
    ready = [m for _, m in seen if m.clip_id == "auto1" and m.state == ClipInfo.STATE_READY]
    assert "resumed from iteration" in ready[-1].message, ready[-1].message
    out = second.output()
    assert "auto_train: queued 'auto1' (resuming (interrupted at iteration" in out
    assert out.count("training 'auto1'") == 1  # the replayed announcement did not re-queue it
    print(f"\nauto_train resume after crash: {time.monotonic() - t0:.1f} s")
    assert second.stop(signal.SIGINT) == 0
