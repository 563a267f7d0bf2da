"""Typed experiment configs: dataclasses loaded from YAML, with dotted overrides and strict validation.

Every value is checked when a section is built, whether from YAML or directly in Python: a typo, an
out-of-range or non-finite number, or a rule across fields fails before any work starts, with an error
that names the key, the value and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml

from loopwm.config_rules import check_combinations
from loopwm.sections import ConfigError, Section, bounds, build_dataclass


@dataclass
class AtariConfig(Section):
    """Atari preprocessing (the standard one of Machado et al. 2018, with frame stacking)."""

    prefix: ClassVar[str] = "env.atari"
    frame_skip: int = field(default=4, metadata=bounds(1, 16))
    frame_stack: int = field(default=4, metadata=bounds(1, 16))
    screen_size: int = field(default=84, metadata=bounds(16, 256))
    sticky_actions: float = field(default=0.25, metadata=bounds(0.0, 1.0))
    noop_max: int = field(default=30, metadata=bounds(0, 1000))  # up to this many no-ops after each reset
    full_action_space: bool = False  # all 18 actions, or the game's minimal set
    terminal_on_life_loss: bool = False
    clip_rewards: bool = True


@dataclass
class EnvConfig(Section):
    """Which Gymnasium environment to build, and how to wrap it."""

    prefix: ClassVar[str] = "env"
    id: str = "Pendulum-v1"
    num_envs: int = field(default=1, metadata=bounds(1, 256))
    vectorization: Literal["sync", "async"] = "sync"
    max_episode_steps: Optional[int] = field(default=None, metadata=bounds(1))
    action_repeat: int = field(default=1, metadata=bounds(1, 16))
    atari: AtariConfig = field(default_factory=AtariConfig)


@dataclass
class ModelConfig(Section):
    """Shape of the looped world model and its exit rule.

    `block` names a registered shared block (`loopwm.blocks.BLOCKS`); `block_options` holds that block's
    own settings (e.g. `{tokens: 4}` for "token"), checked by the block. `exit` names a registered exit rule
    (`loopwm.exits.EXIT_RULES`).
    """

    prefix: ClassVar[str] = "model"
    latent_dim: int = field(default=64, metadata=bounds(1))
    hidden_dim: int = field(default=128, metadata=bounds(1))
    inject_dim: int = field(default=128, metadata=bounds(1))
    mlp_dim: int = field(default=256, metadata=bounds(1))
    block: str = "mlp"
    block_depth: int = field(default=1, metadata=bounds(1, 8))
    block_options: dict = field(default_factory=dict)
    activation: Literal["relu", "leaky_relu", "tanh"] = "relu"
    kappa_max: float = field(default=0.9, metadata=bounds(0.0, 1.0, lo_open=True, hi_open=True))
    retention_max: float = field(default=0.5, metadata=bounds(0.0, 1.0, hi_open=True))
    constrain_block: bool = True
    retention: bool = True
    loops: int = field(default=4, metadata=bounds(1, 256))
    exit: str = "fixed"
    min_loops: int = field(default=1, metadata=bounds(1, 256))
    max_loops: int = field(default=16, metadata=bounds(1, 1024))
    exit_tol: float = field(default=1e-2, metadata=bounds(0.0, lo_open=True))
    gate_threshold: float = field(default=0.5, metadata=bounds(0.0, 1.0))
    exit_rel_tol: float = field(default=0.1, metadata=bounds(0.0, lo_open=True))  # "relative": × predicted error
    error_head: bool = False  # a head predicting each step's log error (train.w_error trains it; exit=relative)
    error_head_hidden: int = field(default=64, metadata=bounds(0))  # its SiLU layer's width (0: a linear head)
    reward_head: Literal["symlog", "twohot"] = "symlog"
    reward_bins: int = field(default=101, metadata=bounds(3))
    encoder: Literal["auto", "mlp", "cnn"] = "auto"
    cnn_channels: int = field(default=16, metadata=bounds(1, 256))  # pixel encoder/decoder width c (c, 2c, 2c)
    # "delta" adds a head that decodes o_k − o_{k−1} from (z_{k−1}, z_k): rollouts add it to the previous decoded obs
    obs_decoder: Literal["absolute", "delta"] = "absolute"
    # "residual": the coda's output is a change added to the previous latent (z_k = LN(z_{k−1} + C(h))), not z_k itself
    latent_update: Literal["absolute", "residual"] = "absolute"
    # false: an unshared stack, one distinct block per loop (model.loops of them), each its own contraction
    shared: bool = True
    # "mlp": no loop; a feed-forward core in TD-MPC2's style (Linear-LayerNorm-Mish) between the prelude and the coda
    dynamics: Literal["loop", "mlp"] = "loop"
    dynamics_width: int = field(default=512, metadata=bounds(1))  # the "mlp" core's width
    dynamics_depth: int = field(default=2, metadata=bounds(1, 16))  # and its number of Linear-LayerNorm-Mish layers

    def check(self) -> None:
        from loopwm.blocks import check_block
        from loopwm.exits import check_exit

        if self.min_loops > self.max_loops:
            raise ConfigError(f"model.min_loops={self.min_loops} must be <= model.max_loops={self.max_loops}")
        if self.retention and self.retention_max >= self.kappa_max:
            raise ConfigError(
                f"model.retention_max={self.retention_max} must be < model.kappa_max={self.kappa_max}: "
                "the shared block needs a positive share of the contraction budget"
            )
        check_exit(self.exit)
        check_block(self)
        if not self.shared:
            self.check_stack()

    def check_stack(self) -> None:
        """An unshared stack has a block for each of its `loops` loops and no single fixed point."""
        from loopwm.exits import check_exit

        if self.dynamics != "loop":
            raise ConfigError(f"model.shared=false stacks loop blocks; model.dynamics={self.dynamics!r} has no loop")
        if check_exit(self.exit).uses_bound:
            raise ConfigError(
                f"model.exit={self.exit!r} needs a shared block: with model.shared=false every loop applies a "
                "different map, so there is no fixed point to certify a distance to; use model.exit=fixed"
            )
        if self.exit != "fixed" and self.max_loops > self.loops:
            raise ConfigError(
                f"model.shared=false builds model.loops={self.loops} blocks, one per loop; the {self.exit} exit "
                f"could run model.max_loops={self.max_loops} loops: set model.max_loops<={self.loops}"
            )


@dataclass
class TrainConfig(Section):
    """World-model fitting: objective, loop sampling, optimiser and bookkeeping."""

    prefix: ClassVar[str] = "train"
    updates: int = field(default=2000, metadata=bounds(0))
    batch_size: int = field(default=256, metadata=bounds(1))
    horizon: int = field(default=5, metadata=bounds(1, 256))
    optimizer: str = "adam"
    lookahead: bool = False
    lr: float = field(default=1e-3, metadata=bounds(0.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=bounds(0.0))
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup: int = field(default=0, metadata=bounds(0))
    grad_clip: float = field(default=10.0, metadata=bounds(0.0))
    rho: float = field(default=0.9, metadata=bounds(0.0, 1.0))
    w_consistency: float = field(default=1.0, metadata=bounds(0.0))
    w_obs: float = field(default=1.0, metadata=bounds(0.0))
    w_reward: float = field(default=0.5, metadata=bounds(0.0))
    # the share of the reward loss given to steps with a non-zero reward (0: off, the plain mean); for sparse rewards
    reward_balance: float = field(default=0.0, metadata=bounds(0.0, 1.0, hi_open=True))
    # the reward head also on the encoder's latent of the true next observation, gradients into the encoder
    w_reward_encoded: float = field(default=0.0, metadata=bounds(0.0))
    w_continue: float = field(default=0.1, metadata=bounds(0.0))
    w_deep: float = field(default=0.1, metadata=bounds(0.0))
    w_gate: float = field(default=0.1, metadata=bounds(0.0))
    w_extra: float = field(default=0.5, metadata=bounds(0.0))
    w_delta: float = field(default=1.0, metadata=bounds(0.0))  # chained delta-decoder loss (model.obs_decoder=delta)
    w_recon: float = field(default=0.0, metadata=bounds(0.0))  # decode(E(o)) against o, gradients into the encoder
    w_error: float = field(default=0.0, metadata=bounds(0.0))  # the error head's log-error regression (exit=relative)
    # what the error head predicts: each step's observation error (what rollouts are scored on) or the latent
    # consistency error
    error_target: Literal["obs", "latent"] = "obs"
    loop_sampling: Literal["poisson", "fixed"] = "poisson"  # per-sequence 1 + Poisson(loop_mean − 1), or model.loops
    loop_mean: float = field(default=4.0, metadata=bounds(0.0))
    bptt_loops: int = field(default=4, metadata=bounds(1))
    hard_quantile: float = field(default=0.9, metadata=bounds(0.0, 1.0))
    extra_loops: int = field(default=4, metadata=bounds(0))
    obs_inject_prob: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    val_fraction: float = field(default=0.1, metadata=bounds(0.0, 0.9))
    log_every: int = field(default=50, metadata=bounds(1))
    checkpoint_every: int = field(default=500, metadata=bounds(1))
    max_nonfinite: int = field(default=10, metadata=bounds(1))  # NaN/inf updates in a row (skipped) before a stop

    def check(self) -> None:
        from loopwm.optim import OPTIMIZERS

        if self.optimizer.lower() not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        if self.w_continue == 0:
            raise ConfigError(
                "train.w_continue=0 leaves the continue head untrained: its outputs stay near 0.5, and every "
                "imagined return (planner, value, prior) would be discounted by them; keep it > 0, even for "
                "environments that never terminate"
            )


@dataclass
class DataConfig(Section):
    """Where datasets live and how `loopwm collect` fills them."""

    prefix: ClassVar[str] = "data"
    path: str = "data/dataset.npz"
    steps: int = field(default=20000, metadata=bounds(1))
    policy: Literal["random", "noisy_planner", "mixed"] = "random"
    noise: float = field(default=0.3, metadata=bounds(0.0))
    planner_checkpoint: Optional[str] = None
    capacity: int = field(default=1_000_000, metadata=bounds(1))


@dataclass
class PlannerConfig(Section):
    """Latent planning: `method` names a registered planner (`loopwm.agents.planner.PLANNERS`).

    The discount is the agent's (`agent.discount`): planner, value and prior share one.

    How imagined steps loop: `exit` (a rule in `loopwm.exits.EXIT_RULES`), `loops`, `min_loops`, `max_loops`
    and `exit_tol` override the model's own (`model.exit` and its limits) where set. `warm_start` picks the
    state each imagined step's loop starts from instead of zero: "iteration" the same sample's exit state in
    the previous MPPI iteration, "elite" the elites' weighted mean of the previous iteration (at an episode's
    later decisions' first iteration, of the previous decision, shifted a step), "time" the previous
    imagined step's (the first step's from the elite mean, as for "elite").
    The contraction reaches the same fixed point from any start; a warm start gets near it in fewer loops.
    """

    prefix: ClassVar[str] = "planner"
    method: str = "mppi"
    horizon: int = field(default=3, metadata=bounds(1, 128))
    iterations: int = field(default=3, metadata=bounds(1, 64))
    samples: int = field(default=256, metadata=bounds(2))
    elites: int = field(default=32, metadata=bounds(1))
    policy_samples: int = field(default=16, metadata=bounds(0))
    temperature: float = field(default=0.5, metadata=bounds(0.0, lo_open=True))
    min_std: float = field(default=0.05, metadata=bounds(0.0))
    max_std: float = field(default=2.0, metadata=bounds(0.0, lo_open=True))
    uncertainty_penalty: float = field(default=0.0, metadata=bounds(0.0))
    # what the penalty charges each imagined step: the certified distance to the fixed point ("bound"), 1 where
    # the loop has not converged ("unconverged"), or the error head's predicted error relative to a typical
    # step's ("error", needs model.error_head)
    uncertainty: Literal["bound", "unconverged", "error"] = "bound"
    momentum: float = field(default=0.1, metadata=bounds(0.0, 1.0))
    policy_eval: Literal["mode", "sample"] = "mode"  # method=policy: evaluate with π's mode, or a sample of π
    warm_start: Literal["none", "iteration", "time", "elite"] = "none"
    exit: Optional[str] = None
    loops: Optional[int] = field(default=None, metadata=bounds(1, 256))
    min_loops: Optional[int] = field(default=None, metadata=bounds(1, 256))
    max_loops: Optional[int] = field(default=None, metadata=bounds(1, 1024))
    exit_tol: Optional[float] = field(default=None, metadata=bounds(0.0, lo_open=True))
    exit_rel_tol: Optional[float] = field(default=None, metadata=bounds(0.0, lo_open=True))

    LOOP_OPTIONS: ClassVar[dict[str, str]] = {
        "exit": "exit",
        "loops": "loops",
        "min_loops": "min_loops",
        "max_loops": "max_loops",
        "exit_tol": "tol",
        "exit_rel_tol": "rel_tol",
    }  # planner key -> `LoopOptions` field

    def loop_overrides(self) -> dict[str, Any]:
        """The loop options set here, by their `LoopOptions` names (the model's own fill the rest)."""
        return {opt: getattr(self, key) for key, opt in self.LOOP_OPTIONS.items() if getattr(self, key) is not None}

    def check(self) -> None:
        from loopwm.exits import check_exit

        if self.exit is not None:
            try:
                check_exit(self.exit)
            except ConfigError as exc:
                raise ConfigError(f"planner.{exc}") from None
        if self.elites > self.samples:
            raise ConfigError(f"planner.elites={self.elites} must be <= planner.samples={self.samples}")
        if self.policy_samples >= self.samples:
            raise ConfigError(f"planner.policy_samples={self.policy_samples} must be < planner.samples={self.samples}")


@dataclass
class AgentConfig(Section):
    """The online loop: seeding, update ratio, value and prior learning, and evaluation."""

    prefix: ClassVar[str] = "agent"
    total_steps: int = field(default=5000, metadata=bounds(1))
    seed_steps: int = field(default=500, metadata=bounds(0))
    update_every: int = field(default=1, metadata=bounds(1))
    updates_per_step: float = field(default=1.0, metadata=bounds(0.0))
    eval_every: int = field(default=1000, metadata=bounds(1))
    eval_episodes: int = field(default=5, metadata=bounds(1))
    eval_video: bool = False  # also log each evaluation's first episode as a video to TensorBoard (and W&B)
    use_value: bool = True
    use_policy_prior: bool = True
    value_lr: float = field(default=3e-4, metadata=bounds(0.0, lo_open=True))
    tau: float = field(default=0.01, metadata=bounds(0.0, 1.0))
    value_lambda: float = field(default=0.95, metadata=bounds(0.0, 1.0))
    discount: float = field(default=0.99, metadata=bounds(0.0, 1.0))
    hidden_dim: int = field(default=256, metadata=bounds(1))
    prior_horizon: int = field(default=3, metadata=bounds(1, 64))
    prior_entropy: float = field(default=1e-3, metadata=bounds(0.0))
    # how the prior's imagined return reaches its parameters: "dynamics" backpropagates it through the
    # world model, "reinforce" weights log π(a|z) by the λ-return advantage; "auto" uses dynamics for Box
    # actions and reinforce for categorical ones, whose straight-through gradient is biased (as DreamerV3 does)
    prior_gradient: Literal["auto", "dynamics", "reinforce"] = "auto"
    exploration_std: float = field(default=0.1, metadata=bounds(0.0))


@dataclass
class Config(Section):
    """A whole experiment."""

    name: str = "default"
    seed: int = field(default=0, metadata=bounds(0, 2**32 - 1))  # numpy's seed range
    device: str = "auto"
    run_dir: str = "runs"
    resume: bool = False
    threads: int = field(default=0, metadata=bounds(0))
    wandb: bool = False  # mirror the TensorBoard scalars to Weights & Biases (extra [wandb])
    wandb_project: str = "loopwm"  # the W&B project runs go to when wandb is true
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)

    def check(self) -> None:
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device={self.device!r}: expected 'auto', 'cpu' or 'cuda[:N]'")
        check_combinations(self)


def from_dict(data: dict) -> Config:
    """Build and check a Config from a plain nested dict."""
    return build_dataclass(Config, data or {}, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse a dotted `key=value` override; the value is read as YAML (so `true`, `3`, `1e-3` work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: an integer of > 4300 digits
        raise ConfigError(f"override {text[:80]!r}: value is not valid YAML ({str(exc)[:200]})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with each dotted override set."""
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def merge(base: dict, over: dict) -> dict:
    """`base` with `over` laid on top, section by section (a copy; neither input changes)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping with `safe_load`, turning parse errors into ConfigError naming the file.

    A top-level `extends: other.yaml` (relative to this file) reads that config first and lays this one on top,
    so a family of configs shares one base (configs/atari/).
    """
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"config file {str(path)!r} extends itself: {' -> '.join(str(p) for p in (*_seen, path))}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(path)!r}: extends={base!r}: expected the path of another config")
    return merge(read_yaml(path.parent / base, (*_seen, path.resolve())), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply dotted overrides."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))


def to_dict(cfg: Config) -> dict:
    """The config as a plain nested dict (what checkpoints and `config.yaml` hold)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
