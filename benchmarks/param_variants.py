"""The models `param_efficiency.py` compares: loopwm configs (overrides on the task's YAML) and the obs-space MLP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Variant:
    """A model to compare: a loopwm config (overrides on the task's YAML) or the observation-space MLP."""

    name: str
    kind: str = "loopwm"  # "loopwm" or "obs-mlp"
    overrides: list[str] = field(default_factory=list)
    note: str = ""
    match: Optional[str] = None  # "parameters" or "macs": set model.dynamics_width to match the shipped loopwm


PLAIN_LOOP = ["train.loop_sampling=fixed", "train.w_deep=0", "train.w_gate=0", "train.extra_loops=0"]
"""The loop's training extras switched off: fixed loop count, no deep supervision, no extra loops, no gate."""
DELTA_DESIGN = ["model.obs_decoder=delta", "model.latent_update=residual", "train.w_delta=10", "train.w_obs=10"]
"""Observation-space design: the delta decoder, the residual latent update and observation-space weights."""
PLAIN_MLP = ["model.dynamics=mlp", "train.w_deep=0", "train.w_gate=0", "train.extra_loops=0", "planner.loops=null"]
"""The loop replaced by a TD-MPC2-style MLP core; the loop-only terms (deep supervision, gate, extra loops, a
planner loop count) off."""

VARIANTS = {
    v.name: v
    for v in [
        Variant("loopwm", note="configs/<task>.yaml as shipped"),
        Variant("obs-mlp", kind="obs-mlp", note="4x200 SiLU, normalised delta, 1-step loss"),
        Variant(
            "stack",
            overrides=["model.shared=false", "planner.loops=null", *PLAIN_LOOP],
            note="unshared stack: model.loops distinct blocks of the same width, each applied once, each its own "
            "contraction; trained as loopwm-plain",
        ),
        Variant(
            "mlp-params",
            overrides=PLAIN_MLP,
            match="parameters",
            note="TD-MPC2-style MLP core (Linear-LayerNorm-Mish x2, no loop; latent LayerNorm as loopwm's), width "
            "matching the shipped loopwm's parameters",
        ),
        Variant(
            "mlp-flops",
            overrides=PLAIN_MLP,
            match="macs",
            note="TD-MPC2-style MLP core as mlp-params, width matching the shipped loopwm's FLOPs per step",
        ),
        Variant(
            "loopwm-plain",
            overrides=PLAIN_LOOP,
            note="the shipped latent design, trained at model.loops without deep supervision, extra loops or gate",
        ),
        Variant(
            "loopwm+delta+plain",
            overrides=[*DELTA_DESIGN, *PLAIN_LOOP],
            note="delta decoder, residual latent, observation weights 10, plain loop objective",
        ),
        Variant(
            "loopwm-delta",
            overrides=["model.obs_decoder=delta"],
            note="delta decoder: o_k = o_{k-1} + D(z_{k-1}, z_k), chained from the true first observation",
        ),
        Variant(
            "loopwm-residual",
            overrides=["model.latent_update=residual"],
            note="residual latent: z_k = LN(z_{k-1} + C(h))",
        ),
        Variant(
            "loopwm-delta-residual",
            overrides=["model.obs_decoder=delta", "model.latent_update=residual"],
            note="delta decoder and residual latent",
        ),
    ]
}
