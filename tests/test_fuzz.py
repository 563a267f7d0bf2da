"""Property-based tests: whatever a user types as overrides, or whatever bytes sit in a dataset file, the
answer is a valid config or a ConfigError, a loaded buffer or a DataError; never another exception."""

import dataclasses
import io
import json
import tempfile
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopwm.config import Config, ConfigError, from_dict, load_config, to_dict
from loopwm.replay import ReplayBuffer
from loopwm.replay_io import DataError

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def dotted_keys(cls=Config, prefix="") -> list[str]:
    """Every key a config accepts, sections included (`model`, `env.atari`, `env.atari.frame_skip`, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += dotted_keys(hints[f.name], key + ".")
    return keys


KEYS = dotted_keys()
YAML_VALUES = st.sampled_from(
    [
        ".nan",
        ".NaN",
        ".inf",
        "-.inf",
        "nan",
        "inf",
        "-inf",
        "1e400",
        "-1e400",
        "1.0e+400",
        "1e-400",
        "0",
        "-0",
        "-1",
        "1",
        "2",
        "3.5",
        "0.999999",
        "1e3",
        "1.0e3",
        "0x10",
        "0o17",
        "1_000",
        "99999999999999999999999999",
        "-99999999999999999999999999",
        "true",
        "false",
        "yes",
        "no",
        "on",
        "off",
        "null",
        "~",
        "",
        "''",
        '""',
        "[]",
        "{}",
        "[1, 2]",
        "{a: 1}",
        "{tokens: 4}",
        "{tokens: 0}",
        "{tokens: 1e400}",
        "{tokens: .nan}",
        "{tokens: [1]}",
        "{1: 2}",
        "{null: 1}",
        "&a [*a]",
        "&a {x: *a}",
        "2020-01-01",
        "2020-01-01 10:00:00",
        "!!binary aGVsbG8=",
        "!!python/object/apply:os.system ['true']",
        "!!set {a, b}",
        "? a",
        "- a",
        "a: b: c",
        "[unclosed",
        "{unclosed",
        "'unclosed",
        "mlp",
        "token",
        "fixed",
        "certified",
        "gate",
        "mppi",
        "cem",
        "adam",
        "cuda",
        "cuda:0",
        "cpu",
        "auto",
        "sync",
        "async",
        "Pendulum-v1",
        "ALE/Pong-v5",
        "relu",
        "cosine",
        "random",
        "noisy_planner",
        "symlog",
        "twohot",
        "\t",
        "\x00",
        "é",
        "💥",
        "%",
        "*",
        "&",
        "|",
        ">",
        "@",
        "`",
        "1" * 5000,
        "-" + "9" * 4400 + ".5",
        "[" * 3000 + "]" * 3000,
        "{a: " * 1500 + "1" + "}" * 1500,
    ]
)
NUMBERS = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
VALUES = st.one_of(YAML_VALUES, NUMBERS, st.text(max_size=12))
KEY = st.one_of(
    st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".x"), st.text(alphabet="abcz._-=1 ", max_size=12)
)
OVERRIDE = st.one_of(st.builds(lambda k, v: f"{k}={v}", KEY, VALUES), st.text(max_size=16))


@FUZZ
@given(st.lists(OVERRIDE, max_size=6))
def test_any_overrides_give_a_valid_config_or_a_config_error(overrides):
    try:
        cfg = load_config(None, overrides)
    except ConfigError:
        return
    assert isinstance(cfg, Config)
    assert from_dict(to_dict(cfg)) == cfg  # what was accepted stays accepted, unchanged


@FUZZ
@given(st.sampled_from(KEYS), VALUES)
def test_one_override_of_each_real_key(key, value):
    """Every real key meets every kind of value (the draw above rarely pairs a given key and value)."""
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except ConfigError:
        return
    assert from_dict(to_dict(cfg)) == cfg


# ---- the dataset loader -------------------------------------------------------------------------------
def valid_file() -> bytes:
    """A small real dataset file: three episodes, as `ReplayBuffer.save` writes it."""
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer((3,), 2, 1000)
    for steps in (4, 7, 2):
        flags = np.zeros(steps, bool)
        flags[-1] = True
        buffer.add_episode(
            rng.normal(size=(steps + 1, 3)).astype(np.float32),
            rng.uniform(-1, 1, (steps, 2)).astype(np.float32),
            rng.normal(size=steps).astype(np.float32),
            flags,
            np.zeros(steps, bool),
        )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.npz"
        buffer.save(path)
        return path.read_bytes()


VALID = valid_file()


def members() -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(VALID)) as data:
        return {k: data[k] for k in data.files}


def load_or_data_error(path) -> None:
    try:
        buffer = ReplayBuffer.load(path)
    except DataError:
        return
    # what loads is usable: it saves and loads back the same
    buffer.save(path)
    again = ReplayBuffer.load(path)
    assert len(again) == len(buffer) and again.num_episodes == buffer.num_episodes


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, len(VALID)),
)
def test_corrupted_bytes_load_or_raise_data_error(tmp_path_factory, flips, cut):
    data = bytearray(VALID)
    for where, byte in flips:
        data[where] = byte
    path = tmp_path_factory.mktemp("bytes") / "d.npz"
    path.write_bytes(bytes(data[:cut]) if cut % 3 == 0 else bytes(data))
    load_or_data_error(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
DTYPES = st.sampled_from(["float32", "float64", "float16", "int64", "int32", "uint8", "bool", "complex64", "U3"])


def filled(shape: tuple[int, ...], dtype: str, fill: float) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.full(shape, fill).astype(dtype)


ARRAYS = st.builds(
    filled,
    st.lists(st.integers(0, 5), max_size=3).map(tuple),
    DTYPES,
    st.sampled_from([0, 1, -1, 3, 7, 1e30, np.nan, np.inf]),
)
FIELDS = ["meta", "obs", "actions", "rewards", "terminated", "truncated", "episode_lengths"]
META_KEYS = ["format", "version", "obs_shape", "action_dim", "capacity", "obs_dtype", "frame_stack"]


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("drop"), st.sampled_from(FIELDS), st.none()),
            st.tuples(st.just("array"), st.sampled_from(FIELDS + ["extra"]), ARRAYS),
            st.tuples(st.just("meta"), st.sampled_from(META_KEYS + ["extra"]), JSON),
            st.tuples(st.just("raw_meta"), st.just("meta"), st.text(max_size=20)),
            st.tuples(
                st.just("entry"),
                st.sampled_from(["obs", "actions", "rewards", "episode_lengths"]),
                st.tuples(st.integers(0, 20), st.sampled_from([0, -3, 1, 2, 100, 10**9, np.nan, -np.inf])),
            ),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_structurally_mutated_files_load_or_raise_data_error(tmp_path_factory, mutations):
    arrays = members()
    meta = json.loads(str(arrays["meta"]))
    for kind, key, value in mutations:
        if kind == "drop":
            arrays.pop(key, None)
        elif kind == "array":
            arrays[key] = value
        elif kind == "meta":
            meta[key] = value
            arrays["meta"] = np.array(json.dumps(meta))
        elif kind == "raw_meta":
            arrays["meta"] = np.array(value)
        elif key in arrays and arrays[key].size:
            flat = arrays[key].reshape(-1).copy()
            index, number = value
            floating = np.issubdtype(flat.dtype, np.floating)
            flat[index % flat.size] = number if floating else (int(number) if np.isfinite(number) else 0)
            arrays[key] = flat.reshape(arrays[key].shape)
    path = tmp_path_factory.mktemp("mutated") / "d.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    load_or_data_error(path)


def test_the_fuzzed_base_file_is_valid(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(VALID)
    buffer = ReplayBuffer.load(path)
    assert buffer.num_episodes == 3 and len(buffer) == 13
    with zipfile.ZipFile(path) as z:  # and a real npz archive, so byte flips hit real structure
        assert sorted(z.namelist()) == sorted(f"{k}.npy" for k in FIELDS)


@pytest.mark.parametrize("text", ["train.lr=.nan", "model.kappa_max=.nan", "train.lr=.inf", "train.lr=1e400"])
def test_issue_examples_are_config_errors(text):
    with pytest.raises(ConfigError):
        load_config(None, [text])
