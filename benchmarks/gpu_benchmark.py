"""LISA-7B / 13B-shaped models on a GPU: per-query latency, set_image, tokens/s, peak memory.

Models are built in code with random weights directly on the GPU in bf16 (no download, no host
copy; ``build_lisa`` creates the parameters on the device in the target dtype), in the published
shapes (``LISA_7B``: LLaMA-7B + CLIP ViT-L/14 + SAM ViT-H; ``LISA_13B`` likewise), with a
32000-piece sentencepiece vocabulary trained in-process. Each size runs in bf16 and, where
bitsandbytes is installed, with the LLM's decoder layers in 4 bit (``quantize_llm``); without it
the 4-bit rows are skipped with a message. Rows per model:

- ``set_image``: CLIP + SAM image encoder + the prompt prefix's KV cache, per new frame;
- ``fast, new frame``: ``set_image`` + the segment-only path;
- ``fast, same frame``: a further query on a frame already set;
- ``32-token answer``: an explained answer of exactly ``--new-tokens`` ids (EOS disabled) on a
  frame already set, and ``tokens/s`` of its decoding loop;
- the peak of ``torch.cuda.max_memory_allocated`` over all of a model's rows.

Before anything runs, the 7B and 13B shapes are built on the meta device to print their weight
sizes and whether they fit 80 GB (this part also runs on a CPU).

    python benchmarks/gpu_benchmark.py                      # 7b,13b; bf16 and 4bit; < 5 min
    python benchmarks/gpu_benchmark.py --sam-encoder --live # + fused SAM and the live node
    python benchmarks/gpu_benchmark.py --device cpu --sizes tiny --quick    # dry run on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import (
    QUERIES,
    BenchSize,
    Clock,
    PeakMemory,
    activation_estimate,
    build_bench_model,
    cpu_name,
    make_tokenizer,
    markdown_table,
    median,
    percentile,
    plant_seg_first,
    random_frames,
    rss_bytes,
    weight_bytes,
)
from lisa_model.builders import LISA_7B, LISA_13B, ModelSpec
from lisa_model.options import resolve_dtype
from lisa_model.predictor import LisaPredictor
from lisa_model.prompts import format_query

SIZES: dict[str, BenchSize] = {
    "tiny": BenchSize("tiny", ModelSpec(), 800, "the reference fixture's geometry"),
    "7b": BenchSize("7b", LISA_7B, 32000, "LISA-7B-v1 shapes"),
    "13b": BenchSize("13b", LISA_13B, 32000, "LISA-13B-llama2-v1 shapes"),
}
GPU_MEMORY_GB = 80.0


@dataclass
class Row:
    model: str
    precision: str
    path: str
    latencies: list[float] = field(default_factory=list)
    tokens_per_s: float = float("nan")
    new_tokens: int = 0
    masks: int = 0


@dataclass
class ModelResult:
    model: str
    precision: str
    weights_bytes: int
    peak_bytes: int
    rows: list[Row]
    sync_warnings: dict[str, int] = field(default_factory=dict)
    skipped: str = ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="7b,13b", help=f"from {sorted(SIZES)}")
    parser.add_argument("--quant", default="none,4bit", help="precisions: none (= --dtype), 4bit")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--frame", default="480x640", help="frame size HxW")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--compile", action="store_true", help="also time LisaPredictor(compile=True)"
    )
    parser.add_argument(
        "--check-syncs", action="store_true",
        help="count CUDA host-device syncs of 8- and 32-token answers (sync debug mode)",
    )  # fmt: skip
    parser.add_argument(
        "--sam-encoder",
        action="store_true",
        help="also run sam_encoder.py on the device: upstream vs fused SAM ViT-B and ViT-H, "
        "bf16 and fp32 (--quick: the small shape at 512)",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="also run node_latency.py --live on the device (the ROS node with a 30 Hz camera, "
        "pre-encoding on/off vs a set frame; needs the venv's rclpy and lisa_msgs)",
    )
    parser.add_argument("--quick", action="store_true", help="2 repeats (dry runs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.repeats = 2
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIZES]
    precisions = [q.strip() for q in args.quant.split(",") if q.strip()]
    bad = [q for q in precisions if q not in ("none", "4bit", "8bit")]
    if unknown or bad:
        print(f"unknown sizes {unknown} / precisions {bad}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu for a dry run", file=sys.stderr)
        return 2
    dtype = resolve_dtype(args.dtype, device)
    hw = tuple(int(v) for v in args.frame.lower().split("x"))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()

    print(f"# gpu_benchmark: {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"- card: {card}")
    print(f"- torch {torch.__version__}, dtype {str(dtype).split('.')[-1]}, device {device}")
    print(f"- {args.new_tokens}-token answers, repeats {args.repeats}\n")
    print_fit_check(dtype)

    t_start = time.perf_counter()
    results: list[ModelResult] = []
    for name in names:
        size = SIZES[name]
        tokenizer = make_tokenizer(size.vocab_size, seed=args.seed)
        model = None
        for precision in precisions:
            label = "bf16" if dtype == torch.bfloat16 else str(dtype).split(".")[-1]
            label = label if precision == "none" else precision
            reason = quantization_unavailable(precision, device)
            if reason:
                print(f"- {name} {precision}: skipped ({reason})")
                results.append(ModelResult(name, precision, 0, 0, [], skipped=reason))
                continue
            if model is None or precision == "none":
                model = fresh_model(size, tokenizer, device, dtype, args.seed)
            if precision != "none":
                from lisa_model.quantization import quantize_llm

                quantize_llm(model, precision, device=device, compute_dtype=dtype)
            print(f"- {name} {label}: measuring", flush=True)
            results.append(bench_model(model, size, label, args, device, hw))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print_results(results, card)
    status = 0
    if args.sam_encoder:
        status |= run_sam_encoder(args)
    if args.live:
        status |= run_live(args)
    print(f"\ntotal time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
        print(f"wrote {args.json}")
    return status


def run_sam_encoder(args: argparse.Namespace) -> int:
    """The fused vs upstream SAM encoder table on this device (``sam_encoder.py``)."""
    from benchmarks import sam_encoder

    print()
    argv = ["--device", args.device, "--repeats", str(args.repeats)]
    if args.quick:
        argv += ["--quick"]
    else:
        argv += ["--shapes", "vit-b,vit-h", "--dtypes", "bfloat16,float32"]
    if args.json:
        argv += ["--json", str(args.json.with_name(args.json.stem + "_sam_encoder.json"))]
    return sam_encoder.main(argv)


def run_live(args: argparse.Namespace) -> int:
    """The live-stream latency of the node on this device (``node_latency.py --live``, in a
    child process: it brings up ROS)."""
    import subprocess

    print(flush=True)
    script = Path(__file__).resolve().with_name("node_latency.py")
    argv = [sys.executable, str(script), "--live", "--device", args.device]
    argv += ["--commands", "3", "--gap", "0.5,1"] if args.quick else ["--bench-model", "small"]
    if args.json:
        argv += ["--json", str(args.json.with_name(args.json.stem + "_live.json"))]
    return subprocess.run(argv, check=False).returncode


def quantization_unavailable(precision: str, device: torch.device) -> str:
    """Why ``precision`` cannot run here ('' when it can)."""
    if precision == "none":
        return ""
    if device.type != "cuda":
        return "bitsandbytes quantization needs a CUDA device"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (pip install 'lisa_ros[quant]')"
    return ""


def fresh_model(size, tokenizer, device, dtype, seed):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model = build_bench_model(size, tokenizer, device=device, dtype=dtype, seed=seed)
    print(f"- {size.name}: built on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
    return model


def print_fit_check(dtype: torch.dtype) -> None:
    """Weights and activations of the 7B / 13B shapes, from a meta-device build."""
    rows = []
    half = torch.bfloat16 if dtype == torch.float32 else dtype
    for name in ("7b", "13b"):
        size = SIZES[name]
        model = build_bench_model(size, make_tokenizer(size.vocab_size), device="meta", dtype=half)
        weights = weight_bytes(model)
        act = activation_estimate(model, 330, 32, 1, (480, 640)).total
        total = (weights + act) / 1e9
        rows.append(
            [
                name,
                f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B",
                weights / 1e9,
                act / 1e9,
                "yes" if total < GPU_MEMORY_GB else "NO",
            ]
        )
    label = str(half).split(".")[-1]
    print(
        markdown_table(
            ["shape", "parameters", f"weights GB ({label})", "activations GB", "fits 80 GB"],
            rows,
        )
    )
    print()


# --------------------------------------------------------------------------- measuring
def bench_model(model, size, label, args, device, hw) -> ModelResult:
    clock = Clock(device)
    memory = PeakMemory(device, 0 if device.type == "cuda" else rss_bytes())
    if device.type == "cuda":  # what the model holds on the card (4-bit quant states too)
        gc.collect()
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(device)
    else:
        weights = weight_bytes(model)
    predictor = LisaPredictor(model)
    frames = random_frames(args.repeats + 1, hw, seed=args.seed)
    explain_ids = predictor.prompt_ids(format_query(QUERIES[0], explain=True))
    plant_seg_first(model, frames[-1], explain_ids)
    rows = {
        name: Row(size.name, label, name)
        for name in ("set_image", "fast, new frame", "fast, same frame", "32-token answer")
    }

    def timed(name, fn):
        t0 = clock()
        out = fn()
        rows[name].latencies.append(clock() - t0)
        return out

    # warm-up: kernels, allocator, cuBLAS handles
    predictor.set_image(frames[-1])
    predictor.predict(QUERIES[0], mode="segment")
    predictor.predict(QUERIES[0], explain=True, max_new_tokens=4)
    memory.reset()
    decode_rates = []
    for rep in range(args.repeats):
        timed("set_image", lambda f=frames[rep]: predictor.set_image(f))

        def new_frame(f=frames[rep]):
            predictor.set_image(f)
            return predictor.predict(QUERIES[0], mode="segment")

        fast = timed("fast, new frame", new_frame)
        rows["fast, new frame"].masks = fast.masks.shape[0]
        query = QUERIES[1 + rep % (len(QUERIES) - 1)]
        again = timed("fast, same frame", lambda q=query: predictor.predict(q, mode="segment"))
        rows["fast, same frame"].masks = again.masks.shape[0]
        answer = timed(
            "32-token answer",
            lambda q=query: predictor.predict(q, explain=True, max_new_tokens=args.new_tokens),
        )
        rows["32-token answer"].new_tokens = len(answer.token_ids)
        rows["32-token answer"].masks = answer.masks.shape[0]
        decode_rates.append(decode_tokens_per_s(predictor, query, args.new_tokens, clock))
    rows["32-token answer"].tokens_per_s = median(decode_rates)
    peak = memory.peak()
    syncs = count_syncs(predictor, args) if args.check_syncs and device.type == "cuda" else {}
    if args.compile:
        rows.update(compiled_rows(model, size, label, frames, args, clock))
    return ModelResult(size.name, label, weights, peak, list(rows.values()), syncs)


@torch.inference_mode()
def decode_tokens_per_s(predictor, query, new_tokens, clock, repeats=3) -> float:
    """Tokens/s of the decoding loop alone: ``greedy_generate`` of ``new_tokens`` ids minus
    1 id (both with the same prefill), medians over ``repeats``; NaN if too noisy to tell."""
    from lisa_model.generation import greedy_generate

    model = predictor.model
    frame = predictor._frame
    ids = torch.tensor([predictor.prompt_ids(format_query(query, explain=True))])
    features = frame.image_features.expand(1, -1, -1)
    embeds, _, _ = model.embed_inputs(ids.to(model.device), features)
    times = {1: [], new_tokens: []}
    for _ in range(repeats):
        for n in times:
            t0 = clock()
            greedy_generate(
                model.llm,
                embeds,
                max_new_tokens=n,
                eos_token_id=model.eos_token_id,
                seg_token_id=model.seg_token_id,
            )
            times[n].append(clock() - t0)
    loop = median(times[new_tokens]) - median(times[1])
    return (new_tokens - 1) / loop if loop > 0 else float("nan")


def count_syncs(predictor, args) -> dict[str, int]:
    """CUDA syncs warned by ``torch.cuda.set_sync_debug_mode`` for short and long answers;
    equal counts mean that the decoding loop itself never waits for the GPU."""
    counts = {}
    for tokens in (8, args.new_tokens):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                predictor.predict(QUERIES[1], explain=True, max_new_tokens=tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts[f"{tokens} tokens"] = sum("synchroniz" in str(w.message) for w in caught)
    return counts


def compiled_rows(model, size, label, frames, args, clock) -> dict[str, Row]:
    t0 = time.perf_counter()
    predictor = LisaPredictor(model, compile=True)
    predictor.set_image(frames[-1])
    predictor.predict(QUERIES[0], mode="segment")
    print(f"  compiled first frame: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = {
        "compiled set_image": Row(size.name, label, "compiled set_image"),
        "compiled fast, new frame": Row(size.name, label, "compiled fast, new frame"),
    }
    for rep in range(args.repeats):
        t0 = clock()
        predictor.set_image(frames[rep])
        t1 = clock()
        predictor.predict(QUERIES[0], mode="segment")
        t2 = clock()
        rows["compiled set_image"].latencies.append(t1 - t0)
        rows["compiled fast, new frame"].latencies.append(t2 - t0)
    return rows


# --------------------------------------------------------------------------- output
def print_results(results: list[ModelResult], card: str) -> None:
    table = []
    for res in results:
        if res.skipped:
            table.append([card, res.model, res.precision, "skipped", "-", "-", "-", "-", "-"])
            continue
        for row in res.rows:
            table.append(
                [
                    card,
                    row.model,
                    row.precision,
                    row.path,
                    median(row.latencies) * 1e3,
                    percentile(row.latencies, 95) * 1e3,
                    row.tokens_per_s,
                    f"{row.new_tokens} / {row.masks}"
                    if row.new_tokens
                    else (str(row.masks) if "fast" in row.path else "-"),
                    res.peak_bytes / 2**30,
                ]
            )
    print(
        markdown_table(
            [
                "card",
                "model",
                "precision",
                "path",
                "latency ms (median)",
                "p95",
                "tokens/s",
                "new tokens / masks",
                "peak GiB",
            ],
            table,
        )
    )
    print()
    for res in results:
        if res.skipped:
            print(f"- {res.model} {res.precision}: skipped: {res.skipped}")
            continue
        print(
            f"- {res.model} {res.precision}: weights {res.weights_bytes / 2**30:.2f} GiB, "
            f"peak {res.peak_bytes / 2**30:.2f} GiB"
            + (f", CUDA syncs per answer {res.sync_warnings}" if res.sync_warnings else "")
        )


if __name__ == "__main__":
    sys.exit(main())
