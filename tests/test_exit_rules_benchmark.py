"""benchmarks/exit_rules.py: a smoke run writes consistent rows, and the summary picks what it says it picks."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import exit_rules  # noqa: E402


def test_smoke_run_scores_every_setting_on_the_same_sequences(tmp_path):
    payload = exit_rules.main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "exit_rules.json").read_text()) == json.loads(json.dumps(payload))
    rows = payload["models"]["smoke"]["rows"]
    fixed = [r for r in rows if r["rule"] == "fixed"]
    assert [r["mean_loops"] for r in fixed] == [r["setting"] for r in fixed]
    # a larger agreement tolerance fires no later for any sample, so the mean loop count cannot grow
    agreement = [r["mean_loops"] for r in rows if r["rule"] == "agreement"]
    assert agreement == sorted(agreement, reverse=True) and all(1 <= x <= 16 for x in agreement)
    # the relative exit runs on a model with an error head, looser tolerances never loop longer, and the
    # head's prediction is ranked against the errors under every setting
    relative = [r for r in rows if r["rule"] == "relative"]
    assert [r["setting"] for r in relative] == [0.03, 0.1, 0.3, 1.0]
    loops = [r["mean_loops"] for r in relative]
    assert loops == sorted(loops, reverse=True) and loops[0] > loops[-1]
    assert all(0 <= r["auroc_head"] <= 1 for r in rows)
    best = min(fixed, key=lambda r: r["errors"]["1"])
    assert payload["models"]["smoke"]["summary"]["lowest_fixed"] == best["setting"]
    text = (tmp_path / "exit_rules.md").read_text()
    assert "| agreement | 0.01 |" in text and "| relative | 0.3 |" in text and "AUROC head |" in text


def test_a_warm_start_changes_later_steps_only(tmp_path):
    args = ["--smoke", "--fixed", "1", "8", "--agreement", "--certified", "0.01", "--relative"]
    rows = exit_rules.main([*args, "--starts", "cold", "warm", "--out", str(tmp_path)])["models"]["smoke"]["rows"]
    by = {(r["start"], r["rule"], r["setting"]): r for r in rows}
    assert len(by) == len(rows) == 6
    for key in (("fixed", 1.0), ("fixed", 8.0), ("certified", 0.01)):
        cold, warm = by[("cold", *key)], by[("warm", *key)]
        assert warm["errors"]["1"] == cold["errors"]["1"]  # the first step starts from zeros either way
    # one loop from the previous step's state is not one loop from zeros
    assert by[("warm", "fixed", 1.0)]["errors"]["10"] != by[("cold", "fixed", 1.0)]["errors"]["10"]
    # near the fixed point the start matters little: after 8 loops at κ < 1 the errors agree within 5%
    assert by[("warm", "fixed", 8.0)]["errors"]["10"] == pytest.approx(
        by[("cold", "fixed", 8.0)]["errors"]["10"], rel=0.05
    )


def row(rule, setting, loops, e1, e10, start="cold"):
    return {"start": start, "rule": rule, "setting": setting, "mean_loops": loops, "errors": {"1": e1, "10": e10}}


def test_summary_compares_the_cheapest_settings_that_clear_the_same_bar():
    rows = [
        row("fixed", 2, 2.0, 0.0110, 0.30),
        row("fixed", 4, 4.0, 0.01005, 0.2015),  # within 1% of the best at both horizons: the cheapest such count
        row("fixed", 8, 8.0, 0.0100, 0.2000),  # the lowest errors
        row("agreement", 0.03, 1.5, 0.0100, 0.25),  # cheapest, but 25% worse at 10 steps
        row("agreement", 0.01, 2.2, 0.0101, 0.2018),  # within 1% at both
        row("certified", 0.1, 3.0, 0.0099, 0.199),
    ]
    s = exit_rules.summary(rows)
    assert s["lowest_fixed"] == 8 and s["cheapest_fixed"] == 4
    assert s["best_adaptive"] == {"start": "cold", "rule": "agreement", "setting": 0.01, "mean_loops": 2.2}
    assert s["saving_vs_cheapest"] == pytest.approx(0.45) and s["saving_vs_lowest"] == pytest.approx(0.725)
    assert s["saving_target_met"]
    rows[1] = row("fixed", 4, 4.0, 0.01005, 0.203)  # now 1.5% off at 10 steps: the cheapest good count is 8
    s = exit_rules.summary(rows)
    assert s["cheapest_fixed"] == 8 and s["saving_vs_cheapest"] == pytest.approx(0.725)
    s = exit_rules.summary(rows[:4])
    assert s["best_adaptive"] is None and s["saving_vs_cheapest"] is None and not s["saving_target_met"]


def test_a_bad_model_argument_is_refused_before_anything_is_written(tmp_path):
    for bad in (["--model", "x"], ["--model", f"x={tmp_path / 'missing.pt'}"], []):
        with pytest.raises(SystemExit, match="--model|--data"):
            exit_rules.main([*bad, "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_a_trained_run_is_scored_on_its_own_held_out_split(tmp_path):
    from loopwm.checkpoint import load, save
    from loopwm.config import from_dict, to_dict

    model, data = exit_rules.smoke_model(tmp_path)
    cfg = from_dict({"seed": 3, "model": load(model).cfg.__dict__, "train": {"val_fraction": 0.25}})
    save(tmp_path / "run.pt", load(model), config=to_dict(cfg))
    args = ["--data", str(data), "--model", f"run={tmp_path / 'run.pt'}", "--model", f"bare={model}"]
    payload = exit_rules.main([*args, "--fixed", "1", "2", "--agreement", "0.01", "--certified", "--sequences", "8",
                               "--out", str(tmp_path)])  # fmt: skip
    assert payload["models"]["run"]["split"] == {"val_fraction": 0.25, "seed": 3, "held_out_transitions": 60}
    assert payload["models"]["bare"]["split"]["seed"] == 0


def test_a_loop_free_model_is_scored_at_its_one_evaluation(tmp_path):
    import gymnasium as gym

    import loopwm
    from loopwm.config import from_dict
    from loopwm.world_model import WorldModel

    _, data = exit_rules.smoke_model(tmp_path)
    dims = {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 64, "dynamics": "mlp"}
    cfg = from_dict({"model": dims, "train": {"extra_loops": 0, "w_deep": 0, "w_gate": 0}})
    spaces = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32), gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    loopwm.save(tmp_path / "mlp.pt", WorldModel.from_config(cfg, *spaces))
    args = ["--data", str(data), "--model", f"mlp={tmp_path / 'mlp.pt'}", "--fixed", "1", "--agreement", "--certified"]
    rows = exit_rules.main([*args, "--sequences", "8", "--out", str(tmp_path)])["models"]["mlp"]["rows"]
    assert [(r["rule"], r["auroc_head"]) for r in rows] == [("fixed", None)]  # no relative rows: it has no head
