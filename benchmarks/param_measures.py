"""What `param_efficiency.py` measures on a trained model: normalised open-loop errors, loopwm's error sources
(reconstruction floor, latent drift) and its parameter counts."""

from __future__ import annotations

from typing import Any

import torch


def normalised_errors(pred: torch.Tensor, true: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """[H, B] squared error divided by the per-dimension variance, averaged over dimensions (prediction_errors')."""
    return ((pred - true).pow(2) / var.clamp_min(1e-8)).flatten(2).mean(-1)


def horizon_means(err: torch.Tensor, horizons: tuple[int, ...]) -> dict[str, float]:
    return {str(h): float(err[h - 1].mean()) for h in horizons if h <= err.shape[0]}


@torch.no_grad()
def loopwm_diagnostics(
    wm: Any, batch: dict[str, torch.Tensor], var: torch.Tensor, horizons: tuple[int, ...]
) -> dict[str, Any]:
    """Where a loopwm error comes from: the decoder's floor on true latents, and the latent's own drift.

    - `recon_floor`: decode(encode(o)) against o over every held-out observation, i.e. the 1-step error if the
      loop predicted the encoder's latent exactly;
    - `latent_error`: ‖ẑ_h − E(o_h)‖² over the variance of E(o) across the batch, at each horizon (0 = perfect,
      1 = no better than the mean latent);
    - `delta_floor` (delta decoder only): o_k + D(E(o_k), E(o_{k+1})) against o_{k+1}, the 1-step error with
      the latent transition predicted exactly.
    """
    wm.eval()
    obs, actions = batch["obs"].float(), batch["actions"].float()
    target = wm.encode(obs)  # [H+1, B, Z]
    recon = wm.decode(target)
    out = wm.imagine(target[0], actions, decode="none")
    latent_err = (out.latents[1:] - target[1:]).pow(2).mean(-1) / target.var(1).mean(-1)[1:, None]
    result = {
        "recon_floor": float(normalised_errors(recon, obs, var).mean()),
        "latent_error": horizon_means(latent_err, horizons),
    }
    if wm.delta_decoder is not None:
        nxt = wm.denormalize_obs(wm.normalize_obs(obs[:-1]) + wm.decode_delta(target[:-1], target[1:]))
        result["delta_floor"] = float(normalised_errors(nxt, obs[1:], var).mean())
    return result


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def idle_parameters(wm: Any) -> int:
    """Parameters of the dynamics blocks that a step from h = 0 does not reach (zero gradient, fixed seed): in an
    unshared stack, the first block's maps on the zero start state; in a shared loop, none."""
    g = torch.Generator().manual_seed(0)
    z = wm.encode(torch.randn(16, *wm.spec.obs_shape, generator=g))
    actions = torch.rand(16, wm.action_dim, generator=g) * 2 - 1
    wm.zero_grad(set_to_none=True)
    wm.step(z.detach(), actions)[0].square().sum().backward()
    blocks = wm.core.blocks() if hasattr(wm.core, "blocks") else [wm.core]
    idle = sum(p.numel() for b in blocks for p in b.parameters() if p.grad is None or not bool(p.grad.any()))
    wm.zero_grad(set_to_none=True)
    return idle
