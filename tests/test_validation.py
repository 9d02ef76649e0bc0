"""Validation windows and the monotone coarse-to-fine loop: held-out windows disjoint from the fit windows (which
stay unchanged), their targets, the config keys (old runs resume as they began), and a run whose second
iteration validates worse ending with the first iteration's result."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import smoke_args
from tests.tiny import char_tokenizer
from tyr.cli import main
from tyr.config import RunConfig, config_from_stored, dump_yaml, resolve_config, resumed_config
from tyr.data import TextSource, calibration_split, calibration_tokens, token_stream, windows
from tyr.errors import TyrError
from tyr.evaluators.teacher import StackedTargets, TeacherTargets, save_teacher_targets
from tyr.run import Validator
from tyr.rundir import RunDir, config_difference
from tyr.schedules import PRESETS

# -- the windows ------------------------------------------------------------------------------------------------


def test_validation_windows_are_the_next_of_the_draw_and_leave_the_fit_windows_unchanged(tmp_path):
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join("".join(rng.choice(letters) for _ in range(200)) for _ in range(30)) + "\n")
    source, tokenizer = TextSource(str(path)), char_tokenizer()
    every = windows(token_stream([path.read_text().rstrip("\n")], tokenizer), 16)
    index = {tuple(w.tolist()): i for i, w in enumerate(every)}
    assert len(index) == len(every)  # random letters: every window is unique, so rows map back to positions

    fit, held = calibration_split(source, tokenizer, 40, 12, 16, seed=3)
    assert torch.equal(fit, calibration_tokens(source, tokenizer, 40, 16, seed=3))  # fit windows unchanged
    fit_at = [index[tuple(w.tolist())] for w in fit]
    held_at = [index[tuple(w.tolist())] for w in held]
    order = np.random.default_rng(3).permutation(len(every))
    assert fit_at == sorted(order[:40]) and held_at == sorted(order[40:52])
    assert not set(fit_at) & set(held_at)
    none = calibration_split(source, tokenizer, 40, 0, 16, seed=3)[1]
    assert none.shape == (0, 16)
    with pytest.raises(
        TyrError, match="validation sequences were asked for; lower data.num_sequences, data.num_"
    ):
        calibration_split(source, tokenizer, 40, len(every), 16, seed=3)


def test_stacked_targets_read_rows_of_either_set_in_the_order_asked(tmp_path):
    g = torch.Generator().manual_seed(0)
    parts = []
    for name, n in (("fit", 5), ("held", 3)):
        values, indices = torch.randn(n, 4, 2, generator=g), torch.randint(0, 50, (n, 4, 2), generator=g)
        save_teacher_targets(tmp_path / name, values, indices)
        parts.append((values.half(), indices.int()))
    stacked = StackedTargets(TeacherTargets.open(tmp_path / "fit"), TeacherTargets.open(tmp_path / "held"))
    all_values, all_indices = (torch.cat([p[j] for p in parts]) for j in range(2))
    for rows in ([0, 2], [5, 7], [6, 1, 7, 0], [7, 6, 5, 4, 3, 2, 1, 0]):
        values, indices = stacked.get(rows, 3)
        assert torch.equal(values, all_values[rows, :3]) and torch.equal(indices, all_indices[rows, :3])
    assert stacked.num_sequences == 8 and stacked.bytes_read > 0
    with pytest.raises(IndexError):
        stacked.get([8])


# -- the config keys ------------------------------------------------------------------------------------------


def test_a_run_stored_before_the_keys_existed_resumes_as_it_began():
    current = resolve_config(None, [])  # the cpu preset: paired selection, validation windows
    assert current.search.selection == "paired" and current.data.num_validation_sequences > 0
    old = yaml.safe_load(dump_yaml(current))
    for section, key in (
        ("search", "selection"),
        ("search", "validate_every"),
        ("data", "num_validation_sequences"),
        ("supernet", "refit"),
    ):
        del old[section][key]
    stored = config_from_stored(old)
    assert (stored.search.selection, stored.search.validate_every, stored.data.num_validation_sequences) == (
        "legacy",
        0,
        0,
    )
    assert config_difference(old, dump_yaml(current)) is None  # the same command resumes the old run ...
    resumed, keys = resumed_config(current, old)
    assert sorted(keys) == [
        "data.num_validation_sequences",
        "search.selection",
        "search.validate_every",
        "supernet.refit",
    ]
    assert resumed.supernet.refit == "zero"
    assert (resumed.search.selection, resumed.data.num_validation_sequences) == (
        "legacy",
        0,
    )  # ... as it began
    assert current.search.selection == "paired"  # the caller's config is left alone
    assert resumed_config(current, yaml.safe_load(dump_yaml(current))) == (current, [])
    asked = resolve_config(None, ["search.validate_every=3"])  # neither the old default nor the preset's
    assert "validate_every" in config_difference(old, dump_yaml(asked))


def test_stages_per_iteration():
    stages = "search.stages=[[[4,512],[1,4096]],[[4,512],[2,1024],[1,8192]]]"
    cfg = resolve_config(None, [stages])
    assert cfg.search.stages_for(1) == [[4, 512], [1, 4096]] and cfg.search.stages_for(2)[-1] == [1, 8192]
    assert resolve_config(None, []).search.stages_for(2) == [[4, 512], [2, 1024], [1, 4096]]
    with pytest.raises(TyrError, match="2 stage lists but search.num_iterations is 3"):
        resolve_config(None, [stages, "search.num_iterations=3", "search.generations=[1,1,1]"])
    with pytest.raises(TyrError, match=r"survivors must strictly decrease.*\(iteration 2\)"):
        resolve_config(None, ["search.stages=[[[4,512],[1,4096]],[[4,512],[4,1024],[1,4096]]]"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_never_give_a_later_iteration_less(name):
    cfg = resolve_config(None, [f"schedule={name}"])
    se = cfg.search
    assert se.selection == "paired" and cfg.data.num_validation_sequences > 0
    if name != "smoke":  # smoke keeps (3, 2): other tests read its log lines
        assert all(a <= b for a, b in zip(se.generations, se.generations[1:]))
    last = [se.stages_for(i)[-1][1] for i in range(1, se.num_iterations + 1)]
    assert all(a <= b for a, b in zip(last, last[1:]))
    assert RunConfig().search.selection == "legacy" and RunConfig().data.num_validation_sequences == 0


# -- the monotone loop, end to end ----------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """The tiny model gains nothing from threads, and they crawl on a busy machine (as in test_report)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_worse_second_iteration_never_becomes_the_final_model(
    tiny_assets, tmp_path, monkeypatch, capsys, one_thread
):
    out = tmp_path / "run"
    run = RunDir(out)
    measure = Validator.__call__

    def worse_in_iteration_2(self, genomes):
        values = measure(self, genomes)
        return [v + 1.0 for v in values] if Path(self.store.directory) == run.supernet_dir(2) else values

    monkeypatch.setattr(Validator, "__call__", worse_in_iteration_2)
    assert main(smoke_args(tiny_assets, out)) == 0
    first, second = run.read_result(1), run.read_result(2)
    selection = run.selection()
    assert selection.iteration == 1 and selection.genome == tuple(first["genome"])
    assert selection.validation_kl == first["validation_kl"] < second["validation_kl"]
    # the guarantee: never worse on validation than iteration 1 or the uniform start
    assert selection.validation_kl <= first["validation_kl"] <= first["start_validation_kl"]
    # iteration 2 was built around iteration 1's result; the final architecture is iteration 1's
    ladders = run.read_manifest(2)["fingerprint"]["ladders"]
    assert [centre for _, _, centre, *_ in ladders] == first["centres"]
    layers = run.read_architecture()["layers"]
    kept = [
        n
        for layer in layers
        for n in (len(layer["attention"]["kept_heads"]), layer["mlp"]["kept_channels_count"])
    ]
    assert kept == [(6 if g % 2 == 0 else 40) - c for g, c in enumerate(first["centres"])]
    # the history lines carry what was measured (smoke: every generation); the result is the best of it
    measured = [row["validation_kl"] for row in run.read_history(2)]
    assert len(measured) == 2 and second["validation_kl"] == min(second["start_validation_kl"], *measured)
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (
        status["selected_iteration"] == 1
        and status["iterations"][1]["validation_kl"] == second["validation_kl"]
    )
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| validation KL |" in report and "iteration 1's result (best validation KL" in report


def test_a_one_shot_allocation_that_validates_worse_gives_way_to_the_start(
    tiny_assets, tmp_path, monkeypatch, one_thread
):
    def centre_is_best(self, genomes):
        return [0.5 if not any(g) else 1.0 for g in genomes]

    monkeypatch.setattr(Validator, "__call__", centre_is_best)
    out = tmp_path / "run"
    assert main(smoke_args(tiny_assets, out, "--method", "layer-error")) == 0
    result = RunDir(out).read_result(1)
    assert result["genome"] == [0] * len(result["genome"]) and result["chosen_generation"] == 0
    assert result["validation_kl"] == result["start_validation_kl"] == 0.5


def test_an_older_run_resumes_with_legacy_selection_and_no_validation(
    tiny_assets, tmp_path, capsys, one_thread
):
    """A run stored before the keys existed, re-run with its own command (whose preset now sets them), finishes
    as it began: legacy selection, no validation windows, and the result an uninterrupted run had."""
    out = tmp_path / "run"
    legacy = ["--set", "search.selection=legacy", "--set", "data.num_validation_sequences=0"]
    assert main(smoke_args(tiny_assets, out, *legacy, "--set", "search.validate_every=0")) == 0
    run = RunDir(out)
    reference = run.read_result(2)
    stored = yaml.safe_load(run.config_path.read_text())
    for section, key in (
        ("search", "selection"),
        ("search", "validate_every"),
        ("data", "num_validation_sequences"),
    ):
        del stored[section][key]  # as an older Tyr wrote it
    run.config_path.write_text(yaml.safe_dump(stored, sort_keys=False))
    run.metrics_path.unlink()
    run.result_path(2).unlink()
    shutil.rmtree(run.search_dir(2))  # iteration 2 searches again, under the resumed config
    capsys.readouterr()
    assert main([a for a in smoke_args(tiny_assets, out) if a != "--quiet"]) == 0
    assert "began before" in capsys.readouterr().err
    assert run.read_result(2) == reference and "start_validated" not in run.read_state(2)
    assert not run.validation_teacher_dir.exists() and run.selection().validation_kl is None
