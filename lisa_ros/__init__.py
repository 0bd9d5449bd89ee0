"""ROS 2 face of LISA: message conversion, the ROS-free pipeline core, the node and bag replay.

Only ``lisa_ros.node`` (and what it imports from rclpy) needs a ROS installation; the pipeline
core and the conversions work on plain numpy arrays and message-like objects.
"""
