"""``python -m training.shapes``: the same as ``lisa-make-shapes`` (:func:`.writer.main`)."""

import sys

from training.shapes.writer import main

sys.exit(main())
