"""Bad input on the Atari path, through `loopwm run` and `loopwm train`: each exits 2 with an error that names
the fix, before anything is written (the run folder, and the run_dir above it, never appear)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loopwm.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VERBS = ["run", "train"]


def refused(verb: str, config: Path, overrides: list[str], tmp_path: Path, capsys) -> str:
    """Run `loopwm VERB CONFIG OVERRIDES` into tmp_path/runs; assert it exits 2 and writes nothing; return stderr."""
    runs = tmp_path / "runs"
    args = [verb, "-q", str(config), f"run_dir={runs}", "name=bad", f"data.path={tmp_path / 'none.npz'}"]
    assert main([*args, *overrides]) == 2
    assert not runs.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("verb", VERBS)
def test_an_unknown_game_is_named_with_the_close_ones(verb, tmp_path, capsys):
    pytest.importorskip("ale_py", reason="the [atari] extra")
    err = refused(verb, CONFIGS / "atari" / "pong.yaml", ["env.id=ALE/Pongg-v5"], tmp_path, capsys)
    assert "unknown environment id 'ALE/Pongg-v5'; did you mean ALE/Pong-v5" in err


@pytest.mark.parametrize("verb", VERBS)
def test_a_missing_atari_extra_names_the_pip_extra(verb, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ale_py", None)  # makes `import ale_py` fail
    err = refused(verb, CONFIGS / "atari" / "pong.yaml", [], tmp_path, capsys)
    assert "ALE/Pong-v5 needs the Arcade Learning Environment" in err and "pip install 'loopwm[atari]'" in err


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize(
    "config, override, fix",
    [
        ("atari/pong.yaml", "model.encoder=mlp", "model.encoder='mlp' reads vectors: set model.encoder=auto"),
        ("atari/pong.yaml", "model.obs_decoder=delta", "set model.obs_decoder=absolute"),
        ("pendulum.yaml", "model.encoder=cnn", "model.encoder='cnn' reads (C, H, W) frames: set model.encoder=auto"),
    ],
)
def test_a_model_config_that_cannot_read_the_observations_names_the_setting(
    verb, config, override, fix, tmp_path, capsys
):
    if config.startswith("atari"):
        pytest.importorskip("ale_py", reason="the [atari] extra")
    err = refused(verb, CONFIGS / config, [override], tmp_path, capsys)
    assert fix in err
    assert ("gives frames of shape (4, 84, 84)" if config.startswith("atari") else "observations of shape (3,)") in err
