"""Checkpoints round-trip exactly, and bad files get clear errors without losing good ones."""

import pytest
import torch

import loopwm
from loopwm import checkpoint
from loopwm.checkpoint import CheckpointError
from tests.helpers import tiny_model


def test_round_trip_is_exact(tmp_path):
    model = tiny_model(block="token")
    model.set_obs_stats(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0, 2.0]))
    path = tmp_path / "wm.pt"
    loopwm.save(path, model, step=7)
    loaded = loopwm.load(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    obs = torch.randn(4, 3)
    with torch.no_grad():
        out_a = model.imagine(model.encode(obs), torch.zeros(3, 4, 1), decode="all")
        out_b = loaded.imagine(loaded.encode(obs), torch.zeros(3, 4, 1), decode="all")
    assert torch.equal(out_a.obs, out_b.obs)
    assert checkpoint.read_checkpoint(path)["step"] == 7


def test_truncated_and_corrupt_files_get_clear_errors(tmp_path):
    path = tmp_path / "wm.pt"
    loopwm.save(path, tiny_model())
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        loopwm.load(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        loopwm.load(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        loopwm.load(tmp_path / "missing.pt")


def test_foreign_and_future_files_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a loopwm checkpoint"):
        loopwm.load(tmp_path / "foreign.pt")
    torch.save({"format": checkpoint.FORMAT, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        loopwm.load(tmp_path / "future.pt")


class _Payload:
    """Unpickling this object runs open(marker, "w"), which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_not_executed(tmp_path):
    marker = tmp_path / "payload-ran"
    payload = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "x": _Payload(marker)}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a safe torch file|truncated, corrupt"):
        loopwm.load(tmp_path / "evil.pt")
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "wm.pt"
    good = tiny_model()
    loopwm.save(path, good)
    before = path.read_bytes()

    def exploding_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        loopwm.save(path, tiny_model(latent_dim=8))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["wm.pt"]
    loopwm.load(path)


def test_load_run_reads_a_run_folder_or_a_file_and_never_invents_a_config(tmp_path):
    from loopwm.checkpoint import LATEST, load_run
    from loopwm.config import ConfigError, to_dict
    from tests.helpers import tiny_config

    cfg = tiny_config(latent_dim=8)
    model = tiny_model(latent_dim=8)
    loopwm.save(tmp_path / "run" / LATEST, model, config=to_dict(cfg), kind="train", trainer={"updates": 3})
    from_folder, from_file = load_run(tmp_path / "run"), load_run(tmp_path / "run" / LATEST)
    assert from_folder.path == from_file.path == tmp_path / "run" / LATEST
    assert from_folder.config == cfg and from_folder.kind == "train" and from_folder.agent is None
    for key, value in model.state_dict().items():
        assert torch.equal(from_folder.model.state_dict()[key], value), key
    assert from_folder.require_config("it is needed") == cfg

    loopwm.save(tmp_path / "bare.pt", model)
    bare = load_run(tmp_path / "bare.pt")
    assert bare.config is None and bare.kind is None
    with pytest.raises(ConfigError, match=r"bare\.pt.*holds no run config.*so the planner needs one"):
        bare.require_config("the planner needs one")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"run folder .*empty.* has no checkpoint \(checkpoints/latest\.pt\)"):
        load_run(tmp_path / "empty")


def test_a_config_saved_before_the_actor_gradient_option_reads_back_as_the_actor_it_trained():
    from loopwm.checkpoint import config_from_payload
    from loopwm.config import to_dict
    from tests.helpers import tiny_config

    saved = to_dict(tiny_config())
    assert saved["agent"]["prior_gradient"] == "auto"
    assert config_from_payload({"config": saved}).agent.prior_gradient == "auto"  # a newer checkpoint keeps its own
    del saved["agent"]["prior_gradient"]
    assert config_from_payload({"config": saved}).agent.prior_gradient == "dynamics"  # the one actor there was then
    assert "prior_gradient" not in saved["agent"]  # the payload itself is left as it was read
    del saved["model"]["error_head_hidden"], saved["train"]["error_target"]
    cfg = config_from_payload({"config": saved})
    assert cfg.model.error_head_hidden == 0 and cfg.train.error_target == "latent"  # the linear, latent head of then
