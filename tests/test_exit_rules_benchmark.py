"""benchmarks/exit_rules.py: a smoke run writes consistent rows, and the summary picks what it says it picks."""

import json
import sys
from pathlib import Path

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
    best = min(fixed, key=lambda r: r["errors"]["1"])
    assert payload["models"]["smoke"]["summary"]["best_fixed"]["loops"] == best["setting"]
    assert "| agreement | 0.01 |" in (tmp_path / "exit_rules.md").read_text()


def row(rule, setting, loops, e1, e10):
    return {"rule": rule, "setting": setting, "mean_loops": loops, "errors": {"1": e1, "10": e10}}


def test_summary_takes_the_cheapest_setting_within_one_percent_at_both_horizons():
    rows = [
        row("fixed", 2, 2.0, 0.0110, 0.30),
        row("fixed", 4, 4.0, 0.0100, 0.20),  # the best fixed count
        row("agreement", 0.03, 1.5, 0.0100, 0.25),  # cheapest, but 25% worse at 10 steps
        row("agreement", 0.01, 2.2, 0.0101, 0.202),  # within 1% at both: 45% fewer loops
        row("certified", 0.1, 3.0, 0.0099, 0.199),
    ]
    s = exit_rules.summary(rows)
    assert s["best_fixed"]["loops"] == 4
    assert s["best_adaptive"] == {"rule": "agreement", "setting": 0.01, "mean_loops": 2.2}
    assert s["loop_saving"] == pytest.approx(0.45) and s["saving_target_met"]
    s = exit_rules.summary(rows[:3])
    assert s["best_adaptive"] is None and not s["saving_target_met"]


def test_a_bad_model_argument_is_refused_before_anything_is_written(tmp_path):
    for bad in (["--model", "x"], ["--model", f"x={tmp_path / 'missing.pt'}"], []):
        with pytest.raises(SystemExit, match="--model|--data"):
            exit_rules.main([*bad, "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []
