"""SAM ViT image encoder: upstream ``ImageEncoderViT`` vs ``FusedImageEncoderViT``.

Both encoders get identical random weights (relative positions and position embedding random
too, so the bias path is exercised); per (shape, dtype): time per forward at ``--img-size``
(upstream and fused interleaved within each repeat, alternating which goes first), peak memory
of one forward, and the largest absolute output difference fused vs upstream.

Memory: on the CPU each (shape, dtype, implementation) runs in a child process (this file with
``--memory-child``) that reports the peak RSS growth of its second forward over the RSS before
it (model, input and one warm-up forward done; Linux ``clear_refs`` resets the peak, glibc
``malloc_trim`` returns freed heap first); on a GPU ``torch.cuda.max_memory_allocated`` minus
what was allocated before the second forward.

    python benchmarks/sam_encoder.py --threads 1 --repeats 3 --dtypes float32
    python benchmarks/sam_encoder.py --quick          # small shape, float32, 1 repeat, 512 px
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything.modeling import ImageEncoderViT

from benchmarks.bench_common import (
    Clock,
    cpu_name,
    load_average,
    median,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    trim_heap,
)
from lisa_model.options import DTYPE_NAMES, cpu_bf16_note, dtype_name, native_bf16, parse_dtype
from lisa_model.sam_encoder import DEFAULT_QUERY_CHUNK, FusedImageEncoderViT

MIB = 1024 * 1024


@dataclass(frozen=True)
class EncoderShape:
    """A ViT encoder shape (patch 16, MLP ratio 4, relative positions on)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    note: str = ""


#: The shapes benchmarked: SAM ViT-B, a small one with 3 of 4 blocks global, and SAM ViT-H (the
#: encoder of the published LISA checkpoints; for a GPU, see ``gpu_benchmark.py --sam-encoder``).
SHAPES: dict[str, EncoderShape] = {
    "small": EncoderShape(256, 4, 4, (1, 2, 3), note="256 x 4, 3 global blocks"),
    "vit-b": EncoderShape(768, 12, 12, (2, 5, 8, 11), note="SAM ViT-B"),
    "vit-h": EncoderShape(1280, 32, 16, (7, 15, 23, 31), note="SAM ViT-H, as in LISA"),
}
IMPLS = ("upstream", "fused")


def build_encoder(
    shape: EncoderShape, impl: str, img_size: int, query_chunk: int = DEFAULT_QUERY_CHUNK
) -> ImageEncoderViT:
    """An encoder of ``shape`` (random default init), upstream or fused."""
    kwargs = dict(
        img_size=img_size,
        patch_size=16,
        embed_dim=shape.embed_dim,
        depth=shape.depth,
        num_heads=shape.num_heads,
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=shape.window_size,
        global_attn_indexes=shape.global_attn_indexes,
    )
    if impl == "fused":
        return FusedImageEncoderViT(**kwargs, query_chunk=query_chunk)
    return ImageEncoderViT(**kwargs)


def randomise_positions(encoder: torch.nn.Module, seed: int) -> None:
    """Random relative positions and position embedding (SAM initialises them to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def make_input(img_size: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


@dataclass
class Row:
    """One (shape, dtype) result; times in ms, memory in bytes."""

    shape: str
    dtype: str
    times_ms: dict[str, list[float]] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    max_abs_diff: float = float("nan")
    note: str = ""

    def median_ms(self, impl: str) -> float:
        return median(self.times_ms[impl])

    @property
    def speedup(self) -> float:
        """Speed fused / upstream (upstream time over fused time)."""
        return self.median_ms("upstream") / self.median_ms("fused")

    @property
    def memory_ratio(self) -> float:
        """Peak memory upstream / fused."""
        fused = self.peak_bytes.get("fused", 0)
        return self.peak_bytes.get("upstream", 0) / fused if fused else float("nan")


# --------------------------------------------------------------------------- memory
def measure_memory_here(
    shape: EncoderShape, impl: str, dtype: torch.dtype, device: torch.device, args
) -> int:
    """Peak memory growth (bytes) of one forward, measured in this process."""
    encoder = build_encoder(shape, impl, args.img_size, args.query_chunk).eval()
    encoder = encoder.to(device=device, dtype=dtype)
    x = make_input(args.img_size, args.seed + 1).to(device=device, dtype=dtype)
    with torch.inference_mode():
        if device.type == "cuda":
            encoder(x)  # warm-up: kernels and workspaces
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            encoder(x)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device) - before)
        encoder(x)  # warm-up: one-time library state is not the forward's memory
        trim_heap()
        before = rss_bytes()
        reset_peak_rss()
        encoder(x)
        return max(0, peak_rss_bytes() - before)


def measure_memory(shape_name: str, impl: str, dtype_name: str, args) -> int:
    """Peak memory growth of one forward: a child process on the CPU, in-process on a GPU."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return measure_memory_here(SHAPES[shape_name], impl, parse_dtype(dtype_name), device, args)
    child = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        f"{shape_name}:{impl}:{dtype_name}",
        "--device",
        args.device,
        "--img-size",
        str(args.img_size),
        "--query-chunk",
        str(args.query_chunk),
        "--seed",
        str(args.seed),
    ]
    if args.threads:
        child += ["--threads", str(args.threads)]
    proc = subprocess.run(child, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {shape_name}/{impl}/{dtype_name} failed:\n{proc.stderr}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


# --------------------------------------------------------------------------- timing
def bench_row(shape_name: str, dtype_name: str, args) -> Row:
    shape = SHAPES[shape_name]
    device = torch.device(args.device)
    dtype = parse_dtype(dtype_name)
    torch.manual_seed(args.seed)
    upstream = build_encoder(shape, "upstream", args.img_size).eval()
    randomise_positions(upstream, args.seed)
    fused = build_encoder(shape, "fused", args.img_size, args.query_chunk).eval()
    fused.load_state_dict(upstream.state_dict())
    encoders = {
        "upstream": upstream.to(device=device, dtype=dtype),
        "fused": fused.to(device=device, dtype=dtype),
    }
    x = make_input(args.img_size, args.seed + 1).to(device=device, dtype=dtype)
    clock = Clock(device)
    row = Row(shape_name, dtype_name, times_ms={impl: [] for impl in IMPLS})
    note = cpu_bf16_note(device, dtype)
    if note:
        row.note = "bf16 emulated (slow on this CPU)"
    with torch.inference_mode():
        outs = {impl: encoders[impl](x).float() for impl in IMPLS}  # warm-up and difference
        row.max_abs_diff = float((outs["fused"] - outs["upstream"]).abs().max())
        del outs
        for r in range(args.repeats):
            order = IMPLS if r % 2 == 0 else IMPLS[::-1]
            for impl in order:
                t0 = clock()
                encoders[impl](x)
                row.times_ms[impl].append((clock() - t0) * 1000)
    del encoders, upstream, fused, x
    trim_heap()
    for impl in IMPLS:
        row.peak_bytes[impl] = measure_memory(shape_name, impl, dtype_name, args)
    return row


# --------------------------------------------------------------------------- output
def print_table(rows: list[Row], device: torch.device) -> None:
    mem = "peak GPU alloc" if device.type == "cuda" else "peak RSS growth"
    print(
        f"| shape | dtype | upstream ms (median) | upstream min-max | fused ms (median) "
        f"| fused min-max | speed fused/upstream | upstream {mem} MiB | fused {mem} MiB "
        f"| memory upstream/fused | max abs diff | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [row.shape, row.dtype]
        for impl in IMPLS:
            t = row.times_ms[impl]
            cells += [f"{row.median_ms(impl):.1f}", f"{min(t):.1f}-{max(t):.1f}"]
        cells += [
            f"{row.speedup:.2f}",
            f"{row.peak_bytes['upstream'] / MIB:.0f}",
            f"{row.peak_bytes['fused'] / MIB:.0f}",
            f"{row.memory_ratio:.2f}",
            f"{row.max_abs_diff:.2e}",
            row.note,
        ]
        print("| " + " | ".join(cells) + " |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help=f"comma-separated, of {', '.join(DTYPE_NAMES)} (default float32,bfloat16)",
    )
    parser.add_argument(
        "--shapes", default="small,vit-b", help=f"comma-separated, of {', '.join(SHAPES)}"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per encoder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--img-size", type=int, default=1024, help="input side (default 1024)")
    parser.add_argument(
        "--query-chunk",
        type=int,
        default=DEFAULT_QUERY_CHUNK,
        help=f"fused encoder's query tokens per attention call (default {DEFAULT_QUERY_CHUNK})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small shape, float32, 1 repeat, input 512, query chunk 256",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser


def memory_child(args) -> int:
    shape_name, impl, dtype_name = args.memory_child.split(":")
    peak = measure_memory_here(
        SHAPES[shape_name], impl, parse_dtype(dtype_name), torch.device(args.device), args
    )
    print(json.dumps({"peak_bytes": peak}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    if args.quick:
        args.shapes, args.dtypes, args.repeats = "small", "float32", 1
        args.img_size, args.query_chunk = 512, 256  # still 4 query chunks per global block
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"unknown shapes {unknown}; expected some of {list(SHAPES)}", file=sys.stderr)
        return 2
    try:
        dtypes = [dtype_name(d) for d in dtypes]
    except ValueError as exc:
        print(f"--dtypes: {exc}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.img_size % 16 or args.query_chunk < 1:
        print("--repeats >= 1, --img-size a multiple of 16, --query-chunk >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device)

    print(f"# sam_encoder: {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"- machine: {platform.machine()}, {cpu_name()}, load average {load_average()}")
    if device.type == "cuda":
        print(f"- device: {torch.cuda.get_device_name(device)}")
    print(f"- torch {torch.__version__}, device {device}, input {args.img_size}, batch 1")
    bf16 = native_bf16(device)
    note = cpu_bf16_note(device, torch.bfloat16)
    print(f"- native bf16 on {device.type}: {bf16}" + (f" ({note})" if note else ""))
    print(f"- fused query chunk {args.query_chunk} tokens, repeats {args.repeats}")
    for name in shapes:
        s = SHAPES[name]
        print(
            f"- {name}: embed {s.embed_dim}, depth {s.depth}, heads {s.num_heads}, "
            f"window {s.window_size}, global blocks {s.global_attn_indexes} ({s.note})"
        )
    print()

    rows = []
    for name in shapes:
        for dname in dtypes:
            rows.append(bench_row(name, dname, args))
            print(
                f"done {name} {dname}: speed fused/upstream {rows[-1].speedup:.2f}, "
                f"memory upstream/fused {rows[-1].memory_ratio:.2f}",
                flush=True,
            )
    print()
    print_table(rows, device)
    print(f"\nload average at the end: {load_average()}")
    if args.json:
        payload = {
            "device": str(device),
            "machine": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "native_bf16": bf16,
            "img_size": args.img_size,
            "query_chunk": args.query_chunk,
            "repeats": args.repeats,
            "rows": [
                {**asdict(r), "speedup": r.speedup, "memory_ratio": r.memory_ratio} for r in rows
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
