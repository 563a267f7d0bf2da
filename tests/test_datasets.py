"""Datasets are checked when loaded: finite observations, actions and rewards, and the layout of the
environment (train) or the model (eval --data), with the file and the field named, before any run folder
is written."""

from pathlib import Path

import numpy as np
import pytest

from loopwm.cli import main
from loopwm.replay import ReplayBuffer
from loopwm.replay_io import DataError

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "pendulum.yaml")


def pendulum_like(obs_dim: int = 3, episodes: int = 6, steps: int = 30, seed: int = 0) -> ReplayBuffer:
    """Episodes with Pendulum's layout (cos, sin, angular velocity; one torque in model units)."""
    rng = np.random.default_rng(seed)
    buffer = ReplayBuffer((obs_dim,), 1, 10_000)
    for _ in range(episodes):
        theta = rng.uniform(-np.pi, np.pi, steps + 1)
        obs = np.stack(
            [np.cos(theta), np.sin(theta), rng.normal(size=steps + 1)] + [rng.normal(size=steps + 1)] * (obs_dim - 3), 1
        ).astype(np.float32)
        truncated = np.zeros(steps, bool)
        truncated[-1] = True
        buffer.add_episode(
            obs,
            rng.uniform(-1, 1, (steps, 1)).astype(np.float32),
            -rng.random(steps).astype(np.float32),
            np.zeros(steps, bool),
            truncated,
        )
    return buffer


def overrides(tmp_path: Path, data: Path, name: str = "fit") -> list[str]:
    return [
        f"name={name}",
        f"run_dir={tmp_path / 'runs'}",
        "device=cpu",
        f"data.path={data}",
        "model.latent_dim=8",
        "model.hidden_dim=16",
        "model.inject_dim=16",
        "model.mlp_dim=32",
        "train.updates=2",
        "train.batch_size=4",
        "train.horizon=2",
        "train.log_every=1",
    ]


def spoil(buffer: ReplayBuffer, path: Path, field: str, row: int, value: float) -> None:
    """Save `buffer` to `path` with one entry of `field` set to `value` (as a broken writer would)."""
    buffer.save(path)
    with np.load(path) as data:
        arrays = {k: data[k].copy() for k in data.files}
    arrays[field].reshape(len(arrays[field]), -1)[row, 0] = value  # one entry, in the first column
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "field, value", [("obs", np.inf), ("obs", np.nan), ("actions", np.nan), ("rewards", np.nan), ("rewards", -np.inf)]
)
def test_load_refuses_non_finite_values_naming_file_field_and_row(tmp_path, field, value):
    path = tmp_path / "bad.npz"
    spoil(pendulum_like(), path, field, 7, value)
    with pytest.raises(DataError, match=rf"bad\.npz.*'{field}'.*1 non-finite.*row 7"):
        ReplayBuffer.load(path)


def test_data_error_is_a_value_error_and_clean_files_still_load(tmp_path):
    assert issubclass(DataError, ValueError)
    path = tmp_path / "good.npz"
    buffer = pendulum_like()
    buffer.save(path)
    loaded = ReplayBuffer.load(path)
    assert len(loaded) == len(buffer) and loaded.num_episodes == buffer.num_episodes


def test_layout_check_names_what_differs():
    buffer = pendulum_like(obs_dim=4)
    with pytest.raises(DataError, match=r"d\.npz.*'obs'.*\(4,\).*env Pendulum-v1.*\(3,\)"):
        buffer.check_layout((3,), 1, source="dataset 'd.npz'", expected_by="env Pendulum-v1")
    with pytest.raises(DataError, match=r"'actions'.*width 1.*expects 2"):
        buffer.check_layout((4,), 2, source="dataset 'd.npz'", expected_by="the model")
    buffer.check_layout((4,), 1, source="dataset 'd.npz'", expected_by="the model")  # a match passes
    out_of_range = ReplayBuffer((3,), 1, 100)
    obs = np.zeros((3, 3), np.float32)
    out_of_range.add_episode(
        obs, np.array([[0.5], [3.0]], np.float32), np.zeros(2, np.float32), np.zeros(2, bool), np.array([False, True])
    )
    with pytest.raises(DataError, match=r"'actions'.*\[-1, 1\].*3"):
        out_of_range.check_layout((3,), 1, source="dataset 'd.npz'", expected_by="the model")


def test_train_refuses_a_dataset_of_another_width_before_writing(tmp_path, capsys):
    data = tmp_path / "wide.npz"
    pendulum_like(obs_dim=4).save(data)
    assert main(["train", "-q", CONFIG, *overrides(tmp_path, data)]) == 2
    err = capsys.readouterr().err
    assert "wide.npz" in err and "'obs'" in err and "(4,)" in err and "Pendulum-v1" in err and "(3,)" in err
    assert not (tmp_path / "runs").exists()


def test_train_refuses_nan_rewards_before_writing(tmp_path, capsys):
    data = tmp_path / "nan.npz"
    spoil(pendulum_like(), data, "rewards", 3, np.nan)
    assert main(["train", "-q", CONFIG, *overrides(tmp_path, data)]) == 2
    err = capsys.readouterr().err
    assert "nan.npz" in err and "'rewards'" in err and "non-finite" in err
    assert not (tmp_path / "runs").exists()


def test_eval_data_refuses_inf_observations_and_other_layouts(tmp_path, capsys):
    data = tmp_path / "good.npz"
    pendulum_like().save(data)
    assert main(["train", "-q", CONFIG, *overrides(tmp_path, data)]) == 0
    latest = tmp_path / "runs" / "fit" / "checkpoints" / "latest.pt"
    assert main(["eval", str(latest), "--data", str(data)]) == 0
    capsys.readouterr()

    bad = tmp_path / "inf.npz"
    spoil(pendulum_like(seed=1), bad, "obs", 11, np.inf)
    assert main(["eval", str(latest), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "inf.npz" in err and "'obs'" in err and "non-finite" in err

    wide = tmp_path / "wide.npz"
    pendulum_like(obs_dim=4).save(wide)
    assert main(["eval", str(latest), "--data", str(wide)]) == 2
    err = capsys.readouterr().err
    assert "wide.npz" in err and "(4,)" in err and "the model" in err


def test_collect_refuses_a_capacity_below_the_steps_it_must_hold(tmp_path, capsys):
    path = tmp_path / "small.npz"
    assert main(["collect", "-q", CONFIG, f"data.path={path}", "data.steps=1000", "data.capacity=500"]) == 2
    err = capsys.readouterr().err
    assert "data.capacity=500 < data.steps=1000" in err and "raise data.capacity" in err
    assert not path.exists()


def test_collect_keeps_an_existing_dataset_unless_told_to_overwrite_it(tmp_path, capsys):
    path = tmp_path / "kept.npz"
    assert main(["collect", "-q", CONFIG, f"data.path={path}", "data.steps=400", "seed=1"]) == 0
    before = path.read_bytes()
    assert main(["collect", "-q", CONFIG, f"data.path={path}", "data.steps=400", "seed=2"]) == 2
    assert "exists already; pass --overwrite" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert main(["collect", "-q", "--overwrite", CONFIG, f"data.path={path}", "data.steps=400", "seed=2"]) == 0
    assert path.read_bytes() != before


@pytest.mark.parametrize("where", ["", "."])
def test_collect_refuses_a_data_path_that_is_no_file_before_collecting(where, capsys):
    assert main(["collect", "-q", CONFIG, f"data.path={where}", "data.steps=100000"]) == 2
    assert "expected the path of the .npz file to write" in capsys.readouterr().err
