"""Train a stable-baselines3 agent purely inside a loopwm world model (Dyna-style), then evaluate it for real.

Each round collects real Pendulum-v1 transitions (random actions first, then the current SB3 policy), fits
the world model on everything collected so far, and trains SB3's SAC only on imagined transitions: short
branches from real replay states, stepped as one batch by `VectorWorldModelEnv` and handed to SB3 through
`SB3VecEnv`. The real environment is never used to train the policy. At the end the policy is played in
the real environment and in the model from the same starts (`value_gap`).

    pip install 'loopwm[examples]'
    python examples/sb3_in_model.py                      # under ten minutes on one core
    python examples/sb3_in_model.py --rounds 1 --real-steps 200 --updates 20 --sb3-steps 256   # seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from loopwm.app.session import seed_everything
from loopwm.config import load_config
from loopwm.envs import VectorWorldModelEnv, WorldModelEnv, action_dim, action_to_model, make_env, value_gap
from loopwm.replay import ReplayBuffer
from loopwm.train import Trainer
from loopwm.world_model import WorldModel

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pendulum.yaml"


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(CONFIG), help="loopwm config of the world model and environment")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config, e.g. model.latent_dim=32")
    p.add_argument("--rounds", type=int, default=2, help="collect / fit / train-in-model rounds")
    p.add_argument("--real-steps", type=int, default=1000, help="real transitions collected per round")
    p.add_argument("--updates", type=int, default=400, help="world-model updates per round")
    p.add_argument("--sb3-steps", type=int, default=12_000, help="imagined transitions SB3 trains on per round")
    p.add_argument("--num-envs", type=int, default=16, help="imagined environments stepped as one batch")
    p.add_argument("--horizon", type=int, default=10, help="imagined branch length from a replay state")
    p.add_argument("--gradient-steps", type=int, default=4, help="SAC gradient steps per batched step")
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the returns as JSON here")
    return p.parse_args(argv)


def collect(env, buffer: ReplayBuffer, steps: int, policy, rng: np.random.Generator, seed: int) -> None:
    """`steps` real transitions (whole episodes) with `policy`, or uniformly random actions when it is None."""
    space, done, obs = env.action_space, True, None
    for t in range(steps):
        if done:
            obs, _ = env.reset(seed=seed + t)
        action = policy(obs) if policy is not None else rng.uniform(space.low, space.high).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, action_to_model(action, space), reward, next_obs, terminated, truncated)
        obs, done = next_obs, terminated or truncated
    buffer.truncate_open()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from stable_baselines3 import SAC

    from loopwm.envs.sb3 import SB3VecEnv

    args = parse(argv)
    cfg = load_config(args.config, [f"seed={args.seed}", "device=cpu", *args.overrides])
    seed_everything(args.seed, args.threads)
    real = make_env(cfg.env, seed=args.seed)
    wm = WorldModel.from_config(cfg, real.observation_space, real.action_space)
    buffer = ReplayBuffer(
        real.observation_space.shape, action_dim(real.action_space), args.rounds * args.real_steps + 1000
    )
    trainer = Trainer(wm, cfg, buffer)
    rng, agent = np.random.default_rng(args.seed), None

    def policy(obs: np.ndarray) -> np.ndarray:
        return agent.predict(obs, deterministic=True)[0]

    for round_ in range(args.rounds):
        collect(real, buffer, args.real_steps, policy if agent is not None else None, rng, 1000 * round_)
        stats = buffer.stats()
        wm.set_obs_stats(stats["obs_mean"], stats["obs_std"])
        trainer.fit(trainer.updates + args.updates, progress=False)
        wm.eval()
        imagined = SB3VecEnv(
            VectorWorldModelEnv(
                wm,
                args.num_envs,
                reset_obs=buffer,
                observation_space=real.observation_space,
                action_space=real.action_space,
                max_episode_steps=args.horizon,
                autoreset_mode="SameStep",
            )
        )
        imagined.seed(args.seed + round_)
        if agent is None:
            agent = SAC(
                "MlpPolicy",
                imagined,
                learning_starts=min(1000, args.sb3_steps // 2),
                gradient_steps=args.gradient_steps,
                seed=args.seed,
                device="cpu",
            )
        else:
            agent.set_env(imagined)
        agent.learn(args.sb3_steps, reset_num_timesteps=False)
        print(
            f"round {round_ + 1}: {len(buffer)} real transitions, {trainer.updates} model updates, "
            f"{agent.num_timesteps} imagined transitions for SAC"
        )
    evaluation = make_env(cfg.env, training=False)
    in_model = WorldModelEnv(
        wm,
        observation_space=real.observation_space,
        action_space=real.action_space,
        max_episode_steps=evaluation.spec.max_episode_steps,
    )
    gap = value_gap(policy, evaluation, in_model, episodes=args.eval_episodes, seed=10_000)
    print(f"real return  {gap.real_mean:9.1f}  {np.round(gap.real, 1).tolist()}")
    print(f"model return {gap.model_mean:9.1f}  {np.round(gap.model, 1).tolist()}")
    print(f"value gap (model - real): {gap.gap:.1f}")
    result = {"args": vars(args), **gap.summary()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
