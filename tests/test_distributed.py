"""Data-parallel training in two real gloo processes (spawned with the environment torchrun gives them).

One spawn runs everything, and the tests below check what it recorded:
- the Trainer: ranks start from rank 0's weights, sample different sequences from their own streams, end
  with identical parameters, and one 2-process step with B/2 each equals one single-process step on the
  same B sequences; a signal to one process stops both at the same update;
- `loopwm train` through the CLI: rank 1 writes nothing, and a resumed 2-process run equals an
  uninterrupted one bit for bit.
"""

import builtins
import contextlib
import io
import json
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from loopwm import distributed
from loopwm.app.session import StopSignal
from loopwm.checkpoint import CheckpointError, read_checkpoint
from loopwm.config import ConfigError
from loopwm.train import Trainer, restore_run, save_run
from tests.test_datasets import pendulum_like
from tests.test_training import config, linear_dataset, new_model

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "pendulum.yaml")
BATCH, HORIZON = 8, 2


def ddp_config(**train):
    """Fixed loop counts (min = max) and no extra loops, so the loss is a plain mean over sequences and a
    split batch gives the same gradient as the whole one; plain SGD, so a step shows the gradient's scale
    (Adam would hide a wrong average)."""
    return config(
        model={"min_loops": 3, "max_loops": 3},
        batch_size=BATCH,
        horizon=HORIZON,
        extra_loops=0,
        optimizer="sgd",
        lr=0.05,
        updates=6,
        log_every=1000,
        **train,
    )


def cli_overrides(root: Path, run_dir: Path, name: str, updates: int) -> list[str]:
    return [
        f"name={name}",
        f"run_dir={run_dir}",
        "device=cpu",
        f"data.path={root / 'data.npz'}",
        "model.latent_dim=8",
        "model.hidden_dim=16",
        "model.inject_dim=16",
        "model.mlp_dim=32",
        f"train.updates={updates}",
        "train.lr_schedule=constant",  # "stop at 4, resume to 6" changes a decaying schedule's span
        "train.batch_size=4",
        "train.horizon=2",
        "train.log_every=2",
        "train.checkpoint_every=2",
    ]


def params(wm) -> dict:
    return {k: v.detach().clone() for k, v in wm.state_dict().items()}


def _worker(rank: int, size: int, ports: list[int], root: Path) -> None:
    """One process of the run, set up as torchrun sets its workers up (a new rendezvous port for each
    process group, as each torchrun launch would have)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_WORLD_SIZE=str(size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(ports[0]),
        OMP_WAIT_POLICY="PASSIVE",
    )
    torch.set_num_threads(1)
    from loopwm.cli import main

    def train(*args: str) -> int:
        os.environ["MASTER_PORT"] = str(ports[len(codes) + 1])
        return main(["train", "-q", CONFIG, *args])

    record = {}
    with distributed.joined(torch.device("cpu")):
        data = linear_dataset()
        cfg = ddp_config()
        trainer = Trainer(new_model(cfg, data, seed=100 + rank), cfg, data)  # each rank inits differently
        record["init"] = params(trainer.wm)
        record["first_batch"] = data.sample(BATCH // size, HORIZON, _copy(trainer.rng))  # what update() draws
        trainer.update()
        record["after_one"] = params(trainer.wm)
        trainer.fit(progress=False)
        record["final"] = params(trainer.wm)

        # a signal to rank 1 alone: both processes stop, save and leave at the same update
        stopper = Trainer(new_model(cfg, data), cfg, data)
        update = stopper.update

        def update_then_signal():
            out = update()
            if rank == 1 and stopper.updates == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        stopper.update = update_then_signal
        with StopSignal() as stop:
            stopper.fit(progress=False, on_checkpoint=lambda: save_run(root / "stopped.pt", stopper), stop=stop)
            record["stop"] = (stopper.updates, stop.received)

    # the CLI: a run stopped after 4 updates and resumed to 6, and an uninterrupted 6-update run; rank 1
    # records every file or folder it would create, open for writing, rename or delete meanwhile
    codes: list[int] = []
    runs = root / "runs"
    with _recording_writes(enabled=rank == 1) as writes:
        codes.append(train(*cli_overrides(root, runs, "resumed", 4)))
        codes.append(train(*cli_overrides(root, runs, "resumed", 6), "resume=true"))
        codes.append(train(*cli_overrides(root, runs, "straight", 6)))
    record.update(codes=codes, writes=writes)
    torch.save(record, root / f"record{rank}.pt")


@contextlib.contextmanager
def _recording_writes(enabled: bool):
    """Record (not block) every Python-level write to the file system: open for writing, os.open with a
    write flag, mkdir, rename/replace and unlink."""
    writes: list[str] = []
    if not enabled:
        yield writes
        return
    real_open, real_os_open = builtins.open, os.open
    patched = {name: getattr(os, name) for name in ("mkdir", "rename", "replace", "unlink", "rmdir")}

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            writes.append(f"open({file!s}, {mode!r})")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
            writes.append(f"os.open({path!s})")
        return real_os_open(path, flags, *args, **kwargs)

    def recorder(name):
        def call(path, *args, **kwargs):
            writes.append(f"os.{name}({path!s})")
            return patched[name](path, *args, **kwargs)

        return call

    builtins.open, io.open, os.open = guarded_open, guarded_open, guarded_os_open
    for name in patched:
        setattr(os, name, recorder(name))
    try:
        yield writes
    finally:
        builtins.open, io.open, os.open = real_open, real_open, real_os_open
        for name, fn in patched.items():
            setattr(os, name, fn)


def _copy(rng: np.random.Generator) -> np.random.Generator:
    twin = np.random.default_rng()
    twin.bit_generator.state = rng.bit_generator.state
    return twin


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    pendulum_like(episodes=8).save(root / "data.npz")
    processes = mp.spawn(_worker, args=(2, _free_ports(4), root), nprocs=2, join=False)
    deadline = time.monotonic() + 600  # a collective that one rank never joins would otherwise hang the suite
    while not processes.join(timeout=5):
        if time.monotonic() > deadline:
            for p in processes.processes:
                p.kill()
            pytest.fail("the two processes did not finish within 10 minutes (a rank waits in a collective)")
    return root, [torch.load(root / f"record{r}.pt", weights_only=False) for r in range(2)]


def test_both_ranks_start_from_rank_0_and_end_with_identical_parameters(spawned):
    _, (r0, r1) = spawned
    for key in r0["init"]:
        assert torch.equal(r0["init"][key], r1["init"][key]), key
    reference = new_model(ddp_config(), linear_dataset(), seed=100).state_dict()
    assert all(torch.equal(r0["init"][k], reference[k]) for k in reference)  # rank 0's weights, not rank 1's
    for key in r0["final"]:
        assert torch.equal(r0["final"][key], r1["final"][key]), key
    assert any(not torch.equal(r0["final"][k], r0["init"][k]) for k in r0["init"])  # training moved them


def test_each_rank_samples_its_own_sequences_from_its_own_stream(spawned):
    _, (r0, r1) = spawned
    assert not torch.equal(r0["first_batch"]["obs"], r1["first_batch"]["obs"])
    data = linear_dataset()
    for rank, record in enumerate((r0, r1)):
        expected = data.sample(BATCH // 2, HORIZON, np.random.default_rng(distributed.rank_seed(0, rank)))
        for key in expected:
            assert torch.equal(record["first_batch"][key], expected[key]), (rank, key)
    # rank 0's stream is the single-process one
    assert torch.equal(
        data.sample(3, 2, np.random.default_rng(distributed.rank_seed(0, 0)))["obs"],
        data.sample(3, 2, np.random.default_rng(0))["obs"],
    )


def test_one_two_process_step_equals_one_single_process_step_on_the_same_batch(spawned):
    _, (r0, r1) = spawned
    data = linear_dataset()
    cfg = ddp_config()
    single = Trainer(new_model(cfg, data, seed=100), cfg, data)
    whole = {k: torch.cat([r0["first_batch"][k], r1["first_batch"][k]], dim=1) for k in r0["first_batch"]}
    assert whole["obs"].shape[1] == BATCH
    single.update(whole)
    after = single.wm.state_dict()
    moved = 0
    for key, value in after.items():
        torch.testing.assert_close(r0["after_one"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        moved += not torch.equal(value, r0["init"][key])
    assert moved > 10
    # and the split is not a formality: one half alone gives another step
    half = Trainer(new_model(cfg, data, seed=100), cfg, data)
    half.update(r0["first_batch"])
    assert any(not torch.allclose(half.wm.state_dict()[k], after[k], rtol=1e-5, atol=1e-6) for k in after)


def test_a_signal_to_one_process_stops_both_at_the_same_update(spawned):
    root, (r0, r1) = spawned
    assert r0["stop"] == r1["stop"] == (3, signal.SIGTERM)
    assert read_checkpoint(root / "stopped.pt")["trainer"]["updates"] == 3


def test_cli_exits_0_and_rank_1_writes_nothing(spawned):
    root, (r0, r1) = spawned
    assert r0["codes"] == r1["codes"] == [0, 0, 0]
    assert r1["writes"] == []
    run = root / "runs" / "straight"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events")) == [
        ".lock",
        "checkpoints",
        "config.yaml",
        "eval.json",
        "metrics.jsonl",
        "run.json",
    ]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    trainer = read_checkpoint(run / "checkpoints" / "latest.pt")["trainer"]
    assert trainer["updates"] == 6 and trainer["world_size"] == 2 and len(trainer["ranks"]) == 2
    assert trainer["ranks"][0]["numpy_rng"] != trainer["ranks"][1]["numpy_rng"]


def test_the_write_recorder_sees_every_write_a_training_run_makes(spawned, tmp_path):
    """What makes `writes == []` above mean something: the same recorder, around one single-process run."""
    from loopwm.cli import main

    root, _ = spawned
    with _recording_writes(enabled=True) as writes:
        assert main(["train", "-q", CONFIG, *cli_overrides(root, tmp_path, "single", 2)]) == 0
    seen = "\n".join(writes)
    for needle in (
        "config.yaml",
        "metrics.jsonl",
        "events.out.tfevents",
        ".latest.pt.",
        "os.replace",
        "eval.json",
        "os.mkdir",
    ):
        assert needle in seen, (needle, writes)


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(spawned):
    root, _ = spawned
    resumed, straight = root / "runs" / "resumed", root / "runs" / "straight"
    a = read_checkpoint(resumed / "checkpoints" / "latest.pt")
    b = read_checkpoint(straight / "checkpoints" / "latest.pt")
    assert a["trainer"]["updates"] == b["trainer"]["updates"] == 6
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]

    def untimed(rows):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]

    assert untimed(rows) == untimed(straight_rows)


def test_one_process_refuses_to_resume_a_two_process_checkpoint(spawned):
    root, _ = spawned
    data = pendulum_like(episodes=8)
    path = root / "runs" / "straight" / "checkpoints" / "latest.pt"
    from loopwm.checkpoint import model_from_payload

    payload = read_checkpoint(path)
    cfg = config(batch_size=4)
    trainer = Trainer(model_from_payload(payload), cfg, data)
    with pytest.raises(CheckpointError, match=r"trained by 2 process\(es\) and this run has 1.*nproc_per_node=2"):
        restore_run(path, trainer)


def test_a_batch_that_does_not_split_evenly_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "current", lambda: distributed.World(rank=0, size=3))
    data = linear_dataset(episodes=4)
    cfg = config(batch_size=8)
    with pytest.raises(ConfigError, match=r"train\.batch_size=8 must be divisible by the number of processes \(3\)"):
        Trainer(new_model(cfg, data), cfg, data)


def test_python_dash_m_loopwm_is_the_cli():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "loopwm", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0 and "usage: loopwm train" in out.stdout


def test_only_train_runs_under_torchrun(monkeypatch, capsys, tmp_path):
    from loopwm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["collect", "-q", CONFIG, f"data.path={tmp_path / 'd.npz'}"]) == 2
    assert "only `loopwm train` runs in several processes" in capsys.readouterr().err
    assert not (tmp_path / "d.npz").exists()
