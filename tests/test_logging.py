"""One logging scheme: plain `[tyr]` lines on stderr, results on stdout, progress bars only on a terminal."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import smoke_args
from tyr import logs


@pytest.fixture(autouse=True)
def _restore_tyr_logger():
    """Leave the "tyr" logger as the test found it."""
    logger = logging.getLogger(logs.LOGGER_NAME)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


def test_level_from_the_flags():
    assert logs.level_for() == logging.INFO
    assert logs.level_for(quiet=True) == logging.WARNING
    assert logs.level_for(verbose=True) == logging.DEBUG
    assert logs.level_for("error", verbose=True) == logging.ERROR  # an explicit --log-level wins
    assert logs.level_for("info", quiet=True) == logging.INFO


def test_one_plain_line_per_message_on_stderr(capsys):
    logs.setup(logging.INFO)
    logs.setup(logging.INFO)  # idempotent: still one handler, one line per message
    logging.getLogger("tyr.run").info("iteration 1: building the supernet")
    logging.getLogger("tyr.supernet.builder").warning("a gene kept no units")
    logging.getLogger("tyr.cluster").debug("not shown at INFO")
    logging.getLogger("tyr").error("failed")
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.splitlines() == [
        "[tyr] iteration 1: building the supernet",
        "[tyr] warning: a gene kept no units",
        "[tyr] error: failed",
    ]
    logs.setup(logging.DEBUG)
    logging.getLogger("tyr.cluster").debug("ray: worker 0 ready")
    assert capsys.readouterr().err == "[tyr] debug: ray: worker 0 ready\n"


def test_progress_bars_only_on_a_terminal(monkeypatch):
    class Terminal:
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> int:
            return len(text)

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert logs.progress_bars() and not logs.progress_bars(quiet=True)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file or a pipe: isatty() is False
    assert not logs.progress_bars()


def test_quiet_shows_only_warnings(capsys, tmp_path):
    from tyr.cli import main

    assert main(["--quiet", "status", str(tmp_path / "missing")]) == 2
    logging.getLogger("tyr.run").info("hidden")
    logging.getLogger("tyr.run").warning("shown")
    assert capsys.readouterr().err.splitlines()[-1] == "[tyr] warning: shown"


def test_ray_line_names_workers_address_and_resources(monkeypatch, capsys, tmp_path):
    """The pool says once how many workers run where, with what each one gets (no Ray started here)."""
    from tyr import cluster
    from tyr.config import resolve_config

    class Context:
        gcs_address = "10.0.0.5:6379"

    class FakeRay:
        @staticmethod
        def get_runtime_context():
            return Context()

        @staticmethod
        def cluster_resources():
            return {"CPU": 8.0}  # no GPUs: num_gpus_per_worker auto gives CPU workers

    monkeypatch.setattr(cluster, "_ray", lambda: FakeRay)
    monkeypatch.setattr(cluster, "connect", lambda address, verbose=False: False)
    monkeypatch.setattr(cluster.RayWorkerPool, "_check_resources", lambda self: None)
    monkeypatch.setattr(cluster.RayWorkerPool, "_start_actor", lambda self, slot: None)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "meta.json").write_text("{}")
    logs.setup(logging.INFO)
    cfg = resolve_config(None, ["schedule=smoke"])
    cluster.RayWorkerPool(
        cfg, tmp_path, 3, address="10.0.0.5:6379", num_cpus_per_worker=2, num_gpus_per_worker=1
    )
    assert capsys.readouterr().err == (
        "[tyr] ray: 3 worker(s) x (2 CPU, 1 GPU) on the Ray cluster at 10.0.0.5:6379\n"
    )
    monkeypatch.setattr(cluster, "connect", lambda address, verbose=False: True)
    cluster.RayWorkerPool(cfg, tmp_path, 1)
    assert "1 worker(s) x (1 CPU, 0 GPU) on a local Ray instance started for this run (10.0.0.5:6379)" in (
        capsys.readouterr().err
    )


@pytest.mark.slow
def test_redirected_run_log_has_plain_lines_and_no_progress_frames(tmp_path, tiny_assets):
    """`tyr run > out 2> err` without --quiet: no carriage-return frames; the per-generation line is the progress."""
    args = [a for a in smoke_args(tiny_assets, tmp_path / "run") if a != "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(tmp_path / "out.txt", "wb") as out, open(tmp_path / "err.txt", "wb") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "tyr.cli", *args], stdout=out, stderr=err, env=env, timeout=600
        )
    stdout, stderr = (tmp_path / "out.txt").read_bytes(), (tmp_path / "err.txt").read_bytes()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert b"\r" not in stdout and b"\r" not in stderr
    log = stderr.decode()
    for line in (
        "[tyr] iteration 1: building the supernet",
        "[tyr] iter 1 gen 1/3: best KL ",
        "[tyr] iter 1 gen 3/3: best KL ",
        "[tyr] iter 2 gen 2/2: best KL ",
        "[tyr] perplexity on ",
    ):
        assert line in log, log
    assert stdout.decode().splitlines() == [
        f"[tyr] done: {tmp_path / 'run' / 'final' / 'architecture.json'}, "
        f"{tmp_path / 'run' / 'final' / 'metrics.json'}"
    ]
