"""dino_tracker_ros: DINO-Tracker point tracking as a ROS 2 perception system.

The method lives in :mod:`dino_tracker_ros.core` (no ROS imports); the ROS 2 nodes in
:mod:`dino_tracker_ros.ros`; the offline command line in :mod:`dino_tracker_ros.cli`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
