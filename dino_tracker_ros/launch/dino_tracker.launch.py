"""Start the recorder, trainer and tracker of dino_tracker_ros (``ros2 launch``).

    ros2 launch dino_tracker_ros dino_tracker.launch.py \
        image_topic:=/camera/color/image_raw device:=cuda namespace:=dino_tracker

Arguments:
    namespace: namespace of the three nodes (default ``dino_tracker``).
    image_topic: the camera topic (the recorder's, and the tracker's for live tracking).
    device: torch device of trainer and tracker (auto, cpu, cuda, cuda:N).
    params_file: the parameters file (default: the package's config/dino_tracker.yaml).
    use_composed: ``true`` runs the three nodes in one process (the ``nodes`` executable,
        like ``make nodes``) instead of one process per node.
    rviz: ``true`` also starts RViz with the package's rviz/dino_tracker.rviz.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "dino_tracker_ros"


def generate_launch_description() -> LaunchDescription:
    """The launch description: arguments, then either three nodes or one composed process."""
    namespace = LaunchConfiguration("namespace")
    image_topic = LaunchConfiguration("image_topic")
    device = LaunchConfiguration("device")
    params_file = LaunchConfiguration("params_file")
    use_composed = LaunchConfiguration("use_composed")
    share = FindPackageShare(PACKAGE)

    arguments = [
        DeclareLaunchArgument("namespace", default_value="dino_tracker",
                              description="namespace of the recorder, trainer and tracker"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw",
                              description="camera topic (sensor_msgs/Image) to record"),
        DeclareLaunchArgument("device", default_value="auto",
                              description="torch device: auto, cpu, cuda or cuda:N"),
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([share, "config", "dino_tracker.yaml"]),
            description="parameters file of the three nodes"),
        DeclareLaunchArgument("use_composed", default_value="false",
                              description="run the three nodes in one process"),
        DeclareLaunchArgument("rviz", default_value="false",
                              description="also start RViz with the package's config"),
    ]

    separate = UnlessCondition(use_composed)
    common = {"namespace": namespace, "output": "screen", "emulate_tty": True}
    nodes = [
        Node(package=PACKAGE, executable="recorder", name="recorder",
             parameters=[params_file, {"image_topic": image_topic}], condition=separate,
             **common),
        Node(package=PACKAGE, executable="trainer", name="trainer",
             parameters=[params_file, {"device": device}], condition=separate, **common),
        Node(package=PACKAGE, executable="tracker", name="tracker",
             parameters=[params_file, {"image_topic": image_topic, "device": device}],
             condition=separate, **common),
        # One process, three nodes: no `name` (it would rename all three); its parameters
        # apply to all of them (a node ignores those it does not declare).
        Node(package=PACKAGE, executable="nodes",
             parameters=[params_file, {"image_topic": image_topic, "device": device}],
             condition=IfCondition(use_composed), **common),
        Node(package="rviz2", executable="rviz2", name="rviz",
             arguments=["-d", PathJoinSubstitution([share, "rviz", "dino_tracker.rviz"])],
             condition=IfCondition(LaunchConfiguration("rviz")), output="screen"),
    ]
    return LaunchDescription(arguments + nodes)
