"""``lisa_node`` with a model that never finishes loading or inferring, for the stop tests.

Run as ``python slow_node.py load|infer --ros-args ...``: ``load`` blocks in ``load_model`` (as a
big checkpoint would), ``infer`` blocks in ``set_image`` of the first command. Each prints a line
when it starts blocking.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from lisa_ros.node import LisaNode, main


class _Blocking:
    def __init__(self, segmenter: Any) -> None:
        self.segmenter = segmenter

    def set_image(self, rgb: Any) -> None:
        print("slow_node: inference started", file=sys.stderr, flush=True)
        threading.Event().wait()

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        return self.segmenter.predict(*args, **kwargs)


class SlowLoad(LisaNode):
    def load_model(self, config: Any) -> Any:
        print("slow_node: loading started", file=sys.stderr, flush=True)
        threading.Event().wait()


class SlowInference(LisaNode):
    def build_segmenter(self, model: Any, config: Any) -> Any:
        return _Blocking(super().build_segmenter(model, config))


if __name__ == "__main__":
    kind, argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    raise SystemExit(main(argv, node_type={"load": SlowLoad, "infer": SlowInference}[kind]))
