"""Planner behaviour on analytic world models whose optimal actions are known in closed form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from torch import Tensor

from loopwm.agents import PLANNERS
from loopwm.agents.planner import discounted_return
from loopwm.config import PlannerConfig

TARGET = torch.tensor([0.5, -0.3])


@dataclass
class Imagined:
    latents: Tensor
    rewards: Tensor
    continues: Tensor
    bound: Tensor
    converged: Tensor
    loops: Tensor
    states: Tensor
    obs: Optional[Tensor] = None


class Analytic:
    """A world model given by closed forms: z' = step(z, a), r = reward(z, a, z'), residual = residual(z, a),
    and the error it predicts for its step (relative to a typical step's) = error(z, a), kept as the exit state."""

    has_error_head = True

    def __init__(
        self,
        action_dim: int,
        latent_dim: int,
        step: Callable,
        reward: Callable,
        residual: Optional[Callable] = None,
        discrete: bool = False,
        error: Optional[Callable] = None,
    ):
        self.action_dim, self.latent_dim, self.discrete = action_dim, latent_dim, discrete
        self.step, self.reward = step, reward
        self.residual = residual or (lambda z, a: torch.zeros(z.shape[0]))
        self.error = error or (lambda z, a: torch.zeros(z.shape[0]))
        self.calls = 0

    def encode(self, obs: Tensor) -> Tensor:
        return obs.float()

    def imagine(self, z: Tensor, actions: Tensor, decode: str = "none") -> Imagined:
        assert decode == "none" and actions.shape[1] == z.shape[0]
        self.calls += 1
        latents, rewards, residuals, errors = [z], [], [], []
        for a in actions:
            nxt = self.step(z, a)
            rewards.append(self.reward(z, a, nxt))
            residuals.append(self.residual(z, a))
            errors.append(self.error(z, a))
            z = nxt
            latents.append(z)
        rewards, residual = torch.stack(rewards), torch.stack(residuals)
        converged = residual < 1e-3
        return Imagined(
            torch.stack(latents),
            rewards,
            torch.ones_like(rewards),
            residual,
            converged,
            torch.where(converged, 2, 16),
            torch.stack(errors).unsqueeze(-1),
        )

    def predict_error(self, states: Tensor, *, relative: bool = False) -> Tensor:
        assert relative  # the planner charges errors relative to a typical step's
        return states[..., 0]


def point_model() -> Analytic:
    """z' = z + a, r = -|z' - target|^2: from z the best first action is target - z, then zero."""
    return Analytic(2, 2, lambda z, a: z + a, lambda z, a, n: -((n - TARGET) ** 2).sum(-1))


def bandit(
    values: list[float], residuals: Optional[list[float]] = None, errors: Optional[list[float]] = None
) -> Analytic:
    """Discrete arms with fixed rewards, residuals and predicted errors; the latent records the last arm pulled
    (one-hot)."""
    vals, res, err = (torch.tensor(x or [0.0] * len(values)) for x in (values, residuals, errors))
    return Analytic(
        len(values),
        len(values),
        lambda z, a: a,
        lambda z, a, n: a @ vals,
        lambda z, a: a @ res,
        discrete=True,
        error=lambda z, a: a @ err,
    )


def cfg(**kw) -> PlannerConfig:
    base = dict(
        horizon=3,
        iterations=8,
        samples=256,
        elites=32,
        policy_samples=0,
        temperature=0.5,
        min_std=0.02,
        max_std=1.0,
        momentum=0.1,
    )
    return PlannerConfig(**{**base, **kw})


def make_planner(wm, c: PlannerConfig, **kw):
    """The registered planner that `c.method` names, at discount 0.95."""
    return PLANNERS[c.method](wm, c, discount=0.95, **kw)


@pytest.mark.parametrize("method", ["mppi", "cem"])
def test_finds_known_optimum(method):
    wm = point_model()
    planner = make_planner(wm, cfg(method=method), seed=0)
    action = planner.act(np.zeros(2, dtype=np.float32), eval_mode=True)
    assert isinstance(action, np.ndarray) and action.shape == (2,)
    np.testing.assert_allclose(action, TARGET.numpy(), atol=0.05)
    assert wm.calls == planner.cfg.iterations
    assert set(planner.last_stats) == {"return", "elite_max", "spread", "loops", "bound", "converged"}
    assert planner.last_stats["return"] > -0.1 and planner.last_stats["loops"] == 2.0


def test_batched_envs_plan_independently():
    wm = point_model()
    starts = np.array([[0.0, 0.0], [0.8, 0.2], [-0.2, -0.9]], dtype=np.float32)
    actions = make_planner(wm, cfg(), seed=0).act(starts, eval_mode=True, batched=True)
    assert actions.shape == (3, 2) and wm.calls == 8
    np.testing.assert_allclose(actions, TARGET.numpy() - starts, atol=0.1)


def test_training_actions_are_seeded_bounded_samples():
    def run(seed):
        return make_planner(point_model(), cfg(iterations=2), exploration=0.5, seed=seed).act(np.zeros(2))

    first, again, other = run(1), run(1), run(2)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert np.all(np.abs(first) <= 1.0)


@pytest.mark.parametrize("method", ["mppi", "cem"])
def test_discrete_picks_best_arm(method):
    planner = make_planner(bandit([0.1, 0.5, 0.9, 0.3]), cfg(method=method, samples=64, elites=8), seed=0)
    action = planner.act(np.zeros(4), eval_mode=True)
    assert isinstance(action, int) and action == 2
    assert planner.prev["probs"][0, :, 2].min() > 0.9
    assert planner.prev["probs"].min() >= 0.01 - 1e-6


def test_mppi_weights_favour_the_best_sequences():
    # With every sample an elite, one iteration and no momentum, the refit is the weighted sample itself:
    # it must put its mass on the best arm (0.9) and none on the worst (0.0), whose sequences are known.
    planner = make_planner(
        bandit([0.0, 0.5, 0.9, 0.3]),
        cfg(method="mppi", horizon=1, iterations=1, samples=64, elites=64, temperature=20.0, momentum=0.0),
        seed=0,
    )
    planner.plan(torch.zeros(4))
    probs = planner.prev["probs"][0, 0]
    assert probs[2] > 0.9 and probs[0] < 0.02
    scores = torch.tensor([[3.0, 1.0, 0.0, -5.0]])
    weights = planner.weights(scores)
    assert torch.all(weights[:, :-1] > weights[:, 1:])
    torch.testing.assert_close(weights[0, 0] / weights[0, 1], torch.exp(torch.tensor(20.0 * 2.0)))
    assert planner.last_stats["return"] > planner.last_stats["elite_max"] - 0.05


def test_value_extends_the_horizon():
    # Arm 0 pays now and leads to a worthless latent; arm 1 pays nothing now but V says its latent is worth 10.
    wm = bandit([1.0, 0.0])
    c = cfg(horizon=1, samples=32, elites=4)
    assert make_planner(wm, c, seed=0).act(np.zeros(2), eval_mode=True) == 0
    assert make_planner(wm, c, value=lambda z: 10.0 * z[:, 1], seed=0).act(np.zeros(2), eval_mode=True) == 1


def test_warm_start_shifts_previous_plan():
    wm = point_model()
    planner = make_planner(wm, cfg(horizon=4), seed=0)
    planner.plan(torch.zeros(2))
    prev = planner.prev["mean"].clone()
    start = planner.start_distribution(1)
    torch.testing.assert_close(start["mean"][:, :-1], prev[:, 1:])
    assert torch.all(start["mean"][:, -1] == 0)
    assert torch.all(start["std"] == planner.cfg.max_std)
    assert torch.all(planner.start_distribution(1, t0=True)["mean"] == 0)

    # With momentum 1 the distribution never moves, so the eval action is exactly the start mean's first step.
    frozen = make_planner(wm, cfg(horizon=4, momentum=1.0), seed=0)
    frozen.prev = {"mean": torch.arange(8.0).view(1, 4, 2) / 10, "std": torch.ones(1, 4, 2)}
    torch.testing.assert_close(frozen.plan(torch.zeros(2), eval_mode=True), torch.tensor([0.2, 0.3]))
    torch.testing.assert_close(frozen.plan(torch.zeros(2), eval_mode=True), torch.tensor([0.4, 0.5]))
    assert torch.all(frozen.plan(torch.zeros(2), eval_mode=True, t0=True) == 0)
    frozen.reset()
    assert frozen.prev is None


def test_warm_start_per_env_reset_and_discrete_shift():
    planner = make_planner(bandit([0.1, 0.5, 0.9, 0.3]), cfg(samples=64, elites=8), seed=0)
    planner.plan(torch.zeros(2, 4))
    prev = planner.prev["probs"]
    start = planner.start_distribution(2, t0=np.array([False, True]))
    torch.testing.assert_close(start["probs"][0, :-1], 0.5 * prev[0, 1:] + 0.125)
    torch.testing.assert_close(start["probs"][0, -1], torch.full((4,), 0.25))
    torch.testing.assert_close(start["probs"][1], torch.full((3, 4), 0.25))


@pytest.mark.parametrize("uncertainty", ["bound", "unconverged", "error"])
def test_uncertainty_penalty_avoids_unconverged_arm(uncertainty):
    # the better arm is uncertain by the signal under test only: a planner reading another signal keeps it
    signal = {"errors" if uncertainty == "error" else "residuals": [2.0, 0.0]}
    wm = bandit([1.0, 0.6], **{"residuals": [0.0, 0.0], "errors": [0.0, 0.0], **signal})

    def act(lam):
        c = cfg(uncertainty_penalty=lam, uncertainty=uncertainty, samples=32, elites=4)
        return make_planner(wm, c, seed=0).act(np.zeros(2), eval_mode=True)

    assert act(0.0) == 0
    assert act(1.0) == 1


def test_uncertainty_penalty_shifts_continuous_optimum():
    # r = a and residual = 2 max(a, 0)^2: λ=0 goes to the bound, λ=1 to the maximiser of a - 2a², a = 0.25.
    wm = Analytic(1, 1, lambda z, a: z, lambda z, a, n: a[:, 0], lambda z, a: 2 * a[:, 0].clamp_min(0) ** 2)

    def act(lam):
        return make_planner(wm, cfg(horizon=1, uncertainty_penalty=lam), seed=0).act(np.zeros(1), eval_mode=True)

    assert act(0.0)[0] > 0.9
    assert abs(act(1.0)[0] - 0.25) < 0.05


def test_policy_prior_seeds_samples():
    # One CEM iteration with few random samples is poor; an optimal prior in the sample set fixes it.
    wm = point_model()
    c = cfg(method="cem", iterations=1, samples=16, elites=2, policy_samples=2, momentum=0.0)

    def optimal(z, generator):
        return TARGET - z

    without = make_planner(wm, c, seed=0).act(np.zeros(2), eval_mode=True)
    with_prior = make_planner(wm, c, prior=optimal, seed=0).act(np.zeros(2), eval_mode=True)
    assert np.abs(with_prior - TARGET.numpy()).max() < 0.02 < np.abs(without - TARGET.numpy()).max()
    latents_only = make_planner(wm, c, prior=lambda z: TARGET - z, seed=0).act(np.zeros(2), eval_mode=True)
    np.testing.assert_array_equal(latents_only, with_prior)  # a prior without a generator argument works too

    class Module(torch.nn.Module):
        def forward(self, z):
            return TARGET - z

    np.testing.assert_array_equal(
        make_planner(wm, c, prior=Module(), seed=0).act(np.zeros(2), eval_mode=True), with_prior
    )
    with pytest.raises(ValueError, match="policy_samples"):
        make_planner(wm, cfg(samples=16, elites=2, policy_samples=16), prior=optimal)


def test_nan_predictions_are_never_chosen():
    wm = Analytic(1, 1, lambda z, a: z, lambda z, a, n: torch.where(a[:, 0] > 0, torch.nan, -a[:, 0]))
    action = make_planner(wm, cfg(horizon=1), seed=0).act(np.zeros(1), eval_mode=True)
    assert -1.0 <= action[0] <= 0.0 and np.isfinite(action[0])


def test_discounted_return_matches_hand_computation():
    rewards = torch.tensor([[1.0], [2.0], [4.0]])
    continues = torch.tensor([[1.0], [0.5], [0.0]])
    expected = 1.0 + 0.9 * 2.0 + 0.81 * 0.5 * 4.0 + 0.729 * 0.0 * 7.0
    torch.testing.assert_close(
        discounted_return(rewards, continues, 0.9, torch.tensor([7.0])), torch.tensor([expected])
    )


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="elites"):
        make_planner(point_model(), dataclasses.replace(cfg(), elites=300))
    with pytest.raises(ValueError, match="min_prob"):
        make_planner(bandit([0.0, 1.0]), cfg(), min_prob=0.5)


@pytest.fixture(scope="module")
def fitted():
    """A tiny looped model fitted for 60 updates on a linear system with reward −‖x‖², and start states."""
    from loopwm.train import Trainer
    from tests.test_training import config, linear_dataset, new_model

    data = linear_dataset()
    run_cfg = config(updates=60, batch_size=16, horizon=3, lr=3e-3, log_every=1000)
    trainer = Trainer(new_model(run_cfg, data), run_cfg, data)
    for _ in range(run_cfg.train.updates):
        trainer.update()
    obs = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    return trainer.wm.eval(), obs


def tanh_prior(z: Tensor, generator: torch.Generator) -> Tensor:
    """A deterministic policy prior for a 1-D action: its rollout loops (and warm-starts) as the scored steps do."""
    return torch.tanh(z[:, :1])


@pytest.mark.parametrize("warm_start", ["iteration", "time", "elite"])
def test_a_warm_started_planner_acts_as_the_cold_one_in_fewer_loops(fitted, warm_start):
    """With the certified exit every imagined step ends within tol of its fixed point wherever its loop starts, so
    a warm-started planner scores the same samples as a cold one, keeps the same elites and picks the same
    action, over decisions that carry the warm state forward; and it gets there in fewer loops."""
    wm, obs = fitted
    loops = dict(exit="certified", exit_tol=1e-4, max_loops=200)
    c = cfg(horizon=3, iterations=3, samples=64, elites=8, min_std=0.05, policy_samples=4)
    cold = make_planner(wm, dataclasses.replace(c, **loops), prior=tanh_prior, seed=0)
    warm = make_planner(wm, dataclasses.replace(c, warm_start=warm_start, **loops), prior=tanh_prior, seed=0)
    used, actions = {"cold": [], "warm": []}, {"cold": [], "warm": []}
    for t, o in enumerate(obs):
        for name, planner in (("cold", cold), ("warm", warm)):
            actions[name].append(planner.model_action(o, eval_mode=True, t0=t == 0))
            used[name].append(planner.last_stats["loops"])
    np.testing.assert_allclose(actions["warm"], actions["cold"], atol=1e-3)
    assert np.mean(used["warm"]) < 0.95 * np.mean(used["cold"])


def test_planner_loop_options_need_a_looped_model_and_change_its_loops(fitted, monkeypatch):
    """`planner.loops` overrides the model's loop count in every imagined step, the policy prior's rollout
    included; an analytic model without a loop is refused loop options rather than silently ignoring them."""
    wm, obs = fitted
    loops, imagine = [], wm.imagine

    def spy(*args, **kwargs):
        out = imagine(*args, **kwargs)
        loops.append(out.loops.unique().tolist())
        return out

    monkeypatch.setattr(wm, "imagine", spy)
    c = cfg(horizon=3, iterations=2, samples=32, elites=4, loops=2, policy_samples=4)
    planner = make_planner(wm, c, prior=lambda z, gen: torch.zeros(z.shape[0], 1), seed=0)
    planner.act(obs[0])
    assert wm.cfg.loops == 4 and planner.last_stats["loops"] == 2.0
    assert loops == [[2]] * 4  # two prior steps, then two scored iterations
    with pytest.raises(ValueError, match="warm_start='time' need a looped WorldModel"):
        make_planner(point_model(), cfg(warm_start="time"))


def test_elite_states_are_the_weighted_mean_of_each_envs_elites(fitted):
    """States [H, N·S, hidden] laid out env by env: env n's elite start is Σ_e w[n, e]·states[:, n·S + idx[n, e]]."""
    wm, _ = fitted
    planner = make_planner(wm, cfg(warm_start="elite"), seed=0)
    states = torch.arange(2 * 2 * 4, dtype=torch.float32).view(2, 8, 1).expand(2, 8, 3)  # H=2, N=2, S=4
    idx, weights = torch.tensor([[3, 1], [0, 2]]), torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    expected = torch.tensor([[0.75 * 3 + 0.25 * 1, 0.5 * 4 + 0.5 * 6], [0.75 * 11 + 0.25 * 9, 0.5 * 12 + 0.5 * 14]])
    torch.testing.assert_close(planner.elite_states(states, idx, weights), expected[..., None].expand(2, 2, 3))


def test_a_planner_certifies_its_rollouts_only_where_the_score_or_the_exit_reads_the_bound(fitted, monkeypatch):
    """Without a bound penalty the imagined steps skip the certified bound, and the actions are those of a planner
    that computes it; a bound penalty or the certified exit computes it at every imagined step."""
    wm, obs = fitted
    calls = []
    bound = type(wm.core).certified_bound
    monkeypatch.setattr(type(wm.core), "certified_bound", lambda *a, **k: calls.append(1) or bound(*a, **k))
    c = cfg(horizon=3, iterations=2, samples=32, elites=4, loops=2, policy_samples=4)
    plain = make_planner(wm, c, prior=tanh_prior, seed=0)
    action = plain.model_action(obs[0], eval_mode=True)
    assert not calls and "bound" not in plain.last_stats and plain.last_stats["loops"] == 2.0
    certified = make_planner(wm, c, prior=tanh_prior, seed=0, certify=True)
    np.testing.assert_array_equal(certified.model_action(obs[0], eval_mode=True), action)
    assert len(calls) == 2 * 3 + 2 and 0 < certified.last_stats["bound"] < float("inf")  # scored + prior steps
    for options in (dict(uncertainty="unconverged", uncertainty_penalty=0.1), dict(exit="certified", loops=None)):
        calls.clear()
        planner = make_planner(wm, dataclasses.replace(c, **options), prior=tanh_prior, seed=0)
        planner.model_action(obs[0], eval_mode=True)
        assert len(calls) >= 2 * 3 and "converged" in planner.last_stats, options
    plain.cfg = dataclasses.replace(c, uncertainty_penalty=0.1)  # a penalty set after construction is charged too
    calls.clear()
    plain.model_action(obs[0], eval_mode=True)
    assert len(calls) == 2 * 3 + 2 and "bound" in plain.last_stats
    out = wm.imagine(wm.encode(torch.as_tensor(obs)), torch.zeros(3, 4, 1), decode="none", certify=False)
    ref = wm.imagine(wm.encode(torch.as_tensor(obs)), torch.zeros(3, 4, 1), decode="none")
    assert out.bound is None and out.converged is None and ref.bound.shape == (3, 4)
    torch.testing.assert_close(out.latents, ref.latents, rtol=0, atol=0)
