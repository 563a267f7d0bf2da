"""benchmarks/vector_env.py --smoke writes its report (numbers at smoke sizes mean nothing; the shape does)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vector_env.py"


def test_smoke_run_writes_json_and_markdown(tmp_path):
    pytest.importorskip("mujoco", reason="the benchmark steps real HalfCheetah-v5 ([mujoco] extra)")
    spec = importlib.util.spec_from_file_location("vector_env_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    payload = module.main(["--smoke", "--rounds", "1", "--loops", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "vector_env.json").read_text())
    assert saved["smoke"] is True and saved == json.loads(json.dumps(payload))
    names = [r["env"] for r in saved["results"]]
    assert names[0] == "real HalfCheetah-v5" and "VectorWorldModelEnv N=8" in names
    assert all(r["transitions_per_s"] > 0 for r in saved["results"])
    assert saved["macs_per_transition"]["decoded"] > saved["macs_per_transition"]["latent_obs"] > 0
    md = (tmp_path / "vector_env.md").read_text()
    assert "| VectorWorldModelEnv N=8 | 4 |" in md and "| VectorWorldModelEnv N=8, 1 loop | 1 |" in md
    rows = {r["env"]: r for r in saved["results"]}
    one, four = rows["VectorWorldModelEnv N=8, 1 loop"], rows["VectorWorldModelEnv N=8"]
    assert one["loops"] == 1 and four["loops"] == 4 and set(saved["target"]["fewer_loops"]) == {"1"}
    # the GFLOP/s column counts the multiply-adds of the loops actually run: fewer per transition at 1 loop
    per_transition = [r["model_gflop_per_s"] / r["transitions_per_s"] for r in (one, four)]
    assert per_transition[0] < 0.8 * per_transition[1]
