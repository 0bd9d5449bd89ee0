"""Start lisa_node: ``ros2 launch lisa_ros lisa.launch.py model:=xinlai/LISA-7B-v1``.

Every parameter is in the params file (default: the package's config/lisa_params.yaml), and the
file wins: ``model`` and ``device`` given here override it, left out (empty) they do not.
``image_topic``/``command_topic`` remap the node's ``image``/``command`` inputs (with
``image_transport: compressed`` the node reads ``<image_topic>/compressed``). ``respawn:=true``
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
            DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
            DeclareLaunchArgument(
                "image_topic", default_value="image", description="camera topic to segment"
            ),
            DeclareLaunchArgument(
                "command_topic", default_value="command", description="std_msgs/String commands"
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
