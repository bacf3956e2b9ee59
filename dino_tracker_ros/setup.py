"""ament_python build of dino_tracker_ros (``colcon build``; ``make setup`` runs it)."""

import os
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "dino_tracker_ros"
SHARE = f"share/{PACKAGE}"


def files(pattern: str) -> list[str]:
    """Files matching ``pattern``, minus dangling links a --symlink-install build leaves behind
    when a source file is deleted."""
    return sorted(p for p in glob(pattern) if os.path.isfile(p))


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (SHARE, ["package.xml"]),
        (f"{SHARE}/launch", files("launch/*.py")),
        (f"{SHARE}/config", files("config/*.yaml") + files("config/*.xml")),
        (f"{SHARE}/rviz", files("rviz/*.rviz")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="dino_tracker_ros maintainers",
    maintainer_email="maintainer@dino-tracker-ros.dev",
    description="DINO-Tracker point tracking (ECCV 2024) as a ROS 2 perception system.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "dino-tracker = dino_tracker_ros.cli:main",
            "recorder = dino_tracker_ros.ros.recorder:main",
            "trainer = dino_tracker_ros.ros.trainer:main",
            "tracker = dino_tracker_ros.ros.tracker:main",
            "nodes = dino_tracker_ros.ros.composed:main",
        ],
    },
)
