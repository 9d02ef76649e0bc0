"""Bad input gives one clear line on stderr, exit code 2, no traceback, and nothing overwritten."""

from __future__ import annotations

import json

import pytest

from tests.conftest import smoke_args
from tests.tiny import tiny_model
from tyr.cli import main


def _fails(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("tyr: error: ")
    for needle in needles:
        assert needle in err, err
    return err


def test_unknown_model_path(capsys, tmp_path, tiny_assets):
    args = smoke_args(tiny_assets, tmp_path / "run")
    args[args.index("--model") + 1] = str(tmp_path / "nope")
    _fails(capsys, args, "does not exist")


def test_unsupported_architecture(capsys, tmp_path, tiny_assets):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=101)).save_pretrained(
        tmp_path / "gpt2"
    )
    args = smoke_args(tiny_assets, tmp_path / "run")
    args[args.index("--model") + 1] = str(tmp_path / "gpt2")
    _fails(capsys, args, "gpt2", "llama")


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_out_of_range(capsys, tmp_path, tiny_assets, value):
    _fails(
        capsys, smoke_args(tiny_assets, tmp_path / "run", "--sparsity", value), "sparsity must be in [0, 1)"
    )


def test_missing_and_empty_data(capsys, tmp_path, tiny_assets):
    args = smoke_args(tiny_assets, tmp_path / "a")
    args[args.index("--data") + 1] = str(tmp_path / "missing.txt")
    _fails(capsys, args, "does not exist")
    (tmp_path / "empty.txt").write_text("")
    args = smoke_args(tiny_assets, tmp_path / "b")
    args[args.index("--data") + 1] = str(tmp_path / "empty.txt")
    _fails(capsys, args, "empty")


def test_too_little_data(capsys, tmp_path, tiny_assets):
    _fails(
        capsys,
        smoke_args(tiny_assets, tmp_path / "run", "--set", "data.num_sequences=100000"),
        "calibration sequences",
    )


def test_sequence_longer_than_model_maximum(capsys, tmp_path, tiny_assets):
    _fails(capsys, smoke_args(tiny_assets, tmp_path / "run", "--set", "data.seq_len=256"), "maximum of 128")


def test_unknown_set_key_and_bad_value(capsys, tmp_path, tiny_assets):
    _fails(capsys, smoke_args(tiny_assets, tmp_path / "r", "--set", "search.offspring=3"), "search.offspring")
    _fails(capsys, smoke_args(tiny_assets, tmp_path / "r", "--set", "data.seq_len=long"), "data.seq_len")
    _fails(capsys, smoke_args(tiny_assets, tmp_path / "r", "--schedule", "fast"), "unknown schedule")


def test_impossible_schedule(capsys, tmp_path, tiny_assets):
    _fails(
        capsys,
        smoke_args(tiny_assets, tmp_path / "r", "--set", "search.stages=[[9,64],[1,128]]"),
        "survivors",
    )


def test_output_folder_of_another_run_is_refused(capsys, tmp_path, tiny_assets):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("sparsity: 0.3\n")
    _fails(capsys, smoke_args(tiny_assets, out), "different config")
    assert (out / "config.yaml").read_text() == "sparsity: 0.3\n"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _fails(capsys, smoke_args(tiny_assets, other), "not empty")
    assert (other / "notes.txt").read_text() == "mine"


def test_run_end_to_end_and_corrupt_state(capsys, tmp_path, tiny_assets):
    out = tmp_path / "run"
    assert main(smoke_args(tiny_assets, out)) == 0
    arch = json.loads((out / "final" / "architecture.json").read_text())
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    model = tiny_model("llama_gqa")
    assert arch["params"]["dense"] == sum(p.numel() for p in model.parameters())
    assert len(arch["layers"]) == 3 and arch["achieved_sparsity"] >= 0.4
    assert metrics["searched"]["kl"] <= metrics["uniform"]["kl"] + 1e-9
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "iteration 2: done" in status and "finished: perplexity" in status
    # A corrupt search checkpoint is reported, not silently discarded.
    (out / "iter-2" / "result.json").unlink()
    (out / "iter-2" / "search" / "state.json").write_text("{not json")
    _fails(capsys, smoke_args(tiny_assets, out), "state")


def test_run_from_another_tyr_version(capsys, tmp_path, tiny_assets):
    """A stored config without a newer key reads as that key's default (the older behaviour) and resumes; a
    key this Tyr does not know (a newer Tyr wrote it) is refused with the key named."""
    import yaml

    from tyr.rundir import RunDir

    out = tmp_path / "run"
    assert main(smoke_args(tiny_assets, out, "--method", "uniform")) == 0
    run = RunDir(out)
    cfg = yaml.safe_load(run.config_path.read_text())
    del cfg["search"]["method"]  # as written before `search.method` existed: reads as the default, evolution
    run.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _fails(capsys, smoke_args(tiny_assets, out, "--method", "uniform"), "search.method", "'evolution' there")
    assert main(smoke_args(tiny_assets, tmp_path / "old", "--method", "evolution")) == 0
    old = RunDir(tmp_path / "old")
    cfg = yaml.safe_load(old.config_path.read_text())
    del cfg["search"]["method"]
    old.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    capsys.readouterr()
    old.metrics_path.unlink()  # resumes: the finished iterations are reused, only final/ is recomputed
    assert main(smoke_args(tiny_assets, tmp_path / "old")) == 0
    assert "building the supernet" not in capsys.readouterr().out
    cfg["search"]["future_setting"] = 1
    old.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _fails(capsys, smoke_args(tiny_assets, tmp_path / "old"), "another version of Tyr", "future_setting")
