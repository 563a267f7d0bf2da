"""End to end through the `loopwm` entry point: collect, train, eval, refuse to overwrite, resume, bad configs."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from loopwm.checkpoint import read_checkpoint
from loopwm.cli import main
from loopwm.replay import ReplayBuffer

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "pendulum.yaml")


def overrides(tmp_path, name="e2e", updates=6):
    return [
        f"name={name}",
        f"run_dir={tmp_path / 'runs'}",
        "device=cpu",
        f"data.path={tmp_path / 'pendulum.npz'}",
        "data.steps=1000",
        "model.latent_dim=8",
        "model.hidden_dim=16",
        "model.inject_dim=16",
        "model.mlp_dim=32",
        f"train.updates={updates}",
        "train.lr_schedule=constant",  # extending a run to more updates changes a decaying schedule's span
        "train.batch_size=8",
        "train.horizon=2",
        "train.log_every=2",
        "train.checkpoint_every=3",
    ]


def steps_logged(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_collect_train_eval_refuse_and_resume(tmp_path, capsys):
    ov = overrides(tmp_path)
    assert main(["collect", "-q", CONFIG, *ov]) == 0
    data = ReplayBuffer.load(tmp_path / "pendulum.npz")
    assert f"wrote {len(data)} transitions in {data.num_episodes} episodes" in capsys.readouterr().out
    assert data.num_episodes >= 4 and data.obs_shape == (3,) and data.action_dim == 1

    assert main(["train", "-q", CONFIG, *ov]) == 0
    run = tmp_path / "runs" / "e2e"
    latest = run / "checkpoints" / "latest.pt"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["name"] == "e2e" and resolved["train"]["updates"] == 6
    assert resolved["model"]["latent_dim"] == 8 and resolved["data"]["path"] == str(tmp_path / "pendulum.npz")
    assert steps_logged(run) == [2, 4, 6]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    payload = read_checkpoint(latest)
    assert payload["trainer"]["updates"] == 6 and payload["config"]["model"]["latent_dim"] == 8
    saved_eval = json.loads((run / "eval.json").read_text())
    assert set(saved_eval["horizons"]) == {"1", "10", "50"}
    for row in saved_eval["horizons"].values():
        assert {"model", "predict_mean", "no_change"} <= set(row)
    assert 0 < saved_eval["kappa"] < 1

    # eval prints the table, and agrees with what train wrote for the same held-out split
    assert main(["eval", str(latest), "--out", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "horizon" in out and "no-change" in out and "certified kappa" in out
    rows = [line.split("|")[0].strip() for line in out.splitlines() if "|" in line]
    assert rows[1:] == ["1", "10", "50"]
    printed = json.loads((tmp_path / "eval.json").read_text())
    for h, row in saved_eval["horizons"].items():
        for key in ("model", "predict_mean", "no_change"):
            assert printed["horizons"][h][key] == pytest.approx(row[key], rel=1e-5), (h, key)

    # a second train into the same run folder is refused, and nothing in it is touched
    before = {p: p.read_bytes() for p in (latest, run / "metrics.jsonl", run / "config.yaml")}
    assert main(["train", "-q", CONFIG, *ov]) == 2
    err = capsys.readouterr().err
    assert "already has latest.pt" in err and "resume=true" in err
    assert all(p.read_bytes() == content for p, content in before.items())

    # resume=true continues from update 6 to 10, appending to the same logs
    assert main(["train", "-q", CONFIG, *ov, "resume=true", "train.updates=10"]) == 0
    assert read_checkpoint(latest)["trainer"]["updates"] == 10
    assert steps_logged(run) == [2, 4, 6, 8, 10]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["updates"] == 10

    # and lands exactly where an uninterrupted 10-update run does
    assert main(["train", "-q", CONFIG, *overrides(tmp_path, name="straight", updates=10)]) == 0
    resumed = read_checkpoint(latest)["model"]
    straight = read_checkpoint(tmp_path / "runs" / "straight" / "checkpoints" / "latest.pt")["model"]
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model: [unclosed\n", "is not valid YAML"),
        ("train:\n  updatez: 5\n", "train.updatez"),
        ("- just\n- a list\n", "expected a mapping at the top level"),
    ],
)
def test_bad_yaml_files_exit_2_naming_the_problem(tmp_path, capsys, text, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["train", "-q", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loopwm train: error:") and needle in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.latent_dimm=4", "model.latent_dimm"),
        ("train.lr=-1", "train.lr=-1"),
        ("train.updates=many", "train.updates='many'"),
        ("noequals", "expected the form key.sub=value"),
    ],
)
def test_bad_overrides_exit_2_naming_the_key(tmp_path, capsys, override, needle):
    assert main(["collect", "-q", CONFIG, f"data.path={tmp_path / 'd.npz'}", override]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "d.npz").exists()


def test_missing_inputs_exit_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "-q", CONFIG, *overrides(tmp_path)]) == 2  # no dataset collected yet
    assert "loopwm collect" in capsys.readouterr().err


def test_unknown_optimizer_exits_2_naming_it(tmp_path, capsys):
    ov = overrides(tmp_path)
    assert main(["collect", "-q", CONFIG, *ov]) == 0
    assert main(["train", "-q", CONFIG, *ov, "train.optimizer=adamm"]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer='adamm'" in err and "'adam'" in err
    assert not (tmp_path / "runs" / "e2e" / "checkpoints").exists()


def test_eval_exit_names_come_from_the_loop_registry(tmp_path, capsys):
    from loopwm.exits import EXIT_RULES

    with pytest.raises(SystemExit) as exited:
        main(["eval", str(tmp_path / "x.pt"), "--exit", "sometimes"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "exit='sometimes'" in err and all(repr(name) in err for name in EXIT_RULES)


def test_a_bare_model_is_evaluated_only_where_no_config_is_needed(tmp_path, capsys):
    import loopwm
    from tests.helpers import tiny_model

    loopwm.save(tmp_path / "bare.pt", tiny_model())
    assert main(["eval", str(tmp_path / "bare.pt")]) == 2
    err = capsys.readouterr().err
    assert "holds no run config" in err and "pass --data" in err
    assert main(["eval", str(tmp_path / "bare.pt"), "--episodes", "1"]) == 2
    assert "no environment or planner" in capsys.readouterr().err
