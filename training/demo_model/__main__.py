"""``python -m training.demo_model``: the demo model's command line (:mod:`.cli`)."""

import sys

from training.demo_model.cli import main

sys.exit(main())
