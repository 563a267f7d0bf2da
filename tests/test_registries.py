"""Loop options are checked when built, and new blocks and planners plug in from a test file alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from loopwm.agents.planner import PLANNERS, Planner, build_planner, register_planner
from loopwm.blocks import BLOCKS, MLPBlock, register_block
from loopwm.config import ConfigError, ModelConfig, Section, from_dict
from loopwm.exits import EXIT_RULES, LoopOptions
from loopwm.lipschitz import CertifiedLinear
from tests.helpers import tiny_config, tiny_model


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"exit": "never"}, r"exit='never': expected one of \['agreement', 'certified', 'fixed', 'gate', 'relative'\]"),
        ({"exit": "certified", "bptt": 2}, r"bptt=2 needs exit='fixed'"),
        ({"exit": "gate", "bptt": 1}, r"bptt=1 needs exit='fixed'"),
        ({"exit": "certified", "loops": 4}, r"loops=4 needs exit='fixed'"),
        ({"min_loops": 5, "max_loops": 4}, r"min_loops=5 must be <= max_loops=4"),
        ({"loops": 0}, r"loops=0: expected an integer >= 1"),
        ({"tol": float("nan")}, r"tol=nan: expected a finite number > 0"),
        ({"tol": -1.0}, r"tol=-1.0: expected a finite number > 0"),
        ({"bptt": 0}, r"bptt=0: expected an integer >= 1"),
        ({"loops": torch.tensor([1.5])}, r"1-D integer tensor"),
    ],
)
def test_loop_options_refuse_what_they_cannot_honour(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoopOptions(**kwargs)


def test_loop_options_from_config_and_frozen():
    cfg = ModelConfig(exit="certified", exit_tol=1e-3, min_loops=2, max_loops=9, loops=5)
    opts = LoopOptions.from_config(cfg)
    assert (opts.exit, opts.tol, opts.min_loops, opts.max_loops, opts.loops) == ("certified", 1e-3, 2, 9, None)
    assert LoopOptions.from_config(cfg, exit="fixed").loops == 5
    with pytest.raises(AttributeError):
        opts.tol = 1.0  # type: ignore[misc]
    assert set(EXIT_RULES) == {"fixed", "certified", "gate", "relative", "agreement"}


def test_model_and_cli_share_the_exit_names():
    with pytest.raises(ConfigError, match=r"exit='soon'"):
        from_dict({"model": {"exit": "soon"}})


@dataclass
class ScaledOptions(Section):
    prefix: ClassVar[str] = "model.block_options"
    width_factor: int = field(default=3, metadata={"range": (1, 8, False, False)})


@register_block("test-wide-mlp")
class WideMLPBlock(MLPBlock):
    """An MLP block whose width comes from its own option: defined here, built from a config."""

    Options = ScaledOptions

    @classmethod
    def from_config(cls, cfg: ModelConfig, options: ScaledOptions) -> "WideMLPBlock":
        return cls(
            cfg.hidden_dim,
            cfg.inject_dim,
            cfg.block_depth,
            options.width_factor * cfg.hidden_dim,
            cfg.activation,
            cfg.constrain_block,
        )


def test_a_block_defined_outside_the_package_builds_from_config():
    wm = tiny_model(block="test-wide-mlp", block_options={"width_factor": 2})
    assert isinstance(wm.core.block, WideMLPBlock) and wm.core.block.out.weight.shape == (32, 64)
    z = wm.encode(torch.zeros(3, 3))
    z1, trace = wm.step(z, torch.zeros(3, 1))
    assert z1.shape == z.shape and trace.loops_used.tolist() == [4, 4, 4]
    assert wm.certified_lipschitz() < 1
    with pytest.raises(ConfigError, match=r"unknown config key model\.block_options\.tokens"):
        tiny_config(block="test-wide-mlp", block_options={"tokens": 2})
    with pytest.raises(ConfigError, match=r"model\.block_options\.width_factor=9"):
        tiny_config(block="test-wide-mlp", block_options={"width_factor": 9})
    with pytest.raises(ConfigError, match=r"model\.block='conv': expected one of \[.*'test-wide-mlp'"):
        tiny_config(block="conv")
    assert "test-wide-mlp" in BLOCKS


def test_token_block_checks_its_own_options():
    with pytest.raises(ConfigError, match=r"model\.hidden_dim=32 must be divisible by model\.block_options\.tokens=5"):
        tiny_config(block="token", block_options={"tokens": 5})
    wm = tiny_model(block="token", block_options={"tokens": 8})
    assert wm.core.block.tokens == 8


@register_planner("test-greedy")
class GreedyPlanner(Planner):
    """All weight on the best elite: defined here, chosen by `planner.method`."""

    def weights(self, elite_scores: Tensor) -> Tensor:
        w = torch.zeros_like(elite_scores)
        w[:, 0] = 1.0
        return w


def test_a_planner_defined_outside_the_package_builds_from_config():
    cfg = from_dict(
        {
            "planner": {"method": "test-greedy", "samples": 16, "elites": 4, "policy_samples": 0, "iterations": 1},
            "agent": {"discount": 0.9},
        }
    )
    wm = tiny_model()
    planner = build_planner(cfg, wm, seed=0)
    assert isinstance(planner, GreedyPlanner) and planner.discount == 0.9
    action = planner.act(np.zeros(3, dtype=np.float32), eval_mode=True)
    assert action.shape == (1,) and np.all(np.abs(action) <= 1)
    with pytest.raises(ConfigError, match=r"planner\.method='nope': expected one of \[.*'test-greedy'"):
        build_planner(from_dict({"planner": {"method": "nope"}}), wm)
    assert PLANNERS["mppi"].__name__ == "MPPIPlanner"


def test_planner_state_round_trips_rng_and_warm_start():
    cfg = from_dict({"planner": {"samples": 16, "elites": 4, "policy_samples": 0, "iterations": 1}})
    wm = tiny_model()
    a, b = build_planner(cfg, wm, seed=1), build_planner(cfg, wm, seed=2)
    a.act(np.zeros(3, dtype=np.float32))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.act(np.ones(3, dtype=np.float32)), b.act(np.ones(3, dtype=np.float32)))


def test_direct_sections_are_checked_like_yaml():
    with pytest.raises(ConfigError, match=r"model\.kappa_max=1\.0: expected a value < 1\.0"):
        ModelConfig(kappa_max=1.0)
    with pytest.raises(ConfigError, match=r"model\.retention_max=0\.9 must be < model\.kappa_max=0\.9"):
        ModelConfig(retention_max=0.9, kappa_max=0.9)
    with pytest.raises(ConfigError, match=r"model\.kappa_max=nan: expected a finite number"):
        ModelConfig(kappa_max=float("nan"))
    with pytest.raises(ConfigError, match=r"train\.lr=inf: expected a finite number"):
        from_dict({"train": {"lr": float("inf")}})


def test_nn_module_layout_is_unchanged_for_the_default_block():
    core = tiny_model().core
    assert isinstance(core.block, MLPBlock) and isinstance(core.block.out, CertifiedLinear)
    assert isinstance(core.gain_logit, nn.Parameter)
