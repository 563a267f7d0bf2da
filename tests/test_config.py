"""Config files and overrides are validated up front, with errors that name the key."""

import pytest

from loopwm.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_resolve(tmp_path):
    cfg = load_config(
        write(tmp_path, "model:\n  latent_dim: 32\ntrain:\n  lr: 1e-3\n"),
        ["model.block=token", "train.horizon=7", "seed=3"],
    )
    assert (cfg.model.latent_dim, cfg.model.block, cfg.train.horizon, cfg.seed) == (32, "token", 7, 3)
    assert cfg.train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  latnt_dim: 3\n", "unknown config key model.latnt_dim"),
        ("modle: {}\n", "unknown config key modle"),
        ("model:\n  latent_dim: many\n", r"model.latent_dim='many': expected an integer"),
        ("model:\n  kappa_max: 1.5\n", r"model.kappa_max=1.5: expected a value < 1.0"),
        ("train:\n  lr: 0\n", r"train.lr=0.0: expected a value > 0.0"),
        ("model:\n  block: conv\n", r"model.block='conv': expected one of \[.*'mlp'.*'token'"),
        ("train:\n  w_continue: 0\n", "train.w_continue=0 leaves the continue head untrained"),
        ("model:\n  min_loops: 9\n  max_loops: 4\n", "model.min_loops=9 must be <= model.max_loops=4"),
        ("seed: -1\n", r"seed=-1: expected a value >= 0"),
        ("seed: 4294967296\n", r"seed=4294967296: expected a value <= 4294967295"),
        ("planner:\n  warm_start: previous\n", r"planner.warm_start='previous': expected one of \['none'"),
        ("planner:\n  exit: early\n", r"planner.exit='early': expected one of \['agreement', 'certified', 'fixed'"),
        ("planner:\n  exit_tol: 0\n", r"planner.exit_tol=0.0: expected a value > 0.0"),
        ("planner:\n  loops: 0\n", r"planner.loops=0: expected a value >= 1"),
        (
            "planner:\n  exit: certified\n  loops: 2\n",
            r"planner loop options \(planner.exit, planner.loops over model.\*\): loops=2 needs exit='fixed'",
        ),
        (
            "model:\n  min_loops: 3\nplanner:\n  exit: certified\n  max_loops: 2\n",
            r"\(planner.exit, planner.max_loops over model.\*\): min_loops=3 must be <= max_loops=2",
        ),
        ("model: [1, 2\n", "is not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_bad_overrides_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key train.lrr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected the form"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_every_shipped_config_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent.joinpath("configs")
    configs = sorted(p for p in root.rglob("*.yaml") if p.name != "base.yaml")
    assert len(configs) >= 4 + 26
    for path in configs:
        cfg = load_config(path)
        assert cfg.name == path.stem


@pytest.mark.parametrize("raw, read_as", [("42", "int"), ("2024-06-01", "date"), ("true", "bool"), ("0.5", "float")])
def test_a_string_key_given_a_yaml_scalar_says_how_to_quote_it(raw, read_as):
    hint = rf"expected a string; YAML read it as {read_as}: quote it, as name='\"...\"'"
    with pytest.raises(ConfigError, match=hint):
        load_config(None, [f"name={raw}"])
    assert load_config(None, [f'name="{raw}"']).name == raw
