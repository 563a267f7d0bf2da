"""Model-facing probes: turn transition tensors into the latents, loop maps and traces the analyses consume.

Data convention: `obs[k]` is seen, `actions[k]` is taken, `obs[k + 1]` follows; shapes `[L+1, B, ...]` and
`[L, B, A]` (or `[L, B]` discrete indices), actions in the model's input units. A one-step prediction runs the
loop on `(encode(obs[k]), actions[k])` and is scored against `encode(obs[k + 1])` in latent space and against
`obs[k + 1]` in observation units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from loopwm.analysis.agreement import rms_distance
from loopwm.exits import LoopOptions
from loopwm.lipschitz import exact_spectral_norm
from loopwm.loop_state import StepContext
from loopwm.world_model import WorldModel


@dataclass
class Transitions:
    """A flat batch of one-step transitions and their ground-truth targets."""

    z: Tensor  # [N, Z] latent of the current observation
    action: Tensor  # [N, A]
    target: Tensor  # [N, Z] latent of the next observation
    next_obs: Tensor  # [N, ...] next observation, environment units
    prev_z: Tensor  # [N, Z] latent one step earlier (for warm starts)
    prev_action: Tensor  # [N, A]
    reward: Optional[Tensor] = None  # [N] reward of the transition, when given


@dataclass
class LoopRun:
    """One fixed-length loop run: states h(0..T) and the latent read out after each loop."""

    ctx: StepContext
    states: Tensor  # [T+1, N, H]
    readouts: Tensor  # [T, N, Z]


def check_sequences(obs: Tensor, actions: Tensor) -> None:
    """Validate the `[L+1, B, ...]` / `[L, B, A]` sequence convention with an error naming the shapes."""
    aligned = obs.dim() >= 3 and obs.shape[0] == actions.shape[0] + 1 and obs.shape[1] == actions.shape[1]
    if not aligned or actions.dim() not in (2, 3):
        raise ValueError(
            f"expected obs [L+1, B, ...] and actions [L, B, A]; got obs {tuple(obs.shape)} and "
            f"actions {tuple(actions.shape)}"
        )
    if actions.shape[0] < 2:
        raise ValueError(f"need sequences of at least 2 transitions, got L={actions.shape[0]}")


@torch.no_grad()
def transitions(
    wm: WorldModel, obs: Tensor, actions: Tensor, n: int, seed: int = 0, rewards: Optional[Tensor] = None
) -> Transitions:
    """A seeded sample of `n` transitions from steps k ≥ 1 of the sequences (so each has a previous step)."""
    check_sequences(obs, actions)
    device = wm.device
    obs, actions = torch.as_tensor(obs).to(device), torch.as_tensor(actions).to(device)
    L, B = actions.shape[:2]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm((L - 1) * B, generator=g)[:n].to(device)
    k, b = idx // B + 1, idx % B
    reward = torch.as_tensor(rewards).to(device)[k, b].float() if rewards is not None else None
    return Transitions(
        z=wm.encode(obs[k, b]),
        action=actions[k, b],
        target=wm.encode(obs[k + 1, b]),
        next_obs=obs[k + 1, b].float(),
        prev_z=wm.encode(obs[k - 1, b]),
        prev_action=actions[k - 1, b],
        reward=reward,
    )


def random_actions(wm: WorldModel, like: Tensor, steps: int, generator: torch.Generator) -> Tensor:
    """`steps` uniform random actions `[steps, B, ...]` in the format of `like`: indices, one-hot or Box in [−1, 1]."""
    batch = like.shape[1]
    if wm.discrete:
        idx = torch.randint(wm.action_dim, (steps, batch), generator=generator)
        out = idx if like.dim() == 2 else torch.nn.functional.one_hot(idx, wm.action_dim)
    else:
        out = torch.rand(steps, batch, wm.action_dim, generator=generator) * 2 - 1
    return out.to(like.device, like.dtype)


@torch.no_grad()
def context(wm: WorldModel, z: Tensor, action: Tensor) -> StepContext:
    """The loop context of one step (retention, drive, block context, weights, κ), predicting without an observation."""
    return wm.core.prepare(wm.injection(z, action))


def loop_map(wm: WorldModel, ctx: StepContext) -> Callable[[Tensor], Tensor]:
    """The loop map `h ↦ F(h, e)` of one step as a function of h alone, for Jacobian probes."""
    return lambda h: wm.core.loop_map(h, ctx)


@torch.no_grad()
def run_loops(wm: WorldModel, ctx: StepContext, z: Tensor, loops: int, h0: Optional[Tensor] = None) -> LoopRun:
    """Run exactly `loops` loops of the step from latents `z` (context `ctx`) from `h0` (zeros by default),
    keeping every state and readout latent (a residual latent update reads out a change from `z`)."""
    _, trace = wm.core.run(ctx, h0, LoopOptions(loops=loops), keep_states=True, readout=wm.readout_for(z))
    return LoopRun(ctx=ctx, states=torch.stack(trace.states), readouts=torch.stack(trace.readouts))


@torch.no_grad()
def final_state(wm: WorldModel, ctx: StepContext, h0: Tensor, loops: int) -> Tensor:
    """The state after `loops` loops from `h0`; with many loops, a far-converged h* (also in paper mode)."""
    _, trace = wm.core.run(ctx, h0, LoopOptions(loops=loops))
    return trace.final_state


@torch.no_grad()
def obs_errors(wm: WorldModel, latents: Tensor, next_obs: Tensor) -> Tensor:
    """RMS error of decoded latents `[..., Z]` against observations `[..., *obs_shape]`, in environment units."""
    lead = latents.shape[:-1]
    decoded = wm.decode(latents.reshape(-1, latents.shape[-1])).reshape(*lead, -1)
    obs_lead = next_obs.shape[: next_obs.dim() - len(wm.spec.obs_shape)]
    return rms_distance(decoded, next_obs.reshape(*obs_lead, -1).to(decoded.dtype))


@torch.no_grad()
def step_with(wm: WorldModel, tr: Transitions, options: LoopOptions) -> tuple[Tensor, Tensor]:
    """One prediction under the given loop options: per-sample latent error `[N]` and loops used `[N]`."""
    z1, trace = wm.step(tr.z, tr.action, options=options)
    return rms_distance(z1, tr.target), trace.loops_used


@torch.no_grad()
def certificate(wm: WorldModel) -> dict[str, Any]:
    """The parameter-side certificate: κ, max Ā, the block gain and every h-path layer's exact σ_max."""
    core = wm.core
    a_max = core.retention().max()
    sigmas = [exact_spectral_norm(lin.effective_weight()) for lin in core.block.linears()]
    scale = float(core.block_scale(a_max))
    product = float(torch.tensor(sigmas, dtype=torch.float64).prod())
    return {
        "kappa": wm.certified_lipschitz(),
        "max_retention": float(a_max),
        "block_scale": scale,
        "layer_sigma": sigmas,
        "kappa_exact_sigma": float(a_max) + scale * product,
        "constrained": bool(wm.cfg.constrain_block),
    }
