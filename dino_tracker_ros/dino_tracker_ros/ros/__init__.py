"""The ROS 2 nodes of dino_tracker_ros: thin adapters over :mod:`dino_tracker_ros.core`.

* :mod:`.recorder` (``recorder``): camera topic -> ring buffer -> clips (``save_clip``,
  ``list_clips``), announced on ``clips``.
* :mod:`.trainer` (``trainer``): the ``train_clip`` action over the core trainer, one job
  at a time on a worker thread; ``auto_train`` for announced clips.
* :mod:`.tracker` (``tracker``): ``query_tracks`` over the core predictor, answers also on
  ``trajectories``, ``markers`` (:mod:`.markers`) and ``overlay``.
* :mod:`.composed` (``nodes``, ``make nodes``): all three in one process.

Shared pieces: :mod:`.params` (node parameters and the mirrored core configuration),
:mod:`.conversions` (messages <-> arrays), :mod:`.runtime` (QoS, the process runner with
the shutdown order that keeps rclpy from aborting). Names and types follow
``CONTRACT.md``. The nodes hold no method logic: parameters become a core ``Config``,
messages become arrays, core progress callbacks become action feedback.

The nodes are plain (not lifecycle) nodes: their heavy resources are per clip and loaded on
demand (the trainer's job, the tracker's predictor cache), so there is nothing to configure
or activate up front, and plain nodes work with ``ros2 run`` and launch files without a
lifecycle manager.
"""

__all__ = ["composed", "conversions", "markers", "params", "recorder", "runtime", "tracker",
           "trainer"]
