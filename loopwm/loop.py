"""The looped core: h(t+1) = Ā ⊙ h(t) + B̄ e + R̄(h(t), e), with a certificate κ < 1 built into its parameters.

Ā = exp(-Δ ⊙ exp(a) - r_min) is the zero-order hold of a negative diagonal, capped at
`retention_max`; R̄ is a block whose h-path maps have spectral norm ≤ 1 and whose output gain is
s = (κ_max − max Ā)·sigmoid(ρ). So κ = max Ā + s < κ_max < 1 for every parameter value, and Banach's
theorem gives a unique fixed point h*(e), the a-posteriori bound ‖h(t) − h*‖ ≤ κ/(1−κ)‖h(t) − h(t−1)‖
and ‖h*‖ ≤ ‖F(0)‖/(1−κ). "Paper mode" (LoopWM, arXiv 2606.18208) drops the constraint on R̄.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from loopwm.blocks import make_block
from loopwm.config import ModelConfig

EXIT_POLICIES = ("fixed", "certified", "gate")


@dataclass
class StepContext:
    """Everything the loop map needs that is fixed across the loops of one environment step."""

    retention: Tensor        # Ā, [H]
    drive: Tensor            # B̄ e, [B, H]
    block_ctx: list[Tensor]  # the injection's share of each block layer
    weights: list[Tensor]    # effective h-path weights (output map × s), computed once per forward
    scale: Tensor            # s, the block's output gain
    kappa: Tensor            # certified Lipschitz constant of h ↦ F(h, e)

    def select(self, index: Tensor) -> "StepContext":
        """The context of a subset of the batch (shared parts are kept as they are)."""
        return StepContext(self.retention, self.drive[index], [c[index] for c in self.block_ctx],
                           self.weights, self.scale, self.kappa)


@dataclass
class LoopParams:
    """The parameter-only part of a step's context: one computation serves a whole rollout (`weight_scope`)."""

    retention: Tensor      # Ā, [H]
    delta: Tensor          # the injection's step size softplus(δ), [H]
    weights: list[Tensor]  # effective h-path weights, the output map pre-multiplied by s
    scale: Tensor          # s
    kappa: Tensor          # κ


@dataclass
class LoopTrace:
    """What the loop did for each sample: residuals, loops used, the certified distance at exit."""

    residuals: Tensor                  # [T, B] ‖h(t) − h(t−1)‖, zero after a sample has exited
    loops_used: Tensor                 # [B] loops actually run per sample
    bound: Tensor                      # [B] κ/(1−κ)·last residual: certified distance to h* at exit
    converged: Tensor                  # [B] whether the bound met the exit tolerance
    kappa: float
    states: Optional[list[Tensor]] = None    # h(0..T) when asked for
    readouts: Optional[list[Tensor]] = None  # readout(h(t)) for t = 1..T when asked for
    gate: Optional[Tensor] = None            # [T, B] exit-gate probabilities
    final_state: Optional[Tensor] = None     # h at exit, [B, H]

    @property
    def mean_loops(self) -> float:
        return float(self.loops_used.float().mean())


class LoopCore(nn.Module):
    """Retention, injection drive, shared block and exit policies: the part that loops."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_dim
        self.use_retention = cfg.retention and cfg.retention_max > 0
        self.r_min = -math.log(cfg.retention_max) if self.use_retention else 0.0
        self.log_rate = nn.Parameter(torch.linspace(-1.0, 1.0, h))          # a
        self.delta_raw = nn.Parameter(torch.full((h,), math.log(math.e - 1)))  # δ, softplus(δ) = 1
        self.inject = nn.Linear(cfg.inject_dim, h, bias=False)             # B
        self.block = make_block(cfg.block, h, cfg.inject_dim, cfg.block_depth, cfg.tokens,
                                cfg.activation, cfg.constrain_block)
        self.rho = nn.Parameter(torch.zeros(()))  # block gain logit (constrained) or log-gain (paper mode)
        self.gate = nn.Linear(h + 1, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, -2.0)
        self._scope: Optional[LoopParams] = None
        self._cache: tuple[tuple, list[Tensor]] | None = None

    # ---- parameters -> certificate -------------------------------------------------------
    def retention(self) -> Tensor:
        """Ā = exp(−(r_min + Δ·exp(a))) per hidden unit, or zeros when retention is ablated."""
        if not self.use_retention:
            return torch.zeros_like(self.log_rate)
        return torch.exp(-(self.r_min + F.softplus(self.delta_raw) * torch.exp(self.log_rate)))

    def block_scale(self, max_retention: Tensor) -> Tensor:
        """s: the block's output gain, inside the contraction budget unless in paper mode."""
        if self.cfg.constrain_block:
            return (self.cfg.kappa_max - max_retention) * torch.sigmoid(self.rho)
        return (self.cfg.kappa_max - self.cfg.retention_max) * 0.5 * torch.exp(self.rho)

    def kappa(self) -> Tensor:
        """κ = max Ā + s·Π Lip(W_i): an upper bound on Lip_h of the loop map."""
        a_max = self.retention().max()
        lip = torch.ones((), device=a_max.device)
        for lin in self.block.linears():
            lip = lip * lin.lipschitz_bound()
        return a_max + self.block_scale(a_max) * lip

    def effective_weights(self) -> list[Tensor]:
        """The normalised h-path weights: computed once per forward call, never once per loop."""
        linears = self.block.linears()
        if torch.is_grad_enabled():
            return [lin.effective_weight() for lin in linears]
        key = tuple((lin.weight._version, lin.weight.data_ptr()) for lin in linears)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, [lin.effective_weight().detach() for lin in linears])
        return self._cache[1]

    def loop_params(self) -> LoopParams:
        """Retention, step size, scaled weights, gain and κ: everything a step needs that is not the input."""
        a_bar = self.retention()
        a_max = a_bar.max()
        delta = F.softplus(self.delta_raw) if self.use_retention else torch.ones_like(self.delta_raw)
        weights = self.effective_weights()
        scale = self.block_scale(a_max)
        kappa = self.kappa() if not self.cfg.constrain_block else a_max + scale
        return LoopParams(a_bar, delta, [*weights[:-1], weights[-1] * scale], scale, kappa)

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
        return StepContext(p.retention, p.delta * self.inject(e), self.block.context(e), p.weights, p.scale, p.kappa)

    def loop_map(self, h: Optional[Tensor], ctx: StepContext) -> Tensor:
        """One loop: F(h) = Ā ⊙ h + B̄ e + s·R(h, e); h=None is the zero state, F(0) = B̄ e + s·R(0, e)."""
        out = self.block(h, ctx.block_ctx, ctx.weights, ctx.drive)
        return out if h is None else out.addcmul_(ctx.retention, h)

    def state_bound(self, ctx: StepContext) -> Tensor:
        """Per-sample bound on every loop state started from zero: ‖h(t)‖ ≤ ‖F(0)‖/(1−κ)."""
        f0 = self.loop_map(None, ctx)
        return f0.norm(dim=-1) / (1.0 - ctx.kappa)

    def exit_probability(self, h: Tensor, residual: Tensor) -> Tensor:
        """Learned exit gate λ(t) = σ(w·[h; log‖Δ‖] + b) (Ouro-style), trained on improvement targets."""
        feats = torch.cat([h, torch.log(residual.unsqueeze(-1) + 1e-6)], dim=-1)
        return torch.sigmoid(self.gate(feats)).squeeze(-1)

    def run(
        self,
        ctx: StepContext,
        h0: Optional[Tensor] = None,
        *,
        exit: Optional[str] = None,
        loops: Union[int, Tensor, None] = None,
        min_loops: Optional[int] = None,
        max_loops: Optional[int] = None,
        tol: Optional[float] = None,
        gate_threshold: Optional[float] = None,
        bptt: Optional[int] = None,
        keep_states: bool = False,
        readout: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> tuple[Tensor, LoopTrace]:
        """Iterate the loop map from h0 (zeros by default) until each sample's exit rule fires.

        `exit="fixed"` runs `loops` iterations (an int or a per-sample tensor); "certified" stops a
        sample once κ/(1−κ)·‖h(t) − h(t−1)‖ ≤ tol; "gate" once the learned exit probability exceeds
        the threshold. All respect min/max loops. `bptt=k` backpropagates through the last k loops only.
        """
        cfg = self.cfg
        exit = exit or cfg.exit
        if exit not in EXIT_POLICIES:
            raise ValueError(f"exit={exit!r}: expected one of {EXIT_POLICIES}")
        min_loops = cfg.min_loops if min_loops is None else min_loops
        max_loops = cfg.max_loops if max_loops is None else max_loops
        tol = cfg.exit_tol if tol is None else tol
        gate_threshold = cfg.gate_threshold if gate_threshold is None else gate_threshold
        batch, device = ctx.drive.shape[0], ctx.drive.device
        h = torch.zeros_like(ctx.drive) if h0 is None else h0
        uniform = exit == "fixed" and not isinstance(loops, Tensor)
        if exit == "fixed":
            target = torch.as_tensor(cfg.loops if loops is None else loops, device=device).long()
            target = target.expand(batch).clamp_min(1)
            t_max = int(target.max())
        else:
            target, t_max = None, max_loops
        kappa = float(ctx.kappa.detach())
        coef = kappa / (1.0 - kappa) if kappa < 1.0 else math.inf
        active = torch.ones(batch, dtype=torch.bool, device=device)
        used = target if uniform else torch.zeros(batch, dtype=torch.long, device=device)
        last = torch.zeros(batch, device=device, dtype=h.dtype)
        residuals, states, readouts, gates = [], [h] if keep_states else None, [] if readout else None, []
        for t in range(t_max):
            if bptt is not None and target is not None:
                cut = (t < target - bptt).unsqueeze(-1)
                h = torch.where(cut, h.detach(), h)
            h_next = self.loop_map(None if t == 0 and h0 is None else h, ctx)
            delta = (h_next - h).norm(dim=-1)
            if uniform:  # every sample runs the same loops: no masking needed
                h, last = h_next, delta
                residuals.append(delta)
            else:
                h = torch.where(active.unsqueeze(-1), h_next, h)
                residuals.append(torch.where(active, delta, torch.zeros_like(delta)))
                last = torch.where(active, delta, last)
                used = used + active.long()
                if exit == "fixed":
                    done = used >= target
                else:
                    if exit == "certified":
                        fire = coef * delta.detach() <= tol
                    else:
                        prob = self.exit_probability(h, delta.detach())
                        gates.append(prob)
                        fire = prob.detach() > gate_threshold
                    done = (fire & (used >= min_loops)) | (used >= max_loops)
                active = active & ~done
            if keep_states:
                states.append(h)
            if readout is not None:
                readouts.append(readout(h))
            if not uniform and not bool(active.any()):
                break
        bound = coef * last.detach()
        trace = LoopTrace(
            residuals=torch.stack(residuals), loops_used=used, bound=bound,
            converged=bound <= tol, kappa=kappa, states=states, readouts=readouts,
            gate=torch.stack(gates) if gates else None, final_state=h,
        )
        return h, trace

    def fixed_point(self, ctx: StepContext, h0: Optional[Tensor] = None, tol: float = 1e-6,
                    max_loops: int = 2000) -> Tensor:
        """h*(e) to within `tol` (certified), by iterating the contraction."""
        h, _ = self.run(ctx, h0, exit="certified", min_loops=1, max_loops=max_loops, tol=tol)
        return h
