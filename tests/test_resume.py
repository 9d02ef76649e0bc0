"""Exact resume: a `tyr run` killed with SIGKILL at several points and re-run ends with the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import smoke_args
from tyr.rundir import RunDir

pytestmark = pytest.mark.slow


def _command(assets: dict, out: Path) -> list[str]:
    return [sys.executable, "-m", "tyr.cli", *smoke_args(assets, out)]


def _env() -> dict:
    return dict(os.environ)


def _genes_built(path: Path) -> int:
    try:
        return len(json.loads(path.read_text())["genes"])
    except (OSError, ValueError, KeyError):
        return 0


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _run_and_kill(cmd: list[str], reached: Callable[[], bool], timeout: float = 120) -> bool:
    """Start the run; SIGKILL it as soon as `reached()` holds. Returns False if it finished first."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if reached():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait(timeout=timeout)
    return False


def _final(out: Path) -> tuple[dict, list]:
    run = RunDir(out)
    return run.read_architecture(), [run.read_result(i) for i in (1, 2)]


def test_killed_run_resumes_to_the_same_architecture(tmp_path, tiny_assets):
    reference = tmp_path / "reference"
    subprocess.run(_command(tiny_assets, reference), env=_env(), check=True, capture_output=True)

    out = tmp_path / "killed"
    cmd = _command(tiny_assets, out)
    run = RunDir(out)
    kill_points = [
        lambda: _genes_built(run.manifest_path(1)) >= 3,  # mid supernet build
        lambda: run.state_path(1).exists(),  # mid generation 2 of iteration 1
        lambda: _lines(run.history_path(1)) >= 2,  # late in iteration 1
        lambda: _genes_built(run.manifest_path(2)) >= 1,  # iteration 2's build
        lambda: run.state_path(2).exists(),  # iteration 2's search
    ]
    kills = sum(_run_and_kill(cmd, point) for point in kill_points)
    assert kills >= 3, "the run finished before most kill points; make the schedule longer"
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)

    assert _final(out) == _final(reference)
    history = run.read_history(1)
    assert [h["generation"] for h in history] == list(range(1, len(history) + 1))
