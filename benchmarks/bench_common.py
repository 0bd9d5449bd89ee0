"""Shared pieces of the model benchmarks: tokenizer and models built in code, clocks, memory.

Not a test and not part of the package: imported by ``model_speed.py`` and ``gpu_benchmark.py``
from this folder (run them as ``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lisa_model.builders import ADDED_TOKEN_LAYOUTS, ModelSpec, build_lisa
from lisa_model.modeling import LisaModel
from lisa_model.processing import prepare_image
from lisa_model.sam_encoder import FusedImageEncoderViT
from lisa_model.tokenizer import LisaTokenizer, train_sentencepiece

#: Queries asked in the benchmarks (the first one is the "first query" of a frame).
QUERIES = (
    "What is the object that a person could sit on in this image?",
    "Where is the red cup in this picture?",
    "Which object could be used to cut paper?",
    "What is the thing closest to the camera?",
    "Can you segment the dog in this image?",
)

_ENGLISH = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: Sure, it is [SEG]. Sure, the segmentation result is [SEG].",
    "Please output segmentation mask. Please output segmentation mask and explain why.",
    "What is the object in this image? Where is it in this picture? Can you segment it?",
    "Which object could be used to cut paper? What is the thing closest to the camera?",
    "a person could sit on the chair next to the table while the dog sleeps on the sofa",
    "the red cup stands on the kitchen counter beside a knife, scissors and a green bottle",
]


def benchmark_corpus(seed: int = 0, sentences: int = 20000) -> list[str]:
    """English prompt text (so prompts tokenize to realistic lengths) plus seeded pseudo-words
    (so a BPE vocabulary of 32000 pieces can be learned)."""
    rng = random.Random(seed)
    onsets = [
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "j",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "z",
        "br",
        "st",
        "tr",
        "pl",
        "gr",
        "sh",
        "ch",
    ]
    syllables = [o + v for o in onsets for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = [
        "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(50000)
    ]
    synthetic = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(sentences)]
    return _ENGLISH * 200 + synthetic


@functools.lru_cache(maxsize=4)
def make_tokenizer(vocab_size: int, seed: int = 0, layout: str = "7b-v1") -> LisaTokenizer:
    """A LLaMA-like sentencepiece tokenizer of ``vocab_size`` pieces (+ LISA's added tokens),
    trained in-process (about a second for 32000 pieces)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = train_sentencepiece(benchmark_corpus(seed), vocab_size, Path(tmp) / "sp.model")
        return LisaTokenizer.from_sentencepiece(path.read_bytes(), ADDED_TOKEN_LAYOUTS[layout])


@dataclass(frozen=True)
class BenchSize:
    """A model size of the benchmarks: geometry and the sentencepiece vocabulary size."""

    name: str
    spec: ModelSpec
    vocab_size: int
    note: str = ""


def build_bench_model(
    size: BenchSize,
    tokenizer: LisaTokenizer,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LisaModel:
    """``build_lisa`` with random weights and the EOS row of ``lm_head`` zeroed: its logit is
    exactly 0 while the largest of the other random logits is positive, so EOS never wins and
    every answer is ``max_new_tokens`` long (the benchmarks report the lengths they got)."""
    model = build_lisa(size.spec, tokenizer, seed=seed, dtype=dtype, device=device)
    with torch.no_grad():
        model.llm.lm_head.weight[model.eos_token_id].zero_()
    return model


@torch.inference_mode()
def plant_seg_first(
    model: LisaModel,
    rgb: np.ndarray,
    prompt_ids: list[int],
    margin: float = 2.0,
    new_tokens: int = 32,
) -> None:
    """Make ``[SEG]`` the first answer token and only that, like a trained model's "[SEG] ..."
    answer with one mask.

    Sets the ``[SEG]`` row of ``lm_head`` to the direction that separates the state ending the
    prompt (``prompt_ids`` about ``rgb``) from the states of the answer the model gives without
    it, scaled so that at the prompt's end the ``[SEG]`` logit is ``margin`` times the largest
    other one. Prompts that end the same way ("ASSISTANT:") end in nearly the same state, so
    other frames and queries also start with ``[SEG]``; the benchmarks report the counts.
    """
    from lisa_model.generation import greedy_generate

    prepared = prepare_image(rgb, sam_size=model.sam_image_size)
    features = model.encode_clip(prepared.clip.unsqueeze(0))
    ids = torch.tensor([prompt_ids], device=model.device)
    embeds, _, _ = model.embed_inputs(ids, features)
    end = model.llm.model(inputs_embeds=embeds).last_hidden_state[0, -1].float()  # (H,)
    states = []  # final-norm states of a plain greedy answer
    hook = model.llm.lm_head.register_forward_hook(
        lambda _m, args, _o: states.append(args[0].reshape(-1, args[0].shape[-1]).float())
    )
    try:
        greedy_generate(
            model.llm, embeds, max_new_tokens=new_tokens, eos_token_id=-1, seg_token_id=-1
        )
    finally:
        hook.remove()
    direction = end - torch.cat(states[1:]).mean(dim=0)
    weight = model.llm.lm_head.weight
    top = float((weight.float() @ end).max())
    scale = margin * abs(top) / float(direction @ end)
    weight[model.seg_token_id] = (direction * scale).to(weight.dtype)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (what loading the model costs)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def parameter_total(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_frames(count: int, hw: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``count`` smooth random ``(H, W, 3)`` uint8 RGB frames (a new frame per query)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    frames = []
    for _ in range(count):
        coarse = rng.random((h // 16 + 2, w // 16 + 2, 3))
        big = np.kron(coarse, np.ones((16, 16, 1)))[:h, :w]
        noise = rng.normal(0.0, 0.05, (h, w, 3))
        frames.append(np.clip((big + noise) * 255, 0, 255).astype(np.uint8))
    return frames


# --------------------------------------------------------------------------- clocks
class Clock:
    """``perf_counter`` that waits for the device first when it is a GPU (exact stage times)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass
class Timing:
    """Seconds per call: wall clock and this process's CPU time (``time.process_time``).

    With one torch thread on a CPU, CPU time is what the call costs on an otherwise idle core;
    wall time also holds the time other jobs on the machine took the core away.
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def time_call(fn: Callable[[], object], clock: Clock, repeats: int, warmup: int = 1) -> Timing:
    """Times of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(repeats):
        c0, t0 = time.process_time(), clock()
        fn()
        timing.wall.append(clock() - t0)
        timing.cpu.append(time.process_time() - c0)
    return timing


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); the largest value for a few samples."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(np.ceil(q / 100.0 * len(ordered))))
    return float(ordered[rank - 1])


# --------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so that RSS measures what
    is alive, not what an earlier model left in the allocator. No-op elsewhere."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter (Linux ``clear_refs``); False where that is not allowed,
    in which case :func:`peak_rss_bytes` keeps the process-lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (or process start)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a block: RSS above ``runtime_bytes`` on the CPU (reset with
    ``clear_refs``), ``torch.cuda.max_memory_allocated`` on a GPU (weights included in both)."""

    def __init__(self, device: torch.device, runtime_bytes: int = 0) -> None:
        self.device = device
        self.runtime = runtime_bytes

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, peak_rss_bytes() - self.runtime)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo and the threads torch uses."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------- activations
@dataclass
class Activations:
    """Activation bytes of one query (see :func:`activation_estimate`)."""

    kv_cache: int
    step_states: int
    frame_cache: int
    largest_stage: str
    largest_transient: int
    total: int = 0

    def __post_init__(self) -> None:
        self.total = self.kv_cache + self.step_states + self.frame_cache + self.largest_transient


def activation_estimate(
    model: LisaModel,
    prompt_tokens: int,
    new_tokens: int,
    n_masks: int,
    image_hw: tuple[int, int],
    *,
    original: bool = False,
    encoders: bool = True,
) -> Activations:
    """Bytes of the activations one query needs, by part, computed from the shapes.

    ``prompt_tokens`` counts the expanded prompt (image features included). The stages run one
    after another, so the total is what lives through the query (KV cache, per-frame features)
    plus the largest transient of one stage. ``original``: the original's uncached decoding,
    which keeps no KV cache but every step's final hidden states (``generate`` returns them),
    runs CLIP with all hidden states and computes every layer's states and every position's
    logits at each step. ``encoders``: the query runs CLIP and the SAM image encoder (a fresh
    frame); otherwise they ran before.
    """
    s = torch.empty((), dtype=model.dtype).element_size()
    cfg = model.llm.config
    hidden, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    layers = cfg.num_hidden_layers
    kv_dim = cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
    seq = prompt_tokens + new_tokens
    kv_cache = 0 if original else 2 * layers * seq * kv_dim * s
    step_states = new_tokens * seq * hidden * s if original else 0  # one (1, L, H) per step

    vc = model.vision_tower.config
    clip_tokens = model.num_image_tokens + 1
    clip = clip_tokens * vc.hidden_size * s * (6 + 2 * vc.intermediate_size // vc.hidden_size)
    if original:
        clip += (vc.num_hidden_layers + 1) * clip_tokens * vc.hidden_size * s
    frame = model.num_image_tokens * hidden * s + 256 * 64 * 64 * s  # CLIP features + SAM emb.

    enc = model.sam.image_encoder
    size = int(enc.img_size)
    if hasattr(enc, "blocks"):  # SAM's ViT
        grid = size // enc.patch_embed.proj.kernel_size[0]
        n_tok = grid * grid
        dim = enc.patch_embed.proj.out_channels
        heads = enc.blocks[0].attn.num_heads
        if isinstance(enc, FusedImageEncoderViT):
            # SDPA with the relative-position bias as its mask, built for one chunk of whole
            # query rows at a time: one (heads, rows * grid, N) mask in a global block.
            rows = max(1, min(grid, enc.query_chunk // grid))
            sam_attention = heads * rows * grid * n_tok * s
        else:
            # Upstream SAM attention materialises (heads, N, N) scores; adding the relative
            # positions and the softmax hold up to three such tensors at once in a global block.
            sam_attention = 3 * heads * n_tok * n_tok * s
        sam_tokens = n_tok * dim * s * (8 + 2 * 4)  # x, qkv, proj, norms; MLP 4x expansion
        sam = sam_attention + sam_tokens + 3 * size * size * s  # + the padded input image
    else:  # ConvImageEncoder: the largest stem map (conv, norm, activation) plus the input
        maps, side = [], size
        for block in enc.stem:
            side //= block[0].stride[0]
            maps.append(block[0].out_channels * side * side)
        sam = 3 * max(maps) * s + 3 * size * size * s

    llm_step = seq * (6 * hidden + 3 * inter) * s  # one layer's temporaries
    if original:
        llm_step += (layers + 1) * seq * hidden * s + seq * vocab * s  # all states, all logits
    else:
        llm_step += vocab * 4  # one position's float32 logits
    n = max(n_masks, 1)
    # Per mask: ~10 image-side (4096, 256) tensors alive in the two-way transformer (the
    # repeated embedding, +dense, positions, keys + positions, projections, attention outputs,
    # norms), the upscaling's (64, 128, 128) LayerNorm2d temporaries and two (32, 256, 256).
    mask_decoder = n * (10 * 4096 * 256 + 4 * 64 * 128 * 128 + 2 * 32 * 256 * 256) * s
    h, w = image_hw
    post = n * (2 * 1024 * 1024 * 4 + h * w * 5)  # float32 upsampling, logits + bool masks
    transients = {"llm": llm_step, "mask_decoder": mask_decoder, "postprocess": post}
    if encoders:
        transients.update(sam_encoder=sam, clip=clip)
    largest = max(transients, key=transients.get)
    return Activations(kv_cache, step_states, frame, largest, transients[largest])


# --------------------------------------------------------------------------- output
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats printed with up to 4 significant digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "n/a"
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20
