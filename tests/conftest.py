"""Test-suite settings: tiny models run fastest on one thread, and every test starts seeded."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
