"""Pictures of results: union masks, tinted overlays, text banners and contact sheets.

Everything here works on numpy arrays in the image frame of the camera (``(H, W, 3)`` uint8 RGB,
masks ``(N, H, W)`` or ``(H, W)`` bool/uint8) and returns new arrays; inputs are never modified.
Only numpy and OpenCV are used, so the node, the bag replay and the evaluation tools draw the same
pictures.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

#: Default mask colours (RGB), cycled when there are more masks than colours.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 64, 64),
    (64, 200, 255),
    (255, 200, 0),
    (120, 255, 80),
    (220, 80, 255),
    (255, 140, 40),
    (0, 255, 200),
    (255, 255, 255),
)

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _check_rgb(rgb: np.ndarray, name: str = "rgb") -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{name} must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")


def _as_mask_stack(masks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``(N, H, W)`` or ``(H, W)`` bool/integer masks -> ``(N, H, W)`` bool, checked against hw."""
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(hw):
        raise ValueError(
            f"masks must be (N, {hw[0]}, {hw[1]}) to match the image, got {masks.shape}"
        )
    return masks.astype(bool, copy=False)


def union_mask_u8(masks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Union of all masks as a ROS-style mono8 mask.

    Args:
        masks: ``(N, H, W)`` bool (or 0/non-zero integers) in the image frame; ``N`` may be 0.
        hw: ``(H, W)`` of the image; the output size also when ``N == 0``.

    Returns:
        ``(H, W)`` uint8, 255 where any mask is set, 0 elsewhere.
    """
    stack = _as_mask_stack(masks, hw)
    out = np.zeros(tuple(hw), dtype=np.uint8)
    if stack.shape[0]:
        out[stack.any(axis=0)] = 255
    return out


def overlay(
    rgb: np.ndarray,
    masks: np.ndarray,
    alpha: float = 0.5,
    colors: Sequence[tuple[int, int, int]] | None = None,
    outline_px: int = 2,
) -> np.ndarray:
    """Tint each mask with its own colour and outline it; pixels outside all masks are unchanged.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image.
        masks: ``(N, H, W)`` or ``(H, W)`` bool masks in the same frame; ``N`` may be 0.
        alpha: tint strength in ``[0, 1]``; a masked pixel becomes
            ``round((1 - alpha) * pixel + alpha * colour)``.
        colors: RGB colours, mask ``i`` gets ``colors[i % len(colors)]``; default ``PALETTE``.
        outline_px: width of the outline drawn along the inside of each mask's contours (found
            with ``cv2.findContours``) in the solid mask colour; 0 for none.

    Returns:
        ``(H, W, 3)`` uint8 RGB, a new array.
    """
    _check_rgb(rgb)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if outline_px < 0:
        raise ValueError(f"outline_px must be >= 0, got {outline_px}")
    palette = tuple(colors) if colors is not None else PALETTE
    if not palette:
        raise ValueError("colors must not be empty")
    stack = _as_mask_stack(masks, rgb.shape[:2])
    out = rgb.copy()
    for i, mask in enumerate(stack):
        if not mask.any():
            continue
        color = np.asarray(palette[i % len(palette)], dtype=np.float32)
        tinted = (1.0 - alpha) * out[mask].astype(np.float32) + alpha * color
        out[mask] = np.clip(np.rint(tinted), 0, 255).astype(np.uint8)
        if outline_px:
            mask_u8 = mask.astype(np.uint8)
            contours, _ = cv2.findContours(mask_u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            edge = np.zeros_like(mask_u8)
            # OpenCV's thick contour reaches k - 1 pixels to both sides of the boundary pixels;
            # cut back to the mask it is a band k pixels wide on the inside, so the picture
            # outside the mask stays untouched.
            cv2.drawContours(edge, contours, -1, 1, thickness=outline_px)
            out[(edge > 0) & mask] = color.astype(np.uint8)
    return out


def _ascii(text: str) -> str:
    # OpenCV's Hershey fonts draw ASCII only; anything else would come out as garbage. Line
    # breaks stay: the wrapping below splits on them.
    return "".join(ch if 32 <= ord(ch) < 127 or ch == "\n" else "?" for ch in text)


def _wrap(text: str, max_width: int, scale: float, thickness: int) -> list[str]:
    """Split text into lines at most max_width pixels wide; words longer than a line are cut."""

    def fits(s: str) -> bool:
        return cv2.getTextSize(s, _FONT, scale, thickness)[0][0] <= max_width

    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            if fits(f"{line} {word}" if line else word):
                line = f"{line} {word}" if line else word
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and not fits(word):
                cut = next((n for n in range(len(word) - 1, 1, -1) if fits(word[:n])), 1)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def annotate(
    rgb: np.ndarray,
    text: str,
    font_scale: float | None = None,
    max_lines: int | None = None,
) -> np.ndarray:
    """Draw text in a dark banner across the top of the image, wrapped to the image width.

    The image keeps its size (the banner covers the top rows). Lines that do not fit in the
    image (or beyond ``max_lines``) are dropped and the last shown line ends with ``...``.
    OpenCV fonts are ASCII-only: other characters are drawn as ``?``.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image.
        text: the text; ``\\n`` starts a new line.
        font_scale: OpenCV font scale; default grows with the image width.
        max_lines: most lines to draw; default as many as fit in half the image height.

    Returns:
        ``(H, W, 3)`` uint8 RGB, a new array.
    """
    _check_rgb(rgb)
    out = rgb.copy()
    text = _ascii(text).strip()
    if not text:
        return out
    h, w = rgb.shape[:2]
    scale = font_scale if font_scale is not None else max(0.35, w / 1000.0)
    thickness = 1 if scale < 0.8 else 2
    margin = max(2, int(round(6 * scale)))
    (_, text_h), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    line_h = text_h + baseline + margin
    lines = _wrap(text, max(1, w - 2 * margin), scale, thickness)
    fit = max(1, (h // 2 - margin) // line_h)
    limit = min(fit, max_lines) if max_lines is not None else fit
    if len(lines) > limit:
        lines = lines[:limit]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    banner_h = min(h, len(lines) * line_h + margin)
    # Darken the banner area to 35 % so white text reads on any picture.
    out[:banner_h] = (out[:banner_h].astype(np.uint16) * 35 // 100).astype(np.uint8)
    for i, line in enumerate(lines):
        y = margin + text_h + i * line_h
        cv2.putText(out, line, (margin, y), _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def _to_rgb(image: np.ndarray, index: int) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images[{index}] must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"images[{index}] must be (H, W) or (H, W, 3), got {image.shape}")


def contact_sheet(
    images: Sequence[np.ndarray],
    columns: int = 4,
    labels: Sequence[str] | None = None,
    cell_hw: tuple[int, int] | None = None,
    pad: int = 4,
    background: tuple[int, int, int] = (32, 32, 32),
) -> np.ndarray:
    """Lay images out on a grid, each scaled to fit its cell (aspect kept), with optional labels.

    Args:
        images: ``(H, W, 3)`` RGB or ``(H, W)`` grey uint8 images, possibly of different sizes.
        columns: cells per row (fewer when there are fewer images).
        labels: one caption per image, drawn in a strip under its cell.
        cell_hw: ``(height, width)`` of a cell; default the largest image height and width.
        pad: pixels between and around cells.
        background: RGB fill colour.

    Returns:
        ``(rows * (cell_h + label_h + pad) + pad, cols * (cell_w + pad) + pad, 3)`` uint8 RGB.
    """
    if not images:
        raise ValueError("images must not be empty")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    rgbs = [_to_rgb(image, i) for i, image in enumerate(images)]
    if cell_hw is None:
        cell_hw = (max(im.shape[0] for im in rgbs), max(im.shape[1] for im in rgbs))
    cell_h, cell_w = cell_hw
    if cell_h < 1 or cell_w < 1:
        raise ValueError(f"cell_hw must be positive, got {cell_hw}")
    scale = max(0.35, cell_w / 700.0)
    (_, text_h), baseline = cv2.getTextSize("Ag", _FONT, scale, 1)
    label_h = text_h + baseline + 4 if labels is not None else 0
    cols = min(columns, len(rgbs))
    rows = -(-len(rgbs) // cols)
    sheet = np.empty(
        (rows * (cell_h + label_h + pad) + pad, cols * (cell_w + pad) + pad, 3), dtype=np.uint8
    )
    sheet[:] = np.asarray(background, dtype=np.uint8)
    for i, im in enumerate(rgbs):
        top = pad + (i // cols) * (cell_h + label_h + pad)
        left = pad + (i % cols) * (cell_w + pad)
        f = min(cell_h / im.shape[0], cell_w / im.shape[1])
        new_h, new_w = max(1, round(im.shape[0] * f)), max(1, round(im.shape[1] * f))
        if (new_h, new_w) != im.shape[:2]:
            interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
            im = cv2.resize(im, (new_w, new_h), interpolation=interp)
        y, x = top + (cell_h - new_h) // 2, left + (cell_w - new_w) // 2
        sheet[y : y + new_h, x : x + new_w] = im
        if labels is not None:
            caption = _ascii(labels[i])
            while caption and cv2.getTextSize(caption, _FONT, scale, 1)[0][0] > cell_w:
                caption = caption[:-1]
            org = (left, top + cell_h + text_h + 2)
            cv2.putText(sheet, caption, org, _FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return sheet
