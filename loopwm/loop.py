"""The looped core: h(t+1) = Ā ⊙ h(t) + B̄ e + R̄(h(t), e), with a certificate κ < 1 built into its parameters.

Ā = exp(-Δ ⊙ exp(a) - r_min) is the zero-order hold of a negative diagonal, capped at
`retention_max`; R̄ is a block whose h-path maps have spectral norm ≤ 1 and whose output gain is
s = (κ_max − max Ā)·sigmoid(ρ). So κ = max Ā + s < κ_max < 1 for every parameter value, and Banach's
theorem gives a unique fixed point h*(e), the a-posteriori bound ‖h(t) − h*‖ ≤ κ/(1−κ)‖h(t) − h(t−1)‖
and ‖h*‖ ≤ ‖F(0)‖/(1−κ). "Paper mode" (LoopWM, arXiv 2606.18208) drops the constraint on R̄.

With `model.shared=false` loop t applies its own block R̄_t and gain s_t (an unshared stack of `model.loops`
blocks; Ā and B̄ stay common). Every map F_t is still a κ_t-contraction, so states stay bounded by
max_t ‖F_t(0)‖/(1−κ), but there is no common fixed point: the certified exit is refused and the bound
at exit is +inf.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from loopwm.blocks import make_block
from loopwm.certificate import LoopCertificate, norm_bounds
from loopwm.config import ModelConfig
from loopwm.exits import EXIT_RULES, LoopOptions, LoopStep
from loopwm.lipschitz import Certified, CertifiedLinear, round_up
from loopwm.loop_state import LoopParams, LoopTrace, StepContext


def build_error_head(dim: int, hidden: int) -> nn.Module:
    """The error head on a loop state of size `dim`: linear (`hidden` = 0) or one SiLU layer of `hidden` units.

    Its output layer starts at zero, a constant prediction; its hidden layer is drawn from a generator of its own,
    seeded with the global seed without advancing the global RNG, so a model with the head initialises every other
    weight exactly as one without it (the two compare under the same seed). That generator repeats the global
    stream's first draws, rescaled; for a readout of detached states that correlation is harmless."""
    out = nn.utils.skip_init(nn.Linear, hidden or dim, 1)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    if hidden == 0:
        return out
    first = nn.utils.skip_init(nn.Linear, dim, hidden)
    gen = torch.Generator().manual_seed(torch.initial_seed())
    nn.init.kaiming_uniform_(first.weight, a=math.sqrt(5), generator=gen)
    nn.init.zeros_(first.bias)
    return nn.Sequential(first, nn.SiLU(), out)


class LoopCore(nn.Module):
    """Retention, injection drive, shared block and exit policies: the part that loops."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_dim
        self.use_retention = cfg.retention and cfg.retention_max > 0
        self.r_min = -math.log(cfg.retention_max) if self.use_retention else 0.0
        self.log_rate = nn.Parameter(torch.linspace(-1.0, 1.0, h))  # a
        self.delta_raw = nn.Parameter(torch.full((h,), math.log(math.e - 1)))  # δ, softplus(δ) = 1
        self.inject = nn.Linear(cfg.inject_dim, h, bias=False)  # B
        # one shared block, or (model.shared=false) model.loops distinct ones, each with its own gain
        self.block = make_block(cfg) if cfg.shared else nn.ModuleList(make_block(cfg) for _ in range(cfg.loops))
        self.gain_logit = nn.Parameter(torch.zeros(() if cfg.shared else (cfg.loops,)))  # logit, or log-gain (paper)
        self.gate = nn.Linear(h + 1, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, -2.0)
        # model.error_head: a log-error prediction around `error_offset`, a running mean of the training targets,
        # so the head itself learns only the ranking
        self.error_head: Optional[nn.Module] = None
        if cfg.error_head:
            self.error_head = build_error_head(h, cfg.error_head_hidden)
            self.register_buffer("error_offset", torch.zeros(()))
        self.default_options = LoopOptions.from_config(cfg)
        self._scope: Optional[LoopParams] = None
        self._cache: tuple[tuple, list[Tensor]] | None = None
        self._params_cache: tuple[tuple, LoopParams] | None = None

    # ---- parameters -> certificate -------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """The block of each loop, in order: the one shared block, or the stack's `model.loops` blocks."""
        return [self.block] if self.cfg.shared else list(self.block)

    def linears(self) -> list[CertifiedLinear]:
        """Every h-path map of every block, block by block."""
        return [lin for block in self.blocks() for lin in block.linears()]

    def retention(self) -> Tensor:
        """Ā = exp(−(r_min + Δ·exp(a))) per hidden unit, or zeros when retention is ablated."""
        if not self.use_retention:
            return torch.zeros_like(self.log_rate)
        return torch.exp(-(self.r_min + F.softplus(self.delta_raw) * torch.exp(self.log_rate)))

    def block_scale(self, max_retention: Tensor) -> Tensor:
        """s: the block's output gain (one per block of a stack), inside the contraction budget unless in paper
        mode."""
        if self.cfg.constrain_block:
            return (self.cfg.kappa_max - max_retention) * torch.sigmoid(self.gain_logit)
        return (self.cfg.kappa_max - self.cfg.retention_max) * 0.5 * torch.exp(self.gain_logit)

    def kappa(self) -> Tensor:
        """κ (float64) = max Ā + Π L_i, L_i ≥ ‖W_i‖₂ of the h-path weights as the loop applies them (see
        `LoopCertificate`): an upper bound on Lip_h of the loop map, in every mode and for every weight."""
        with torch.no_grad():
            return self.loop_params().kappa

    def certified_weights(self) -> list[Certified]:
        """The h-path weights as applied, with their norm bounds: computed once per forward call, never once
        per loop (cached under no_grad until a weight changes). A non-finite weight raises, naming it."""
        linears = self.linears()
        if torch.is_grad_enabled():
            return [lin.certify(name) for lin, name in zip(linears, self._linear_names())]
        key = tuple((lin.weight._version, lin.weight.data_ptr()) for lin in linears)
        if self._cache is None or self._cache[0] != key:
            certified = [lin.certify(name) for lin, name in zip(linears, self._linear_names())]
            self._cache = (key, [c._replace(weight=c.weight.detach()) for c in certified])
        return self._cache[1]

    def effective_weights(self) -> list[Tensor]:
        """The normalised h-path weights (before the gain s), as the loop applies them."""
        return [c.weight for c in self.certified_weights()]

    def _linear_names(self) -> list[str]:
        """Each h-path weight's name as in `WorldModel.state_dict()`, for error messages."""
        names = {id(mod): name for name, mod in self.block.named_modules()}
        return [f"core.block.{names[id(lin)]}.weight" for lin in self.linears()]

    def loop_params(self) -> LoopParams:
        """Retention, step size, scaled weights, gain and κ: everything a step needs that is not the input.

        An unshared stack certifies each block on its own (its weights and gain s_t, with the common Ā).
        Under no_grad the result is cached until a parameter changes (keyed like `certified_weights`), so
        a planner's many rollouts pay for it once per update of the model, not once per rollout.
        """
        if torch.is_grad_enabled():
            return self._loop_params()
        key = (torch.get_float32_matmul_precision(), *((p._version, p.data_ptr()) for p in self.parameters()))
        if self._params_cache is None or self._params_cache[0] != key:
            self._params_cache = (key, self._loop_params())
        return self._params_cache[1]

    def _loop_params(self) -> LoopParams:
        a_bar = self.retention()
        delta = F.softplus(self.delta_raw) if self.use_retention else torch.ones_like(self.delta_raw)
        certified, scales = self.certified_weights(), self.block_scale(a_bar.max())
        stages, start = [], 0
        for t, block in enumerate(self.blocks()):
            own, start = certified[start : start + len(block.linears())], start + len(block.linears())
            scale = scales if self.cfg.shared else scales[t]
            certificate, last = LoopCertificate.build(a_bar, scale, own, self.cfg.activation)
            weights = [*(c.weight for c in own[:-1]), last]
            stages.append(LoopParams(a_bar, delta, weights, scale, certificate.kappa, certificate))
        if self.cfg.shared:
            return stages[0]
        kappa = torch.stack([p.kappa for p in stages]).max()
        return dataclasses.replace(stages[0], kappa=kappa, stages=tuple(stages))

    @contextlib.contextmanager
    def weight_scope(self) -> Iterator[None]:
        """Share one `loop_params` computation across every step inside the scope (a rollout, a loss)."""
        outer = self._scope
        self._scope = outer if outer is not None else self.loop_params()
        try:
            yield
        finally:
            self._scope = outer

    # ---- the loop ------------------------------------------------------------------------
    def prepare(self, e: Tensor) -> StepContext:
        """Precompute the injection's contributions for one environment step."""
        p = self._scope if self._scope is not None else self.loop_params()
        drive = p.delta * self.inject(e)
        stages = tuple(
            StepContext(q.retention, drive, block.context(e), q.weights, q.scale, q.kappa, q.certificate)
            for block, q in zip(self.blocks(), p.stages or (p,))
        )
        return stages[0] if self.cfg.shared else dataclasses.replace(stages[0], kappa=p.kappa, stages=stages)

    def loop_map(self, h: Optional[Tensor], ctx: StepContext, t: int = 0) -> Tensor:
        """Loop t: F(h) = Ā ⊙ h + B̄ e + s·R(h, e), with block t of an unshared stack; h=None is the zero state,
        F(0) = B̄ e + s·R(0, e)."""
        stage = ctx.at(t)
        block = self.block if self.cfg.shared else self.block[t]
        out = block(h, stage.block_ctx, stage.weights, stage.drive)
        return out if h is None else out.addcmul_(stage.retention, h)

    def state_bound(self, ctx: StepContext) -> Tensor:
        """Per-sample bound on every loop state started from zero: ‖h(t)‖ ≤ max_t ‖F_t(0)‖/(1−κ)."""
        f0 = torch.stack([self.loop_map(None, ctx, t).norm(dim=-1) for t in range(len(ctx.stages) or 1)])
        return f0.amax(0) / (1.0 - ctx.kappa)

    def exit_probability(self, h: Tensor, step_norm: Tensor) -> Tensor:
        """Learned exit gate λ(t) = σ(w·[h; log‖Δh‖] + b) (Ouro-style), trained on improvement targets."""
        feats = torch.cat([h, torch.log(step_norm.unsqueeze(-1) + 1e-6)], dim=-1)
        return torch.sigmoid(self.gate(feats)).squeeze(-1)

    def predicted_log_error(self, h: Tensor) -> Tensor:
        """The error head: log of the error predicted for the readout of loop state h, [B] (the step's observation
        or latent consistency error, `train.error_target`); trained by the "error" term (`train.w_error`), 0 (an
        error of 1) untrained."""
        if self.error_head is None:
            raise ValueError("this model has no error head: build it with model.error_head=true")
        return self.error_offset + self.error_head(h).squeeze(-1)

    def track_error(self, log_error: Tensor, decay: float = 0.9) -> None:
        """Move `error_offset` towards the batch mean of the error head's targets (skipped when not finite)."""
        with torch.no_grad():
            mean = log_error.detach().mean()
            if bool(torch.isfinite(mean)):
                self.error_offset.mul_(decay).add_((1.0 - decay) * mean)

    def predicted_distance(self, h: Tensor) -> Tensor:
        """The predicted error as a distance √(latent_dim · error): ‖z − z_target‖ for the latent target, and the
        same scaling of the observation error (per dimension, normalised units) for the observation target."""
        return torch.exp(0.5 * self.predicted_log_error(h)) * math.sqrt(self.cfg.latent_dim)

    def certified_bound(
        self, step_norm: Tensor, h: Tensor, ctx: StepContext, refine: Optional[Tensor] = None
    ) -> Tensor:
        """Certified distance from h to the fixed point after a loop that moved it by `step_norm`, rounding
        included (`LoopCertificate`): (κ‖Δh‖ + ρ)/(1−κ). For the samples in the mask `refine` where ρ
        dominates (more loops cannot lower it), also the float64 residual bound ‖F(h) − h‖/(1−κ) if lower:
        one float64 loop map, which the certified exit spends to certify tolerances near float32's grid.
        An unshared stack has no fixed point: its bound is +inf."""
        if ctx.stages:
            return torch.full_like(step_norm, math.inf)
        cert = ctx.certificate
        h_norm, (drive, context) = norm_bounds(h), ctx.norms()
        bound, stalled = cert.step_bound(step_norm, h_norm, context, drive)
        if refine is not None and bool((stalled := stalled & refine).any()):
            idx = slice(None) if bool(stalled.all()) else stalled.nonzero().squeeze(1)
            sub = ctx.select(idx)
            wide = dataclasses.replace(
                sub,
                retention=sub.retention.double(),
                drive=sub.drive.double(),
                block_ctx=[c.double() for c in sub.block_ctx],
                weights=[w.double() for w in sub.weights],
            )
            h64 = h[idx].detach().double()
            with torch.no_grad():
                residual = norm_bounds(self.loop_map(h64, wide).sub_(h64))
            refined = cert.residual_bound(residual, h_norm[idx], context[idx], drive[idx])
            bound[idx] = torch.minimum(bound[idx], refined)
        return round_up(bound, h.dtype)

    def run(
        self,
        ctx: StepContext,
        h0: Optional[Tensor] = None,
        options: Optional[LoopOptions] = None,
        *,
        keep_states: bool = False,
        readout: Optional[Callable[[Tensor], Tensor]] = None,
        certify: bool = True,
    ) -> tuple[Tensor, LoopTrace]:
        """Iterate the loop map from h0 (zeros by default) until each sample's exit rule fires.

        `options` (default: the model config's) chooses the exit rule; `keep_states` keeps h(0..T) and
        `readout` is applied after every loop, for intermediate predictions (and for the agreement exit,
        which needs it). `certify=False` skips the certified bound at exit where the exit rule does not need
        it: the trace's `bound` and `converged` are then None, and a rollout costs only its loops.
        """
        opts = self.default_options if options is None else options
        rule = EXIT_RULES[opts.exit]
        if rule.needs_readout and readout is None:
            raise ValueError(f"exit={opts.exit!r} compares the latents read out after each loop: pass readout=")
        batch, device = ctx.drive.shape[0], ctx.drive.device
        h = torch.zeros_like(ctx.drive) if h0 is None else self._check_h0(h0, ctx)
        target = rule.targets(opts, self.cfg.loops, batch, device)
        uniform = target is not None and not isinstance(opts.loops, Tensor)
        t_max = int(target.max()) if target is not None else opts.max_loops
        self._check_stack(opts, t_max)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        used = target if uniform else torch.zeros(batch, dtype=torch.long, device=device)
        last = torch.zeros(batch, device=device, dtype=h.dtype)
        bound = torch.full_like(last, math.inf)
        norms, states, readouts, gates = [], [h] if keep_states else None, [] if readout else None, []
        for t in range(t_max):
            if opts.bptt is not None:
                h = torch.where((t < target - opts.bptt).unsqueeze(-1), h.detach(), h)
            h_next = self.loop_map(None if t == 0 and h0 is None else h, ctx, t)
            step_norm = (h_next - h).norm(dim=-1)
            if uniform:  # every sample runs the same loops: no masking needed
                h, last = h_next, step_norm
                norms.append(step_norm)
                if readout is not None:
                    readouts.append(readout(h))
            else:
                h = torch.where(active.unsqueeze(-1), h_next, h)
                norms.append(torch.where(active, step_norm, torch.zeros_like(step_norm)))
                last = torch.where(active, step_norm, last)
                if rule.uses_bound:  # the other rules need the bound at exit only: computed once, below
                    bound = torch.where(active, self.certified_bound(step_norm, h, ctx, active), bound)
                used = used + active.long()
                if readout is not None:
                    readouts.append(readout(h))
                fire = rule.fire(self, LoopStep(h, step_norm, bound, readouts, gates), opts)
                done = used >= target if fire is None else (fire & (used >= opts.min_loops)) | (used >= opts.max_loops)
                active = active & ~done
            if keep_states:
                states.append(h)
            if not uniform and not bool(active.any()):
                break
        if not rule.uses_bound:  # exited samples keep their last step norm and state, so this is their bound at exit
            bound = self.certified_bound(last, h, ctx) if certify else None
        trace = LoopTrace(
            step_norms=torch.stack(norms),
            loops_used=used,
            bound=bound,
            converged=None if bound is None else bound <= opts.tol,
            kappa=float(ctx.kappa.detach()),
            states=states,
            readouts=readouts,
            gate=torch.stack(gates) if gates else None,
            final_state=h,
        )
        return h, trace

    def _check_stack(self, opts: LoopOptions, t_max: int) -> None:
        """An unshared stack runs at most one loop per block, and has no fixed point for a bound-based exit."""
        if self.cfg.shared:
            return
        if EXIT_RULES[opts.exit].uses_bound:
            raise ValueError(
                f"exit={opts.exit!r} stops at a certified distance to the fixed point; an unshared stack "
                "(model.shared=false) applies a different map every loop and has none: use exit='fixed'"
            )
        if t_max > self.cfg.loops:
            raise ValueError(
                f"this run could take {t_max} loops, but the unshared stack (model.shared=false) has "
                f"model.loops={self.cfg.loops} blocks, one per loop: ask for at most {self.cfg.loops}"
            )

    def _check_h0(self, h0: Tensor, ctx: StepContext) -> Tensor:
        """A start state must match the batch and hidden width (`WorldModel.step` also refuses non-finite ones;
        the analyses may start an unconstrained model's loop from a diverged state on purpose)."""
        if not isinstance(h0, Tensor) or tuple(h0.shape) != tuple(ctx.drive.shape):
            shape = tuple(h0.shape) if isinstance(h0, Tensor) else type(h0).__name__
            raise ValueError(f"h0 has shape {shape}; expected {tuple(ctx.drive.shape)} (batch, model.hidden_dim)")
        return h0.to(ctx.drive.dtype)

    def fixed_point(
        self, ctx: StepContext, h0: Optional[Tensor] = None, tol: float = 1e-6, max_loops: int = 2000
    ) -> Tensor:
        """h*(e) to within `tol` (certified), by iterating the contraction."""
        h, _ = self.run(ctx, h0, LoopOptions(exit="certified", min_loops=1, max_loops=max_loops, tol=tol))
        return h
