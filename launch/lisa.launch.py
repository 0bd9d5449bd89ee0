"""Start lisa_node: ``ros2 launch lisa_ros lisa.launch.py model:=xinlai/LISA-7B-v1``.

Every parameter is in the params file (default: the package's config/lisa_params.yaml), and the
file wins: ``model``, ``device`` and ``depth`` given here override it, left out (empty) they do
not. ``image_topic``/``command_topic`` remap the node's ``image``/``command`` inputs (with
``image_transport: compressed`` the node reads ``<image_topic>/compressed``), ``depth_topic`` /
``camera_info_topic`` its aligned depth inputs (a RealSense: ``depth_topic:=
/camera/camera/aligned_depth_to_color/image_raw camera_info_topic:=
/camera/camera/color/camera_info``). ``respawn:=true``
restarts a node that died after ``respawn_delay`` seconds. On Ctrl-C the node gets SIGINT, then
SIGTERM after ``sigterm_timeout`` seconds and SIGKILL ``sigkill_timeout`` seconds later.

The rule for parameters and respawn lives in ``lisa_ros.launch_params`` (tested there).
"""

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from lisa_ros.launch_params import node_options


def lisa_node(context: LaunchContext) -> list[Node]:
    return [
        Node(
            package="lisa_ros",
            executable="lisa_node",
            name="lisa_node",
            namespace=LaunchConfiguration("namespace"),
            output="screen",
            emulate_tty=True,
            remappings=[
                ("image", LaunchConfiguration("image_topic")),
                ("command", LaunchConfiguration("command_topic")),
                ("depth", LaunchConfiguration("depth_topic")),
                ("camera_info", LaunchConfiguration("camera_info_topic")),
            ],
            sigterm_timeout=LaunchConfiguration("sigterm_timeout"),
            sigkill_timeout=LaunchConfiguration("sigkill_timeout"),
            **node_options(context.launch_configurations),
        )
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                default_value=PathJoinSubstitution(
                    [FindPackageShare("lisa_ros"), "config", "lisa_params.yaml"]
                ),
                description="YAML file with the node's parameters; it wins over the defaults",
            ),
            DeclareLaunchArgument(
                "model",
                default_value="",
                description="checkpoint directory or hub id; empty = the params file's model",
            ),
            DeclareLaunchArgument(
                "device",
                default_value="",
                description="torch device (cpu, cuda, cuda:1); empty = the params file's device",
            ),
            DeclareLaunchArgument(
                "depth",
                default_value="",
                description="true: 3-D target positions from aligned depth; empty = the params "
                "file's depth",
            ),
            DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
            DeclareLaunchArgument(
                "image_topic", default_value="image", description="camera topic to segment"
            ),
            DeclareLaunchArgument(
                "command_topic", default_value="command", description="std_msgs/String commands"
            ),
            DeclareLaunchArgument(
                "depth_topic",
                default_value="depth",
                description="aligned depth image (16UC1 mm or 32FC1 m), with depth:=true",
            ),
            DeclareLaunchArgument(
                "camera_info_topic",
                default_value="camera_info",
                description="camera_info of the aligned depth image, with depth:=true",
            ),
            DeclareLaunchArgument(
                "respawn",
                default_value="false",
                description="restart lisa_node when it dies (true/false)",
            ),
            DeclareLaunchArgument(
                "respawn_delay",
                default_value="2.0",
                description="seconds to wait before restarting a node that died",
            ),
            DeclareLaunchArgument(
                "sigterm_timeout",
                default_value="10",
                description="seconds after SIGINT before SIGTERM at shutdown (lets a running "
                "inference finish and the model free its memory)",
            ),
            DeclareLaunchArgument(
                "sigkill_timeout",
                default_value="5",
                description="seconds after SIGTERM before SIGKILL at shutdown",
            ),
            OpaqueFunction(function=lisa_node),
        ]
    )
