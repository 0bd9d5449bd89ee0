"""``lisa-segment``: answer one query about one image and write the mask and an overlay.

Example::

    lisa-segment --model xinlai/LISA-7B-v1 --image kitchen.jpg \\
        --query "the thing I could cut the bread with" --explain --out out/ --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lisa_model.cli.common import (
    UserError,
    add_encoder_dtype_argument,
    add_mode_argument,
    add_model_arguments,
    load_model_from_args,
    read_rgb_image,
    run_cli,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lisa-segment",
        description="Segment what a plain-language query describes in one image with LISA.",
    )
    add_model_arguments(parser)
    add_encoder_dtype_argument(parser)
    parser.add_argument("--image", required=True, help="input image (any format OpenCV reads)")
    parser.add_argument("--query", required=True, help="what to segment, in plain language")
    parser.add_argument("--explain", action="store_true", help="ask for an explanation too")
    add_mode_argument(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="decoding budget")
    parser.add_argument(
        "--raw-prompt",
        action="store_true",
        help="use the query verbatim as the user turn (no 'Please output segmentation mask.')",
    )
    parser.add_argument("--out", type=Path, default=Path("lisa_out"), help="output directory")
    return parser


def run(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from lisa_model.predictor import LisaPredictor, QueryTooLongError
    from lisa_model.visualize import overlay

    if not args.query.strip():
        raise UserError("--query is empty: expected a description of what to segment")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.explain and args.mode == "segment":
        raise UserError("--explain needs --mode generate (the fast path produces no text)")
    rgb = read_rgb_image(args.image)
    model = load_model_from_args(args)
    predictor = LisaPredictor(model)
    try:  # before any image work: the query must fit the model's positions
        predictor.check_query(
            args.query,
            explain=args.explain,
            mode=args.mode,
            max_new_tokens=args.max_new_tokens,
            raw_prompt=args.raw_prompt,
        )
    except QueryTooLongError as exc:
        raise UserError(f"--query: {exc}") from None
    start = time.perf_counter()
    predictor.set_image(rgb)
    result = predictor.predict(
        args.query,
        explain=args.explain,
        max_new_tokens=args.max_new_tokens,
        mode=args.mode,
        raw_prompt=args.raw_prompt,
    )
    elapsed = time.perf_counter() - start

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    union = (result.union_mask.astype(np.uint8)) * 255
    cv2.imwrite(str(out / "mask.png"), union)
    for i, mask in enumerate(result.masks if len(result.masks) > 1 else []):
        cv2.imwrite(str(out / f"mask_{i}.png"), mask.astype(np.uint8) * 255)
    overlay_rgb = overlay(rgb, result.masks)
    cv2.imwrite(str(out / "overlay.png"), cv2.cvtColor(overlay_rgb, cv2.COLOR_RGB2BGR))

    answer = result.text if result.text else "[SEG] (segment-only path)"
    print(f"answer: {answer}")
    status = f"{result.masks.shape[0]} mask(s)" if result.found else "nothing found"
    print(f"{status}; {elapsed:.2f} s; wrote {out / 'mask.png'} and {out / 'overlay.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
