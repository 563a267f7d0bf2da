"""Rules across config sections: option combinations that the model, training and planner cannot honour together.

Each section checks its own fields when it is built; these run once the whole `Config` is, so that an error can name
every key involved and what to set instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loopwm.sections import ConfigError

if TYPE_CHECKING:
    from loopwm.config import Config


def check_combinations(cfg: Config) -> None:
    """Every cross-section rule; raises ConfigError naming the keys."""
    check_dynamics(cfg)
    check_error_head(cfg)
    from loopwm.exits import planner_loop_options

    planner_loop_options(cfg.model, cfg.planner)


def check_error_head(cfg: Config) -> None:
    """The relative exit scales its tolerance by the error head's prediction, and the planner's error penalty
    charges it; only `train.w_error` trains it."""
    rules = {"model.exit": cfg.model.exit, "planner.exit": cfg.planner.exit}
    uses = [f"{key}='relative'" for key, rule in rules.items() if rule == "relative"]
    if cfg.planner.uncertainty == "error" and cfg.planner.uncertainty_penalty > 0:
        uses.append("planner.uncertainty='error'")
    if uses and cfg.model.dynamics == "mlp":
        raise ConfigError(
            f"{uses[0]} needs the error head, which a loop-free core (model.dynamics='mlp') does not have: "
            "use another rule or planner.uncertainty, or planner.uncertainty_penalty=0"
        )
    if (uses or cfg.train.w_error > 0) and not cfg.model.error_head:
        what = uses[0] if uses else f"train.w_error={cfg.train.w_error}"
        raise ConfigError(f"{what} needs the error head: set model.error_head=true")
    if uses and cfg.train.w_error == 0:
        raise ConfigError(
            f"{uses[0]} uses the error head's prediction, which train.w_error=0 leaves untrained: "
            "set train.w_error > 0 (e.g. 0.1)"
        )


def inert_keys(cfg: Config) -> frozenset[str]:
    """The keys (as `config.section.key`) that change nothing under `cfg`: the error head's width when the model
    has no head, its target when nothing trains it, and what the planner's uncertainty penalty charges when
    the penalty is 0. A run resumed with a different value of a key that is
    inert in both configs runs exactly as it would have."""
    inert = set()
    if not cfg.model.error_head:
        inert.add("config.model.error_head_hidden")
    if cfg.train.w_error == 0:
        inert.add("config.train.error_target")
    if cfg.planner.uncertainty_penalty == 0:
        inert.add("config.planner.uncertainty")
    return frozenset(inert)


def check_planner_loops(cfg: Config) -> None:
    """A loop-free core has no loop for the planner to shorten, stop early or warm-start; an unshared stack
    plans with the loop options it was trained with, from zero, since it has no fixed point to start near."""
    m, p = cfg.model, cfg.planner
    if m.dynamics == "mlp":
        wrong = {key: getattr(p, key) for key in p.LOOP_OPTIONS if getattr(p, key) is not None}
        why = "model.dynamics='mlp' has no loop to shorten, stop or warm-start"
    elif not m.shared:
        wrong = {key: getattr(p, key) for key in p.LOOP_OPTIONS if getattr(p, key) not in (None, getattr(m, key))}
        why = (
            f"an unshared stack (model.shared=false) applies its model.loops={m.loops} blocks as trained "
            f"(model.exit={m.exit!r}), from zero"
        )
    else:
        return
    fixes = [f"planner.{key}=null" for key in wrong]
    if p.warm_start != "none":
        wrong["warm_start"] = p.warm_start
        fixes.append("planner.warm_start=none")
    if wrong:
        given = ", ".join(f"planner.{key}={value!r}" for key, value in wrong.items())
        raise ConfigError(f"{given}: {why}; set {', '.join(fixes)}")


def check_dynamics(cfg: Config) -> None:
    """Training and planning options that an unshared stack or a loop-free core cannot honour."""
    m, t = cfg.model, cfg.train
    extra = t.extra_loops > 0 and t.w_extra > 0
    if m.dynamics == "mlp":
        unset = {
            "train.extra_loops=0": extra,
            "train.w_deep=0": t.w_deep > 0,
            "train.w_gate=0": t.w_gate > 0,
            "train.w_error=0": t.w_error > 0,
            "model.error_head=false": m.error_head,
        }
        loop_terms = [key for key, on in unset.items() if on]
        if loop_terms:
            raise ConfigError(
                "model.dynamics='mlp' has no loop, so extra loops, deep supervision, the exit gate and the "
                f"error head have nothing to train: set {', '.join(loop_terms)}"
            )
    check_planner_loops(cfg)
    if m.shared:
        return
    if extra:
        raise ConfigError(
            f"train.extra_loops={t.extra_loops} would loop past the last of model.loops={m.loops} unshared "
            "blocks (model.shared=false): set train.extra_loops=0"
        )
    if t.loop_sampling == "poisson" and m.max_loops > m.loops:
        raise ConfigError(
            f"train.loop_sampling='poisson' draws up to model.max_loops={m.max_loops} loops, more than the "
            f"model.loops={m.loops} unshared blocks (model.shared=false): set model.max_loops<={m.loops} "
            "or train.loop_sampling=fixed"
        )
    if cfg.planner.uncertainty_penalty > 0 and cfg.planner.uncertainty != "error":
        raise ConfigError(
            f"planner.uncertainty={cfg.planner.uncertainty!r} penalises the loop's distance to its fixed point, "
            "which an unshared stack (model.shared=false) does not have: set planner.uncertainty=error (with "
            "model.error_head=true) or planner.uncertainty_penalty=0"
        )
