"""``python -m lisa_ros.replay``: the same as ``lisa-replay``."""

import sys

from lisa_ros.replay import main

sys.exit(main())
