"""The certificate of the looped core holds numerically, and the loop behaves as the maths says."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from loopwm import lipschitz
from loopwm.exits import LoopOptions
from loopwm.world_model import WorldModel
from tests.helpers import box_spaces, tiny_model


def randomize(model, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def context(model, batch=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(batch, model.cfg.inject_dim, generator=g).to(model.core.gain_logit.dtype)
    return model.core.prepare(e * 3.0)


def max_ratio(model, ctx, seed=2, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(ctx.drive.shape, generator=g).to(ctx.drive.dtype) * scale
    h2 = h + torch.randn(ctx.drive.shape, generator=g).to(ctx.drive.dtype) * scale * 0.1
    num = (model.core.loop_map(h, ctx) - model.core.loop_map(h2, ctx)).norm(dim=-1)
    return float((num / (h - h2).norm(dim=-1)).max())


def test_contraction_survives_aggressive_optimisation():
    torch.manual_seed(0)
    model = tiny_model(activation="relu")
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    for _ in range(100):
        ctx = context(model, batch=16)
        h = torch.randn(16, model.cfg.hidden_dim)
        loss = -(model.core.loop_map(h, ctx) - model.core.loop_map(torch.zeros_like(h), ctx)).norm()
        opt.zero_grad()
        loss.backward()
        opt.step()
    kappa = model.certified_lipschitz()
    assert kappa < 1.0
    with torch.no_grad():
        ctx = context(model)
        assert max_ratio(model, ctx, scale=1.0) <= kappa + 1e-5


def jacobian_spectral_norm(model, ctx, h, iters=60):
    """‖J‖₂ of the loop map at h, by power iteration on JᵀJ with JVP/VJP."""
    v = torch.randn_like(h)
    f = lambda x: model.core.loop_map(x, ctx)  # noqa: E731
    sigma = torch.zeros(h.shape[0])
    for _ in range(iters):
        v = v / v.norm(dim=-1, keepdim=True)
        _, jv = torch.func.jvp(f, (h,), (v,))
        _, vjp = torch.func.vjp(f, h)
        (v,) = vjp(jv)
        sigma = jv.norm(dim=-1)
    return sigma


def test_jacobian_spectral_radius_below_certificate():
    torch.manual_seed(0)
    model = tiny_model(block="token", block_depth=2).double()
    randomize(model, std=1.5)
    kappa = model.certified_lipschitz()
    with torch.no_grad():
        ctx = context(model, batch=8)
        h = torch.randn(8, model.cfg.hidden_dim, dtype=torch.float64)
        sigma = jacobian_spectral_norm(model, ctx, h)
    assert float(sigma.max()) <= kappa + 1e-9
    assert float(sigma.max()) > 0.05


def test_loop_converges_geometrically_and_bound_holds():
    torch.manual_seed(0)
    model = tiny_model().double()
    randomize(model, std=1.0)
    kappa = model.certified_lipschitz()
    with torch.no_grad():
        ctx = context(model, batch=16)
        h_star = model.core.fixed_point(ctx, tol=1e-12)
        _, trace = model.core.run(ctx, options=LoopOptions(loops=30), keep_states=True)
    res = trace.step_norms
    assert torch.all(res[1:] <= kappa * res[:-1] + 1e-12)
    for t in range(1, 31):
        true_dist = (trace.states[t] - h_star).norm(dim=-1)
        bound = kappa / (1 - kappa) * res[t - 1]
        assert torch.all(true_dist <= bound + 1e-10)
    assert float((trace.states[-1] - h_star).norm(dim=-1).max()) < float(res[0].max()) * kappa**29 / (1 - kappa)


def test_paper_mode_can_break_the_certificate():
    model = tiny_model(constrain_block=False, activation="relu").double()
    with torch.no_grad():
        for lin in model.core.block.linears():
            lin.weight.mul_(3.0)
    kappa = model.certified_lipschitz()
    assert kappa > 1.0
    with torch.no_grad():
        ctx = context(model)
        assert max_ratio(model, ctx, scale=1.0) > 1.0
    constrained = tiny_model(constrain_block=True, activation="relu")
    with torch.no_grad():
        for lin in constrained.core.block.linears():
            lin.weight.mul_(3.0)
    assert constrained.certified_lipschitz() < 1.0


def test_no_retention_ablation_zeroes_retention():
    model = tiny_model(retention=False)
    assert float(model.core.retention().abs().max()) == 0.0
    assert model.certified_lipschitz() < 1.0


def test_exit_policy_respects_min_and_max_loops():
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():
        ctx = context(model, batch=8)
        _, tight = model.core.run(ctx, options=LoopOptions(exit="certified", tol=1e-30, min_loops=2, max_loops=7))
        _, loose = model.core.run(ctx, options=LoopOptions(exit="certified", tol=1e30, min_loops=3, max_loops=7))
        _, gated = model.core.run(ctx, options=LoopOptions(exit="gate", gate_threshold=0.0, min_loops=2, max_loops=7))
    assert torch.all(tight.loops_used == 7)
    assert torch.all(loose.loops_used == 3)
    assert torch.all(gated.loops_used == 2)


def test_certified_exit_gives_each_sample_its_own_loop_count():
    torch.manual_seed(0)
    model = tiny_model().double()
    with torch.no_grad():
        ctx = context(model, batch=8)
        h_star = model.core.fixed_point(ctx, tol=1e-12)
        h0 = torch.zeros_like(h_star)
        h0[:4] = h_star[:4]
        h, trace = model.core.run(ctx, h0, LoopOptions(exit="certified", tol=1e-6, min_loops=1, max_loops=200))
        dist = (h - h_star).norm(dim=-1)
    assert torch.all(trace.loops_used[:4] == 1)
    assert torch.all(trace.loops_used[4:] > 5)
    assert torch.all(dist <= 1e-6 + 1e-12)
    assert torch.all(trace.converged)


def test_spectral_norm_is_computed_once_per_forward_not_per_loop(monkeypatch):
    model = tiny_model(block_depth=2)
    calls = []
    real = lipschitz.scaled_bound
    monkeypatch.setattr(lipschitz, "scaled_bound", lambda w, *a, **k: calls.append(1) or real(w, *a, **k))
    z = model.encode(torch.randn(4, 3))
    model.step(z, torch.zeros(4, 1), options=LoopOptions(loops=12))
    n_linears = len(model.core.block.linears())
    assert len(calls) == n_linears
    calls.clear()
    model.imagine(z, torch.zeros(6, 4, 1), decode="none", options=LoopOptions(loops=12))
    assert len(calls) == n_linears


def test_deferred_decoding_final_equals_last_of_all():
    torch.manual_seed(0)
    model = tiny_model()
    z = model.encode(torch.randn(5, 3))
    actions = torch.rand(7, 5, 1) * 2 - 1
    with torch.no_grad():
        final = model.imagine(z, actions, decode="final")
        every = model.imagine(z, actions, decode="all")
        none = model.imagine(z, actions, decode="none")
    assert every.obs.shape == (7, 5, 3)
    assert torch.equal(final.obs, every.obs[-1])
    assert none.obs is None
    assert torch.equal(none.latents, final.latents)
    assert final.rewards.shape == final.continues.shape == final.loops.shape == (7, 5)


def test_delta_decoder_chains_changes_from_the_start_observation():
    torch.manual_seed(0)
    model = tiny_model(obs_decoder="delta")
    obs = torch.randn(5, 3)
    actions = torch.rand(6, 5, 1) * 2 - 1
    with torch.no_grad():
        z = model.encode(obs)
        untrained = model.imagine(z, actions, decode="all", obs=obs)
        assert torch.allclose(untrained.obs, obs.expand(6, 5, 3))  # zero-initialised head: "no change"
        for p in model.delta_decoder.parameters():
            p.normal_(0.0, 0.3)
        every = model.imagine(z, actions, decode="all", obs=obs)
        final = model.imagine(z, actions, decode="final", obs=obs)
        lat = every.latents
        steps = torch.stack([model.decode_delta(a, b) for a, b in zip(lat[:-1], lat[1:])])
        expected = model.denormalize_obs(model.normalize_obs(obs) + steps.cumsum(0))
        assert torch.allclose(every.obs, expected, atol=1e-5)
        assert torch.equal(final.obs, every.obs[-1])
        # without the observation the chain starts from the absolute decoding of z
        unanchored = model.imagine(z, actions, decode="all")
        assert torch.allclose(unanchored.obs - every.obs, (model.decode(z) - obs).expand(6, 5, 3), atol=1e-5)
    with pytest.raises(ValueError, match="obs has shape"):
        model.imagine(z, actions, decode="all", obs=obs[:2])
    with pytest.raises(ValueError, match="obs_decoder='delta'"):
        tiny_model().decode_delta(z, z)


def test_residual_latent_update_adds_the_coda_output_to_the_start():
    torch.manual_seed(0)
    model = tiny_model(latent_update="residual")
    z = model.encode(torch.randn(5, 3))
    with torch.no_grad():
        z1, _ = model.step(z, torch.zeros(5, 1))
        assert torch.allclose(z1, z, atol=1e-3)  # zero-initialised coda: "no change"
        for p in model.coda.parameters():
            p.normal_(0.0, 0.3)
        z1, trace = model.step(z, torch.rand(5, 1), readouts=True, options=LoopOptions(loops=3))
        h = trace.final_state
        expected = torch.nn.functional.layer_norm(z + model.coda(h), (z.shape[-1],))
        assert torch.allclose(z1, expected, atol=1e-6)
        assert torch.allclose(trace.readouts[-1], z1, atol=1e-6)  # per-loop readouts start from z too
        assert not torch.allclose(model.readout_for(-z)(h), z1, atol=1e-2)
    with pytest.raises(ValueError, match="pass z_prev"):
        model.readout(h)


def test_delta_decoder_refuses_frames():
    from loopwm.config import from_dict

    frames = gym.spaces.Box(0, 255, (3, 40, 40), np.uint8)
    cfg = from_dict(
        {"model": {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 64, "obs_decoder": "delta"}}
    )
    with pytest.raises(ValueError, match="needs vector observations"):
        WorldModel.from_config(cfg, frames, box_spaces()[1])


def test_bad_inputs_get_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="obs has shape"):
        model.encode(torch.randn(4, 5))
    with pytest.raises(ValueError, match="NaN"):
        model.encode(torch.tensor([[0.0, float("nan"), 1.0]]))
    z = model.encode(torch.randn(4, 3))
    with pytest.raises(ValueError, match="action has shape"):
        model.step(z, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="decode="):
        model.imagine(z, torch.zeros(2, 4, 1), decode="sometimes")
    with pytest.raises(ValueError, match="exit="):
        model.step(z, torch.zeros(4, 1), options=LoopOptions(exit="never"))


@pytest.mark.parametrize("block", ["mlp", "token"])
@pytest.mark.parametrize("depth", [1, 2])
def test_zero_state_shortcut_equals_the_loop_map_at_zero(block, depth):
    """The first loop from h = 0 skips the h-path matmul; it must give exactly F(0), gradients included."""
    model = tiny_model(block=block, block_depth=depth)
    randomize(model, std=0.3)
    ctx = context(model)
    zero = torch.zeros_like(ctx.drive)
    assert torch.equal(model.core.loop_map(None, ctx), model.core.loop_map(zero, ctx))
    h_short, _ = model.core.run(ctx, options=LoopOptions(loops=3))
    h_full, _ = model.core.run(ctx, zero, LoopOptions(loops=3))
    assert torch.equal(h_short, h_full)
    g_short = torch.autograd.grad(
        h_short.square().sum(), list(model.core.parameters()), allow_unused=True, retain_graph=True
    )
    g_full = torch.autograd.grad(h_full.square().sum(), list(model.core.parameters()), allow_unused=True)
    for a, b in zip(g_short, g_full):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_step_macs_match_a_hand_count():
    from loopwm.flops import step_macs

    wm = tiny_model()  # latent 16, hidden 32, inject 32, mlp 64, obs 3, action 1; MLP block of width 64
    parts = step_macs(wm, loops=4)
    assert parts["prelude"] == 1 * 16 + 48 * 32  # action embedding, prelude P([z; 0; U a])
    assert parts["injection"] == 32 * 32 + 32 * 64  # B, and the block's e-path U
    assert parts["loops"] == 64 * 32 + 3 * (32 * 64 + 64 * 32)  # the first loop from h = 0 skips W_in
    assert parts["coda"] == 32 * 64 + 64 * 16
    assert parts["heads"] == 2 * (16 * 64 + 64 * 1)  # reward and continue heads
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    token = step_macs(tiny_model(block="token", block_options={"tokens": 4}), loops=2)
    assert token["loops"] == 2 * (4 * 4 * 8 + 2 * 4 * 8 * 16)  # mixing N²·d plus up and down maps, h = 0 kept
    with pytest.raises(ValueError, match="at least one loop"):
        step_macs(wm, loops=0)


def test_a_warm_started_loop_reaches_the_cold_fixed_point_within_its_bound():
    """The planner's warm states (the same sample's fixed point for a nearby input, as across MPPI iterations;
    the mean of other samples' fixed points, as the elite mean; an arbitrary far state) converge to the same h*
    as zero starts, within each run's certified bound; the nearby one in fewer loops: the contraction forgets
    where it started."""
    model = tiny_model()
    randomize(model, std=0.3)
    with torch.no_grad():
        e = torch.randn(8, model.cfg.inject_dim, generator=torch.Generator().manual_seed(3)) * 3.0
        ctx = model.core.prepare(e)
        prev = model.core.prepare(e + 0.05 * torch.randn(e.shape, generator=torch.Generator().manual_seed(4)))
        h_star = model.core.fixed_point(ctx, tol=1e-5, max_loops=1000)
        nearby = model.core.fixed_point(prev, tol=1e-5, max_loops=1000)
        starts = {
            "nearby": nearby,
            "mean": nearby.mean(0, keepdim=True).expand_as(nearby),
            "far": 50.0 * torch.randn(nearby.shape, generator=torch.Generator().manual_seed(5)),
        }
        opts = LoopOptions(exit="certified", tol=1e-2, min_loops=1, max_loops=500)
        cold, cold_trace = model.core.run(ctx, None, opts)
        runs = {name: model.core.run(ctx, h0, opts) for name, h0 in starts.items()}
    for h, trace in (cold, cold_trace), *runs.values():
        assert torch.all(trace.converged)
        assert torch.all((h - h_star).norm(dim=-1) <= trace.bound + 1e-5)  # h_star itself is within 1e-5
    assert runs["nearby"][1].loops_used.float().mean() < cold_trace.loops_used.float().mean()
    assert runs["far"][1].loops_used.float().mean() > cold_trace.loops_used.float().mean()  # the start is used


def test_imagine_starts_each_step_from_the_states_it_is_given():
    """`imagine(h0=...)` starts step k's loop from h0[k] and `chain=True` from step k−1's exit state; either way
    every step's exit state is within its certified bound of that step's own fixed point, and starting from
    the states a cold rollout ended in takes fewer loops than starting from zero."""
    model = tiny_model()
    randomize(model, std=0.3)
    g = torch.Generator().manual_seed(6)
    z = model.encode(torch.randn(6, 3, generator=g))
    actions = torch.rand(4, 6, 1, generator=g) * 2 - 1
    opts = LoopOptions(exit="certified", tol=1e-2, max_loops=500)
    with torch.no_grad():
        cold = model.imagine(z, actions, decode="none", options=opts)
        rerun = model.imagine(z, actions, decode="none", options=opts, h0=cold.states)
        chained = model.imagine(z, actions, decode="none", options=opts, chain=True)
        for out in (cold, rerun, chained):
            assert out.states.shape == (4, 6, model.cfg.hidden_dim)
            for k in range(4):
                ctx = model.core.prepare(model.injection(out.latents[k], actions[k]))
                h_star = model.core.fixed_point(ctx, tol=1e-5)
                assert torch.all((out.states[k] - h_star).norm(dim=-1) <= out.bound[k] + 1e-5)
    assert torch.all(rerun.loops == 1) and bool((cold.loops > 1).all())
    assert chained.loops[1:].float().mean() != cold.loops[1:].float().mean()  # the chain's starts were used
    with pytest.raises(ValueError, match=r"h0 has shape \(3, 6, 32\); expected \(4, 6, 32\)"):
        model.imagine(z, actions, h0=cold.states[:3])


def test_loop_parameters_are_cached_under_no_grad_until_a_parameter_changes():
    """One computation of κ and the applied weights serves every rollout under no_grad, and an in-place change
    of any loop parameter (an optimiser step, a state-dict load) is seen at once."""
    model = tiny_model()
    with torch.no_grad():
        first = model.core.loop_params()
        assert model.core.loop_params() is first
        before = model.certified_lipschitz()
        model.core.gain_logit.add_(1.0)
        assert model.core.loop_params() is not first
        assert model.certified_lipschitz() > before
        model.core.log_rate.sub_(1.0)  # slower decay: larger retention, larger κ
        assert model.certified_lipschitz() > before
    assert model.core.loop_params() is not model.core.loop_params()  # with gradients: never cached
