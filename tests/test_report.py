"""`tyr report` and `tyr status` on a real (tiny) finished run and on unfinished copies of it."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import yaml

from tests.conftest import smoke_args
from tyr.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tiny_assets, tmp_path_factory):
    """One smoke run shared by the module; tests that change files work on a copy."""
    out = tmp_path_factory.mktemp("report") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads, and they crawl on a busy machine
    try:
        assert main(smoke_args(tiny_assets, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _copy(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report.md", "plots"))  # earlier reports
    return copy


def _check_png(path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)  # (height, width, RGBA)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 300 and image.shape[2] in (3, 4)


def test_report_on_finished_run(finished_run, capsys):
    assert main(["report", str(finished_run)]) == 0
    assert "report.md" in capsys.readouterr().out
    text = (finished_run / "report.md").read_text()
    metrics = json.loads((finished_run / "final" / "metrics.json").read_text())
    assert "| model | perplexity | KL to dense (top-16) | prunable parameters |" in text
    for name in ("dense", "uniform", "searched"):
        assert f"| {name} | {metrics[name]['ppl']:.2f} |" in text
    assert "Run finished." in text and "## Missing" not in text
    assert "method | evolution" in text and "criterion | tyr" in text and "schedule | smoke" in text
    assert "](plots/allocation.png)" in text and "](plots/fitness.png)" in text
    for name in ("allocation", "fitness"):
        _check_png(finished_run / "plots" / f"{name}.png")


def test_allocation_table_matches_architecture(finished_run, tmp_path):
    assert main(["report", str(finished_run), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    arch = json.loads((finished_run / "final" / "architecture.json").read_text())
    for layer in arch["layers"]:
        attn, channels = layer["attention"], layer["mlp"]["kept_channels_count"]
        heads, kv = len(attn["kept_heads"]), len(attn["kept_kv_heads"])
        # uniform at 50% of the tiny model: 3 of 6 heads, 20 of 40 channels
        assert f"| {layer['index']} | 3 / 6 | {heads} / 6 | {kv} | 20 / 40 | {channels} / 40 |" in text, text
    assert (tmp_path / "out" / "plots" / "fitness.png").is_file()


def test_report_on_interrupted_run(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "final")
    (run / "iter-2" / "result.json").unlink()
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "Run not finished" in text
    assert "iteration 2 result (iter-2/result.json; searching)" in text
    assert "final metrics (final/metrics.json)" in text and "Not measured yet" in text
    assert "Chosen = iteration 1 result (run unfinished)." in text
    _check_png(run / "plots" / "allocation.png")
    _check_png(run / "plots" / "fitness.png")
    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert "iteration 2: searching, generation 2/2" in status and "finished" not in status


def test_status_of_a_search_without_state_file(finished_run, tmp_path, capsys):
    """random / optuna keep an Optuna journal instead of state.json; history.jsonl holds best-so-far lines."""
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "final")
    (run / "iter-2" / "result.json").unlink()
    (run / "iter-2" / "search" / "state.json").unlink()
    history = (run / "iter-2" / "search" / "history.jsonl").read_text().splitlines()
    best = min(json.loads(line)["fitness"] for line in history)
    assert main(["status", str(run)]) == 0
    assert f"iteration 2: searching, generation 2/2, best KL {best:.5f}" in capsys.readouterr().out


def test_one_shot_run_with_null_fitness(finished_run, tmp_path, capsys):
    """A one-shot method never creates iteration 2; its fitness may be null and it has no history."""
    run = _copy(finished_run, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["search"]["method"] = "uniform"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    shutil.rmtree(run / "iter-2")
    shutil.rmtree(run / "final")
    (run / "iter-1" / "search" / "history.jsonl").unlink()
    result = json.loads((run / "iter-1" / "result.json").read_text())
    result.update(fitness=None, generations=0, method="uniform")
    (run / "iter-1" / "result.json").write_text(json.dumps(result))

    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert "method uniform" in status
    assert "iteration 1: done (one-shot method uniform, best KL n/a, validation KL" in status
    assert "iteration 2: not needed (method uniform is one-shot)" in status
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "| 2 | not needed (method uniform is one-shot) |" in text
    assert "No fitness plot" in text and not (run / "plots" / "fitness.png").exists()
    assert "iteration 2 result" not in text  # not missing: not needed


def test_report_on_run_with_only_a_config(finished_run, tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    shutil.copy(finished_run / "config.yaml", run / "config.yaml")
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "teacher targets (teacher/meta.json)" in text and "No allocation yet" in text
    assert not (run / "plots").exists()


def test_report_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith(f"tyr: error: {tmp_path} is not a Tyr run directory (no config.yaml)")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_report_without_matplotlib(finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["report", str(finished_run), "--out", str(tmp_path)]) == 2
    assert "pip install 'tyr-pruner[report]'" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_status_on_finished_run(finished_run, capsys):
    assert main(["status", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "method evolution, criterion tyr" in out
    assert "iteration 1: done (3 generations" in out and "iteration 2: done (2 generations" in out
    assert "finished: perplexity dense" in out
