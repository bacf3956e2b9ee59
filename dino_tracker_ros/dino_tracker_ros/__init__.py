"""dino_tracker_ros: DINO-Tracker point tracking as a ROS 2 perception system.

The method lives in :mod:`dino_tracker_ros.core` (no ROS imports); the ROS 2 nodes in
:mod:`dino_tracker_ros.ros`; the offline command line in :mod:`dino_tracker_ros.cli`.
"""

import os

# OpenMP threads that spin while waiting are pathological when the CPU is shared (other
# nodes, other processes): a training iteration measured 5.96 s with 2 spinning threads on a
# 2-core machine with one other busy process, 0.72 s with passive waiting, 0.62 s with one
# thread. Passive waiting is the default here unless the user chose otherwise; it only takes
# effect when set before torch (OpenMP) is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["__version__"]
