"""Saturating fit of error against loop count, `err(T) = a + b·exp(−T/τ)`, and where more loops stop helping.

LoopCoder-v2 (arXiv 2606.18023) reports a sweet spot after which extra loops hurt; the fit and the regression flag
make that visible for a world model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from numpy.typing import ArrayLike

from loopwm.analysis.stats import as_numpy


@dataclass
class SaturatingFit:
    """Fitted `a + b·exp(−T/τ)`, the best observed loop count and whether error grows again past it."""

    a: float
    b: float
    tau: float
    rmse: float
    best_T: float
    best_err: float
    regression: float
    regresses: bool

    def predict(self, T: ArrayLike) -> np.ndarray:
        """The fitted curve at loop counts `T`."""
        return self.a + self.b * np.exp(-as_numpy(T) / self.tau)

    def to_dict(self) -> dict:
        """Plain floats and bools, for JSON."""
        return asdict(self)


def fit_saturating(
    T: ArrayLike, err: ArrayLike, taus: Optional[ArrayLike] = None, rel_tol: float = 0.05
) -> SaturatingFit:
    """Least-squares fit of `a + b·exp(−T/τ)`: a log grid over τ, exact linear least squares for (a, b) at each τ.

    `regression` is the largest error after the best T minus the best error; `regresses` is True when it exceeds
    `rel_tol` of the best error.
    """
    t, e = as_numpy(T).ravel(), as_numpy(err).ravel()
    if t.size != e.size or t.size < 3:
        raise ValueError(f"fit_saturating needs >= 3 matching (T, err) points, got {t.size} and {e.size}")
    order = np.argsort(t, kind="mergesort")
    t, e = t[order], e[order]
    if taus is None:
        span = max(t.max() - t.min(), 1e-6)
        taus = np.geomspace(span / 200.0, span * 20.0, 400)
    best = (np.inf, 0.0, 0.0, 1.0)
    for tau in as_numpy(taus).ravel():
        X = np.stack([np.ones_like(t), np.exp(-t / tau)], axis=1)
        (a, b), *_ = np.linalg.lstsq(X, e, rcond=None)
        sse = float(((X @ np.array([a, b]) - e) ** 2).sum())
        if sse < best[0]:
            best = (sse, float(a), float(b), float(tau))
    sse, a, b, tau = best
    i = int(np.argmin(e))
    regression = float(e[i + 1 :].max() - e[i]) if i + 1 < e.size else 0.0
    return SaturatingFit(
        a=a,
        b=b,
        tau=tau,
        rmse=float(np.sqrt(sse / e.size)),
        best_T=float(t[i]),
        best_err=float(e[i]),
        regression=regression,
        regresses=bool(regression > rel_tol * abs(e[i])),
    )
