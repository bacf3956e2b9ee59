"""All three nodes in one process (``make nodes``, console script ``nodes``).

``recorder``, ``trainer`` and ``tracker`` share one multi-threaded executor; the trainer's
job runs on its own worker thread, so recording and queries go on while a clip trains.
Namespace and parameters come from the usual ROS arguments, which apply to every node of
the process: ``nodes --ros-args -r __ns:=/robot1 --params-file config/dino_tracker.yaml
-p clip_dir:=/data/clips``. Ctrl-C and SIGTERM stop it cleanly (see
:func:`~dino_tracker_ros.ros.runtime.run_nodes`).

Lifecycle (managed) nodes are not used: the heavy resources are per clip and loaded on
demand (the tracker's predictor cache, the trainer's job), so there is nothing to
configure or activate up front, and the plain nodes work with ``ros2 run`` and launch
files without a lifecycle manager.
"""

from __future__ import annotations

from .recorder import RecorderNode
from .runtime import run_nodes
from .tracker import TrackerNode
from .trainer import TrainerNode

__all__ = ["main"]


def main(args: list[str] | None = None) -> int:
    """Run recorder, trainer and tracker in this process until shutdown."""
    return run_nodes([RecorderNode, TrainerNode, TrackerNode], args, num_threads=8)


if __name__ == "__main__":
    raise SystemExit(main())
