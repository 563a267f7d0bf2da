"""The agreement exit: loop until the predicted latent stops moving, checked against a full readout trace."""

import pytest
import torch

from loopwm.analysis.agreement import rms_distance
from loopwm.config import from_dict
from loopwm.exits import EXIT_RULES, LoopOptions
from tests.helpers import tiny_model


def readout_changes(wm, z, action, loops: int, h0=None) -> torch.Tensor:
    """[loops - 1, B] RMS change of the readout from loop t to loop t + 1, from a fixed-count trace."""
    ctx = wm.core.prepare(wm.injection(z, action))
    _, trace = wm.core.run(ctx, h0, LoopOptions(loops=loops), readout=wm.readout_for(z))
    r = torch.stack(trace.readouts)
    return rms_distance(r[1:], r[:-1])


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-5])
def test_each_sample_stops_at_the_first_loop_whose_readout_moved_less_than_tol(tol):
    torch.manual_seed(0)
    wm = tiny_model()
    z, action = wm.encode(torch.randn(64, 3)), torch.rand(64, 1) * 2 - 1
    with torch.no_grad():
        changes = readout_changes(wm, z, action, loops=40)
        _, trace = wm.step(z, action, options=LoopOptions(exit="agreement", tol=tol, max_loops=40))
    below = changes <= tol
    assert bool(below.any(0).all()), "every sample settles within 40 loops"
    expected = below.long().argmax(0) + 2  # change t compares loops t+1 and t+2 (1-based)
    assert torch.equal(trace.loops_used, expected)
    assert len(trace.readouts) == int(expected.max())  # readouts were taken without asking, for the rule


def test_more_loops_go_to_the_half_started_far_from_its_fixed_point():
    torch.manual_seed(0)
    wm = tiny_model()
    z = wm.encode(torch.randn(8, 3)).repeat(2, 1)
    action = (torch.rand(8, 1) * 2 - 1).repeat(2, 1)
    ctx = wm.core.prepare(wm.injection(z, action))
    h_star = wm.core.fixed_point(ctx)
    h0 = torch.cat([h_star[:8], h_star[8:] + 20.0 * torch.randn(8, h_star.shape[1])])  # second half: the hard one
    with torch.no_grad():
        _, trace = wm.step(z, action, h0=h0, options=LoopOptions(exit="agreement", tol=1e-4, max_loops=200))
    used = trace.loops_used
    assert bool((used[8:] > used[:8]).all()), used.tolist()
    assert bool((used[:8] == 2).all())  # started at h*: the first two readouts already agree


def test_agreement_is_registered_and_refuses_what_it_cannot_honour():
    rule = EXIT_RULES["agreement"]
    assert rule.needs_readout and not rule.uses_bound and not rule.needs_error_head
    with pytest.raises(ValueError, match="needs exit='fixed'"):
        LoopOptions(exit="agreement", loops=3)
    wm = tiny_model()
    z, action = wm.encode(torch.randn(4, 3)), torch.rand(4, 1) * 2 - 1
    ctx = wm.core.prepare(wm.injection(z, action))
    with pytest.raises(ValueError, match="pass readout="):
        wm.core.run(ctx, options=LoopOptions(exit="agreement"))
    cfg = from_dict({"model": {"exit": "agreement", "exit_tol": 1e-3}, "planner": {"exit": "agreement"}})
    assert LoopOptions.from_config(cfg.model).exit == "agreement"
    # a model configured with it loops by it in `step` and in `imagine`, the planner's call
    wm = tiny_model(exit="agreement", exit_tol=1e-3, max_loops=50)
    out = wm.imagine(z, torch.rand(3, 4, 1) * 2 - 1, decode="none")
    assert out.latents.shape[:2] == (4, 4) and torch.isfinite(out.latents).all()
