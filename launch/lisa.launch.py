"""Start lisa_node: ``ros2 launch lisa_ros lisa.launch.py model:=xinlai/LISA-7B-v1``.

Every parameter is in the params file (default: the package's config/lisa_params.yaml); ``model``
and ``device`` given here override it. ``image_topic``/``command_topic`` remap the node's
``image``/``command`` inputs (with ``image_transport: compressed`` the node reads
``<image_topic>/compressed``).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "model",
                default_value="",
                description="checkpoint directory or hub id; empty = the embedded demo model",
            ),
            DeclareLaunchArgument(
                "params_file",
                default_value=PathJoinSubstitution(
                    [FindPackageShare("lisa_ros"), "config", "lisa_params.yaml"]
                ),
                description="YAML file with the node's parameters",
            ),
            DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
            DeclareLaunchArgument(
                "image_topic", default_value="image", description="camera topic to segment"
            ),
            DeclareLaunchArgument(
                "command_topic", default_value="command", description="std_msgs/String commands"
            ),
            DeclareLaunchArgument(
                "device",
                default_value="",
                description="torch device (cpu, cuda, cuda:1); empty = cuda when available",
            ),
            Node(
                package="lisa_ros",
                executable="lisa_node",
                name="lisa_node",
                namespace=LaunchConfiguration("namespace"),
                output="screen",
                emulate_tty=True,
                parameters=[
                    LaunchConfiguration("params_file"),
                    {
                        "model": ParameterValue(LaunchConfiguration("model"), value_type=str),
                        "device": ParameterValue(LaunchConfiguration("device"), value_type=str),
                    },
                ],
                remappings=[
                    ("image", LaunchConfiguration("image_topic")),
                    ("command", LaunchConfiguration("command_topic")),
                ],
            ),
        ]
    )
