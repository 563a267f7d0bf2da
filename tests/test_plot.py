"""`loopwm plot`: groups runs by config, mean and spread across seeds, loss curves, a PNG."""

import numpy as np
import pytest

from loopwm.app.plot import plot_runs, read_run
from loopwm.cli import main
from loopwm.config import dump_yaml, from_dict
from loopwm.logger import RunLogger

pytest.importorskip("matplotlib")


def write_run(root, name, seed, returns, lr=1e-3):
    """A run folder as `loopwm run` leaves it: config.yaml and metrics.jsonl written by RunLogger."""
    folder = root / name
    cfg = from_dict({"name": name, "seed": seed, "run_dir": str(root), "train": {"lr": lr}})
    folder.mkdir(parents=True)
    dump_yaml(cfg, folder / "config.yaml")
    logger = RunLogger(folder)
    for k, ret in enumerate(returns):
        step = 500 * k
        logger.log({"loss/total": 1.0 / (k + 1) + seed, "loss/obs": 0.5 / (k + 1)}, step)
        logger.log({"eval/return_mean": ret, "eval/return_std": 10.0 + k}, step)
    logger.close()
    return folder


def test_runs_sharing_a_config_are_averaged_with_their_spread(tmp_path, capsys):
    returns = {0: [-1000, -400, -200], 1: [-900, -300, -150], 2: [-1100, -500]}  # seed 2 stopped early
    seeds = [write_run(tmp_path, f"pend-s{s}", s, r) for s, r in returns.items()]
    other = write_run(tmp_path, "pend-lr", 0, [-800, -250, -100], lr=3e-4)
    summary = plot_runs([*seeds, other], tmp_path / "curves.png")
    assert sorted(summary) == ["pend-lr (1 run)", "pend-s (3 runs)"]
    group = summary["pend-s (3 runs)"]["eval"]
    assert group["steps"] == [0, 500, 1000]
    np.testing.assert_allclose(group["mean"], [-1000, -400, -175])
    np.testing.assert_allclose(
        group["spread"], [np.std([-1000, -900, -1100]), np.std([-400, -300, -500]), np.std([-200, -150])]
    )
    single = summary["pend-lr (1 run)"]["eval"]
    np.testing.assert_allclose(single["spread"], [10.0, 11.0, 12.0])  # one run: its evaluation std
    assert summary["pend-s (3 runs)"]["losses"] == {"loss/obs": 3, "loss/total": 3}
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert main(["plot", str(seeds[0]), "--out", str(tmp_path / "one.png")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "one.png").exists()


def test_read_run_and_bad_folders(tmp_path, capsys):
    run = read_run(write_run(tmp_path, "a", 0, [-5.0, -1.0]))
    assert run.evals == {0: (-5.0, 10.0), 500: (-1.0, 11.0)} and run.losses["loss/total"][500] == 0.5
    assert main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not a metrics record"):
        read_run(tmp_path / "bad")
    assert not (tmp_path / "x.png").exists()
