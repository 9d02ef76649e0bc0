"""Bad input gives one clear line on stderr, exit code 2, no traceback, and nothing overwritten; a bug gives one
line and exit 1 (the traceback with --debug); the global options and `--version`."""

from __future__ import annotations

import errno
import importlib.metadata
import json
import re
from pathlib import Path

import pytest

import tyr
from tests.conftest import smoke_args
from tests.tiny import tiny_model
from tyr.cli import build_parser, main


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
    (out / ".tyr-run").write_text("{}")  # a Tyr run (marked) with another config
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
    printed = capsys.readouterr()
    assert (
        printed.out
        == f"[tyr] done: {out / 'final' / 'architecture.json'}, {out / 'final' / 'metrics.json'}\n"
    )
    assert "[tyr]" not in printed.err  # --quiet: warnings only, and the smoke run has none
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
    assert main(smoke_args(tiny_assets, tmp_path / "old", "--log-level", "info")) == 0
    err = capsys.readouterr().err
    assert "[tyr] evaluating dense / uniform / searched" in err and "building the supernet" not in err
    cfg["search"]["future_setting"] = 1
    old.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _fails(capsys, smoke_args(tiny_assets, tmp_path / "old"), "another version of Tyr", "future_setting")


# -- unexpected and environment errors ---------------------------------------------------------------------------


def _raising(monkeypatch, error: BaseException) -> None:
    def cmd_status(args):
        raise error

    monkeypatch.setattr("tyr.cli.cmd_status", cmd_status)


def test_unexpected_error_is_one_line_and_exit_1(capsys, monkeypatch, tmp_path):
    _raising(monkeypatch, RuntimeError("boom\non two lines"))
    assert main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        err == "tyr: internal error: RuntimeError: boom on two lines (rerun with --debug for the traceback)\n"
    )


def test_debug_prints_the_traceback(capsys, monkeypatch, tmp_path):
    _raising(monkeypatch, RuntimeError("boom"))
    assert main(["--debug", "status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in cmd_status" in err
    assert err.splitlines()[-1] == "tyr: internal error: RuntimeError: boom"
    assert main(["status", str(tmp_path), "--debug"]) == 1  # after the subcommand too
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error, needles",
    [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            ["no space left on device (writing under {run})", "re-run"],
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/disk/run/teacher/values.bin"),
            ["no space left on device (/disk/run/teacher/values.bin)"],
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/srv/runs/r1"),
            ["permission denied (/srv/runs/r1)", "choose another path"],
        ),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y.json"), ["/x/y.json"]),
        (json.JSONDecodeError("Expecting value", "{not json", 1), ["JSON file is corrupt"]),
    ],
)
def test_environment_errors_are_one_line_and_exit_2(capsys, monkeypatch, tmp_path, error, needles):
    _raising(monkeypatch, error)
    err = _fails(capsys, ["status", str(tmp_path)], *[n.format(run=tmp_path) for n in needles])
    assert len(err.splitlines()) == 1


def test_corrupt_safetensors_and_yaml_are_one_line_and_exit_2(capsys, monkeypatch, tmp_path):
    import yaml
    from safetensors.torch import load_file

    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    try:
        load_file(tmp_path / "bad.safetensors")
    except Exception as e:  # the real exception type safetensors raises for a corrupt file
        _raising(monkeypatch, e)
    _fails(capsys, ["status", str(tmp_path)], "safetensors file", "corrupt")
    try:
        yaml.safe_load("a: [1, 2")
    except yaml.YAMLError as e:
        _raising(monkeypatch, e)
    _fails(capsys, ["status", str(tmp_path)], "invalid YAML")


def test_interrupt_exits_130(capsys, monkeypatch, tmp_path):
    _raising(monkeypatch, KeyboardInterrupt())
    assert main(["status", str(tmp_path)]) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err


# -- global options and --version ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["status", "R"], ["report", "R"], ["export", "R", "--out", "O"], ["eval", "R"]]
)
def test_global_options_before_or_after_the_subcommand(command):
    parser = build_parser()
    plain = parser.parse_args(command)
    assert (plain.log_level, plain.quiet, plain.verbose, plain.debug) == (None, False, False, False)
    before = parser.parse_args(["--quiet", "--debug", "--log-level", "error", *command])
    after = parser.parse_args([*command, "--quiet", "--debug", "--log-level", "error"])
    for args in (before, after):
        assert (args.log_level, args.quiet, args.verbose, args.debug) == ("error", True, False, True)
    assert parser.parse_args(["--verbose", *command]).verbose


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["status", "R", "--quiet", "--verbose"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_version_is_pyprojects(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert capsys.readouterr().out == f"tyr {declared}\n"
    assert tyr.__version__ == declared == importlib.metadata.version("tyr-pruner")
    assert tyr._distribution_version("no-such-distribution-tyr") == "0+unknown"
