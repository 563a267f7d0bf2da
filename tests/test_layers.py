"""Imports flow one way: core < loopwm.analysis < loopwm.envs < loopwm.agents < loopwm.app < loopwm.cli, and the
core never imports gymnasium. import-linter checks the contracts in setup.cfg; function-local imports count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed_layout(into: Path) -> Path:
    """The package as it installs (`envs/` and `agents/` inside `loopwm/`), as symlinks, so that import-linter,
    which reads a package from one folder, sees `loopwm.envs` and `loopwm.agents` too."""
    package = into / "loopwm"
    package.mkdir()
    for child in (ROOT / "loopwm").iterdir():
        if child.name != "__pycache__":
            (package / child.name).symlink_to(child)
    for name in ("envs", "agents"):
        (package / name).symlink_to(ROOT / name)
    return into


def test_import_contracts_hold(tmp_path):
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint), str(ROOT / "setup.cfg"), "--no-cache"],
        cwd=installed_layout(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout, done.stdout
