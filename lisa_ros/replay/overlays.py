"""Pictures of a replay for a person to look at (``--overlays DIR``): one overlay PNG per result
as it is published, and a contact sheet of them at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lisa_ros.pipeline import Success

#: Most overlays shown on the contact sheet (evenly picked when there are more results).
CONTACT_SHEET_MAX = 48
#: Width (pixels) to which larger overlays are shrunk on the contact sheet.
THUMBNAIL_WIDTH = 320


def overlay_png_name(index: int, seconds: float) -> str:
    """``<index>_<seconds>s.png``: the ``index``-th result (from 1), ``seconds`` after the bag
    start."""
    return f"{index:04d}_{seconds:.3f}s.png"


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 RGB picture as PNG; OSError when it cannot be written."""
    import cv2

    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def write_contact_sheet(directory: Path, results: list[tuple[int, float, Success]]) -> None:
    """``contact_sheet.png`` in ``directory`` of ``(index, seconds after the bag start, result)``
    (at most ``CONTACT_SHEET_MAX`` of them, evenly picked); nothing when there are no results."""
    import cv2

    from lisa_model.visualize import contact_sheet

    if not results:
        return
    thumbs, labels = [], []
    keep = set(np.linspace(0, len(results) - 1, min(len(results), CONTACT_SHEET_MAX)).round())
    for i, (index, seconds, success) in enumerate(results):
        if i not in keep:
            continue
        picture = success.overlay
        if picture.shape[1] > THUMBNAIL_WIDTH:
            f = THUMBNAIL_WIDTH / picture.shape[1]
            size = (THUMBNAIL_WIDTH, max(1, round(picture.shape[0] * f)))
            picture = cv2.resize(picture, size, interpolation=cv2.INTER_AREA)
        thumbs.append(picture)
        labels.append(f"#{index} {seconds:.2f}s {success.command.text}")
    sheet = contact_sheet(thumbs, columns=4, labels=labels)
    cv2.imwrite(str(directory / "contact_sheet.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
