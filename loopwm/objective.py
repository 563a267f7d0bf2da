"""The multi-step looped training objective.

Over a horizon H the model rolls forward from z₀ = E(o₀) in latent space only and is scored, per
step and discounted by ρᵏ, on latent consistency against a stop-gradient encoder target,
observation reconstruction, reward and continue. Loop counts are sampled per sequence (Poisson,
Huginn-style) with backprop through the last k loops; intermediate loop readouts get deep
supervision; the steps whose error is in the running top quantile get extra loops and their
deeper readout a loss; and the exit gate learns, from the real per-loop losses, whether one more
loop still helps (Ouro-style improvement targets).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from loopwm.config import ModelConfig, TrainConfig
from loopwm.world_model import WorldModel

TERMS = ("consistency", "obs", "reward", "continue", "deep", "extra", "gate")


def sample_loops(batch: int, mean: float, model: ModelConfig, generator: torch.Generator) -> Tensor:
    """Per-sequence loop counts T = 1 + Poisson(mean − 1), clipped to [min_loops, max_loops]."""
    rate = torch.full((batch,), max(mean - 1.0, 0.0))
    loops = 1 + torch.poisson(rate, generator=generator).long()
    return loops.clamp(model.min_loops, model.max_loops)


def hard_mask(errors: Tensor, threshold: float) -> Tensor:
    """Which samples count as hard: error above the running top-quantile threshold."""
    return errors > threshold


def gate_targets(per_loop_loss: Tensor, margin: float = 1e-4) -> Tensor:
    """Target 1 ("stop") at loop t when loop t+1 does not lower the loss by more than `margin` (relative).

    `per_loop_loss` is [T, B]; the last loop has no successor and gets no target (returned [T−1, B]).
    """
    now, nxt = per_loop_loss[:-1], per_loop_loss[1:]
    return (nxt >= now * (1.0 - margin)).float()


@dataclass
class QuantileTracker:
    """An exponential moving average of a batch quantile of per-sample errors."""

    q: float
    decay: float = 0.9
    value: Optional[float] = None

    def update(self, errors: Tensor) -> float:
        batch_q = float(torch.quantile(errors.detach().float(), self.q))
        self.value = batch_q if self.value is None else self.decay * self.value + (1 - self.decay) * batch_q
        return self.value


@dataclass
class StepStats:
    """Per-update diagnostics besides the loss terms."""

    loops: list[Tensor] = field(default_factory=list)
    bounds: list[Tensor] = field(default_factory=list)
    hard_fraction: float = 0.0


def sequence_loss(wm: WorldModel, batch: dict[str, Tensor], cfg: TrainConfig, generator: torch.Generator,
                  tracker: QuantileTracker) -> tuple[Tensor, dict[str, Tensor], StepStats]:
    """The weighted loss over one batch of sequences, its terms, and loop statistics."""
    obs, actions = batch["obs"], batch["actions"].float()
    rewards, terminated = batch["rewards"].float(), batch["terminated"].float()
    horizon, size = actions.shape[:2]
    with torch.no_grad():
        target_z = wm.encode(obs[1:])
        target_obs = wm.normalize_obs(obs[1:])
    loops = sample_loops(size, cfg.loop_mean, wm.cfg, generator)
    want_readouts = cfg.w_deep > 0 or cfg.w_gate > 0
    terms = {name: torch.zeros(()) for name in TERMS}
    stats = StepStats()
    hard_total = 0
    z = wm.encode(obs[0])
    with wm.core.weight_scope():
        for k in range(horizon):
            w = cfg.rho ** k
            inject_obs = None
            if cfg.obs_inject_prob > 0 and float(torch.rand((), generator=generator)) < cfg.obs_inject_prob:
                inject_obs = obs[k]
            ctx = wm.core.prepare(wm.injection(z, actions[k], inject_obs))
            h, trace = wm.core.run(ctx, exit="fixed", loops=loops, bptt=cfg.bptt_loops, keep_states=cfg.w_gate > 0,
                                   readout=wm.readout if want_readouts else None)
            z_next = wm.readout(h)
            err = (z_next - target_z[k]).pow(2).mean(-1)
            used = trace.loops_used
            if cfg.extra_loops > 0 and cfg.w_extra > 0:
                hard = hard_mask(err.detach(), tracker.update(err))
                hard_total += int(hard.sum())
                if bool(hard.any()):
                    h_deep, _ = wm.core.run(ctx.select(hard), h[hard], exit="fixed", loops=cfg.extra_loops)
                    z_deep = wm.readout(h_deep)
                    terms["extra"] = terms["extra"] + w * (z_deep - target_z[k][hard]).pow(2).mean(-1).sum() / size
                    z_next = z_next.clone()
                    z_next[hard] = z_deep
                    used = used + hard.long() * cfg.extra_loops
            terms["consistency"] = terms["consistency"] + w * err.mean()
            terms["obs"] = terms["obs"] + w * (wm.decoder(z_next) - target_obs[k]).pow(2).flatten(1).mean(-1).mean()
            terms["reward"] = terms["reward"] + w * wm.reward_head.loss(z_next, rewards[k]).mean()
            terms["continue"] = terms["continue"] + w * F.binary_cross_entropy_with_logits(
                wm.continue_head(z_next).squeeze(-1), 1.0 - terminated[k])
            if want_readouts:
                per_loop = torch.stack([(r - target_z[k]).pow(2).mean(-1) for r in trace.readouts])
                terms["deep"] = terms["deep"] + w * per_loop.mean()
                if cfg.w_gate > 0 and per_loop.shape[0] > 1:
                    probs = torch.stack([wm.core.exit_probability(s.detach(), r)
                                         for s, r in zip(trace.states[1:-1], trace.residuals[:-1])])
                    valid = torch.arange(1, per_loop.shape[0], device=probs.device)[:, None] < trace.loops_used
                    targets = gate_targets(per_loop.detach())
                    bce = F.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), targets, reduction="none")
                    terms["gate"] = terms["gate"] + w * (bce * valid).sum() / valid.sum().clamp_min(1)
            stats.loops.append(used)
            stats.bounds.append(trace.bound)
            z = z_next
    stats.hard_fraction = hard_total / (size * horizon)
    weights = {"consistency": cfg.w_consistency, "obs": cfg.w_obs, "reward": cfg.w_reward,
               "continue": cfg.w_continue, "deep": cfg.w_deep, "extra": cfg.w_extra, "gate": cfg.w_gate}
    total = sum(weights[name] * terms[name] for name in TERMS) / horizon
    return total, {name: t.detach() / horizon for name, t in terms.items()}, stats
