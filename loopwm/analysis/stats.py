"""Rank statistics without sklearn or scipy: average ranks, AUROC, Spearman correlation, robust summaries; and the
plain-JSON form of results that hold them (NaN as null)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike


def as_numpy(x: ArrayLike) -> np.ndarray:
    """A float64 numpy copy of an array, list or (possibly grad-tracking) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def rankdata(x: ArrayLike) -> np.ndarray:
    """1-based ranks of a 1-D array, ties sharing the average of the ranks they span."""
    x = as_numpy(x).ravel()
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(sorted_x[1:] != sorted_x[:-1]) + 1]
    ends = np.r_[starts[1:], x.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (Mann–Whitney U); ties count one half.

    NaN when one class is empty or a score is not finite (a NaN has no rank to give it).
    """
    s = as_numpy(scores).ravel()
    y = as_numpy(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"auroc: scores {s.shape} and labels {y.shape} differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0 or not np.all(np.isfinite(s)):
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either input is constant or
    holds a non-finite value."""
    x, y = as_numpy(x).ravel(), as_numpy(y).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman: inputs of sizes {x.size} and {y.size} differ")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def top_fraction(x: ArrayLike, fraction: float) -> np.ndarray:
    """Boolean mask of the entries in the top `fraction` of `x` (at least one), e.g. the 10% largest true errors.
    Entries tied with the k-th largest are all in, so a tie is never split by position (all equal: all in)."""
    x = np.where(np.isnan(x := as_numpy(x).ravel()), np.inf, x)  # a NaN error (a diverged sample) is the worst
    k = max(1, int(round(fraction * x.size)))
    return x >= np.sort(x)[::-1][k - 1]


def quartiles(x: ArrayLike, axis: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower quartile, median and upper quartile along `axis`, ignoring NaN (all-NaN slices give NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q = np.nanquantile(as_numpy(x), [0.25, 0.5, 0.75], axis=axis)
    return q[0], q[1], q[2]


def to_json(value: Any) -> Any:
    """Plain JSON types, with NaN and infinities as null (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
