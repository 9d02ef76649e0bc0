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

pytestmark = pytest.mark.slow


def _command(assets: dict, out: Path) -> list[str]:
    return [sys.executable, "-m", "tyr.cli", *smoke_args(assets, out)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


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
    arch = json.loads((out / "final" / "architecture.json").read_text())
    results = [json.loads((out / f"iter-{i}" / "result.json").read_text()) for i in (1, 2)]
    return arch, results


def test_killed_run_resumes_to_the_same_architecture(tmp_path, tiny_assets):
    reference = tmp_path / "reference"
    subprocess.run(_command(tiny_assets, reference), env=_env(), check=True, capture_output=True)

    out = tmp_path / "killed"
    cmd = _command(tiny_assets, out)
    it1, it2 = out / "iter-1", out / "iter-2"
    kill_points = [
        lambda: _genes_built(it1 / "supernet" / "manifest.json") >= 3,  # mid supernet build
        lambda: (it1 / "search" / "state.json").exists(),  # mid generation 2 of iteration 1
        lambda: _lines(it1 / "search" / "history.jsonl") >= 2,  # late in iteration 1
        lambda: _genes_built(it2 / "supernet" / "manifest.json") >= 1,  # iteration 2's build
        lambda: (it2 / "search" / "state.json").exists(),  # iteration 2's search
    ]
    kills = sum(_run_and_kill(cmd, point) for point in kill_points)
    assert kills >= 3, "the run finished before most kill points; make the schedule longer"
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)

    assert _final(out) == _final(reference)
    history = [json.loads(line) for line in (it1 / "search" / "history.jsonl").read_text().splitlines()]
    assert [h["generation"] for h in history] == list(range(1, len(history) + 1))
