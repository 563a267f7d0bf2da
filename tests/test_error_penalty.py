"""`planner.uncertainty=error`: the planner charges each imagined step the error head's predicted error."""

import pytest
import torch

from loopwm.agents.planner import MPPIPlanner, discounted_return
from loopwm.config import ConfigError, PlannerConfig, from_dict
from tests.helpers import TINY, tiny_model

PLAN = {"horizon": 3, "iterations": 1, "samples": 8, "elites": 2, "policy_samples": 0}


def trained_looking_head():
    """A tiny model whose error head predicts errors that differ from step to step and from its offset."""
    torch.manual_seed(0)
    wm = tiny_model(error_head=True)
    with torch.no_grad():
        for p in wm.core.error_head.parameters():
            p.normal_(std=0.2, generator=torch.Generator().manual_seed(1))
        wm.core.error_offset.fill_(-3.0)
    return wm


def test_the_error_of_exit_states_is_the_error_of_their_traces_and_relative_divides_by_the_offset():
    wm = trained_looking_head()
    z, actions = wm.encode(torch.randn(5, 3)), torch.rand(3, 5, 1) * 2 - 1
    with torch.no_grad():
        out = wm.imagine(z, actions, decode="none", keep_traces=True)
        per_step = wm.predict_error(out.states)
        assert per_step.shape == (3, 5)
        for k, trace in enumerate(out.traces):
            torch.testing.assert_close(per_step[k], wm.predict_error(trace))  # one batched matmul, rounded alike
        relative = wm.predict_error(out.states, relative=True)
    torch.testing.assert_close(relative, per_step / torch.exp(torch.tensor(-3.0)))
    assert float(relative.std()) > 0.01  # the head tells the steps apart


def test_the_score_subtracts_the_discounted_relative_errors_of_every_imagined_step():
    wm = trained_looking_head()
    z, actions = wm.encode(torch.randn(6, 3)), torch.rand(3, 6, 1) * 2 - 1
    plain = MPPIPlanner(wm, PlannerConfig(**PLAN), discount=0.9, seed=0)
    charged = MPPIPlanner(wm, PlannerConfig(**PLAN, uncertainty_penalty=0.5, uncertainty="error"), discount=0.9, seed=0)
    with torch.no_grad():
        base, out = plain.score(z, actions)
        score, _ = charged.score(z, actions)
        errors = wm.predict_error(out.states, relative=True)
        expected = base - 0.5 * discounted_return(errors, torch.ones_like(errors), 0.9)
    torch.testing.assert_close(score, expected)
    assert not torch.allclose(score, base)


def test_a_model_without_a_head_is_refused_at_the_door():
    with pytest.raises(ValueError, match="planner.uncertainty='error'.*model.error_head=true"):
        MPPIPlanner(tiny_model(), PlannerConfig(**PLAN, uncertainty_penalty=0.5, uncertainty="error"))
    MPPIPlanner(tiny_model(), PlannerConfig(**PLAN, uncertainty="error"))  # no penalty: nothing to charge


def penalised(model=None, train=None):
    planner = {"uncertainty_penalty": 1.0, "uncertainty": "error"}
    return from_dict({"model": {**TINY, **(model or {})}, "train": train or {}, "planner": planner})


def test_the_config_rules_name_the_head_it_needs_and_let_an_unshared_stack_use_it():
    with pytest.raises(ConfigError, match="planner.uncertainty='error' needs the error head"):
        penalised()
    with pytest.raises(ConfigError, match="planner.uncertainty='error' uses .* train.w_error=0 leaves untrained"):
        penalised({"error_head": True})
    penalised({"error_head": True}, {"w_error": 0.1})
    stack = {"shared": False, "loops": 3, "max_loops": 3, "error_head": True}
    penalised(stack, {"w_error": 0.1, "extra_loops": 0})  # the stack has no fixed point, but it has a head
    with pytest.raises(ConfigError, match="planner.uncertainty='bound'.*set planner.uncertainty=error"):
        from_dict({"model": {**TINY, **stack}, "train": {"extra_loops": 0}, "planner": {"uncertainty_penalty": 1.0}})
    with pytest.raises(ConfigError, match="planner.uncertainty"):
        from_dict({"planner": {"uncertainty": "residual"}})
    loop_free = {"dynamics": "mlp"}
    with pytest.raises(ConfigError, match="planner.uncertainty='error' needs the error head, which a loop-free"):
        penalised(loop_free, {"extra_loops": 0, "w_deep": 0.0, "w_gate": 0.0})
