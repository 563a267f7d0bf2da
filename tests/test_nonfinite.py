"""A NaN or inf loss (or gradient) skips that update, is counted and logged as `train/nonfinite_skipped`;
`train.max_nonfinite` of them in a row stop the run with an error naming the last good checkpoint."""

import json
import re
from pathlib import Path

import pytest
import torch

import loopwm.train as train_module
from loopwm.checkpoint import read_checkpoint
from loopwm.cli import main
from loopwm.config import ConfigError
from loopwm.logger import RunLogger
from loopwm.train import Trainer, save_run
from tests.test_training import config, linear_dataset, new_model

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "pendulum.yaml")


def poison_calls(monkeypatch, bad: set[int], how: str = "nan") -> list[int]:
    """Make the loss non-finite on the given (1-based) calls of `sequence_loss` inside the Trainer: NaN
    (its gradient is NaN too), or + inf (its gradient stays finite, so only the loss shows it)."""
    real, calls = train_module.sequence_loss, []

    def loss(*args, **kwargs):
        calls.append(len(calls) + 1)
        total, terms, stats = real(*args, **kwargs)
        if calls[-1] in bad:
            total = total * float("nan") if how == "nan" else total + float("inf")
        return total, terms, stats

    monkeypatch.setattr(train_module, "sequence_loss", loss)
    return calls


@pytest.mark.parametrize("how", ["nan", "inf"])
def test_a_nan_loss_skips_that_update_counts_and_logs_it(tmp_path, monkeypatch, how):
    calls = poison_calls(monkeypatch, {4, 5}, how)  # the 4th and 5th attempts, after the log at update 3
    data = linear_dataset(episodes=4)
    cfg = config(updates=6, batch_size=4, horizon=2, log_every=3)
    logger = RunLogger(tmp_path)
    trainer = Trainer(new_model(cfg, data), cfg, data, logger)
    trainer.fit(progress=False)
    logger.close()
    assert len(calls) == 8 and trainer.updates == 6  # two attempts skipped, six updates applied
    assert trainer.nonfinite_skipped == 2
    # the skipped attempts stepped neither the optimiser nor the schedule
    assert all(int(s["step"]) == 6 for s in trainer.opt.state.values())
    assert trainer.schedule.last_epoch == 6
    assert all(torch.isfinite(p).all() for p in trainer.wm.parameters())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]  # no step is logged twice
    assert [r["train/nonfinite_skipped"] for r in rows] == [0.0, 2.0]
    # the count survives a checkpoint
    save_run(tmp_path / "ckpt.pt", trainer)
    assert read_checkpoint(tmp_path / "ckpt.pt")["trainer"]["nonfinite_skipped"] == 2


def test_only_consecutive_skips_count_toward_the_limit(monkeypatch):
    poison_calls(monkeypatch, {2, 4, 6})
    data = linear_dataset(episodes=4)
    cfg = config(updates=5, batch_size=4, horizon=2, log_every=100, max_nonfinite=2)
    trainer = Trainer(new_model(cfg, data), cfg, data)
    trainer.fit(progress=False)  # three skips, never two in a row
    assert trainer.updates == 5 and trainer.nonfinite_skipped == 3


def test_a_non_finite_gradient_is_skipped_too(tmp_path, monkeypatch):
    data = linear_dataset(episodes=4)
    cfg = config(updates=3, batch_size=4, horizon=2, log_every=100)
    trainer = Trainer(new_model(cfg, data), cfg, data)
    real_backward, calls = torch.Tensor.backward, []

    def backward(self, *args, **kwargs):  # a finite loss whose gradient overflows on the 2nd attempt
        real_backward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            next(trainer.wm.parameters()).grad.fill_(float("inf"))

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    trainer.fit(progress=False)
    assert trainer.updates == 3 and trainer.nonfinite_skipped == 1 and len(calls) == 4
    assert all(torch.isfinite(p).all() for p in trainer.wm.parameters())


def test_consecutive_nan_losses_stop_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = linear_dataset(episodes=4)
    cfg = config(updates=20, batch_size=4, horizon=2, log_every=100, checkpoint_every=2, max_nonfinite=3)
    trainer = Trainer(new_model(cfg, data), cfg, data)
    path = tmp_path / "checkpoints" / "latest.pt"
    update = Trainer.update

    def diverge_after_five(self):
        out = update(self)
        if self.updates == 5 and out:  # the model blows up: every later loss is NaN
            with torch.no_grad():
                self.wm.decoder[0].weight.fill_(float("nan"))
        return out

    monkeypatch.setattr(Trainer, "update", diverge_after_five)
    with pytest.raises(
        FloatingPointError,
        match=(
            rf"3 consecutive updates.*after update 5.*train\.max_nonfinite=3.*"
            rf"last good checkpoint: {str(path)}.*update 4"
        ),
    ):
        trainer.fit(progress=False, on_checkpoint=lambda: save_run(path, trainer))
    assert trainer.updates == 5 and trainer.nonfinite_skipped == 3
    saved = read_checkpoint(path)
    assert saved["trainer"]["updates"] == 4
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_without_a_checkpoint_the_error_says_so(monkeypatch):
    poison_calls(monkeypatch, set(range(1, 100)))
    data = linear_dataset(episodes=4)
    cfg = config(updates=5, batch_size=4, horizon=2, max_nonfinite=2)
    with pytest.raises(FloatingPointError, match="2 consecutive updates.*no checkpoint has been written"):
        Trainer(new_model(cfg, data), cfg, data).fit(progress=False)


def test_max_nonfinite_is_range_checked():
    assert config().train.max_nonfinite == 10
    with pytest.raises(ConfigError, match=r"train\.max_nonfinite=0"):
        config(max_nonfinite=0)


def test_the_cli_exits_2_with_the_message(tmp_path, monkeypatch, capsys):
    from tests.test_datasets import overrides, pendulum_like

    data = tmp_path / "d.npz"
    pendulum_like().save(data)
    poison_calls(monkeypatch, set(range(1, 100)))
    assert main(["train", "-q", CONFIG, *overrides(tmp_path, data), "train.max_nonfinite=2"]) == 2
    err = capsys.readouterr().err
    assert "loopwm train: error:" in err and "2 consecutive updates" in err and "train.max_nonfinite=2" in err


def test_the_online_run_stops_too_and_leaves_the_named_checkpoint_as_it_was(tmp_path, monkeypatch):
    from loopwm.app.run import run
    from tests.test_online import tiny

    cfg = tiny(tmp_path, total_steps=200)
    cfg.train.max_nonfinite = 2
    poison_calls(monkeypatch, set(range(60, 10_000)))  # the model diverges after its first checkpoint
    path = tmp_path / "pm" / "checkpoints" / "latest.pt"
    with pytest.raises(
        FloatingPointError,
        match=rf"2 consecutive updates.*last good checkpoint: {path} "
        r"\(update (\d+)\)",
    ) as raised:
        run(cfg, progress=False)
    named = int(re.search(r"\(update (\d+)\)", str(raised.value)).group(1))
    assert read_checkpoint(path)["trainer"]["updates"] == named > 0
