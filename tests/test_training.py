"""Training: every loss term falls, depth goes to the hard samples, the gate learns from real per-loop
losses, resumes are exact (plain and Lookahead), logs land in TensorBoard and metrics.jsonl, and a tiny model
learns real Pendulum dynamics better than both baselines. The optimisers themselves: tests/test_optim.py."""

import copy
import json
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from torch import nn

from loopwm import objective
from loopwm.analysis.prediction import prediction_errors
from loopwm.config import from_dict
from loopwm.exits import LoopOptions
from loopwm.logger import RunLogger
from loopwm.objective import QuantileTracker, gate_targets, hard_mask, sample_loops, sequence_loss
from loopwm.replay import ReplayBuffer
from loopwm.train import Trainer, restore_run, save_run
from loopwm.world_model import WorldModel
from tests.helpers import TINY, box_spaces


def config(model=None, **train):
    """A tiny model with the given `train` settings (CPU, seed 0)."""
    return from_dict({"device": "cpu", "model": {**TINY, **(model or {})}, "train": train})


Reward = Callable[[np.ndarray, np.ndarray], float]


def linear_dataset(episodes: int = 12, steps: int = 20, seed: int = 0, reward: Optional[Reward] = None) -> ReplayBuffer:
    """x' = A x + B a with reward −‖x‖² (or `reward(x, x')`); even episodes end terminated, odd ones truncated."""
    rng = np.random.default_rng(seed)
    a_mat = np.array([[0.9, 0.2, 0.0], [-0.2, 0.9, 0.0], [0.0, 0.1, 0.8]])
    b_mat = np.array([[0.0], [0.5], [0.3]])
    buffer = ReplayBuffer((3,), 1, 10_000)
    for ep in range(episodes):
        x = rng.normal(size=3)
        obs, actions, rewards = [x], [], []
        for _ in range(steps):
            a = rng.uniform(-1, 1, size=1)
            x_next = a_mat @ x + b_mat @ a
            rewards.append(-float(x @ x) if reward is None else reward(x, x_next))
            x = x_next
            obs.append(x)
            actions.append(a)
        terminated, truncated = np.zeros(steps, bool), np.zeros(steps, bool)
        (terminated if ep % 2 == 0 else truncated)[-1] = True
        buffer.add_episode(
            np.array(obs, np.float32),
            np.array(actions, np.float32),
            np.array(rewards, np.float32),
            terminated,
            truncated,
        )
    return buffer


def new_model(cfg, data: ReplayBuffer, seed: int = 0) -> WorldModel:
    torch.manual_seed(seed)
    wm = WorldModel.from_config(cfg, *box_spaces())
    stats = data.stats()
    wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
    return wm


def clone_generator(g: torch.Generator) -> torch.Generator:
    out = torch.Generator()
    out.set_state(g.get_state())
    return out


@pytest.fixture(scope="module")
def trained():
    """A tiny model fitted for 100 updates on the linear system, with every update's scalars."""
    torch.set_num_threads(1)
    data = linear_dataset()
    cfg = config(updates=100, batch_size=16, horizon=3, lr=3e-3, hard_quantile=0.5, log_every=1000)
    trainer = Trainer(new_model(cfg, data), cfg, data)
    history = [trainer.update() for _ in range(cfg.train.updates)]
    return trainer, history, data


# ---- 1. every loss term falls -------------------------------------------------------------------
def test_training_lowers_every_loss_term(trained):
    _, history, _ = trained
    assert set(objective.TERMS) == {
        "consistency",
        "obs",
        "reward",
        "reward_encoded",
        "continue",
        "deep",
        "extra",
        "gate",
        "delta",
        "recon",
        "error",
    }
    # no delta decoder; w_recon = w_error = w_reward_encoded = 0
    off = ("delta", "recon", "error", "reward_encoded")
    assert all(h[f"loss/{term}"] == 0 for h in history for term in off)
    for term in set(objective.TERMS) - set(off):
        values = np.array([h[f"loss/{term}"] for h in history])
        assert np.isfinite(values).all(), term
        early, late = values[:15].mean(), values[-15:].mean()
        assert early > 0, term  # the term is live, not a constant zero
        # the gate's targets are noisy Bernoulli labels, so its BCE keeps an entropy floor
        factor = 0.8 if term == "gate" else 0.5
        assert late < factor * early, f"loss/{term}: first updates {early:.4f}, last updates {late:.4f}"
    total = np.array([h["loss/total"] for h in history])
    assert total[-15:].mean() < 0.2 * total[:15].mean()
    assert all(h["certificate/kappa"] < 1.0 for h in history)
    assert any(h["loops/hard_fraction"] > 0 for h in history[-30:])  # extra loops still in use late on


@pytest.mark.parametrize("latent_update", ["absolute", "residual"])
def test_delta_decoder_learns_changes_better_than_no_change(latent_update):
    """Its head starts at "no change", so its first losses are the no-change error; training goes well below,
    with either latent update; consistency and the autoencoder term fall too."""
    torch.set_num_threads(1)
    data = linear_dataset()
    cfg = config(
        {"obs_decoder": "delta", "latent_update": latent_update},
        updates=100,
        batch_size=16,
        horizon=3,
        lr=3e-3,
        log_every=1000,
        w_recon=1.0,
    )
    trainer = Trainer(new_model(cfg, data), cfg, data)
    history = [trainer.update() for _ in range(cfg.train.updates)]
    for term, factor in (("delta", 0.3), ("consistency", 0.5), ("recon", 0.5)):
        values = np.array([h[f"loss/{term}"] for h in history])
        assert np.isfinite(values).all() and values[:10].mean() > 0, term
        assert values[-10:].mean() < factor * values[:10].mean(), term


# ---- 2. more loops for the samples with the higher error -----------------------------------------
def test_quantile_tracker_tracks_a_known_quantile():
    g = torch.Generator().manual_seed(0)
    tracker = QuantileTracker(0.9)
    first = torch.rand(2000, generator=g)
    assert tracker.update(first) == pytest.approx(float(torch.quantile(first, 0.9)))
    second = torch.rand(2000, generator=g)
    expected = tracker.decay * tracker.value + (1 - tracker.decay) * float(torch.quantile(second, 0.9))
    assert tracker.update(second) == pytest.approx(expected)
    for _ in range(300):
        tracker.update(torch.rand(2000, generator=g))
    assert tracker.value == pytest.approx(0.9, abs=0.01)  # U(0, 1): the 0.9 quantile is 0.9
    for _ in range(300):  # the distribution shifts: it follows
        tracker.update(3.0 * torch.rand(2000, generator=g))
    assert tracker.value == pytest.approx(2.7, abs=0.03)
    median = QuantileTracker(0.5)
    errors = torch.tensor([0.1, 5.0, 0.2, 7.0, 0.3, 6.0])
    assert hard_mask(errors, median.update(errors)).tolist() == [False, True, False, True, False, True]


def test_extra_loops_go_exactly_to_the_hard_samples(trained):
    trainer, _, data = trained
    wm = copy.deepcopy(trainer.wm)
    size, extra = 16, 3
    batch = data.sample(size, 1, np.random.default_rng(5))
    hard = torch.zeros(size, dtype=torch.bool)
    hard[torch.randperm(size, generator=torch.Generator().manual_seed(3))[: size // 2]] = True
    # the hard half's next observations are far outside anything the model has seen or predicts
    batch["obs"][1, hard] = torch.tensor([40.0, -40.0, 40.0])
    cfg = config(horizon=1, batch_size=size, extra_loops=extra, w_extra=0.5, hard_quantile=0.5).train
    generator = torch.Generator().manual_seed(1)
    base = sample_loops(size, cfg.loop_mean, wm.cfg, clone_generator(generator))
    assert base.unique().numel() > 1  # per-sequence loop counts really vary
    _, terms, stats = sequence_loss(wm, batch, cfg, generator, QuantileTracker(0.5))
    used = stats.loops[0]
    assert torch.equal(used, base + extra * hard.long())
    assert used[hard].float().mean() > used[~hard].float().mean()
    assert stats.hard_fraction == 0.5
    assert float(terms["extra"]) > 0
    # with extra loops switched off every sample keeps its sampled count
    off = config(horizon=1, batch_size=size, extra_loops=0, hard_quantile=0.5).train
    generator = torch.Generator().manual_seed(1)
    _, terms, stats = sequence_loss(wm, batch, off, generator, QuantileTracker(0.5))
    assert torch.equal(stats.loops[0], base) and stats.hard_fraction == 0.0 and float(terms["extra"]) == 0.0


def test_latent_spread_reports_an_encoder_collapsed_onto_one_latent():
    data = linear_dataset()
    cfg = config(horizon=2, batch_size=8)
    wm = new_model(cfg, data)
    batch = data.sample(8, 2, np.random.default_rng(3))
    _, _, stats = sequence_loss(wm, batch, cfg.train, torch.Generator().manual_seed(0), QuantileTracker(0.5))
    assert stats.latent_spread > 0.05  # distinct observations, distinct latents
    last = [m for m in wm.encoder.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():  # the encoder now maps every observation to the same latent
        last.weight.zero_()
        last.bias.copy_(torch.linspace(-1, 1, last.bias.numel()))
    _, _, stats = sequence_loss(wm, batch, cfg.train, torch.Generator().manual_seed(0), QuantileTracker(0.5))
    assert stats.latent_spread < 1e-5


# ---- 3. the gate learns from the real per-loop losses ---------------------------------------------
def test_gate_targets_on_a_known_loss_table():
    table = torch.tensor(
        [
            # improving | plateau | up then down | gain below the relative margin | worse
            [1.0, 1.0, 1.0, 1.0, 0.5],
            [0.5, 1.0, 0.5, 0.99995, 0.6],
            [0.25, 1.0, 0.6, 0.5, 0.7],
            [0.2, 1.0, 0.3, 0.4, 0.8],
        ]
    )
    expected = torch.tensor(
        [
            [0.0, 1.0, 0.0, 1.0, 1.0],
            [0.0, 1.0, 1.0, 0.0, 1.0],
            [0.0, 1.0, 0.0, 0.0, 1.0],
        ]
    )
    assert torch.equal(gate_targets(table), expected)
    assert gate_targets(table).shape == (3, 5)  # the last loop has no successor
    assert gate_targets(table, margin=0.0)[0, 3] == 0.0  # any gain counts without a margin


def test_sequence_loss_feeds_the_gate_the_real_per_loop_losses(monkeypatch):
    data = linear_dataset()
    cfg = config(horizon=1, batch_size=8, loop_mean=5.0, extra_loops=0, w_gate=1.0)
    wm = new_model(cfg, data)
    batch = data.sample(8, 1, np.random.default_rng(2))
    calls = []

    def spy(per_loop_loss, margin=1e-4):
        calls.append(per_loop_loss.clone())
        return gate_targets(per_loop_loss, margin)

    monkeypatch.setattr(objective, "gate_targets", spy)
    generator = torch.Generator().manual_seed(4)
    loops = sample_loops(8, cfg.train.loop_mean, wm.cfg, clone_generator(generator))
    _, terms, _ = sequence_loss(wm, batch, cfg.train, generator, QuantileTracker(0.9))
    assert len(calls) == 1 and not calls[0].requires_grad
    # recompute the per-loop readout losses independently
    with torch.no_grad():
        target = wm.encode(batch["obs"][1])
        z = wm.encode(batch["obs"][0])
        ctx = wm.core.prepare(wm.injection(z, batch["actions"][0]))
        _, trace = wm.core.run(ctx, options=LoopOptions(loops=loops), readout=wm.readout_for(z))
        expected = torch.stack([(r - target).pow(2).mean(-1) for r in trace.readouts])
    assert calls[0].shape == (int(loops.max()), 8)
    torch.testing.assert_close(calls[0], expected, rtol=1e-5, atol=1e-6)
    # the gate term is driven by those targets: flip them and the term changes
    monkeypatch.setattr(objective, "gate_targets", lambda loss, margin=1e-4: 1.0 - gate_targets(loss, margin))
    _, flipped, _ = sequence_loss(wm, batch, cfg.train, torch.Generator().manual_seed(4), QuantileTracker(0.9))
    assert float(flipped["gate"]) != pytest.approx(float(terms["gate"]), rel=1e-3)
    for name in ("consistency", "obs", "reward", "continue", "deep"):
        assert torch.equal(flipped[name], terms[name]), name


# ---- 4. resume equivalence ------------------------------------------------------------------------
@pytest.mark.parametrize("lookahead", [False, True], ids=["adam", "lookahead"])
def test_resume_is_exact(tmp_path, lookahead):
    data = linear_dataset()
    total = 8  # Lookahead syncs every 5 steps, so the resumed half crosses a sync with saved slow weights
    cfg = config(
        updates=total,
        batch_size=8,
        horizon=2,
        lookahead=lookahead,
        lr_schedule="cosine",
        warmup=2,
        hard_quantile=0.5,
        log_every=1000,
    )
    straight = Trainer(new_model(cfg, data), cfg, data)
    straight.fit(total, progress=False)

    first = Trainer(new_model(cfg, data), cfg, data)
    first.fit(total // 2, progress=False)
    save_run(tmp_path / "ckpt.pt", first)
    fresh = Trainer(new_model(cfg, data, seed=123), cfg, ReplayBuffer((3,), 1, 10_000))
    assert not torch.equal(next(fresh.wm.parameters()), next(first.wm.parameters()))  # really fresh
    restore_run(tmp_path / "ckpt.pt", fresh)
    assert fresh.updates == total // 2 and len(fresh.replay) == len(data)
    fresh.fit(total, progress=False)

    assert fresh.updates == straight.updates == total
    for (name, a), (_, b) in zip(straight.wm.state_dict().items(), fresh.wm.state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh.tracker.value == straight.tracker.value
    assert fresh.schedule.get_last_lr() == straight.schedule.get_last_lr()
    # and the next batches drawn agree too
    assert torch.equal(fresh.replay.sample(4, 2, fresh.rng)["obs"], straight.replay.sample(4, 2, straight.rng)["obs"])


def test_a_signal_stops_fit_at_an_update_boundary_and_saves_there(tmp_path, monkeypatch):
    import os
    import signal

    from loopwm.app.session import StopSignal

    data = linear_dataset()
    cfg = config(updates=20, batch_size=8, horizon=2, log_every=1000, checkpoint_every=1000)
    trainer = Trainer(new_model(cfg, data), cfg, data)
    update = Trainer.update

    def update_then_kill(self):
        out = update(self)
        if self.updates == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run, as from `kill` or a scheduler
        return out

    monkeypatch.setattr(Trainer, "update", update_then_kill)
    with StopSignal() as stop:
        trainer.fit(20, progress=False, on_checkpoint=lambda: save_run(tmp_path / "ckpt.pt", trainer), stop=stop)
        with pytest.raises(SystemExit) as exited:
            stop.exit_if_received()
    assert exited.value.code == 128 + signal.SIGTERM
    assert trainer.updates == 7
    fresh = Trainer(new_model(cfg, data, seed=5), cfg, data)
    restore_run(tmp_path / "ckpt.pt", fresh)
    assert fresh.updates == 7
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_a_second_signal_interrupts_at_once():
    import os
    import signal

    from loopwm.app.session import StopSignal

    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


def test_resuming_with_lookahead_toggled_is_refused(tmp_path):
    data = linear_dataset(episodes=4)
    cfg = config(updates=1, batch_size=4, horizon=2)
    trainer = Trainer(new_model(cfg, data), cfg, data)
    trainer.fit(1, progress=False)
    save_run(tmp_path / "ckpt.pt", trainer)
    toggled = config(updates=1, batch_size=4, horizon=2, lookahead=True)
    with pytest.raises(ValueError, match="train.lookahead changed"):
        restore_run(tmp_path / "ckpt.pt", Trainer(new_model(toggled, data), toggled, data))


# ---- 5. TensorBoard events and metrics.jsonl ------------------------------------------------------
def test_tensorboard_and_jsonl_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = linear_dataset(episodes=4)
    cfg = config(updates=4, batch_size=4, horizon=2, log_every=2)
    run = tmp_path / "run"
    logger = RunLogger(run)
    trainer = Trainer(new_model(cfg, data), cfg, data, logger)
    trainer.fit(progress=False)
    logger.close()

    events = list(run.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    wanted = [
        "loss/consistency",
        "loss/obs",
        "loss/reward",
        "loss/continue",
        "loss/deep",
        "loss/extra",
        "loss/gate",
        "loss/total",
        "loops/mean",
        "loops/max",
        "certificate/kappa",
        "certificate/residual_at_exit",
        "train/grad_norm",
        "train/latent_spread",
        "train/lr",
        "perf/transitions_per_s",
    ]
    missing = sorted(set(wanted) - set(tags["scalars"]))
    assert not missing, f"missing scalar tags {missing}; have {tags['scalars']}"
    assert "loops/used" in tags["histograms"]
    hist = acc.Histograms("loops/used")
    assert [h.step for h in hist] == [2, 4]
    assert hist[-1].histogram_value.num == cfg.train.batch_size * cfg.train.horizon

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    for tag in wanted:
        scalars = acc.Scalars(tag)
        assert [s.step for s in scalars] == [2, 4], tag
        for s, line in zip(scalars, lines):
            assert s.value == pytest.approx(line[tag], rel=1e-5, abs=1e-6), tag
    for line in lines:
        assert 0 < line["certificate/kappa"] < 1
        assert line["loops/mean"] >= 1 and line["loops/mean"] <= line["loops/max"]
        assert line["perf/transitions_per_s"] > 0


# ---- 6. the slice learns real dynamics ------------------------------------------------------------
def test_model_beats_both_baselines_on_pendulum(tmp_path):
    from loopwm.app.collect import collect
    from loopwm.envs import env_spaces

    cfg = from_dict(
        {
            "device": "cpu",
            "seed": 0,
            "model": TINY,
            "data": {"path": str(tmp_path / "pendulum.npz"), "steps": 3000},
            "train": {"updates": 100, "batch_size": 16, "horizon": 1, "lr": 3e-3, "log_every": 1000},
        }
    )
    buffer = collect(cfg, progress=False)
    assert buffer.num_episodes >= 10 and (tmp_path / "pendulum.npz").is_file()
    train_data, held_out = buffer.split(0.2, seed=0)
    wm = WorldModel.from_config(cfg, *env_spaces(cfg.env, cfg.seed))
    stats = train_data.stats()
    wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
    kwargs = dict(horizons=(1,), sequences=128, obs_mean=stats["obs_mean"], obs_var=stats["obs_std"].pow(2))

    seqs = held_out.sample(64, 5, np.random.default_rng(0))  # Pendulum never terminates, only truncates

    def continues() -> torch.Tensor:
        with torch.no_grad():
            return wm.imagine(wm.encode(seqs["obs"][0]), seqs["actions"], decode="none").continues

    before = prediction_errors(wm, held_out, **kwargs)["horizons"]["1"]
    assert before["model"] > before["no_change"]  # untrained, it does not beat the trivial baseline
    assert continues().mean() < 0.9  # an untrained continue head would discount every imagined return
    Trainer(wm, cfg, train_data).fit(progress=False)
    after = prediction_errors(wm, held_out, **kwargs)["horizons"]["1"]
    assert continues().min() > 0.95, continues().min()
    assert after["model"] < after["no_change"], after
    assert after["model"] < after["predict_mean"], after
    assert after["model"] < 0.5 * before["model"]
