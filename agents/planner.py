"""Latent MPPI / CEM planning over a world model's imagined rollouts, TD-MPC2 style, and the planner registry.

One loop serves every method: sample action sequences from a distribution, score them
with one batched `imagine` call, keep the elites, refit the distribution. The methods
differ only in the elite weights (MPPI: softmax, CEM: uniform) and the action family
(Gaussian for Box spaces, a categorical per step for Discrete ones). A new planner is one
subclass plus one `@register_planner("name")` line; `build_planner` makes the one named by
`planner.method`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from loopwm.config import Config, ConfigError, PlannerConfig
from loopwm.exits import planner_loop_options
from loopwm.nets import argmax_groups, group_slices

LatentFn = Callable[[Tensor], Tensor]
PriorFn = Callable[[Tensor, torch.Generator], Tensor]
"""A policy prior: latents [B, Z] and the planner's generator to actions [B, A] drawn with that generator, so a
seeded planner repeats its plans. A prior of latents alone (`LatentFn`) is accepted too: it draws as it likes."""


def _with_generator(prior: Optional[Callable[..., Tensor]]) -> Optional[PriorFn]:
    """`prior` as a `PriorFn`: one that takes no generator is called with the latents alone."""
    if prior is None:
        return None
    plain_module = isinstance(prior, torch.nn.Module) and type(prior).__call__ is torch.nn.Module.__call__
    called = prior.forward if plain_module else prior  # a Module's __call__ takes anything: read its forward
    try:
        inspect.signature(called).bind(None, None)
    except TypeError:  # it takes the latents only
        return lambda z, generator: prior(z)
    except ValueError:  # no signature to read (a builtin): call it as documented
        pass
    return prior


Params = dict[str, Tensor]


def discounted_return(rewards: Tensor, continues: Tensor, discount: float, terminal: Optional[Tensor] = None) -> Tensor:
    """G = Σ_k γ^k (Π_{j<k} c_j) r_k + γ^H (Π_k c_k) V(z_H) over dim 0 of [H, B] tensors; differentiable."""
    horizon = rewards.shape[0]
    gamma = discount ** torch.arange(horizon + 1, device=rewards.device, dtype=rewards.dtype)
    alive = torch.cat([torch.ones_like(continues[:1]), continues.cumprod(0)])
    ret = (gamma[:horizon, None] * alive[:horizon] * rewards).sum(0)
    if terminal is not None:
        ret = ret + gamma[horizon] * alive[horizon] * terminal
    return ret


class GaussianSampler:
    """Box actions: an independent Gaussian per step and dimension, samples clamped to [-1, 1]."""

    def __init__(self, cfg: PlannerConfig, action_dim: int):
        self.cfg, self.action_dim = cfg, action_dim

    def init(self, n: int, horizon: int, device: torch.device) -> Params:
        """Uninformed start: zero mean, widest std."""
        mean = torch.zeros(n, horizon, self.action_dim, device=device)
        return {"mean": mean, "std": torch.full_like(mean, self.cfg.max_std)}

    def warm(self, prev: Params) -> Params:
        """Previous mean shifted one step (last step zero), std reset to max_std as in TD-MPC2."""
        mean = torch.cat([prev["mean"][:, 1:], torch.zeros_like(prev["mean"][:, :1])], 1)
        return {"mean": mean, "std": torch.full_like(mean, self.cfg.max_std)}

    def sample(self, params: Params, k: int, gen: torch.Generator) -> Tensor:
        """k sequences per env: [H, N, k, A]."""
        mean, std = params["mean"][:, None], params["std"][:, None]
        eps = torch.randn((mean.shape[0], k, *mean.shape[2:]), generator=gen, device=mean.device)
        return (mean + std * eps).clamp(-1, 1).permute(2, 0, 1, 3)

    def fit(self, elites: Tensor, weights: Tensor) -> Params:
        """Weighted mean and std of elites [H, N, E, A] under weights [N, E]."""
        w = weights[None, :, :, None]
        mean = (w * elites).sum(2)
        std = ((w * (elites - mean[:, :, None]) ** 2).sum(2)).sqrt()
        std = std.clamp(self.cfg.min_std, self.cfg.max_std)
        return {"mean": mean.transpose(0, 1), "std": std.transpose(0, 1)}

    def first(self, params: Params, eval_mode: bool, exploration: float, gen: torch.Generator) -> Tensor:
        """First action per env: the mean in eval, else a sample with extra Gaussian noise `exploration`."""
        mean, std = params["mean"][:, 0], params["std"][:, 0]
        if eval_mode:
            return mean
        std = (std**2 + exploration**2).sqrt()
        return (mean + std * torch.randn(mean.shape, generator=gen, device=mean.device)).clamp(-1, 1)

    def spread(self, params: Params) -> Tensor:
        """Mean std of the first action, per env."""
        return params["std"][:, 0].mean(-1)


class CategoricalSampler:
    """Categorical actions: per step, one categorical per one-hot group (Discrete has one, MultiDiscrete and
    MultiBinary several), probabilities floored at `min_prob`; samples are concatenated one-hots."""

    def __init__(self, cfg: PlannerConfig, groups: tuple[int, ...], min_prob: float):
        if not 0.0 <= min_prob * max(groups) < 1.0:
            raise ValueError(f"min_prob={min_prob} must be in [0, 1/{max(groups)}) for {max(groups)} actions")
        self.cfg, self.groups, self.min_prob = cfg, tuple(groups), min_prob
        self.action_dim = sum(self.groups)
        self.slices = group_slices(self.groups)
        self.sizes = torch.cat([torch.full((n,), float(n)) for n in self.groups])  # each entry's group size

    def init(self, n: int, horizon: int, device: torch.device) -> Params:
        """Uniform over each group's actions at every step."""
        return {"probs": (1.0 / self.sizes.to(device)).expand(n, horizon, self.action_dim).clone()}

    def warm(self, prev: Params) -> Params:
        """Previous probabilities shifted one step (last step uniform), then mixed half-way back to uniform.

        The mixing is the categorical analogue of resetting the Gaussian std: keep the preference,
        restore the spread.
        """
        uniform = 1.0 / self.sizes.to(prev["probs"].device)
        probs = torch.cat([prev["probs"][:, 1:], uniform.expand_as(prev["probs"][:, :1])], 1)
        return {"probs": 0.5 * probs + 0.5 * uniform}

    def _draw(self, probs: Tensor, k: int, gen: torch.Generator) -> Tensor:
        """k one-hot draws [M, k, A] from each row of concatenated group probabilities [M, A]."""
        hots = [
            F.one_hot(torch.multinomial(probs[:, sl], k, replacement=True, generator=gen), sl.stop - sl.start)
            for sl in self.slices
        ]
        return torch.cat(hots, -1).to(probs.dtype)

    def sample(self, params: Params, k: int, gen: torch.Generator) -> Tensor:
        """k one-hot sequences per env: [H, N, k, A]."""
        probs = params["probs"]
        draws = self._draw(probs.reshape(-1, self.action_dim), k, gen)
        return draws.view(*probs.shape[:2], k, self.action_dim).permute(1, 0, 2, 3)

    def fit(self, elites: Tensor, weights: Tensor) -> Params:
        """Weighted action counts of the elites, floored at min_prob (each group still summing to one)."""
        counts = (weights[None, :, :, None] * elites).sum(2).transpose(0, 1)
        return {"probs": self.min_prob + (1.0 - self.sizes.to(counts.device) * self.min_prob) * counts}

    def first(self, params: Params, eval_mode: bool, exploration: float, gen: torch.Generator) -> Tensor:
        """First action per env, one-hot per group: argmax in eval, else a sample mixed ε=`exploration` with uniform."""
        probs = params["probs"][:, 0]
        if eval_mode:
            return torch.cat([F.one_hot(probs[:, sl].argmax(-1), sl.stop - sl.start) for sl in self.slices], -1).to(
                probs.dtype
            )
        probs = (1.0 - exploration) * probs + exploration / self.sizes.to(probs.device)
        return self._draw(probs, 1, gen)[:, 0]

    def spread(self, params: Params) -> Tensor:
        """Entropy (nats) of the first-step categoricals, summed over groups, per env."""
        probs = params["probs"][:, 0]
        return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def _device_of(wm: Any) -> torch.device:
    try:
        return next(wm.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class Planner:
    """Plans in the world model's latent space; one `imagine` call per iteration over all samples and envs.

    Scores are G = Σ γ^k Πc r_k + γ^H Πc V(z_H) − λ Σ γ^k u_k with λ = cfg.uncertainty_penalty and u_k
    as `cfg.uncertainty` picks: the loop's certified distance to its fixed point ("bound"), 1 − converged
    ("unconverged"), or the error head's predicted error over a typical step's ("error",
    `WorldModel.predict_error(states, relative=True)`). Subclasses set the elite weights (`weights`). The
    mean/std (or probabilities) move to the refit with new = momentum · old + (1 − momentum) · fit.

    Imagined steps loop with the model's own options unless `cfg` sets loop options or a warm start
    (`PlannerConfig`); those need a `WorldModel` (its `cfg` and `imagine(h0=, chain=)`). A looped model
    computes each imagined step's certified bound only where the score charges it, the exit rule needs it or
    `certify=True` asks for it, and only then does `last_stats` report its mean ("bound") and the converged
    share ("converged"); the actions are the same either way. (Models without a loop always report them.)
    """

    def __init__(
        self,
        wm: Any,
        cfg: PlannerConfig,
        value: Optional[LatentFn] = None,
        prior: Optional[PriorFn] = None,
        *,
        discount: float = 0.99,
        exploration: float = 0.0,
        min_prob: float = 0.01,
        seed: Optional[int] = None,
        device: Optional[torch.device | str] = None,
        certify: bool = False,
    ):
        self.policy_samples = cfg.policy_samples if prior is not None else 0
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount={discount}: expected a value in [0, 1]")
        if cfg.uncertainty_penalty > 0 and cfg.uncertainty == "error" and not getattr(wm, "has_error_head", False):
            raise ValueError(
                "planner.uncertainty='error' penalises the error head's prediction, and this model has none: "
                "build it with model.error_head=true (train.w_error > 0), or set planner.uncertainty=bound"
            )
        if exploration < 0 or (wm.discrete and exploration > 1):
            raise ValueError(f"exploration={exploration}: expected a std >= 0 (Box) or a probability (Discrete)")
        self.wm, self.cfg, self.value, self.prior, self.discount = wm, cfg, value, _with_generator(prior), discount
        self.exploration = exploration
        groups = getattr(wm, "action_groups", None) or (wm.action_dim,)
        self.sampler = CategoricalSampler(cfg, groups, min_prob) if wm.discrete else GaussianSampler(cfg, wm.action_dim)
        self.device = torch.device(device) if device is not None else _device_of(wm)
        self.gen = torch.Generator(device=self.device)
        if seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(seed)
        self.warm, self.custom_loops = cfg.warm_start, bool(cfg.loop_overrides()) or cfg.warm_start != "none"
        self.looped, self.certify_always = hasattr(wm, "core"), certify
        if self.custom_loops and not self.looped:
            raise ValueError(f"planner loop options and warm_start={self.warm!r} need a looped WorldModel")
        self.loop_options = planner_loop_options(wm.cfg, cfg) if self.custom_loops else None
        self.prev: Optional[Params] = None
        self.prev_states: Optional[Tensor] = None  # the last decision's elite exit states [H, N, hidden]
        self.last_stats: dict[str, float] = {}

    def reset(self) -> None:
        """Forget the warm start (a new episode in every env)."""
        self.prev = self.prev_states = None

    def state_dict(self) -> dict[str, Any]:
        """The sampling RNG and the warm starts: what makes a resumed run plan exactly as it would have."""
        return {
            "gen": self.gen.get_state(),
            "prev": None if self.prev is None else dict(self.prev),
            "states": self.prev_states,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.prev = None if state["prev"] is None else {k: v.to(self.device) for k, v in state["prev"].items()}
        states = state.get("states")  # absent from checkpoints written before warm-started loops
        self.prev_states = None if states is None else states.to(self.device)

    @torch.no_grad()
    def model_action(
        self, obs: Any, *, eval_mode: bool = False, t0: bool | np.ndarray = False, batched: bool = False
    ) -> np.ndarray:
        """The planned action in model units for one observation (or a batch when `batched`): a Box action
        in [-1, 1], or concatenated one-hots for a categorical one (float32)."""
        x = torch.as_tensor(np.asarray(obs), device=self.device)
        if x.is_floating_point():
            x = x.float()
        action = self.plan(self.wm.encode(x if batched else x[None]), eval_mode=eval_mode, t0=t0)
        action = action.float().cpu().numpy()
        return action if batched else action[0]

    def act(
        self, obs: Any, *, eval_mode: bool = False, t0: bool | np.ndarray = False, batched: bool = False
    ) -> np.ndarray | int:
        """Planned action for one observation (or a batch): Box -> array in [-1, 1], Discrete -> int,
        MultiDiscrete/MultiBinary -> one index per group."""
        action = self.model_action(obs, eval_mode=eval_mode, t0=t0, batched=batched)
        if not self.wm.discrete:
            return action
        idx = argmax_groups(torch.as_tensor(action), self.sampler.groups).numpy()
        if len(self.sampler.groups) == 1:
            idx = idx[..., 0]
            return idx if batched else int(idx)
        return idx

    def start_distribution(self, n: int, t0: bool | np.ndarray | Tensor = False) -> Params:
        """The distribution planning starts from: the shifted previous plan, or uninformed where t0 is set."""
        init = self.sampler.init(n, self.cfg.horizon, self.device)
        if self.prev is None or next(iter(self.prev.values())).shape[0] != n:
            return init
        warm = self.sampler.warm(self.prev)
        reset = torch.as_tensor(t0, dtype=torch.bool, device=self.device).expand(n)[:, None, None]
        return {k: torch.where(reset, init[k], warm[k]) for k in init}

    def start_states(self, n: int, t0: bool | np.ndarray | Tensor = False) -> Optional[Tensor]:
        """warm_start="elite" or "time": the previous decision's elite states [H, N, hidden], shifted one step
        (the last repeated), zero where an episode starts; None before the first decision or for other starts."""
        if self.warm not in ("elite", "time") or self.prev_states is None or self.prev_states.shape[1] != n:
            return None
        states = torch.cat([self.prev_states[1:], self.prev_states[-1:]])
        reset = torch.as_tensor(t0, dtype=torch.bool, device=self.device).expand(n)[None, :, None]
        return states.masked_fill(reset, 0.0)

    def elite_states(self, states: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        """The elites' weighted mean exit states [H, N, hidden] from a rollout's states [H, N·S, hidden]."""
        per_env = states.view(states.shape[0], *idx.shape[:1], -1, states.shape[-1])
        picked = per_env.gather(2, idx[None, :, :, None].expand(states.shape[0], -1, -1, states.shape[-1]))
        return (weights[None, :, :, None] * picked).sum(2)

    def score(self, z: Tensor, actions: Tensor, h0: Optional[Tensor] = None) -> tuple[Tensor, Any]:
        """Score action sequences [H, B, A] from latents [B, Z], each step's loop started from `h0` [H, B, hidden]
        (zeros where None); returns (G [B], the ImagineOutput)."""
        out = self.imagine(z, actions, h0)
        terminal = self.value(out.latents[-1]) if self.value is not None else None
        ret = discounted_return(out.rewards, out.continues, self.discount, terminal)
        if self.cfg.uncertainty_penalty > 0:
            unc = self.step_uncertainty(out).to(ret.dtype)
            ret = ret - self.cfg.uncertainty_penalty * discounted_return(unc, torch.ones_like(unc), self.discount)
        return ret, out

    def imagine(self, z: Tensor, actions: Tensor, h0: Optional[Tensor] = None) -> Any:
        """The model's latent rollout of `actions` [H, B, A] from z, looped with the planner's loop options and
        warm start (the model's own options, from zero, where `cfg` sets none); a looped model certifies its
        steps where the score charges the bound or `certify` was asked for."""
        charged = self.cfg.uncertainty_penalty > 0 and self.cfg.uncertainty in ("bound", "unconverged")
        certify = {"certify": charged or self.certify_always} if self.looped else {}
        if not self.custom_loops:
            return self.wm.imagine(z, actions, decode="none", **certify)
        return self.wm.imagine(
            z, actions, decode="none", options=self.loop_options, h0=h0, chain=self.warm == "time", **certify
        )

    def step_uncertainty(self, out: Any) -> Tensor:
        """u_k [H, B] of a rollout, as `cfg.uncertainty` picks (see the class docstring)."""
        if self.cfg.uncertainty == "bound":
            return out.bound
        if self.cfg.uncertainty == "unconverged":
            return (~out.converged).float()
        return self.wm.predict_error(out.states, relative=True)

    def _prior_rollout(self, z: Tensor) -> Optional[Tensor]:
        """Roll the policy prior through the model from each env's latent: [H, N, P, A], or None. Its steps loop
        as the scored ones do (`imagine`); under warm_start="time" each starts from the previous one's exit state."""
        if self.policy_samples == 0:
            return None
        zk, actions, h = z.repeat_interleave(self.policy_samples, 0), [], None
        for k in range(self.cfg.horizon):
            a = self.prior(zk, self.gen) if self.wm.discrete else self.prior(zk, self.gen).clamp(-1, 1)
            actions.append(a)
            if k + 1 < self.cfg.horizon:
                out = self.imagine(zk, a[None], h)
                zk, h = out.latents[-1], out.states if self.warm == "time" else None
        return torch.stack(actions).view(self.cfg.horizon, z.shape[0], self.policy_samples, -1)

    def weights(self, elite_scores: Tensor) -> Tensor:
        """Elite weights [N, E] from their scores (sorted best first); each planner method defines its own."""
        raise NotImplementedError

    @torch.no_grad()
    def plan(self, z: Tensor, *, eval_mode: bool = False, t0: bool | np.ndarray | Tensor = False) -> Tensor:
        """First action for latents [Z] or [N, Z] -> [A] or [N, A] (one-hot for Discrete); fills `last_stats`."""
        single = z.dim() == 1
        z = z[None] if single else z
        cfg, n = self.cfg, z.shape[0]
        params = self.start_distribution(n, t0)
        prior_actions = self._prior_rollout(z)
        zs = z.repeat_interleave(cfg.samples, 0)
        loops = bound = converged = 0.0
        elite = self.start_states(n, t0)
        h0 = None
        for _ in range(cfg.iterations):
            actions = self.sampler.sample(params, cfg.samples - self.policy_samples, self.gen)
            if prior_actions is not None:
                actions = torch.cat([prior_actions, actions], 2)
            if elite is not None:
                h0 = elite.repeat_interleave(cfg.samples, 1)
            ret, out = self.score(zs, actions.flatten(1, 2), h0)
            lowest = torch.finfo(ret.dtype).min
            elite_scores, idx = ret.nan_to_num(nan=lowest, neginf=lowest).view(n, cfg.samples).topk(cfg.elites, 1)
            elites = actions.gather(2, idx[None, :, :, None].expand(cfg.horizon, -1, -1, actions.shape[-1]))
            weights = self.weights(elite_scores)
            fit = self.sampler.fit(elites, weights)
            params = {k: cfg.momentum * params[k] + (1 - cfg.momentum) * fit[k] for k in params}
            if self.warm == "iteration":
                h0 = out.states
            elif self.warm in ("elite", "time"):
                elite = self.elite_states(out.states, idx, weights)
            loops = loops + out.loops.float().mean()
            if out.bound is not None:
                bound = bound + out.bound.float().mean()
                converged = converged + out.converged.float().mean()
        self.prev, self.prev_states = params, elite
        action = self.sampler.first(params, eval_mode, self.exploration, self.gen)
        self.last_stats = {
            "return": (weights * elite_scores).sum(1).mean().item(),
            "elite_max": elite_scores[:, 0].mean().item(),
            "spread": self.sampler.spread(params).mean().item(),
            "loops": float(loops) / cfg.iterations,
        }
        if out.bound is not None:  # certified rollouts only (`certify`)
            self.last_stats.update(bound=float(bound) / cfg.iterations, converged=float(converged) / cfg.iterations)
        return action[0] if single else action


PLANNERS: dict[str, type[Planner]] = {}
"""Registered planners by `planner.method` name."""


def register_planner(name: str) -> Callable[[type[Planner]], type[Planner]]:
    """Class decorator: make a `Planner` subclass buildable as `planner.method: name`."""

    def add(cls: type[Planner]) -> type[Planner]:
        if name in PLANNERS and PLANNERS[name] is not cls:
            raise ValueError(f"a planner named {name!r} is already registered ({PLANNERS[name].__name__})")
        PLANNERS[name] = cls
        return cls

    return add


@register_planner("mppi")
class MPPIPlanner(Planner):
    """MPPI: elites weighted by softmax(temperature · (G − max G)); the temperature multiplies, as in TD-MPC2."""

    def weights(self, elite_scores: Tensor) -> Tensor:
        return torch.softmax(self.cfg.temperature * (elite_scores - elite_scores[:, :1]), dim=1)


@register_planner("cem")
class CEMPlanner(Planner):
    """The cross-entropy method: elites weighted uniformly."""

    def weights(self, elite_scores: Tensor) -> Tensor:
        return torch.full_like(elite_scores, 1.0 / elite_scores.shape[1])


def check_planner(cfg: PlannerConfig) -> None:
    """Refuse a `planner.method` that names no registered planner."""
    if cfg.method not in PLANNERS:
        raise ConfigError(f"planner.method={cfg.method!r}: expected one of {sorted(PLANNERS)}")


def build_planner(
    cfg: Config,
    wm: Any,
    value: Optional[LatentFn] = None,
    prior: Optional[PriorFn] = None,
    *,
    seed: Optional[int] = None,
    exploration: float = 0.0,
    **kwargs: Any,
) -> Planner:
    """The planner named by `cfg.planner.method`, planning with the agent's one discount."""
    check_planner(cfg.planner)
    return PLANNERS[cfg.planner.method](
        wm, cfg.planner, value, prior, discount=cfg.agent.discount, seed=seed, exploration=exploration, **kwargs
    )
