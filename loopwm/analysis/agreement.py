"""Intermediate-versus-final readout agreement: per-loop errors, prediction depth and an agreement score.

Readouts are the predictions decoded after each loop, `[T, B, D]` (or a list of `[B, D]`), the last being the
final prediction. Distances are root-mean-square over features, so a tolerance reads in the readout's units.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Readouts = Union[torch.Tensor, Sequence[torch.Tensor]]


def stack_readouts(readouts: Readouts) -> torch.Tensor:
    """Stack per-loop readouts into a floating tensor `[T, B, D]`, flattening trailing dims (scalars get D = 1)."""
    r = readouts if isinstance(readouts, torch.Tensor) else torch.stack(list(readouts))
    if r.dim() < 2:
        raise ValueError(f"readouts: expected [T, B, ...], got shape {tuple(r.shape)}")
    r = r.detach().flatten(2) if r.dim() > 2 else r.detach().unsqueeze(-1)
    return r if r.is_floating_point() else r.float()


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square distance over the last (feature) dim."""
    return (a - b).pow(2).mean(-1).sqrt()


def readout_errors(readouts: Readouts, reference: torch.Tensor) -> torch.Tensor:
    """RMS error of every loop's readout against `reference` `[B, D]` (final readout or ground truth), `[T, B]`."""
    r = stack_readouts(readouts)
    return rms_distance(r, reference.detach().to(r.dtype).reshape(r.shape[1], -1))


def prediction_depth(readouts: Readouts, delta: float) -> torch.Tensor:
    """First loop (1-based) from which every later readout stays within `delta` of the final one, `[B]` long.

    The "prediction depth" of Baldock et al. 2021, taken over loops instead of layers: easy inputs settle early.
    """
    r = stack_readouts(readouts)
    far = readout_errors(r, r[-1]) > delta
    later_far = far.flip(0).cumsum(0).flip(0) > 0
    return (~later_far).long().argmax(0) + 1


def agreement_score(readouts: Readouts, last: Optional[int] = None) -> torch.Tensor:
    """Confidence from agreement, `[B]`: minus the mean RMS distance of the last `last` intermediate readouts to
    the final one.

    PABEE-style: predictions that stopped changing are trusted; higher is more confident, 0 is full agreement.
    """
    r = stack_readouts(readouts)
    if r.shape[0] < 2:
        raise ValueError("agreement_score needs at least two loops of readouts")
    window = r.shape[0] - 1 if last is None else max(1, min(last, r.shape[0] - 1))
    return -readout_errors(r[-1 - window : -1], r[-1]).mean(0)
