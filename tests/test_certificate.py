"""The certificate holds in the dtype the model runs in: spectral bounds, κ, the certified distance, configs.

Every claim is checked against an exact reference: SVD norms for the bounds, an adversarial search for
Lip_h ≤ κ, and a float64 fixed point of the same float32 step for the certified distance.
"""

import dataclasses
import math

import pytest
import torch

import loopwm
from loopwm.certificate import norm_bounds
from loopwm.checkpoint import CheckpointError
from loopwm.config import ConfigError, ModelConfig, load_config
from loopwm.exits import LoopOptions
from loopwm.lipschitz import CertifiedLinear, NonFiniteWeightError, exact_spectral_norm, gamma, spectral_norm_bound
from tests.helpers import tiny_model

BLOCKS_AND_DEPTHS = [(b, d) for b in ("mlp", "token") for d in (1, 2, 3)]
DTYPES = [torch.float32, torch.float64]


def structured_matrices():
    """Matrices whose norms stress a bound: rank 1, a 60-decade diagonal, orthogonal, tiny, huge, zero, rectangular."""
    g = torch.Generator().manual_seed(0)
    return {
        "rank1": torch.outer(torch.randn(40, generator=g), torch.randn(24, generator=g)) * 3.0,
        "diagonal_spread": torch.diag(torch.logspace(-30, 30, 13, dtype=torch.float64)),
        "orthogonal": torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0],
        "tiny": torch.randn(48, 32, generator=g) * 1e-30,
        "huge": torch.randn(32, 48, generator=g) * 1e30,
        "zero": torch.zeros(5, 7),
        "tall": torch.randn(96, 17, generator=g),
        "wide": torch.randn(17, 96, generator=g) * 1e-12,
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_bound_is_a_tight_upper_bound_on_structured_matrices(dtype):
    for name, w in structured_matrices().items():
        w = w.to(dtype)
        exact = exact_spectral_norm(w)  # float64 SVD of the same dtype-rounded entries
        bound = float(spectral_norm_bound(w))
        if exact == 0.0:
            assert bound == 0.0, name
            continue
        assert exact <= bound <= 1.12 * exact, (name, bound / exact)
        lin = CertifiedLinear(w.shape[1], w.shape[0]).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        applied = lin.certify()
        applied_norm = exact_spectral_norm(applied.weight)
        assert 0.88 <= applied_norm <= float(applied.lip) <= 1.0, (name, applied_norm, float(applied.lip))


def test_float32_rounding_term_is_needed_and_has_its_derived_size():
    # 1×1 and diagonal weights: Gershgorin is exact, so only the rounding term ε_i keeps the bound above
    # |w| when the squarings round down (about half of these do).
    g = torch.Generator().manual_seed(0)
    values = torch.rand(2000, generator=g) * 0.5 + 0.5
    for v in values:
        assert float(spectral_norm_bound(v.view(1, 1))) >= float(v)
    diag = torch.diag(values[:64])
    assert float(spectral_norm_bound(diag)) >= float(values[:64].max())
    # For an orthogonal Q the Gershgorin step is exact too, so bound/‖Q‖ − 1 is the rounding term itself,
    # led by ε_0 = γ_n‖Q‖_F² on ‖Q‖² (n = 512 rows, ‖Q‖_F² = 256): γ_512·256/2 ≈ 0.4%.
    q = torch.linalg.qr(torch.randn(512, 256, generator=g, dtype=torch.float64))[0].float()
    excess = float(spectral_norm_bound(q)) / exact_spectral_norm(q) - 1
    predicted = gamma(512, torch.float32) * 256 / 2
    assert predicted <= excess <= 1.5 * predicted


def test_non_finite_weights_raise_naming_the_parameter():
    for bad in (float("nan"), float("inf")):
        w = torch.randn(4, 4)
        w[1, 2] = bad
        with pytest.raises(NonFiniteWeightError, match="my.weight has non-finite"):
            spectral_norm_bound(w, name="my.weight")
    model = tiny_model()
    with torch.no_grad():
        model.core.block.h_path[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=r"core\.block\.h_path\.0\.weight"):
        model.certified_lipschitz()
    with pytest.raises(NonFiniteWeightError, match=r"core\.block\.h_path\.0\.weight"):
        model.step(model.encode(torch.randn(2, 3)), torch.zeros(2, 1))


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1.0, 1e30])
def test_normalised_weight_has_finite_gradients_at_every_scale(scale):
    lin = CertifiedLinear(16, 24)
    with torch.no_grad():
        lin.weight.mul_(scale)
    (lin.certify().weight * torch.randn(24, 16)).sum().backward()
    assert torch.isfinite(lin.weight.grad).all()


# ---- κ and the adversarial ratio ---------------------------------------------------------------------


def randomize(model, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def widen(ctx):
    """The same step's context in float64: the map F with the float32 parameters, evaluated exactly enough."""
    return dataclasses.replace(
        ctx,
        retention=ctx.retention.double(),
        drive=ctx.drive.double(),
        block_ctx=[c.double() for c in ctx.block_ctx],
        weights=[w.double() for w in ctx.weights],
    )


def ratio(core, ctx64, h1, h2):
    """‖F(h1) − F(h2)‖/‖h1 − h2‖ per sample, in float64."""
    return (core.loop_map(h1, ctx64) - core.loop_map(h2, ctx64)).norm(dim=-1) / (h1 - h2).norm(dim=-1)


def train_adversarially(model, steps=60, lr=0.05, seed=0):
    """A brief training run whose objective is the largest ratio, ascending on the parameters and the points
    together: it drives the parameters to where the certificate is nearly tight."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    e = (torch.randn(16, cfg.inject_dim, generator=g) * 3).requires_grad_()
    h1 = torch.randn(16, cfg.hidden_dim, generator=g).requires_grad_()
    dh = (0.3 * torch.randn(16, cfg.hidden_dim, generator=g)).requires_grad_()
    opt = torch.optim.Adam([*model.parameters(), e, h1, dh], lr=lr)
    for _ in range(steps):
        ctx = model.core.prepare(e)
        loss = -torch.log(ratio(model.core, widen(ctx), h1.double(), (h1 + dh).double())).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def adversarial_ratio(model, steps=40, batch=16, seed=1):
    """max ‖F(h1) − F(h2)‖/‖h1 − h2‖ found by Adam over h1, h2 and e (F in float64 with the float32
    parameters the loop applies), and the float32 loop's own worst excess over κ‖h1 − h2‖ + ρ(h1) + ρ(h2)."""
    g = torch.Generator().manual_seed(seed)
    core, cfg = model.core, model.cfg
    e = (torch.randn(batch, cfg.inject_dim, generator=g) * 3).requires_grad_()
    h1 = (torch.randn(batch, cfg.hidden_dim, generator=g) * 3).requires_grad_()
    dh = torch.randn(batch, cfg.hidden_dim, generator=g).requires_grad_()
    opt = torch.optim.Adam([e, h1, dh], lr=0.05)
    model.requires_grad_(False)
    best, excess = 0.0, -math.inf
    with core.weight_scope():
        for _ in range(steps):
            ctx = core.prepare(e)
            r = ratio(core, widen(ctx), h1.double(), (h1 + dh).double())
            best = max(best, float(r.detach().max()))
            with torch.no_grad():
                a, b = h1.detach(), (h1 + dh).detach()
                gap = (core.loop_map(a, ctx) - core.loop_map(b, ctx)).double().norm(dim=-1)
                cert, context = ctx.certificate, sum(norm_bounds(c) for c in ctx.block_ctx)
                rho = sum(cert.rounding(norm_bounds(x), context, norm_bounds(ctx.drive), a.dtype) for x in (a, b))
                allowed = float(cert.kappa) * (a.double() - b.double()).norm(dim=-1) + rho
                excess = max(excess, float((gap - allowed).max()))
            opt.zero_grad()
            (-torch.log(r).mean()).backward()
            opt.step()
    model.requires_grad_(True)
    return best, model.certified_lipschitz(), excess


REGIMES = ("random", "tiny", "huge", "trained", "retention")


def regime_model(block, depth, regime, seed=0):
    """A model at random, tiny (1e-20), huge (1e20) or adversarially trained h-path weights, or one whose
    contraction comes from the retention Ā alone (block gain ~0), where max Ā is the whole of κ."""
    model = tiny_model(block=block, block_depth=depth)
    if regime == "trained":
        train_adversarially(model, seed=seed)
        return model
    if regime == "retention":
        with torch.no_grad():
            model.core.gain_logit.fill_(-12.0)
        return model
    randomize(model, std=1.0, seed=seed)
    with torch.no_grad():
        for lin in model.core.block.linears():
            lin.weight.mul_({"random": 1.0, "tiny": 1e-20, "huge": 1e20}[regime])
    return model


@pytest.mark.parametrize("block,depth", BLOCKS_AND_DEPTHS)
def test_adversarial_ratio_stays_below_kappa(block, depth):
    for regime in REGIMES:
        model = regime_model(block, depth, regime)
        worst, kappa, excess = adversarial_ratio(model)
        assert kappa < model.cfg.kappa_max * (1 + 1e-6), regime
        assert worst <= kappa * (1 + 1e-9), (regime, worst / kappa)
        assert excess <= 0.0, (regime, excess)


@pytest.mark.parametrize("regime", ["random", "tiny", "huge", "paper"])
def test_kappa_is_computed_from_the_weights_the_loop_applies(regime):
    if regime == "paper":
        model = tiny_model(block="token", block_depth=2, constrain_block=False)
        with torch.no_grad():
            for lin in model.core.block.linears():
                lin.weight.mul_(2.0)
    else:
        model = regime_model("token", 2, regime)
    with torch.no_grad():
        ctx = model.core.prepare(torch.randn(2, model.cfg.inject_dim))
    exact = float(ctx.retention.max()) + math.prod(exact_spectral_norm(w) for w in ctx.weights)
    kappa = model.certified_lipschitz()
    assert exact <= kappa <= 1.25 * exact
    assert (kappa < model.cfg.kappa_max * (1 + 1e-6)) == (regime != "paper")


# ---- the certified distance against a float64 fixed point of the same float32 step ---------------------

TOLERANCES = [10.0**-k for k in range(1, 10)]  # every decade a float32 user may ask for, and below


def fixed_point64(core, ctx, h):
    """h* of the map the float32 loop applies, by iterating it in float64 from h until it stops moving."""
    wide, h = widen(ctx), h.double()
    for _ in range(10_000):
        nxt = core.loop_map(h, wide)
        if float((nxt - h).norm(dim=-1).max()) <= 1e-14 * (1 + float(h.norm(dim=-1).max())):
            return nxt
        h = nxt
    raise AssertionError("float64 iteration did not settle")


def near_linear(model):
    """Ā = retention_max everywhere and a negligible block: the loop contracts at exactly κ, so the bound is tight."""
    with torch.no_grad():
        model.core.log_rate.fill_(-20.0)
        model.core.gain_logit.fill_(-12.0)
    return model


@pytest.mark.parametrize("block,depth", BLOCKS_AND_DEPTHS)
def test_certified_bound_covers_the_true_distance_at_every_tolerance(block, depth):
    for model in (regime_model(block, depth, "random"), near_linear(tiny_model(block=block, block_depth=depth))):
        core = model.core
        with torch.no_grad():
            ctx = core.prepare(torch.randn(48, model.cfg.inject_dim, generator=torch.Generator().manual_seed(3)) * 3)
            h_star = fixed_point64(core, ctx, core.run(ctx, options=LoopOptions(loops=50))[0])
            for tol in TOLERANCES:
                h, trace = core.run(ctx, options=LoopOptions(exit="certified", tol=tol, max_loops=300))
                true = (h.double() - h_star).norm(dim=-1)
                assert (true <= trace.bound.double() + 1e-12).all(), (tol, float((true / trace.bound).max()))
                # Not vacuous: certified down to ~20× the float32 grid around h* (u‖h*‖/(1 − κ)).
                reachable = tol >= 1e-6 * h_star.norm(dim=-1) / (1 - float(ctx.kappa))
                assert trace.converged[reachable].all(), tol
            for loops in (1, 3, 10):
                h, trace = core.run(ctx, options=LoopOptions(loops=loops))
                assert ((h.double() - h_star).norm(dim=-1) <= trace.bound.double() + 1e-12).all(), loops


# ---- states carried across environment steps ---------------------------------------------------------


def test_state_carried_across_steps_stays_in_the_invariant_ball():
    """`WorldModel.step` restarts the loop from h = 0 at every environment step unless `h0` is given, so a
    rollout that restarts h tests no more than one step does. This one carries h across 3000 steps through
    `h0`, one loop per step, where a broken contraction would accumulate. Since ‖F(h)‖ ≤ κ‖h‖ + ‖F(0)‖, the
    ball ‖h‖ ≤ M = sup_e ‖F(0, e)‖/(1 − κ) is invariant (plus the rounding ρ/(1 − κ)); an expansive paper-mode
    model carried the same way leaves every such ball."""

    def rollout(model, steps):
        z, h, sizes = model.encode(torch.randn(4, 3)), None, []
        for _ in range(steps):
            z, trace = model.step(z, torch.rand(4, 1) * 2 - 1, h0=h, options=LoopOptions(loops=1))
            h = trace.final_state
            sizes.append(float(h.norm(dim=-1).max()))
            if not math.isfinite(sizes[-1]) or sizes[-1] > 1e6 * sizes[0]:
                break
        return sizes

    model = tiny_model()
    randomize(model, std=0.5)
    core = model.core
    with torch.no_grad():
        ctx = core.prepare(torch.zeros(1, model.cfg.inject_dim))
        cert, kappa = ctx.certificate, float(ctx.kappa)
        e_norm = model.cfg.inject_dim**0.5  # the injection is RMS-normalised
        delta = torch.nn.functional.softplus(core.delta_raw)
        drive = exact_spectral_norm(delta[:, None] * core.inject.weight) * e_norm
        (u,) = core.block.e_path
        first = exact_spectral_norm(u.weight) * e_norm + float(u.bias.norm())  # ‖relu(Ue + b)‖ ≤ ‖Ue + b‖
        sup_f0 = drive + cert.lips[-1] * first
        radius = sup_f0 / (1 - kappa)
        big = torch.tensor([2 * radius], dtype=torch.float64)
        radius += float(cert.rounding(big, torch.tensor([first]), torch.tensor([drive]), torch.float32)) / (1 - kappa)
        sizes = rollout(model, 3000)
        assert len(sizes) == 3000 and max(sizes) <= radius
        paper = tiny_model(constrain_block=False)
        for lin in paper.core.block.linears():
            lin.weight.mul_(4.0)
        assert paper.certified_lipschitz() > 1.0
        sizes = rollout(paper, 300)
        assert max(sizes) > 1e3 * sizes[0]


# ---- configs that would break the certificate are refused at every door -----------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"kappa_max": 1.0}, "kappa_max=1.0"),
        ({"retention_max": 0.9}, "retention_max=0.9 must be < model.kappa_max"),
        ({"retention_max": 0.95, "kappa_max": 0.9}, "retention_max=0.95"),
    ],
)
def test_configs_without_a_contraction_budget_are_refused(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**bad)
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text("model:\n" + "".join(f"  {k}: {v}\n" for k, v in bad.items()))
    with pytest.raises(ConfigError, match=message):
        load_config(yaml_path)
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.{k}={v}" for k, v in bad.items()])
    # A checkpoint whose stored model config says so is refused when loaded.
    path = tmp_path / "wm.pt"
    loopwm.save(path, tiny_model())
    payload = torch.load(path, weights_only=True)
    payload["model_config"].update(bad)
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match=message):
        loopwm.load(tmp_path / "tampered.pt")
