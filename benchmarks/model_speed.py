"""Speed of LISA inference paths, side by side in one run, on models built in code.

For each model size (random weights, a sentencepiece tokenizer trained in-process):

- per-stage times: preprocessing, CLIP (as the package runs it and as the original did), SAM image
  encoder, LLM prefill, per-token decode, one step of the original's uncached decoding, mask
  decoding (1 and 3 masks), post-processing, and SAM's mask-token heads (all 4 vs only token 0);
- per-query latency of
  (a) ``original``: the original's decoding without a KV cache (``baseline_original.py``),
  (a') ``original 1-fwd``: the original's ONE teacher-forced forward of the prompt and the answer
  ``"[SEG]."`` (``baseline_original.original_one_forward``), the baseline of the fast path; it
  has no per-frame reuse, so it costs the same on a new frame and on a frame already set,
  (b) ``kv-cache``: ``LisaPredictor`` generation on a fresh frame (``set_image`` + ``predict``),
  (c) ``fast``: the segment-only path on a fresh frame,
  (d) ``kv-cache 2nd+`` / ``fast 2nd+``: the 2nd..kth query on a frame already set;
  every generation is forced to ``--new-tokens`` ids (EOS can never win, see
  ``bench_common.build_bench_model``) and the generated lengths are reported; every run checks
  ``kv-cache`` against ``original`` (same ids, mask logits) and ``fast`` against
  ``original 1-fwd`` (mask logits);
- peak memory per path (RSS on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU) against the
  weights plus the activations the script accounts for (``bench_common.activation_estimate``);
- the ratios the speed targets name.

Paths are interleaved within each repeat so that a busy machine slows all of them alike.

    python benchmarks/model_speed.py --sizes tiny,small,medium --json speed.json
    python benchmarks/model_speed.py --quick     # tiny only, well under a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baseline_original import (
    clip_features_as_original,
    original_inference,
    original_one_forward,
)
from benchmarks.bench_common import (
    QUERIES,
    Activations,
    BenchSize,
    Clock,
    PeakMemory,
    Timing,
    activation_estimate,
    build_bench_model,
    cpu_name,
    load_average,
    make_tokenizer,
    markdown_table,
    median,
    mib,
    parameter_total,
    percentile,
    plant_seg_first,
    random_frames,
    rss_bytes,
    time_call,
    trim_heap,
    weight_bytes,
)
from lisa_model.builders import ModelSpec
from lisa_model.modeling import dense_positional_encoding
from lisa_model.options import DTYPE_NAMES, parse_dtype
from lisa_model.predictor import LisaPredictor
from lisa_model.processing import postprocess_masks, prepare_image
from lisa_model.prompts import SEGMENT_ONLY_ANSWER, build_chat_prompt, format_query
from lisa_model.sam import SamGeometry

SIZES: dict[str, BenchSize] = {
    "tiny": BenchSize("tiny", ModelSpec(), 800, "the reference fixture's geometry"),
    "small": BenchSize(
        "small",
        ModelSpec(
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            intermediate_size=1376,
            clip_hidden=256,
            clip_layers=6,
            clip_heads=4,
            clip_intermediate=1024,
            sam=SamGeometry(embed_dim=192, depth=4, num_heads=3, global_attn_indexes=(1, 3)),
        ),  # fmt: skip
        32000,
        "LLM 8x512",
    ),
    "medium": BenchSize(
        "medium",
        ModelSpec(
            hidden_size=1024,
            num_layers=12,
            num_heads=16,
            intermediate_size=2816,
            clip_hidden=384,
            clip_layers=12,
            clip_heads=6,
            clip_intermediate=1536,
            sam=SamGeometry(embed_dim=384, depth=6, num_heads=6, global_attn_indexes=(2, 5)),
        ),  # fmt: skip
        32000,
        "LLM 12x1024; FLOPs SAM : LLM prefill : CLIP = 2 : 1 : 0.1 (LISA-7B 1.3 : 1 : 0.04)",
    ),
}

TARGETS = {
    "kv_vs_original": 4.0,
    "fast_vs_original": 10.0,
    "fast_vs_original_1fwd": 1.5,
    "second_vs_first": 3.0,
    "memory_factor": 1.2,
}

PATHS = ("original", "kv-cache", "original 1-fwd", "fast", "kv-cache 2nd+", "fast 2nd+")


@dataclass
class PathResult:
    """Per-query measurements of one path (seconds, bytes)."""

    latencies: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    masks: list[int] = field(default_factory=list)
    peak_bytes: int = 0
    activations: Activations | None = None
    work: dict[str, int] = field(default_factory=dict)


@dataclass
class SizeResult:
    name: str
    note: str
    params: dict[str, int]
    weights_bytes: int
    runtime_bytes: int
    prompt_tokens: int
    stages: dict[str, Timing]
    paths: dict[str, PathResult]
    same_ids_as_original: bool
    max_mask_diff: float
    max_mask_diff_1fwd: float
    ratios: dict[str, float]
    cpu_ratios: dict[str, float]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small,medium", help=f"from {sorted(SIZES)}")
    parser.add_argument("--repeats", type=int, default=3, help="queries per path")
    parser.add_argument(
        "--original-repeats", type=int, default=None,
        help="queries for the slow original path (default: repeats, at most 2 for medium)",
    )  # fmt: skip
    parser.add_argument("--queries-per-frame", type=int, default=3, help="k for the 2nd..kth")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated ids per answer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    parser.add_argument("--frame", default="480x640", help="frame size HxW")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    parser.add_argument(
        "--compile", action="store_true",
        help="also measure LisaPredictor(compile=True) (minutes of compiling on a CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="CI smoke run: tiny only, 2 repeats, 2 queries per frame (< 1 min)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.queries_per_frame = "tiny", 2, 2
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        print(f"unknown sizes {unknown}; expected some of {sorted(SIZES)}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.queries_per_frame < 2 or args.new_tokens < 1:
        print("--repeats >= 1, --queries-per-frame >= 2, --new-tokens >= 1", file=sys.stderr)
        return 2
    try:
        hw = tuple(int(v) for v in args.frame.lower().split("x"))
        assert len(hw) == 2 and min(hw) > 0
    except (ValueError, AssertionError):
        print(f"--frame {args.frame!r}: expected HxW, e.g. 480x640", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)

    print(f"# model_speed: {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"- machine: {platform.machine()}, {cpu_name()}, load average {load_average()}")
    if device.type == "cuda":
        print(f"- device: {torch.cuda.get_device_name(device)}")
    print(f"- torch {torch.__version__}, dtype {args.dtype}, device {device}, frame {args.frame}")
    print(f"- {args.new_tokens} new tokens per answer, repeats {args.repeats}\n")

    warm_up_runtime(device, dtype, hw)
    results = []
    for name in names:
        result = bench_size(SIZES[name], args, device, dtype, hw)
        results.append(result)
        print_size(result, args)
        gc.collect()
    print_summary(results)
    print(f"\nload average at the end: {load_average()}")
    if args.json:
        payload = {
            "cpu": cpu_name(),
            "device": str(device),
            "dtype": args.dtype,
            "new_tokens": args.new_tokens,
            "targets": TARGETS,
            "sizes": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


def warm_up_runtime(device: torch.device, dtype: torch.dtype, hw: tuple[int, int]) -> None:
    """Run every path once on a throwaway tiny model, so that libraries, kernels and thread
    pools loaded on first use count as runtime, not as a model's memory."""
    size = SIZES["tiny"]
    model = build_bench_model(size, make_tokenizer(size.vocab_size), device=device, dtype=dtype)
    predictor = LisaPredictor(model)
    frame = random_frames(1, hw)[0]
    ids = predictor.prompt_ids(format_query(QUERIES[0], explain=True))
    original_inference(model, frame, ids, 2)
    original_one_forward(model, frame, one_forward_ids(predictor, QUERIES[0]))
    predictor.set_image(frame)
    predictor.predict(QUERIES[0], explain=True, max_new_tokens=2)
    predictor.predict(QUERIES[0], mode="segment")
    del predictor, model
    trim_heap()


def one_forward_ids(predictor: LisaPredictor, query: str) -> list[int]:
    """Ids of the conversation the fast path answers teacher-forced: ``query``'s prompt (as
    ``predict(query, mode="segment")`` builds it) with the answer ``"[SEG]."`` and ``</s>``."""
    model = predictor.model
    text = build_chat_prompt(
        format_query(query),
        predictor.template,
        answer=SEGMENT_ONLY_ANSWER,
        use_im_start_end=model.config.use_im_start_end,
    )
    ids = model.tokenizer.tokenizer_image_token(text)
    prompt = predictor.prompt_ids(format_query(query))
    if ids[: len(prompt)] != prompt or ids[len(prompt)] != model.seg_token_id:
        raise RuntimeError(
            "the teacher-forced conversation does not extend the fast path's prompt"
        )
    return ids


# --------------------------------------------------------------------------- one size
def bench_size(
    size: BenchSize,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    hw: tuple[int, int],
) -> SizeResult:
    print(f"## {size.name}: building ({size.note})", flush=True)
    tokenizer = make_tokenizer(size.vocab_size, seed=args.seed)
    trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    runtime = 0 if device.type == "cuda" else rss_bytes()
    model = build_bench_model(size, tokenizer, device=device, dtype=dtype, seed=args.seed)
    weights = weight_bytes(model)
    params = {
        "llm": parameter_total(model.llm),
        "clip": parameter_total(model.vision_tower),
        "sam": parameter_total(model.sam),
        "projectors": parameter_total(model.mm_projector) + parameter_total(model.seg_projector),
    }
    clock = Clock(device)
    memory = PeakMemory(device, runtime)
    predictor = LisaPredictor(model)
    frames = random_frames(args.repeats + 1, hw, seed=args.seed)
    prompt_ids = predictor.prompt_ids(format_query(QUERIES[0], explain=True))
    prompt_tokens = len(prompt_ids) + model.num_image_tokens - 1
    plant_seg_first(model, frames[-1], prompt_ids)

    stages = stage_times(model, predictor, frames[-1], prompt_ids, args, clock)
    original_repeats = args.original_repeats
    if original_repeats is None:
        original_repeats = min(args.repeats, 2) if size.name == "medium" else args.repeats
    paths = {p: PathResult() for p in PATHS}
    same_ids, mask_diff, mask_diff_1fwd = True, 0.0, 0.0
    one_fwd_ids = one_forward_ids(predictor, QUERIES[0])
    k = args.queries_per_frame

    counter = WorkCounter(model)

    def run(path: str, fn):  # one query of one path: time, peak memory, work done
        trim_heap()
        memory.reset()
        counter.reset()
        c0, t0 = time.process_time(), clock()
        out = fn()
        elapsed = clock() - t0
        res = paths[path]
        res.latencies.append(elapsed)
        res.cpu_times.append(time.process_time() - c0)
        res.peak_bytes = max(res.peak_bytes, memory.peak())
        res.work = dict(counter.counts)
        return out

    # Warm-up (allocator, thread pools, lazy imports): every path once, the original short.
    original_inference(model, frames[0], prompt_ids, 2, clock)
    original_one_forward(model, frames[0], one_fwd_ids, clock)
    predictor.set_image(frames[0])
    predictor.predict(QUERIES[0], explain=True, max_new_tokens=args.new_tokens)
    predictor.predict(QUERIES[1], mode="segment")

    for rep in range(args.repeats):
        frame = frames[rep]
        original = None
        if rep < original_repeats:
            original = run(
                "original",
                lambda f=frame: original_inference(model, f, prompt_ids, args.new_tokens, clock),
            )
            paths["original"].new_tokens.append(len(original.token_ids))
            paths["original"].masks.append(original.logits.shape[0])

        def first_generate(f=frame):
            predictor.set_image(f)
            return predictor.predict(QUERIES[0], explain=True, max_new_tokens=args.new_tokens)

        answer = run("kv-cache", first_generate)
        paths["kv-cache"].new_tokens.append(len(answer.token_ids))
        paths["kv-cache"].masks.append(answer.masks.shape[0])
        if original is not None:
            same_ids &= original.token_ids == answer.token_ids
            if original.logits.shape == answer.logits.shape and answer.logits.size:
                mask_diff = max(mask_diff, float(np.abs(original.logits - answer.logits).max()))
            elif original.logits.shape != answer.logits.shape:
                same_ids = False

        def first_fast(f=frame):
            predictor.set_image(f)
            return predictor.predict(QUERIES[0], mode="segment")

        one_fwd = run(
            "original 1-fwd", lambda f=frame: original_one_forward(model, f, one_fwd_ids, clock)
        )
        paths["original 1-fwd"].masks.append(one_fwd.logits.shape[0])
        fast = run("fast", first_fast)
        paths["fast"].masks.append(fast.masks.shape[0])
        if one_fwd.logits.shape != fast.logits.shape:
            mask_diff_1fwd = float("inf")
        elif fast.logits.size:
            diff = float(np.abs(one_fwd.logits - fast.logits).max())
            mask_diff_1fwd = max(mask_diff_1fwd, diff)
        for j in range(1, k):
            query = QUERIES[j % len(QUERIES)]
            later = run(
                "kv-cache 2nd+",
                lambda q=query: predictor.predict(q, explain=True, max_new_tokens=args.new_tokens),
            )
            paths["kv-cache 2nd+"].new_tokens.append(len(later.token_ids))
            paths["kv-cache 2nd+"].masks.append(later.masks.shape[0])
            later_fast = run("fast 2nd+", lambda q=query: predictor.predict(q, mode="segment"))
            paths["fast 2nd+"].masks.append(later_fast.masks.shape[0])
        print(f"  repeat {rep + 1}/{args.repeats} done", flush=True)

    if args.compile:
        compiled_paths(model, frames, args, paths, run)

    n_seg = max([1, *paths["kv-cache"].masks])
    for path, res in paths.items():
        if path == "original 1-fwd":  # one full forward over prompt + answer, nothing kept
            res.activations = activation_estimate(
                model, len(one_fwd_ids) + model.num_image_tokens - 1, 0, 1, hw, original=True
            )
            continue
        res.activations = activation_estimate(
            model,
            prompt_tokens,
            0 if path.startswith("fast") else args.new_tokens,
            1 if path.startswith("fast") else n_seg,
            hw,
            original=path == "original",
            encoders=not path.endswith("2nd+"),
        )
    ratios = speed_ratios({p: median(r.latencies) for p, r in paths.items()})
    cpu_ratios = speed_ratios({p: median(r.cpu_times) for p, r in paths.items()})
    # compiled rows excluded: inductor's kernels and buffers count as runtime there
    ratios["memory_factor"] = cpu_ratios["memory_factor"] = max(
        paths[p].peak_bytes / (weights + paths[p].activations.total)
        for p in PATHS
        if paths[p].latencies
    )
    result = SizeResult(
        name=size.name,
        note=size.note,
        params=params,
        weights_bytes=weights,
        runtime_bytes=runtime,
        prompt_tokens=prompt_tokens,
        stages=stages,
        paths=paths,
        same_ids_as_original=same_ids,
        max_mask_diff=mask_diff,
        max_mask_diff_1fwd=mask_diff_1fwd,
        ratios=ratios,
        cpu_ratios=cpu_ratios,
    )
    return result


def speed_ratios(med: dict[str, float]) -> dict[str, float]:
    """The ratios the targets name, from per-path medians."""
    return {
        "kv_vs_original": med["original"] / med["kv-cache"],
        "fast_vs_original": med["original"] / med["fast"],
        "fast_vs_original_1fwd": med["original 1-fwd"] / med["fast"],
        "fast_2nd_vs_original_1fwd": med["original 1-fwd"] / med["fast 2nd+"],
        "second_vs_first_generate": med["kv-cache"] / med["kv-cache 2nd+"],
        "second_vs_first_fast": med["fast"] / med["fast 2nd+"],
    }


def compiled_paths(model, frames, args, paths, run) -> None:
    """``LisaPredictor(compile=True)``: the same queries after compiling (first call excluded)."""
    print("  compiling (first frame pays the compile time)...", flush=True)
    predictor = LisaPredictor(model, compile=True)
    t0 = time.perf_counter()
    predictor.set_image(frames[0])
    predictor.predict(QUERIES[0], mode="segment")
    print(f"  first compiled frame took {time.perf_counter() - t0:.1f} s", flush=True)
    for name in ("compiled kv-cache", "compiled fast", "compiled fast 2nd+"):
        paths[name] = PathResult()
    for rep in range(args.repeats):

        def first_generate(f=frames[rep]):
            predictor.set_image(f)
            return predictor.predict(QUERIES[0], explain=True, max_new_tokens=args.new_tokens)

        def first_fast(f=frames[rep]):
            predictor.set_image(f)
            return predictor.predict(QUERIES[0], mode="segment")

        answer = run("compiled kv-cache", first_generate)
        paths["compiled kv-cache"].new_tokens.append(len(answer.token_ids))
        paths["compiled kv-cache"].masks.append(answer.masks.shape[0])
        fast = run("compiled fast", first_fast)
        paths["compiled fast"].masks.append(fast.masks.shape[0])
        later = run("compiled fast 2nd+", lambda: predictor.predict(QUERIES[1], mode="segment"))
        paths["compiled fast 2nd+"].masks.append(later.masks.shape[0])


class WorkCounter:
    """Counts what one query runs: CLIP and SAM encoder passes, mask-decoder calls, LLM
    forward calls and the positions they processed (forward hooks on the model's parts)."""

    def __init__(self, model) -> None:
        self.counts: dict[str, int] = {}
        self.reset()
        tower = model.vision_tower
        clip_entry = getattr(tower, "embeddings", tower)  # entered once per CLIP pass
        clip_entry.register_forward_hook(lambda *a: self._add("clip passes"))
        model.sam.image_encoder.register_forward_hook(lambda *a: self._add("sam encoder passes"))
        model.sam.mask_decoder.register_forward_hook(lambda *a: self._add("mask decoder calls"))
        model.llm.model.register_forward_pre_hook(self._llm, with_kwargs=True)

    def reset(self) -> None:
        self.counts = dict.fromkeys(
            ("clip passes", "sam encoder passes", "mask decoder calls", "llm calls"), 0
        )
        self.counts["llm positions"] = 0

    def _add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def _llm(self, _module, args, kwargs) -> None:
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        self._add("llm calls")
        self._add("llm positions", int(x.shape[1]))


# --------------------------------------------------------------------------- stages
@torch.inference_mode()
def stage_times(model, predictor, rgb, prompt_ids, args, clock) -> dict[str, Timing]:
    """Seconds per call of each stage, measured by calling the model's parts directly."""
    from transformers import DynamicCache

    reps = 1 if args.quick else max(3, args.repeats)
    stages: dict[str, Timing] = {}
    prepared = prepare_image(rgb, sam_size=model.sam_image_size)
    pixel_clip = prepared.clip.unsqueeze(0)
    pixel_sam = prepared.sam.unsqueeze(0)
    stages["preprocess"] = time_call(
        lambda: prepare_image(rgb, sam_size=model.sam_image_size), clock, reps
    )
    stages["clip"] = time_call(lambda: model.encode_clip(pixel_clip), clock, reps)
    stages["clip as original (all layers)"] = time_call(
        lambda: clip_features_as_original(model, pixel_clip), clock, reps
    )
    stages["sam image encoder"] = time_call(lambda: model.encode_sam(pixel_sam), clock, reps)

    features = model.encode_clip(pixel_clip)
    ids = torch.tensor([prompt_ids], device=model.device)
    embeds, _, _ = model.embed_inputs(ids, features)

    def prefill():
        cache = DynamicCache()
        out = model.llm.model(inputs_embeds=embeds, cache=cache, use_cache=True)
        return cache, out.last_hidden_state[:, -1]

    stages[f"llm prefill ({embeds.shape[1]} tokens)"] = time_call(prefill, clock, reps)
    cache, hidden = prefill()
    steps = Timing()
    next_id = torch.argmax(model.llm.lm_head(hidden), dim=-1, keepdim=True)
    for _ in range(args.new_tokens):
        c0, t0 = time.process_time(), clock()
        out = model.llm.model(input_ids=next_id, cache=cache, use_cache=True)
        logits = model.llm.lm_head(out.last_hidden_state[:, -1]).float()
        next_id = torch.argmax(logits, dim=-1, keepdim=True)
        steps.wall.append(clock() - t0)
        steps.cpu.append(time.process_time() - c0)
    stages["llm decode, per token (kv cache)"] = steps

    half = args.new_tokens // 2
    grown = torch.cat([ids, torch.full((1, half), 500, device=ids.device)], dim=1)

    def original_step():
        feats = clip_features_as_original(model, pixel_clip)
        emb, _, _ = model.embed_inputs(grown, feats)
        out = model.llm(inputs_embeds=emb, use_cache=False, output_hidden_states=True)
        return int(torch.argmax(out.logits[0, -1]))

    stages[f"original: one uncached step (+{half} tokens)"] = time_call(
        original_step, clock, min(reps, 2)
    )

    embedding = model.encode_sam(pixel_sam)
    prompts1 = model.project_seg_hidden(torch.randn(1, hidden.shape[-1], device=model.device))
    prompts3 = model.project_seg_hidden(torch.randn(3, hidden.shape[-1], device=model.device))
    stages["mask decoder, 1 mask"] = time_call(
        lambda: model.decode_masks(embedding, prompts1), clock, reps
    )
    stages["mask decoder, 3 masks (one call)"] = time_call(
        lambda: model.decode_masks(embedding, prompts3), clock, reps
    )
    stages["mask decoder, 3 masks (3 calls)"] = time_call(
        lambda: [model.decode_masks(embedding, prompts3[i : i + 1]) for i in range(3)],
        clock,
        reps,
    )
    low_res = model.decode_masks(embedding, prompts1)
    stages["post-processing, 1 mask"] = time_call(
        lambda: (
            postprocess_masks(
                low_res, prepared.resized_hw, prepared.original_hw, model.sam_image_size
            )
            .cpu()
            .numpy()
            > 0
        ),
        clock,
        reps,
    )
    all_heads, one_head = mask_token_heads(model, embedding, prompts1)
    stages["mask heads: all 4 tokens (upstream)"] = time_call(all_heads, clock, reps)
    stages["mask heads: token 0 only"] = time_call(one_head, clock, reps)
    return stages


def mask_token_heads(model, embedding, prompts):
    """The part of SAM's ``MaskDecoder.predict_masks`` after its transformer and upscaling:
    hypernetwork MLPs and the mask product for all 4 mask tokens (what upstream computes) and
    for token 0 only (what ``multimask_output=False`` keeps)."""
    decoder = model.sam.mask_decoder
    dtype = model.sam_dtype
    n = prompts.shape[0]
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([tokens.unsqueeze(0).expand(n, -1, -1), prompts.to(dtype)[:, None]], 1)
    dense = model.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(dtype)
    src = embedding.to(dtype).repeat_interleave(n, 0) + dense
    pos = dense_positional_encoding(model.sam.prompt_encoder, dtype).repeat_interleave(n, 0)
    hs, src = decoder.transformer(src, pos, tokens)
    b, c, h, w = embedding.shape
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    flat = upscaled.flatten(2)  # (n, 32, 256*256)

    def all_heads():
        hyper = torch.stack(
            [mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1
        )
        return (hyper @ flat)[:, :1]

    def one_head():
        return decoder.output_hypernetworks_mlps[0](hs[:, 1]).unsqueeze(1) @ flat

    return all_heads, one_head


# --------------------------------------------------------------------------- printing
def print_size(r: SizeResult, args: argparse.Namespace) -> None:
    p = r.params
    print(
        f"\n### {r.name}: LLM {p['llm'] / 1e6:.1f}M, CLIP {p['clip'] / 1e6:.1f}M, "
        f"SAM {p['sam'] / 1e6:.1f}M params; weights {mib(r.weights_bytes):.0f} MiB; "
        f"prompt {r.prompt_tokens} tokens (image expanded)\n"
    )
    rows = [
        [name, median(t.wall) * 1e3, percentile(t.wall, 95) * 1e3, median(t.cpu) * 1e3, len(t.cpu)]
        for name, t in r.stages.items()
    ]
    print(markdown_table(["stage", "ms (median)", "p95", "cpu ms (median)", "n"], rows))
    print()
    base = median(r.paths["original"].latencies)
    base_cpu = median(r.paths["original"].cpu_times)
    rows = []
    for path, res in r.paths.items():
        if not res.latencies:
            continue
        med = median(res.latencies)
        cpu = median(res.cpu_times)
        tokens = sorted(set(res.new_tokens)) if res.new_tokens else "-"
        rows.append(
            [
                r.name,
                path,
                med * 1e3,
                percentile(res.latencies, 95) * 1e3,
                base / med,
                cpu * 1e3,
                base_cpu / cpu,
                len(res.latencies),
                ",".join(map(str, tokens)) if tokens != "-" else "-",
                ",".join(map(str, sorted(set(res.masks)))) or "-",
            ]
        )
    print(
        markdown_table(
            [
                "model",
                "path",
                "latency ms (median)",
                "p95",
                "speedup vs original",
                "cpu ms (median)",
                "cpu speedup",
                "n",
                "new tokens",
                "masks",
            ],
            rows,
        )
    )
    keys = next((list(res.work) for res in r.paths.values() if res.work), [])
    rows = [[path, *res.work.values()] for path, res in r.paths.items() if res.work]
    print("\nwork per query (last query of each path):\n")
    print(markdown_table(["path", *keys], rows))
    print(
        f"\ngenerated ids identical to the original's: {r.same_ids_as_original}; "
        f"largest mask-logit difference {r.max_mask_diff:.2e}; "
        f"fast vs original 1-fwd: largest mask-logit difference {r.max_mask_diff_1fwd:.2e}\n"
    )
    rows = []
    for path, res in r.paths.items():
        if not res.latencies:
            continue
        act = res.activations
        budget = r.weights_bytes + act.total
        rows.append(
            [
                path if path in PATHS else f"{path} (not in the check)",
                mib(res.peak_bytes),
                mib(r.weights_bytes),
                mib(act.total),
                f"{act.largest_stage} {mib(act.largest_transient):.0f}",
                res.peak_bytes / budget,
            ]
        )
    where = "CUDA max_memory_allocated" if r.runtime_bytes == 0 else "peak RSS above runtime"
    print(
        markdown_table(
            [
                f"path (memory: {where})",
                "peak MiB",
                "weights MiB",
                "activations MiB",
                "largest transient MiB",
                "peak / (weights + act.)",
            ],
            rows,
        )
    )
    if r.runtime_bytes:
        print(f"\n(runtime before the model was built: {mib(r.runtime_bytes):.0f} MiB RSS)")


def print_summary(results: list[SizeResult]) -> None:
    print("\n## Ratios and targets (wall clock; in brackets: on CPU time)\n")
    rows = []
    for r in results:

        def both(key: str, target: str, q=r.ratios, c=r.cpu_ratios) -> str:
            return f"{_check(q[key], TARGETS[target])} ({c[key]:.2f})"

        rows.append(
            [
                r.name,
                both("kv_vs_original", "kv_vs_original"),
                both("fast_vs_original", "fast_vs_original"),
                both("fast_vs_original_1fwd", "fast_vs_original_1fwd"),
                f"{r.ratios['fast_2nd_vs_original_1fwd']:.2f} "
                f"({r.cpu_ratios['fast_2nd_vs_original_1fwd']:.2f})",
                both("second_vs_first_fast", "second_vs_first"),
                both("second_vs_first_generate", "second_vs_first"),
                _check(r.ratios["memory_factor"], TARGETS["memory_factor"], below=True),
            ]
        )
    print(
        markdown_table(
            [
                "model",
                "kv-cache vs original (>= 4x)",
                "fast vs original (>= 10x)",
                "fast vs original 1-fwd, new frame (>= 1.5x)",
                "fast 2nd+ vs original 1-fwd, set frame",
                "2nd query vs 1st, fast (>= 3x)",
                "2nd query vs 1st, generate (>= 3x)",
                "peak / (weights + act.) (<= 1.2)",
            ],
            rows,
        )
    )


def _check(value: float, target: float, below: bool = False) -> str:
    ok = value <= target if below else value >= target
    return f"{value:.2f} {'ok' if ok else 'MISSED'}"


if __name__ == "__main__":
    sys.exit(main())
