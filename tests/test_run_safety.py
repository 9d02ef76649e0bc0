"""Nothing Tyr did not write is lost: safe --force, the run lock, leftovers of killed runs, confined paths."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import smoke_args
from tyr.cli import main
from tyr.rundir import RunDir


@pytest.fixture(scope="module")
def finished(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    assert main(smoke_args(tiny_assets, out)) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("tyr: error: ")
    return err


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_never_deletes_a_model_folder(tiny_assets, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_assets["model"], model)
    before = _snapshot(model)
    args = smoke_args(tiny_assets, model, "--force")
    args[args.index("--model") + 1] = str(model)
    assert "which is the model folder" in _error(capsys, args)
    assert _snapshot(model) == before


def test_force_never_deletes_a_foreign_folder_with_a_config_yaml(tiny_assets, tmp_path, capsys):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("title: my thesis\n")
    (foreign / "data.csv").write_text("1,2,3\n")
    before = _snapshot(foreign)
    err = _error(capsys, smoke_args(tiny_assets, foreign, "--force"))
    assert "not written by Tyr" in err or "another version of Tyr" in err
    assert _snapshot(foreign) == before


def test_a_typo_with_force_keeps_the_finished_run(run_copy, tiny_assets, tmp_path, capsys):
    before = _snapshot(run_copy)
    args = smoke_args(tiny_assets, run_copy, "--force", "--sparsity", "0.25")
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert "does not exist" in _error(capsys, args)
    assert _snapshot(run_copy) == before


def test_force_replaces_a_tyr_run(run_copy, tiny_assets, capsys):
    assert main(smoke_args(tiny_assets, run_copy, "--force", "--method", "uniform")) == 0
    run = RunDir(run_copy)
    assert run.finished_iterations() == [1] and run.selection().method == "uniform"


def test_out_that_is_a_file(tiny_assets, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert "is a file" in _error(capsys, smoke_args(tiny_assets, path))


def test_a_second_process_on_the_same_run_is_refused(run_copy, tiny_assets, capsys):
    with RunDir(run_copy).lock():
        err = _error(capsys, smoke_args(tiny_assets, run_copy))
    assert f"in use by another Tyr process (pid {os.getpid()})" in err
    assert main(smoke_args(tiny_assets, run_copy)) == 0  # released


def test_leftovers_of_a_killed_run_are_swept_and_the_first_gene_resumes(run_copy, tiny_assets, capsys):
    run = RunDir(run_copy)
    architecture = run.read_architecture()
    # as a kill while the first gene of iteration 1 was being written leaves it (no manifest yet) ...
    for child in run_copy.iterdir():
        if child.name not in ("config.yaml", ".tyr-run", "teacher"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    gene_dir = run.supernet_dir(1) / "0" / "attn"
    gene_dir.mkdir(parents=True)
    (gene_dir / "+0.safetensors").write_bytes(b"partial")
    (gene_dir / ".+1.safetensors.x1y2.tmp").write_bytes(b"partial")
    # ... and a killed teacher pass its full-size temp file
    orphan = run.teacher_dir / ".targets.safetensors.k9.tmp"
    orphan.write_bytes(b"\0" * 1024)
    assert main(smoke_args(tiny_assets, run_copy)) == 0
    assert not orphan.exists()
    assert run.read_architecture() == architecture


def test_damaged_teacher_targets_are_found_and_recomputed(run_copy, tiny_assets, capsys):
    run = RunDir(run_copy)
    targets = run.teacher_dir / "targets.safetensors"
    original = targets.read_bytes()
    data = bytearray(original)
    data[-8:] = b"\x00\x3c" * 4  # valid fp16 ones: only the hash can tell
    targets.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(smoke_args(tiny_assets, run_copy)) == 0
    err = capsys.readouterr().err
    assert "teacher targets are damaged" in err and "sha256" in err
    assert targets.read_bytes() == original  # recomputed: the same model and tokens give the same bytes
    (run.teacher_dir / "meta.json").write_text('{"form')  # unreadable metadata: recomputed too
    assert main(smoke_args(tiny_assets, run_copy)) == 0
    assert targets.read_bytes() == original


@pytest.mark.parametrize("entry", ["../../../../../../etc/passwd", "/etc/passwd", "fifo"])
def test_manifest_paths_are_confined(run_copy, tmp_path, capsys, entry):
    run = RunDir(run_copy)
    selection = run.selection()
    iteration = selection.iteration
    manifest_path = run.manifest_path(iteration)
    manifest = json.loads(manifest_path.read_text())
    level = manifest["genes"]["0.attn"]["levels"][str(selection.genome[0])]  # a variant the export reads
    if entry == "fifo":
        os.mkfifo(run.supernet_dir(iteration) / "pipe")
        entry = "pipe"
    level["file"] = entry
    manifest_path.write_text(json.dumps(manifest))
    err = _error(capsys, ["export", str(run_copy), "--out", str(tmp_path / "export")])
    assert "not written by Tyr" in err
    assert not (tmp_path / "export").exists()


def test_a_linked_final_folder_must_be_empty_or_tyrs(run_copy, tiny_assets, tmp_path, capsys):
    run = RunDir(run_copy)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "architecture.json").write_text('{"mine": true}')
    shutil.rmtree(run.final_dir)
    run.final_dir.symlink_to(outside, target_is_directory=True)
    assert "holds files Tyr did not write" in _error(capsys, smoke_args(tiny_assets, run_copy))
    assert (outside / "architecture.json").read_text() == '{"mine": true}'
    (outside / "architecture.json").unlink()
    assert main(smoke_args(tiny_assets, run_copy)) == 0  # an empty target is marked and written through
    assert (outside / "metrics.json").is_file() and (outside / ".tyr-run").is_file()


def test_report_never_overwrites_a_foreign_report(finished, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "docs"
    out.mkdir()
    (out / "report.md").write_text("my own notes\n")
    assert "did not write" in _error(capsys, ["report", str(finished), "--out", str(out)])
    assert (out / "report.md").read_text() == "my own notes\n"
    (out / "report.md").unlink()
    assert main(["report", str(finished), "--out", str(out)]) == 0
    assert main(["report", str(finished), "--out", str(out)]) == 0  # its own report may be refreshed


def test_base_weights_changed_in_place_are_refused_on_resume(tiny_assets, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_assets["model"], model)
    out = tmp_path / "run"
    args = smoke_args(tiny_assets, out, "--method", "uniform")
    args[args.index("--model") + 1] = str(model)
    assert main(args) == 0
    assert "model_weights_sha256" in json.loads(RunDir(out).inputs_path.read_text())
    weights = load_file(model / "model.safetensors")
    name = next(n for n in weights if n.endswith("down_proj.weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert "model_weights_sha256 differs" in _error(capsys, args)
    assert "model_weights_sha256 differs" in _error(
        capsys, ["export", str(out), "--out", str(tmp_path / "e")]
    )
    assert not (tmp_path / "e").exists()


def _break_config(run, key, value):
    import yaml

    cfg = yaml.safe_load(run.config_path.read_text())
    cfg[key] = value
    run.config_path.write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize(
    "damage",
    ["config search list", "config generations", "metrics types", "state fitness", "history seconds"],
)
def test_status_and_report_on_malformed_files(run_copy, capsys, damage):
    """No traceback: either the command copes or it says which run holds malformed files (exit 2)."""
    run = RunDir(run_copy)
    if damage == "config search list":
        _break_config(run, "search", [1, 2])
    elif damage == "config generations":
        import yaml

        cfg = yaml.safe_load(run.config_path.read_text())
        cfg["search"]["generations"] = "abc"
        run.config_path.write_text(yaml.safe_dump(cfg))
    elif damage == "metrics types":
        run.metrics_path.write_text(json.dumps({"dense": 5, "achieved_sparsity": "x"}))
    elif damage == "state fitness":
        run.metrics_path.unlink()
        run.result_path(2).unlink()
        state = json.loads(run.state_path(2).read_text())
        state["parent_fitness"] = "abc"
        run.state_path(2).write_text(json.dumps(state))
    else:
        run.metrics_path.unlink()
        run.result_path(2).unlink()
        run.history_path(2).write_text('{"generation": 1, "seconds": "x", "fitness": 0.5}\n')
    commands = [["status", str(run_copy)], ["status", "--json", str(run_copy)]]
    if __import__("importlib").util.find_spec("matplotlib"):
        commands.append(["report", str(run_copy)])
    for argv in commands:
        code = main(argv)
        captured = capsys.readouterr()
        assert code in (0, 2), (argv, captured.err)
        assert "Traceback" not in captured.err
        if code == 2:
            assert captured.err.strip().splitlines()[-1].startswith("tyr: error: ")


def test_a_killed_exports_temp_folder_is_swept(finished, tmp_path):
    stale = tmp_path / ".model.tmp-k1ll3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    assert main(["export", str(finished), "--out", str(tmp_path / "model")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_evaluation_data_is_checked_up_front_and_is_not_run_identity(run_copy, tiny_assets, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    args = smoke_args(tiny_assets, fresh)
    args[args.index("--eval-data") + 1] = str(tmp_path / "missing-eval.txt")
    assert "does not exist" in _error(capsys, args)
    assert not fresh.exists()  # refused before anything was written

    run = RunDir(run_copy)
    architecture, old = run.read_architecture(), run.read_metrics()
    other = tmp_path / "other-eval.txt"
    other.write_text((Path(tiny_assets["data"]).read_text()) * 2)
    args = smoke_args(tiny_assets, run_copy)
    args[args.index("--eval-data") + 1] = str(other)
    capsys.readouterr()
    assert main(args) == 0  # the same run, measured on other data
    new = run.read_metrics()
    assert new["evaluation"]["data"] == str(other) and new["evaluation"] != old["evaluation"]
    assert new["searched"]["ppl"] != old["searched"]["ppl"]
    assert run.read_architecture() == architecture
    assert "building the supernet" not in capsys.readouterr().err


def test_eval_of_a_damaged_or_pickled_export(finished, tmp_path, capsys):
    folder = tmp_path / "export"
    assert main(["export", str(finished), "--out", str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    lists = [k for k in config if k.endswith("_per_layer")]
    if lists:  # a per-layer (tyr_*) export: a list one layer short
        config[lists[0]] = config[lists[0]][:-1]
    else:
        config["num_attention_heads"] = 5  # a stock export whose config no longer fits its weights
    (folder / "config.json").write_text(json.dumps(config))
    assert "cannot load" in _error(capsys, ["eval", str(folder), "--num-sequences", "1"])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not a pickle you want to load")
    assert "pickled weights" in _error(capsys, ["eval", str(pickled)])


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_message(tiny_assets, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tyr.cli", *smoke_args(tiny_assets, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and not RunDir(out).has_teacher() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert proc.returncode == 143, err
    assert "terminated" in err and "re-run the same command to resume" in err and "Traceback" not in err
    assert not list(out.rglob("*.tmp"))


def test_report_escapes_strings_from_run_files(run_copy, capsys):
    pytest.importorskip("matplotlib")
    run = RunDir(run_copy)
    hostile = "x | y `z` <script>alert(1)</script>\n# heading"
    metrics = run.read_metrics()
    metrics["eval_data"] = hostile
    run.metrics_path.write_text(json.dumps(metrics))
    architecture = run.read_architecture()
    architecture["base_model"] = hostile
    run.architecture_path.write_text(json.dumps(architecture))
    assert main(["report", str(run_copy)]) == 0
    text = (run_copy / "report.md").read_text()
    assert "<script>" not in text and "\n# heading" not in text
    summary = text.split("## Summary")[1].split("##")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    assert all(row.count(" | ") == 1 for row in rows)  # two cells per row: no cell was split by a '|'


def test_a_resumed_run_reads_its_kept_windows_not_a_changed_source(tiny_assets, tmp_path, capsys):
    """RUN/data/ keeps the calibration and validation windows: a run whose data file changed since it started
    resumes on its own windows with the same result (without them it is refused: the teacher's hash differs)."""
    from tests.tiny import write_corpus
    from tyr.data import load_tokens

    data = tmp_path / "calib.txt"
    shutil.copy(tiny_assets["data"], data)
    assets, out = {**tiny_assets, "data": str(data)}, tmp_path / "run"
    assert main(smoke_args(assets, out)) == 0
    run = RunDir(out)
    assert load_tokens(run.tokens_path("calibration"), (8, 32)) is not None
    assert load_tokens(run.tokens_path("validation"), (4, 32)) is not None
    architecture = run.read_architecture()
    shutil.rmtree(run.final_dir)  # redo iteration 2's search and the final model: they read the windows
    shutil.rmtree(run.iteration_dir(2))
    write_corpus(data, num_docs=40, seed=7)  # the source changed since the run started

    kept = out / "data"
    kept.rename(tmp_path / "kept")
    assert "calibration tokens differ" in _error(capsys, smoke_args(assets, out))
    (tmp_path / "kept").rename(kept)
    assert main(smoke_args(assets, out)) == 0
    assert run.read_architecture() == architecture


def test_damaged_kept_windows_are_read_again(tmp_path, monkeypatch):
    import torch

    from tyr import data

    warnings = []
    monkeypatch.setattr(data.logger, "warning", warnings.append)

    from tyr.data import load_tokens, save_tokens

    path = tmp_path / "data" / "calibration.safetensors"
    tokens = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    save_tokens(path, tokens)
    assert torch.equal(load_tokens(path, (3, 4)), tokens)
    assert load_tokens(path, (4, 3)) is None  # another shape: not this config's windows
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    assert load_tokens(path, (3, 4)) is None and "damaged" in warnings[-1]
    path.write_bytes(b"not safetensors")
    assert load_tokens(path, (3, 4)) is None and "unreadable" in warnings[-1]
    assert load_tokens(tmp_path / "missing.safetensors", (3, 4)) is None
