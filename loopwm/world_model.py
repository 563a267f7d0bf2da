"""`WorldModel`: encoder, prelude, certified loop, coda and heads, with one method per verb.

Per environment step k the prelude forms e_k = RMSNorm(P([z_{k−1}; E(o_k) or 0; U(a_k)])), the
core loops h(t+1) = Ā⊙h(t) + B̄e + R̄(h(t), e), and the coda maps h(T) to the next latent z_k.
Heads decode observation, reward and continue from z_k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from loopwm.config import Config, ModelConfig
from loopwm.exits import EXIT_RULES, LoopOptions
from loopwm.loop import LoopCore
from loopwm.loop_state import LoopTrace
from loopwm.nets import (
    RewardHead,
    SpaceSpec,
    build_decoder,
    build_delta_decoder,
    build_encoder,
    frame_mask,
    mlp,
    one_hot_groups,
    optional,
    rms_normalize,
)
from loopwm.plain import PlainCore

Decode = Literal["final", "all", "none"]


@dataclass
class ImagineOutput:
    """A latent rollout: latents, predicted rewards/continues, per-step loop statistics, decoded obs."""

    latents: Tensor  # [H+1, B, Z], latents[0] is the start
    rewards: Tensor  # [H, B]
    continues: Tensor  # [H, B] probability the episode continues after step k
    bound: Optional[Tensor]  # [H, B] certified distance to the fixed point at exit; None when not certified
    converged: Optional[Tensor]  # [H, B] bool; None when not certified
    loops: Tensor  # [H, B] loops used
    obs: Optional[Tensor] = None  # [B, ...] ("final") or [H, B, ...] ("all")
    traces: Optional[list[LoopTrace]] = None
    states: Optional[Tensor] = None  # [H, B, hidden_dim] loop states at exit, to warm-start the next rollout


class WorldModel(nn.Module):
    """A looped latent world model for one pair of observation/action spaces."""

    def __init__(self, cfg: ModelConfig, spec: SpaceSpec):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        z, m = cfg.latent_dim, cfg.mlp_dim
        self.encoder = build_encoder(spec, cfg.encoder, m, z, cfg.cnn_channels)
        self.action_embed = nn.Linear(spec.action_dim, z)
        self.prelude = nn.Linear(3 * z, cfg.inject_dim)
        self.core = LoopCore(cfg) if cfg.dynamics == "loop" else PlainCore(cfg)  # PlainCore: no loop
        self.coda = mlp(cfg.hidden_dim, m, z)
        if cfg.latent_update == "residual":  # an untrained model predicts "no change" in latent space
            nn.init.zeros_(self.coda[-1].weight)
            nn.init.zeros_(self.coda[-1].bias)
        self.decoder = build_decoder(spec, z, m, cfg.cnn_channels)
        self.delta_decoder = build_delta_decoder(spec, z, m) if cfg.obs_decoder == "delta" else None
        self.reward_head = RewardHead(z, m, cfg.reward_head, cfg.reward_bins)
        self.continue_head = mlp(z, m, 1)
        frames = frame_mask(spec)  # frame pixels of a Dict observation: x/255 − 0.5, like pixel observations
        self.register_buffer("frames", frames, persistent=False)
        self.register_buffer("obs_mean", torch.where(frames, 127.5, 0.0))
        self.register_buffer("obs_std", torch.where(frames, 255.0, 1.0))

    @classmethod
    def from_config(cls, cfg: Config | ModelConfig, obs_space: Any, act_space: Any) -> "WorldModel":
        """Build from a config (whole or its `model` section) and Box/Discrete spaces."""
        model_cfg = cfg.model if isinstance(cfg, Config) else cfg
        return cls(model_cfg, SpaceSpec.from_spaces(obs_space, act_space))

    @property
    def device(self) -> torch.device:
        """Where the model's parameters and buffers live."""
        return self.obs_mean.device

    @property
    def discrete(self) -> bool:
        return self.spec.discrete

    @property
    def action_groups(self) -> tuple[int, ...]:
        """Sizes of the one-hot groups of a categorical action (one group for Discrete); () for Box."""
        return self.spec.action_groups

    @property
    def action_dim(self) -> int:
        return self.spec.action_dim

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    # ---- observations and actions ------------------------------------------------------
    def set_obs_stats(self, mean: Tensor, std: Tensor) -> None:
        """Per-dimension normalisation of vector observations, taken from the training data."""
        if self.spec.pixels:
            return
        mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        std = torch.as_tensor(std, dtype=torch.float32, device=self.device).clamp_min(1e-3)
        self.obs_mean.copy_(torch.where(self.frames, 127.5, mean))
        self.obs_std.copy_(torch.where(self.frames, 255.0, std))

    def normalize_obs(self, obs: Tensor) -> Tensor:
        """Check shape and finiteness, then map observations to the model's units."""
        obs = torch.as_tensor(obs, device=self.device)
        shape = tuple(self.spec.obs_shape)
        if obs.dim() < len(shape) or tuple(obs.shape[-len(shape) :]) != shape:
            raise ValueError(f"obs has shape {tuple(obs.shape)}; expected (..., {', '.join(map(str, shape))})")
        if self.spec.pixels:  # in place on the float copy: a replay batch of frames is tens of MB
            return obs.to(torch.float32, copy=True).div_(255.0).sub_(0.5)
        obs = obs.float()
        if not torch.isfinite(obs).all():
            raise ValueError("obs contains NaN or infinite values")
        return (obs - self.obs_mean) / self.obs_std

    def denormalize_obs(self, x: Tensor) -> Tensor:
        """Inverse of `normalize_obs` (pixels come back as floats in [0, 255])."""
        if self.spec.pixels:
            return ((x + 0.5) * 255.0).clamp(0, 255)
        return x * self.obs_std + self.obs_mean

    def action_input(self, action: Tensor, batch: tuple[int, ...]) -> Tensor:
        """Validate an action batch: Box actions normalised to [−1, 1]; categorical ones as integer indices
        (shape `batch` for one group, `batch + (groups,)` for several) or concatenated one-hots."""
        action = torch.as_tensor(action, device=self.device)
        n, groups = self.spec.action_dim, self.spec.action_groups
        index_shape = batch if len(groups) == 1 else (*batch, len(groups))
        if self.discrete and not action.is_floating_point() and tuple(action.shape) == index_shape:
            sizes = torch.as_tensor(groups, device=self.device)
            if bool((action < 0).any()) or bool((action.reshape(*batch, -1) >= sizes).any()):
                raise ValueError(f"categorical action indices must be integers in [0, n) for groups {list(groups)}")
            return one_hot_groups(action.unsqueeze(-1) if len(groups) == 1 else action, groups)
        if tuple(action.shape) != (*batch, n):
            raise ValueError(f"action has shape {tuple(action.shape)}; expected {(*batch, n)}")
        action = action.float()
        if not torch.isfinite(action).all():
            raise ValueError("action contains NaN or infinite values")
        return action if self.discrete else action.clamp(-1.0, 1.0)

    # ---- the verbs ---------------------------------------------------------------------
    def encode(self, obs: Tensor) -> Tensor:
        """Observations -> latents (LayerNorm-scaled, the space the loop predicts into)."""
        x = self.encoder(self.normalize_obs(obs))
        bad = ~torch.isfinite(x).all(-1)
        if bool(bad.any()):  # finite observations whose sums overflow float32 (e.g. 1e38) give NaN latents
            where = bad.nonzero()[0].tolist()
            if not all(torch.isfinite(p).all() for p in self.encoder.parameters()):
                raise ValueError("the encoder's parameters hold NaN or infinite values")
            row = where[0] if len(where) == 1 else tuple(where)
            raise ValueError(
                f"obs overflows the encoder: its features at row {row} are not finite in float32; "
                "rescale such observations"
            )
        return self._latent(x)

    def _latent(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],))

    def readout(self, h: Tensor, z_prev: Optional[Tensor] = None) -> Tensor:
        """Coda: a loop state -> a latent. Applied after every loop for intermediate predictions.

        With `model.latent_update="residual"` the coda's output is the change from `z_prev`, the latent
        the step started from, which must then be given.
        """
        out = self.coda(h)
        if self.cfg.latent_update == "residual":
            if z_prev is None:
                raise ValueError("model.latent_update='residual' reads out a change: pass z_prev, the step's start")
            out = z_prev + out
        return self._latent(out)

    def readout_for(self, z_prev: Tensor) -> Callable[[Tensor], Tensor]:
        """The readout of one step that started from `z_prev`, as a function of the loop state alone."""
        return lambda h: self.readout(h, z_prev)

    def injection(self, z: Tensor, action: Tensor, obs: Optional[Tensor] = None) -> Tensor:
        """e = RMSNorm(P([z; E(o) or 0; U(a)])), so ‖e‖ = √inject_dim whatever the inputs."""
        self._check_latent(z)
        return self._injection(z, self.action_input(action, z.shape[:1]), obs)

    def _check_latent(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[-1] != self.latent_dim:
            raise ValueError(f"z has shape {tuple(z.shape)}; expected (batch, {self.latent_dim})")
        if not torch.isfinite(z).all():
            raise ValueError("z contains NaN or infinite values")

    def _injection(self, z: Tensor, action: Tensor, obs: Optional[Tensor]) -> Tensor:
        """`injection` for a checked latent and an action already through `action_input`."""
        o = self.encode(obs) if obs is not None else None
        return rms_normalize(
            self.prelude(torch.cat([z, optional(o, z, self.latent_dim), self.action_embed(action)], -1))
        )

    def step(
        self,
        z: Tensor,
        action: Tensor,
        obs: Optional[Tensor] = None,
        *,
        h0: Optional[Tensor] = None,
        readouts: bool = False,
        options: Optional[LoopOptions] = None,
    ) -> tuple[Tensor, LoopTrace]:
        """One environment step through the loop: (z_{k−1}, a_k[, o_k]) -> z_k and its LoopTrace.

        `options` chooses the exit rule and loop limits (default: the model config's); `h0` is the state the
        loop starts from (zeros by default; the contraction reaches the same fixed point from any start). With
        `readouts=True` the trace holds the latent read out after every loop.
        """
        self._check_start(h0)
        return self._step(z, self.injection(z, action, obs), h0, options, readouts)

    def _check_start(self, h0: Optional[Tensor]) -> None:
        if h0 is not None and isinstance(h0, Tensor) and not torch.isfinite(h0).all():
            raise ValueError("h0 contains NaN or infinite values")

    def _step(
        self,
        z: Tensor,
        e: Tensor,
        h0: Optional[Tensor],
        options: Optional[LoopOptions],
        readouts: bool = False,
        certify: bool = True,
    ) -> tuple[Tensor, LoopTrace]:
        exit_rule = EXIT_RULES[(options.exit if options is not None else self.cfg.exit)]
        readout = self.readout_for(z) if readouts or exit_rule.needs_readout else None
        h, trace = self.core.run(self.core.prepare(e), h0, options, readout=readout, certify=certify)
        return self.readout(h, z), trace

    def predict_reward(self, z: Tensor) -> Tensor:
        return self.reward_head(z)

    def predict_continue(self, z: Tensor) -> Tensor:
        """Probability that the episode goes on after reaching latent z."""
        return torch.sigmoid(self.continue_head(z).squeeze(-1))

    @property
    def has_error_head(self) -> bool:
        """Whether the model predicts its own step errors (`model.error_head`), for `predict_error`."""
        return getattr(self.core, "error_head", None) is not None

    def predict_error(self, source: LoopTrace | Tensor, *, relative: bool = False) -> Tensor:
        """The error the model expects its step to have made, from the error head on the loop's exit state: per
        sample [B] of a `LoopTrace`, or per exit state [..., hidden] such as `ImagineOutput.states` [H, B]. It is
        a mean squared observation error in normalised units (`train.error_target=obs`) or the latent
        consistency error (`latent`); `relative` divides it by a running geometric mean of the recent errors
        the head was trained on (`error_offset`), so 1 is a typical step. A confidence signal: it ranks which
        predictions not to trust."""
        if not self.has_error_head:
            raise ValueError("this model has no error head: build it with model.error_head=true (train.w_error > 0)")
        log_error = self.core.predicted_log_error(source.final_state if isinstance(source, LoopTrace) else source)
        return (log_error - self.core.error_offset if relative else log_error).exp()

    def decode(self, z: Tensor) -> Tensor:
        """Latents -> observations in the environment's units (the absolute decoder, no anchor needed)."""
        return self.denormalize_obs(self.decoder(z))

    def decode_delta(self, z_prev: Tensor, z: Tensor) -> Tensor:
        """The normalised observation change o_k − o_{k−1} of the latent transition z_{k−1} -> z_k."""
        if self.delta_decoder is None:
            raise ValueError("decode_delta needs model.obs_decoder='delta'")
        return self.delta_decoder(torch.cat([z_prev, z], -1))

    def decode_rollout(self, latents: Tensor, obs: Optional[Tensor] = None) -> Tensor:
        """Observations [H, B, ...] of a latent rollout `latents` [H+1, B, Z] (latents[0] is the start).

        With the delta decoder each step adds its decoded change to the previous decoded observation,
        starting from `obs` (the observation latents[0] was encoded from) or, without it, from the absolute
        decoding of the start; otherwise every latent is decoded on its own and `obs` is not needed.
        """
        if self.delta_decoder is None:
            return torch.stack([self.decode(z_k) for z_k in latents[1:]])
        if obs is None:
            x = self.decoder(latents[0])
        else:
            x = self.normalize_obs(obs)
            if x.shape[:-1] != latents.shape[1:-1]:
                raise ValueError(f"obs has shape {tuple(obs.shape)}; expected a batch of {latents.shape[1]}")
        out = []
        for z_prev, z_k in zip(latents[:-1], latents[1:]):
            x = x + self.decode_delta(z_prev, z_k)
            out.append(x)
        return self.denormalize_obs(torch.stack(out))

    def imagine(
        self,
        z: Tensor,
        actions: Tensor,
        decode: Decode = "final",
        keep_traces: bool = False,
        options: Optional[LoopOptions] = None,
        obs: Optional[Tensor] = None,
        h0: Optional[Tensor] = None,
        chain: bool = False,
        certify: bool = True,
    ) -> ImagineOutput:
        """Roll out `actions` [H, B, A] from z in latent space only; decode observations only where asked.

        `obs`, the observation z was encoded from, anchors the delta decoder (`decode_rollout`). Each step's
        loop starts from `h0[k]` ([H, B, hidden_dim] warm states; zeros by default) or, with `chain`, from
        the previous step's exit state (step 0 from `h0[0]` or zeros); `options` sets how it exits.
        `certify=False` skips each step's certified bound where the exit rule does not need it (`bound` and
        `converged` are then None): a planner that does not read the bound pays only for the loops.
        Inputs are checked once here, not at every step.
        """
        if decode not in ("final", "all", "none"):
            raise ValueError(f"decode={decode!r}: expected 'final', 'all' or 'none'")
        actions = torch.as_tensor(actions, device=z.device)
        if actions.dim() < 2 or actions.shape[1] != z.shape[0]:
            raise ValueError(f"actions has shape {tuple(actions.shape)}; expected (horizon, {z.shape[0]}, ...)")
        if h0 is not None and (not isinstance(h0, Tensor) or tuple(h0.shape[:2]) != tuple(actions.shape[:2])):
            shape = tuple(h0.shape) if isinstance(h0, Tensor) else type(h0).__name__
            raise ValueError(f"h0 has shape {shape}; expected {(*actions.shape[:2], self.cfg.hidden_dim)}")
        self._check_latent(z)
        self._check_start(h0)
        inputs = self.action_input(actions, tuple(actions.shape[:2]))
        latents, traces = [z], []
        h = None if h0 is None else h0[0]
        with self.core.weight_scope():
            for k, a in enumerate(inputs):
                if k > 0:
                    h = traces[-1].final_state if chain else None if h0 is None else h0[k]
                z, trace = self._step(z, self._injection(z, a, None), h, options, certify=certify)
                latents.append(z)
                traces.append(trace)
        lat = torch.stack(latents)
        decoded = None
        if decode == "all":
            decoded = self.decode_rollout(lat, obs)
        elif decode == "final":
            decoded = self.decode(lat[-1]) if self.delta_decoder is None else self.decode_rollout(lat, obs)[-1]
        return ImagineOutput(
            latents=lat,
            rewards=self.predict_reward(lat[1:]),
            continues=self.predict_continue(lat[1:]),
            bound=None if traces[0].bound is None else torch.stack([t.bound for t in traces]),
            converged=None if traces[0].converged is None else torch.stack([t.converged for t in traces]),
            loops=torch.stack([t.loops_used for t in traces]),
            obs=decoded,
            traces=traces if keep_traces else None,
            states=torch.stack([t.final_state for t in traces]),
        )

    def certified_lipschitz(self) -> float:
        """κ = max Ā + Lip_h(R̄), computed from the parameters: < 1 unless in paper mode."""
        with torch.no_grad():
            return float(self.core.kappa())
