"""Optimisers: every name lowers a loss, with and without Lookahead; Lookahead state round-trips through a
weights-only file, keeps its schedule and never mixes with a plain optimiser's state."""

import copy
import io

import pytest
import torch
from torch import nn

from loopwm.config import ConfigError, from_dict
from loopwm.optim import OPTIMIZERS, build_optimizer, build_schedule, load_optimizer_state, optimizer_state


# ---- Lookahead checkpoints round-trip ----------------------------------------------------------
def _regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.randn(4, 2, generator=g) + 0.1 * torch.randn(64, 2, generator=g)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), x, y


def _step(model, opt, x, y) -> float:
    loss = (model(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_lookahead_state_round_trips_through_a_weights_only_file():
    model, x, y = _regression()
    opt = build_optimizer("adam", model.parameters(), 1e-2, lookahead=True)
    for _ in range(3):
        _step(model, opt, x, y)
    buffer = io.BytesIO()
    torch.save(optimizer_state(opt), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    twin = copy.deepcopy(model)
    twin_opt = build_optimizer("adam", twin.parameters(), 1e-2, lookahead=True)
    load_optimizer_state(twin_opt, state)
    assert [g["counter"] for g in twin_opt.param_groups] == [3]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(opt.state[p]["slow_param"], twin_opt.state[q]["slow_param"])
        inner_a, inner_b = opt.optimizer.state[p], twin_opt.optimizer.state[q]
        assert set(inner_a) == set(inner_b) == {"step", "exp_avg", "exp_avg_sq"}
        for key in inner_a:
            assert torch.equal(inner_a[key], inner_b[key]), key
    # the Lookahead still shares its param groups with the inner optimiser, so a schedule is seen by both
    assert twin_opt.param_groups is twin_opt.optimizer.param_groups

    naive = copy.deepcopy(model)  # same weights, but a fresh optimiser: it must drift apart
    naive_opt = build_optimizer("adam", naive.parameters(), 1e-2, lookahead=True)
    for _ in range(7):  # crosses the sync at step 5 that uses the restored slow weights
        _step(model, opt, x, y)
        _step(twin, twin_opt, x, y)
        _step(naive, naive_opt, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), naive.parameters()))


def test_lookahead_schedule_survives_a_restore():
    model, x, y = _regression()
    opt = build_optimizer("adam", model.parameters(), 1e-2, lookahead=True)
    _step(model, opt, x, y)
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer("adam", twin.parameters(), 1e-2, lookahead=True)
    load_optimizer_state(twin_opt, optimizer_state(opt))
    schedule = build_schedule(twin_opt, "linear", total=10, warmup=0)
    _step(twin, twin_opt, x, y)
    schedule.step()
    assert twin_opt.param_groups[0]["lr"] == twin_opt.optimizer.param_groups[0]["lr"] == pytest.approx(9e-3)


def test_plain_and_lookahead_states_do_not_mix():
    model, x, y = _regression()
    plain = build_optimizer("adam", model.parameters(), 1e-2)
    look = build_optimizer("adam", copy.deepcopy(model).parameters(), 1e-2, lookahead=True)
    _step(model, plain, x, y)
    with pytest.raises(ValueError, match=r"kind 'plain' does not match a Lookahead optimizer.*lookahead"):
        load_optimizer_state(look, optimizer_state(plain))
    with pytest.raises(ValueError, match=r"kind 'lookahead' does not match a plain optimizer.*lookahead"):
        load_optimizer_state(plain, optimizer_state(look))


# ---- optimisers by name ------------------------------------------------------------------------
@pytest.mark.parametrize("lookahead", [False, True], ids=["plain", "lookahead"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_name_lowers_a_loss(name, lookahead):
    model, x, y = _regression()
    opt = build_optimizer(name.upper(), model.parameters(), 1e-2, lookahead=lookahead)
    losses = [_step(model, opt, x, y) for _ in range(40)]
    assert losses[-1] < 0.9 * losses[0], f"{name}: {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_unknown_optimizer_name_is_named_in_the_error():
    model, _, _ = _regression()
    with pytest.raises(ConfigError, match=r"train\.optimizer='adamz'.*expected one of .*'adam'"):
        build_optimizer("adamz", model.parameters(), 1e-3)
    with pytest.raises(ConfigError, match=r"train\.optimizer='sgdd'"):  # refused when the config is built
        from_dict({"train": {"optimizer": "sgdd"}})
