"""Geometry of a batch of latent states: effective rank, and the spread of end states reached from different starts."""

from __future__ import annotations

from typing import NamedTuple

import torch


def effective_rank(x: torch.Tensor, center: bool = False) -> float:
    """Effective rank of a matrix `[N, d]`: exp of the entropy of its normalised singular values (Roy & Vetterli 2007).

    A rank-k matrix with equal singular values scores k; collapsing representations (diversity loss with more loops)
    score lower. `center` subtracts the row mean first so a shared offset does not count as a direction.
    """
    x = x.detach().flatten(1).double()
    if center:
        x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class PathSpread(NamedTuple):
    """Per-sample spread of end states from K starts, relative to the mean end-state norm, `[B]` each."""

    pairwise: torch.Tensor
    centroid: torch.Tensor


def path_independence(end_states: torch.Tensor) -> PathSpread:
    """Spread of end states `[K, B, d]` reached from K initial states for the same inputs (Anil et al. 2022).

    `pairwise` is the mean distance over the K(K−1)/2 pairs and `centroid` the mean distance to the centroid, both
    divided by the mean end-state norm; a path-independent (unique fixed point) loop gives ~0.
    """
    h = end_states.detach().flatten(2).float()
    k = h.shape[0]
    if k < 2:
        raise ValueError(f"path_independence needs end states from >= 2 starts, got {k}")
    scale = h.norm(dim=-1).mean(0).clamp_min(1e-12)
    hb = h.transpose(0, 1)
    iu = torch.triu_indices(k, k, offset=1)
    pairwise = torch.cdist(hb, hb)[:, iu[0], iu[1]].mean(-1)
    centroid = (h - h.mean(0, keepdim=True)).norm(dim=-1).mean(0)
    return PathSpread(pairwise=pairwise / scale, centroid=centroid / scale)
