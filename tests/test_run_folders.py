"""Run folders never lose or mix work: kinds, locks, config checks, stale temp files, names, full disks,
signals during start-up, and SIGKILL at any point followed by an exact resume. All through `loopwm`."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.spaces import Box

from loopwm.app.session import RunFolderError, RunSession
from loopwm.checkpoint import read_checkpoint
from loopwm.cli import main
from loopwm.config import load_config
from loopwm.nets import SpaceSpec

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "pendulum.yaml")
TINY = [
    "device=cpu",
    "threads=1",
    "model.latent_dim=8",
    "model.hidden_dim=16",
    "model.inject_dim=16",
    "model.mlp_dim=32",
    "model.loops=2",
    "train.batch_size=8",
    "train.horizon=2",
    "train.loop_mean=2",
    "train.bptt_loops=2",
]
TIMING = (
    "perf/transitions_per_s",
    "perf/elapsed_s",
    "perf/peak_rss_mib",
    "eval/ms_per_decision",
)  # wall-clock values, never equal across runs


def run_args(tmp_path: Path, name: str = "r", steps: int = 60) -> list[str]:
    """A seconds-long `loopwm run` on Pendulum: 20-step episodes, a checkpoint at every episode end."""
    return [
        CONFIG,
        f"name={name}",
        f"run_dir={tmp_path / 'runs'}",
        *TINY,
        "env.max_episode_steps=20",
        "train.log_every=10",
        "train.checkpoint_every=5",
        "planner.horizon=2",
        "planner.iterations=1",
        "planner.samples=16",
        "planner.elites=4",
        "planner.policy_samples=2",
        f"agent.total_steps={steps}",
        "agent.seed_steps=20",
        "agent.updates_per_step=0.5",
        "agent.eval_every=1000",
        "agent.eval_episodes=1",
        "agent.hidden_dim=16",
    ]


def train_args(data: Path, tmp_path: Path, name: str = "t", updates: int = 8) -> list[str]:
    """A seconds-long `loopwm train` on a collected Pendulum dataset, logging every 2 and saving every 4 updates."""
    return [
        CONFIG,
        f"name={name}",
        f"run_dir={tmp_path / 'runs'}",
        *TINY,
        f"data.path={data}",
        "data.steps=1000",
        f"train.updates={updates}",
        "train.log_every=2",
        "train.checkpoint_every=4",
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pendulum.npz"
    assert main(["collect", "-q", CONFIG, f"data.path={path}", "data.steps=1000"]) == 0
    return path


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, dataset) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("straight")
    assert main(["run", "-q", *run_args(out, name="run")]) == 0
    assert main(["train", "-q", *train_args(dataset, out, name="train")]) == 0
    return {"run": out / "runs" / "run", "train": out / "runs" / "train"}


def copy_of(folder: Path, tmp_path: Path, name: str) -> Path:
    """A copy of a finished run folder as `tmp_path/runs/name` (what the command would find there)."""
    return Path(shutil.copytree(folder, tmp_path / "runs" / name))


def files(folder: Path) -> dict[str, bytes]:
    """Every file under a run folder and its bytes (the lock file aside)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def comparable(rows_: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows_]


def last_model(folder: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(folder / "checkpoints" / "latest.pt")["model"]


def cli_process(args: list[str], cwd: Path, prelude: str = "", wait: bool = True):
    """`loopwm ARGS` in a fresh Python process, after running `prelude` there."""
    script = f"import sys\n{prelude}\nfrom loopwm.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    command = [sys.executable, "-c", script, *args]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ---- 1 and 9: a folder's kind and its config are checked before anything is written ---------------------
def test_train_resume_on_a_run_folder_is_refused_and_changes_nothing(tmp_path, dataset, straight_runs, capsys):
    folder = copy_of(straight_runs["run"], tmp_path, "x")
    before = files(folder)
    assert main(["train", "-q", *train_args(dataset, tmp_path, name="x"), "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "made by `loopwm run`" in err and "`loopwm train`" in err
    assert files(folder) == before


def test_run_resuming_a_train_folder_is_refused_clearly(tmp_path, straight_runs, capsys):
    folder = copy_of(straight_runs["train"], tmp_path, "x")
    before = files(folder)
    assert main(["run", "-q", *run_args(tmp_path, name="x"), "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "made by `loopwm train`" in err and "`loopwm run`" in err and "KeyError" not in err
    assert files(folder) == before


def test_resuming_with_another_model_or_env_lists_the_differing_keys(tmp_path, dataset, straight_runs, capsys):
    args = train_args(dataset, tmp_path)
    folder = copy_of(straight_runs["train"], tmp_path, "t")
    before = files(folder)
    assert main(["train", "-q", *args, "resume=true", "model.hidden_dim=32", "model.loops=3"]) == 2
    err = capsys.readouterr().err
    assert "model.hidden_dim: 16 -> 32" in err and "model.loops: 2 -> 3" in err
    assert main(["train", "-q", *args, "resume=true", "env.id=MountainCarContinuous-v0"]) == 2
    assert "env.id: Pendulum-v1 -> MountainCarContinuous-v0" in capsys.readouterr().err
    # what the restored optimiser, replay or split would silently ignore or mix is refused the same way
    assert main(["train", "-q", *args, "resume=true", "train.lr=1e-6", "seed=1", "train.optimizer=sgd"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.001 -> 1e-06" in err and "seed: 0 -> 1" in err and "train.optimizer: adam -> sgd" in err
    assert main(["train", "-q", *args, "resume=true", f"data.path={tmp_path / 'other.npz'}"]) == 2
    assert "data.path:" in capsys.readouterr().err
    assert main(["train", "-q", *args, "resume=true", "train.updates=4"]) == 2  # it is at update 8
    assert "train.updates=4 would end it before where it is: pass train.updates >= 8" in capsys.readouterr().err
    # the same config with an env whose spaces changed (another version of it, say) is refused as well
    cfg = load_config(args[0], args[1:] + ["resume=true"])
    other = SpaceSpec.from_spaces(Box(-1.0, 1.0, (2,), np.float32), Box(-2.0, 2.0, (1,), np.float32))
    with RunSession(cfg, "train") as session, pytest.raises(RunFolderError, match=r"spaces.obs_shape: \[3\] -> \[2\]"):
        session.start(other)
    assert files(folder) == before


# ---- 2: one writer at a time ---------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holders_pid(tmp_path, capsys):
    holder = cli_process(["run", "-q", *run_args(tmp_path, steps=100_000)], tmp_path, wait=False)
    folder = tmp_path / "runs" / "r"
    try:
        for _ in range(600):  # until the holder is writing: its step-0 evaluation is logged
            if (folder / "metrics.jsonl").exists() or holder.poll() is not None:
                break
            time.sleep(0.1)
        assert holder.poll() is None, holder.communicate()
        before = files(folder)
        assert main(["run", "-q", *run_args(tmp_path, steps=40)]) == 2
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid}" in err
        assert main(["run", "-q", *run_args(tmp_path, steps=40), "resume=true"]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
        assert files(folder)["config.yaml"] == before["config.yaml"]
    finally:
        holder.kill()
        holder.communicate()
    # the lock died with its holder: the folder can be resumed at once
    assert main(["run", "-q", *run_args(tmp_path, steps=40), "resume=true"]) == 0


# ---- 3: logs without a checkpoint are never appended to ------------------------------------------------
def test_logs_without_a_checkpoint_are_refused_or_restarted_clean(tmp_path, straight_runs, capsys):
    straight = straight_runs["run"]
    folder = copy_of(straight, tmp_path, "x")
    for path in (folder / "checkpoints").iterdir():  # what a run killed before its first checkpoint leaves
        path.unlink()
    before = files(folder)
    assert main(["run", "-q", *run_args(tmp_path, name="x")]) == 2
    err = capsys.readouterr().err
    assert "has logs but no checkpoint" in err and "resume=true" in err
    assert files(folder) == before
    assert main(["run", "-q", *run_args(tmp_path, name="x"), "resume=true"]) == 0
    assert comparable(rows(folder)) == comparable(rows(straight))
    assert [r["step"] for r in rows(folder) if "eval/return_mean" in r] == [0, 60]
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    for key, value in last_model(straight).items():
        assert torch.equal(last_model(folder)[key], value), key


# ---- 4: stale temp files go, and files get the usual permissions ---------------------------------------
def test_stale_temp_files_are_removed_and_files_respect_the_umask(tmp_path, dataset):
    args = train_args(dataset, tmp_path)
    assert main(["train", "-q", *args]) == 0
    folder = tmp_path / "runs" / "t"
    stale = [folder / "checkpoints" / ".latest.pt.k1ll3d00.tmp", folder / ".metrics.jsonl.abc12345.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = folder / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    old_umask = os.umask(0o022)
    try:
        assert main(["train", "-q", *args, "resume=true", "train.updates=12"]) == 0
        assert main(["collect", "-q", CONFIG, f"data.path={tmp_path / 'more.npz'}", "data.steps=200"]) == 0
    finally:
        os.umask(old_umask)
    assert not any(path.exists() for path in stale) and keep.read_text() == "mine"
    for path in (
        folder / "checkpoints" / "latest.pt",
        folder / "metrics.jsonl",
        folder / "config.yaml",
        tmp_path / "more.npz",
    ):
        assert path.stat().st_mode & 0o777 == 0o644, path


# ---- 5: names stay inside run_dir -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../escaped", "a/../../escaped", "ABSOLUTE", "", "."])
def test_names_that_leave_run_dir_are_refused(tmp_path, dataset, capsys, name):
    runs = tmp_path / "runs"
    name = str(tmp_path / "escaped") if name == "ABSOLUTE" else name
    args = train_args(dataset, tmp_path) + [f"name={name}"]
    assert main(["train", "-q", *args]) == 2
    assert "name=" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not runs.exists()


def test_a_relative_name_inside_run_dir_is_fine(tmp_path, dataset):
    assert main(["train", "-q", *train_args(dataset, tmp_path), "name=sweep/lr-1e-3", "train.updates=2"]) == 0
    assert (tmp_path / "runs" / "sweep" / "lr-1e-3" / "checkpoints" / "latest.pt").is_file()


# ---- 6: a full disk or an unwritable folder: one clear error, the old checkpoint intact -----------------
def test_a_full_disk_gives_one_clear_error_and_keeps_the_checkpoint(tmp_path, straight_runs, capsys, monkeypatch):
    args = run_args(tmp_path)
    latest = copy_of(straight_runs["run"], tmp_path, "r") / "checkpoints" / "latest.pt"
    before = latest.read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["run", "-q", *args, "resume=true", "agent.total_steps=80"]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "No space left on device" in err and "latest.pt" in err, err
    assert latest.read_bytes() == before
    assert read_checkpoint(latest)["progress"]["step"] == 60
    assert not list(latest.parent.glob(".*.tmp"))


def test_a_file_where_the_run_folder_should_be_gives_one_clear_error(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    assert main(["run", "-q", *run_args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "runs" in err, err
    assert (tmp_path / "runs").read_text() == "not a folder"


# ---- 7: SIGTERM during start-up -------------------------------------------------------------------------
TERM_WHILE_MAKING_THE_ENV = """
import os, signal
import gymnasium
make = gymnasium.make
def make_after_a_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return make(*args, **kwargs)
gymnasium.make = make_after_a_signal
"""


def test_sigterm_during_run_start_up_exits_with_a_message_and_writes_nothing(tmp_path):
    done = cli_process(["run", "-q", *run_args(tmp_path)], tmp_path, prelude=TERM_WHILE_MAKING_THE_ENV)
    assert done.returncode == 128 + signal.SIGTERM, (done.returncode, done.stderr)
    assert "SIGTERM" in done.stderr and "start-up" in done.stderr and "Traceback" not in done.stderr
    folder = tmp_path / "runs" / "r"
    assert not folder.exists() or files(folder) == {}
    assert main(["run", "-q", *run_args(tmp_path, steps=20)]) == 0  # and nothing blocks a fresh start


# ---- 8: numbers at the door -----------------------------------------------------------------------------
def test_val_fraction_zero_trains_and_says_it_skips_held_out_evaluation(tmp_path, dataset, capsys):
    assert main(["train", "-q", *train_args(dataset, tmp_path), "train.val_fraction=0"]) == 0
    folder = tmp_path / "runs" / "t"
    assert "val_fraction=0" in capsys.readouterr().err
    assert read_checkpoint(folder / "checkpoints" / "latest.pt")["trainer"]["updates"] == 8
    assert not (folder / "eval.json").exists()
    assert main(["eval", str(folder), "--data", str(dataset)]) == 0


@pytest.mark.parametrize("episodes", ["-1", "0", "two"])
def test_eval_episodes_must_be_a_positive_integer(tmp_path, capsys, episodes):
    with pytest.raises(SystemExit) as exited:
        main(["eval", str(tmp_path / "whatever.pt"), "--episodes", episodes])
    assert exited.value.code == 2
    assert "--episodes" in capsys.readouterr().err


# ---- SIGKILL anywhere, then resume: equal to an uninterrupted run ---------------------------------------
KILL_ON_CALL = """
import os, signal
import {module} as owner
calls = 0
original = owner.{attr}
def deadly(*args, **kwargs):
    global calls
    calls += 1
    if calls == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
owner.{attr} = deadly
"""
KILL_POINTS = {  # where to die: before the n-th metrics line, or after the n-th file write and before its rename
    "log": ("loopwm.logger", "RunLogger.log"),
    "rename": ("loopwm.atomic", "os.replace"),
}


def _kill_then_resume(args: list[str], verb: str, where: str, n: int, tmp_path: Path) -> None:
    module, attr = KILL_POINTS[where]
    killed = cli_process([verb, "-q", *args], tmp_path, prelude=KILL_ON_CALL.format(module=module, attr=attr, n=n))
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    assert main([verb, "-q", *args, "resume=true"]) == 0


@pytest.mark.parametrize(
    "verb, where, calls", [("run", "log", 8), ("run", "rename", 4), ("train", "log", 4), ("train", "rename", 2)]
)
def test_sigkill_at_a_random_point_then_resume_equals_an_uninterrupted_run(
    tmp_path, dataset, straight_runs, verb, where, calls
):
    n = int(np.random.default_rng([7, len(verb), len(where)]).integers(1, calls + 1))  # at least `calls` happen
    args = run_args(tmp_path) if verb == "run" else train_args(dataset, tmp_path)
    _kill_then_resume(args, verb, where, n, tmp_path)
    folder, straight = tmp_path / "runs" / ("r" if verb == "run" else "t"), straight_runs[verb]
    resumed, expected = last_model(folder), last_model(straight)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), (n, key)
    assert comparable(rows(folder)) == comparable(rows(straight)), n
    assert not list(folder.rglob(".*.tmp"))


def test_a_checkpoint_inside_a_logging_window_resumes_to_the_same_rows(tmp_path, dataset, straight_runs):
    # saving every 3 updates and logging every 2: the checkpoint at update 3 holds half a window (the straight
    # run saves every 4, which changes no row)
    args = [*train_args(dataset, tmp_path), "train.checkpoint_every=3"]
    _kill_then_resume(args, "train", "log", 2, tmp_path)  # dies logging update 4: the checkpoint of update 3 stands
    assert comparable(rows(tmp_path / "runs" / "t")) == comparable(rows(straight_runs["train"]))


def test_run_refuses_a_horizon_or_capacity_its_episodes_cannot_fit_before_writing(tmp_path, capsys):
    assert main(["run", "-q", *run_args(tmp_path), "train.horizon=21"]) == 2  # its episodes are 20 steps
    err = capsys.readouterr().err
    assert "at most 20 agent steps" in err and "train.horizon=21" in err and "at most 20" in err
    assert main(["run", "-q", *run_args(tmp_path), "data.capacity=19"]) == 2
    assert "data.capacity=19 cannot hold one: set data.capacity to at least 20" in capsys.readouterr().err
    assert (
        main(["run", "-q", *run_args(tmp_path), "env.max_episode_steps=60", "env.action_repeat=4", "data.capacity=14"])
        == 2
    )
    assert "at least 15" in capsys.readouterr().err  # 60 environment steps are 15 agent steps
    assert not (tmp_path / "runs").exists()


def test_eval_and_analyze_of_an_online_run_ask_for_data_instead_of_splitting_data_path(straight_runs, capsys):
    for verb in ("eval", "analyze"):
        assert main([verb, str(straight_runs["run"])]) == 2
        err = capsys.readouterr().err
        assert "`loopwm run` folder" in err and "no held-out split" in err and "pass --data" in err, verb


@pytest.mark.parametrize("text", ["", "{}", '{"kind": "fit"}', "[1]"])
def test_a_damaged_run_json_is_refused_naming_the_file(tmp_path, straight_runs, capsys, text):
    folder = copy_of(straight_runs["run"], tmp_path, "x")
    (folder / "run.json").write_text(text)
    before = files(folder)
    assert main(["run", "-q", *run_args(tmp_path, name="x"), "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "has a damaged run.json" in err and "Traceback" not in err
    assert files(folder) == before


def test_eval_of_a_train_run_refuses_a_dataset_file_changed_since_training(tmp_path, dataset, capsys):
    data = tmp_path / "data.npz"
    shutil.copy(dataset, data)
    assert main(["train", "-q", *train_args(data, tmp_path)]) == 0
    assert main(["eval", str(tmp_path / "runs" / "t")]) == 0  # the file it trained on: its own held-out split
    capsys.readouterr()
    assert main(["collect", "-q", "--overwrite", CONFIG, f"data.path={data}", "data.steps=1200"]) == 0
    for verb in ("eval", "analyze"):
        assert main([verb, str(tmp_path / "runs" / "t")]) == 2
        assert "has changed since the run trained on it" in capsys.readouterr().err, verb
    before = files(tmp_path / "runs" / "t")
    assert main(["train", "-q", *train_args(data, tmp_path, updates=12), "resume=true"]) == 2
    assert "has changed since this run trained on it" in capsys.readouterr().err
    assert files(tmp_path / "runs" / "t") == before


def test_a_checkpoint_from_before_the_newer_keys_still_resumes(tmp_path, dataset, straight_runs):
    from loopwm.checkpoint import atomic_torch_save, read_checkpoint

    folder = copy_of(straight_runs["train"], tmp_path, "t")
    path = folder / "checkpoints" / "latest.pt"
    payload = read_checkpoint(path)
    del payload["spec"]["action_starts"], payload["dataset_sha256"]  # as written before these keys existed
    del payload["trainer"]["log_window"], payload["trainer"]["last_loops"]
    # read back as the linear, latent error head of then: inert without a head, so not a config difference
    del payload["config"]["model"]["error_head_hidden"], payload["config"]["train"]["error_target"]
    del payload["model_config"]["error_head_hidden"]
    atomic_torch_save(payload, path)
    assert main(["train", "-q", *train_args(dataset, tmp_path, updates=10), "resume=true"]) == 0
    assert read_checkpoint(path)["trainer"]["updates"] == 10


def test_a_finished_vector_run_that_overshot_its_length_resumes_with_its_own_command(tmp_path, capsys):
    args = [*run_args(tmp_path, steps=40), "env.num_envs=3"]  # three envs step together: it ends at step 42
    assert main(["run", "-q", *args]) == 0
    assert main(["run", "-q", *args, "resume=true"]) == 0  # a scheduler's re-queue of the same command
    assert main(["run", "-q", *run_args(tmp_path, steps=38), "env.num_envs=3", "resume=true"]) == 2
    assert "is at 42 already; agent.total_steps=38" in capsys.readouterr().err


def test_eval_json_is_strict_json(straight_runs):
    def refuse(name):
        raise AssertionError(f"eval.json holds {name}, which strict JSON forbids")

    result = json.loads((straight_runs["train"] / "eval.json").read_text(), parse_constant=refuse)
    assert result["loops_error_spearman_step1"] is None  # a fixed loop count: loops cannot correlate with errors
