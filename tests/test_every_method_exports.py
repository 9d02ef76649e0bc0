"""A run of every allocation method exports and evaluates in a fresh process (one-shot methods stop after
iteration 1, so nothing may assume the last iteration is `search.num_iterations`)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import smoke_args
from tyr.cli import main
from tyr.methods import METHODS
from tyr.rundir import RunDir

pytestmark = pytest.mark.slow

_EXPORT_AND_EVAL = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from tyr.cli import main

    out = {}
    for run, folder in json.loads(sys.argv[1]):
        assert main(["export", run, "--out", folder]) == 0, run
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            assert main(["eval", run, "--json", "--quiet"]) == 0, run
        out[run] = json.loads(text.getvalue())
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    out = {}
    for name in METHODS:
        run = root / name
        assert main(smoke_args(tiny_assets, run, "--method", name)) == 0, name
        out[name] = run
    return out


def test_every_method_exports_and_evaluates_in_a_fresh_process(runs, tmp_path):
    pairs = [(str(run), str(tmp_path / f"export-{name}")) for name, run in runs.items()]
    result = subprocess.run(
        [sys.executable, "-c", _EXPORT_AND_EVAL, json.dumps(pairs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    for name, run in runs.items():
        rd = RunDir(run)
        selection = rd.selection()
        # one-shot: iteration 1; otherwise the better-validating iteration (not necessarily the last)
        assert selection.iteration in ((1,) if METHODS[name].one_shot else (1, 2)), name
        assert selection.genome == tuple(rd.read_result(selection.iteration)["genome"])
        exported = json.loads((tmp_path / f"export-{name}" / "architecture.json").read_text())
        assert exported == rd.read_architecture(), name
        metrics, measured = rd.read_metrics(), evaluated[str(run)]
        assert measured["ppl"] == pytest.approx(metrics["searched"]["ppl"], rel=1e-4), name
        assert measured["kl"] == pytest.approx(metrics["searched"]["kl"], rel=1e-3, abs=1e-6), name
