"""Depth where the error is: the relative exit, the learned error head and the per-rule depth statistics."""

import numpy as np
import pytest
import torch

from loopwm.analysis.depth import depth_stats, exit_depth
from loopwm.analysis.stats import auroc
from loopwm.config import ConfigError, from_dict
from loopwm.exits import EXIT_RULES, LoopOptions
from loopwm.objective import TERMS, QuantileTracker, sequence_loss, term_weights
from loopwm.replay import ReplayBuffer
from loopwm.train import Trainer
from loopwm.world_model import WorldModel
from tests.helpers import TINY, box_spaces, tiny_model


def split_dataset(episodes: int = 16, steps: int = 16, seed: int = 0) -> ReplayBuffer:
    """x' = 0.9 x + 0.3 a on two dims, with a third dim flagging the episode: +1 episodes ("hard") add large
    noise to every transition, −1 episodes are noise-free, so the hard half's true error is known."""
    rng = np.random.default_rng(seed)
    buffer = ReplayBuffer((3,), 1, 10_000)
    for ep in range(episodes):
        flag = 1.0 if ep % 2 else -1.0
        x = np.r_[rng.normal(size=2), flag]
        obs, actions = [x], []
        for _ in range(steps):
            a = rng.uniform(-1, 1, size=1)
            nxt = 0.9 * x[:2] + 0.3 * a + (rng.normal(scale=1.0, size=2) if flag > 0 else 0.0)
            x = np.r_[nxt, flag]
            obs.append(x)
            actions.append(a)
        truncated = np.zeros(steps, bool)
        truncated[-1] = True
        buffer.add_episode(
            np.array(obs, np.float32),
            np.array(actions, np.float32),
            np.zeros(steps, np.float32),
            ~truncated & False,
            truncated,
        )
    return buffer


def config(model=None, **train):
    return from_dict({"device": "cpu", "model": {**TINY, **(model or {})}, "train": train})


def new_model(cfg, data: ReplayBuffer) -> WorldModel:
    torch.manual_seed(0)
    wm = WorldModel.from_config(cfg, *box_spaces())
    stats = data.stats()
    wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
    return wm


# ---- the relative exit ------------------------------------------------------------------------------------------
def test_relative_exit_spends_more_loops_on_the_half_started_far_from_its_fixed_point():
    torch.manual_seed(0)
    wm = tiny_model(error_head=True)
    z = wm.encode(torch.randn(8, 3)).repeat(2, 1)
    action = (torch.rand(8, 1) * 2 - 1).repeat(2, 1)
    ctx = wm.core.prepare(wm.injection(z, action))
    h_star = wm.core.fixed_point(ctx)
    far = h_star + 20.0 * torch.randn_like(h_star)
    h0 = torch.cat([h_star[:8] + 1e-3 * torch.randn(8, h_star.shape[1]), far[8:]])  # second half: the hard one
    opts = LoopOptions(exit="relative", rel_tol=0.01, max_loops=200)
    with torch.no_grad():
        _, trace = wm.core.run(ctx, h0, opts)
    used = trace.loops_used
    assert bool((used[8:] > used[:8]).all()), used.tolist()
    # every sample stopped because its bound met its own tolerance, before the cap
    tol = opts.rel_tol * wm.core.predicted_distance(trace.final_state)
    assert bool((used < opts.max_loops).all()) and bool((trace.bound <= tol).all())


def test_relative_exit_stops_sooner_where_the_predicted_error_is_larger():
    torch.manual_seed(0)
    wm = tiny_model(error_head=True)
    z, action = wm.encode(torch.randn(16, 3)), torch.rand(16, 1) * 2 - 1
    loops = []
    for offset in (-6.0, -2.0):  # predicted consistency errors e^-6 and e^-2
        wm.core.error_offset.fill_(offset)
        _, trace = wm.step(z, action, options=LoopOptions(exit="relative", rel_tol=0.1, max_loops=200))
        loops.append(trace.loops_used)
    assert bool((loops[1] <= loops[0]).all()) and loops[1].float().mean() < loops[0].float().mean()


def test_relative_exit_is_registered_and_its_options_are_checked_at_the_door():
    assert EXIT_RULES["relative"].uses_bound
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="rel_tol"):
            LoopOptions(exit="relative", rel_tol=bad)
    with pytest.raises(ValueError, match="needs exit='fixed'"):
        LoopOptions(exit="relative", loops=3)
    with pytest.raises(TypeError):
        LoopOptions(exit="relative", rel_tolerance=0.1)
    with pytest.raises(ConfigError, match="model.exit_rel_tol"):
        config({"exit_rel_tol": 0.0})
    with pytest.raises(ConfigError, match="planner.exit_rel_tol"):
        from_dict({"planner": {"exit_rel_tol": -1.0}})
    with pytest.raises(ConfigError, match="train.w_error"):
        config(w_error=-0.1)
    with pytest.raises(ConfigError, match="model.exit='relative' needs the error head: set model.error_head=true"):
        config({"exit": "relative"}, w_error=0.1)
    with pytest.raises(ConfigError, match="train.w_error=0.1 needs the error head"):
        config(w_error=0.1)
    with pytest.raises(ConfigError, match="train.w_error=0 leaves"):
        config({"exit": "relative", "error_head": True})
    with pytest.raises(ConfigError, match="train.w_error=0 leaves"):
        from_dict({"model": {"error_head": True}, "planner": {"exit": "relative"}})
    with pytest.raises(ConfigError, match="needs a shared block"):
        config({"exit": "relative", "shared": False, "error_head": True}, w_error=0.1)
    with pytest.raises(ConfigError, match="train.w_error=0"):
        config({"dynamics": "mlp"}, extra_loops=0, w_deep=0, w_gate=0, w_error=0.1)
    assert (
        LoopOptions.from_config(
            config({"exit_rel_tol": 0.3, "error_head": True}, w_error=0.1).model, exit="relative"
        ).rel_tol
        == 0.3
    )


# ---- the error head and its term --------------------------------------------------------------------------------
def test_the_error_term_is_off_by_default_and_leaves_the_loss_bit_identical():
    data = split_dataset()
    default, off = config(horizon=2, batch_size=8), config(horizon=2, batch_size=8, w_error=0.0)
    assert term_weights(default.train)["error"] == 0.0 and "error" in TERMS
    batch = data.sample(8, 2, np.random.default_rng(1))
    losses = []
    for cfg in (default, off):
        wm = new_model(cfg, data)
        loss, terms, _ = sequence_loss(wm, batch, cfg.train, torch.Generator().manual_seed(3), QuantileTracker(0.9))
        loss.backward()
        assert float(terms["error"]) == 0.0 and wm.core.error_head is None  # no head, no extra parameters
        losses.append(loss)
    assert losses[0].item() == losses[1].item()
    # and the loss is the sum of the other terms alone, as before the error term existed
    on = config({"error_head": True}, horizon=2, batch_size=8, w_error=1.0)
    wm = new_model(on, data)
    loss_on, terms_on, _ = sequence_loss(wm, batch, on.train, torch.Generator().manual_seed(3), QuantileTracker(0.9))
    assert float(terms_on["error"]) > 0 and loss_on.item() == pytest.approx(losses[0].item() + float(terms_on["error"]))


def test_error_head_learns_to_rank_the_known_hard_half():
    torch.set_num_threads(1)
    data = split_dataset()
    cfg = config({"error_head": True}, updates=40, batch_size=32, horizon=2, lr=3e-3, w_error=1.0, log_every=1000)
    trainer = Trainer(new_model(cfg, data), cfg, data)
    for _ in range(cfg.train.updates):
        trainer.update()
    wm = trainer.wm.eval()
    held_out = split_dataset(seed=1)
    batch = held_out.sample(256, 1, np.random.default_rng(0))
    obs, action = batch["obs"], batch["actions"][0]
    hard = obs[0, :, 2] > 0
    with torch.no_grad():
        _, trace = wm.step(wm.encode(obs[0]), action)
        predicted = wm.core.predicted_log_error(trace.final_state)
    print("AUROC", auroc(predicted, hard))
    assert auroc(predicted, hard) > 0.9


# ---- per-rule depth statistics ----------------------------------------------------------------------------------
def test_depth_stats_on_a_known_table():
    error = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 5.0])
    loops = torch.arange(1, 11)
    perfect, inverse = error.clone(), -error
    out = depth_stats(error, loops, {"head": perfect, "bound": inverse, "flat": torch.ones(10)})
    assert out["spearman_loops_error"] == pytest.approx(1.0)
    assert out["auroc_head"] == 1.0 and out["auroc_bound"] == 0.0 and out["auroc_flat"] is None
    assert out["mean_loops"] == 5.5 and out["error_mean"] == pytest.approx(float(error.mean()))
    assert depth_stats(error, torch.full((10,), 4), {})["spearman_loops_error"] is None


def test_exit_depth_reports_every_signal_for_every_rule():
    torch.manual_seed(0)
    wm = tiny_model(error_head=True)
    z, action = wm.encode(torch.randn(32, 3)), torch.rand(32, 1) * 2 - 1
    target = wm.encode(torch.randn(32, 3))
    for name in EXIT_RULES:
        out = exit_depth(wm, z, action, target, LoopOptions(exit=name))
        assert {"mean_loops", "error_mean", "spearman_loops_error", "auroc_bound", "auroc_agreement"} <= set(out)
        assert "auroc_head" in out  # None here: an untrained head predicts one constant


def test_the_head_exists_only_when_asked_so_default_checkpoints_keep_their_layout(tmp_path):
    import loopwm

    plain = tiny_model()
    assert plain.core.error_head is None and not any("error" in k for k in plain.state_dict())
    wm = tiny_model(error_head=True)
    with torch.no_grad():
        for p in wm.core.error_head.parameters():
            p.normal_()
        wm.core.error_offset.fill_(-3.0)
    loopwm.save(tmp_path / "head.pt", wm)
    loaded = loopwm.load(tmp_path / "head.pt")
    h = torch.randn(5, 32)
    assert torch.equal(loaded.core.predicted_log_error(h), wm.core.predicted_log_error(h))
    assert float(loaded.core.error_offset) == -3.0
    with pytest.raises(ValueError, match="model.error_head=true"):
        plain.core.predicted_log_error(torch.zeros(2, 32))


def test_the_head_is_linear_or_one_silu_layer_starts_constant_and_leaves_the_rest_of_the_model_as_it_was():
    torch.manual_seed(7)
    plain = tiny_model()
    after_plain = torch.get_rng_state()
    h = torch.randn(6, 32)
    for hidden, kind in ((0, torch.nn.Linear), (64, torch.nn.Sequential)):
        torch.manual_seed(7)
        wm = tiny_model(error_head=True, error_head_hidden=hidden)
        assert torch.equal(torch.get_rng_state(), after_plain)  # building the head drew nothing from the global RNG
        assert isinstance(wm.core.error_head, kind)
        shared = {k: v for k, v in wm.state_dict().items() if "error" not in k}
        assert shared.keys() == plain.state_dict().keys()
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())
        assert torch.equal(wm.core.predicted_log_error(h), torch.zeros(6))  # untrained: one constant, an error of 1
    assert wm.core.error_head[0].weight.abs().sum() > 0  # the hidden layer itself is not zero


def test_a_checkpoint_saved_with_the_linear_head_loads_as_one(tmp_path):
    import loopwm
    from loopwm.checkpoint import read_checkpoint

    wm = tiny_model(error_head=True, error_head_hidden=0)
    loopwm.save(tmp_path / "old.pt", wm)
    payload = read_checkpoint(tmp_path / "old.pt")
    del payload["model_config"]["error_head_hidden"]  # written before the key existed
    torch.save(payload, tmp_path / "old.pt")
    assert isinstance(loopwm.load(tmp_path / "old.pt").core.error_head, torch.nn.Linear)


@pytest.mark.parametrize("decoder", ["absolute", "delta"])
def test_the_error_term_regresses_the_head_on_each_steps_own_observation_error(decoder):
    from loopwm.objective import step_obs_error

    data = split_dataset()
    for target in ("obs", "latent"):
        cfg = config({"error_head": True, "obs_decoder": decoder}, horizon=1, batch_size=8, w_error=1.0,
                     error_target=target, loop_sampling="fixed")  # fmt: skip
        wm = new_model(cfg, data)
        with torch.no_grad():
            for p in wm.core.error_head.parameters():
                p.normal_(std=0.1)
        batch = data.sample(8, 1, np.random.default_rng(0))
        _, terms, _ = sequence_loss(wm, batch, cfg.train, torch.Generator().manual_seed(3), QuantileTracker(0.9))
        obs, action = batch["obs"], batch["actions"][0].float()
        z = wm.encode(obs[0])
        z1, trace = wm.step(z, action)
        true = wm.normalize_obs(obs[1])
        if target == "latent":
            err = (z1 - wm.encode(obs[1])).pow(2).mean(-1)
        elif decoder == "delta":  # the step's change on the true previous observation
            err = (wm.normalize_obs(obs[0]) + wm.decode_delta(z, z1) - true).pow(2).mean(-1)
        else:
            err = (wm.decoder(z1) - true).pow(2).mean(-1)
        if target == "obs":
            assert torch.allclose(step_obs_error(wm, z, z1, obs[0], true), err)
        expected = (wm.core.predicted_log_error(trace.final_state) - torch.log(err + 1e-8)).pow(2).mean()
        assert float(terms["error"]) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_the_heads_width_and_target_are_inert_only_while_nothing_builds_or_trains_the_head():
    from loopwm.config_rules import inert_keys

    charge = "config.planner.uncertainty"  # what the planner's penalty charges, inert while the penalty is 0
    both = {"config.model.error_head_hidden", "config.train.error_target", charge}
    assert inert_keys(config()) == both
    assert inert_keys(config({"error_head": True})) == {"config.train.error_target", charge}
    assert inert_keys(config({"error_head": True}, w_error=0.1)) == {charge}
    penalised = from_dict(
        {"model": {**TINY, "error_head": True}, "train": {"w_error": 0.1}, "planner": {"uncertainty_penalty": 1.0}}
    )
    assert inert_keys(penalised) == set()


def test_the_head_watches_without_changing_the_model_it_learns_from():
    torch.set_num_threads(1)
    data = split_dataset()
    trained = {}
    for head in (False, True):
        # a tight clip, so that head gradients folded into the model's norm would rescale the model's updates
        cfg = config({"error_head": head}, updates=6, batch_size=16, horizon=2, w_error=10.0 if head else 0.0,
                     grad_clip=0.05, log_every=1000)  # fmt: skip
        trainer = Trainer(new_model(cfg, data), cfg, data)
        for _ in range(cfg.train.updates):
            trainer.update()
        trained[head] = trainer.wm.state_dict()
    with_head = {k: v for k, v in trained[True].items() if "error" not in k}
    assert with_head.keys() == trained[False].keys()
    assert all(torch.equal(v, trained[False][k]) for k, v in with_head.items())


def test_the_terminal_table_shows_each_confidence_signal_it_has():
    from loopwm.analysis.prediction import format_table, prediction_errors

    data = split_dataset()
    wm = tiny_model(error_head=True)
    with torch.no_grad():
        for p in wm.core.error_head.parameters():
            p.normal_()
    text = format_table(prediction_errors(wm, data, horizons=(1, 5), sequences=32))
    line = text.splitlines()[-1]
    assert line.startswith("AUROC flagging the top-10% step-1 errors: error head 0.") and "certified bound 0." in line
    plain = format_table(prediction_errors(tiny_model(), data, horizons=(1,), sequences=32))
    assert "error head" not in plain and "certified bound" in plain
    result = prediction_errors(tiny_model(), data, horizons=(1,), sequences=32)
    result["horizons"]["1"].update(model=3.21e-5, predict_mean=0.5, no_change=1.2e-4, reward_mse=7e-6)
    row = format_table(result).splitlines()[2].split("|")
    assert [c.strip() for c in row[1:5]] == ["3.21e-05", "0.5", "0.00012", "7e-06"]  # small errors are not 0


def test_a_non_finite_gradient_in_the_head_skips_the_step_like_one_in_the_model():
    data = split_dataset()
    cfg = config({"error_head": True}, updates=4, batch_size=8, horizon=2, w_error=1.0, log_every=1000)
    trainer = Trainer(new_model(cfg, data), cfg, data)
    head = trainer.wm.core.error_head
    before = {k: v.clone() for k, v in trainer.wm.state_dict().items()}
    hook = head[-1].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    assert trainer.update() == {} and trainer.nonfinite_skipped == 1
    assert all(torch.equal(v, before[k]) for k, v in trainer.wm.state_dict().items() if "error_offset" not in k)
    hook.remove()
    assert trainer.update() and all(torch.isfinite(p).all() for p in head.parameters())


def test_the_observation_target_of_each_step_is_anchored_at_that_steps_true_observation(monkeypatch):
    import loopwm.objective as objective

    data = split_dataset()
    cfg = config({"error_head": True, "obs_decoder": "delta"}, horizon=3, batch_size=8, w_error=1.0,
                 loop_sampling="fixed", w_deep=0.0, w_gate=0.0, extra_loops=0)  # fmt: skip
    wm = new_model(cfg, data)
    calls, real = [], objective.step_obs_error
    monkeypatch.setattr(objective, "step_obs_error", lambda *a: calls.append(a) or real(*a))
    batch = data.sample(8, 3, np.random.default_rng(0))
    objective.sequence_loss(wm, batch, cfg.train, torch.Generator().manual_seed(3), QuantileTracker(0.9))
    assert len(calls) == 3
    with torch.no_grad():
        z = wm.encode(batch["obs"][0])
        for k, (_, z_in, z_out, obs, target) in enumerate(calls):
            assert torch.equal(obs, batch["obs"][k]) and torch.equal(target, wm.normalize_obs(batch["obs"][k + 1]))
            assert torch.allclose(z_in, z)  # the open-loop latent, not the encoding of the true observation
            z, _ = wm.step(z, batch["actions"][k].float())
            assert torch.allclose(z_out, z)


def test_predict_error_is_the_heads_prediction_and_refused_without_a_head():
    wm = tiny_model(error_head=True)
    with torch.no_grad():
        for p in wm.core.error_head.parameters():
            p.normal_()
        wm.core.error_offset.fill_(-2.0)
    z = wm.encode(torch.randn(4, 3))
    _, trace = wm.step(z, torch.zeros(4, 1))
    expected = torch.exp(wm.core.predicted_log_error(trace.final_state))
    assert torch.equal(wm.predict_error(trace), expected) and expected.shape == (4,)
    with pytest.raises(ValueError, match="model.error_head=true"):
        tiny_model().predict_error(trace)
