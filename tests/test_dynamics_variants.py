"""The comparison dynamics: an unshared stack of blocks (`model.shared=false`) and a plain MLP core
(`model.dynamics=mlp`) build, certify, count, save and train like the shared loop, and refuse what
they cannot honour."""

import dataclasses

import numpy as np
import pytest
import torch

import loopwm
from loopwm.analysis.report import analyze
from loopwm.config import ConfigError, from_dict
from loopwm.exits import LoopOptions
from loopwm.flops import linear_macs, matched_width, model_cost, step_macs
from loopwm.lipschitz import exact_spectral_norm
from loopwm.objective import QuantileTracker, sequence_loss
from loopwm.plain import PlainCore
from loopwm.world_model import WorldModel
from tests.helpers import TINY, box_spaces, tiny_model
from tests.test_training import linear_dataset

STACK = {"shared": False, "loops": 3, "max_loops": 3}
PLAIN = {"dynamics": "mlp", "dynamics_width": 24, "dynamics_depth": 2}
NO_LOOP_TRAINING = {"extra_loops": 0, "w_deep": 0.0, "w_gate": 0.0}


def config(model, train=None):
    return from_dict({"model": {**TINY, **model}, "train": train or NO_LOOP_TRAINING})


def build(model, train=None):
    return WorldModel.from_config(config(model, train), *box_spaces())


def stage_context(wm, batch=16, seed=1):
    e = torch.randn(batch, wm.cfg.inject_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return wm.core.prepare(3.0 * e)


def randomized_stack():
    """A float64 stack whose blocks have very different gains, so a certificate borrowed from another block fails."""
    wm = build(STACK).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in wm.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        wm.core.gain_logit.copy_(torch.tensor([-6.0, 4.0, 0.0]))
    return wm


@pytest.mark.parametrize(
    "model, train, message",
    [
        (
            {"shared": False, "exit": "certified", "max_loops": 4},
            {"extra_loops": 0},
            r"exit='certified' needs a shared",
        ),
        ({"shared": False, "exit": "gate"}, {"extra_loops": 0}, r"gate exit could run model\.max_loops=16"),
        ({"shared": False, "exit": "agreement"}, {"extra_loops": 0}, r"agreement exit could run model\.max_loops"),
        ({"shared": False}, {"extra_loops": 0}, r"poisson.*draws up to model\.max_loops=16"),
        ({"shared": False, "max_loops": 4}, {}, r"train\.extra_loops=4 would loop past the last"),
        ({"shared": False, "dynamics": "mlp"}, NO_LOOP_TRAINING, r"model\.dynamics='mlp' has no loop"),
        ({"dynamics": "mlp"}, {"w_deep": 0.0}, r"set train\.extra_loops=0, train\.w_gate=0$"),
    ],
)
def test_configs_a_stack_or_a_plain_core_cannot_honour_are_refused(model, train, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"model": {**TINY, **model}, "train": train})
    with pytest.raises(ConfigError, match="planner.uncertainty_penalty"):
        from_dict({"model": STACK, "train": {"extra_loops": 0}, "planner": {"uncertainty_penalty": 0.1}})


@pytest.mark.parametrize(
    "model, planner, message",
    [
        (
            STACK,
            {"loops": 2},
            r"^planner\.loops=2: an unshared stack .* model\.loops=3 blocks .*; set planner\.loops=null$",
        ),
        (STACK, {"exit": "gate"}, r"^planner\.exit='gate': an unshared stack .*; set planner\.exit=null$"),
        (STACK, {"warm_start": "time"}, r"^planner\.warm_start='time': .* from zero; set planner\.warm_start=none$"),
        (STACK, {"exit": "agreement", "max_loops": 8}, r"planner\.exit='agreement', planner\.max_loops=8: "),
        (PLAIN, {"loops": 2}, r"^planner\.loops=2: model\.dynamics='mlp' has no loop to shorten"),
        (PLAIN, {"loops": 4}, r"^planner\.loops=4: model\.dynamics='mlp' has no loop"),  # even model.loops itself
        (PLAIN, {"exit_tol": 0.1}, r"^planner\.exit_tol=0\.1: model\.dynamics='mlp' .*; set planner\.exit_tol=null$"),
        (PLAIN, {"warm_start": "elite"}, r"^planner\.warm_start='elite': model\.dynamics='mlp'"),
    ],
)
def test_planner_loop_options_a_stack_or_plain_core_cannot_honour_are_refused(model, planner, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"model": {**TINY, **model}, "train": NO_LOOP_TRAINING, "planner": planner})
    if not model.get("shared", True):  # the stack's own options are what it was trained with
        assert from_dict(
            {"model": {**TINY, **model}, "train": NO_LOOP_TRAINING, "planner": {"loops": 3, "exit": "fixed"}}
        )


def test_each_block_of_a_stack_is_certified_on_its_own():
    wm = randomized_stack()
    with torch.no_grad():
        ctx = stage_context(wm)
        a_max = float(wm.core.retention().max())
        scales = wm.core.block_scale(wm.core.retention().max())
    kappas = [float(s.kappa) for s in ctx.stages]
    for t, block in enumerate(wm.core.blocks()):  # κ_t from block t's own weights and gain
        certified = [lin.certify() for lin in block.linears()]
        exact = float(scales[t]) * np.prod([exact_spectral_norm(c.weight) for c in certified])
        claimed = float(scales[t]) * np.prod([float(c.lip) for c in certified])
        assert a_max + exact <= kappas[t] == pytest.approx(a_max + claimed, rel=1e-9)
    h = torch.randn(4, wm.cfg.hidden_dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t, kappa in enumerate(kappas):  # and the Jacobian of loop t stays below it
        sigmas = []
        for i in range(4):
            sub = ctx.select(torch.tensor([i]))
            jac = torch.autograd.functional.jacobian(lambda x, sub=sub, t=t: wm.core.loop_map(x, sub, t), h[i : i + 1])
            sigmas.append(exact_spectral_norm(jac.reshape(h.shape[1], h.shape[1])))
        assert max(sigmas) <= kappa + 1e-9
        if t == 1:  # the gain-heavy block is far less contractive than block 0's certificate would say
            assert max(sigmas) > kappas[0] + 0.01
    assert float(wm.core.kappa()) == max(kappas) < wm.cfg.kappa_max


def test_a_stack_applies_block_t_at_loop_t_and_certifies_no_fixed_point():
    wm = randomized_stack()
    with torch.no_grad():
        ctx = stage_context(wm)
        h, trace = wm.core.run(ctx, options=LoopOptions(loops=3), keep_states=True)
        by_hand = None
        for t in range(3):
            by_hand = wm.core.loop_map(by_hand, ctx, t)
        assert torch.equal(h, by_hand)
        assert not torch.allclose(wm.core.loop_map(h, ctx, 0), wm.core.loop_map(h, ctx, 1))
        bound = wm.core.state_bound(ctx)
        assert all(bool((s.norm(dim=-1) <= bound * (1 + 1e-9)).all()) for s in trace.states)
    assert torch.isinf(trace.bound).all() and not trace.converged.any()
    with pytest.raises(ValueError, match="unshared stack .* has none"):
        wm.core.run(ctx, options=LoopOptions(exit="certified"))
    with pytest.raises(ValueError, match="could take 4 loops.* has model.loops=3 blocks"):
        wm.core.run(ctx, options=LoopOptions(loops=4))
    with pytest.raises(ValueError, match="could take 16 loops"):
        wm.core.run(ctx, options=LoopOptions(exit="gate"))


def test_a_plain_core_is_one_td_mpc2_style_evaluation():
    wm = build(PLAIN)
    kinds = [type(m).__name__ for m in wm.core.net]
    assert kinds == ["Linear", "LayerNorm", "Mish", "Linear", "LayerNorm", "Mish", "Linear"]
    z, a = torch.randn(5, 16), torch.rand(5, 1) * 2 - 1
    with torch.no_grad():
        z1, trace = wm.step(z, a)
        z_loops, _ = wm.step(z, a, options=LoopOptions(loops=7), h0=torch.randn(5, 32))
    assert torch.equal(z1, z_loops)  # no state: neither a start state nor a loop count changes the prediction
    assert trace.loops_used.tolist() == [1] * 5 and trace.converged.all() and wm.certified_lipschitz() == 0.0
    cost = PlainCore.cost(wm.cfg)
    assert cost["parameters"] == sum(p.numel() for p in wm.core.parameters())
    assert cost["macs"] == linear_macs(wm.core)


def test_step_macs_and_parameters_of_a_stack_and_a_plain_core_match_a_hand_count():
    shared, stack = build({"loops": 3}), build(STACK)  # hidden 32, inject 32, MLP blocks of width 64
    parts = step_macs(stack)
    assert parts["injection"] == 32 * 32 + 3 * (32 * 64)  # B, and every block's own e-path
    assert parts["loops"] == 64 * 32 + 2 * (32 * 64 + 64 * 32)  # the first loop from h = 0 skips W_in
    assert parts["loops"] == step_macs(shared)["loops"]
    block = sum(p.numel() for p in shared.core.block.parameters())
    assert model_cost(stack, "parameters") - model_cost(shared, "parameters") == 2 * block + 2  # + 2 gains
    with pytest.raises(ValueError, match="3 blocks"):
        step_macs(stack, loops=4)
    plain = build(PLAIN)  # width 24, depth 2
    parts = step_macs(plain)
    assert parts["dynamics"] == 32 * 24 + 24 * 24 + 24 * 32
    assert parts["prelude"] == 1 * 16 + 48 * 32 and parts["coda"] == 32 * 64 + 64 * 16
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    with pytest.raises(ValueError, match="evaluates once"):
        step_macs(plain, loops=4)


@pytest.mark.parametrize("by", ["parameters", "macs"])
def test_matched_width_is_the_closest_width(by):
    reference = tiny_model()
    target = model_cost(reference, by)
    cfg = config(PLAIN).model
    width = matched_width(cfg, reference.spec, target, by)

    def cost(w):
        return model_cost(WorldModel(dataclasses.replace(cfg, dynamics_width=w), reference.spec), by)

    gaps = [abs(cost(w) - target) for w in (width - 1, width, width + 1)]
    assert gaps[1] <= min(gaps[0], gaps[2]) and gaps[1] <= 0.05 * target
    with pytest.raises(ValueError, match="no width matches"):
        matched_width(cfg, reference.spec, 100.0, by)


@pytest.mark.parametrize("model", [STACK, PLAIN], ids=["stack", "plain"])
def test_variants_round_trip_through_a_checkpoint_and_train(model, tmp_path):
    torch.manual_seed(0)
    wm = build(model)
    loopwm.save(tmp_path / "wm.pt", wm)
    loaded = loopwm.load(tmp_path / "wm.pt")
    z, actions = torch.randn(4, 16), torch.rand(3, 4, 1) * 2 - 1
    with torch.no_grad():
        assert torch.equal(wm.imagine(z, actions).latents, loaded.imagine(z, actions).latents)
    data = linear_dataset(episodes=4, steps=12)
    batch = data.sample(8, 3, np.random.default_rng(0))
    cfg = config(model).train
    loss, _, _ = sequence_loss(wm, batch, cfg, torch.Generator().manual_seed(0), QuantileTracker(0.9))
    loss.backward()
    blocks = wm.core.blocks() if "shared" in model else [wm.core]
    # every weight of every block learns, but for the first block's map on the zero start state
    idle = {id(blocks[0].linears()[0].weight)} if "shared" in model else set()
    for block in blocks:
        for p in block.parameters():
            assert (p.grad is not None and float(p.grad.abs().sum()) > 0) != (id(p) in idle)


def test_the_stability_report_refuses_models_without_a_shared_loop(tmp_path):
    obs, actions = torch.randn(4, 2, 3), torch.zeros(3, 2, 1)
    for model in (STACK, PLAIN):
        with pytest.raises(ValueError, match="audits one shared block's fixed point"):
            analyze(build(model), obs, actions, tmp_path)
