"""Image pre- and post-processing, numerically identical to the original LISA.

Two views of every RGB frame go into the model:

* CLIP: what ``CLIPImageProcessor.preprocess`` of transformers 4.31 produced for
  ``openai/clip-vit-large-patch14`` (shortest edge to 224 with PIL bicubic, centre crop 224,
  ``x * (1/255)`` in float64 cast to float32, ``(x - mean) / std`` in float32, CHW). Written here
  with PIL and numpy because later transformers releases changed that processor.
* SAM: ``ResizeLongestSide(1024).apply_image`` of upstream segment-anything (PIL bilinear, long
  side to 1024, ``int(x * scale + 0.5)`` rounding), then ``(x - mean) / std`` in float32 and zero
  padding at the bottom/right to 1024 x 1024 (after normalisation, so the pad is 0, not -mean/std).

Mask logits come back from SAM's decoder at 256 x 256 in the padded 1024 frame;
:func:`postprocess_masks` maps them to the original image frame as the original
``Sam.postprocess_masks`` did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: CLIP (OpenAI) normalisation, RGB, for pixel values scaled to [0, 1].
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: SAM normalisation, RGB, for pixel values in [0, 255].
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
#: Side of SAM's square (padded) input.
SAM_IMAGE_SIZE = 1024
#: Side of CLIP's square input (ViT-L/14 at 224 px -> 16 x 16 = 256 patches).
CLIP_IMAGE_SIZE = 224

#: For images taller than wide, the bicubic column pass of :func:`clip_preprocess` produces
#: ``224 x int(224*H/W)`` pixels. Above this many (aspect ratios beyond about 1:334) it resamples
#: only the centre crop's rows instead, which keeps memory bounded but may differ from the
#: reference by one uint8 level in some pixels (PIL then computes its filter positions from the
#: box). Every ordinary image, and every image wider than tall, takes the exact path.
CLIP_FULL_RESIZE_MAX_PIXELS = 1 << 24


@dataclass
class PreparedImage:
    """Model inputs computed from one RGB frame.

    Attributes:
        clip: ``(3, 224, 224)`` float32, CLIP-normalised, CHW, RGB.
        sam: ``(3, 1024, 1024)`` float32, SAM-normalised, CHW, RGB; the resized image sits in the
            top-left ``resized_hw`` corner, the rest is 0.
        resized_hw: ``(h', w')`` size of the image inside ``sam`` (long side 1024).
        original_hw: ``(H, W)`` of the input frame; masks are returned in this frame.
    """

    clip: torch.Tensor
    sam: torch.Tensor
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]


def _check_rgb(rgb: np.ndarray, name: str = "rgb") -> np.ndarray:
    """Validate an ``(H, W, 3)`` uint8 RGB array and return it C-contiguous."""
    if not isinstance(rgb, np.ndarray):
        raise ValueError(
            f"{name}: expected a numpy array of shape (H, W, 3) and dtype uint8 (RGB), "
            f"got {type(rgb).__name__}"
        )
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected shape (H, W, 3) and dtype uint8 (RGB, 3 channels; convert "
            f"grayscale or RGBA images to RGB first), got shape {tuple(rgb.shape)} "
            f"and dtype {rgb.dtype}"
        )
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"{name}: image is empty (shape {tuple(rgb.shape)})")
    return np.ascontiguousarray(rgb)


def clip_resized_shape(height: int, width: int, size: int = CLIP_IMAGE_SIZE) -> tuple[int, int]:
    """``(h, w)`` after scaling the shortest edge to ``size`` (long side ``int(size*long/short)``).

    This is transformers 4.31's ``get_resize_output_image_size(..., default_to_square=False)``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _clip_resize_and_crop(
    rgb: np.ndarray, size: int = CLIP_IMAGE_SIZE, max_pixels: int = CLIP_FULL_RESIZE_MAX_PIXELS
) -> np.ndarray:
    """Shortest edge to ``size`` (PIL bicubic), centre crop ``size``; ``(size, size, 3)`` uint8."""
    height, width = rgb.shape[:2]
    new_h, new_w = clip_resized_shape(height, width, size)
    # The short side is exactly ``size`` and the long side >= ``size``, so the crop never pads.
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    bicubic = Image.Resampling.BICUBIC
    # Pillow resizes in two separable passes, rows first (each rounded to uint8), then columns.
    # Running the passes one at a time gives the same bytes as one ``resize`` and lets us drop
    # the columns outside the crop in between (the row pass of a wide image is only ~224*W px).
    rows = Image.fromarray(rgb).resize((new_w, height), bicubic, reducing_gap=None)
    rows = rows.crop((left, 0, left + size, height))
    if new_h * size <= max_pixels:
        return np.asarray(rows.resize((size, new_h), bicubic, reducing_gap=None))[top : top + size]
    # Extremely tall image: resample only the crop's rows.
    scale_y = height / new_h
    box = (0.0, top * scale_y, float(size), (top + size) * scale_y)
    return np.asarray(rows.resize((size, size), bicubic, box=box, reducing_gap=None))


def clip_preprocess(rgb: np.ndarray) -> torch.Tensor:
    """CLIP pixel values of one frame, bit-identical to transformers 4.31's CLIP processor.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image, any size >= 1 x 1 (small images are upscaled).
            Always read as channels-last (4.31 guessed the layout and misread images 1 or 3
            pixels high; we do not reproduce that).

    Returns:
        ``(3, 224, 224)`` float32 tensor (CHW, RGB), ``(x / 255 - CLIP_MEAN) / CLIP_STD``.
    """
    rgb = _check_rgb(rgb)
    crop = _clip_resize_and_crop(rgb)
    # Order and dtypes as 4.31: uint8 * (1/255) in float64, cast to float32, then
    # (x - mean) / std with float32 mean and std.
    scaled = (crop * (1 / 255)).astype(np.float32)
    normalised = (scaled - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(
        CLIP_STD, dtype=np.float32
    )
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def sam_resized_shape(height: int, width: int, target: int = SAM_IMAGE_SIZE) -> tuple[int, int]:
    """``(h', w')`` with the long side scaled to ``target``, rounded as ``int(x * scale + 0.5)``.

    Same as ``ResizeLongestSide.get_preprocess_shape``, except that a side is never rounded down
    to 0 (the original crashed on images more than ``2 * target`` times wider than high).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = target * 1.0 / max(height, width)
    new_h = int(height * scale + 0.5)
    new_w = int(width * scale + 0.5)
    return max(new_h, 1), max(new_w, 1)


def sam_resize(rgb: np.ndarray, target: int = SAM_IMAGE_SIZE) -> np.ndarray:
    """Resize so that the long side is ``target`` (PIL bilinear), as SAM's ``ResizeLongestSide``.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image.
        target: long side after resizing.

    Returns:
        ``(h', w', 3)`` uint8 RGB with ``(h', w') == sam_resized_shape(H, W, target)``.
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    rgb = _check_rgb(rgb)
    height, width = rgb.shape[:2]
    new_hw = sam_resized_shape(height, width, target)
    if new_hw == ResizeLongestSide.get_preprocess_shape(height, width, target):
        return ResizeLongestSide(target).apply_image(rgb)
    # A side that upstream rounds to 0: same PIL bilinear resize, to at least one pixel.
    resized = Image.fromarray(rgb).resize((new_hw[1], new_hw[0]), Image.Resampling.BILINEAR)
    return np.array(resized)


def sam_preprocess(resized: np.ndarray, image_size: int = SAM_IMAGE_SIZE) -> torch.Tensor:
    """Normalise a resized image and zero-pad it to SAM's square input.

    Args:
        resized: ``(h', w', 3)`` uint8 RGB, both sides <= ``image_size`` (see :func:`sam_resize`).
        image_size: side of the padded square.

    Returns:
        ``(3, image_size, image_size)`` float32: ``(x - SAM_PIXEL_MEAN) / SAM_PIXEL_STD`` in the
        top-left ``(h', w')`` corner, 0 elsewhere.
    """
    resized = _check_rgb(resized, "resized")
    height, width = resized.shape[:2]
    if height > image_size or width > image_size:
        raise ValueError(
            f"resized: expected both sides <= {image_size} (use sam_resize first), "
            f"got {height}x{width}"
        )
    pixels = torch.tensor(resized).permute(2, 0, 1)  # (3, h', w') uint8 (a copy)
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, dtype=torch.float32).view(-1, 1, 1)
    normalised = (pixels - mean) / std  # uint8 - float32 -> float32
    return F.pad(normalised, (0, image_size - width, 0, image_size - height))


def prepare_image(rgb: np.ndarray, sam_size: int = SAM_IMAGE_SIZE) -> PreparedImage:
    """CLIP and SAM inputs of one frame.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image (e.g. ``cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)``).
        sam_size: side of SAM's square input (1024 for every published SAM; the model's
            ``sam_image_size``).

    Raises:
        ValueError: when ``rgb`` is not a non-empty ``(H, W, 3)`` uint8 array.
    """
    rgb = _check_rgb(rgb)
    resized = sam_resize(rgb, sam_size)
    return PreparedImage(
        clip=clip_preprocess(rgb),
        sam=sam_preprocess(resized, sam_size),
        resized_hw=(int(resized.shape[0]), int(resized.shape[1])),
        original_hw=(int(rgb.shape[0]), int(rgb.shape[1])),
    )


def postprocess_masks(
    low_res: torch.Tensor,
    resized_hw: tuple[int, int],
    original_hw: tuple[int, int],
    image_size: int = SAM_IMAGE_SIZE,
) -> torch.Tensor:
    """Map SAM decoder logits to the original image frame (as the original ``postprocess_masks``).

    Casts to float32, upsamples bilinearly (``align_corners=False``) to
    ``image_size x image_size`` (the padded SAM frame), crops the resized image
    ``[:h', :w']``, and resizes bilinearly to ``(H, W)``.

    Args:
        low_res: ``(N, 1, h, w)`` or ``(N, h, w)`` mask logits (``h = w = 256`` from SAM), any
            float dtype, any device.
        resized_hw: ``(h', w')`` of the resized image inside the padded SAM input.
        original_hw: ``(H, W)`` of the original frame.
        image_size: side of SAM's padded input.

    Returns:
        ``(N, H, W)`` float32 logits in the original frame, on ``low_res``'s device; a mask is
        ``logits > 0``.
    """
    if low_res.ndim == 3:
        low_res = low_res.unsqueeze(1)
    if low_res.ndim != 4 or low_res.shape[1] != 1:
        raise ValueError(
            f"low_res: expected shape (N, 1, h, w) or (N, h, w), got {tuple(low_res.shape)}"
        )
    res_h, res_w = (int(v) for v in resized_hw)
    orig_h, orig_w = (int(v) for v in original_hw)
    if not (0 < res_h <= image_size and 0 < res_w <= image_size):
        raise ValueError(f"resized_hw: expected sides in 1..{image_size}, got {tuple(resized_hw)}")
    if orig_h <= 0 or orig_w <= 0:
        raise ValueError(f"original_hw: expected positive sides, got {tuple(original_hw)}")
    masks = F.interpolate(
        low_res.float(), (image_size, image_size), mode="bilinear", align_corners=False
    )
    masks = masks[..., :res_h, :res_w]
    masks = F.interpolate(masks, (orig_h, orig_w), mode="bilinear", align_corners=False)
    return masks[:, 0]
