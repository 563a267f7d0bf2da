"""The multi-step looped training objective.

Over a horizon H the model rolls forward from z₀ = E(o₀) in latent space only and is scored, per
step and discounted by ρᵏ, on latent consistency against a stop-gradient encoder target,
observation reconstruction, reward and continue (and, with the delta decoder, on the observations it
decodes by adding each step's change to the previous decoded one). Loop counts are sampled per sequence (Poisson,
Huginn-style; or fixed at model.loops) with backprop through the last k loops; intermediate loop readouts get deep
supervision; the steps whose error is in the running top quantile get extra loops and their
deeper readout a loss; and the exit gate learns, from the real per-loop losses, whether one more
loop still helps (Ouro-style improvement targets). An error head on the loop state can learn, by regression on
the detached log error of each step's prediction (its decoded observation's, or its latent's), how wrong the model
expects to be (off by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from loopwm.config import ModelConfig, TrainConfig
from loopwm.exits import LoopOptions
from loopwm.loop_state import LoopTrace, StepContext
from loopwm.world_model import WorldModel

TERMS = (
    "consistency",
    "obs",
    "reward",
    "reward_encoded",
    "continue",
    "deep",
    "extra",
    "gate",
    "delta",
    "recon",
    "error",
)


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
    latent_spread: float = 0.0  # std of the encoder's target latents across the batch: near 0 means collapse


def term_weights(cfg: TrainConfig) -> dict[str, float]:
    """Each term's weight, read from `train.w_<term>`: TERMS is the one list of names."""
    return {name: getattr(cfg, f"w_{name}") for name in TERMS}


def consistency_loss(z_next: Tensor, target_z: Tensor) -> Tensor:
    """Per-sample squared distance of the predicted latent to the stop-gradient encoder target."""
    return (z_next - target_z).pow(2).mean(-1)


def obs_loss(wm: WorldModel, z_next: Tensor, target_obs: Tensor) -> Tensor:
    """Reconstruction error of the decoded next observation, in normalised units."""
    return (wm.decoder(z_next) - target_obs).pow(2).flatten(1).mean(-1).mean()


def recon_loss(wm: WorldModel, obs: Tensor) -> Tensor:
    """Autoencoder error decode(E(o)) against o over every observation of the sequence, gradients into the encoder."""
    return (wm.decoder(wm.encode(obs)) - wm.normalize_obs(obs)).pow(2).flatten(2).mean(-1).mean()


def delta_loss(wm: WorldModel, z: Tensor, z_next: Tensor, x: Tensor, target_obs: Tensor) -> tuple[Tensor, Tensor]:
    """The delta decoder's next observation x + Δ(z, z_next) (normalised units) and its squared error.

    `x` is the previous step's decoded observation (the true one at the start), so over the horizon the
    loss scores the same chained, open-loop decoding that imagination produces.
    """
    x_next = x + wm.decode_delta(z, z_next)
    return x_next, (x_next - target_obs).pow(2).flatten(1).mean(-1).mean()


def reward_weights(rewards: Tensor, balance: float) -> Optional[Tensor]:
    """Per-element weights that give the steps with a non-zero reward `balance` of the batch's reward loss.

    With rare rewards (Atari: a few per hundred steps) the plain mean is won by predicting 0 everywhere;
    balancing keeps the events' share of the gradient fixed. None (the plain mean) when off, or when the
    batch holds only one kind of step (every step rewarded, as in dense-reward control, or none).
    """
    if balance == 0:
        return None
    event = rewards != 0
    share = event.float().mean()
    if share == 0 or share == 1:
        return None
    return torch.where(event, balance / share, (1 - balance) / (1 - share))


def reward_loss(wm: WorldModel, z_next: Tensor, rewards: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    loss = wm.reward_head.loss(z_next, rewards)
    return (loss if weights is None else loss * weights).mean()


def continue_loss(wm: WorldModel, z_next: Tensor, terminated: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(wm.continue_head(z_next).squeeze(-1), 1.0 - terminated)


def per_loop_errors(trace: LoopTrace, target_z: Tensor) -> Tensor:
    """[T, B] consistency error of the latent read out after every loop (deep supervision's input)."""
    return torch.stack([consistency_loss(r, target_z) for r in trace.readouts])


def gate_loss(wm: WorldModel, trace: LoopTrace, per_loop: Tensor) -> Tensor:
    """BCE of the exit gate against whether the next loop still lowered the error (Ouro's stage II)."""
    probs = torch.stack(
        [wm.core.exit_probability(s.detach(), r) for s, r in zip(trace.states[1:-1], trace.step_norms[:-1])]
    )
    valid = torch.arange(1, per_loop.shape[0], device=probs.device)[:, None] < trace.loops_used
    bce = F.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), gate_targets(per_loop.detach()), reduction="none")
    return (bce * valid).sum() / valid.sum().clamp_min(1)


@torch.no_grad()
def step_obs_error(wm: WorldModel, z: Tensor, z_next: Tensor, obs: Tensor, target_obs: Tensor) -> Tensor:
    """Per-sample squared error (normalised units, mean over dimensions) of the observation one step decodes: the
    delta decoder's change added to the true previous observation `obs`, or the decoder's output. With the delta
    decoder the decoded observations carry no error from earlier steps, though the latents `z`, `z_next` of a
    rollout still do; the absolute decoder's error is the open-loop error of the step's latent."""
    if wm.delta_decoder is None:
        pred = wm.decoder(z_next)
    else:
        pred = wm.normalize_obs(obs) + wm.decode_delta(z, z_next)
    return (pred - target_obs).pow(2).flatten(1).mean(-1)


def error_loss(wm: WorldModel, h: Tensor, err: Tensor) -> Tensor:
    """Squared error of the error head's log prediction at exit state h against the detached log of `err`, the
    per-sample error of that state's readout (`train.error_target`); neither the loop nor the readout gets its
    gradient. Moves the head's offset towards the targets' running mean (`LoopCore.track_error`)."""
    target = torch.log(err.detach() + 1e-8)
    wm.core.track_error(target)
    return (wm.core.predicted_log_error(h.detach()) - target).pow(2).mean()


def deepen_hard(
    wm: WorldModel,
    ctx: StepContext,
    h: Tensor,
    z: Tensor,
    z_next: Tensor,
    err: Tensor,
    target_z: Tensor,
    cfg: TrainConfig,
    tracker: QuantileTracker,
) -> tuple[Tensor, Tensor, Tensor]:
    """Give the samples whose error is in the running top quantile `extra_loops` more loops (`z`: the step's start).

    Returns the latents with the hard ones replaced by their deeper readout, the deeper readouts'
    summed consistency error (the "extra" term, before dividing by the batch) and the hard mask.
    """
    hard = hard_mask(err.detach(), tracker.update(err))
    if not bool(hard.any()):
        return z_next, err.new_zeros(()), hard
    h_deep, _ = wm.core.run(ctx.select(hard), h[hard], LoopOptions(exit="fixed", loops=cfg.extra_loops))
    z_deep = wm.readout(h_deep, z[hard])
    z_next = z_next.clone()
    z_next[hard] = z_deep
    return z_next, consistency_loss(z_deep, target_z[hard]).sum(), hard


def sequence_loss(
    wm: WorldModel, batch: dict[str, Tensor], cfg: TrainConfig, generator: torch.Generator, tracker: QuantileTracker
) -> tuple[Tensor, dict[str, Tensor], StepStats]:
    """The weighted loss over one batch of sequences, its terms, and loop statistics."""
    obs, actions = batch["obs"], batch["actions"].float()
    rewards, terminated = batch["rewards"].float(), batch["terminated"].float()
    horizon, size = actions.shape[:2]
    weights = term_weights(cfg)
    # the reward head on the encoder's latent of the true next observation (gradients into the encoder, as
    # DreamerV3 trains its reward head on the posterior): the encoder learns what the reward depends on, and the
    # consistency target then asks the loop to predict it
    encoded = wm.encode(obs[1:]) if weights["reward_encoded"] > 0 else None
    with torch.no_grad():
        target_z = wm.encode(obs[1:]) if encoded is None else encoded.detach()
        target_obs = wm.normalize_obs(obs[1:])
        rows = target_z.flatten(0, -2)
        spread = rows.std(0).mean() if rows.shape[0] > 1 else rows.new_zeros(())
    balance = reward_weights(rewards, cfg.reward_balance)
    loops = wm.cfg.loops if cfg.loop_sampling == "fixed" else sample_loops(size, cfg.loop_mean, wm.cfg, generator)
    options = LoopOptions(exit="fixed", loops=loops, bptt=cfg.bptt_loops)
    want_readouts = weights["deep"] > 0 or weights["gate"] > 0
    deepen = cfg.extra_loops > 0 and weights["extra"] > 0
    latent_error = cfg.error_target == "latent"
    terms = {name: torch.zeros(()) for name in TERMS}
    stats = StepStats()
    hard_total = 0
    z = wm.encode(obs[0])
    x = wm.normalize_obs(obs[0])  # the delta decoder's chain starts from the true observation
    with wm.core.weight_scope():
        for k in range(horizon):
            w = cfg.rho**k
            inject_obs = None
            if cfg.obs_inject_prob > 0 and float(torch.rand((), generator=generator)) < cfg.obs_inject_prob:
                inject_obs = obs[k]
            ctx = wm.core.prepare(wm.injection(z, actions[k], inject_obs))
            h, trace = wm.core.run(
                ctx,
                options=options,
                keep_states=weights["gate"] > 0,
                readout=wm.readout_for(z) if want_readouts else None,
            )
            z_next = wm.readout(h, z)
            err = consistency_loss(z_next, target_z[k])
            if weights["error"] > 0:
                target = err if latent_error else step_obs_error(wm, z, z_next, obs[k], target_obs[k])
                terms["error"] = terms["error"] + w * error_loss(wm, h, target)
            used = trace.loops_used
            if deepen:
                z_next, extra, hard = deepen_hard(wm, ctx, h, z, z_next, err, target_z[k], cfg, tracker)
                terms["extra"] = terms["extra"] + w * extra / size
                hard_total += int(hard.sum())
                used = used + hard.long() * cfg.extra_loops
            terms["consistency"] = terms["consistency"] + w * err.mean()
            terms["obs"] = terms["obs"] + w * obs_loss(wm, z_next, target_obs[k])
            step_weights = None if balance is None else balance[k]
            terms["reward"] = terms["reward"] + w * reward_loss(wm, z_next, rewards[k], step_weights)
            if encoded is not None:
                terms["reward_encoded"] = terms["reward_encoded"] + w * reward_loss(
                    wm, encoded[k], rewards[k], step_weights
                )
            terms["continue"] = terms["continue"] + w * continue_loss(wm, z_next, terminated[k])
            if wm.delta_decoder is not None:
                x, chained = delta_loss(wm, z, z_next, x, target_obs[k])
                terms["delta"] = terms["delta"] + w * chained
            if want_readouts:
                per_loop = per_loop_errors(trace, target_z[k])
                terms["deep"] = terms["deep"] + w * per_loop.mean()
                if weights["gate"] > 0 and per_loop.shape[0] > 1:
                    terms["gate"] = terms["gate"] + w * gate_loss(wm, trace, per_loop)
            stats.loops.append(used)
            stats.bounds.append(trace.bound)
            z = z_next
    stats.hard_fraction = hard_total / (size * horizon)
    stats.latent_spread = float(spread)
    if weights["recon"] > 0:  # a per-step mean, scaled like the horizon-summed terms
        terms["recon"] = recon_loss(wm, obs) * horizon
    total = sum(weights[name] * terms[name] for name in TERMS) / horizon
    return total, {name: t.detach() / horizon for name, t in terms.items()}, stats
