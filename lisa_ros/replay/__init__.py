"""``lisa-replay``: run LISA over a recorded ROS 2 bag and write what the robot would publish.

Example::

    lisa-replay recording/ --out recording_lisa/ --model xinlai/LISA-7B-v1 --device cuda \\
        --overlays recording_overlays/

Input: a rosbag2 directory (``metadata.yaml`` plus ``.db3`` or ``.mcap`` files) or a bare
``.db3``/``.mcap`` file, read with ``rosbags``. Messages are deserialised with the definitions
embedded in the bag when it has them (MCAP schemas; sqlite3 bags recorded from Iron on), else with
the ROS 2 Humble definitions. Frames come from one ``sensor_msgs/Image`` or
``sensor_msgs/CompressedImage`` topic (``--image-topic``; found automatically when the bag has one
image topic, or one raw topic ``T`` plus its image_transport variants ``T/<transport>``, then ``T``
is used). Commands come from a
``std_msgs/String`` topic (``--command-topic``; found automatically when one String topic is named
``command`` or ends in ``/command``) and/or a ``--commands FILE``.

Commands file: one command per line, ``<seconds> <text>``; blank lines and lines starting with
``#`` are skipped. ``seconds`` is relative to the bag's first message, unless it is at least
``ABSOLUTE_TIME_THRESHOLD`` (1e8 s, i.e. a Unix time after 1973), then it is an absolute bag time
in seconds since the epoch. Example::

    # seconds  command
    0.5   find the red ball
    2.25  what could I roll across the table?

Time: the replay drives the same :class:`~lisa_ros.pipeline.Pipeline` as the live node, in bag
time. Messages are fed in bag (receive) time order, ``now`` = the message's bag time, and before
each message every job that has become due (a command's wait timing out, a continuous-mode rerun)
is run at the time it became due, so pairing, ``max_image_age``, ``image_wait_timeout`` and
continuous mode behave as on the robot. By default inference takes no bag time: the replay answers
"what would the robot publish for these inputs" as if the model were instantaneous, so every
command is paired with the frame it would get on an infinitely fast machine, and results are the
same on any hardware. With ``--realtime`` bag time advances by the measured inference time of
each job: frames that arrive while the model runs replace each other in the one-frame buffer and
results are stamped when they would be published, as on a robot with this machine's speed.

Output: a new bag (``--storage``, default the input's) with, per successful command,
``<prefix>/mask`` (``sensor_msgs/Image`` mono8, 255 = target, header = the source frame's header),
``<prefix>/explanation`` (``std_msgs/String``), ``<prefix>/overlay`` (``sensor_msgs/Image``
rgb8; not with ``--no-overlay``) and with ``--compressed-mask`` ``<prefix>/mask/compressed``
(lossless PNG), written at the bag time the node would publish them. Like the node, the replay
also answers on ``explanation`` for failed commands (``"failed: <reason> (command '...')"``),
rejected or dropped commands, the stop command, and bad frames (once per kind of problem; the
node repeats it every few seconds).
``--copy-input`` also copies every input message, byte for byte, with its topic, type, definition
and QoS. ``--overlays DIR`` writes one PNG per result (``<index>_<seconds>s.png``, seconds after
the bag start) and a ``contact_sheet.png``.

The output bag is written to ``<out>.partial/`` and moved to ``<out>`` only when complete; an
existing ``<out>`` is never touched. If the run fails or is interrupted, ``<out>.partial/`` stays
with a ``PARTIAL.txt`` saying why, and the exit status is non-zero.

Modules, one stage each: ``commands`` (commands files, time mapping), ``input_bag`` (reading,
topic selection, embedded definitions), ``driver`` (the pipeline in bag time), ``output`` (output
topics and the output bag, ``<out>.partial``), ``overlays`` (PNGs, contact sheet), ``run``
(``replay_to_bag``, ``replay_outcomes``), ``cli`` (the command line); ``bags`` holds what reading
and writing bags share, ``errors`` the ``ReplayError``.
"""

from lisa_ros.replay.bags import IMAGE_TYPE, IMAGE_TYPES, STORAGES, STRING_TYPE
from lisa_ros.replay.cli import build_parser, main
from lisa_ros.replay.commands import (
    ABSOLUTE_TIME_THRESHOLD,
    TimedCommand,
    load_commands_file,
    parse_commands_file,
)
from lisa_ros.replay.driver import (
    CommandEvent,
    FrameSkipped,
    InputMessage,
    Published,
    ReplayDriver,
    ReplayItem,
    iter_replay,
)
from lisa_ros.replay.errors import ReplayError
from lisa_ros.replay.input_bag import InputBag, TopicSelection
from lisa_ros.replay.output import OUTPUT_TOPICS, OutputTopic, check_output_paths, output_topics
from lisa_ros.replay.run import ReplayOptions, ReplaySummary, replay_outcomes, replay_to_bag

__all__ = [
    "ABSOLUTE_TIME_THRESHOLD",
    "IMAGE_TYPE",
    "IMAGE_TYPES",
    "OUTPUT_TOPICS",
    "STORAGES",
    "STRING_TYPE",
    "CommandEvent",
    "FrameSkipped",
    "InputBag",
    "InputMessage",
    "OutputTopic",
    "Published",
    "ReplayDriver",
    "ReplayError",
    "ReplayItem",
    "ReplayOptions",
    "ReplaySummary",
    "TimedCommand",
    "TopicSelection",
    "build_parser",
    "check_output_paths",
    "iter_replay",
    "load_commands_file",
    "main",
    "output_topics",
    "parse_commands_file",
    "replay_outcomes",
    "replay_to_bag",
]
