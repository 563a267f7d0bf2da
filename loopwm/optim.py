"""Optimisers by name, learning-rate schedules, and optimiser checkpoints that survive Lookahead.

`torch_optimizer.Lookahead.state_dict()` does not round-trip on current torch, so the state of a
Lookahead is saved as its inner optimiser's state plus the slow weights and step counters.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch_optimizer
from torch import nn

from loopwm.config import ConfigError

_TORCH = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "radam": torch.optim.RAdam,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
_EXTRA = {
    "lamb": torch_optimizer.Lamb,
    "yogi": torch_optimizer.Yogi,
    "adabelief": torch_optimizer.AdaBelief,
    "diffgrad": torch_optimizer.DiffGrad,
}
OPTIMIZERS = sorted(_TORCH) + sorted(_EXTRA)


def build_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0, lookahead: bool = False
) -> torch.optim.Optimizer:
    """An optimiser from `torch.optim` or `torch_optimizer` by (case-insensitive) name, optionally in Lookahead."""
    key = name.lower()
    cls = _TORCH.get(key) or _EXTRA.get(key)
    if cls is None:
        raise ConfigError(f"train.optimizer={name!r}: expected one of {OPTIMIZERS}")
    opt = cls(params, lr=lr, weight_decay=weight_decay)
    return torch_optimizer.Lookahead(opt, k=5, alpha=0.5) if lookahead else opt


def inner(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimiser that owns the learning rate (the inner one of a Lookahead)."""
    return opt.optimizer if isinstance(opt, torch_optimizer.Lookahead) else opt


def build_schedule(opt: torch.optim.Optimizer, kind: str, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, cosine or linear decay over `total` updates."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(inner(opt), factor)


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpointable optimiser state; for Lookahead, inner state + slow weights + counters."""
    if not isinstance(opt, torch_optimizer.Lookahead):
        return {"kind": "plain", "state": opt.state_dict()}
    params = [p for group in opt.param_groups for p in group["params"]]
    slow = [opt.state[p]["slow_param"].clone() if "slow_param" in opt.state[p] else None for p in params]
    return {
        "kind": "lookahead",
        "inner": opt.optimizer.state_dict(),
        "slow": slow,
        "counters": [group["counter"] for group in opt.param_groups],
    }


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what `optimizer_state` saved, refusing a Lookahead/plain mismatch."""
    is_la = isinstance(opt, torch_optimizer.Lookahead)
    if state.get("kind") != ("lookahead" if is_la else "plain"):
        raise ValueError(
            f"optimizer state of kind {state.get('kind')!r} does not match "
            f"{'a Lookahead' if is_la else 'a plain'} optimizer (train.lookahead changed?)"
        )
    if not is_la:
        opt.load_state_dict(state["state"])
        return
    opt.optimizer.load_state_dict(state["inner"])
    # torch's load_state_dict replaces the inner optimiser's param_groups (and state) with new objects;
    # re-share them, as Lookahead.__init__ does, or the Lookahead keeps stale groups (lr, counters).
    opt.param_groups = opt.optimizer.param_groups
    opt.fast_state = opt.optimizer.state
    params = [p for group in opt.param_groups for p in group["params"]]
    for p, slow in zip(params, state["slow"]):
        if slow is not None:
            opt.state[p]["slow_param"] = slow.clone().to(p.device)
    for group, counter in zip(opt.param_groups, state["counters"]):
        group["counter"] = counter
