"""The optimiser loop the demo model's warm-ups share, and the check of their schedules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch


class WarmupSchedule(Protocol):
    """What the loop reads of a warm-up's settings (``LanguageWarmup``, ``EncoderWarmup``,
    ``DecoderWarmup``)."""

    steps: int
    lr: float
    warmup_steps: int
    log_every: int


def check_schedule(cfg: WarmupSchedule) -> None:
    """The warm-ups' shared check of ``steps``, ``warmup_steps`` and ``lr``."""
    if cfg.steps < 0 or cfg.warmup_steps < 0 or cfg.lr <= 0:
        raise ValueError(
            f"{type(cfg).__name__}: need steps >= 0, warmup_steps >= 0, lr > 0; got {cfg.steps}, "
            f"{cfg.warmup_steps}, {cfg.lr}"
        )


def train_warmup(
    params: list[torch.nn.Parameter],
    cfg: WarmupSchedule,
    step_loss: Callable[[], torch.Tensor],
    desc: str,
    progress: bool,
) -> list[float]:
    """The warm-ups' shared loop: AdamW at ``cfg.lr`` (linear warm-up over ``cfg.warmup_steps``,
    then cosine to 0), gradients clipped at 1, ``cfg.steps`` steps of ``step_loss()``.

    Returns:
        the mean loss of every ``cfg.log_every`` steps.
    """
    from tqdm import tqdm

    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def rate(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return 0.5 * (1.0 + float(np.cos(np.pi * min(t, 1.0))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    history, window = [], []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress)
    for _ in bar:
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if len(window) == cfg.log_every:
            history.append(sum(window) / len(window))
            window = []
            bar.set_postfix(loss=f"{history[-1]:.3f}")
    return history
