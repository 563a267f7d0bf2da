"""The replay buffer's persistence format and the checks on data read back: `.npz` datasets and checkpointed state.

A buffer is stored as a header (`FORMAT`, `VERSION` and its layout: obs_shape, action_dim, capacity, obs_dtype,
frame_stack) plus the flat arrays `ARRAYS`: obs frames [sum(T+1), ...], transitions [sum(T), ...] and
episode_lengths [E]. Episodes still streaming in travel in the checkpointed state only. Everything read back is
checked here before a buffer is built from it; a problem raises a DataError naming the source and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopwm.atomic import atomic_write

FORMAT = "loopwm.replay"
VERSION = 1
ARRAYS = ("obs", "actions", "rewards", "terminated", "truncated", "episode_lengths")


class DataError(ValueError):
    """A dataset or replay state is malformed, non-finite or of another layout; the message names the
    file (or source) and the field."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_layout(meta: Any, source: str) -> dict[str, Any]:
    """The layout a header holds, as ReplayBuffer keyword arguments, once format, version and fields check out."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{source}: no {FORMAT!r} header")
    if meta.get("version") != VERSION:
        raise DataError(f"{source}: replay format version {meta.get('version')!r}, expected {VERSION}")
    shape = meta.get("obs_shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 1 for d in shape):
        raise DataError(f"{source}: header field 'obs_shape' is {shape!r}, expected a list of positive integers")
    for key in ("action_dim", "capacity", "frame_stack"):
        if not (_is_int(meta.get(key)) and meta[key] >= 1):
            raise DataError(f"{source}: header field {key!r} is {meta.get(key)!r}, expected an integer >= 1")
    try:
        dtype = np.dtype(meta.get("obs_dtype"))
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in "iuf":
        raise DataError(f"{source}: header field 'obs_dtype' is {meta.get('obs_dtype')!r}, expected a numeric dtype")
    return {
        "obs_shape": shape,
        "action_dim": meta["action_dim"],
        "capacity": meta["capacity"],
        "obs_dtype": dtype,
        "frame_stack": meta["frame_stack"],
    }


def check_arrays(
    arrays: dict[str, np.ndarray], frame_shape: tuple[int, ...], action_dim: int, obs_dtype: np.dtype, source: str
) -> None:
    """Refuse flat arrays (the layout of `ARRAYS`) whose shapes or dtypes do not fit the buffer, or an empty episode."""
    lengths = arrays["episode_lengths"]
    steps = int(lengths.sum()) if lengths.ndim == 1 and lengths.dtype == np.int64 else -1
    episodes = len(lengths) if lengths.ndim == 1 else -1
    expected = {
        "episode_lengths": ((episodes,), np.dtype(np.int64)),
        "obs": ((steps + episodes, *frame_shape), obs_dtype),
        "actions": ((steps, action_dim), np.dtype(np.float32)),
        "rewards": ((steps,), np.dtype(np.float32)),
        "terminated": ((steps,), np.dtype(bool)),
        "truncated": ((steps,), np.dtype(bool)),
    }
    for key, (shape, dtype) in expected.items():
        if arrays[key].shape != shape or arrays[key].dtype != dtype:
            raise DataError(
                f"{source}: {key!r} has shape {arrays[key].shape} and dtype {arrays[key].dtype}, "
                f"expected {shape} and {dtype}"
            )
    if (lengths < 1).any():
        raise DataError(f"{source}: every episode must have at least one transition")


def check_finite(arrays: dict[str, np.ndarray], source: str, chunk: int = 1 << 22) -> None:
    """Refuse NaN or inf in the float fields, naming the field, the count and where the first one is."""
    lengths = arrays["episode_lengths"]
    for key, per_episode in (("obs", lengths + 1), ("actions", lengths), ("rewards", lengths)):
        rows = arrays[key].reshape(len(arrays[key]), -1)
        if not np.issubdtype(rows.dtype, np.floating):
            continue
        count, first, step = 0, 0, max(1, chunk // max(rows.shape[1], 1))
        for start in range(0, len(rows), step):  # in chunks, so frames need no full-size mask
            bad = ~np.isfinite(rows[start : start + step])
            if bad.any():
                first = first if count else start + int(np.argmax(bad.any(1)))
                count += int(bad.sum())
        if count:
            ends = np.cumsum(per_episode)
            episode = int(np.searchsorted(ends, first, side="right"))
            step_in_episode = first - int(ends[episode] - per_episode[episode])
            raise DataError(
                f"{source}: field {key!r} holds {count} non-finite value(s) (NaN or inf); the first is "
                f"at row {first} (episode {episode}, step {step_in_episode})"
            )


def check_layout(
    stored: tuple[tuple[int, ...], int],
    actions: np.ndarray,
    obs_shape: tuple[int, ...],
    action_dim: int,
    *,
    source: str,
    expected_by: str,
) -> None:
    """Refuse data of `stored` (obs_shape, action_dim) and `actions` [N, A] that do not fit `expected_by`: the
    observation shape and the action width must match, and actions must be in model units [-1, 1]."""
    obs_shape = tuple(int(d) for d in obs_shape)
    if stored[0] != obs_shape:
        raise DataError(f"{source}: field 'obs' has shape {stored[0]} per step, {expected_by} expects {obs_shape}")
    if stored[1] != action_dim:
        raise DataError(f"{source}: field 'actions' has width {stored[1]}, {expected_by} expects {action_dim}")
    largest = float(np.abs(actions).max(initial=0.0))
    if largest > 1.0:
        raise DataError(
            f"{source}: field 'actions' must be in the model's units [-1, 1] (Box actions rescaled, "
            f"categorical ones one-hot), but holds values up to {largest:g}"
        )


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes: what a run records of its dataset, to notice the file changing later."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_npz(path: str | os.PathLike, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write a header and the flat arrays to an .npz file atomically (temp file, fsync, rename)."""
    atomic_write(Path(path), lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))


def read_npz(path: Path, source: str) -> tuple[Any, dict[str, np.ndarray]]:
    """(header, flat arrays) of a file written by `write_npz`, unchecked; FileNotFoundError if it is missing, a
    DataError if it is not a readable replay file."""
    if not path.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["meta"])), {k: data[k] for k in ARRAYS}
    except Exception as exc:  # numpy, zipfile and zlib raise many types for truncated or garbage files
        raise DataError(f"{source} is corrupt or not a loopwm replay buffer: {type(exc).__name__}: {exc}") from None


def pack_open(episodes: dict[int, dict[str, list]]) -> list[dict[str, Any]]:
    """Episodes still streaming in, by env index, as tensors and plain types for a checkpoint."""
    return [
        {
            "env": env,
            "frames": torch.from_numpy(np.stack(ep["frames"])),
            "actions": torch.from_numpy(np.stack(ep["actions"])),
            "rewards": list(ep["rewards"]),
            "flags": [list(f) for f in ep["flags"]],
        }
        for env, ep in sorted(episodes.items())
    ]


def unpack_open(packed: list[dict[str, Any]]) -> dict[int, dict[str, list]]:
    """The inverse of `pack_open`."""
    return {
        int(ep["env"]): {
            "frames": list(ep["frames"].numpy()),
            "actions": list(ep["actions"].numpy()),
            "rewards": list(ep["rewards"]),
            "flags": [tuple(f) for f in ep["flags"]],
        }
        for ep in packed
    }
