"""The Atari 100k path: per-game configs on one protocol, the pixel networks, and the actor acting alone."""

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from loopwm.agents import PolicyPlanner, build_planner
from loopwm.agents.planning_agent import planning_parts
from loopwm.config import ConfigError, from_dict, load_config
from loopwm.envs.atari_games import ATARI_100K, game_of
from loopwm.nets import PixelDecoder, PixelEncoder
from loopwm.world_model import WorldModel

ATARI = Path(__file__).resolve().parents[1] / "configs" / "atari"


def test_every_atari_100k_game_has_a_config_on_the_shared_protocol():
    assert len(ATARI_100K) == 26
    for game in ATARI_100K.values():
        cfg = load_config(ATARI / f"{game.stem}.yaml")
        assert cfg.env.id == game.env_id and cfg.name == game.stem and game_of(cfg.env.id) is game
        a = cfg.env.atari
        assert (a.frame_skip, a.sticky_actions, a.noop_max, a.full_action_space) == (4, 0.0, 30, False)
        assert not a.terminal_on_life_loss and cfg.env.max_episode_steps == 27_000  # 108k frames
        assert cfg.agent.total_steps == 100_000 and cfg.planner.method == "policy"
    assert {p.stem for p in ATARI.glob("*.yaml")} == {g.stem for g in ATARI_100K.values()} | {"base"}


def test_reference_scores_normalise_random_to_zero_and_human_to_one():
    for game in ATARI_100K.values():
        assert game.human > game.random
        assert game.normalised(game.random) == 0.0 and game.normalised(game.human) == pytest.approx(1.0)
    assert ATARI_100K["MsPacman"].stem == "ms_pacman" and ATARI_100K["UpNDown"].stem == "up_n_down"
    assert game_of("ALE/Pong-v5") is ATARI_100K["Pong"]
    assert game_of("ALE/Pong-v4") is None and game_of("Pendulum-v1") is None and game_of("ALE/Tetris-v5") is None


def test_extends_lays_a_config_over_its_base_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 3\nmodel:\n  latent_dim: 8\n  loops: 2\ntrain:\n  lr: 0.01\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\nmodel:\n  loops: 5\n")
    (tmp_path / "top.yaml").write_text("extends: mid.yaml\nname: top\ntrain:\n  batch_size: 4\n")
    cfg = load_config(tmp_path / "top.yaml", ["model.latent_dim=16"])
    assert (cfg.name, cfg.seed, cfg.model.latent_dim, cfg.model.loops) == ("top", 3, 16, 5)
    assert (cfg.train.lr, cfg.train.batch_size) == (0.01, 4)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("extends: [base.yaml]\n")
    with pytest.raises(ConfigError, match="expected the path of another config"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "gone.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*does not exist"):
        load_config(tmp_path / "gone.yaml")


@pytest.mark.parametrize("shape", [(4, 84, 84), (4, 36, 36), (1, 37, 50), (3, 64, 96), (2, 210, 160)])
def test_pixel_decoder_mirrors_the_encoder_onto_the_exact_frame_size(shape):
    enc, dec = PixelEncoder(shape, 32, 16, channels=4), PixelDecoder(shape, 16, channels=4)
    x = torch.rand(3, *shape) - 0.5
    assert enc(x).shape == (3, 16) and dec(enc(x)).shape == (3, *shape)
    with pytest.raises(ValueError, match="too small for the CNN encoder"):
        PixelEncoder((4, 35, 84), 32, 16)


def test_the_atari_cnn_is_sized_for_a_cpu():
    """At 84x84x4 and 16 channels the DQN-style stack costs 2.7M multiply-adds per frame stack."""
    enc = PixelEncoder((4, 84, 84), 256, 128, channels=16)
    convs = [m for m in enc.conv if isinstance(m, torch.nn.Conv2d)]
    macs, size = 0, 84
    for conv in convs:
        size = (size - conv.kernel_size[0]) // conv.stride[0] + 1
        macs += size * size * conv.out_channels * conv.in_channels * conv.kernel_size[0] ** 2
    assert [c.out_channels for c in convs] == [16, 32, 32] and size == 7
    assert 2.5e6 < macs < 3.0e6


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_pixel_normalisation_maps_0_255_to_minus_half_half_and_leaves_its_input_alone(dtype):
    _, wm, _ = pixel_agent()
    frames = torch.randint(0, 256, (2, 4, 40, 40)).to(dtype)
    frames[0, 0, 0, :2] = torch.tensor([0, 255])
    kept = frames.clone()
    x = wm.normalize_obs(frames)
    assert x.dtype == torch.float32 and x[0, 0, 0, :2].tolist() == [-0.5, 0.5]
    torch.testing.assert_close(wm.denormalize_obs(x), frames.float(), rtol=0, atol=1e-4)
    assert torch.equal(frames, kept)  # the caller's frames (and the replay's) are not scaled in place


def pixel_agent(**planner):
    cfg = from_dict(
        {
            "model": {"latent_dim": 16, "hidden_dim": 32, "inject_dim": 32, "mlp_dim": 32, "loops": 2, "exit": "fixed"},
            "planner": {"method": "policy", **planner},
            "agent": {"hidden_dim": 32},
        }
    )
    wm = WorldModel.from_config(cfg, gym.spaces.Box(0, 255, (4, 40, 40), np.uint8), gym.spaces.Discrete(5))
    return cfg, wm, planning_parts(cfg, wm, seed=3)


def test_policy_planner_acts_with_the_actor_alone():
    cfg, wm, (value, prior, planner) = pixel_agent()
    assert isinstance(planner, PolicyPlanner)
    obs = np.random.default_rng(0).integers(0, 256, (6, 4, 40, 40), dtype=np.uint8)
    with torch.no_grad():
        mode = prior.mode(wm.encode(torch.as_tensor(obs)))
    evaluated = planner.model_action(obs, eval_mode=True, batched=True)
    np.testing.assert_array_equal(evaluated, mode.numpy())  # evaluation: the mode, deterministically
    state = planner.state_dict()
    drawn = [planner.model_action(obs, batched=True) for _ in range(20)]
    assert all(np.array_equal(d.sum(-1), np.ones(6)) for d in drawn)  # one-hot samples
    assert len({d.argmax(-1).tobytes() for d in drawn}) > 1  # training samples from π
    planner.load_state_dict(state)  # the samples come from the planner's own generator
    np.testing.assert_array_equal(planner.model_action(obs, batched=True), drawn[0])
    assert planner.act(obs[0]) in range(5)


def test_policy_planner_can_evaluate_with_samples_and_needs_the_actor():
    cfg, wm, (_, _, planner) = pixel_agent(policy_eval="sample")
    obs = np.random.default_rng(1).integers(0, 256, (6, 4, 40, 40), dtype=np.uint8)
    evals = {planner.model_action(obs, eval_mode=True, batched=True).argmax(-1).tobytes() for _ in range(20)}
    assert len(evals) > 1
    with pytest.raises(ConfigError, match="planner.policy_eval='greedy'"):
        from_dict({"planner": {"policy_eval": "greedy"}})
    no_actor = from_dict({"planner": {"method": "policy"}, "agent": {"use_policy_prior": False}})
    with pytest.raises(ConfigError, match="set agent.use_policy_prior=true"):
        build_planner(no_actor, wm)


def test_atari_env_follows_the_protocol():
    pytest.importorskip("ale_py", reason="the [atari] extra")
    from loopwm.envs.factory import make_env

    cfg = load_config(ATARI / "breakout.yaml")
    env = make_env(cfg.env, seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert env.action_space == gym.spaces.Discrete(4)  # Breakout's minimal action set
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    env.close()


@pytest.mark.parametrize("batch", [1, 3])
def test_discrete_index_actions_step_like_their_one_hots_at_any_batch(batch):
    _, wm, _ = pixel_agent()
    obs = torch.as_tensor(np.random.default_rng(2).integers(0, 256, (batch, 4, 40, 40), dtype=np.uint8))
    z, idx = wm.encode(obs), torch.arange(batch) % 5
    by_index, _ = wm.step(z, idx)
    by_one_hot, _ = wm.step(z, torch.nn.functional.one_hot(idx, 5).float())
    torch.testing.assert_close(by_index, by_one_hot)
