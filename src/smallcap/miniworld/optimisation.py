"""The optimisation loop the world's two models share: AdamW, a cosine schedule with 5% warm-up, gradient
clipping at 1.0, one batch per step."""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup


class Schedule(Protocol):
    """What the loop reads from a recipe."""

    steps: int
    lr: float
    weight_decay: float


def optimise(model: torch.nn.Module, recipe: Schedule, batch_loss: Callable[[int], torch.Tensor], desc: str,
             progress: bool = True) -> torch.nn.Module:
    """Train `model` for `recipe.steps` steps on `batch_loss(step)` (the loss of that step's batch); returns it
    in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, recipe.steps // 20), recipe.steps)
    bar = tqdm(range(recipe.steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        loss = batch_loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()
