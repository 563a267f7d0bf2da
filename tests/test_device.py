"""device=cuda without CUDA is a clear ConfigError before anything is written."""

from pathlib import Path

import pytest
import torch

from loopwm.cli import main
from loopwm.config import ConfigError
from loopwm.train import resolve_device

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "pendulum.yaml")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")


@no_cuda
@pytest.mark.parametrize("command", ["run", "train"])
def test_cuda_without_cuda_exits_2_before_the_run_folder_exists(tmp_path, capsys, command):
    runs = tmp_path / "runs"
    assert main([command, "-q", CONFIG, "device=cuda", f"run_dir={runs}", f"data.path={tmp_path / 'd.npz'}"]) == 2
    err = capsys.readouterr().err
    assert f"loopwm {command}: error: device='cuda': CUDA is not available" in err and "device=cpu" in err
    assert "Traceback" not in err and not runs.exists()


@no_cuda
def test_resolve_device_names_the_problem():
    with pytest.raises(ConfigError, match="device='cuda:1': CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="expected 'auto', 'cpu' or 'cuda"):
        resolve_device("gpu")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
