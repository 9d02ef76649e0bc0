"""A new local pruning criterion and a new allocation method, added from this file alone, run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import smoke_args
from tyr.cli import main
from tyr.methods import METHODS, Allocation, AllocationMethod, MethodContext, register_method
from tyr.rundir import RunDir
from tyr.supernet.criteria import CRITERIA, ScoreCriterion, register_criterion
from tyr.supernet.store import SupernetStore
from tyr.supernet.variant import Gene


class KeepLastUnits(ScoreCriterion):
    """Scores rise with the unit index: the last units are kept."""

    name = "test-keep-last"

    def row_scores(self, stats, w):
        return torch.arange(w.shape[0], dtype=w.dtype, device=w.device)


class ScoredCentre(AllocationMethod):
    """Every gene at its ladder centre, with its fitness measured on the first calibration sequence."""

    name = "test-scored-centre"
    one_shot = True

    def allocate(self, ctx: MethodContext) -> Allocation:
        evaluator = ctx.make_evaluator(ctx.store)
        try:
            (fitness,) = evaluator([ctx.centre], np.array([0]))
        finally:
            evaluator.close()
        return Allocation(ctx.centre, fitness, 1, 0)


@pytest.fixture
def registered():
    register_criterion(KeepLastUnits)
    register_method(ScoredCentre)
    yield
    CRITERIA.pop(KeepLastUnits.name)
    METHODS.pop(ScoredCentre.name)


def test_new_criterion_and_method_run_end_to_end(registered, tiny_assets, tmp_path, capsys):
    out = tmp_path / "run"
    args = smoke_args(tiny_assets, out, "--criterion", KeepLastUnits.name, "--method", ScoredCentre.name)
    assert main(args) == 0
    run = RunDir(out)
    assert run.finished_iterations() == [1]  # one-shot
    result = run.read_result(1)
    assert result["method"] == ScoredCentre.name and result["evaluations"] == 1 and result["fitness"] > 0
    store = SupernetStore.open(run.supernet_dir(1))
    ladder = store.ladder(Gene(0, "mlp"))
    for entry in store.level_entries(Gene(0, "mlp")):
        kept = ladder.num_units - ladder.removed(entry.level)
        assert list(entry.kept) == list(range(ladder.num_units - kept, ladder.num_units))
    assert main(["status", str(out)]) == 0
    assert f"one-shot method {ScoredCentre.name}" in capsys.readouterr().out


def test_unknown_names_are_refused_with_the_registered_ones(tiny_assets, tmp_path, capsys):
    assert main(smoke_args(tiny_assets, tmp_path / "a", "--criterion", "nope")) == 2
    assert "supernet.criterion must be one of tyr, magnitude" in capsys.readouterr().err
    assert main(smoke_args(tiny_assets, tmp_path / "b", "--method", "nope")) == 2
    assert "search.method must be one of evolution, uniform" in capsys.readouterr().err
