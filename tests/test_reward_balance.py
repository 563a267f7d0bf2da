"""`train.reward_balance`: rare rewards keep a fixed share of the reward loss, and the head learns them."""

import numpy as np
import pytest
import torch

from loopwm.objective import QuantileTracker, reward_weights, sequence_loss
from loopwm.replay import ReplayBuffer
from loopwm.train import Trainer
from tests.test_training import config, linear_dataset, new_model

FIXED_LOOPS = {"loop_sampling": "fixed", "w_deep": 0.0, "w_gate": 0.0, "extra_loops": 0}
"""Training at the model's own loop count, without the loop's extra terms: the reward head is under test here."""


def rare_reward_dataset() -> ReplayBuffer:
    """The linear system with reward 1 when the next state's first coordinate passes 1.5 (about 2% of steps)
    and 0 otherwise: a sparse, learnable event."""
    return linear_dataset(episodes=16, steps=40, reward=lambda x, x_next: float(x_next[0] > 1.5))


@pytest.mark.parametrize("events", [1, 2, 80, 159])  # one event in 160, a pair, half, all but one
@pytest.mark.parametrize("balance", [0.05, 0.5, 0.95])
def test_reward_weights_split_the_mean_between_events_and_the_rest(events, balance):
    g = torch.Generator().manual_seed(events)
    rewards = torch.zeros(5, 32)
    flat = rewards.view(-1)
    picked = torch.randperm(flat.numel(), generator=g)[:events]
    flat[picked] = torch.where(torch.rand(events, generator=g) < 0.5, -1.0, 1.0)  # either sign is an event
    loss = torch.rand(5, 32, generator=g) * 10 ** torch.empty(5, 32).uniform_(-3, 3, generator=g)
    weights = reward_weights(rewards, balance)
    event = rewards != 0
    expected = balance * loss[event].mean() + (1 - balance) * loss[~event].mean()
    torch.testing.assert_close((weights * loss).mean(), expected, rtol=1e-5, atol=0)
    assert weights.dtype == torch.float32 and (weights > 0).all()


def test_reward_weights_are_off_for_dense_or_absent_rewards():
    dense = torch.randn(5, 32).abs() + 0.1  # every step rewarded, as in Pendulum
    assert reward_weights(dense, 0.5) is None
    assert reward_weights(torch.zeros(5, 32), 0.5) is None
    assert reward_weights(torch.tensor([[0.0, 1.0]]), 0.0) is None


def test_sequence_loss_weighs_each_step_by_its_own_rewards(monkeypatch):
    """The reward term is sum_k rho^k mean(w_k * l_k) / H with each step's own weights."""
    data = rare_reward_dataset()
    cfg = config(horizon=3, batch_size=16, loop_sampling="fixed", reward_balance=0.5)
    wm = new_model(cfg, data)
    batch = data.sample(16, 3, np.random.default_rng(0))
    batch["rewards"] = torch.zeros_like(batch["rewards"])
    batch["rewards"][1, :3] = 1.0  # events at step 1 only: step 0's and step 2's weights differ from step 1's
    losses = []
    head_loss = type(wm.reward_head).loss

    def recorded(head, z, reward):
        out = head_loss(head, z, reward)
        losses.append(out.detach())
        return out

    monkeypatch.setattr(type(wm.reward_head), "loss", recorded)
    _, terms, _ = sequence_loss(wm, batch, cfg.train, torch.Generator().manual_seed(0), QuantileTracker(0.5))
    weights = reward_weights(batch["rewards"].float(), 0.5)
    expected = sum(cfg.train.rho**k * (weights[k] * losses[k]).mean() for k in range(3)) / 3
    torch.testing.assert_close(terms["reward"], expected)
    plain = sum(cfg.train.rho**k * losses[k].mean() for k in range(3)) / 3
    assert not torch.isclose(terms["reward"], plain)


def test_balance_teaches_the_head_a_rare_reward_the_plain_mean_misses():
    torch.set_num_threads(1)
    data = rare_reward_dataset()
    batch = data.sample(256, 1, np.random.default_rng(5))
    event = batch["rewards"][0] != 0
    assert 2 <= int(event.sum()) <= 16  # rare: a few percent of steps
    at_events = {}
    for balance in (0.0, 0.5):
        cfg = config(
            updates=140, batch_size=16, horizon=3, lr=3e-3, log_every=1000, reward_balance=balance, **FIXED_LOOPS
        )
        wm = new_model(cfg, data)
        trainer = Trainer(wm, cfg, data)
        for _ in range(cfg.train.updates):
            trainer.update()
        with torch.no_grad():
            rewards = wm.imagine(wm.encode(batch["obs"][0]), batch["actions"].float()).rewards[0]
        at_events[balance] = float(rewards[event].mean())
        assert float(rewards[~event].abs().mean()) < 0.15  # steps without a reward stay near 0 either way
    # the plain mean leaves events below 0.5 (rounded, no reward at all); balanced, they read as rewards
    assert at_events[0.0] < 0.5 < at_events[0.5]
    assert at_events[0.5] > at_events[0.0] + 0.15


def random_reward_output(model) -> None:
    """The head's output layer starts at zero, so its loss would not depend on the latent it reads."""
    with torch.no_grad():
        model.reward_head.net[-1].weight.normal_(generator=torch.Generator().manual_seed(1))


def test_the_encoded_reward_term_reads_the_true_next_latent_and_trains_the_encoder():
    """`train.w_reward_encoded`: the reward head scored on E(o_{k+1}), discounted like the other terms, with the
    gradient reaching the encoder; the consistency target stays the same detached latent."""
    data = rare_reward_dataset()
    batch = data.sample(16, 3, np.random.default_rng(0))
    batch["rewards"] = torch.zeros_like(batch["rewards"])
    batch["rewards"][1, :3] = 1.0  # a few events, so the balance weights are live
    cfg = config(horizon=3, batch_size=16, loop_sampling="fixed", w_reward_encoded=1.0, reward_balance=0.5)
    wm = new_model(cfg, data)
    random_reward_output(wm)
    with torch.no_grad():
        encoded = wm.encode(batch["obs"][1:])
        weights = reward_weights(batch["rewards"].float(), 0.5)
        expected = sum(
            cfg.train.rho**k * (weights[k] * wm.reward_head.loss(encoded[k], batch["rewards"][k])).mean()
            for k in range(3)
        )
    _, terms, _ = sequence_loss(wm, batch, cfg.train, torch.Generator().manual_seed(0), QuantileTracker(0.5))
    torch.testing.assert_close(terms["reward_encoded"] * 3, expected)

    def encoder_grad(w_reward_encoded: float, head_reads_latent: bool = True) -> torch.Tensor:
        run = config(horizon=3, batch_size=16, loop_sampling="fixed", w_reward_encoded=w_reward_encoded)
        model = new_model(run, data)
        if head_reads_latent:
            random_reward_output(model)
        loss, _, _ = sequence_loss(model, batch, run.train, torch.Generator().manual_seed(0), QuantileTracker(0.5))
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.encoder.parameters()])

    # the other terms reach the encoder only through E(o_0); the new term adds E(o_1..H)'s own gradient
    assert not torch.allclose(encoder_grad(1.0), encoder_grad(0.0))
    # with a head blind to its input the new term sends the encoder nothing, so any difference would come from
    # the latent-matching target, which must stay detached
    torch.testing.assert_close(encoder_grad(1.0, head_reads_latent=False), encoder_grad(0.0, head_reads_latent=False))
    off = config(horizon=3, batch_size=16, loop_sampling="fixed")
    _, plain_terms, _ = sequence_loss(
        new_model(off, data), batch, off.train, torch.Generator().manual_seed(0), QuantileTracker(0.5)
    )
    assert float(plain_terms["reward_encoded"]) == 0.0
    torch.testing.assert_close(plain_terms["consistency"], terms["consistency"])  # same target either way
