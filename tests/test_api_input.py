"""The Python API refuses bad inputs at the door, naming the argument: non-finite or misshapen h0,
observations that overflow the encoder, non-finite tolerances and bad loop counts."""

import pytest
import torch

from loopwm.exits import LoopOptions
from tests.helpers import tiny_model


@pytest.fixture
def wm():
    model = tiny_model()
    model.eval()
    return model


def test_step_refuses_a_non_finite_h0(wm):
    z = wm.encode(torch.zeros(2, 3))
    for bad in (float("nan"), float("inf"), -float("inf")):
        h0 = torch.zeros(2, wm.cfg.hidden_dim)
        h0[1, 3] = bad
        with pytest.raises(ValueError, match="h0 contains NaN or infinite values"):
            wm.step(z, torch.zeros(2, 1), h0=h0)
    z1, _ = wm.step(z, torch.zeros(2, 1), h0=torch.zeros(2, wm.cfg.hidden_dim))  # a finite one works
    assert torch.isfinite(z1).all()


def test_a_misshapen_h0_names_the_expected_shape(wm):
    z = wm.encode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"h0 has shape \(2, 5\); expected \(2, 32\)"):
        wm.step(z, torch.zeros(2, 1), h0=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"h0 has shape list; expected \(2, 32\)"):
        wm.step(z, torch.zeros(2, 1), h0=[0.0] * 32)


@pytest.mark.parametrize("value", [1e38, -1e38, 3e37])
def test_encode_refuses_observations_that_overflow_the_encoder(wm, value):
    obs = torch.zeros(4, 3)
    obs[2, 1] = value  # finite in float32, but the encoder's sums overflow it
    with pytest.raises(ValueError, match=r"obs overflows the encoder.*row 2"):
        wm.encode(obs)
    z = wm.encode(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="obs overflows the encoder"):
        wm.step(z, torch.zeros(1, 1), obs=torch.full((1, 3), value))
    assert torch.isfinite(wm.encode(torch.full((1, 3), 1e6))).all()  # large but representable is fine


def test_wrong_shapes_name_the_expected_shape(wm):
    with pytest.raises(ValueError, match=r"obs has shape \(2, 4\); expected \(\.\.\., 3\)"):
        wm.encode(torch.zeros(2, 4))
    z = wm.encode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"z has shape \(2, 7\); expected \(batch, 16\)"):
        wm.step(torch.zeros(2, 7), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"action has shape \(2, 3\); expected \(2, 1\)"):
        wm.step(z, torch.zeros(2, 3))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"tol": float("nan")}, "tol=nan"),
        ({"tol": float("inf")}, "tol=inf"),
        ({"tol": -1.0}, "tol=-1.0"),
        ({"loops": 0}, "loops=0"),
        ({"max_loops": 0}, "max_loops=0"),
        ({"min_loops": 0}, "min_loops=0"),
    ],
)
def test_loop_options_name_the_bad_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        LoopOptions(**{"exit": "certified", **kwargs} if "tol" in kwargs else kwargs)
