"""Rows of the bad-input checklist (benchmarks/bad_inputs.py replays all of it) that used to fail late, with a traceback, or not
at all: each now fails up front with one `tyr: error:` line, exit code 2, and nothing written.

Every case runs the CLI in-process on the tiny model and fails before the teacher targets, so the file stays fast.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import smoke_args
from tests.test_search_core import SyntheticFitness, make_space
from tyr.cli import main
from tyr.config import RunConfig, has_level_switch, ray_host_port, resolve_config, usable_sparsities
from tyr.data import TextSource, load_texts
from tyr.errors import TyrError
from tyr.search.sampled import sampled_search
from tyr.supernet.ladder import centre_for_sparsity, make_ladder, step_units
from tyr.supernet.variant import Gene


def _fails(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("tyr: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def _no_heavy_work(out: Path) -> None:
    """Nothing a run computes was written: no teacher targets, no supernet."""
    assert not (out / "teacher").exists() and not list(out.glob("iter-*"))


# -- refused by config validation: nothing is written at all ------------------------------------------------------

CONFIG_ROWS = {
    "s04": (["--set", "schedule=[1]"], "unknown schedule [1]"),
    "s10": (["--set", "supernet.storage_dtype=garbage"], "supernet.storage_dtype: unknown dtype 'garbage'"),
    "s16": (
        ["--method", "owl", "--set", "search.owl_threshold=.nan"],
        "search.owl_threshold must be a finite",
    ),
    "s16-evolution": (["--set", "search.owl_threshold=.nan"], "search.owl_threshold must be a finite"),
    "s16-sparsity": (["--set", "sparsity=.nan"], "sparsity must be a finite number"),
    "s16-damp": (["--set", "supernet.damp=.inf"], "supernet.damp must be a finite number"),
    "s16-step": (["--set", "supernet.mlp_step=.nan"], "supernet.mlp_step must be a finite number"),
    "s16-owl-lambda": (["--set", "search.owl_lambda=-.inf"], "search.owl_lambda must be a finite number"),
    "s16-backend": (
        ["--set", "backend.num_cpus_per_worker=.inf"],
        "backend.num_cpus_per_worker must be a finite",
    ),
    "s18-attn": (["--set", "supernet.attn_rounds=0"], "supernet.attn_rounds must be >= 1, got 0"),
    "s18-mlp": (["--set", "supernet.mlp_rounds=-3"], "supernet.mlp_rounds must be >= 1, got -3"),
    "s19": (["--set", "data.num_eval_sequences=-1"], "data.num_eval_sequences must be >= 1, got -1"),
    "s19-zero": (["--set", "data.num_eval_sequences=0"], "data.num_eval_sequences must be >= 1, got 0"),
    "s19-num-sequences": (["--set", "data.num_sequences=-2"], "data.num_sequences must be >= 1, got -2"),
    "s19-max-source-tokens": (["--set", "data.max_source_tokens=0"], "data.max_source_tokens must be >= 1"),
    "s19-max-level-distance": (
        ["--set", "search.max_level_distance=-1"],
        "search.max_level_distance must be >= 1",
    ),
    "s19-num-layers": (["--set", "model.num_layers=0"], "model.num_layers must be >= 1, got 0"),
    "s20": (["--seed", "-1"], "seed must be >= 0, got -1"),
    # the calibration source holds fewer windows than calibration + validation: found when the data is read,
    # before the teacher pass and before anything is written
    "s19-num-validation": (
        ["--set", "data.num_validation_sequences=500"],
        "8 calibration sequences + 500 validation sequences were asked for",
    ),
    "s22-gpus": (
        ["--set", "backend.num_gpus_per_worker=two"],
        "backend.num_gpus_per_worker must be a finite number or one of auto, got 'two'",
    ),
    "s21": (["--set", "search.stages=[[0,64]]"], "stage 0 num_survivors must be a positive integer"),
    "fitness-name": (["--set", "search.fitness=hidden"], "search.fitness must be one of kl, kl+hidden"),
    "hidden-weight": (["--set", "search.hidden_weight=-1"], "search.hidden_weight must be >= 0"),
    "hidden-weight-nan": (["--set", "search.hidden_weight=.nan"], "search.hidden_weight must be a finite"),
    "y-r2": (["--ray-address", "not an address!!"], "is not of the form host:port"),
    "y-r5": (["--ray-address", "ray://[::1"], "is not of the form host:port"),
}


@pytest.mark.parametrize("row", list(CONFIG_ROWS))
def test_refused_by_config_validation(capsys, tmp_path, tiny_assets, row):
    extra, needle = CONFIG_ROWS[row]
    out = tmp_path / "run"
    _fails(capsys, smoke_args(tiny_assets, out, *extra), needle)
    assert not out.exists()


@pytest.mark.parametrize(
    "row, content, needle",
    [
        ("y01", b"a: [1, 2\nb: 3\n", "is not valid YAML (line 2, column 2): expected ','"),
        ("y05", b"schedule: {a: 1}\n", "unknown schedule {'a': 1}"),
        ("y08", bytes(range(128, 256)) * 8, "is not UTF-8 text"),
        ("y10", None, "is a directory"),
    ],
)
def test_bad_config_file(capsys, tmp_path, tiny_assets, row, content, needle):
    config = tmp_path / "cfg.yaml"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content)
    out = tmp_path / "run"
    args = smoke_args(tiny_assets, out)
    i = args.index("--schedule")
    del args[i : i + 2]  # the file's schedule (y05) is the one under test
    _fails(capsys, [args[0], str(config), *args[1:]], needle)
    assert not out.exists()


# -- refused once the model's shapes are known, before the teacher targets ----------------------------------------


@pytest.mark.parametrize(
    "row, extra",
    [
        ("c03", ["--sparsity", "0"]),
        ("c09", ["--sparsity", "0.999"]),
        ("c03-uniform", ["--sparsity", "0", "--method", "uniform"]),
    ],
)
def test_sparsity_without_a_level_switch(capsys, tmp_path, tiny_assets, row, extra):
    # tiny model: 6 heads (step 1), 40 channels in multiples of 4 (step 4): the last usable target removes 36
    out = tmp_path / "run"
    _fails(
        capsys, smoke_args(tiny_assets, out, *extra), "sparsity", "use a sparsity in (0, 0.9] for this model"
    )
    _no_heavy_work(out)


def test_single_block_has_no_level_switch(capsys, tmp_path, tiny_assets):
    out = tmp_path / "run"
    _fails(
        capsys,
        smoke_args(tiny_assets, out, "--set", "model.num_layers=1"),
        "model.num_layers",
        "budget=joint",
    )
    _no_heavy_work(out)


def _usable_by_ladders(cfg: RunConfig, units: dict[str, int], num_layers: int, searching: bool) -> bool:
    """Ground truth: build iteration 1's ladders as the pipeline does and look for one level switch."""
    sn = cfg.supernet
    multiple = {"attn": 1, "mlp": sn.channel_multiple}
    step = {
        "attn": step_units(units["attn"], sn.attn_step, sn.min_attn_step),
        "mlp": step_units(units["mlp"], sn.mlp_step, sn.min_mlp_step, sn.channel_multiple),
    }
    ladders = []
    for layer in range(num_layers):
        for kind in ("attn", "mlp"):
            n = units[kind]
            centre = centre_for_sparsity(n, cfg.sparsity, multiple[kind])
            if searching:
                ladders.append(make_ladder(Gene(layer, kind), n, centre, step[kind], sn.num_levels))
            else:  # one-shot: is anything left to allocate (some unit both removed and kept)?
                ladders.append(make_ladder(Gene(layer, kind), n, centre, 1, 3))
    if not searching:
        return any(-1 in ladder.levels and 1 in ladder.levels for ladder in ladders)
    joint = cfg.search.budget == "joint"
    return any(
        -1 in a.levels and 1 in b.levels and (joint or a.gene.kind == b.gene.kind)
        for i, a in enumerate(ladders)
        for j, b in enumerate(ladders)
        if i != j
    )


@pytest.mark.parametrize(
    "overrides, units, num_layers",
    [
        ([], {"attn": 6, "mlp": 40}, 3),
        (["search.budget=joint"], {"attn": 6, "mlp": 40}, 1),
        (["supernet.min_mlp_step=32", "supernet.channel_multiple=32"], {"attn": 9, "mlp": 1536}, 2),
        (["supernet.min_mlp_step=12"], {"attn": 1, "mlp": 40}, 2),
        (["supernet.num_levels=1"], {"attn": 6, "mlp": 40}, 3),
    ],
)
@pytest.mark.parametrize("searching", [True, False])
def test_usable_sparsities_match_the_ladders(overrides, units, num_layers, searching):
    cfg = resolve_config(None, ["schedule=smoke", *overrides])
    usable = usable_sparsities(cfg, units, num_layers, searching)
    for s in np.arange(0.0, 1.0, 0.0025):
        cfg.sparsity = float(s)
        truth = _usable_by_ladders(cfg, units, num_layers, searching)
        assert has_level_switch(cfg, units, num_layers, searching) == truth, s
        in_range = any(lo + 1e-9 < s <= hi - 1e-9 for lo, hi in usable)
        near_edge = any(min(abs(s - lo), abs(s - hi)) <= 1e-9 for lo, hi in usable)
        assert near_edge or in_range == truth, (s, usable)


# -- models whose weights cannot be used ---------------------------------------------------------------------------


def _damage_model(src: str, dst: Path, row: str) -> None:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if row == "m04":  # truncated download
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif row in ("m08", "m09"):
        config = json.loads((dst / "config.json").read_text())
        config.update({"hidden_size": 96} if row == "m08" else {"num_key_value_heads": 3})
        (dst / "config.json").write_text(json.dumps(config))
    elif row == "m10":  # pickle-only checkpoint: never unpickled, whatever it holds
        weights.unlink()
        (dst / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")


@pytest.mark.parametrize(
    "row, needle",
    [
        ("m04", "safetensors weights are unreadable"),
        ("m08", "do not match its config.json"),
        ("m09", "do not match its config.json: model.layers.0.self_attn.k_proj.weight is [16, 48]"),
        ("m10", "Tyr loads only safetensors weights"),
    ],
)
def test_unusable_model_weights(capsys, tmp_path, tiny_assets, row, needle):
    _damage_model(tiny_assets["model"], tmp_path / "model", row)
    args = smoke_args(tiny_assets, tmp_path / "run")
    args[args.index("--model") + 1] = str(tmp_path / "model")
    _fails(capsys, args, needle)
    _no_heavy_work(tmp_path / "run")


# -- calibration data -----------------------------------------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the datasets hub (a local path must never become a dataset name)."""
    import datasets

    real = datasets.load_dataset

    def local_only(path, *args, **kwargs):
        if path not in ("text", "json", "parquet"):
            raise AssertionError(f"asked the hub for {path!r}")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", local_only)


@pytest.mark.parametrize(
    "row, name, content, needle",
    [
        ("d02", "binary.txt", np.random.default_rng(0).bytes(20_000), "does not look like text"),
        ("d07", "data/nope.txt", None, "data path 'data/nope.txt' does not exist"),
        ("d08", "nope.txt", None, "data path 'nope.txt' does not exist"),
        (
            "d15",
            "bad.jsonl",
            b'{"text": "ok"}\n{"text": broken\n',
            "bad.jsonl is not valid JSON / JSON Lines",
        ),
    ],
)
def test_bad_calibration_data(capsys, tmp_path, tiny_assets, monkeypatch, no_hub, row, name, content, needle):
    monkeypatch.chdir(tmp_path)  # d07/d08 are relative paths
    if content is not None:
        (tmp_path / name).write_bytes(content)
    args = smoke_args(tiny_assets, tmp_path / "run")
    args[args.index("--data") + 1] = name
    _fails(capsys, args, needle)
    _no_heavy_work(tmp_path / "run")


def test_latin1_text_still_loads(tmp_path, no_hub):
    """d03: a few undecodable bytes (ISO-8859-1 accents) are replaced, not refused."""
    path = tmp_path / "latin1.txt"
    path.write_bytes("Café, naïve résumé: a plain sentence of ordinary words.\n".encode("latin-1") * 20)
    texts = load_texts(TextSource(str(path)))
    assert len(texts) == 20 and texts[0].startswith("Caf\ufffd")


# -- tyr eval options ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, extra, needle",
    [
        ("v02", ["--topk", "-5"], "--topk must be at least 1, got -5"),
        ("v03", ["--num-sequences", "-1"], "--num-sequences must be at least 1, got -1"),
        ("v03-zero", ["--num-sequences", "0"], "--num-sequences must be at least 1, got 0"),
    ],
)
def test_bad_eval_options(capsys, tiny_assets, row, extra, needle):
    _fails(capsys, ["eval", tiny_assets["model"], "--data", tiny_assets["eval"], *extra], needle)


# -- a torn Optuna journal (k08) ---------------------------------------------------------------------------------


class _Interrupting(SyntheticFitness):
    def __init__(self, fail_after: int | None = None):
        super().__init__(noise=0.1)
        self.fail_after = fail_after

    def __call__(self, genomes, sequence_indices):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # a kill in the middle of the search
        return super().__call__(genomes, sequence_indices)


def _sampled(directory: Path, fitness):
    return sampled_search(
        make_space(),
        fitness,
        sampler="tpe",
        num_evaluations=24,
        batch_size=8,
        indices=np.arange(4),
        seed=3,
        journal_path=directory / "optuna.journal",
        history_path=directory / "history.jsonl",
        identity="test",
    )


@pytest.mark.parametrize("tail", [b'{"op_code":4,"worker_id":"ab', b'{"op_code":4,"wor\n'])
def test_torn_journal_tail_is_dropped_and_the_search_resumes_exactly(tmp_path, caplog, tail):
    full = _sampled(tmp_path / "full", _Interrupting())
    with pytest.raises(KeyboardInterrupt):
        _sampled(tmp_path / "killed", _Interrupting(fail_after=2))
    journal = tmp_path / "killed" / "optuna.journal"
    intact = journal.read_bytes()
    journal.write_bytes(intact + tail)  # what ENOSPC or a power cut in the middle of an append leaves
    with caplog.at_level(logging.WARNING):
        resumed = _sampled(tmp_path / "killed", _Interrupting())
    assert "torn last record" in caplog.text
    assert (resumed.genome, resumed.fitness, resumed.evaluations) == (
        full.genome,
        full.fitness,
        full.evaluations,
    )


def test_corrupt_journal_middle_is_refused(tmp_path):
    _sampled(tmp_path / "a", _Interrupting())
    journal = tmp_path / "a" / "optuna.journal"
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join([*lines[:3], b"garbage", *lines[3:]]))
    with pytest.raises(TyrError, match="is corrupt .*line 4.*delete the folder"):
        _sampled(tmp_path / "a", _Interrupting())


def test_torn_journal_in_a_run_resumes(capsys, tmp_path, tiny_assets):
    """k08 end to end: a finished random-search run whose last journal append was torn gets the same result."""
    out = tmp_path / "run"
    args = smoke_args(tiny_assets, out, "--method", "random")
    assert main(args) == 0
    architecture = (out / "final" / "architecture.json").read_text()
    shutil.rmtree(out / "final")
    (out / "iter-2" / "result.json").unlink()
    with open(out / "iter-2" / "search" / "optuna.journal", "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"ab')
    capsys.readouterr()
    assert main(args) == 0
    assert "torn last record" in capsys.readouterr().err
    assert (out / "final" / "architecture.json").read_text() == architecture


# -- pure syntax checks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, expected",
    [
        ("auto", None),
        ("10.0.0.1:6379", ("10.0.0.1", 6379)),
        ("ray://head-node:10001", ("head-node", 10001)),
        ("[::1]:6379", ("::1", 6379)),
        ("ray://[::1]:10001", ("::1", 10001)),
    ],
)
def test_ray_address_syntax(address, expected):
    assert ray_host_port(address) == expected


@pytest.mark.parametrize(
    "address", ["not an address!!", "ray://[::1", "host", "host:", ":6379", "host:99999", "http://h:1"]
)
def test_bad_ray_address_syntax(address):
    with pytest.raises(TyrError, match="is not of the form"):
        ray_host_port(address)
