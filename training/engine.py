"""The DeepSpeed training loop of LISA: data, steps, logging, validation, checkpoints, resume.

One :class:`Trainer` per run. It works under the ``deepspeed`` launcher, ``torchrun`` (one process
per GPU, many nodes) and as a plain single process on the CPU (a world of one over gloo), which is
how the tests run it.

A run directory (``run.output_dir``) holds::

    run.json                 resolved config, model source, tokens, LoRA, trainable parameters
                             (what lisa-export needs to rebuild the model)
    deepspeed_config.json    the DeepSpeed config rendered from the run config (for the record)
    metrics.jsonl            one JSON object per logged training step and per validation
    tensorboard/             the same scalars for TensorBoard
    ckpt/last, ckpt/best     DeepSpeed checkpoints (trainable parameters, optimizer, scheduler,
                             step, per-rank RNG): the newest one, and the best by val gIoU
    ckpt/latest              DeepSpeed's pointer file naming the tag to resume from ("last")

Steps are optimizer steps: each is ``optim.grad_accumulation_steps`` micro-batches of
``optim.micro_batch_size`` images per process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lisa_model.metrics import IGNORE_INDEX, SegMetrics
from lisa_model.modeling import LisaModel
from training.checkpoint_files import check_checkpoint_files, weights_only_loads
from training.collate import Batch, Collator
from training.config import (
    TrainConfig,
    config_from_dict,
    deepspeed_config,
    with_absolute_paths,
)
from training.model_setup import SetupReport, prepare_model_for_training

log = logging.getLogger(__name__)

RUN_FORMAT = "lisa-train-run/1"
RUN_FILE = "run.json"
DS_CONFIG_FILE = "deepspeed_config.json"
METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "ckpt"
TAG_LATEST = "last"
TAG_BEST = "best"
#: The sections that define the model and its parameter layout: a resumed run must match them.
MODEL_SECTIONS = ("model", "lora", "train")


# --------------------------------------------------------------------------- distributed setup
@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory collective op on the CPU.

    On the CPU accelerator DeepSpeed's ``TorchBackend`` builds ``deepspeed_shm_comm``
    (``csrc/cpu/comm/shm.cpp``, 25-50 s on 2 cores, then cached in ``TORCH_EXTENSIONS_DIR``) when
    ``deepspeed.init_distributed`` runs. Only ``inference_all_reduce`` (tensor-parallel inference)
    uses it; ZeRO training communicates through ``torch.distributed`` (gloo). Marking the op
    incompatible makes DeepSpeed skip the build.
    """
    import deepspeed.ops

    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError):  # another DeepSpeed layout: it may build the op
        log.debug("could not mark deepspeed_shm_comm unavailable")


def init_distributed() -> DistContext:
    """Join the process group (DeepSpeed over NCCL on GPUs, gloo on the CPU).

    Under ``deepspeed``/``torchrun`` the launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
    ``MASTER_*`` are used. Without them this process becomes a world of one (the variables are
    set: rank 0, a free port on 127.0.0.1). Calling it again in the same process is a no-op.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    os.environ.setdefault("LOCAL_RANK", "0")
    local_rank = int(os.environ["LOCAL_RANK"])
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        skip_shm_comm_build()
        backend, device = "gloo", torch.device("cpu")
    else:
        backend = accelerator.communication_backend_name()
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    deepspeed.init_distributed(dist_backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


# --------------------------------------------------------------------------- batches
def model_inputs(batch: Batch, targets: bool = True) -> dict[str, Any]:
    """Keyword arguments of :meth:`LisaModel.forward` from a collated batch.

    ``targets=False`` leaves out ``labels``/``gt_masks`` (no losses are computed).
    """
    inputs: dict[str, Any] = {
        "images_clip": batch.images_clip,
        "images_sam": batch.images_sam,
        "input_ids": batch.input_ids,
        "offsets": batch.offsets,
        "resize_sizes": batch.resize_sizes,
        "original_sizes": batch.original_sizes,
        "attention_mask": batch.attention_mask,
    }
    if targets:
        inputs["labels"] = batch.labels
        inputs["gt_masks"] = batch.gt_masks
    return inputs


def metric_targets(batch: Batch, image: int) -> torch.Tensor:
    """``(n, H, W)`` uint8 scoring targets of one image: its masks, 255 where the label ignores."""
    masks = batch.gt_masks[image].to(torch.uint8)
    ignore = batch.label_maps[image] == IGNORE_INDEX
    return masks.masked_fill(ignore.unsqueeze(0), IGNORE_INDEX)


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device | str,
    progress: bool = False,
) -> SegMetrics:
    """Teacher-forced validation, as the original ``validate``: gIoU / cIoU over ``batches``.

    Each batch goes through ``model(...)`` without targets; every predicted mask (``logit > 0``)
    is scored against its ground truth with 255 ignored (:class:`SegMetrics`). The counters are
    summed over all processes before they are returned (each process passes its share).

    Args:
        model: a :class:`LisaModel` (or anything with its forward signature returning
            ``pred_masks``); put in eval mode for the pass, its mode restored afterwards.
        batches: validation batches (``Collator(inference=True)``).
        device: where the inputs go.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    metrics = SegMetrics()
    try:
        for batch in tqdm(batches, desc="validate", leave=False, disable=not progress):
            batch = batch.to(device)
            out = model(**model_inputs(batch, targets=False))
            for i in range(batch.num_images):
                metrics.update(out.pred_masks[i].float().cpu(), metric_targets(batch, i).cpu())
    finally:
        model.train(was_training)
    metrics.all_reduce()
    return metrics


# --------------------------------------------------------------------------- records
@dataclass
class StepRecord:
    """Losses of the optimizer steps since the previous record (mean over those steps, their
    micro-batches and all processes); ``lr`` is the rate the last of them applied (DeepSpeed's
    WarmupDecayLR gives 0 to the first two steps); ``seconds`` is the mean time of one step."""

    step: int
    epoch: int
    loss: float
    ce_loss: float
    mask_bce_loss: float
    mask_dice_loss: float
    lr: float
    seconds: float
    bad_samples: int = 0  # skipped so far in this process (data.max_bad_samples)


@dataclass
class ValRecord:
    """One validation: gIoU / cIoU over the whole validation set."""

    step: int
    giou: float
    ciou: float
    num_masks: int
    num_samples: int


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did in this process."""

    output_dir: Path
    global_step: int
    steps: list[StepRecord] = field(default_factory=list)
    validations: list[ValRecord] = field(default_factory=list)
    best_giou: float | None = None
    seconds: float = 0.0
    bad_samples: int = 0
    last_bad_sample: str | None = None


def _loss_value(x: torch.Tensor | float | None) -> float:
    if x is None:
        return 0.0
    return float(x.detach().float()) if isinstance(x, torch.Tensor) else float(x)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A run directory (holding ``ckpt/``) or a ``ckpt`` directory -> the ``ckpt`` directory."""
    path = Path(path).expanduser()
    if (path / CKPT_DIR).is_dir():
        return path / CKPT_DIR
    if path.is_dir():
        return path
    raise FileNotFoundError(f"{path}: no such checkpoint directory (a lisa-train run directory)")


def read_latest_tag(ckpt_dir: Path) -> str:
    """The tag in ``ckpt_dir/latest`` (DeepSpeed's pointer to the newest checkpoint)."""
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(
            f"{ckpt_dir}: no 'latest' file; expected a lisa-train checkpoint directory "
            "(run.output_dir or run.output_dir/ckpt)"
        )
    return pointer.read_text().strip()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "deepspeed", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def run_record(
    cfg: TrainConfig, report: SetupReport, model: LisaModel, precision: str, world: int
) -> dict[str, Any]:
    """The ``run.json`` content: enough to rebuild the training-time model (``lisa-export``)."""
    lora = None
    if cfg.train.lora:
        lora = {
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout,
            "target_modules": list(cfg.lora.target_modules),
            "target_regex": report.lora_target_regex,
            "modules": report.lora_modules,
        }
    return {
        "format": RUN_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "precision": precision,
        "world_size": world,
        "source": report.source,
        "source_kind": report.source_kind,
        "vision_tower": model.load_report.vision_tower,
        "tokenizer": {
            "added_tokens": model.tokenizer.added_tokens,
            "added_now": report.added_tokens,
            "seg_token_id": model.seg_token_id,
            "vocab_size": report.vocab_size,
        },
        "initialised": report.initialised,
        "lora": lora,
        "trainable": {
            "params": report.trainable_params,
            "total": report.total_params,
            "names": report.trainable_names,
        },
        "versions": _versions(),
    }


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run directory, checked for its format."""
    path = Path(run_dir) / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; expected a lisa-train run directory") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise ValueError(f"{path}: not a lisa-train run record (expected format {RUN_FORMAT})")
    return record


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Builds the model, data and DeepSpeed engine of a run; :meth:`fit` trains it.

    Args:
        cfg: the run configuration.
        resume: ``None`` for a fresh run (``run.output_dir`` must not hold checkpoints), or a run
            or checkpoint directory to continue from the checkpoint its ``ckpt/latest`` file
            names (step, optimizer, scheduler, RNG and data position restored).
        check_data: check every dataset entry first (:mod:`training.data.check`), in every
            process, before the process group, the model and DeepSpeed start.
    """

    def __init__(
        self, cfg: TrainConfig, resume: str | Path | None = None, check_data: bool = True
    ) -> None:
        import deepspeed

        from training.data.bad_samples import SkipBadSamples
        from training.data.check import check_training_data
        from training.data.mixture import build_dataset, build_val_dataset

        self.cfg = cfg = with_absolute_paths(cfg)
        self.data_check = None
        if check_data:  # a broken file fails here, before anything starts
            self.data_check = check_training_data(cfg.data, cfg.val.dataset, cfg.val_dataset_dir)
            log.info("%s", self.data_check.summary())
        self.ctx = init_distributed()
        self.out_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = self.out_dir / CKPT_DIR
        device = self.ctx.device
        self.precision = cfg.run.resolved_precision(device)
        if resume is None and (self.ckpt_dir / "latest").exists():
            raise FileExistsError(
                f"{self.out_dir}: holds checkpoints of an earlier run; pass --resume to continue "
                "it, or choose another run.output_dir"
            )
        # Data: the training mixture sized for all processes, and the validation set (built
        # first, so that a missing file fails before a large model loads).
        o = cfg.optim
        samples = o.micro_batch_size * o.grad_accumulation_steps * o.steps_per_epoch
        self.train_data = SkipBadSamples(
            build_dataset(
                dataclasses.replace(cfg.data, samples_per_epoch=samples * self.ctx.world_size)
            ),
            cfg.data.max_bad_samples,
        )
        self.bad_samples = 0
        self.last_bad_sample: str | None = None
        self.val_data = (
            build_val_dataset(cfg.val_dataset_dir, cfg.val.dataset) if cfg.val.dataset else None
        )

        # Dropout (LoRA) draws from the global RNG: seeded per rank; the model's new weights are
        # drawn from generators seeded by run.seed alone, so every rank builds the same model.
        torch.manual_seed(cfg.run.seed + self.ctx.rank)

        # Model: tokens, new parts, LoRA, trainable sets.
        self.model, self.report = prepare_model_for_training(cfg, device=device)

        # DeepSpeed engine around a torch AdamW (no DeepSpeed C++ optimizer to build).
        self.ds_config = deepspeed_config(cfg, self.precision)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
            fused=device.type == "cuda",
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, model_parameters=params, optimizer=optimizer, config=self.ds_config
        )

        # Collation with the model's tokenizer and image geometry.
        collate = {
            "tokenizer": self.model.tokenizer,
            "template": cfg.model.conv_template,
            "model_max_length": cfg.model.model_max_length,
            "use_im_start_end": cfg.model.use_im_start_end,
            "num_image_tokens": self.model.num_image_tokens,
            "sam_image_size": self.model.sam_image_size,
        }
        self.collator = Collator(**collate, truncate=True, inference=False)
        self.val_collator = Collator(**collate, truncate=False, inference=True)

        self.global_step = 0
        self.last_lr = 0.0
        self.best_giou: float | None = None
        if resume is not None:
            self._resume(Path(resume))
        if self.ctx.is_main:  # on resume: the config as continued (model sections unchanged)
            self._write_run_files()
        self._writer: Any = None

    # ------------------------------------------------------------------ run files
    def _write_run_files(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = run_record(self.cfg, self.report, self.model, self.precision, self.ctx.world_size)
        (self.out_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (self.out_dir / DS_CONFIG_FILE).write_text(json.dumps(self.ds_config, indent=2) + "\n")

    def _log_json(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            with (self.out_dir / METRICS_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if not self.ctx.is_main:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                str(self.out_dir / "tensorboard"), purge_step=self.global_step or None
            )
        for name, value in values.items():
            self._writer.add_scalar(f"{prefix}/{name}", value, step)

    # ------------------------------------------------------------------ data
    def train_batches(self, epoch: int, skip_steps: int = 0) -> Iterator[Batch]:
        """This process's batches of ``epoch``, after the first ``skip_steps`` optimizer steps.

        Every process gets a disjoint ``1 / world_size`` share of the epoch's sample indices
        (``DistributedSampler``, shuffled with ``run.seed`` and the epoch); skipped batches are
        never read (resume).
        """
        from torch.utils.data import DataLoader, DistributedSampler

        o = self.cfg.optim
        self.train_data.set_epoch(epoch)
        sampler = DistributedSampler(
            self.train_data,
            num_replicas=self.ctx.world_size,
            rank=self.ctx.rank,
            shuffle=True,
            seed=self.cfg.run.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip_steps * o.grad_accumulation_steps * o.micro_batch_size :]
        loader = DataLoader(
            self.train_data,
            batch_size=o.micro_batch_size,
            sampler=indices,
            collate_fn=self.collator,
            num_workers=self.cfg.run.num_workers,
            pin_memory=self.ctx.device.type == "cuda",
            drop_last=True,
        )
        return iter(loader)

    def val_batches(self) -> Iterable[Batch]:
        """This process's share of the validation set, one image per batch (as the original)."""
        from torch.utils.data import DataLoader, DistributedSampler

        if self.val_data is None:
            return []
        sampler = DistributedSampler(
            self.val_data,
            num_replicas=self.ctx.world_size,
            rank=self.ctx.rank,
            shuffle=False,
            drop_last=False,
        )
        return DataLoader(
            self.val_data,
            batch_size=1,
            sampler=sampler,
            collate_fn=self.val_collator,
            num_workers=self.cfg.run.num_workers,
        )

    # ------------------------------------------------------------------ steps
    def train_step(self, batches: Iterator[Batch]) -> torch.Tensor:
        """One optimizer step: ``grad_accumulation_steps`` micro-batches through the engine.

        Returns ``(4,)`` float64: loss, CE, BCE, Dice averaged over the micro-batches.
        """
        self.last_lr = float(self.engine.optimizer.param_groups[0]["lr"])  # this step's rate
        sums = torch.zeros(4, dtype=torch.float64)
        n = self.cfg.optim.grad_accumulation_steps
        for _ in range(n):
            batch = self._next_batch(batches).to(self.ctx.device, non_blocking=True)
            out = self.engine(**model_inputs(batch))
            self.engine.backward(out.loss)
            self.engine.step()  # DeepSpeed updates the weights only on the last micro-batch
            parts = (out.loss, out.ce_loss, out.mask_bce_loss, out.mask_dice_loss)
            sums += torch.tensor([_loss_value(p) for p in parts], dtype=torch.float64)
        return sums / n

    def _next_batch(self, batches: Iterator[Batch]) -> Batch:
        """The next batch, its skipped bad samples counted against ``data.max_bad_samples``."""
        from training.data.bad_samples import BadSampleLimitError, limit_message, worker_message

        try:
            batch = next(batches)
        except BadSampleLimitError as exc:  # from a worker: its traceback is in the message
            raise BadSampleLimitError(worker_message(exc)) from None
        for message in batch.skipped:
            self.bad_samples += 1
            self.last_bad_sample = message
            log.warning("skipped a bad sample (%d so far): %s", self.bad_samples, message)
        limit = self.cfg.data.max_bad_samples
        if self.bad_samples > limit:
            raise BadSampleLimitError(
                limit_message(self.bad_samples, limit, str(self.last_bad_sample))
            )
        return batch

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size == 1:
            return values
        device = self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")
        total = values.to(device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.cpu() / self.ctx.world_size

    def run_validation(self) -> ValRecord:
        """Validate the current weights on all processes; log and return the scores."""
        metrics = validate(
            self.engine.module,
            self.val_batches(),
            self.ctx.device,
            progress=self.cfg.run.progress and self.ctx.is_main,
        )
        record = ValRecord(
            step=self.global_step,
            giou=metrics.giou,
            ciou=metrics.ciou,
            num_masks=metrics.num_masks,
            num_samples=metrics.num_samples,
        )
        self._scalars("val", {"giou": record.giou, "ciou": record.ciou}, self.global_step)
        self._log_json({"kind": "val", **dataclasses.asdict(record)})
        return record

    # ------------------------------------------------------------------ checkpoints
    def save(self, tag: str) -> Path:
        """Save a DeepSpeed checkpoint ``ckpt/<tag>`` (all processes must call it).

        Holds the trainable parameters (frozen ones are rebuilt from the source), the optimizer
        and scheduler states, the step, the best gIoU and every process's RNG state. Saving
        ``last`` also points DeepSpeed's ``ckpt/latest`` file at it.
        """
        client = {
            "format": RUN_FORMAT,
            "global_step": self.global_step,
            "best_giou": self.best_giou,
            "world_size": self.ctx.world_size,
            "bad_samples": self.bad_samples,
        }
        self.engine.save_checkpoint(
            str(self.ckpt_dir),
            tag=tag,
            client_state=client,
            save_latest=tag == TAG_LATEST,
            exclude_frozen_parameters=True,
        )
        tag_dir = self.ckpt_dir / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        rng = {"torch": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        torch.save(rng, tag_dir / f"rng_state_rank{self.ctx.rank}.pt")
        dist.barrier()
        return tag_dir

    def _resume(self, path: Path) -> None:
        ckpt_dir = resolve_checkpoint_dir(path)
        tag = read_latest_tag(ckpt_dir)
        if ckpt_dir.parent.resolve() != self.out_dir.resolve():
            raise ValueError(
                f"{ckpt_dir}: belongs to the run {ckpt_dir.parent}, but run.output_dir is "
                f"{self.out_dir}; a resumed run goes on in its own directory "
                f"(set run.output_dir={ckpt_dir.parent} or resume without --config)"
            )
        record = read_run_record(ckpt_dir.parent)
        saved, now = record["config"], self.cfg.to_dict()
        differ = [
            f"{s}.{k}"
            for s in MODEL_SECTIONS
            for k in set(saved.get(s, {})) | set(now[s])
            if saved.get(s, {}).get(k) != now[s].get(k)
        ]
        if differ:
            raise ValueError(
                f"{ckpt_dir}: cannot resume: the config differs from the run's in "
                f"{sorted(differ)} (these keys define the model's parameters)"
            )
        check_checkpoint_files(ckpt_dir / tag)  # no code from the files runs (names a bad one)
        with weights_only_loads():
            load_path, client = self.engine.load_checkpoint(
                str(ckpt_dir),
                tag=tag,
                load_module_strict=False,  # frozen parameters are not in the checkpoint
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        if load_path is None or not client:
            raise FileNotFoundError(f"{ckpt_dir / tag}: DeepSpeed found no checkpoint to load")
        if client.get("world_size") != self.ctx.world_size:
            raise ValueError(
                f"{ckpt_dir / tag}: saved by {client.get('world_size')} processes; resume it "
                f"with the same number (now {self.ctx.world_size})"
            )
        self.global_step = int(client["global_step"])
        self.best_giou = client.get("best_giou")
        self.bad_samples = int(client.get("bad_samples") or 0)
        rng_file = ckpt_dir / tag / f"rng_state_rank{self.ctx.rank}.pt"
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.ctx.device)
        log.info("resumed %s at step %d", ckpt_dir / tag, self.global_step)

    # ------------------------------------------------------------------ the loop
    def fit(self, max_steps: int | None = None) -> TrainResult:
        """Train until ``optim.epochs x optim.steps_per_epoch`` steps (or ``max_steps``, which
        stops early without changing the schedule).

        Validates every ``val_interval`` steps and at the end (saving ``best`` when gIoU
        improves); saves ``last`` every ``save_interval`` steps, at the end and where
        ``max_steps`` stops.
        """
        from tqdm import tqdm

        cfg, o = self.cfg, self.cfg.optim
        total = o.total_steps
        stop = total if max_steps is None else min(total, max_steps)
        result = TrainResult(self.out_dir, self.global_step, best_giou=self.best_giou)
        bar = tqdm(
            total=total,
            initial=self.global_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (cfg.run.progress and self.ctx.is_main),
        )
        start = time.perf_counter()
        pending = torch.zeros(4, dtype=torch.float64)  # loss sums since the last log
        pending_steps, pending_seconds = 0, 0.0
        self.engine.train()
        while self.global_step < stop:
            epoch, done_in_epoch = divmod(self.global_step, o.steps_per_epoch)
            batches = self.train_batches(epoch, skip_steps=done_in_epoch)
            for _ in range(done_in_epoch, o.steps_per_epoch):
                if self.global_step >= stop:
                    break
                # Forward, backward and (at the accumulation boundary) the optimizer step.
                step_start = time.perf_counter()
                pending += self.train_step(batches)
                pending_seconds += time.perf_counter() - step_start
                pending_steps += 1
                self.global_step += 1
                bar.update(1)
                last = self.global_step == total

                # Log the losses averaged over the steps since the last log and all processes.
                if self.global_step % cfg.run.log_interval == 0 or last:
                    values = self._mean_over_ranks(pending / pending_steps)
                    seconds = pending_seconds / pending_steps
                    pending.zero_()
                    pending_steps, pending_seconds = 0, 0.0
                    record = StepRecord(
                        step=self.global_step,
                        epoch=epoch,
                        loss=float(values[0]),
                        ce_loss=float(values[1]),
                        mask_bce_loss=float(values[2]),
                        mask_dice_loss=float(values[3]),
                        lr=self.last_lr,
                        seconds=seconds,
                        bad_samples=self.bad_samples,
                    )
                    result.steps.append(record)
                    self._log_json({"kind": "train", **dataclasses.asdict(record)})
                    self._scalars(
                        "train",
                        {
                            "loss": record.loss,
                            "ce_loss": record.ce_loss,
                            "mask_bce_loss": record.mask_bce_loss,
                            "mask_dice_loss": record.mask_dice_loss,
                            "lr": record.lr,
                        },
                        self.global_step,
                    )
                    bar.set_postfix(
                        loss=f"{record.loss:.3f}",
                        ce=f"{record.ce_loss:.3f}",
                        bce=f"{record.mask_bce_loss:.3f}",
                        dice=f"{record.mask_dice_loss:.3f}",
                        lr=f"{record.lr:.2e}",
                    )

                # Validate; keep the best weights by gIoU.
                interval = cfg.val_interval
                if interval is not None and (self.global_step % interval == 0 or last):
                    val = self.run_validation()
                    result.validations.append(val)
                    if self.ctx.is_main:
                        bar.write(
                            f"step {self.global_step}: gIoU {val.giou:.4f} cIoU {val.ciou:.4f}"
                        )
                    if self.best_giou is None or val.giou > self.best_giou:
                        self.best_giou = val.giou
                        self.save(TAG_BEST)

                # Checkpoint to resume from (also where max_steps stops the run).
                if self.global_step % cfg.save_interval == 0 or last or self.global_step == stop:
                    self.save(TAG_LATEST)
        bar.close()
        if self._writer is not None:
            self._writer.flush()
        result.global_step = self.global_step
        result.best_giou = self.best_giou
        result.bad_samples = self.bad_samples
        result.last_bad_sample = self.last_bad_sample
        result.seconds = time.perf_counter() - start
        return result

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def config_of_run(run_dir: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The configuration a run was started with (from its ``run.json``), plus overrides."""
    from training.config import apply_overrides

    record = read_run_record(run_dir)
    data = apply_overrides(record["config"], list(overrides or []))
    return config_from_dict(data, where=str(Path(run_dir) / RUN_FILE))


def seconds_per_step(result: TrainResult) -> float:
    """Mean wall time of the logged steps (NaN when none was logged)."""
    times = [s.seconds for s in result.steps]
    return sum(times) / len(times) if times else math.nan
